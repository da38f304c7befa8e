/**
 * The two ends of a remote sync (docs/FORMATS.md "Wire protocol"). The
 * client (the qsync the user ran) starts `qsync --server` over the remote
 * shell and opens with a hello naming the role the server plays:
 *
 * - push (DEST is remote): the server is the receiving end. It runs the walk
 *   and the file engine on its DEST (src/cli/run-sync.ts receive) with the
 *   client's files as sources (RemoteSources), and sends what a local run
 *   would print back as events, then "done" with the stats and exit code;
 * - pull (SRC is remote): the server is the sending end (SourceServer) and
 *   the client runs the walk and the engine on its own DEST.
 *
 * - image mode to a remote DEST: the server holds the destination as a
 *   Target (src/remote/serve-target.ts) and the client, where QEMU is, runs
 *   the driver against it (src/remote/remote-target.ts).
 *
 * Either way the target, its manifest, intent and lock stay where the target
 * is, and only planned blocks cross the wire.
 */
import { QsyncError } from '../core/errors.js';
import { isValidBlockSize } from '../core/geometry.js';
import { protocolError, WIRE_MAGIC, WIRE_VERSION, type ControlMessage } from '../core/wire.js';
import { INFO_CATEGORIES, type FileReport, type InfoCategory, type RunStats } from '../sync/events.js';
import type { SyncOptions } from '../cli/args.js';
import type { Printer } from '../cli/output.js';
import { errorMessage, remoteError, type Channel } from './channel.js';

export const hello = (role: 'receiver' | 'sender' | 'target', body: Record<string, unknown>): ControlMessage => ({ op: 'hello', magic: WIRE_MAGIC, version: WIRE_VERSION, role, ...body });

/** Check a peer's hello; a wrong magic or version is a clear error (rsync's exit 2 for a protocol mismatch). */
export function checkHello(m: ControlMessage, peer: string): void {
  if (m.op !== 'hello' || m.magic !== WIRE_MAGIC) {
    throw new QsyncError('PROTOCOL', `${peer} does not speak qsync's protocol`, { hint: 'is qsync installed there? (--qsync-path CMD names the command)' });
  }
  if (m.version !== WIRE_VERSION) {
    throw new QsyncError('PROTOCOL', `${peer} speaks qsync protocol version ${String(m.version)}, this qsync ${WIRE_VERSION}`, { hint: 'install the same qsync version on both hosts', exit: 2 });
  }
}

/**
 * What a receiving or target server does beyond the first protocol, named in its hello: a client that needs one
 * the server does not name refuses before anything is written, rather than lose it silently (an older server
 * would drop --backup-dir, and send no batch).
 */
export const FEATURES = ['backup-dir', 'batch', 't-hash', 'domains'] as const;
export type Feature = (typeof FEATURES)[number];

/** Whether the server's hello names feature `f`. */
export const hasFeature = (m: ControlMessage, f: Feature): boolean => Array.isArray(m.features) && m.features.includes(f);

/** The server's hello names every feature in `wanted`, else a clear error naming the option (`what`). */
export function checkFeatures(m: ControlMessage, wanted: readonly [Feature, string][], peer: string): void {
  for (const [f, what] of wanted) {
    if (!hasFeature(m, f)) throw new QsyncError('UNSUPPORTED', `the qsync on ${peer} does not support ${what} over ssh`, { hint: 'install the same qsync version on both hosts' });
  }
}

/** A page of a --files-from list: names up to about this many characters a message (the control limit is 4 MiB). */
const LIST_PAGE_CHARS = 1 << 20;

/**
 * A push with --files-from: the list, read where the user named it, goes
 * to the receiving server (which runs the walk) after the hellos, as
 * `files-from {names}` pages and `files-from-end`.
 */
export async function sendFilesFrom(ch: Channel, names: string[]): Promise<void> {
  let page: string[] = [];
  let chars = 0;
  for (const n of names) {
    if (page.length && chars + n.length > LIST_PAGE_CHARS) {
      await ch.send({ op: 'files-from', names: page });
      page = [];
      chars = 0;
    }
    page.push(n);
    chars += n.length + 8;
  }
  if (page.length) await ch.send({ op: 'files-from', names: page });
  await ch.send({ op: 'files-from-end' });
}

/** What a received name costs in memory beyond its characters, about (a string's header and an array slot). */
const NAME_COST = 32;

/** The receiving server's side of sendFilesFrom: a push's --files-from lines, at most `max` characters in all and at most max / 32 names. */
export async function receiveFilesFrom(ch: Channel, max: number): Promise<string[]> {
  const names: string[] = [];
  let chars = 0;
  for (;;) {
    const m = await ch.control();
    if (m.op === 'files-from-end') return names;
    if (m.op !== 'files-from' || !Array.isArray(m.names) || !m.names.every((n) => typeof n === 'string')) throw protocolError(`expected a page of the files-from list, got "${m.op}"`);
    for (const n of m.names as string[]) {
      chars += n.length + 1;
      if (chars > max) throw new QsyncError('USAGE', `the files-from list is over ${max} bytes`, { hint: 'split it into several runs' });
      // Each name costs this side a string and a slot beside its characters: a list of one-character names is bounded too.
      if (names.length >= max / NAME_COST) throw new QsyncError('USAGE', `the files-from list has more than ${Math.floor(max / NAME_COST)} names`, { hint: 'split it into several runs' });
      names.push(n);
    }
  }
}

const HOOKS = ['fileStart', 'fileProgress', 'fileEnd', 'deleted', 'notice', 'info', 'warning'] as const;
type Hook = (typeof HOOKS)[number];

/** The receiving end of a push: what a local run prints goes to the client as events. */
export class ForwardingPrinter implements Printer {
  /** `formats`: the client's --out-format and --log-file-format, which say whether a report's attributes (%M %U %G %B) are worth their bytes. */
  constructor(
    private readonly ch: Channel,
    formats: (string | undefined)[] = [],
  ) {
    this.attrs = formats.some((f) => typeof f === 'string' && /%'?-?\d*[MUGB]/.test(f));
  }
  private readonly attrs: boolean;
  private post(hook: Hook, args: unknown[]): void {
    this.ch.write({ op: 'event', hook, args });
  }
  fileStart(path: string, size: number, method: string): void {
    this.post('fileStart', [path, size, method]);
  }
  fileProgress(path: string, scanned: number, written: number): void {
    this.post('fileProgress', [path, scanned, written]);
  }
  fileEnd(r: FileReport): void {
    // The index is this side's walk's (the client counts its own), the source path this side's: neither is the client's.
    const { index: _i, source: _s, mtime, uid, gid, mode, ...rest } = r;
    this.post('fileEnd', [this.attrs ? { ...rest, mtime, uid, gid, mode } : rest]);
  }
  deleted(path: string): void {
    this.post('deleted', [path]);
  }
  notice(message: string, path?: string): void {
    this.post('notice', [message, path]);
  }
  info(message: string, category: InfoCategory): void {
    this.post('info', [message, category]);
  }
  warning(message: string, path?: string, bare?: boolean): void {
    this.post('warning', [message, path, bare]);
  }
  finish(stats: RunStats | undefined, exitCode: number, error?: unknown): number {
    this.ch.write({ op: 'done', stats, code: exitCode, error: error === undefined ? undefined : errorMessage(error) });
    return exitCode;
  }
}

/**
 * What each event's arguments must be, in order: `s` a string, `n` a number, `b` a boolean, `r` a file report,
 * `c` an --info category; a capital letter may also be absent (null). What the printer then does with them is
 * what it does with a local run's.
 */
const EVENT_ARGS: Record<Hook, string> = { fileStart: 'sns', fileProgress: 'snn', fileEnd: 'r', deleted: 's', notice: 'sS', info: 'sc', warning: 'sSB' };
const REPORT_KINDS = ['file', 'dir', 'symlink', 'device', 'special'];
const REPORT_FIELDS: Record<string, string> = { path: 's', itemize: 's', kind: 's', size: 'n', scanned: 'n', literal: 'n', matched: 'n', unchanged: 'b' };
const REPORT_OPTIONAL: Record<string, string> = { method: 's', length: 'n', target: 's', mtime: 'n', uid: 'n', gid: 'n', mode: 'n' };

function isReport(v: unknown): boolean {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return false;
  const r = v as Record<string, unknown>;
  return (
    Object.entries(REPORT_FIELDS).every(([k, t]) => isArg(r[k], t)) &&
    Object.entries(REPORT_OPTIONAL).every(([k, t]) => r[k] === undefined || isArg(r[k], t)) &&
    REPORT_KINDS.includes(r.kind as string)
  );
}

function isArg(v: unknown, t: string): boolean {
  if (v === null || v === undefined) return t !== t.toLowerCase();
  switch (t.toLowerCase()) {
    case 's':
      return typeof v === 'string';
    case 'n':
      return typeof v === 'number' && Number.isFinite(v);
    case 'b':
      return typeof v === 'boolean';
    case 'c':
      return (INFO_CATEGORIES as readonly unknown[]).includes(v);
    default:
      return isReport(v);
  }
}

/** The client's handler for the events a receiving server sends: each goes to the local printer, as a local run's would. */
export function eventsTo(printer: Printer): (m: ControlMessage) => boolean {
  return (m) => {
    if (m.op !== 'event') return false;
    const hook = m.hook as Hook;
    const want = HOOKS.includes(hook) ? EVENT_ARGS[hook] : undefined;
    if (!want || !Array.isArray(m.args) || m.args.length > want.length || ![...want].every((t, i) => isArg((m.args as unknown[])[i], t))) {
      throw new QsyncError('PROTOCOL', 'protocol error: a malformed event');
    }
    const fn = printer[hook] as ((...a: unknown[]) => void) | undefined;
    fn?.apply(printer, m.args);
    return true;
  };
}

/** The receiving server's "done": its stats and exit code, and the error that ended it, if one did. */
export function readDone(m: ControlMessage): { stats?: RunStats; code: number; error?: Error } {
  if (m.op !== 'done' || typeof m.code !== 'number') throw protocolError(`expected "done", got "${m.op}"`);
  // The exit status is one a process can have; the stats are numbers (the summary lines print them).
  if (!Number.isInteger(m.code) || m.code < 0 || m.code > 255) throw protocolError(`exit code ${m.code}`);
  const s = m.stats;
  if (s !== undefined && s !== null && (typeof s !== 'object' || Array.isArray(s) || !Object.values(s).every((v) => typeof v === 'number' && Number.isFinite(v)))) {
    throw protocolError('malformed stats');
  }
  return { stats: m.stats as RunStats | undefined, code: m.code, error: m.error ? remoteError(m.error as ControlMessage) : undefined };
}

/** The options of a push as the receiving end may use them: every field checked against its kind in `defaults`. */
export function optionsFromWire(v: unknown, defaults: SyncOptions): SyncOptions {
  if (typeof v !== 'object' || v === null) throw new QsyncError('PROTOCOL', 'protocol error: options are not an object');
  const o = { ...defaults } as unknown as Record<string, unknown>;
  for (const [k, val] of Object.entries(v as Record<string, unknown>)) {
    // Own options only: "__proto__" would give the object a prototype of the client's, and every option deleted
    // below (a batch or manifest path, the state dir) would then be read from it.
    if (!Object.hasOwn(o, k) || val === undefined || val === null) continue;
    // An option without a default is a string (a path, a format, a map); a list (--chmod) is one of strings;
    // --info's levels are numbers. Anything else would reach the code that parses it as something it is not.
    const want = k === 'filters' ? 'object' : o[k] === undefined ? 'string' : typeof o[k];
    if (typeof val !== want) throw protocolError(`option ${k} is a ${Array.isArray(val) ? 'list' : typeof val}`);
    if (Array.isArray(o[k]) !== Array.isArray(val)) throw protocolError(`option ${k} is ${Array.isArray(val) ? 'a list' : 'not a list'}`);
    if (k !== 'filters' && Array.isArray(val) && !val.every((s) => typeof s === 'string')) throw protocolError(`option ${k} is not a list of strings`);
    if (k === 'info' && !Object.entries(val as object).every(([f, l]) => f in (o.info as object) && Number.isSafeInteger(l))) throw protocolError(`option ${k} is not a set of levels`);
    o[k] = val;
  }
  const out = o as unknown as SyncOptions;
  if (!isValidBlockSize(out.blockSize)) throw new QsyncError('PROTOCOL', 'protocol error: a bad block size');
  if (!Array.isArray(out.filters) || !out.filters.every((r) => (r.type === 'include' || r.type === 'exclude') && typeof (r as { pattern?: unknown }).pattern === 'string')) {
    throw new QsyncError('PROTOCOL', 'protocol error: filter rules');
  }
  if (out.backupDir !== undefined && (typeof out.backupDir !== 'string' || out.backupDir === '')) throw protocolError('option backupDir is not a path');
  // Local-only choices stay the server's own; --backup-dir is a path on this side, relative to DEST (as rsync's),
  // and the batch is the client's (src/remote/batch-relay.ts); no file named by the client is read here.
  for (const k of ['stateDir', 'manifest', 'writeBatch', 'onlyWriteBatch', 'readBatch', 'qmp', 'image', 'rsh', 'filesFrom', 'logFile'] as const) delete (out as unknown as Record<string, unknown>)[k];
  out.json = false;
  return out;
}

