/**
 * The far end of a remote Target (docs/FORMATS.md "Wire protocol", role
 * "target"): the client runs a driver (image mode) and this server holds
 * the destination: the lock, each target's data, manifest, intent and note
 * stay here (src/sync/local-target.ts), and only the blocks the client
 * decided to write, their digests and a few small requests cross the wire.
 *
 * Requests that need an answer get one, in order; the streamed ones (record,
 * DATA, ZERO, truncate, append) get none, and the first of them that fails
 * ends the session with its error: the client hears it at its next request.
 * Every block that arrives is checked against the digest sent with it
 * before it is written.
 */
import { tmpdir } from 'node:os';
import { QsyncError } from '../core/errors.js';
import { blockCount, isValidBlockSize } from '../core/geometry.js';
import { encodeData, encodeDigests, fieldInt, fieldString, protocolError, type ControlMessage, type WireFrame } from '../core/wire.js';
import { isEntryName } from '../io/safe-fs.js';
import { DIGEST_LEN, digestOf, hashBlocksInto, zeroDigest } from '../hash/blake3.js';
import type { BlockSink } from '../io/types.js';
import type { FileSyncContext } from '../sync/file-sync.js';
import { MAX_INTENT_BLOCKS } from '../sync/intent.js';
import { emptyFingerprint, type Manifest } from '../sync/manifest-store.js';
import { hashFile } from '../sync/target-digests.js';
import type { LocalDestination } from '../sync/local-target.js';
import { qcow2Target } from '../sync/qcow2-target.js';
import type { OpenData, StateWriter, Target, TargetIdentity, TargetNote } from '../sync/target.js';
import type { Trust } from '../sync/trust.js';
import { errorMessage, type Channel } from './channel.js';

/** Digests per DIGESTS frame (1 MiB). */
const DIGESTS_PER_FRAME = 32768;
/** Longest read a client may ask for at once. */
export const MAX_TARGET_READ = 4 << 20;
/**
 * Most blocks written ahead of their manifest digests (the client appends a
 * piece's digests once its blocks are sent: src/sync/image-backup.ts).
 */
export const MAX_WRITTEN_AHEAD = MAX_INTENT_BLOCKS;

const bad = protocolError;



/** A bigint as it travels (JSON has none): a decimal string. */
export const idToWire = (id: TargetIdentity): Record<string, string> => ({ size: String(id.size), mtimeNs: String(id.mtimeNs), ino: String(id.ino), dev: String(id.dev) });

function blocksOf(v: unknown, what: string): number[] {
  if (!Array.isArray(v) || v.length > MAX_INTENT_BLOCKS || !v.every((b) => Number.isSafeInteger(b) && b >= 0)) throw bad(`${what} is not a list of block numbers`);
  return v as number[];
}

export function noteFromWire(v: unknown): TargetNote {
  const n = v as Partial<TargetNote> | null;
  if (typeof n !== 'object' || n === null || typeof n.node !== 'string' || typeof n.bitmap !== 'string' || typeof n.baseChecksum !== 'string' || !Number.isSafeInteger(n.size)) {
    throw bad('a malformed note');
  }
  return { node: n.node, bitmap: n.bitmap, baseChecksum: n.baseChecksum, size: n.size! };
}

interface Writing {
  name: string;
  target: Target;
  data: OpenData;
  /** The data made by "t-open" (there was none). */
  created: boolean;
  /** Where blocks go: the data's sink, or the history's around it (--backup-dir kept here). */
  sink?: BlockSink;
  /** The fingerprint of the data as it was before this write ("t-hash", and the history's base), once hashed. */
  hashed?: { blockSize: number; fp: Promise<Buffer> };
  /** A block or a truncate reached the data: it is no longer as it was. */
  touched?: boolean;
  writer?: StateWriter;
  blockSize: number;
  size: number;
  /** Digests appended so far. */
  appended: number;
  /** The "changed" list of the DIGESTS frame that comes next. */
  changed?: number[];
  /** The manifest the write patches ("t-begin" with a base). */
  base?: Manifest;
  /** A patch waiting for its DIGESTS frame: `count` digests from the base with the `changed` ones replaced. */
  patch?: { count: number; changed: number[] };
  /** Blocks an interrupted run may have written (the base's verdict): each must be written again before it is described. */
  suspect?: Pick<Trust, 'unknown' | 'unknownFrom'>;
  /**
   * Blocks written whose manifest digests have not come yet, with the digest
   * of what was written: each must be described by it. A block is written
   * once, before its digest (zeros are only punched at "t-sync": a later
   * write to it would be undone, and an earlier digest could not be checked).
   */
  written: Map<number, Buffer>;
  /** "t-sync" done: the data is durable as the manifest will describe it; nothing more is written. */
  synced: boolean;
  /** The data's identity once in place ("t-finish"): what the manifest records. */
  id?: TargetIdentity;
}

export class TargetServer {
  /** Each target's manifest as the client's last assess saw it (its base, and where its digests come from), with its verdict. */
  private readonly manifests = new Map<string, Manifest>();
  private readonly verdicts = new Map<string, Trust>();
  private w?: Writing;

  /**
   * `dest`: the destination, or (the drop-in's far side, src/remote/domain-claims.ts) its folders by
   * their path below DEST ('' or 'a/b'), which requests name in `folder`.
   */
  constructor(
    private readonly ch: Channel,
    private readonly dest: LocalDestination | ReadonlyMap<string, LocalDestination>,
    /** --backup-dir on this side (src/sync/run-deltas.ts): every target written keeps its old blocks in the history. */
    private readonly history?: FileSyncContext['wrapSink'],
  ) {}

  /** Answer until the client's "bye" (returned). */
  async serve(): Promise<ControlMessage> {
    try {
      for (;;) {
        const f = await this.ch.next();
        if (f.type !== 'control') {
          await this.frame(f);
          continue;
        }
        const m = f.msg;
        // Own handlers only: a peer's "toString" or "constructor" names none (Object's would be found).
        const h = Object.hasOwn(this.streamed, m.op) ? this.streamed[m.op] : undefined;
        if (h) {
          await h(m);
          continue;
        }
        const r = Object.hasOwn(this.requests, m.op) ? this.requests[m.op] : undefined;
        if (!r) return m;
        try {
          await r(m);
        } catch (e) {
          if (e instanceof QsyncError && e.code === 'PROTOCOL') throw e;
          await this.ch.send(errorMessage(e));
        }
      }
    } finally {
      await this.w?.writer?.abort().catch(() => {});
      await this.w?.sink?.close().catch(() => {});
      await this.w?.data.close();
      for (const m of this.manifests.values()) await m.close().catch(() => {});
    }
  }

  /** The folder a request names (`folder`, only among those served), and the target's key: its path below DEST. */
  private placeOf(m: ControlMessage): { dest: LocalDestination; name: string; key: string } {
    const name = fieldString(m, 'name');
    if (!isEntryName(name)) throw bad(`${JSON.stringify(name)} is not a name in the destination`);
    if (!(this.dest instanceof Map)) {
      if (m.folder !== undefined) throw bad('a folder where the destination is one');
      return { dest: this.dest as LocalDestination, name, key: name };
    }
    const folder = m.folder;
    const dest = typeof folder === 'string' ? this.dest.get(folder) : undefined;
    if (!dest) throw bad(`${JSON.stringify(folder)} is not a folder of this session`);
    return { dest, name, key: folder ? `${folder as string}/${name}` : name };
  }

  private keyOf(m: ControlMessage): string {
    return this.placeOf(m).key;
  }

  private target(m: ControlMessage): Target {
    const { dest, name } = this.placeOf(m);
    if (m.format === undefined) return dest.target(name);
    // The drop-in's copy of a qcow2 disk stays a qcow2, written here through this host's QEMU.
    if (m.format !== 'qcow2') throw bad(`a bad format ${JSON.stringify(m.format)}`);
    return qcow2Target(dest, name, tmpdir());
  }

  private writing(): Writing & { writer: StateWriter } {
    if (!this.w?.writer) throw bad('blocks sent before "t-begin"');
    return this.w as Writing & { writer: StateWriter };
  }

  /** As `streaming`, with no digests announced and not yet sent. */
  private announcing(): Writing & { writer: StateWriter } {
    const w = this.streaming();
    if (w.patch || w.changed) throw bad('digests announced before the last ones came');
    return w;
  }

  /** The write begun, still taking blocks and digests (not after "t-sync"). */
  private streaming(): Writing & { writer: StateWriter } {
    const w = this.writing();
    if (w.synced) throw bad('blocks or digests sent after "t-sync"');
    return w;
  }

  /** A block stream frame: checked against its digests, then written. */
  private async frame(f: WireFrame): Promise<void> {
    const w = this.streaming();
    if (f.type === 'data' || f.type === 'zero') w.touched = true;
    if (f.type === 'data') {
      if (f.compressed) throw bad('compressed blocks are not taken here');
      const n = f.digests.length / DIGEST_LEN;
      if (!this.whole(w, f.offset, f.data.length) || Math.ceil(f.data.length / w.blockSize) !== n) throw bad('blocks outside the target');
      const got = Buffer.alloc(f.digests.length);
      hashBlocksInto(f.data, w.blockSize, got);
      if (!got.equals(f.digests)) throw bad(`blocks at ${f.offset} do not match their digests`);
      this.wrote(w, f.offset / w.blockSize, n, (i) => got.subarray(i * DIGEST_LEN, (i + 1) * DIGEST_LEN));
      await w.sink!.write(f.offset, f.data);
    } else if (f.type === 'zero') {
      if (!this.whole(w, f.offset, f.length)) throw bad('zeros outside the target');
      const first = f.offset / w.blockSize;
      this.wrote(w, first, blockCount(f.length, w.blockSize), (i) => zeroDigest(Math.min(w.blockSize, w.size - (first + i) * w.blockSize)));
      await w.sink!.writeZeroes(f.offset, f.length);
    } else if (f.type === 'digests' && w.patch) {
      const { count, changed } = w.patch;
      w.patch = undefined;
      if (f.first !== w.appended || f.digests.length !== changed.length * DIGEST_LEN) throw bad('a patch\'s digests do not match it');
      await this.appendPatched(w, count, changed, f.digests);
    } else if (f.type === 'digests') {
      if (f.first !== w.appended) throw bad('digests out of order');
      const n = f.digests.length / DIGEST_LEN;
      const claimed = w.changed ?? [];
      w.changed = undefined;
      if (claimed.some((b) => b < f.first || b >= f.first + n)) throw bad('changed blocks outside their digests');
      await this.append(w, Buffer.from(f.digests), await this.changedFromBase(w, f.digests));
    }
  }

  /** [offset, offset+length): whole blocks of the target (the last may end at its end), not empty. */
  private whole(w: Writing, offset: number, length: number): boolean {
    const end = offset + length;
    return length > 0 && offset % w.blockSize === 0 && end <= w.size && (end % w.blockSize === 0 || end === w.size);
  }

  /** Blocks [first, first+n) written, the i-th with digest(i): each kept until its manifest digest comes. */
  private wrote(w: Writing, first: number, n: number, digest: (i: number) => Buffer): void {
    if (first < w.appended) throw bad(`block ${first} written after its manifest digest`);
    if (w.written.size + n > MAX_WRITTEN_AHEAD) throw bad('too many blocks written ahead of their manifest digests');
    for (let i = 0; i < n; i++) {
      if (w.written.has(first + i)) throw bad(`block ${first + i} written twice`);
      w.written.set(first + i, Buffer.from(digest(i)));
    }
  }

  /**
   * The next digests of the new manifest, `changed` those that differ from
   * the base: every block written among them must be described by the
   * digest of what was written, and every block an interrupted run may have
   * written must have been written again. So the manifest never describes a
   * written block otherwise than as it was written.
   */
  private async append(w: Writing & { writer: StateWriter }, digests: Buffer, changed: number[]): Promise<void> {
    const n = digests.length / DIGEST_LEN;
    const total = blockCount(w.size, w.blockSize);
    if (w.appended + n > total) throw bad(`manifest digests past the target's ${total} blocks`);
    const { unknown, unknownFrom = Infinity } = w.suspect ?? {};
    for (let i = 0; i < n; i++) {
      const b = w.appended + i;
      const d = w.written.get(b);
      if (d) {
        if (!d.equals(digests.subarray(i * DIGEST_LEN, (i + 1) * DIGEST_LEN))) throw bad(`block ${b} is described by another digest than the one written`);
        w.written.delete(b);
      } else if (unknown?.has(b) || b >= unknownFrom) {
        throw bad(`block ${b}, which an interrupted run may have written, is described without being written again`);
      }
    }
    await w.writer.append(digests, changed);
    w.appended += n;
  }

  /** Which of the next digests differ from the base's (the manifest writer keeps only those when it patches the base). */
  private async changedFromBase(w: Writing, digests: Uint8Array): Promise<number[]> {
    const changed: number[] = [];
    if (!w.base) return changed;
    const n = Math.min(digests.length / DIGEST_LEN, blockCount(w.base.header.targetSize, w.blockSize) - w.appended);
    if (n <= 0) return changed;
    const old = Buffer.alloc(n * DIGEST_LEN);
    await w.base.readDigests(w.appended, n, old);
    for (let i = 0; i < n; i++) if (!old.subarray(i * DIGEST_LEN, (i + 1) * DIGEST_LEN).equals(digests.subarray(i * DIGEST_LEN, (i + 1) * DIGEST_LEN))) changed.push(w.appended + i);
    return changed;
  }

  /** Requests without an answer. */
  private readonly streamed: Record<string, (m: ControlMessage) => Promise<void>> = {
    't-record': async (m) => {
      await this.streaming().writer.record(blocksOf(m.blocks, 'the intent'));
    },
    't-truncate': async (m) => {
      const w = this.streaming();
      if (fieldInt(m, 'size') !== w.size) throw bad('a truncate to another size than begun');
      w.touched = true;
      await w.sink!.truncate(w.size);
    },
    // What differs from the base is worked out here (the client's `changed` is checked for shape only).
    't-append': async (m) => {
      this.announcing().changed = blocksOf(m.changed, 'changed blocks');
    },
    // The next `count` digests are the base's but for `changed` (ascending), whose new digests follow in a DIGESTS frame.
    't-patch': async (m) => {
      const w = this.announcing();
      const count = fieldInt(m, 'count', 1);
      const changed = blocksOf(m.changed, 'changed blocks');
      const end = w.appended + count;
      if (!w.base || end > Math.ceil(w.base.header.targetSize / w.base.header.blockSize)) throw bad('a patch past the base manifest');
      if (changed.some((b, i) => b < w.appended || b >= end || (i > 0 && b <= changed[i - 1]!))) throw bad('changed blocks outside their patch');
      if (changed.length) w.patch = { count, changed };
      else await this.appendPatched(w, count, [], Buffer.alloc(0));
    },
  };

  private readonly requests: Record<string, (m: ControlMessage) => Promise<void>> = {
    't-stat': async (m) => {
      const id = await this.target(m).identity();
      await this.ch.send({ op: 't-id', id: id && idToWire(id) });
    },
    't-assess': async (m) => {
      const name = this.keyOf(m);
      const blockSize = fieldInt(m, 'blockSize', 1);
      if (!isValidBlockSize(blockSize)) throw bad('a bad block size');
      const t = this.target(m);
      // The manifest being patched stays open until the write ends.
      if (this.w?.name === name) throw bad(`"t-assess" of ${JSON.stringify(name)} while it is written`);
      await this.manifests.get(name)?.close();
      this.manifests.delete(name);
      const { manifest, trust } = await t.state.assess(await t.identity(), { blockSize, strict: m.strict === true });
      // Kept for the names that have a manifest only (a base is one of them): as many as the targets on record.
      if (manifest) {
        this.manifests.set(name, manifest);
        this.verdicts.set(name, trust);
      } else this.verdicts.delete(name);
      await this.ch.send({
        op: 't-assessed',
        trust: { trusted: trust.trusted, reason: trust.reason, unknown: trust.unknown && [...trust.unknown], unknownFrom: trust.unknownFrom },
        manifest: manifest && {
          header: { ...manifest.header, sourceMtimeNs: String(manifest.header.sourceMtimeNs), targetMtimeNs: String(manifest.header.targetMtimeNs), targetIno: String(manifest.header.targetIno), targetDev: String(manifest.header.targetDev) },
          fingerprint: manifest.fingerprint.toString('hex'),
          checksum: manifest.checksum.toString('hex'),
        },
      });
    },
    't-digests': async (m) => {
      const mf = this.manifests.get(this.keyOf(m));
      if (!mf) throw bad('digests asked of a target with no manifest');
      const first = fieldInt(m, 'first');
      const count = fieldInt(m, 'count');
      const n = Math.ceil(mf.header.targetSize / mf.header.blockSize);
      if (first + count > n) throw bad('digests past the manifest');
      const buf = Buffer.alloc(Math.min(count, DIGESTS_PER_FRAME) * DIGEST_LEN);
      for (let b = first; b < first + count; b += DIGESTS_PER_FRAME) {
        const k = Math.min(DIGESTS_PER_FRAME, first + count - b);
        await mf.readDigests(b, k, buf);
        await this.ch.send(encodeDigests(b, buf.subarray(0, k * DIGEST_LEN)));
      }
      await this.ch.send({ op: 't-end' });
    },
    't-open': async (m) => {
      if (this.w) throw bad('a target opened while another is');
      const target = this.target(m);
      const created = m.create === true;
      this.w = { name: this.keyOf(m), target, data: await target.open(created), created, blockSize: 0, size: 0, appended: 0, written: new Map(), synced: false };
      await this.ch.send({ op: 't-opened' });
    },
    't-begin': async (m) => {
      const w = this.w;
      if (!w || w.writer) throw bad('"t-begin" without an open target');
      const blockSize = fieldInt(m, 'blockSize', 1);
      if (!isValidBlockSize(blockSize)) throw bad('a bad block size');
      if (this.keyOf(m) !== w.name) throw bad('"t-begin" of another target than the one open');
      let base: Manifest | undefined;
      if (m.base !== null && m.base !== undefined) {
        base = this.manifests.get(w.name);
        // The base must be the manifest this side judged, and trusted, of this block size: a client cannot name another.
        if (!base || base.checksum.toString('hex') !== fieldString(m, 'base')) throw bad('a base that is not the manifest on record');
        const trust = this.verdicts.get(w.name);
        if (!trust?.trusted || base.header.blockSize !== blockSize) throw bad('a base this side does not trust');
        w.suspect = { unknown: trust.unknown, unknownFrom: trust.unknownFrom };
      }
      w.writer = await w.target.state.begin({ blockSize, oldSize: fieldInt(m, 'oldSize'), newSize: fieldInt(m, 'newSize'), base });
      w.base = base;
      w.blockSize = blockSize;
      w.size = fieldInt(m, 'newSize');
      w.sink = w.data.sink;
      if (this.history) {
        // The history's member names the data as this side holds it: its size, and its manifest's fingerprint or a hash of it.
        const writer = w.writer;
        const oldSize = w.created ? 0 : Number((await w.target.identity())?.size ?? 0);
        const before = base?.fingerprint ?? (await this.hashed(w, blockSize));
        const info = { relPath: w.name, blockSize, oldSize, newSize: w.size, fingerprints: () => ({ before, after: writer.fingerprint }) };
        w.sink = await this.history(w.data.file ?? w.data.sink, info);
      }
      await this.ch.send({ op: 't-begun' });
    },
    // The data's fingerprint as it is before this write (a forward delta's base, --write-batch on the client).
    't-hash': async (m) => {
      const w = this.w;
      if (!w || this.keyOf(m) !== w.name || w.touched) throw bad('"t-hash" of no target open, or after its data was written');
      const blockSize = fieldInt(m, 'blockSize', 1);
      if (!isValidBlockSize(blockSize)) throw bad('a bad block size');
      await this.ch.send({ op: 't-hashed', fp: (await this.hashed(w, blockSize)).toString('hex') });
    },
    't-read': async (m) => {
      const w = this.w;
      if (!w) throw bad('"t-read" without an open target');
      const length = fieldInt(m, 'length');
      if (length > MAX_TARGET_READ) throw bad('a read over the limit');
      const buf = Buffer.alloc(length);
      const n = await w.data.reader.readAt(buf, fieldInt(m, 'offset'));
      await this.ch.send({ op: 't-read', n });
      if (n) await this.ch.send(encodeData(fieldInt(m, 'offset'), digestOf(buf.subarray(0, n)), buf.subarray(0, n)));
    },
    't-sync': async () => {
      const w = this.streaming();
      if (w.patch || w.changed) throw bad('"t-sync" before the digests announced');
      // The history's member is sealed here with the new manifest's fingerprint: every digest must have come.
      if (this.history && w.appended !== blockCount(w.size, w.blockSize)) throw bad('"t-sync" before every manifest digest came');
      w.synced = true;
      await w.sink!.commit();
      await this.ch.send({ op: 't-synced' });
    },
    't-finish': async () => {
      const w = this.writing();
      if (!w.synced) throw bad('"t-finish" before "t-sync"');
      w.id = await w.data.finish();
      await this.ch.send({ op: 't-finished', id: idToWire(w.id) });
    },
    't-commit': async (m) => {
      const w = this.writing();
      const src = m.source as Record<string, unknown> | undefined;
      if (typeof src !== 'object' || src === null || typeof src.mtimeNs !== 'string' || !/^-?\d{1,20}$/.test(src.mtimeNs)) throw bad('a malformed source');
      // The identity recorded is the one this side read once the data was in place, whatever the client believes.
      if (!w.id) throw bad('"t-commit" before "t-finish"');
      const total = blockCount(w.size, w.blockSize);
      if (w.appended !== total) throw bad(`"t-commit" with ${w.appended} of the manifest's ${total} digests`);
      const checksum = await w.writer.commit(w.id, { size: fieldInt(src, 'size'), mtimeNs: BigInt(src.mtimeNs) });
      await this.done(w);
      await this.ch.send({ op: 't-committed', checksum: checksum.toString('hex') });
    },
    't-abort': async () => {
      const w = this.w;
      if (w) {
        await w.writer?.abort();
        await this.done(w);
      }
      await this.ch.send({ op: 't-aborted' });
    },
    't-note-get': async (m) => {
      await this.ch.send({ op: 't-note', note: (await this.target(m).readNote()) ?? null });
    },
    't-note-put': async (m) => {
      await this.target(m).writeNote(noteFromWire(m.note));
      await this.ch.send({ op: 't-ok' });
    },
    't-note-drop': async (m) => {
      await this.target(m).dropNote();
      await this.ch.send({ op: 't-ok' });
    },
  };

  /** The base's digests of the next `count` blocks, `changed` ones replaced by `digests` (in order), appended a frame's worth at a time. */
  private async appendPatched(w: Writing & { writer: StateWriter }, count: number, changed: number[], digests: Buffer): Promise<void> {
    const buf = Buffer.alloc(Math.min(count, DIGESTS_PER_FRAME) * DIGEST_LEN);
    let k = 0;
    for (let left = count; left > 0; ) {
      const first = w.appended;
      const n = Math.min(left, DIGESTS_PER_FRAME);
      const part = buf.subarray(0, n * DIGEST_LEN);
      await w.base!.readDigests(first, n, part);
      const mine: number[] = [];
      for (; k < changed.length && changed[k]! < first + n; k++) {
        digests.copy(part, (changed[k]! - first) * DIGEST_LEN, k * DIGEST_LEN, (k + 1) * DIGEST_LEN);
        mine.push(changed[k]!);
      }
      await this.append(w, part, mine);
      left -= n;
    }
  }

  private async done(w: Writing): Promise<void> {
    this.w = undefined;
    try {
      await w.sink?.close();
    } finally {
      await w.data.close();
    }
  }

  /** The data's fingerprint as it is now, hashed once per write (a new target: the empty one). */
  private hashed(w: Writing, blockSize: number): Promise<Buffer> {
    if (w.created) return Promise.resolve(emptyFingerprint(blockSize));
    if (w.hashed?.blockSize !== blockSize) {
      const fp = (async () => {
        const file = w.data.file;
        if (!file) throw new QsyncError('UNSUPPORTED', `${w.target.shown} cannot be hashed here`);
        return hashFile(file.fh, Number((await file.fh.stat()).size), blockSize);
      })();
      w.hashed = { blockSize, fp };
    }
    return w.hashed.fp;
  }
}
