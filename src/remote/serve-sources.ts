/**
 * The sending end of a remote sync: serves this host's files to a peer that
 * runs the walk and the file engine where the target is
 * (src/remote/remote-sources.ts). It answers the walk's questions (stat,
 * list, readlink) for folders it holds by descriptor, and scans files
 * itself: read and hashed on the local worker pool, planned against the
 * target's old digests (from its verified cache when it has them, else sent
 * once by the peer), and only the blocks the plan writes go back
 * (docs/FORMATS.md "Wire protocol"). With -A/-X a listing carries each
 * entry's ACLs and xattrs, read here through descriptors as a local run
 * reads them (src/sync/ext-attrs.ts), within the wire's bounds.
 *
 * With `restrict` (qsync --server --restrict DIR) every operand is a path
 * inside DIR: absolute paths and `..` are refused, and what an operand opens
 * must lie inside DIR once symlinks are resolved. Below an operand nothing is
 * followed anyway: entries are reached through held folders.
 */
import type { BigIntStats } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { basename, dirname, resolve } from 'node:path';
import { deflateRawSync } from 'node:zlib';
import { QsyncError } from '../core/errors.js';
import { blockCount } from '../core/geometry.js';
import { attrPairsProblem, encodeData, encodeZero, fieldInt, fieldString, MAX_ENTRY_ATTRS, protocolError, type ControlMessage } from '../core/wire.js';
import { DIGEST_LEN } from '../hash/blake3.js';
import type { HashPool } from '../hash/pool.js';
import { Dir } from '../io/safe-fs.js';
import { Fingerprinter } from '../sync/manifest-store.js';
import { ATTR_BATCH, chosenAttrs, readEntryAttrs, readNodeAttrs, type AttrChoice, type Cached, type Node } from '../sync/ext-attrs.js';
import type { AttrMap } from '../io/attr-tool.js';
import { LocalSources, openListed, refuseIfQemuHolds, scanAndPlan, type DigestReader, type PlannedChunk, type ScanPlan } from '../sync/source.js';
import { planAhead, Prehash } from './prehash.js';
import { errorMessage, type Channel } from './channel.js';
import type { BatchRecorder } from './batch-relay.js';
import { DigestCache } from './digest-cache.js';
import { checkInside, restrictedPath } from './restrict.js';
import { statsFromWire, statsToWire } from './wire-stats.js';

/** Entries per listing frame: well under the control limit with long names. */
const LIST_PAGE = 2000;
/** A listing frame is sent once it holds about this many bytes (an entry's attributes are at most MAX_ENTRY_ATTRS). */
const LIST_BYTES = 2 * MAX_ENTRY_ATTRS;

/** The -A/-X a request asks for (its `attrs`), or undefined. */
function attrChoice(m: ControlMessage): AttrChoice | undefined {
  const a = m.attrs;
  if (a === undefined) return undefined;
  if (typeof a !== 'object' || a === null) throw protocolError('"attrs" is not an object');
  const { acls, xattrs } = a as Record<string, unknown>;
  return acls === true || xattrs === true ? { acls: acls === true, xattrs: xattrs === true } : undefined;
}

/** What an answer carries of attributes `m` (or the failure to read them): `xa` pairs within the wire's bounds, or `xaError`. */
function attrsAnswer(m: AttrMap | Error, want: AttrChoice, shown: string): { xa: [string, string][] } | { xaError: ControlMessage } {
  if (m instanceof Error) return { xaError: errorMessage(m) };
  const xa = chosenAttrs(m, want);
  const problem = attrPairsProblem(xa);
  if (problem) return { xaError: errorMessage(new QsyncError('SOURCE', `the ACLs and xattrs of ${shown} cannot be sent: ${problem}`, { file: shown })) };
  return { xa };
}

/** The attributes of `node`, or why they could not be read. */
const attrsOrError = (node: Node): Promise<AttrMap | Error> => readNodeAttrs(node).catch((e: unknown) => (e instanceof Error ? e : new Error(String(e))));
/** Operands answered ahead (a pre-opened file or folder each, held until the session ends). */
const MAX_AHEAD = 16;
/** A progress message at least this often while nothing needs sending. */
const PROGRESS_BLOCKS = 4096;

const bad = protocolError;



export class SourceServer {
  private readonly dirs = new Map<number, Dir>();
  private readonly files = new Map<number, { fh: FileHandle; shown: string }>();
  private nextHandle = 1;
  private readonly local: LocalSources;
  private cache?: DigestCache;

  /** The drop-in's image files (`dev:ino`, src/remote/domain-claims.ts): which of them the peer was shown. */
  #watched?: ReadonlySet<string>;
  readonly #shown = new Set<string>();
  /** Requests answered beside the sources' own (a pull's `claimed`). */
  readonly #more = new Map<string, (m: ControlMessage) => Promise<void>>();

  constructor(
    private readonly ch: Channel,
    private readonly pool: HashPool,
    private readonly restrict?: string,
    /** -z: send blocks deflated where that makes them smaller. */
    private readonly compress = false,
    /** A push's --write-batch: what the scans send is recorded here (src/remote/batch-relay.ts). */
    private readonly batch?: BatchRecorder,
  ) {
    this.local = new LocalSources(pool);
  }

  /** Note which of `keys` (`dev:ino` of regular files) this session's answers show the peer (`shown`). */
  watch(keys: ReadonlySet<string>): void {
    this.#watched = keys;
  }

  /** Whether a stat or listing of this session showed the peer that file: only those may be claimed (src/remote/domain-claims.ts). */
  shown(key: string): boolean {
    return this.#shown.has(key);
  }

  /** Answer `op` with `fn` too (its errors end the session). */
  answer(op: string, fn: (m: ControlMessage) => Promise<void>): void {
    this.#more.set(op, fn);
  }

  private note(st: BigIntStats): BigIntStats {
    if (this.#watched && st.isFile() && this.#watched.has(`${st.dev}:${st.ino}`)) this.#shown.add(`${st.dev}:${st.ino}`);
    return st;
  }

  /**
   * Answer requests until the peer sends something else (its "bye" or, when
   * the peer is the receiving end of a push, its "done"), which is returned.
   */
  async serve(): Promise<ControlMessage> {
    try {
      for (;;) {
        const f = await this.ch.next();
        if (f.type !== 'control') throw bad(`unexpected ${f.type} frame`);
        const m = f.msg;
        if (m.op === 'close') {
          await this.dirs.get(fieldInt(m, 'h', 1))?.close();
          this.dirs.delete(fieldInt(m, 'h', 1));
          continue;
        }
        if (m.op === 'close-file') {
          await this.files.get(fieldInt(m, 'f', 1))?.fh.close();
          this.files.delete(fieldInt(m, 'f', 1));
          continue;
        }
        if (await this.batch?.take(m)) continue;
        const more = typeof m.op === 'string' ? this.#more.get(m.op) : undefined;
        if (more) {
          await more(m);
          continue;
        }
        // Its own handlers only: a peer's "toString" or "__proto__" names none (an `in` test would find Object's).
        if (typeof m.op !== 'string' || !Object.hasOwn(this.handlers, m.op)) return m;
        try {
          await this.handlers[m.op]!(m);
        } catch (e) {
          if (e instanceof QsyncError && e.code === 'PROTOCOL') throw e;
          await this.ch.send(errorMessage(e));
        }
      }
    } finally {
      await this.release();
    }
  }

  /** Close what the peer left open (and what was opened ahead for it). */
  async release(): Promise<void> {
    await this.prehash?.pre?.stop();
    this.prehash = undefined;
    for (const d of this.dirs.values()) await d.close().catch(() => {});
    for (const f of this.files.values()) await f.fh.close().catch(() => {});
    this.dirs.clear();
    this.files.clear();
    await this.cache?.close();
    this.cache = undefined;
  }

  private readonly handlers: Record<string, (m: ControlMessage) => Promise<void>> = {
    stat: async (m) => {
      const p = await this.operand(fieldString(m, 'operand'));
      const st = await this.local.statOperand(p);
      // The operand followed (SRC/) must lie inside the root; one not followed is checked through its folder.
      await this.inside(p.endsWith('/') ? p : dirname(resolve(p)));
      await this.ok({ st: statsToWire(this.note(st)) });
    },
    'open-operand': async (m) => {
      const d = await Dir.open(await this.operand(fieldString(m, 'operand')));
      await this.hold(d, undefined, attrChoice(m));
    },
    'open-parent': async (m) => {
      const abs = resolve(await this.operand(fieldString(m, 'operand')));
      const d = await Dir.open(dirname(abs));
      await this.hold(d, basename(abs));
    },
    'dir-stat': async (m) => this.ok({ st: statsToWire(await this.dir(m).stat()) }),
    list: async (m) => {
      const d = this.dir(m);
      const want = attrChoice(m);
      const names = await d.readdir();
      let entries: Record<string, unknown>[] = [];
      let bytes = 0;
      // -A/-X: read a batch of entries at a time (one getfattr run each), as a local walk does.
      for (let i = 0; i < names.length; i += ATTR_BATCH) {
        const batch = names.slice(i, i + ATTR_BATCH);
        const attrs = want ? await readEntryAttrs(d, batch).catch(() => new Map<string, Cached>()) : undefined;
        for (const name of batch) {
          let entry: Record<string, unknown>;
          try {
            const st = this.note(await d.lstat(name));
            entry = { name, st: statsToWire(st) };
            const a = attrs?.get(name);
            // Read from this very inode, or left out: the receiving end then asks for them by name and inode.
            if (want && a && a.ino === st.ino && a.dev === st.dev) Object.assign(entry, attrsAnswer(a.attrs, want, d.shown(name)));
          } catch (e) {
            entry = { name, error: errorMessage(e) };
          }
          // Only entries with attributes can outgrow a page by bytes (names alone stay far below it at LIST_PAGE): measured then only.
          const size = want ? JSON.stringify(entry).length : 0;
          if (entries.length && (entries.length >= LIST_PAGE || bytes + size > LIST_BYTES)) {
            await this.ch.send({ op: 'entries', entries });
            entries = [];
            bytes = 0;
          }
          entries.push(entry);
          bytes += size;
        }
      }
      if (entries.length) await this.ch.send({ op: 'entries', entries });
      await this.ok({});
    },
    attrs: async (m) => {
      const d = this.dir(m);
      const want = attrChoice(m);
      if (!want) throw bad('"attrs" without ACLs or xattrs to read');
      const name = m.name === undefined ? undefined : fieldString(m, 'name');
      const node: Node = name === undefined ? { held: d } : { dir: d, name, expect: statsFromWire(m.st) };
      const a = attrsAnswer(await attrsOrError(node), want, name === undefined ? d.path : d.shown(name));
      if ('xaError' in a) await this.ch.send(a.xaError);
      else await this.ok(a);
    },
    lstat: async (m) => this.ok({ st: statsToWire(this.note(await this.dir(m).lstat(fieldString(m, 'name')))) }),
    'open-dir': async (m) => {
      const d = await this.dir(m).openDir(fieldString(m, 'name'));
      await this.hold(d, undefined, attrChoice(m));
    },
    readlink: async (m) => this.ok({ target: await this.dir(m).readlink(fieldString(m, 'name')) }),
    'open-file': async (m) => {
      const d = this.dir(m);
      const name = fieldString(m, 'name');
      const listed = statsFromWire(m.st);
      const shown = d.shown(name);
      await refuseIfQemuHolds(listed, shown);
      const fh = await openListed(d, name, listed, shown);
      const f = this.nextHandle++;
      this.files.set(f, { fh, shown });
      await this.ok({ f });
    },
    scan: async (m) => this.scan(m),
  };

  private ok(body: Record<string, unknown>): Promise<void> {
    if (this.taken) {
      this.taken.push({ op: 'ok', ...body });
      return Promise.resolve();
    }
    return this.ch.send({ op: 'ok', ...body });
  }

  /** The file opened ahead being hashed (`f` its handle), until a scan needs the pool. */
  private prehash?: { f: number; pre?: Prehash };

  /** While answering ahead: the answers, kept instead of sent. */
  private taken?: ControlMessage[];

  /**
   * A push's answers ahead (docs/FORMATS.md "Answers ahead"): the first
   * requests the receiving end's walk makes of each operand (its stat;
   * a file's folder and the file opened, or a SRC/ folder opened),
   * answered now to go with the hello, so the walk waits no round trip
   * for them. Only successful answers; each as the request would be
   * answered, through its handler (handles held as any other).
   */
  async answerAhead(operands: readonly string[], attrs: AttrChoice | undefined): Promise<[ControlMessage, ControlMessage][]> {
    const out: [ControlMessage, ControlMessage][] = [];
    const answer = async (m: ControlMessage): Promise<ControlMessage | undefined> => {
      this.taken = [];
      try {
        await this.handlers[m.op]!(m);
        const a = this.taken;
        if (a.length !== 1) return undefined;
        out.push([m, a[0]!]);
        return a[0];
      } catch {
        // Asked again in its turn, and answered (or refused) then.
        return undefined;
      } finally {
        this.taken = undefined;
      }
    };
    let largest: { f: number; size: bigint } | undefined;
    for (const operand of operands.slice(0, MAX_AHEAD)) {
      const s = await answer({ op: 'stat', operand });
      if (!s) continue;
      const st = statsFromWire(s.st);
      if (st.isDirectory() && (operand.endsWith('/') || basename(operand) === '.')) {
        await answer({ op: 'open-operand', operand, attrs });
      } else if (st.isFile() && !this.#watched?.has(`${st.dev}:${st.ino}`)) {
        // (A domain's disk is backed up through its domain, never opened here: src/remote/domain-claims.ts.)
        const p = await answer({ op: 'open-parent', operand });
        const f = p && (await answer({ op: 'open-file', h: p.h, name: p.name, st: s.st }));
        if (f && (!largest || st.size > largest.size)) largest = { f: f.f as number, size: st.size };
      }
    }
    // The largest file opened ahead is hashed while the session starts (src/remote/prehash.ts).
    const held = largest && this.files.get(largest.f);
    if (held) this.prehash = { f: largest!.f, pre: await Prehash.start(this.pool, held.fh, held.shown) };
    return out;
  }

  private dir(m: ControlMessage): Dir {
    const d = this.dirs.get(fieldInt(m, 'h', 1));
    if (!d) throw bad(`no folder handle ${String(m.h)}`);
    return d;
  }

  private async hold(d: Dir, name?: string, want?: AttrChoice): Promise<void> {
    try {
      await this.inside(`/proc/self/fd/${d.fd}`);
    } catch (e) {
      await d.close();
      throw e;
    }
    const h = this.nextHandle++;
    this.dirs.set(h, d);
    // The folder's own stat comes along: the walk checks it is the one listed. With -A/-X, its attributes too.
    const xa = want && attrsAnswer(await attrsOrError({ held: d }), want, d.path);
    await this.ok({ h, path: d.path, name, st: statsToWire(await d.stat()), ...xa });
  }

  /** An operand as the peer gave it, mapped into the --restrict root. */
  private operand(p: string): Promise<string> {
    return restrictedPath(p, this.restrict, { lastMayBeLink: true });
  }

  /** With --restrict: `path`, symlinks resolved, must lie inside the root. */
  private async inside(path: string): Promise<void> {
    if (this.restrict !== undefined) await checkInside(path, this.restrict);
  }

  private async scan(m: ControlMessage): Promise<void> {
    const file = this.files.get(fieldInt(m, 'f', 1));
    if (!file) throw bad(`no file handle ${String(m.f)}`);
    const p = (typeof m.plan === 'object' && m.plan !== null ? m.plan : {}) as Record<string, unknown>;
    const size = fieldInt(p, 'size');
    const blockSize = fieldInt(p, 'blockSize', 1);
    const oldSize = fieldInt(p, 'oldSize');
    const holeFrom = p.holeFrom === -1 ? Infinity : fieldInt(p, 'holeFrom');
    const mode = p.mode;
    if (blockSize !== this.pool.blockSize) throw bad(`block size ${blockSize} is not the session's ${this.pool.blockSize}`);
    if (mode !== 'manifest' && mode !== 'rewrite') throw bad(`scan mode ${String(mode)}`);
    if ((await file.fh.stat()).size !== size) {
      throw new QsyncError('SOURCE', `file has vanished: ${file.shown} (it changed size while qsync worked; not read)`, { file: file.shown, vanished: true });
    }
    let suspect: ScanPlan['suspect'];
    if (typeof p.suspect === 'object' && p.suspect !== null) {
      const s = p.suspect as Record<string, unknown>;
      if (!Array.isArray(s.blocks) || !s.blocks.every((b) => Number.isSafeInteger(b) && b >= 0)) throw bad('suspect blocks');
      suspect = { blocks: new Set(s.blocks as number[]), from: s.from === -1 ? Infinity : fieldInt(s, 'from') };
    }
    let old: (DigestReader & { close(): Promise<void> }) | undefined;
    const oldFp = typeof p.fp === 'string' && /^[0-9a-f]{64}$/.test(p.fp) ? Buffer.from(p.fp, 'hex') : undefined;
    this.cache ??= await DigestCache.open();
    const cache = this.cache;
    try {
      if (mode === 'manifest') {
        if (!oldFp) throw bad('a manifest scan needs the fingerprint of the old digests');
        old = await cache.lookup(oldFp, blockSize, oldSize);
        if (!old) {
          await this.ch.send({ op: 'need-digests' });
          await this.receiveDigests(oldFp, blockSize, oldSize);
          old = await cache.lookup(oldFp, blockSize, oldSize);
          if (!old) throw new QsyncError('IO', 'the digests just received could not be kept in the state folder');
        }
      }
      const fp = new Fingerprinter(blockSize, size);
      const keep = await cache.create();
      let quiet = 0;
      try {
        // The pool is this scan's now; what was hashed ahead of this file is taken if the file is as it was then.
        const pre = this.prehash;
        this.prehash = undefined;
        const ahead = pre?.f === fieldInt(m, 'f', 1) ? await pre.pre?.take(file.fh) : await pre?.pre?.stop();
        const plan: ScanPlan = { size, blockSize, mode, old, oldSize, holeFrom, suspect };
        const onChunk = async (c: PlannedChunk) => {
          fp.append(c.digests);
          await keep.append(c.digests);
          for (const r of c.runs) {
            const off = r.first * blockSize;
            if (r.zero) {
              const len = Math.min(size, (r.first + r.count) * blockSize) - off;
              await this.ch.send(encodeZero(off, len));
              await this.batch?.zero(off, len);
            } else {
              const i = (r.first - c.first) * DIGEST_LEN;
              const bytes = c.bytes(r);
              const z = this.compress ? deflateRawSync(bytes, { level: 1 }) : undefined;
              const small = z !== undefined && z.length < bytes.length - (bytes.length >> 5);
              await this.ch.send(encodeData(off, c.digests.subarray(i, i + r.count * DIGEST_LEN), small ? z : bytes, small));
              await this.batch?.data(off, bytes);
            }
          }
          quiet = c.runs.length ? 0 : quiet + c.digests.length / DIGEST_LEN;
          if (quiet >= PROGRESS_BLOCKS) {
            quiet = 0;
            await this.ch.send({ op: 'progress', upTo: c.first + c.digests.length / DIGEST_LEN });
          }
        };
        const from = ahead && mode === 'manifest' ? await planAhead(file.fh, file.shown, plan, ahead, this.pool.chunkSize / blockSize, onChunk) : 0;
        await scanAndPlan(this.pool, file.fh.fd, file.shown, plan, onChunk, from * blockSize);
      } catch (e) {
        await keep.discard();
        throw e;
      }
      const digest = fp.digest();
      await keep.keep(digest);
      if (oldFp && !oldFp.equals(digest)) await cache.drop(oldFp);
      await this.ch.send({ op: 'scan-end', fp: digest.toString('hex') });
    } finally {
      await old?.close();
    }
  }

  /** The peer's old digests, in order, into the cache; they must hash to `fp`. */
  private async receiveDigests(fp: Buffer, blockSize: number, oldSize: number): Promise<void> {
    const n = blockCount(oldSize, blockSize);
    const w = await this.cache!.create();
    const check = new Fingerprinter(blockSize, oldSize);
    let next = 0;
    try {
      for (;;) {
        const f = await this.ch.next();
        if (f.type === 'control' && f.msg.op === 'digests-end') break;
        if (f.type !== 'digests') throw bad(`expected digests, got ${f.type === 'control' ? `"${f.msg.op}"` : `a ${f.type} frame`}`);
        const k = f.digests.length / DIGEST_LEN;
        if (f.first !== next || next + k > n) throw bad(`digests for blocks ${f.first}..${f.first + k} out of order or past ${n}`);
        check.append(f.digests);
        await w.append(f.digests);
        next += k;
      }
      if (next !== n) throw bad(`${next} digests received, ${n} expected`);
      if (!check.digest().equals(fp)) throw bad('the digests received do not hash to the fingerprint they came with');
      await w.keep(fp);
    } catch (e) {
      await w.discard();
      throw e;
    }
  }
}
