/**
 * Brings one regular file up to date, the cheapest way that is safe
 * (docs/ARCHITECTURE.md "Costs, best first"): quick check → trusted manifest → compare
 * → new copy. Data flows one way: the hash pool reads and hashes the source
 * (and, in compare mode, the target), the planner below picks the changed
 * blocks, the sink writes them, and the manifest is committed last.
 */
import { constants, type BigIntStats } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { QsyncError } from '../core/errors.js';
import { blockCount } from '../core/geometry.js';
import { newerOnReceiver, sameMtime } from '../core/mtime.js';
import { digestOf } from '../hash/blake3.js';
import { copySparse, LocalFileSink, punchingSink, readUpTo } from '../io/local-file.js';
import { setMetaByFd, type Dir, type MetaChange } from '../io/safe-fs.js';
import type { BlockSink } from '../io/types.js';
import type { SyncHooks, SyncMethod } from './events.js';
import { emptyFingerprint, Fingerprinter, type Manifest } from './manifest-store.js';
import type { Trust } from './trust.js';
import { takeChunk } from './engine.js';
import { commitTarget, fileData, LocalTargetState, type StateWriter, type TargetData, type TargetState } from './target.js';
import type { DigestReader, SourceDir, Sources } from './source.js';
import { DigestScratch, hashFile } from './target-digests.js';
import { isSmallJob, syncSmallFile, type SmallFileBatch } from './small-file.js';

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
  /** -I: size and mtime equal is no reason to skip a file. */
  ignoreTimes?: boolean;
  /** --modify-window (src/core/mtime.ts); 0 when not given. */
  modifyWindow?: number;
  /** --only-write-batch: record what would be written, leave the target (and its manifest) alone. */
  recordOnly?: boolean;
}

/** What a delta sink needs to know of the file (matches delta-sinks' DeltaSinkInfo). */
export interface SinkInfo {
  relPath: string;
  blockSize: number;
  oldSize: number;
  newSize: number;
  /** Fingerprints of the target before and after; `after` is complete once the last block is written. */
  fingerprints(): { before: Buffer; after: Buffer };
}

export interface FileSyncContext {
  /** Where sources are read and hashed: this host, or a peer over the wire (src/sync/source.ts). */
  sources: Sources;
  hooks: SyncHooks;
  /**
   * Wrap the target's sink (deltas: tee, reverse delta); `target` is undefined with recordOnly, and a
   * LocalFileSink when the target is a file on this host (a remote target's is its wire sink).
   */
  wrapSink?: (target: LocalFileSink | BlockSink | undefined, info: SinkInfo) => Promise<BlockSink> | BlockSink;
  /** Where small files wait for their batch's sync (src/sync/small-file.ts); without it every file has a manifest. */
  small?: SmallFileBatch;
}

export interface FileSyncResult {
  method: SyncMethod;
  /** Content was (or, with -n, would be) written. */
  transferred: boolean;
  created: boolean;
  scanned: number;
  literal: number;
  matched: number;
  /** The inode the run left under the target's name, when it wrote one (-A/-X give their attributes to it alone). */
  inode?: { dev: bigint; ino: bigint };
}

const skipped = (method: SyncMethod): FileSyncResult => ({ method, transferred: false, created: false, scanned: 0, literal: 0, matched: 0 });

/** rsync's quick check when there is no usable manifest: same size and mtime. */
const sameSizeAndTime = (a: BigIntStats, b: BigIntStats, window: number) => a.size === b.size && sameMtime(a.mtimeNs, b.mtimeNs, window);

/**
 * One regular file to bring up to date. Both sides are reached through the
 * folders that hold them, by descriptor (src/io/safe-fs.ts): `src` and `dst`
 * are for messages only.
 */
export interface FileJob {
  src: string;
  srcStat: BigIntStats;
  srcDir: SourceDir;
  srcName: string;
  dst: string;
  /** Undefined only with -n when the target's folder does not exist yet. */
  dstDir: Dir | undefined;
  dstName: string;
  /** Owner, mode and times the target gets once its data is written, through its descriptor. */
  meta: MetaChange;
  /** Undefined when the target does not exist yet. */
  dstStat: BigIntStats | undefined;
  manifestPath: string;
  /** Path relative to the destination root, for reports and delta members. */
  relPath: string;
}

/** rsync's quick check may skip a file: not under -c, -W or -I. */
const quickCheckOn = (o: FileSyncOptions): boolean => !o.checksum && !o.wholeFile && !o.ignoreTimes;

/** rsync's quick check itself: the same size (--size-only), else the same size and mtime. */
const quickMatch = (dst: BigIntStats, src: BigIntStats, o: FileSyncOptions, window: number): boolean =>
  o.sizeOnly ? dst.size === src.size : sameSizeAndTime(dst, src, window);

/** Returns undefined when the file is skipped by --existing, --ignore-existing or --update. */
export async function syncFile(job: FileJob, opts: FileSyncOptions, ctx: FileSyncContext): Promise<FileSyncResult | undefined> {
  // job.dst and job.manifestPath are read only when needed: the walk makes them on demand (a small file has no manifest).
  const { src, srcStat, dstStat, relPath } = job;
  if (dstStat && !dstStat.isFile()) {
    throw new QsyncError('TARGET', `cannot overwrite ${dstStat.isDirectory() ? 'directory' : 'non-regular file'} ${job.dst} with a file`, { file: job.dst });
  }
  if (!dstStat && opts.existing) return undefined;
  if (dstStat && opts.ignoreExisting) return undefined;
  const window = opts.modifyWindow ?? 0;
  if (dstStat && opts.update && newerOnReceiver(srcStat.mtimeNs, dstStat.mtimeNs, window)) return undefined;
  if (isSmallJob(job, opts, ctx)) {
    const quick = dstStat !== undefined && quickCheckOn(opts) && quickMatch(dstStat, srcStat, opts, window);
    return syncSmallFile(job, opts, ctx, quick);
  }

  const state = new LocalTargetState(job.manifestPath);
  // -n writes nothing, not even a pending journal: it is applied in memory.
  const { manifest, trust } = await state.assess(dstStat, { blockSize: opts.blockSize, strict: opts.checksum, readOnly: opts.dryRun });
  if (trust.reason) ctx.hooks.notice?.(`${trust.reason}${trust.trusted ? '' : '; comparing source and target'}`, relPath);

  try {
    const size = Number(srcStat.size);
    if (dstStat && quickCheckOn(opts)) {
      const h = manifest?.header;
      const sameTime = window > 0 ? sameMtime(h?.sourceMtimeNs ?? -1n, srcStat.mtimeNs, window) : h?.sourceMtimeNs === srcStat.mtimeNs;
      if (trust.trusted && !trust.unknown && h!.sourceSize === size && sameTime) return skipped('quick');
      // rsync's quick check stands in for a manifest only when there is none: one distrusted for a reason means compare.
      if (quickMatch(dstStat, srcStat, opts, window) && (opts.sizeOnly || (!trust.trusted && !trust.reason))) return skipped('quick');
    }
    const method: SyncMethod = !dstStat ? 'new' : opts.wholeFile ? 'whole' : trust.trusted ? 'manifest' : 'compare';
    if (opts.dryRun) return { ...skipped(method), transferred: true, created: !dstStat };

    await ctx.sources.checkUsable(srcStat, src);
    return await transfer(job, method, state, manifest, trust, opts, ctx);
  } finally {
    await manifest?.close();
  }
}

/**
 * The target, opened through its folder. A new target (or one with other
 * hard links, which must not change) is written under an unpredictable
 * temporary name, created no wider than 0600 and never wider than the
 * source, and renamed into place once complete; an existing one is updated
 * in place (the intent and manifest rely on that), after its mode is
 * narrowed when the source's is narrower.
 */
async function openTarget(job: FileJob, detach: boolean): Promise<{ fh: FileHandle; tmp?: string }> {
  const { srcStat, dstStat, dstDir, dstName, dst, meta } = job;
  const dir = dstDir!;
  if (!dstStat || detach) {
    const { fh, name } = await dir.createTemp(dstName, Number(srcStat.mode & 0o600n));
    try {
      if (dstStat) {
        // Holes stay holes: a sparse image linked into a snapshot is not filled with zeros.
        const from = await dir.openFile(dstName, constants.O_RDONLY);
        await copySparse(from, fh).finally(() => from.close());
      }
    } catch (e) {
      await fh.close();
      await dir.unlink(name).catch(() => {});
      throw e;
    }
    return { fh, tmp: name };
  }
  const fh = await dir.openFile(dstName, constants.O_RDWR);
  const st = await fh.stat({ bigint: true });
  if (st.ino !== dstStat.ino || st.dev !== dstStat.dev) {
    await fh.close();
    throw new QsyncError('TARGET', `${dst} was replaced while qsync worked on it; left alone`, { file: dst, hint: 'run again' });
  }
  const mode = Number(st.mode & 0o7777n);
  if (meta.mode !== undefined && (mode & ~meta.mode) !== 0) await setMetaByFd(fh.fd, { mode: mode & meta.mode });
  return { fh };
}

async function transfer(job: FileJob, method: SyncMethod, state: TargetState, manifest: Manifest | undefined, trust: Trust, opts: FileSyncOptions, ctx: FileSyncContext): Promise<FileSyncResult> {
  const { src, srcStat, dst, dstStat, manifestPath, relPath } = job;
  const { blockSize } = opts;
  const size = Number(srcStat.size);
  const oldSize = dstStat ? Number(dstStat.size) : 0;
  // --only-write-batch: the target is read at most (compare mode), never written.
  const touch = !opts.recordOnly;
  // A target with other hard links (a `cp -al` snapshot) is copied and the copy updated: the other names keep the old data.
  // So is a read-only target of one's own when not root (rsync replaces it the same way: a new file, renamed).
  const me = process.getuid?.() ?? 0;
  const readOnlyOwn = me !== 0 && dstStat !== undefined && dstStat.uid === BigInt(me) && !(dstStat.mode & 0o200n);
  const detach = touch && dstStat !== undefined && (dstStat.nlink > 1n || readOnlyOwn);
  let base = trust.trusted ? manifest!.fingerprint : !dstStat ? emptyFingerprint(blockSize) : undefined;
  // A delta must name its base: without a trusted manifest, hash the old target while comparing
  // (a source that cannot read the target beside it, a peer, has it hashed here first, below).
  const baseFp = ctx.wrapSink && !base && ctx.sources.readsTarget ? new Fingerprinter(blockSize, oldSize) : undefined;
  const hashFirst = !ctx.sources.readsTarget && (method === 'compare' || (ctx.wrapSink !== undefined && !base));
  const readTarget = method === 'compare' || baseFp !== undefined || hashFirst;

  const source = await ctx.sources.openFile(job.srcDir, job.srcName, srcStat, src);
  let target: LocalFileSink | undefined;
  let targetFh: FileHandle | undefined;
  let tmp: string | undefined;
  let written: BigIntStats | undefined;
  try {
    if (touch) {
      const t = await openTarget(job, detach);
      tmp = t.tmp;
      // -S: blocks that became zero are punched as holes at commit (a new file's are never written).
      target = opts.sparse ? punchingSink(LocalFileSink.of(t.fh, dst), []) : LocalFileSink.of(t.fh, dst);
      written = await t.fh.stat({ bigint: true });
    }
    targetFh = target?.fh ?? (readTarget ? await job.dstDir!.openFile(job.dstName, constants.O_RDONLY) : undefined);
  } catch (e) {
    await target?.close();
    if (tmp) await job.dstDir!.unlink(tmp).catch(() => {});
    await source.close();
    if (e instanceof QsyncError) throw e;
    throw new QsyncError('TARGET', `cannot ${touch ? 'write' : 'read'} ${dst}: ${(e as Error).message}`, { file: dst, hint: 'check the permissions of the destination' }, { cause: e });
  }
  // The state's half of the write: a manifest not used for this run is removed first (it would describe the old target),
  // a trusted one is named by the intent and patched.
  let writer: StateWriter | undefined;
  let sink: BlockSink;
  const resultFp = touch ? undefined : new Fingerprinter(blockSize, size);
  // A source that cannot read the target beside it (a peer) compares against the target's digests, hashed here
  // before anything is written; with deltas their fingerprint is the base the delta names.
  let scratch: DigestScratch | undefined;
  let hashed: DigestReader | undefined;
  const info: SinkInfo = {
    relPath,
    blockSize,
    oldSize,
    newSize: size,
    fingerprints: () => ({ before: base ?? baseFp!.digest(), after: writer?.fingerprint ?? resultFp!.digest() }),
  };
  try {
    if (hashFirst && method === 'compare') {
      scratch = await DigestScratch.open(`${manifestPath}.compare-digests`);
      const s = scratch;
      const fingerprint = await hashFile(targetFh!, oldSize, blockSize, (first, d) => s.set(first, d));
      hashed = { fingerprint, readDigests: (first, n, out) => s.read(first, n, out) };
      base ??= fingerprint;
    } else if (hashFirst) {
      base = await hashFile(targetFh!, oldSize, blockSize);
    }
    writer = touch ? await state.begin({ blockSize, oldSize, newSize: size, base: trust.trusted ? manifest : undefined }) : undefined;
    sink = ctx.wrapSink ? await ctx.wrapSink(target, info) : target!;
  } catch (e) {
    // Nothing was written yet: the state gives up, the descriptors close and a temporary copy goes.
    await scratch?.close(true);
    await writer?.abort();
    await target?.close().catch(() => {});
    if (targetFh !== target?.fh) await targetFh?.close().catch(() => {});
    await source.close();
    if (tmp) await job.dstDir!.unlink(tmp).catch(() => {});
    throw e;
  }
  const result: FileSyncResult = { method, transferred: true, created: !dstStat, scanned: 0, literal: 0, matched: 0, inode: written && { dev: written.dev, ino: written.ino } };
  const oldBlocks = blockCount(oldSize, blockSize);
  // Blocks at or past the old end read as zero after the resize below; a new file is all holes,
  // where zeros are written only without -S (as rsync allocates them).
  const holeFrom = method !== 'new' ? oldBlocks : opts.sparse ? 0 : Infinity;

  const closeAll = async () => {
    await sink.close().catch(() => {});
    if (targetFh !== target?.fh) await targetFh?.close();
    await source.close();
    await scratch?.close(true);
  };
  try {
    ctx.hooks.fileStart?.(relPath, size, method);
    // A peer compares against the target's digests hashed above.
    const old: DigestReader | undefined = method === 'manifest' ? manifest : hashed;
    const mode: 'manifest' | 'compare' | 'rewrite' = hashed ? 'manifest' : method === 'manifest' || method === 'compare' ? method : 'rewrite';
    if (size !== oldSize) await sink.truncate(size);
    const u = trust.unknown;
    const vouched = await source.scan({
      size,
      blockSize,
      mode,
      old,
      oldSize,
      holeFrom,
      suspect: u && { blocks: u, from: trust.unknownFrom! },
      target: readTarget && ctx.sources.readsTarget ? { fd: targetFh!.fd, size: oldSize, hash: baseFp !== undefined } : undefined,
    }, async (c) => {
      if (c.targetDigests) baseFp!.append(c.targetDigests);
      result.literal += await takeChunk(c, { sink, writer, fingerprint: resultFp, blockSize, size, sparse: opts.sparse });
      result.scanned += c.scanned;
      ctx.hooks.fileProgress?.(relPath, result.scanned, result.literal);
    });
    if (vouched && !vouched.equals(writer?.fingerprint ?? resultFp!.digest())) {
      // The peer read other blocks than this side put together: no manifest may describe what was written.
      if (touch) await state.forget();
      throw new QsyncError('PROTOCOL', `${dst}: the blocks received do not add up to the source's digests; the target will be compared on the next run`, { file: dst, hint: 'run again' });
    }
    // The old target's blocks past the new end were not in the scan: hash them for the base fingerprint.
    if (baseFp && oldSize > size) await hashTail(targetFh!, Math.ceil(size / blockSize) * blockSize, oldSize, blockSize, baseFp);
    if (target) {
      // The one commit sequence (src/sync/target.ts): data durable, in place, then the manifest, then the intent gone.
      await commitTarget(placeTarget(job, target, tmp, detach), sink, writer!, { size, mtimeNs: srcStat.mtimeNs });
      tmp = undefined;
    } else {
      await sink.commit();
    }
  } catch (e) {
    await writer?.abort();
    await closeAll();
    if (tmp) await job.dstDir!.unlink(tmp).catch(() => {});
    throw e;
  }
  await closeAll();
  result.matched = size - result.literal;
  return result;
}

/**
 * The target file as the engine's data: once its blocks are durable, owner,
 * mode and times are set through its descriptor (the inode written, whatever
 * its name is now; a detached copy keeps the old target's mode unless -p
 * gives the source's), and a temporary copy, complete, durable and with its
 * final metadata, takes the real name, replacing, never following, what is there.
 */
function placeTarget(job: FileJob, target: LocalFileSink, tmp: string | undefined, detach: boolean): TargetData {
  const { dst, dstDir, dstName, dstStat } = job;
  return fileData(target, async () => {
    await setMetaByFd(target.fh.fd, detach && job.meta.mode === undefined ? { ...job.meta, mode: Number(dstStat!.mode & 0o7777n) } : job.meta);
    if (tmp) {
      await dstDir!.rename(tmp, dstDir!, dstName).catch((e) => {
        throw new QsyncError('TARGET', `cannot put ${dst} in place: ${(e as Error).message}`, { file: dst }, { cause: e });
      });
      await dstDir!.sync();
    }
  });
}

async function hashTail(fh: FileHandle, from: number, to: number, blockSize: number, fp: Fingerprinter): Promise<void> {
  const buf = Buffer.alloc(blockSize);
  for (let off = from; off < to; off += blockSize) {
    const len = Math.min(blockSize, to - off);
    if ((await readUpTo(fh, buf.subarray(0, len), off)) !== len) throw new QsyncError('TARGET', `short read of the target at ${off}`, { offset: off });
    fp.append(digestOf(buf.subarray(0, len)));
  }
}

/**
 * utimes takes seconds as a double, which libuv truncates to whole
 * microseconds; aiming at the middle of the microsecond makes that exact.
 */
export const nsToSeconds = (ns: bigint): number => Number(ns / 1_000_000_000n) + (Number((ns % 1_000_000_000n) / 1000n) + 0.5) / 1e6;
