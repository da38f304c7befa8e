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
import { mkdir, open, readdir, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { DeltaCompression, DeltaKind } from '../core/delta-codec.js';
import { blockCount, blockLength } from '../core/geometry.js';
import { DeltaDecoder } from '../core/delta-decoder.js';
import { DeltaFileWriter } from '../io/delta-file.js';
import type { LocalFileSink } from '../io/local-file.js';
import type { BlockSink } from '../io/types.js';
import { historyFileName } from './delta-history.js';

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
 * This run's reverse-delta file in DIR, named by `startedMs`. Salvages what a
 * crashed earlier run left: its complete members are kept as a point.
 */
export async function openHistory(dir: string, startedMs: number, compression: DeltaCompression): Promise<DeltaFileWriter> {
  await mkdir(dir, { recursive: true });
  await salvageHistory(dir);
  return DeltaFileWriter.create(join(dir, historyFileName(startedMs)), compression, startedMs);
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
class ForwardRecorder {
  private grown = false;

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
    close: async () => undefined,
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
    close: () => target.close(),
  };
}

/**
 * --backup-dir: before a block of the target is first overwritten (or cut by
 * a shrink), its old content is recorded; the record reaches the kernel
 * before the target write is issued, and the member is fsynced before the
 * target's commit. A bitmap (one bit per old block) remembers what is recorded.
 */
export function reverseDeltaSink(target: LocalFileSink, history: DeltaFileWriter, info: DeltaSinkInfo): BlockSink {
  const { blockSize, oldSize } = info;
  const oldBlocks = blockCount(oldSize, blockSize);
  const recorded = new Uint8Array(Math.ceil(oldBlocks / 8));
  const buf = Buffer.alloc(blockSize);
  history.beginMember(member('reverse', info, info.newSize, oldSize));

  async function keepOld(from: number, to: number): Promise<void> {
    let added = false;
    for (let i = from; i < Math.min(to, oldBlocks); i++) {
      if (recorded[i >> 3] & (1 << (i & 7))) continue;
      const len = blockLength(i, oldSize, blockSize);
      const got = await target.fh.read(buf, 0, len, i * blockSize);
      if (got.bytesRead !== len) throw new Error(`short read of ${target.path} block ${i} while keeping its old content`);
      await history.addBlock(i, buf.subarray(0, len));
      recorded[i >> 3] |= 1 << (i & 7);
      added = true;
    }
    if (added) await history.push();
  }

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
      await history.endMember({ baseFingerprint: after, resultFingerprint: before });
      await history.sync();
      await target.commit();
    },
    close: () => target.close(),
  };
}

/**
 * A crashed run leaves its reverse-delta temp file in DIR: keep the members
 * that were complete (their targets' old blocks), drop the torn rest.
 */
export async function salvageHistory(dir: string): Promise<void> {
  for (const name of await readdir(dir)) {
    const m = /^\.(.+\.qdelta)\.[0-9a-f]+\.tmp$/.exec(name);
    if (!m) continue;
    const tmp = join(dir, name);
    const end = await completePrefix(tmp);
    if (end === 0) await rm(tmp, { force: true });
    else {
      const fh = await open(tmp, 'r+');
      await fh.truncate(end);
      await fh.sync();
      await fh.close();
      await rename(tmp, join(dir, m[1]));
    }
  }
}

/** Length of the longest prefix of `path` made of complete, valid members. */
async function completePrefix(path: string): Promise<number> {
  let end = 0;
  // Inside the handler, d.offset is just past the frame being reported.
  const d = new DeltaDecoder({ header: () => undefined, record: () => undefined, trailer: () => void (end = d.offset) });
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(1 << 20);
    for (let pos = 0; ; ) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
      if (bytesRead === 0) break;
      pos += bytesRead;
      d.write(buf.subarray(0, bytesRead)); // the handlers keep nothing; the decoder copies what it holds
    }
  } catch {
    // The torn tail: everything up to the last trailer stays.
  } finally {
    await fh.close();
  }
  return end;
}
