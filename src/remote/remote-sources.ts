/**
 * The receiving end's view of a peer's files (Sources, src/sync/source.ts):
 * the walk and the file engine run here, where the target is, and ask the
 * peer (src/remote/serve-sources.ts) over the channel. Requests go one at a
 * time, in the walk's order; a scan streams back only the blocks the plan
 * writes, each checked against the digest that came with it, and ends with
 * the fingerprint of the source's digests, which the engine checks before
 * it commits a manifest (docs/FORMATS.md "Wire protocol"). With -A/-X a
 * folder answers SourceDir.attrs from what the peer read and sent, each
 * attribute checked against the wire's bounds before the engine sees it.
 */
import type { BigIntStats } from 'node:fs';
import { blockCount, blockLength } from '../core/geometry.js';
import type { WriteRun } from '../core/plan.js';
import { inflateRawSync } from 'node:zlib';
import { attrPairsFromWire, encodeDigests, fieldDigest, protocolError, type ControlMessage } from '../core/wire.js';
import type { AttrMap } from '../io/attr-tool.js';
import type { AttrChoice } from '../sync/ext-attrs.js';
import { DIGEST_LEN, hashBlocksInto, zeroDigest } from '../hash/blake3.js';
import { encodeName, isEntryName } from '../io/safe-fs.js';
import type { PlannedChunk, ScanPlan, SourceDir, SourceFile, Sources } from '../sync/source.js';
import { remoteError, type Channel } from './channel.js';
import { statsFromWire, statsToWire } from './wire-stats.js';

/** A peer that breaks the protocol ends the run: what it sends next cannot be matched to what was asked. */
const bad = protocolError;

function stats(v: unknown): BigIntStats {
  try {
    return statsFromWire(v);
  } catch (e) {
    throw bad((e as Error).message.replace(/^protocol error: /, ''));
  }
}
const GAP = 4096;
/** Bytes of zeros handed to the engine at once, whatever a ZERO frame spans. */
const ZERO_PIECE = 16 << 20;
/** Beyond this many suspect blocks, everything from the first is rewritten (the list would not fit a message). */
const MAX_SUSPECT_LIST = 100_000;

export class RemoteSources implements Sources {
  readonly remote = true;
  readonly readsTarget = false;

  /** Answers the peer gave ahead, by their request (aheadFromWire): each taken once, in place of a round trip. */
  private readonly ahead: Map<string, ControlMessage>;

  /** `attrs` (-A/-X): the peer sends what it read of each entry's ACLs and xattrs with its listing. */
  constructor(
    readonly ch: Channel,
    readonly attrs?: AttrChoice,
    ahead?: Map<string, ControlMessage>,
  ) {
    this.ahead = ahead ?? new Map();
  }

  /** One request, one answer ("ok", or the peer's error raised here); one answered ahead is taken without asking. */
  async call(msg: ControlMessage): Promise<ControlMessage> {
    // (Only while answers ahead remain: keying a request is not free, and most of a run's come after them.)
    if (this.ahead.size) {
      const key = requestKey(msg);
      const known = this.ahead.get(key);
      if (known) {
        this.ahead.delete(key);
        return known;
      }
    }
    await this.ch.send(msg);
    return this.ch.expect('ok');
  }

  async statOperand(operand: string): Promise<BigIntStats> {
    return stats((await this.call({ op: 'stat', operand })).st);
  }

  async openOperand(operand: string): Promise<SourceDir> {
    const r = await this.call({ op: 'open-operand', operand, attrs: this.attrs });
    return new RemoteDir(this, handle(r.h), String(r.path), r);
  }

  async openParent(operand: string): Promise<{ dir: SourceDir; name: string }> {
    const r = await this.call({ op: 'open-parent', operand });
    if (typeof r.name !== 'string') throw bad('open-parent without a name');
    return { dir: new RemoteDir(this, handle(r.h), String(r.path), r), name: r.name };
  }

  async checkUsable(): Promise<void> {
    // The peer checks (an image its QEMU holds) when it opens the file.
  }

  async openFile(dir: SourceDir, name: string, listed: BigIntStats, _shown?: string): Promise<SourceFile> {
    if (!(dir instanceof RemoteDir)) throw new Error('RemoteSources.openFile: not a remote folder');
    const r = await this.call({ op: 'open-file', h: dir.h, name, st: statsToWire(listed) });
    return new RemoteFile(this, handle(r.f));
  }
}

/** The requests a peer may answer ahead, and how many answers at most. */
const AHEAD_OPS = new Set(['stat', 'open-operand', 'open-parent', 'open-file']);
const MAX_AHEAD = 256;

/** A request as a key: its fields in a fixed order, so the same request matches however its object was built. */
function requestKey(m: unknown): string {
  const norm = (v: unknown): unknown =>
    Array.isArray(v) ? v.map(norm) : typeof v === 'object' && v !== null ? Object.fromEntries(Object.keys(v).sort().filter((k) => (v as Record<string, unknown>)[k] !== undefined).map((k) => [k, norm((v as Record<string, unknown>)[k])])) : v;
  return JSON.stringify(norm(m));
}

/**
 * The `ahead` of a push's hello (docs/FORMATS.md "Answers ahead"): pairs of
 * [request, its `ok` answer] the sending end gave before being asked. Only
 * requests the walk makes through RemoteSources.call, each answer checked
 * where it is used as one that came in its turn.
 */
export function aheadFromWire(v: unknown): Map<string, ControlMessage> {
  const ahead = new Map<string, ControlMessage>();
  if (v === undefined) return ahead;
  if (!Array.isArray(v) || v.length > MAX_AHEAD) throw bad('a bad list of answers ahead');
  for (const pair of v as unknown[]) {
    const [req, ans] = Array.isArray(pair) && pair.length === 2 ? (pair as unknown[]) : [];
    const isMsg = (m: unknown): m is ControlMessage => typeof m === 'object' && m !== null && !Array.isArray(m) && typeof (m as ControlMessage).op === 'string';
    if (!isMsg(req) || !isMsg(ans) || !AHEAD_OPS.has(req.op) || ans.op !== 'ok') throw bad('a bad answer ahead');
    ahead.set(requestKey(req), ans);
  }
  return ahead;
}

/** An entry's attributes as the peer sent them (`xa`, checked), or why it could not read them (`xaError`); undefined: not sent. */
function attrsOf(m: Record<string, unknown>, of: string): AttrMap | Error | undefined {
  if (m.xaError !== undefined) return remoteError(m.xaError as ControlMessage);
  return m.xa === undefined ? undefined : new Map(attrPairsFromWire(m.xa, of));
}

function handle(v: unknown): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) throw bad('a bad handle');
  return v;
}

class RemoteDir implements SourceDir {
  /** lstat of each entry, from the last listing: the walk lists a folder, then stats its entries. */
  private listed = new Map<string, BigIntStats | Error>();
  /** -A/-X: each entry's attributes from the last listing, with the stat they go with. */
  private listedAttrs = new Map<string, { st: BigIntStats; attrs: AttrMap | Error }>();

  /** The folder's stat as it was opened (sent with the handle), and with -A/-X its attributes. */
  private readonly opened?: BigIntStats;
  private readonly openedAttrs?: AttrMap | Error;

  constructor(
    private readonly peer: RemoteSources,
    readonly h: number,
    readonly path: string,
    answer: Record<string, unknown> = {},
  ) {
    this.opened = answer.st === undefined ? undefined : stats(answer.st);
    this.openedAttrs = attrsOf(answer, path);
  }

  shown(name: string): string {
    return this.path.endsWith('/') ? `${this.path}${name}` : `${this.path}/${name}`;
  }

  async stat(): Promise<BigIntStats> {
    if (this.opened) return this.opened;
    return stats((await this.peer.call({ op: 'dir-stat', h: this.h })).st);
  }

  async readdir(): Promise<string[]> {
    await this.peer.ch.send({ op: 'list', h: this.h, attrs: this.peer.attrs });
    this.listed = new Map();
    this.listedAttrs = new Map();
    for (;;) {
      const m = await this.peer.ch.control();
      if (m.op === 'ok') break;
      if (m.op !== 'entries' || !Array.isArray(m.entries)) throw bad(`expected entries, got "${m.op}"`);
      for (const e of m.entries as Record<string, unknown>[]) {
        if (typeof e?.name !== 'string') throw bad('an entry without a name');
        // The walk joins these to paths on this side (the target, its manifest): only one component, once, will do.
        if (!isEntryName(e.name)) throw bad(`the listing of ${this.path} names ${JSON.stringify(e.name)}, which is not a name in a folder`);
        if (this.listed.has(e.name)) throw bad(`the listing of ${this.path} names ${JSON.stringify(e.name)} twice`);
        const st = e.error ? remoteError(e.error as ControlMessage) : stats(e.st);
        this.listed.set(e.name, st);
        const attrs = attrsOf(e, this.shown(e.name));
        if (attrs && !(st instanceof Error)) this.listedAttrs.set(e.name, { st, attrs });
      }
    }
    return [...this.listed.keys()];
  }

  async lstat(name: string): Promise<BigIntStats> {
    const known = this.listed.get(name);
    if (known instanceof Error) throw known;
    if (known) return known;
    return stats((await this.peer.call({ op: 'lstat', h: this.h, name })).st);
  }

  async openDir(name: string): Promise<SourceDir> {
    const r = await this.peer.call({ op: 'open-dir', h: this.h, name, attrs: this.peer.attrs });
    return new RemoteDir(this.peer, handle(r.h), String(r.path), r);
  }

  async attrs(name: string | undefined, expect: BigIntStats): Promise<AttrMap> {
    const known = name === undefined ? this.openedAttrs : this.listedAttrs.get(name);
    const got = known && 'st' in known ? (known.st.ino === expect.ino && known.st.dev === expect.dev ? known.attrs : undefined) : known;
    if (got instanceof Error) throw got;
    if (got) return got;
    // Not listed with them (reached by name, or listed as another inode): asked for, from the inode the walk has.
    const r = await this.peer.call({ op: 'attrs', h: this.h, name, st: name === undefined ? undefined : statsToWire(expect), attrs: this.peer.attrs });
    const a = attrsOf(r, name === undefined ? this.path : this.shown(name));
    if (!(a instanceof Map)) throw bad('an attrs answer without attributes');
    return a;
  }

  async readlink(name: string): Promise<string> {
    const r = await this.peer.call({ op: 'readlink', h: this.h, name });
    // What symlink(2) can make: not empty, no NUL, under PATH_MAX bytes.
    const t = r.target;
    if (typeof t !== 'string' || t === '' || t.includes('\0') || encodeName(t).length >= 4096) throw bad(`a symlink target that is not one (for ${this.shown(name)})`);
    return t;
  }

  async close(): Promise<void> {
    this.listed = new Map();
    this.listedAttrs = new Map();
    await this.peer.ch.send({ op: 'close', h: this.h }).catch(() => {});
  }
}

class RemoteFile implements SourceFile {
  constructor(
    private readonly peer: RemoteSources,
    private readonly f: number,
  ) {}

  async close(): Promise<void> {
    // Best effort: a broken channel already failed the run, and the peer closes what it held when it ends.
    await this.peer.ch.send({ op: 'close-file', f: this.f }).catch(() => {});
  }

  async scan(plan: ScanPlan, consume: (c: PlannedChunk) => Promise<void>): Promise<Buffer> {
    const { size, blockSize, mode } = plan;
    if (mode === 'compare') throw new Error('RemoteFile.scan: compare against digests (manifest mode)');
    const ch = this.peer.ch;
    const n = blockCount(size, blockSize);
    const oldBlocks = mode === 'manifest' ? blockCount(plan.oldSize, blockSize) : 0;
    const s = plan.suspect;
    const sorted = s ? [...s.blocks].sort((a, b) => a - b) : [];
    const suspect = !s ? undefined : sorted.length > MAX_SUSPECT_LIST ? { blocks: [], from: sorted[0]! } : { blocks: sorted, from: Number.isFinite(s.from) ? s.from : -1 };
    await ch.send({
      op: 'scan',
      f: this.f,
      plan: { size, blockSize, mode, oldSize: plan.oldSize, holeFrom: Number.isFinite(plan.holeFrom) ? plan.holeFrom : -1, suspect, fp: plan.old?.fingerprint.toString('hex') },
    });
    let next = 0;
    // A failure on this side (writing the target) fails this file only: the rest of the scan is read and
    // dropped, so that the next request's answer is the next frame.
    let failed: { e: unknown } | undefined;
    const onChunk = async (c: PlannedChunk) => {
      if (failed) return;
      try {
        await consume(c);
      } catch (e) {
        failed = { e };
      }
    };
    const gapTo = async (to: number) => {
      if (failed) next = Math.max(next, to);
      while (next < to) {
        const k = Math.min(GAP, to - next);
        const digests = Buffer.alloc(k * DIGEST_LEN);
        // Unchanged blocks keep their old digests; blocks past the old end not sent read as zero.
        const known = Math.max(0, Math.min(k, oldBlocks - next));
        if (known) {
          try {
            await plan.old!.readDigests(next, known, digests);
          } catch (e) {
            failed = { e };
            next = to;
            return;
          }
        }
        for (let j = known; j < k; j++) zeroDigest(blockLength(next + j, size, blockSize)).copy(digests, j * DIGEST_LEN);
        await onChunk({ first: next, digests, changed: [], runs: [], bytes: () => Buffer.alloc(0), scanned: runBytes(next, k) });
        next += k;
      }
    };
    const runBytes = (first: number, count: number) => Math.min(size, (first + count) * blockSize) - first * blockSize;
    const runAt = (offset: number, count: number, what: string): number => {
      if (offset % blockSize !== 0) throw bad(`${what} at ${offset}, not a block boundary`);
      const b = offset / blockSize;
      if (b < next || count < 1 || b + count > n) throw bad(`${what} for blocks ${b}..${b + count} (expected from ${next}, of ${n})`);
      return b;
    };
    for (;;) {
      const f = await ch.next();
      if (f.type === 'data') {
        const count = f.digests.length / DIGEST_LEN;
        const b = runAt(f.offset, count, 'data');
        const want = runBytes(b, count);
        let data = f.data;
        if (f.compressed) {
          // Never more than the blocks it claims: a deflate bomb stops at their size.
          try {
            data = inflateRawSync(f.data, { maxOutputLength: want });
          } catch {
            throw bad(`the compressed data at ${f.offset} does not inflate to ${want} bytes`);
          }
        }
        if (data.length !== want) throw bad(`data for ${count} blocks at ${f.offset} is ${data.length} bytes`);
        const check = Buffer.alloc(f.digests.length);
        hashBlocksInto(data, blockSize, check);
        if (!check.equals(f.digests)) throw bad(`the data at ${f.offset} does not hash to the digests sent with it`);
        await gapTo(b);
        const run: WriteRun = { first: b, count, zero: false };
        await onChunk({ first: b, digests: f.digests, changed: blocks(b, count), runs: [run], bytes: () => data, scanned: data.length });
        next = b + count;
      } else if (f.type === 'zero') {
        const count = blockCount(f.length, blockSize);
        const b = runAt(f.offset, count, 'zeros');
        if (f.length !== runBytes(b, count)) throw bad(`zeros for ${count} blocks at ${f.offset} are ${f.length} bytes`);
        await gapTo(b);
        // One frame may say a terabyte is zero: it is handed on in pieces of bounded memory.
        const per = Math.max(1, Math.floor(ZERO_PIECE / blockSize));
        for (let at = b; at < b + count; at += per) {
          const k = Math.min(per, b + count - at);
          const digests = Buffer.alloc(k * DIGEST_LEN);
          for (let j = 0; j < k; j++) zeroDigest(blockLength(at + j, size, blockSize)).copy(digests, j * DIGEST_LEN);
          const run: WriteRun = { first: at, count: k, zero: true };
          const len = runBytes(at, k);
          await onChunk({ first: at, digests, changed: blocks(at, k), runs: [run], bytes: () => Buffer.alloc(len), scanned: len });
          next = at + k;
        }
      } else if (f.type === 'control') {
        const m = f.msg;
        if (m.op === 'error') throw failed ? failed.e : remoteError(m);
        if (m.op === 'need-digests') {
          if (!plan.old) throw bad('digests asked for a scan that has none');
          await sendDigests(this.peer, plan.old, oldBlocks);
        } else if (m.op === 'progress') {
          const upTo = m.upTo;
          if (typeof upTo !== 'number' || !Number.isSafeInteger(upTo) || upTo < next || upTo > n) throw bad('progress out of order');
          await gapTo(upTo);
        } else if (m.op === 'scan-end') {
          const fp = fieldDigest(m, 'fp', 'fingerprint');
          await gapTo(n);
          if (failed) throw failed.e;
          return fp;
        } else throw bad(`unexpected "${m.op}" during a scan`);
      } else throw bad(`unexpected ${f.type} frame during a scan`);
    }
  }
}

const blocks = (first: number, count: number): number[] => Array.from({ length: count }, (_, i) => first + i);

async function sendDigests(peer: RemoteSources, old: NonNullable<ScanPlan['old']>, n: number): Promise<void> {
  const buf = Buffer.alloc(GAP * DIGEST_LEN);
  for (let first = 0; first < n; first += GAP) {
    const k = Math.min(GAP, n - first);
    await old.readDigests(first, k, buf);
    await peer.ch.send(encodeDigests(first, buf.subarray(0, k * DIGEST_LEN)));
  }
  await peer.ch.send({ op: 'digests-end' });
}
