/**
 * BlockSink wrappers that record deltas while the engine writes:
 * - forwardDeltaSink: records only, the target is not touched (--only-write-batch);
 * - teeDeltaSink: the target and the records (--write-batch);
 * - reverseDeltaSink: before each write, the target's old block goes into a
 *   reverse delta (--backup-dir), which is durable before the target is.
 * Each file of a run is one member of the run's delta file; `openBatch` /
 * `openHistory` open that file, `DeltaFileWriter.finish` (or `abort`) ends it.
 * Deltas describe "resize the base to the result's size, then write these
 * blocks", the order the engine follows (truncate first, then writes).
 */
import { join, sep } from 'node:path';
import type { DeltaCompression, DeltaHeader, DeltaKind } from '../core/delta-codec.js';
import { errnoOf, QsyncError } from '../core/errors.js';
import { blockCount, blockLength } from '../core/geometry.js';
import { DIGEST_LEN, digestOf } from '../hash/blake3.js';
import { DeltaFileWriter, openDelta, readDeltaFile } from '../io/delta-file.js';
import { readUpTo, type LocalFileSink } from '../io/local-file.js';
import type { Dir } from '../io/safe-fs.js';
import type { BlockSink } from '../io/types.js';
import { historyFileName } from './delta-history.js';
import { manifestPathFor, openManifest, type Manifest } from './manifest-store.js';

export interface DeltaSinkInfo {
  /** The file's path relative to the destination root (the member's name). */
  relPath: string;
  blockSize: number;
  /** Target size before the run (0 when it did not exist). */
  oldSize: number;
  /** Target size after the run (the source's size). */
  newSize: number;
  /**
   * Manifest fingerprints of the target before and after the run; zeros when
   * unknown. Called once by commit(), after the last write.
   */
  fingerprints(): { before: Buffer; after: Buffer };
}

/** The delta file of --write-batch / --only-write-batch. */
export const openBatch = (path: string, compression: DeltaCompression, startedMs?: number): Promise<DeltaFileWriter> =>
  DeltaFileWriter.create(path, compression, startedMs);

/**
 * This run's reverse-delta file in DIR (held open as `d`: the writer
 * reaches it through `d`, which must stay open until it is finished), named by `startedMs`. Salvages what a
 * crashed earlier run left: its complete members are kept as a point.
 */
export async function openHistory(d: Dir, dir: string, startedMs: number, compression: DeltaCompression): Promise<DeltaFileWriter> {
  await salvageHistory(d, dir);
  const name = historyFileName(startedMs);
  return DeltaFileWriter.create(d.at(name), compression, startedMs, join(dir, name));
}

/** Block indices covered by [offset, offset+length). */
function* blocksOf(offset: number, length: number, blockSize: number): Generator<number> {
  for (let i = Math.floor(offset / blockSize); i * blockSize < offset + length; i++) yield i;
}

/**
 * Records the new content of every block written: one member of a forward
 * delta. A file that grows gets a zero record for each block past its old
 * end first (the engine writes none there): a delta's result is never larger
 * than its base and its records (checkResultSize), and apply keeps them holes.
 */
export class ForwardRecorder {
  private grown = false;
  private ended = false;

  constructor(
    private readonly w: DeltaFileWriter,
    private readonly info: DeltaSinkInfo,
  ) {
    w.beginMember(member('forward', info, info.oldSize, info.newSize));
  }

  private async grow(): Promise<void> {
    if (this.grown) return;
    this.grown = true;
    const { blockSize, oldSize, newSize } = this.info;
    for (let i = blockCount(oldSize, blockSize); i < blockCount(newSize, blockSize); i++) await this.w.addZero(i);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    await this.grow();
    const { blockSize } = this.info;
    for (const i of blocksOf(offset, data.length, blockSize)) {
      const start = i * blockSize - offset;
      await this.w.addBlock(i, data.subarray(start, start + blockLength(i, this.info.newSize, blockSize)));
    }
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    await this.grow();
    for (const i of blocksOf(offset, length, this.info.blockSize)) await this.w.addZero(i);
  }

  async end(): Promise<void> {
    await this.grow();
    const { before, after } = this.info.fingerprints();
    await this.w.endMember({ baseFingerprint: before, resultFingerprint: after });
    this.ended = true;
  }

  /** A file that failed before its end: its member goes (a batch with a failed file is dropped anyway). */
  async drop(): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    await this.w.dropMember();
  }
}

function member(kind: DeltaKind, info: DeltaSinkInfo, baseSize: number, resultSize: number) {
  return { kind, blockSize: info.blockSize, baseSize, resultSize, name: info.relPath };
}

/** --only-write-batch: the engine's writes become records; the target is left alone. */
export function forwardDeltaSink(batch: DeltaFileWriter, info: DeltaSinkInfo): BlockSink {
  const rec = new ForwardRecorder(batch, info);
  return {
    write: (offset, data) => rec.write(offset, data),
    writeZeroes: (offset, length) => rec.writeZeroes(offset, length),
    truncate: async () => undefined, // the member's sizes carry the resize
    commit: () => rec.end(),
    close: () => rec.drop(),
  };
}

/** --write-batch: the target is updated and the same writes are recorded. */
export function teeDeltaSink(target: BlockSink, batch: DeltaFileWriter, info: DeltaSinkInfo): BlockSink {
  const rec = new ForwardRecorder(batch, info);
  return {
    write: async (offset, data) => {
      await rec.write(offset, data);
      await target.write(offset, data);
    },
    writeZeroes: async (offset, length) => {
      await rec.writeZeroes(offset, length);
      await target.writeZeroes(offset, length);
    },
    truncate: (size) => target.truncate(size),
    commit: async () => {
      await target.commit();
      await rec.end();
    },
    close: async () => {
      await rec.drop();
      await target.close();
    },
  };
}

/**
 * --backup-dir: before a block of the target is first overwritten (or cut by
 * a shrink), its old content is recorded; the record reaches the kernel
 * before the target write is issued, and the member is fsynced before the
 * target's commit. A bitmap (one bit per old block) remembers what is recorded.
 *
 * The member names its result (the state before the run) only when it can
 * vouch for it. A run that trusts the target's manifest takes the state
 * before as the manifest's view; each old block is checked against the
 * manifest's digest as it is recorded. A block that differs (a run killed
 * while writing left it half-new) makes the member's result unknown: its
 * records then restore the target as it was, and the older point is reached
 * through the interrupted run's own member (salvageHistory), which holds the
 * blocks' true old content. The member's header is on file, with what is
 * known so far, before the first target write.
 */
export async function reverseDeltaSink(target: LocalFileSink, history: DeltaFileWriter, info: DeltaSinkInfo): Promise<BlockSink> {
  const { blockSize, oldSize } = info;
  const oldBlocks = blockCount(oldSize, blockSize);
  const recorded = new Uint8Array(Math.ceil(oldBlocks / 8));
  const buf = Buffer.alloc(blockSize);
  const view = await manifestView(target.path, info);
  let vouch = view !== undefined && view.header.targetSize === oldSize;
  history.beginMember(member('reverse', info, info.newSize, oldSize), vouch ? { resultFingerprint: view!.fingerprint } : undefined);
  await history.push();
  const want = Buffer.alloc(DIGEST_LEN);

  async function keepOld(from: number, to: number): Promise<void> {
    let added = false;
    for (let i = from; i < Math.min(to, oldBlocks); i++) {
      if (recorded[i >> 3] & (1 << (i & 7))) continue;
      const len = blockLength(i, oldSize, blockSize);
      if ((await readUpTo(target.fh, buf.subarray(0, len), i * blockSize)) !== len) {
        throw new QsyncError('TARGET', `short read of ${target.path} block ${i} while keeping its old content`, { file: target.path, block: i });
      }
      const digest = digestOf(buf.subarray(0, len));
      if (vouch) {
        await view!.readDigests(i, 1, want);
        if (!want.equals(digest)) {
          vouch = false;
          await history.setProvisional({ resultFingerprint: Buffer.alloc(DIGEST_LEN) });
        }
      }
      await history.addBlock(i, buf.subarray(0, len), digest);
      recorded[i >> 3] |= 1 << (i & 7);
      added = true;
    }
    if (added) await history.push();
  }

  let ended = false;
  const span = (offset: number, length: number): [number, number] => [Math.floor(offset / blockSize), Math.ceil((offset + length) / blockSize)];
  let size = oldSize;
  return {
    write: async (offset, data) => {
      await keepOld(...span(offset, data.length));
      await target.write(offset, data);
    },
    writeZeroes: async (offset, length) => {
      await keepOld(...span(offset, length));
      await target.writeZeroes(offset, length);
    },
    truncate: async (newSize) => {
      if (newSize < size) await keepOld(Math.floor(newSize / blockSize), oldBlocks);
      size = newSize;
      await target.truncate(newSize);
    },
    commit: async () => {
      const { before, after } = info.fingerprints();
      // With the manifest's view, `before` is the manifest's fingerprint: claimed only if every old block matched it.
      const claim = view && before.equals(view.fingerprint) && !vouch ? Buffer.alloc(DIGEST_LEN) : before;
      await history.endMember({ baseFingerprint: after, resultFingerprint: claim });
      ended = true;
      await history.sync();
      await target.commit();
    },
    close: async () => {
      try {
        // A file that failed part way: its records are the old content of every block it wrote, kept as a crash's are.
        if (!ended) await history.endTorn();
        ended = true;
      } finally {
        await view?.close();
        await target.close();
      }
    },
  };
}

/**
 * The target's manifest when the run takes it as the state before (its
 * fingerprint is the run's `before`): the manifest of the file
 * DEST/REL, where the engine keeps it. Undefined otherwise (a run that
 * hashes the target computes `before` from what it reads).
 */
async function manifestView(targetPath: string, info: DeltaSinkInfo): Promise<Manifest | undefined> {
  const rel = info.relPath;
  if (!rel || !targetPath.endsWith(`${sep}${rel}`)) return undefined;
  const m = await openManifest(manifestPathFor(targetPath.slice(0, -rel.length - 1) || sep, rel)).catch(() => undefined);
  if (m && m.header.blockSize === info.blockSize && m.fingerprint.equals(info.fingerprints().before)) return m;
  await m?.close();
  return undefined;
}

/**
 * A crashed run leaves its reverse-delta temp file in DIR. Its complete
 * members are kept; the member it was writing is finished as it stands (its
 * header was written first, each record before the target write it
 * preceded): it names no base (the target was left half-written), and names
 * its result only if the run could vouch for it. The file becomes the
 * crashed run's point; the link checks of restore take it from there.
 */
export async function salvageHistory(d: Dir, dir: string): Promise<void> {
  for (const name of await d.readdir()) {
    const m = /^\.(.+\.qdelta)\.[0-9a-f]+\.tmp$/.exec(name);
    if (!m) continue;
    await rewriteSalvaged(d, dir, name, m[1]);
    await d.unlink(name).catch((e) => {
      if (errnoOf(e) !== 'ENOENT') throw e;
    });
    await d.sync();
  }
}

async function rewriteSalvaged(d: Dir, dir: string, tmpName: string, destName: string): Promise<void> {
  const tmp = join(dir, tmpName);
  const fh = await openDelta(d.at(tmpName), tmp).catch(() => undefined);
  if (!fh) return;
  let w: DeltaFileWriter | undefined;
  let open: DeltaHeader | undefined;
  try {
    for await (const ev of readDeltaFile(fh, tmp, { tolerant: true })) {
      if (ev.type === 'header') {
        w ??= await DeltaFileWriter.create(d.at(destName), ev.header.compression, ev.header.createdMs, join(dir, destName));
        if (w.compression !== ev.header.compression) break;
        open = ev.header;
        w.beginMember(ev.header, ev.header);
      } else if (ev.type === 'record') {
        if (ev.content) await w!.addBlock(ev.record.index, ev.content, ev.record.digest);
        else await w!.addZero(ev.record.index);
      } else {
        await w!.endMember(ev.header);
        open = undefined;
      }
    }
    // The torn member: its base is whatever the crash left, of either size (the crash may have come before or after the resize);
    // the larger one keeps it a well-formed delta (a result no larger than base + records).
    if (open) {
      const baseSize = Math.max(open.baseSize, open.resultSize);
      await w!.endMember({ baseFingerprint: Buffer.alloc(DIGEST_LEN), resultFingerprint: open.resultFingerprint, baseSize });
    }
    await w?.finish();
  } catch (e) {
    await w?.abort();
    throw e;
  } finally {
    await fh.close();
  }
}
