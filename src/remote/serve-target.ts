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
import { QsyncError } from '../core/errors.js';
import { isValidBlockSize } from '../core/geometry.js';
import { encodeData, encodeDigests, protocolError, type ControlMessage, type WireFrame } from '../core/wire.js';
import { DIGEST_LEN, digestOf, hashBlocksInto } from '../hash/blake3.js';
import { MAX_INTENT_BLOCKS } from '../sync/intent.js';
import type { LocalDestination } from '../sync/local-target.js';
import type { Manifest } from '../sync/manifest-store.js';
import type { OpenData, StateWriter, Target, TargetIdentity, TargetNote } from '../sync/target.js';
import { errorMessage, type Channel } from './channel.js';

/** Digests per DIGESTS frame (1 MiB). */
const DIGESTS_PER_FRAME = 32768;
/** Longest read a client may ask for at once. */
export const MAX_TARGET_READ = 4 << 20;

const bad = protocolError;

function int(m: Record<string, unknown>, k: string, min = 0): number {
  const v = m[k];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) throw bad(`"${k}" is not an integer ≥ ${min}`);
  return v;
}

function str(m: Record<string, unknown>, k: string): string {
  const v = m[k];
  if (typeof v !== 'string') throw bad(`"${String(m.op)}" needs a string "${k}"`);
  return v;
}

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
  target: Target;
  data: OpenData;
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
  /** The data's identity once in place ("t-finish"): what the manifest records. */
  id?: TargetIdentity;
}

export class TargetServer {
  /** Each target's manifest as the client's last assess saw it (its base, and where its digests come from). */
  private readonly manifests = new Map<string, Manifest>();
  private w?: Writing;

  constructor(
    private readonly ch: Channel,
    private readonly dest: LocalDestination,
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
        const h = this.streamed[m.op];
        if (h) {
          await h(m);
          continue;
        }
        const r = this.requests[m.op];
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
      await this.w?.data.close();
      for (const m of this.manifests.values()) await m.close().catch(() => {});
    }
  }

  private target(m: ControlMessage): Target {
    const name = str(m, 'name');
    if (!name || name === '.' || name === '..' || name.includes('/') || name.includes('\0')) throw bad(`${JSON.stringify(name)} is not a name in the destination`);
    return this.dest.target(name);
  }

  private writing(): Writing & { writer: StateWriter } {
    if (!this.w?.writer) throw bad('blocks sent before "t-begin"');
    return this.w as Writing & { writer: StateWriter };
  }

  /** A block stream frame: checked against its digests, then written. */
  private async frame(f: WireFrame): Promise<void> {
    const w = this.writing();
    if (f.type === 'data') {
      if (f.compressed) throw bad('compressed blocks are not taken here');
      const n = f.digests.length / DIGEST_LEN;
      if (f.offset % w.blockSize !== 0 || f.offset + f.data.length > w.size || Math.ceil(f.data.length / w.blockSize) !== n) throw bad('blocks outside the target');
      const got = Buffer.alloc(f.digests.length);
      hashBlocksInto(f.data, w.blockSize, got);
      if (!got.equals(f.digests)) throw bad(`blocks at ${f.offset} do not match their digests`);
      await w.data.sink.write(f.offset, f.data);
    } else if (f.type === 'zero') {
      if (f.offset + f.length > w.size) throw bad('zeros outside the target');
      await w.data.sink.writeZeroes(f.offset, f.length);
    } else if (f.type === 'digests' && w.patch) {
      const { count, changed } = w.patch;
      w.patch = undefined;
      if (f.first !== w.appended || f.digests.length !== changed.length * DIGEST_LEN) throw bad('a patch\'s digests do not match it');
      await this.appendPatched(w, count, changed, f.digests);
    } else if (f.type === 'digests') {
      if (f.first !== w.appended) throw bad('digests out of order');
      const n = f.digests.length / DIGEST_LEN;
      const changed = w.changed ?? [];
      w.changed = undefined;
      if (changed.some((b) => b < f.first || b >= f.first + n)) throw bad('changed blocks outside their digests');
      await w.writer.append(f.digests, changed);
      w.appended += n;
    }
  }

  /** Requests without an answer. */
  private readonly streamed: Record<string, (m: ControlMessage) => Promise<void>> = {
    't-record': async (m) => {
      await this.writing().writer.record(blocksOf(m.blocks, 'the intent'));
    },
    't-truncate': async (m) => {
      const w = this.writing();
      if (int(m, 'size') !== w.size) throw bad('a truncate to another size than begun');
      await w.data.sink.truncate(w.size);
    },
    't-append': async (m) => {
      this.writing().changed = blocksOf(m.changed, 'changed blocks');
    },
    // The next `count` digests are the base's but for `changed` (ascending), whose new digests follow in a DIGESTS frame.
    't-patch': async (m) => {
      const w = this.writing();
      const count = int(m, 'count', 1);
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
      const name = str(m, 'name');
      const blockSize = int(m, 'blockSize', 1);
      if (!isValidBlockSize(blockSize)) throw bad('a bad block size');
      const t = this.target(m);
      await this.manifests.get(name)?.close();
      this.manifests.delete(name);
      const { manifest, trust } = await t.state.assess(await t.identity(), { blockSize, strict: m.strict === true });
      if (manifest) this.manifests.set(name, manifest);
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
      const mf = this.manifests.get(str(m, 'name'));
      if (!mf) throw bad('digests asked of a target with no manifest');
      const first = int(m, 'first');
      const count = int(m, 'count');
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
      this.w = { target, data: await target.open(m.create === true), blockSize: 0, size: 0, appended: 0 };
      await this.ch.send({ op: 't-opened' });
    },
    't-begin': async (m) => {
      const w = this.w;
      if (!w || w.writer) throw bad('"t-begin" without an open target');
      const blockSize = int(m, 'blockSize', 1);
      if (!isValidBlockSize(blockSize)) throw bad('a bad block size');
      let base: Manifest | undefined;
      if (m.base !== null && m.base !== undefined) {
        base = this.manifests.get(str(m, 'name'));
        // The base must be the manifest this side judged: a client cannot name another.
        if (!base || base.checksum.toString('hex') !== str(m, 'base')) throw bad('a base that is not the manifest on record');
      }
      w.writer = await w.target.state.begin({ blockSize, oldSize: int(m, 'oldSize'), newSize: int(m, 'newSize'), base });
      w.base = base;
      w.blockSize = blockSize;
      w.size = int(m, 'newSize');
      await this.ch.send({ op: 't-begun' });
    },
    't-read': async (m) => {
      const w = this.w;
      if (!w) throw bad('"t-read" without an open target');
      const length = int(m, 'length');
      if (length > MAX_TARGET_READ) throw bad('a read over the limit');
      const buf = Buffer.alloc(length);
      const n = await w.data.reader.readAt(buf, int(m, 'offset'));
      await this.ch.send({ op: 't-read', n });
      if (n) await this.ch.send(encodeData(int(m, 'offset'), digestOf(buf.subarray(0, n)), buf.subarray(0, n)));
    },
    't-sync': async () => {
      await this.writing().data.sink.commit();
      await this.ch.send({ op: 't-synced' });
    },
    't-finish': async () => {
      const w = this.writing();
      w.id = await w.data.finish();
      await this.ch.send({ op: 't-finished', id: idToWire(w.id) });
    },
    't-commit': async (m) => {
      const w = this.writing();
      const src = m.source as Record<string, unknown> | undefined;
      if (typeof src !== 'object' || src === null || typeof src.mtimeNs !== 'string' || !/^-?\d{1,20}$/.test(src.mtimeNs)) throw bad('a malformed source');
      // The identity recorded is the one this side read once the data was in place, whatever the client believes.
      if (!w.id) throw bad('"t-commit" before "t-finish"');
      const checksum = await w.writer.commit(w.id, { size: int(src, 'size'), mtimeNs: BigInt(src.mtimeNs) });
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

  /** The base's digests of the next `count` blocks, `changed` ones replaced by `digests` (in order), appended. */
  private async appendPatched(w: Writing & { writer: StateWriter }, count: number, changed: number[], digests: Buffer): Promise<void> {
    const buf = Buffer.alloc(count * DIGEST_LEN);
    await w.base!.readDigests(w.appended, count, buf);
    changed.forEach((b, i) => digests.copy(buf, (b - w.appended) * DIGEST_LEN, i * DIGEST_LEN, (i + 1) * DIGEST_LEN));
    await w.writer.append(buf, changed);
    w.appended += count;
  }

  private async done(w: Writing): Promise<void> {
    this.w = undefined;
    await w.data.close();
  }
}
