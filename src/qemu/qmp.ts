/**
 * QMP client, layered like QEMU's python/qemu/qmp: the codec (codec.ts)
 * splits lines, this class owns the socket, matches replies to commands by
 * id through a pending map and hands events to listeners. Listeners can be
 * registered before the command that triggers the event (waitEvent).
 */
import net from 'node:net';
import { QsyncError } from '../core/errors.js';
import { QmpDecoder, encodeQmp, type QmpMessage } from './codec.js';
import { QmpError } from './errors.js';
import { qemuBehind, type QemuBehind } from './process.js';

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

/** One action of a `transaction` (QAPI TransactionAction). */
export interface QmpAction {
  type: string;
  data: Record<string, unknown>;
}

export interface QmpConnectOptions {
  /** For connecting, the greeting and qmp_capabilities together. Default 10 s. */
  timeoutMs?: number;
}

export interface ExecuteOptions {
  /** Default 60 s; 0 waits forever. */
  timeoutMs?: number;
}

export type EventListener = (ev: QmpEvent) => void;

/** A pending event wait; `cancel()` drops the listener (the promise then rejects). */
export type EventWait = Promise<QmpEvent> & { cancel(): void };

interface Pending {
  command: string;
  args: Record<string, unknown> | undefined;
  resolve(value: unknown): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout | undefined;
}

let nextNamespace = 0;

/** `unix:PATH`, `tcp:HOST:PORT`, or a bare socket path. */
export function parseQmpAddress(address: string): net.NetConnectOpts {
  if (address.startsWith('tcp:')) {
    const rest = address.slice(4);
    const colon = rest.lastIndexOf(':');
    const port = Number(rest.slice(colon + 1));
    if (colon <= 0 || !Number.isInteger(port) || port <= 0 || port > 65535) {
      throw new QsyncError('USAGE', `bad QMP address ${address}: expected tcp:HOST:PORT`);
    }
    return { host: rest.slice(0, colon).replace(/^\[(.*)\]$/, '$1'), port };
  }
  return { path: address.startsWith('unix:') ? address.slice(5) : address };
}

/** A monitor that does not greet is held by another client: say whose, and what to do instead. */
function busyMonitor(address: string, behind: QemuBehind | undefined): QsyncError {
  const p = behind?.proc;
  if (p?.libvirt) {
    const dom = p.name ?? 'NAME';
    return new QsyncError('LOCKED', `QMP monitor ${address} is busy: it is libvirt's monitor of domain ${dom} (libvirt holds its domains' monitors)`, {
      hint: `back it up through libvirt (--domain ${dom})`,
    });
  }
  const who = p ? `QEMU (pid ${p.pid}${p.name ? `, ${p.name}` : ''}) serves` : 'QEMU serves';
  return new QsyncError('LOCKED', `QMP monitor ${address} is busy or owned by another client: ${who} one client per monitor, and another one holds it`, {
    hint: 'give qsync a monitor of its own (start QEMU with a second -qmp unix:PATH,server=on,wait=off), ' +
      'or, for a libvirt domain (libvirt holds its domains\' monitors), back it up through libvirt (--domain NAME)',
  });
}

export class QmpClient {
  readonly address: string;
  greeting: QmpGreeting | undefined;
  #socket: net.Socket;
  #pending = new Map<string, Pending>();
  #listeners = new Set<{ name: string | undefined; fn: EventListener }>();
  #onClose = new Set<(err: QsyncError) => void>();
  #ns = `qsync-${process.pid}-${nextNamespace++}`;
  #seq = 0;
  #closed: QsyncError | undefined;
  #onGreeting: ((msg: QmpMessage) => void) | undefined;

  private constructor(address: string, socket: net.Socket) {
    this.address = address;
    this.#socket = socket;
    const decoder = new QmpDecoder({
      onMessage: (msg) => this.#dispatch(msg),
      onError: (err) => this.#teardown(err),
    });
    socket.on('data', (chunk: Buffer) => decoder.write(chunk));
    socket.on('error', (cause) =>
      this.#teardown(new QsyncError('IO', `QMP connection to ${address} failed: ${cause.message}`, {}, { cause })),
    );
    socket.on('close', () => this.#teardown(new QsyncError('IO', `QMP connection to ${address} closed`)));
  }

  /** Connect, read the greeting and leave capabilities negotiation mode. */
  static async connect(address: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const socket = net.connect(parseQmpAddress(address));
    const client = new QmpClient(address, socket);
    const greeted = new Promise<QmpMessage>((resolve) => (client.#onGreeting = resolve));
    const timers: NodeJS.Timeout[] = [];
    const failed = new Promise<never>((_, reject) => {
      socket.once('close', () => reject(client.#closed));
      // No greeting: QEMU has accepted another client on this monitor and queues us behind it. Ask /proc
      // early whether it holds one (then say so at once), and say the same when the time is up.
      const busy = async (final: boolean): Promise<void> => {
        const behind = await qemuBehind(address).catch(() => undefined);
        if (final || (behind?.clients ?? 0) > 0) reject(busyMonitor(address, behind));
      };
      timers.push(setTimeout(() => void busy(false), Math.min(1000, timeoutMs / 2)), setTimeout(() => void busy(true), timeoutMs));
      for (const t of timers) t.unref();
    });
    try {
      const msg = await Promise.race([greeted, failed]).finally(() => timers.forEach(clearTimeout));
      client.greeting = msg.QMP as QmpGreeting;
      await client.execute('qmp_capabilities', undefined, { timeoutMs });
      return client;
    } catch (err) {
      socket.destroy();
      throw err instanceof QsyncError ? err : new QsyncError('IO', `QMP connect to ${address} failed`, {}, { cause: err });
    }
  }

  get closed(): boolean {
    return this.#closed !== undefined;
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: ExecuteOptions = {}): Promise<T> {
    if (this.#closed) return Promise.reject(this.#closed);
    const id = `${this.#ns}-${this.#seq++}`;
    const timeoutMs = opts.timeoutMs ?? 60_000;
    return new Promise<T>((resolve, reject) => {
      const p: Pending = { command, args, resolve: resolve as (v: unknown) => void, reject, timer: undefined };
      if (timeoutMs > 0) {
        p.timer = setTimeout(() => {
          // A late reply to this id is then dropped by #dispatch.
          this.#pending.delete(id);
          reject(new QsyncError('IO', `QMP ${command}: no reply in ${timeoutMs} ms`, { command }));
        }, timeoutMs);
      }
      this.#pending.set(id, p);
      this.#socket.write(encodeQmp(args ? { execute: command, arguments: args, id } : { execute: command, id }));
    });
  }

  /** All actions succeed together or none does. */
  async transaction(actions: QmpAction[], opts: ExecuteOptions = {}): Promise<void> {
    await this.execute('transaction', { actions }, opts);
  }

  /** Listen to events named `name` (all events when undefined). Returns the unsubscribe function. */
  on(name: string | undefined, fn: EventListener): () => void {
    const entry = { name, fn };
    this.#listeners.add(entry);
    return () => this.#listeners.delete(entry);
  }

  /**
   * Resolves with the first event `name` that satisfies `predicate`. Call it
   * before the command that causes the event; rejects on timeout, disconnect
   * or cancel(). Never an unhandled rejection if it is dropped unawaited.
   */
  waitEvent(name: string, predicate: (ev: QmpEvent) => boolean = () => true, timeoutMs = 60_000): EventWait {
    let cancel = (): void => {};
    const promise = new Promise<QmpEvent>((resolve, reject) => {
      if (this.#closed) return reject(this.#closed);
      const timer = setTimeout(() => done(new QsyncError('IO', `QMP event ${name} not seen in ${timeoutMs} ms`)), timeoutMs);
      const off = this.on(name, (ev) => {
        if (predicate(ev)) done(undefined, ev);
      });
      const done = (err: Error | undefined, ev?: QmpEvent): void => {
        clearTimeout(timer);
        off();
        this.#onClose.delete(done);
        if (err) reject(err);
        else resolve(ev!);
      };
      this.#onClose.add(done);
      cancel = () => done(new QsyncError('IO', `wait for QMP event ${name} cancelled`));
    });
    promise.catch(() => {});
    return Object.assign(promise, { cancel });
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    const gone = new Promise<void>((resolve) => this.#socket.once('close', () => resolve()));
    this.#socket.end();
    const timer = setTimeout(() => this.#socket.destroy(), 2000);
    await gone;
    clearTimeout(timer);
  }

  #dispatch(msg: QmpMessage): void {
    if ('QMP' in msg && this.#onGreeting) {
      this.#onGreeting(msg);
      this.#onGreeting = undefined;
      return;
    }
    if (typeof msg.event === 'string') {
      const ev = msg as unknown as QmpEvent;
      for (const l of [...this.#listeners]) if (l.name === undefined || l.name === ev.event) l.fn(ev);
      return;
    }
    if (!('return' in msg) && !('error' in msg)) {
      this.#teardown(new QsyncError('PROTOCOL', 'QMP sent a message that is neither reply nor event', { msg }));
      return;
    }
    const id = typeof msg.id === 'string' ? msg.id : undefined;
    if (id === undefined || !id.startsWith(this.#ns + '-')) {
      // QEMU answers a malformed command without an id; we never send one.
      this.#teardown(new QsyncError('PROTOCOL', 'QMP reply without an id of ours', { msg }));
      return;
    }
    const p = this.#pending.get(id);
    if (!p) return; // timed out earlier
    this.#pending.delete(id);
    clearTimeout(p.timer);
    if ('error' in msg) {
      const e = (msg.error ?? {}) as { class?: unknown; desc?: unknown };
      p.reject(new QmpError(p.command, p.args, String(e.class ?? 'GenericError'), String(e.desc ?? 'unknown error')));
    } else {
      p.resolve(msg.return);
    }
  }

  /** Fail every pending command and event waiter, once. */
  #teardown(err: QsyncError): void {
    if (this.#closed) return;
    this.#closed = err;
    this.#socket.destroy();
    for (const p of this.#pending.values()) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this.#pending.clear();
    for (const fail of [...this.#onClose]) fail(err);
  }
}
