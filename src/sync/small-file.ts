/**
 * Small files (at most SMALL_FILE_MAX bytes) cost what rsync costs
 * (docs/ARCHITECTURE.md "Small files"): no manifest, no hash worker, no
 * fsync of their own.
 *
 * - Deciding: rsync's quick check (size and mtime; -c, -I, -W and a changed
 *   size or time read both files and compare their bytes on this thread).
 * - Writing: the whole file, under a temporary name, renamed into place with
 *   its owner and mode; a file found identical only gets its attributes.
 * - Durability (docs/RELIABILITY.md "Small files"): the source's mtime is
 *   given to a written file only after one syncfs of DEST's file system has
 *   made its data durable, for a batch of files at a time (SmallFileBatch).
 *   Until then its time is the time it was written, so a file a power cut
 *   left incomplete never passes the next run's quick check.
 */
import { constants, readdirSync, readFileSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { QsyncError } from '../core/errors.js';
import { readUpTo } from '../io/local-file.js';
import { setMetaByFd, type MetaChange } from '../io/safe-fs.js';
import { syncFileSystem } from '../io/syncfs.js';
import type { FileJob, FileSyncContext, FileSyncOptions, FileSyncResult } from './file-sync.js';
import { forgetManifestAt } from './manifest-store.js';

/**
 * Files up to this size (4 blocks at the default 64 KiB) are small: reading
 * both sides whole costs less than a manifest file (a 256 KiB file's manifest
 * is 4 digests and a header, a state file of its own) and a worker round trip.
 */
export const SMALL_FILE_MAX = 256 * 1024;

/** Written files waiting for one syncfs before their times are set. */
const BATCH_FILES = 1024;
const BATCH_BYTES = 64 << 20;
/** A batch this small is fsync'ed file by file: cheaper than starting `sync`. */
const FSYNC_EACH = 8;
/** Descriptors left free for the walk's next file (source, temporary, a folder) and `sync`'s pipes. */
const FD_HEADROOM = 32;

/** The soft limit on open descriptors (/proc/self/limits); 1024 when it cannot be read. */
function fdLimit(): number {
  try {
    const m = /^Max open files\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
    return m?.[1] === 'unlimited' ? Infinity : Number(m?.[1] ?? 1024);
  } catch {
    return 1024;
  }
}

/** Descriptors open now. */
function fdsInUse(): number {
  try {
    return readdirSync('/proc/self/fd').length;
  } catch {
    return 0;
  }
}

interface Pending {
  fh: FileHandle;
  times: MetaChange;
  shown: string;
}

/**
 * The small files a run wrote whose data is not yet known durable. flush()
 * (when the batch is full, and at the end of the walk) syncs each file
 * system they are on once, then gives them their times and closes them.
 */
export class SmallFileBatch {
  private pending: Pending[] = [];
  private bytes = 0;
  private readonly fdLimit = fdLimit();

  /** Descriptors stay bounded by the tree's depth, not its width: a batch ends early when they run short. */
  async add(fh: FileHandle, size: number, times: MetaChange, shown: string): Promise<void> {
    this.pending.push({ fh, times, shown });
    this.bytes += size;
    if (this.pending.length >= BATCH_FILES || this.bytes >= BATCH_BYTES || fdsInUse() + FD_HEADROOM > this.fdLimit) await this.flush();
  }

  async flush(): Promise<void> {
    const batch = this.pending;
    this.pending = [];
    this.bytes = 0;
    if (!batch.length) return;
    let first: unknown;
    try {
      const byDev = new Map<bigint, FileHandle[]>();
      for (const p of batch.length > FSYNC_EACH ? batch : []) {
        const { dev } = await p.fh.stat({ bigint: true });
        byDev.set(dev, [...(byDev.get(dev) ?? []), p.fh]);
      }
      if (batch.length <= FSYNC_EACH) await Promise.all(batch.map((p) => p.fh.sync()));
      else for (const fhs of byDev.values()) await syncFileSystem(fhs[0]!, fhs);
      for (const p of batch) {
        if (p.times.mtime === undefined) continue;
        await setMetaByFd(p.fh.fd, p.times).catch((e) => {
          first ??= new QsyncError('TARGET', `cannot set the times of ${p.shown}: ${(e as Error).message}`, { file: p.shown }, { cause: e });
        });
      }
    } finally {
      for (const p of batch) await p.fh.close().catch(() => {});
    }
    if (first) throw first;
  }
}

/** Whether `syncSmallFile` takes this job: both sides small, written whole, nothing that needs a manifest. */
export function isSmallJob(job: FileJob, opts: FileSyncOptions, ctx: FileSyncContext): boolean {
  return (
    ctx.small !== undefined &&
    ctx.sources.readWhole !== undefined &&
    !ctx.wrapSink &&
    !opts.recordOnly &&
    !opts.sparse &&
    job.srcStat.size <= BigInt(SMALL_FILE_MAX) &&
    (job.dstStat === undefined || job.dstStat.size <= BigInt(SMALL_FILE_MAX))
  );
}

/** syncFile for a small job (isSmallJob), once --existing, --ignore-existing and --update have let it through. */
export async function syncSmallFile(job: FileJob, opts: FileSyncOptions, ctx: FileSyncContext, quick: boolean): Promise<FileSyncResult> {
  const { src, srcStat, dst, dstStat, dstDir, dstName, relPath } = job;
  const size = Number(srcStat.size);
  const none = { transferred: false, created: false, scanned: 0, literal: 0, matched: 0 };
  if (dstStat && quick) return { method: 'quick', ...none };
  const method = !dstStat ? 'new' : opts.wholeFile ? 'whole' : 'compare';
  if (opts.dryRun) return { method, ...none, transferred: true, created: !dstStat };

  await ctx.sources.checkUsable(srcStat, src);
  const data = await ctx.sources.readWhole!(job.srcDir, job.srcName, srcStat, src);
  ctx.hooks.fileStart?.(relPath, size, method);
  const dir = dstDir!;
  if (method === 'compare' && dstStat!.size === srcStat.size) {
    const fh = await openTarget(job);
    try {
      const old = Buffer.allocUnsafe(size);
      if ((await readUpTo(fh, old, 0)) === size && old.equals(data)) {
        // Identical: only the attributes change, on the inode that was read.
        await setMetaByFd(fh.fd, job.meta);
        ctx.hooks.fileProgress?.(relPath, size, 0);
        return { method, transferred: true, created: false, scanned: size, literal: 0, matched: size };
      }
    } finally {
      await fh.close();
    }
  }

  // A new copy under a temporary name (created no wider than 0600 and the source), complete with owner and mode before it takes the real name.
  const { fh, name: tmp } = await dir.createTemp(dstName, Number(srcStat.mode & 0o600n)).catch((e) => {
    if (e instanceof QsyncError) throw e;
    throw new QsyncError('TARGET', `cannot write ${dst}: ${(e as Error).message}`, { file: dst, hint: 'check the permissions of the destination' }, { cause: e });
  });
  const { atime, mtime, ...now } = job.meta;
  // What the old target had and the options do not set stays as it was (as an update in place keeps it).
  if (dstStat) {
    now.mode ??= Number(dstStat.mode & 0o7777n);
    if ((process.getuid?.() ?? 0) === 0) {
      now.uid ??= Number(dstStat.uid);
      now.gid ??= Number(dstStat.gid);
    }
  }
  try {
    for (let done = 0; done < size; ) done += (await fh.write(data, done, size - done, done)).bytesWritten;
    await setMetaByFd(fh.fd, now);
    await dir.rename(tmp, dir, dstName).catch((e) => {
      throw new QsyncError('TARGET', `cannot put ${dst} in place: ${(e as Error).message}`, { file: dst }, { cause: e });
    });
  } catch (e) {
    await fh.close();
    await dir.unlink(tmp).catch(() => {});
    throw e;
  }
  // A manifest an earlier run kept for this name describes another file now.
  if (dstStat) await forgetManifestAt(job.manifestPath);
  ctx.hooks.fileProgress?.(relPath, size, size);
  await ctx.small!.add(fh, size, { atime, mtime }, dst);
  return { method, transferred: true, created: !dstStat, scanned: size, literal: size, matched: 0 };
}

/** The existing target, for reading, only while it is the inode the walk saw. */
async function openTarget(job: FileJob): Promise<FileHandle> {
  const fh = await job.dstDir!.openFile(job.dstName, constants.O_RDONLY);
  const st = await fh.stat({ bigint: true });
  if (st.ino !== job.dstStat!.ino || st.dev !== job.dstStat!.dev) {
    await fh.close();
    throw new QsyncError('TARGET', `${job.dst} was replaced while qsync worked on it; left alone`, { file: job.dst, hint: 'run again' });
  }
  return fh;
}
