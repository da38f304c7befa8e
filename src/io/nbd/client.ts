/**
 * NBD client (fixed newstyle, structured replies, metadata contexts) over a
 * TCP or unix socket. This class is the transport: it owns the socket, write
 * backpressure and the table of requests in flight (matched by handle); the
 * framing lives in parser.ts.
 */
import net from 'node:net';
import { QsyncError } from '../../core/errors.js';
import type { Extent, ExtentSource } from '../types.js';
import * as K from './constants.js';
import { NbdParser, readU64, type NbdParserLimits } from './parser.js';
import { parseNbdUri } from './uri.js';

export interface NbdConnectOptions {
  /** Metadata contexts to select, e.g. `base:allocation`, `qemu:dirty-bitmap:NAME`. */
  metaContexts?: string[];
  /** Requests in flight at once (default 16). */
  maxInFlight?: number;
  /** Handshake deadline (default 10 s). */
  timeoutMs?: number;
  limits?: Partial<NbdParserLimits>;
}

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface StatusDescriptor {
  length: number;
  flags: number;
}

/** A server's error reply to one request. */
export class NbdError extends QsyncError {
  constructor(command: string, offset: number, length: number, errno: number, message: string) {
    const name = K.ERRNO_NAMES[errno] ?? `errno ${errno}`;
    super('IO', `NBD ${command} at ${offset}+${length}: ${name}${message ? `: ${message}` : ''}`, {
      offset, length, command, errno: name,
    });
    this.name = 'NbdError';
  }
}

const CMD_NAMES: Record<number, string> = {
  [K.CMD_READ]: 'READ', [K.CMD_WRITE]: 'WRITE', [K.CMD_FLUSH]: 'FLUSH', [K.CMD_TRIM]: 'TRIM',
  [K.CMD_WRITE_ZEROES]: 'WRITE_ZEROES', [K.CMD_BLOCK_STATUS]: 'BLOCK_STATUS',
};

interface Request {
  cmd: number;
  offset: number;
  length: number;
  /** READ destination, `length` bytes. */
  buf: Buffer | undefined;
  /** READ bytes delivered (data + holes). */
  covered: number;
  /** BLOCK_STATUS descriptors by context id: length and flags of each, in pairs (8 bytes a descriptor, not an object each). */
  status: Map<number, Uint32Array>;
  error: QsyncError | undefined;
  resolve(r: Request): void;
  reject(e: Error): void;
}

interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

const bad = (msg: string): QsyncError => new QsyncError('PROTOCOL', `NBD: ${msg}`);

/** The socket's read buffer for headers, status and data read out of place. */
const SCRATCH = 64 * 1024;

export class NbdClient implements ExtentSource {
  readonly uri: string;
  size = 0;
  /** Transmission flags. */
  flags = 0;
  blockSizes: BlockSizes = { minimum: 1, preferred: 4096, maximum: K.DEFAULT_MAX_BLOCK };
  structuredReplies = false;
  /** Selected metadata contexts: name → id. */
  readonly contexts = new Map<string, number>();
  #socket: net.Socket;
  #parser: NbdParser;
  #pending = new Map<number, Request>();
  #nextHandle = 1;
  #closed: QsyncError | undefined;
  #maxInFlight: number;
  #slotWaiters: (() => void)[] = [];
  #idleWaiters: (() => void)[] = [];
  #drained: Promise<void> | undefined;
  #corked = false;
  #inbox: OptionReply[] = [];
  #inboxWaiter: { resolve(r: OptionReply): void; reject(e: Error): void } | undefined;
  /** What the socket reads into outside READ data (#readBuffer). */
  readonly #scratch = Buffer.allocUnsafe(SCRATCH);

  private constructor(uri: string, socket: net.Socket, opts: NbdConnectOptions) {
    this.uri = uri;
    this.#socket = socket;
    this.#maxInFlight = Math.max(1, opts.maxInFlight ?? 16);
    this.#parser = new NbdParser(
      {
        greeting: (flags) => this.#deliver({ option: -1, type: flags, data: Buffer.alloc(0) }),
        optionReply: (option, type, data) => this.#deliver({ option, type, data: Buffer.from(data) }),
        simpleReply: (h, err) => this.#simpleReply(h, err),
        simpleDone: (h, err) => this.#simpleDone(h, err),
        data: (h, off, piece) => this.#data(h, off, piece),
        chunk: (h, flags, type, payload) => this.#chunk(h, flags, type, payload),
      },
      opts.limits,
    );
    socket.setNoDelay(true);
    socket.on('error', (cause) => this.#teardown(new QsyncError('IO', `NBD connection ${uri}: ${cause.message}`, {}, { cause })));
    socket.on('close', () => this.#teardown(new QsyncError('IO', `NBD connection ${uri} closed`)));
  }

  /**
   * The socket reads into the buffer this returns: READ data the parser is
   * streaming goes straight into the request's own buffer (no copy, no
   * garbage); everything else into one scratch buffer of the connection,
   * which the parser copies out of what it keeps. A reply header is read on
   * its own (parser.headerRemaining()), so that the data after it is not
   * read into the scratch buffer and copied: one more read per reply, no
   * copy of 64 KiB.
   */
  #readBuffer(): Buffer {
    const at = this.#parser.streaming();
    const r = at && this.#pending.get(at.handle);
    if (r?.cmd === K.CMD_READ && r.buf) {
      const rel = at!.offset - r.offset;
      // Out of the request's bounds: the parser refuses it from the scratch buffer.
      if (rel >= 0 && rel + at!.remaining <= r.length) return r.buf.subarray(rel, rel + at!.remaining);
    }
    // Between replies, no further than where READ data would begin: the next read puts it in place.
    const header = this.#parser.headerRemaining();
    return header === undefined ? this.#scratch : this.#scratch.subarray(0, Math.min(SCRATCH, header));
  }

  #onRead(n: number, buf: Buffer): void {
    try {
      this.#parser.write(buf.subarray(0, n));
    } catch (e) {
      this.#teardown(e instanceof QsyncError ? e : bad(String(e)));
    }
  }

  static async connect(uri: string, opts: NbdConnectOptions = {}): Promise<NbdClient> {
    const addr = parseNbdUri(uri);
    let client: NbdClient | undefined;
    const onread: net.OnReadOpts = {
      buffer: () => (client ? client.#readBuffer() : Buffer.allocUnsafe(SCRATCH)),
      callback: (n, buf) => {
        client!.#onRead(n, buf as Buffer);
        return true;
      },
    };
    const socket = net.connect({ ...addr.connect, onread } as net.NetConnectOpts);
    client = new NbdClient(uri, socket, opts);
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const timer = setTimeout(() => client.#teardown(new QsyncError('IO', `NBD handshake with ${uri} timed out`)), timeoutMs);
    try {
      await client.#handshake(addr.exportName, opts.metaContexts ?? []);
      return client;
    } catch (e) {
      client.#socket.destroy();
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  get readOnly(): boolean {
    return (this.flags & K.TFLAG_READ_ONLY) !== 0;
  }

  /** The server lets several connections to this export share the work (QEMU: read-only exports). */
  get canMultiConn(): boolean {
    return (this.flags & K.TFLAG_CAN_MULTI_CONN) !== 0;
  }

  // ---- handshake ----

  async #handshake(exportName: string, metaContexts: string[]): Promise<void> {
    const greeting = await this.#nextOption();
    if (!(greeting.type & K.FLAG_FIXED_NEWSTYLE)) throw bad('server does not support fixed newstyle negotiation');
    const clientFlags = Buffer.alloc(4);
    // NO_ZEROES only matters for NBD_OPT_EXPORT_NAME, which we never send.
    clientFlags.writeUInt32BE(K.FLAG_FIXED_NEWSTYLE | (greeting.type & K.FLAG_NO_ZEROES));
    this.#socket.write(clientFlags);

    const sr = await this.#option(K.OPT_STRUCTURED_REPLY, Buffer.alloc(0));
    if (sr.type === K.REP_ACK) this.structuredReplies = true;
    else if (!(sr.type & K.REP_FLAG_ERROR)) throw bad(`unexpected reply ${sr.type} to NBD_OPT_STRUCTURED_REPLY`);

    if (metaContexts.length) {
      if (!this.structuredReplies) throw new QsyncError('UNSUPPORTED', `NBD server ${this.uri} has no structured replies, so no metadata contexts`);
      await this.#setMetaContexts(exportName, metaContexts);
    }
    await this.#go(exportName);
    this.#parser.enterTransmission();
  }

  async #setMetaContexts(exportName: string, queries: string[]): Promise<void> {
    const name = Buffer.from(exportName);
    const parts = [u32(name.length), name, u32(queries.length)];
    for (const q of queries) {
      const b = Buffer.from(q);
      parts.push(u32(b.length), b);
    }
    let r = await this.#option(K.OPT_SET_META_CONTEXT, Buffer.concat(parts));
    while (r.type === K.REP_META_CONTEXT) {
      if (r.data.length < 5) throw bad('short NBD_REP_META_CONTEXT');
      this.contexts.set(r.data.subarray(4).toString('utf8'), r.data.readUInt32BE(0));
      r = await this.#nextOption();
    }
    if (r.type !== K.REP_ACK) throw optionError('NBD_OPT_SET_META_CONTEXT', r);
    const missing = queries.filter((q) => !this.contexts.has(q));
    if (missing.length) {
      throw new QsyncError('SOURCE', `NBD export '${exportName}' has no metadata context ${missing.join(', ')}`, { missing });
    }
  }

  async #go(exportName: string): Promise<void> {
    const name = Buffer.from(exportName);
    const info = Buffer.alloc(4);
    info.writeUInt16BE(1, 0);
    info.writeUInt16BE(K.INFO_BLOCK_SIZE, 2);
    let r = await this.#option(K.OPT_GO, Buffer.concat([u32(name.length), name, info]));
    let haveExport = false;
    for (; r.type === K.REP_INFO; r = await this.#nextOption()) {
      if (r.data.length < 2) throw bad('short NBD_REP_INFO');
      const kind = r.data.readUInt16BE(0);
      if (kind === K.INFO_EXPORT) {
        if (r.data.length !== 12) throw bad('bad NBD_INFO_EXPORT length');
        this.size = readU64(r.data, 2);
        this.flags = r.data.readUInt16BE(10);
        haveExport = true;
      } else if (kind === K.INFO_BLOCK_SIZE) {
        if (r.data.length !== 14) throw bad('bad NBD_INFO_BLOCK_SIZE length');
        const [minimum, preferred, maximum] = [r.data.readUInt32BE(2), r.data.readUInt32BE(6), r.data.readUInt32BE(10)];
        const pow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
        if (!pow2(minimum) || minimum > 65536 || !pow2(preferred) || preferred < minimum || maximum < minimum || maximum % minimum) {
          throw bad(`invalid block sizes ${minimum}/${preferred}/${maximum}`);
        }
        this.blockSizes = { minimum, preferred, maximum };
      }
    }
    if (r.type !== K.REP_ACK) throw optionError('NBD_OPT_GO', r, exportName);
    if (!haveExport) throw bad('NBD_OPT_GO acknowledged without NBD_INFO_EXPORT');
    this.blockSizes.maximum = Math.min(this.blockSizes.maximum, this.#parser.limits.maxData);
  }

  async #option(option: number, data: Buffer): Promise<OptionReply> {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(K.IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    this.#socket.write(Buffer.concat([h, data]));
    const r = await this.#nextOption();
    if (r.option !== option) throw bad(`reply to option ${r.option} while waiting for ${option}`);
    return r;
  }

  #nextOption(): Promise<OptionReply> {
    if (this.#closed) return Promise.reject(this.#closed);
    const r = this.#inbox.shift();
    if (r) return Promise.resolve(r);
    return new Promise((resolve, reject) => (this.#inboxWaiter = { resolve, reject }));
  }

  #deliver(r: OptionReply): void {
    const w = this.#inboxWaiter;
    this.#inboxWaiter = undefined;
    if (w) w.resolve(r);
    else this.#inbox.push(r);
  }

  // ---- transmission: requests ----

  async #request(cmd: number, offset: number, length: number, opts: { flags?: number; payload?: Buffer; buf?: Buffer } = {}): Promise<Request> {
    if (this.#closed) throw this.#closed;
    while (this.#pending.size >= this.#maxInFlight) {
      await new Promise<void>((resolve) => this.#slotWaiters.push(resolve));
      if (this.#closed) throw this.#closed;
    }
    while (this.#drained) await this.#drained;
    if (this.#closed) throw this.#closed;
    const handle = this.#nextHandle++;
    const hdr = Buffer.alloc(28);
    hdr.writeUInt32BE(K.REQUEST_MAGIC, 0);
    hdr.writeUInt16BE(opts.flags ?? 0, 4);
    hdr.writeUInt16BE(cmd, 6);
    hdr.writeUInt32BE(Math.floor(handle / 2 ** 32), 8);
    hdr.writeUInt32BE(handle >>> 0, 12);
    hdr.writeBigUInt64BE(BigInt(offset), 16);
    hdr.writeUInt32BE(length, 24);
    const done = new Promise<Request>((resolve, reject) => {
      this.#pending.set(handle, {
        cmd, offset, length, buf: opts.buf, covered: 0, status: new Map(), error: undefined, resolve, reject,
      });
    });
    // Requests issued in one tick go out in one writev (fewer wake-ups of the server).
    if (!this.#corked) {
      this.#corked = true;
      this.#socket.cork();
      process.nextTick(() => {
        this.#corked = false;
        this.#socket.uncork();
      });
    }
    let ok = this.#socket.write(hdr);
    if (opts.payload) ok = this.#socket.write(opts.payload);
    if (!ok && !this.#drained) {
      this.#drained = new Promise<void>((resolve) => {
        const go = (): void => {
          this.#drained = undefined;
          this.#socket.off('drain', go).off('close', go);
          resolve();
        };
        this.#socket.on('drain', go).on('close', go);
      });
    }
    return done;
  }

  #checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new QsyncError('IO', `NBD request ${offset}+${length} outside the export (size ${this.size})`, { offset });
    }
  }

  /** Split `[offset, offset+length)` into requests of at most `max` bytes, run them (in flight together). */
  async #split(offset: number, length: number, max: number, fn: (off: number, len: number) => Promise<unknown>): Promise<void> {
    this.#checkRange(offset, length);
    const jobs: Promise<unknown>[] = [];
    for (let done = 0; done < length; done += max) jobs.push(fn(offset + done, Math.min(max, length - done)));
    await Promise.all(jobs);
  }

  /** Fill `buf` from `offset`; large reads become several requests of the server's maximum size. */
  async read(buf: Buffer, offset: number): Promise<void> {
    await this.#split(offset, buf.length, this.blockSizes.maximum, (off, len) =>
      this.#request(K.CMD_READ, off, len, { buf: buf.subarray(off - offset, off - offset + len) }),
    );
  }

  async readAt(buf: Buffer, offset: number): Promise<number> {
    const n = Math.max(0, Math.min(buf.length, this.size - offset));
    if (n) await this.read(buf.subarray(0, n), offset);
    return n;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.#need(0, true);
    await this.#split(offset, data.length, this.blockSizes.maximum, (off, len) =>
      this.#request(K.CMD_WRITE, off, len, { payload: data.subarray(off - offset, off - offset + len) }),
    );
  }

  /** Zero a range; `punch` lets the server leave a hole (otherwise NBD_CMD_FLAG_NO_HOLE). */
  async writeZeroes(offset: number, length: number, punch = true): Promise<void> {
    this.#need(K.TFLAG_SEND_WRITE_ZEROES, true);
    await this.#split(offset, length, this.#bigRequest(), (off, len) =>
      this.#request(K.CMD_WRITE_ZEROES, off, len, { flags: punch ? 0 : K.CMD_FLAG_NO_HOLE }),
    );
  }

  async trim(offset: number, length: number): Promise<void> {
    this.#need(K.TFLAG_SEND_TRIM, true);
    await this.#split(offset, length, this.#bigRequest(), (off, len) => this.#request(K.CMD_TRIM, off, len));
  }

  async flush(): Promise<void> {
    this.#need(K.TFLAG_SEND_FLUSH, false);
    await this.#request(K.CMD_FLUSH, 0, 0);
  }

  #need(flag: number, writes: boolean): void {
    if (writes && this.readOnly) throw new QsyncError('TARGET', `NBD export ${this.uri} is read-only`);
    if (flag && !(this.flags & flag)) throw new QsyncError('UNSUPPORTED', `NBD server ${this.uri} does not support this command`);
  }

  /** Largest length of a request without payload, a multiple of the minimum block size. */
  #bigRequest(): number {
    const align = Math.max(this.blockSizes.minimum, 65536);
    return Math.floor(K.MAX_REQUEST_LENGTH / align) * align;
  }

  /**
   * One BLOCK_STATUS request. The server may describe less than `length`
   * (continue from where its descriptors end); descriptors are by context name.
   */
  async blockStatus(offset: number, length: number): Promise<Map<string, StatusDescriptor[]>> {
    const out = new Map<string, StatusDescriptor[]>();
    for (const [name, pairs] of await this.#blockStatus(offset, length)) {
      out.set(name, Array.from({ length: pairs.length / 2 }, (_, i) => ({ length: pairs[2 * i]!, flags: pairs[2 * i + 1]! })));
    }
    return out;
  }

  async #blockStatus(offset: number, length: number): Promise<Map<string, Uint32Array>> {
    if (!this.contexts.size) throw new QsyncError('UNSUPPORTED', `no metadata context selected on ${this.uri}`);
    this.#checkRange(offset, length);
    if (length === 0 || length > K.MAX_REQUEST_LENGTH) throw new QsyncError('IO', `NBD block status length ${length} out of range`);
    const req = await this.#request(K.CMD_BLOCK_STATUS, offset, length);
    const out = new Map<string, Uint32Array>();
    for (const [name, id] of this.contexts) out.set(name, req.status.get(id)!);
    return out;
  }

  /**
   * Extents of `[offset, offset+length)`: `zero` from base:allocation,
   * `dirty` from the first qemu:dirty-bitmap context (true everywhere without
   * one). Block status is asked in requests of up to 4 GiB, STATUS_AHEAD in
   * flight (a reply of a fragmented map holds up to 2^17 descriptors a
   * context, 1 MiB kept); equal neighbours are merged.
   */
  async *extents(offset: number, length: number): AsyncIterable<Extent> {
    const end = Math.min(offset + length, this.size);
    if (offset >= end) return;
    const allocCtx = this.contexts.has(K.CONTEXT_ALLOCATION) ? K.CONTEXT_ALLOCATION : undefined;
    const dirtyCtx = [...this.contexts.keys()].find((n) => n.startsWith('qemu:dirty-bitmap:'));
    if (!allocCtx && !dirtyCtx) {
      yield { offset, length: end - offset, zero: false, dirty: true };
      return;
    }
    const window = this.#bigRequest();
    const windows: [number, number][] = [];
    for (let s = offset; s < end; s += window) windows.push([s, Math.min(end, s + window)]);
    const depth = Math.max(1, Math.min(STATUS_AHEAD, this.#maxInFlight));
    const ahead: Promise<Map<string, Uint32Array>>[] = [];
    const ask = (i: number): void => {
      if (i < windows.length) {
        const p = this.#blockStatus(windows[i]![0], windows[i]![1] - windows[i]![0]);
        p.catch(() => {}); // awaited below in order; a failure after an abort must not go unhandled
        ahead.push(p);
      }
    };
    for (let i = 0; i < depth; i++) ask(i);
    let cur: Extent | undefined;
    for (let i = 0; i < windows.length; i++) {
      const [, wEnd] = windows[i]!;
      let reply = await ahead.shift()!;
      ask(i + depth);
      let at = windows[i]![0];
      for (;;) {
        for (const e of mergeContexts(at, wEnd - at, reply.get(allocCtx ?? ''), reply.get(dirtyCtx ?? ''))) {
          if (cur && cur.zero === e.zero && cur.dirty === e.dirty) cur.length += e.length;
          else {
            if (cur) yield cur;
            cur = e;
          }
          at = e.offset + e.length;
        }
        if (at >= wEnd) break;
        reply = await this.#blockStatus(at, wEnd - at);
      }
    }
    if (cur) yield cur;
  }

  /** NBD_CMD_DISC once requests in flight have finished, then close the socket. */
  async close(): Promise<void> {
    while (this.#pending.size && !this.#closed) await new Promise<void>((resolve) => this.#idleWaiters.push(resolve));
    if (this.#closed) return;
    const hdr = Buffer.alloc(28);
    hdr.writeUInt32BE(K.REQUEST_MAGIC, 0);
    hdr.writeUInt16BE(K.CMD_DISC, 6);
    const gone = new Promise<void>((resolve) => this.#socket.once('close', () => resolve()));
    this.#socket.end(hdr);
    const t = setTimeout(() => this.#socket.destroy(), 2000);
    await gone;
    clearTimeout(t);
  }

  // ---- transmission: replies (parser handler) ----

  #req(handle: number): Request {
    const r = this.#pending.get(handle);
    if (!r) throw bad(`reply for unknown handle ${handle}`);
    return r;
  }

  #simpleReply(handle: number, error: number): { offset: number; length: number } | undefined {
    const r = this.#req(handle);
    if (r.cmd !== K.CMD_READ || error) return undefined;
    if (this.structuredReplies) throw bad('simple reply to READ after structured replies were negotiated');
    return { offset: r.offset, length: r.length };
  }

  #simpleDone(handle: number, error: number): void {
    const r = this.#req(handle);
    if (error) r.error = new NbdError(CMD_NAMES[r.cmd] ?? String(r.cmd), r.offset, r.length, error, '');
    else if (r.cmd === K.CMD_READ) r.covered = r.length;
    this.#finish(handle, r);
  }

  #data(handle: number, offset: number, piece: Buffer): void {
    const r = this.#req(handle);
    if (r.cmd !== K.CMD_READ || !r.buf) throw bad('data for a request that is not a READ');
    const rel = offset - r.offset;
    if (rel < 0 || rel + piece.length > r.length) throw bad(`READ data at ${offset}+${piece.length} outside request ${r.offset}+${r.length}`);
    // Read in place by the socket (#readBuffer), or into the scratch buffer.
    if (piece.buffer !== r.buf.buffer || piece.byteOffset !== r.buf.byteOffset + rel) piece.copy(r.buf, rel);
    r.covered += piece.length;
  }

  #chunk(handle: number, flags: number, type: number, p: Buffer): void {
    const r = this.#req(handle);
    switch (type) {
      case K.REPLY_TYPE_NONE:
        if (!(flags & K.REPLY_FLAG_DONE) || p.length) throw bad('NBD_REPLY_TYPE_NONE must be final and empty');
        break;
      case K.REPLY_TYPE_OFFSET_DATA:
        break;
      case K.REPLY_TYPE_OFFSET_HOLE: {
        if (r.cmd !== K.CMD_READ || p.length !== 12) throw bad('bad OFFSET_HOLE chunk');
        const rel = readU64(p, 0) - r.offset;
        const len = p.readUInt32BE(8);
        if (rel < 0 || len === 0 || rel + len > r.length) throw bad('OFFSET_HOLE outside the request');
        r.buf!.fill(0, rel, rel + len);
        r.covered += len;
        break;
      }
      case K.REPLY_TYPE_BLOCK_STATUS: {
        if (r.cmd !== K.CMD_BLOCK_STATUS || p.length < 12 || (p.length - 4) % 8) throw bad('bad BLOCK_STATUS chunk');
        const id = p.readUInt32BE(0);
        if (![...this.contexts.values()].includes(id) || r.status.has(id)) throw bad(`block status for context ${id} unexpected`);
        const list = new Uint32Array((p.length - 4) / 4);
        for (let o = 4, i = 0; o < p.length; o += 8, i += 2) {
          list[i] = p.readUInt32BE(o);
          if (list[i] === 0) throw bad('block status descriptor of length 0');
          list[i + 1] = p.readUInt32BE(o + 4);
        }
        r.status.set(id, list);
        break;
      }
      default: {
        if (!(type & 0x8000)) throw bad(`unknown reply chunk type ${type}`);
        if (p.length < 6) throw bad('short error chunk');
        const msgLen = p.readUInt16BE(4);
        const extra = type === K.REPLY_TYPE_ERROR_OFFSET ? 8 : 0;
        if (6 + msgLen + extra > p.length) throw bad('error chunk message overruns the chunk');
        const at = extra ? readU64(p, 6 + msgLen) : r.offset;
        r.error ??= new NbdError(CMD_NAMES[r.cmd] ?? String(r.cmd), at, r.length, p.readUInt32BE(0) || 5, p.toString('utf8', 6, 6 + msgLen));
      }
    }
    if (flags & K.REPLY_FLAG_DONE) this.#finish(handle, r);
  }

  #finish(handle: number, r: Request): void {
    this.#pending.delete(handle);
    this.#slotWaiters.shift()?.();
    if (!this.#pending.size) for (const w of this.#idleWaiters.splice(0)) w();
    let violation: QsyncError | undefined;
    if (r.error) return r.reject(r.error);
    if (r.cmd === K.CMD_READ && r.covered !== r.length) {
      violation = bad(`READ ${r.offset}+${r.length} answered with ${r.covered} bytes`);
    } else if (r.cmd === K.CMD_BLOCK_STATUS && r.status.size !== this.contexts.size) {
      violation = bad('block status reply lacks a selected context');
    }
    if (!violation) return r.resolve(r);
    r.reject(violation);
    throw violation;
  }

  #teardown(err: QsyncError): void {
    if (this.#closed) return;
    this.#closed = err;
    this.#socket.destroy();
    for (const r of this.#pending.values()) r.reject(err);
    this.#pending.clear();
    for (const w of [...this.#slotWaiters.splice(0), ...this.#idleWaiters.splice(0)]) w();
    this.#inboxWaiter?.reject(err);
    this.#inboxWaiter = undefined;
  }
}

/** Block status requests in flight ahead of the one being read. */
const STATUS_AHEAD = 4;

/** Intersect one reply's two descriptor lists (length, flags pairs) into extents from `offset`, no further than `limit` bytes, one at a time. */
function* mergeContexts(offset: number, limit: number, alloc: Uint32Array | undefined, dirty: Uint32Array | undefined): Generator<Extent> {
  const total = (l: Uint32Array | undefined): number => {
    if (!l) return Infinity;
    let sum = 0;
    for (let i = 0; i < l.length; i += 2) sum += l[i]!;
    return sum;
  };
  const span = Math.min(limit, total(alloc), total(dirty));
  let ia = 0, id = 0, ra = alloc?.[0] ?? Infinity, rd = dirty?.[0] ?? Infinity;
  for (let at = 0; at < span; ) {
    const n = Math.min(ra, rd, span - at);
    yield {
      offset: offset + at, length: n,
      zero: alloc ? (alloc[ia + 1]! & K.STATE_ZERO) !== 0 : false,
      dirty: dirty ? (dirty[id + 1]! & K.STATE_DIRTY) !== 0 : true,
    };
    at += n;
    ra -= n;
    rd -= n;
    if (ra === 0) ra = alloc![(ia += 2)] ?? Infinity;
    if (rd === 0) rd = dirty![(id += 2)] ?? Infinity;
  }
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

function optionError(what: string, r: OptionReply, exportName?: string): QsyncError {
  const msg = r.data.toString('utf8');
  const code = r.type === K.REP_ERR_UNSUP ? 'UNSUPPORTED' : exportName !== undefined ? 'SOURCE' : 'PROTOCOL';
  return new QsyncError(code, `NBD ${what} refused (reply ${r.type >>> 0})${exportName !== undefined ? ` for export '${exportName}'` : ''}${msg ? `: ${msg}` : ''}`);
}
