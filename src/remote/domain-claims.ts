/**
 * The drop-in line in a push (docs/IMAGE-MODE.md "The drop-in line"):
 * `qsync -a /var/lib/libvirt/images/ host:/backup/images/`. The client, on
 * the libvirt host, names in its hello the image files its domains hold
 * (device and inode, as its listing gives them to this side). The receiving
 * walk here leaves those files, as a local walk leaves them to the drop-in;
 * once it is done, it tells the client which they are and where they go
 * (`claimed`); asked (`claims-targets`), it holds every DEST folder those
 * files are in and serves them as targets by folder
 * (src/remote/serve-target.ts) for the client's domain backups, one per
 * domain whichever folders its disks are in, until the client is done
 * (`claims-done`, with what it wrote, counted into this run's statistics).
 * DEST stays locked by this run throughout; a qcow2 disk's copy stays a
 * qcow2 written through this host's QEMU.
 */
import type { BigIntStats } from 'node:fs';
import { hostname } from 'node:os';
import { QsyncError } from '../core/errors.js';
import { protocolError, type ControlMessage } from '../core/wire.js';
import type { RunStats, SyncHooks } from '../sync/events.js';
import { folderOf, keyOf, localFolders, unkept, type DropIn, type DropInFolder, type DropInOptions } from '../sync/dropin.js';
import type { LocalDestination } from '../sync/local-target.js';
import { isRelPath, type Dir } from '../io/safe-fs.js';
import { errorMessage, type Channel } from './channel.js';
import { ForwardingPrinter } from './session.js';
import { armInterrupt, disarmInterrupt } from '../cli/interrupt.js';
import { RemoteDestination } from './remote-target.js';
import { TargetServer } from './serve-target.js';

/** More image files than any host's domains hold: a hello naming more is refused. */
export const MAX_CLAIMS = 65_536;
const KEY = /^\d{1,20}:\d{1,20}$/;

/** The statistics a client's domain backups add to the run: only these, each a count. */
const COUNTED = ['transferred', 'transferredSize', 'created', 'literal', 'matched', 'scanned'] as const;

/** The hello's `claims`: `dev:ino` strings, at most MAX_CLAIMS; undefined when absent. */
export function claimsFromWire(v: unknown): Set<string> | undefined {
  if (v === undefined) return undefined;
  if (!Array.isArray(v) || v.length > MAX_CLAIMS || !v.every((k) => typeof k === 'string' && KEY.test(k))) throw protocolError('bad claims');
  return new Set(v as string[]);
}

/** The receiving end of a push: the walk leaves the client's domain files, then their backups write through here. */
export class ClaimsForPeer {
  readonly #claimed: { rel: string; key: string; size: number }[] = [];
  readonly #taken = new Set<string>();

  constructor(
    private readonly ch: Channel,
    private readonly keys: Set<string>,
    private readonly times: boolean,
  ) {}

  claim(st: BigIntStats, rel: string): boolean {
    const key = keyOf(st);
    // One name a disk, as a local walk claims it (src/sync/dropin.ts DropIn.claim).
    // (A set, not a search of those claimed: a client listing many files of its many keys costs the walk no square.)
    if (!this.keys.has(key) || this.#taken.has(key)) return false;
    this.#taken.add(key);
    this.#claimed.push({ rel, key, size: Number(st.size) });
    return true;
  }

  async run(destRoot: string, o: DropInOptions, hooks: SyncHooks, stats: RunStats, held?: Dir): Promise<boolean> {
    if (!this.#claimed.length) return false;
    // Written over the wire through the domain, not by this run's engine: no history, no batch member.
    if (o.wrapSink) for (const c of this.#claimed) hooks.warning?.(unkept(c.rel), c.rel);
    // What a pull's sending end needs to run the backups (a push's client has them already): how, and DEST for its messages and checkpoints.
    const { dryRun, verifySample, announce } = o;
    await this.ch.send({ op: 'claimed', files: this.#claimed, dest: `${hostname()}:${destRoot}`, options: { dryRun, verifySample, announce } });
    const m = await this.ch.control();
    if (m.op === 'claims-targets') await this.serveFolders(destRoot, o.dryRun, held);
    else if (m.op !== 'claims-done') throw protocolError(`unexpected "${m.op}"`);
    const done = m.op === 'claims-done' ? m : await this.ch.control();
    if (done.op !== 'claims-done') throw protocolError(`unexpected "${done.op}"`);
    const add = (typeof done.stats === 'object' && done.stats !== null ? done.stats : {}) as Record<string, number>;
    for (const k of COUNTED) {
      // A count, and one the run's own summary can still add exactly.
      if (!Number.isSafeInteger(add[k]) || add[k]! < 0 || !Number.isSafeInteger(stats[k] + add[k]!)) throw protocolError(`bad claims-done ${k}`);
    }
    // No more files written than were claimed, none created that was not written: the summary says what happened here.
    if (add.transferred! > this.#claimed.length || add.created! > add.transferred!) throw protocolError('bad claims-done: more files than were claimed');
    for (const k of COUNTED) stats[k] += add[k]!;
    return done.failed === true;
  }

  /**
   * Every folder of a claimed file held (below DEST's root, no symlink
   * followed; with -n a missing one is named in `missing`), and served as
   * targets by folder until the client's "bye". `root`: DEST as the walk held it (a path swapped since leads nowhere else).
   */
  private async serveFolders(destRoot: string, dryRun: boolean, root?: Dir): Promise<void> {
    const open = localFolders(destRoot, this.times, root);
    const held = new Map<string, DropInFolder>();
    try {
      const missing: string[] = [];
      try {
        for (const rel of new Set(this.#claimed.map((c) => folderOf(c.rel)))) {
          const f = await open(rel, dryRun);
          if (f) held.set(rel, f);
          else missing.push(rel);
        }
      } catch (e) {
        await this.ch.send(errorMessage(e));
        return;
      }
      await this.ch.send({ op: 'claims-targets-ok', missing });
      const folders = new Map([...held].map(([rel, f]) => [rel, f.destination as LocalDestination]));
      const last = await new TargetServer(this.ch, folders).serve();
      if (last.op !== 'bye') throw protocolError(`unexpected "${last.op}"`);
    } finally {
      for (const f of held.values()) await f.close();
    }
  }
}

/**
 * The client's side: the far walk said which files its domains take
 * (`claimed`); they are backed up through the domains into the far DEST's
 * folders, served by the far side over the same channel; `claims-done`
 * then tells it whether some failed and what was written.
 */
export async function backUpClaimed(ch: Channel, m: ControlMessage, dropIn: DropIn, shown: (key: string) => boolean, shownRoot: string, o: DropInOptions, hooks: SyncHooks): Promise<void> {
  const files = m.files;
  if (!Array.isArray(files) || files.length > MAX_CLAIMS) throw protocolError('bad claimed files');
  for (const f of files as Record<string, unknown>[]) {
    const rel = typeof f?.rel === 'string' ? f.rel : '';
    const key = typeof f?.key === 'string' && KEY.test(f.key) ? f.key.split(':') : undefined;
    if (!isRelPath(rel) || !key || !Number.isSafeInteger(f.size) || (f.size as number) < 0) {
      throw protocolError('bad claimed file');
    }
    // Only a file this session listed to the peer: a domain's disk outside the tree served (or --restrict) is never backed up for it.
    if (!shown(f.key as string) || !dropIn.claim({ dev: BigInt(key[0]!), ino: BigInt(key[1]!), size: BigInt(f.size as number) }, rel)) {
      throw protocolError(`${rel} is no file of a domain in the tree served`);
    }
  }
  const stats = { transferred: 0, transferredSize: 0, created: 0, literal: 0, matched: 0, scanned: 0 } as RunStats;
  let failed: boolean;
  await ch.send({ op: 'claims-targets' });
  const r = await ch.control().catch((e: unknown) => {
    // DEST's folders could not be held: every domain's files fail (exit 23), the rest of the run stands.
    if (!(e instanceof QsyncError) || e.context.fatal || e.code === 'PROTOCOL') throw e;
    hooks.warning?.(`${(files as { rel: string }[]).map((f) => f.rel).join(', ')}: backup through libvirt failed: ${e.message}`);
    return undefined;
  });
  if (!r) failed = true;
  else {
    if (r.op !== 'claims-targets-ok' || !Array.isArray(r.missing) || !r.missing.every((x) => typeof x === 'string')) throw protocolError(`unexpected "${r.op}"`);
    const missing = new Set(r.missing as string[]);
    // Only -n leaves a folder missing (nothing is made), and only a folder a claimed file is in.
    const folders = new Set((files as { rel: string }[]).map((f) => folderOf(f.rel)));
    if (missing.size && (!o.dryRun || [...missing].some((x) => !folders.has(x)))) throw protocolError('claims-targets-ok names a folder that cannot be missing');
    const root = new RemoteDestination(ch, shownRoot);
    try {
      failed = await dropIn.run(async (rel) => (missing.has(rel) ? undefined : { destination: root.inFolder(rel), close: async () => {} }), o, hooks, stats);
    } finally {
      await root.close();
    }
  }
  await ch.send({ op: 'claims-done', failed, stats: Object.fromEntries(COUNTED.map((k) => [k, stats[k]])) });
}

/** A pull's hello asks the sending end for its domains' files (`domains`), with the options their backups take. */
export interface DomainsAsked {
  connect?: string;
  verifySample?: number;
}

export function domainsFromWire(v: unknown): DomainsAsked {
  if (typeof v !== 'object' || v === null) throw protocolError('bad domains');
  const { connect, verifySample } = v as Record<string, unknown>;
  if (connect !== undefined && (typeof connect !== 'string' || connect.length > 4096)) throw protocolError('bad domains connect');
  if (verifySample !== undefined && (typeof verifySample !== 'number' || !(verifySample >= 0 && verifySample <= 100))) throw protocolError('bad domains verifySample');
  return { connect: connect as string | undefined, verifySample: verifySample as number | undefined };
}

/**
 * A pull's sending end (this host has the domains): the receiving client's
 * walk left their files (`claimed`); they are backed up into the client's
 * DEST, what the client would print sent to it as events.
 */
export async function backUpForPeer(ch: Channel, m: ControlMessage, dropIn: DropIn, shown: (key: string) => boolean, o: DomainsAsked & { blockSize: number }): Promise<void> {
  const opts = (typeof m.options === 'object' && m.options !== null ? m.options : {}) as Record<string, unknown>;
  // `dest` keys the domains' checkpoints here (src/sync/domain-backup.ts prefixFor): a far DEST is host:/path, never a
  // path of this host, whose own runs' checkpoints (keyed by their absolute DEST) a client could otherwise have pruned.
  if (typeof m.dest !== 'string' || m.dest.length > 8192 || !/^[^/:]+:\//.test(m.dest)) throw protocolError('bad claimed dest: not host:/path');
  const signal = armInterrupt();
  try {
    await backUpClaimed(ch, m, dropIn, shown, m.dest, {
      connect: o.connect, blockSize: o.blockSize, verifySample: o.verifySample, dryRun: opts.dryRun === true, announce: opts.announce === true, signal,
    }, new ForwardingPrinter(ch));
  } finally {
    disarmInterrupt();
  }
}
