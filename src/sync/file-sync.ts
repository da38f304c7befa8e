/**
 * Brings one regular file up to date, the cheapest way that is safe
 * (DESIGN.md "costs, best first"): quick check → trusted manifest → compare
 * → new copy. Data flows one way: the hash pool reads and hashes the source
 * (and, in compare mode, the target), the planner below picks the changed
 * blocks, the sink writes them, and the manifest is committed last.
 */
import type { BigIntStats } from 'node:fs';
import { rm, stat, utimes } from 'node:fs/promises';
import { QsyncError } from '../core/errors.js';
import { blockCount } from '../core/geometry.js';
import { DIGEST_LEN, zeroDigest } from '../hash/blake3.js';
import type { HashPool, ScannedChunk } from '../hash/pool.js';
import { LocalFileSink } from '../io/local-file.js';
import type { BlockSink } from '../io/types.js';
import type { SyncHooks, SyncMethod } from './events.js';
import { IntentWriter, intentPathFor, readIntent, removeIntent } from './intent.js';
import { ManifestWriter, openManifest, type Manifest } from './manifest-store.js';
import { assessManifest, type Trust } from './trust.js';
import { isLockedByOther } from './qemu-locks.js';
import { open } from 'node:fs/promises';

export interface FileSyncOptions {
  blockSize: number;
  checksum: boolean;
  sizeOnly: boolean;
  wholeFile: boolean;
  sparse: boolean;
  dryRun: boolean;
  preserveTimes: boolean;
  update: boolean;
  existing: boolean;
  ignoreExisting: boolean;
}

export interface SinkInfo {
  relPath: string;
  target: string;
  method: SyncMethod;
  baseManifest?: Manifest;
  sourceSize: number;
}

export interface FileSyncContext {
  pool: HashPool;
  hooks: SyncHooks;
  /** Wrap the target's sink (deltas: tee, reverse delta). */
  wrapSink?: (target: LocalFileSink, info: SinkInfo) => Promise<BlockSink>;
}

export interface FileSyncResult {
  method: SyncMethod;
  /** Content was (or, with -n, would be) written. */
  transferred: boolean;
  created: boolean;
  scanned: number;
  literal: number;
  matched: number;
}

const skipped = (method: SyncMethod): FileSyncResult => ({ method, transferred: false, created: false, scanned: 0, literal: 0, matched: 0 });

/** rsync's quick check when there is no usable manifest: same size and mtime. */
const sameSizeAndTime = (a: BigIntStats, b: BigIntStats) => a.size === b.size && a.mtimeNs / 1000n === b.mtimeNs / 1000n;

export async function syncFile(
  src: string,
  srcStat: BigIntStats,
  dst: string,
  dstStat: BigIntStats | undefined,
  manifestPath: string,
  relPath: string,
  opts: FileSyncOptions,
  ctx: FileSyncContext,
): Promise<FileSyncResult | undefined> {
  if (dstStat && !dstStat.isFile()) {
    throw new QsyncError('TARGET', `cannot overwrite ${dstStat.isDirectory() ? 'directory' : 'non-regular file'} ${dst} with a file`, { file: dst });
  }
  if (!dstStat && opts.existing) return undefined;
  if (dstStat && opts.ignoreExisting) return undefined;
  if (dstStat && opts.update && dstStat.mtimeNs > srcStat.mtimeNs) return undefined;

  const intentPath = intentPathFor(manifestPath);
  let manifest: Manifest | undefined;
  let trust: Trust = { trusted: false };
  if (dstStat) {
    try {
      manifest = await openManifest(manifestPath);
    } catch (e) {
      if (!(e instanceof QsyncError) || e.code !== 'FORMAT') throw e;
      ctx.hooks.notice?.(`${e.message}; comparing source and target instead`, relPath);
    }
    trust = assessManifest(manifest, await readIntent(intentPath), dstStat, opts.blockSize);
    if (trust.reason) ctx.hooks.notice?.(`${trust.reason}${trust.trusted ? '' : '; comparing source and target'}`, relPath);
  }

  try {
    const size = Number(srcStat.size);
    if (dstStat && !opts.checksum && !opts.wholeFile) {
      const h = manifest?.header;
      if (trust.trusted && !trust.unknown && h!.sourceSize === size && h!.sourceMtimeNs === srcStat.mtimeNs) return skipped('quick');
      if (opts.sizeOnly ? dstStat.size === srcStat.size : !trust.trusted && sameSizeAndTime(dstStat, srcStat)) return skipped('quick');
    }
    const method: SyncMethod = !dstStat ? 'new' : opts.wholeFile ? 'whole' : trust.trusted ? 'manifest' : 'compare';
    if (opts.dryRun) return { ...skipped(method), transferred: true, created: !dstStat };

    if (await isLockedByOther(Number(srcStat.dev), srcStat.ino)) {
      throw new QsyncError('LOCKED', `${src} is open in a running QEMU (it holds a lock on it): a byte copy would be inconsistent`, {
        file: src,
        hint: 'back it up in image mode: qsync --qmp /path/to/qmp.sock DEST',
      });
    }
    return await transfer(src, srcStat, dst, dstStat, manifestPath, relPath, method, manifest, trust, opts, ctx);
  } finally {
    await manifest?.close();
  }
}

async function transfer(
  src: string,
  srcStat: BigIntStats,
  dst: string,
  dstStat: BigIntStats | undefined,
  manifestPath: string,
  relPath: string,
  method: SyncMethod,
  manifest: Manifest | undefined,
  trust: Trust,
  opts: FileSyncOptions,
  ctx: FileSyncContext,
): Promise<FileSyncResult> {
  const { blockSize } = opts;
  const size = Number(srcStat.size);
  const oldSize = dstStat ? Number(dstStat.size) : 0;
  const srcFh = await open(src, 'r').catch((e) => {
    throw new QsyncError('SOURCE', `cannot read ${src}: ${(e as Error).message}`, { file: src }, { cause: e });
  });
  let target: LocalFileSink;
  try {
    target = await LocalFileSink.open(dst, !dstStat);
  } catch (e) {
    await srcFh.close();
    throw new QsyncError('TARGET', `cannot write ${dst}: ${(e as Error).message}`, { file: dst, hint: 'check the permissions of the destination' }, { cause: e });
  }
  const intentPath = intentPathFor(manifestPath);
  // A manifest that is not used for this run must not survive it: it would describe the old target.
  if (!trust.trusted) await rm(manifestPath, { force: true });
  const intent = trust.trusted ? await IntentWriter.create(intentPath, manifest!.checksum, oldSize, size) : undefined;
  const writer = await ManifestWriter.create(manifestPath, blockSize, size);
  const sink = ctx.wrapSink ? await ctx.wrapSink(target, { relPath, target: dst, method, baseManifest: trust.trusted ? manifest : undefined, sourceSize: size }) : target;
  const result: FileSyncResult = { method, transferred: true, created: !dstStat, scanned: 0, literal: 0, matched: 0 };
  const oldDigests = Buffer.alloc((ctx.pool.chunkSize / blockSize) * DIGEST_LEN);
  const oldBlocks = blockCount(oldSize, blockSize);
  // Blocks at or past the old end read as zero after the resize below.
  const zeroFrom = method === 'new' ? 0 : oldBlocks;

  try {
    ctx.hooks.fileStart?.(relPath, size, method);
    if (size !== oldSize) await sink.truncate(size);
    await ctx.pool.scan({ fd: srcFh.fd, size, targetFd: method === 'compare' ? target.fh.fd : undefined, targetSize: oldSize, path: src }, async (c: ScannedChunk) => {
      const first = c.offset / blockSize;
      const n = c.digests.length / DIGEST_LEN;
      if (method === 'manifest') await manifest!.readDigests(first, n, oldDigests);
      const changed: number[] = [];
      const isZero: boolean[] = [];
      for (let i = 0; i < n; i++) {
        const b = first + i;
        const len = Math.min(blockSize, size - b * blockSize);
        const d = c.digests.subarray(i * DIGEST_LEN, (i + 1) * DIGEST_LEN);
        const zero = zeroDigest(len).equals(d);
        let differs: boolean;
        if (method === 'manifest') {
          differs = b >= oldBlocks || trust.unknown?.has(b) === true || b >= (trust.unknownFrom ?? Infinity) || !oldDigests.subarray(i * DIGEST_LEN, (i + 1) * DIGEST_LEN).equals(d);
        } else if (method === 'compare') {
          differs = c.differs![i] === 1;
        } else differs = true;
        // A zero block where the target already reads as zero needs no write (-S keeps it a hole).
        if (differs && zero && b >= zeroFrom && (opts.sparse || method !== 'new')) differs = false;
        if (differs) {
          changed.push(b);
          isZero.push(zero);
        }
      }
      await intent?.add(changed);
      for (let i = 0; i < changed.length; ) {
        let j = i + 1;
        while (j < changed.length && changed[j] === changed[j - 1] + 1 && isZero[j] === isZero[i]) j++;
        const off = changed[i] * blockSize;
        const end = Math.min(size, changed[j - 1] * blockSize + blockSize);
        if (isZero[i] && opts.sparse) await sink.writeZeroes(off, end - off);
        else await sink.write(off, c.data.subarray(off - c.offset, end - c.offset));
        result.literal += end - off;
        i = j;
      }
      await writer.append(c.digests);
      result.scanned += c.data.length;
      ctx.hooks.fileProgress?.(relPath, result.scanned, result.literal);
    });
    await sink.commit();
  } catch (e) {
    await writer.abort();
    await intent?.close();
    await sink.close().catch(() => {});
    await srcFh.close();
    throw e;
  }
  await sink.close();
  await srcFh.close();
  await intent?.close();
  if (opts.preserveTimes) await utimes(dst, nsToSeconds(srcStat.atimeNs), nsToSeconds(srcStat.mtimeNs));
  const t = await stat(dst, { bigint: true });
  // The source's stat from before the read: if it changed while read, the next quick check sees it.
  await writer.commit({ sourceSize: size, sourceMtimeNs: srcStat.mtimeNs, targetMtimeNs: t.mtimeNs, targetIno: t.ino, targetDev: t.dev });
  await removeIntent(intentPath);
  result.matched = size - result.literal;
  return result;
}

/**
 * utimes takes seconds as a double, which libuv truncates to whole
 * microseconds; aiming at the middle of the microsecond makes that exact.
 */
export const nsToSeconds = (ns: bigint): number => Number(ns / 1_000_000_000n) + (Number((ns % 1_000_000_000n) / 1000n) + 0.5) / 1e6;
