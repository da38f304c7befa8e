/**
 * A framed channel over a byte stream pair (ssh's stdin/stdout, or a
 * socket): the transport half of the wire protocol. Frames are decoded by
 * core/wire.ts as chunks arrive and queued; the input is paused while the
 * queue is full, so a slow consumer holds the peer back through the pipe
 * instead of growing memory. A sender waits for 'drain' once QUEUED bytes
 * wait in the output: the scan that finds changed blocks keeps hashing while
 * the link carries what it found, instead of taking turns with it.
 *
 * Control messages the owner marks as out of band (`onControl` returns
 * true: progress events) are handled on arrival and never queued: the peer
 * may send them while this side is busy sending, and must not wait on them.
 */
import type { Readable, Writable } from 'node:stream';
import { isErrorCode, QsyncError, type ErrorCode } from '../core/errors.js';
import { encodeControl, MAX_FRAME, protocolError, WireDecoder, type ControlMessage, type WireFrame } from '../core/wire.js';

const HIGH = 64;
const LOW = 16;
/**
 * Bytes a sender may leave queued in the output before it waits: a few
 * hundred milliseconds of a fast WAN link, so a scan that finds a changed
 * block every so often never stalls on the link, and memory stays bounded.
 */
const QUEUED = 16 * 1024 * 1024;

/** An error the peer reported ({"op":"error"}), raised again on this side with its code and context. */
export function remoteError(msg: ControlMessage): Error {
  const errno = typeof msg.errno === 'string' ? msg.errno : undefined;
  const message = typeof msg.message === 'string' ? msg.message : 'the peer reported an error';
  if (errno && msg.code === undefined) return Object.assign(new Error(message), { code: errno });
  // A code this side does not know (a hostile peer's "toString") would map to no exit status at all.
  const code: ErrorCode = isErrorCode(msg.code) ? msg.code : 'IO';
  // Only the fields that describe the error: the peer does not choose this side's exit status or what is fatal here.
  const c = typeof msg.context === 'object' && msg.context !== null ? (msg.context as Record<string, unknown>) : {};
  const context = Object.fromEntries(Object.entries({ file: c.file, hint: c.hint, vanished: c.vanished === true || undefined, offset: c.offset, block: c.block }).filter(([, v]) => typeof v === 'string' || typeof v === 'number' || v === true));
  return new QsyncError(code, message, context, errno ? { cause: Object.assign(new Error(message), { code: errno }) } : undefined);
}

/** The control message that reports `e` to the peer. */
export function errorMessage(e: unknown): ControlMessage {
  if (e instanceof QsyncError) {
    const { file, hint, vanished, fatal, offset, block } = e.context;
    const cause = (e.cause as { code?: unknown } | undefined)?.code;
    return { op: 'error', code: e.code, message: e.message, context: { file, hint, vanished, fatal, offset, block }, errno: typeof cause === 'string' ? cause : undefined };
  }
  const errno = (e as { code?: unknown } | null)?.code;
  return { op: 'error', message: (e as Error)?.message ?? String(e), errno: typeof errno === 'string' ? errno : undefined };
}

export class Channel {
  private readonly queue: WireFrame[] = [];
  private waiter?: { ok: (f: WireFrame) => void; fail: (e: Error) => void };
  /** Senders waiting for 'drain': failed with the channel, so none waits on an output that is gone. */
  private readonly draining = new Set<(e?: Error) => void>();
  private failure?: Error;
  private ended = false;
  private readonly decoder: WireDecoder;
  /** Bytes received and sent (the frames, as on the wire). */
  received = 0;
  sent = 0;

  constructor(
    private readonly input: Readable,
    private readonly output: Writable,
    private readonly opts: { limit?: number; onControl?: (m: ControlMessage) => boolean; peer?: string; rate?: number; timeoutS?: number } = {},
  ) {
    this.decoder = new WireDecoder((f) => this.take(f), opts.limit ?? MAX_FRAME);
    input.on('data', (chunk: Buffer) => {
      this.received += chunk.length;
      this.heard = performance.now();
      if (this.failure) return;
      try {
        this.decoder.push(chunk);
      } catch (e) {
        this.fail(e as Error);
        input.pause();
      }
    });
    input.on('end', () => {
      try {
        this.decoder.end();
      } catch (e) {
        this.fail(e as Error);
        return;
      }
      this.ended = true;
      this.fail(new QsyncError('PROTOCOL', `connection closed by ${opts.peer ?? 'the peer'}`, { closed: true }));
    });
    input.on('error', (e) => this.fail(e));
    output.on('error', (e) => this.fail(e));
    output.on('close', () => this.fail(new QsyncError('PROTOCOL', `connection closed by ${opts.peer ?? 'the peer'}`, { closed: true })));
    output.on('drain', () => {
      for (const d of [...this.draining]) d();
    });
  }

  /** The peer closed its side cleanly (at a frame boundary). */
  get closed(): boolean {
    return this.ended;
  }

  private take(f: WireFrame): void {
    if (f.type === 'control' && this.opts.onControl?.(f.msg)) return;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = undefined;
      w.ok(f);
      return;
    }
    this.queue.push(f);
    if (this.queue.length >= HIGH) this.input.pause();
  }

  private fail(e: Error): void {
    if (this.failure) return;
    // A broken channel ends the run: no later file can get through it either.
    this.failure = e instanceof QsyncError ? new QsyncError(e.code, e.message, { ...e.context, fatal: true }, { cause: e.cause }) : new QsyncError('PROTOCOL', `connection to ${this.opts.peer ?? 'the peer'} failed: ${e.message}`, { fatal: true, closed: true }, { cause: e });
    const w = this.waiter;
    this.waiter = undefined;
    w?.fail(this.failure);
    for (const d of [...this.draining]) d(this.failure);
  }

  /** The next frame; throws when the stream failed or ended. */
  next(): Promise<WireFrame> {
    const f = this.queue.shift();
    if (f) {
      if (this.queue.length <= LOW && this.input.isPaused() && !this.failure) this.input.resume();
      return Promise.resolve(f);
    }
    if (this.failure) return Promise.reject(this.failure);
    if (this.input.isPaused()) this.input.resume();
    const wait = new Promise<WireFrame>((ok, fail) => (this.waiter = { ok, fail }));
    const s = this.opts.timeoutS;
    if (!s) return wait;
    // --timeout: rsync's "timeout in data send/receive" (exit 30) once the peer is silent that long.
    const check = setInterval(() => {
      if (performance.now() - this.heard < s * 1000) return;
      this.fail(new QsyncError('PROTOCOL', `timeout: ${this.opts.peer ?? 'the peer'} sent nothing for ${s} s`, { exit: 30, hint: 'check the link and the far side, or raise --timeout' }));
    }, Math.min(1000, s * 250));
    return wait.finally(() => clearInterval(check));
  }

  /** The next frame, which must be a control message; `{"op":"error"}` is raised as the peer's error. */
  async control(): Promise<ControlMessage> {
    const f = await this.next();
    if (f.type !== 'control') throw protocolError(`expected a control message, got a ${f.type} frame`);
    if (f.msg.op === 'error') throw remoteError(f.msg);
    return f.msg;
  }

  /** The next control message, which must be `op`. */
  async expect(op: string): Promise<ControlMessage> {
    const m = await this.control();
    if (m.op !== op) throw protocolError(`expected "${op}", got "${m.op}"`);
    return m;
  }

  /** When the peer last sent a byte (--timeout counts from it). */
  private heard = performance.now();

  /** When the bytes sent so far may have left, at `rate` (--bwlimit). */
  private due = 0;

  /** At most `bytesPerSecond` from now on (--bwlimit; 0: no limit). */
  limit(bytesPerSecond: number): void {
    this.opts.rate = bytesPerSecond;
  }

  /** Send frames (a control message, or a frame's buffers); resolves once the output takes more. */
  async send(frame: ControlMessage | Buffer | Buffer[]): Promise<void> {
    const before = this.sent;
    const ok = this.write(frame);
    const rate = this.opts.rate;
    if (rate) {
      // A paced queue: each frame leaves when the ones before it would have at the rate, with 50 ms of burst.
      const now = performance.now();
      this.due = Math.max(this.due, now) + ((this.sent - before) * 1000) / rate;
      const wait = this.due - now - 50;
      if (wait > 0) await new Promise((ok2) => setTimeout(ok2, wait));
    }
    // Only while the output still needs it: a 'drain' during the pause above has been and gone.
    if (!ok && this.output.writableNeedDrain && this.output.writableLength >= QUEUED) {
      await new Promise<void>((ok, fail) => {
        const done = (e?: Error) => {
          this.draining.delete(done);
          if (e) fail(e);
          else ok();
        };
        this.draining.add(done);
      });
    }
  }

  /** Send without waiting for the output to drain (small out-of-band messages). Returns write()'s verdict. */
  write(frame: ControlMessage | Buffer | Buffer[]): boolean {
    if (this.failure) throw this.failure;
    const bufs = Buffer.isBuffer(frame) ? [frame] : Array.isArray(frame) ? frame : [encodeControl(frame)];
    let ok = true;
    for (const b of bufs) {
      this.sent += b.length;
      ok = this.output.write(b);
    }
    return ok;
  }

  /** No more frames from this side (resolves also when the output is already gone). */
  end(): Promise<void> {
    const out = this.output;
    if (out.destroyed || out.writableFinished) return Promise.resolve();
    return new Promise((ok) => {
      const done = () => {
        out.off('finish', done).off('error', done).off('close', done);
        ok();
      };
      out.once('finish', done).once('error', done).once('close', done);
      out.end();
    });
  }
}
