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
import { closeSync, constants, readdirSync, readFileSync, writeSync, type BigIntStats } from 'node:fs';
import { QsyncError } from '../core/errors.js';
import { setFileMetaSync, type MetaChange } from '../io/safe-fs.js';
import { readUpToSync } from '../io/local-file.js';
import { fsyncFd, syncFileSystem } from '../io/syncfs.js';
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
  fd: number;
  dev: bigint;
  times: MetaChange;
  shown: string;
}


/**
 * The small files a run wrote whose data is not yet known durable, held by
 * descriptor. flush() (when the batch is full, and at the end of the walk)
 * syncs each file system they are on once, then gives them their times and
 * closes them. A batch holds at most half the descriptors free when it
 * starts, so the walk keeps what it needs as it goes deeper.
 */
export class SmallFileBatch {
  private pending: Pending[] = [];
  private bytes = 0;
  private cap = 0;
  private readonly fdLimit = fdLimit();
  /** The file being synced, both sides: one buffer each for the run, not one per file (the garbage would be RSS). */
  readonly source = Buffer.allocUnsafe(SMALL_FILE_MAX);
  readonly target = Buffer.allocUnsafe(SMALL_FILE_MAX);

  /** `dev`: the file system the file is on (its fstat's, taken when it was made). */
  async add(fd: number, dev: bigint, size: number, times: MetaChange, shown: string): Promise<void> {
    // fdsInUse counts this file's descriptor: the batch's first file sees what the walk holds.
    if (!this.pending.length) this.cap = Math.max(1, Math.min(BATCH_FILES, Math.floor((this.fdLimit - fdsInUse() - FD_HEADROOM) / 2)));
    this.pending.push({ fd, dev, times, shown });
    this.bytes += size;
    if (this.pending.length >= this.cap || this.bytes >= BATCH_BYTES) await this.flush();
  }

  async flush(): Promise<void> {
    const batch = this.pending;
    this.pending = [];
    this.bytes = 0;
    if (!batch.length) return;
    let first: unknown;
    try {
      if (batch.length <= FSYNC_EACH) await Promise.all(batch.map((p) => fsyncFd(p.fd)));
      else {
        const byDev = new Map<bigint, number[]>();
        for (const p of batch) {
          const fds = byDev.get(p.dev);
          if (fds) fds.push(p.fd);
          else byDev.set(p.dev, [p.fd]);
        }
        for (const fds of byDev.values()) await syncFileSystem(fds[0]!, fds);
      }
      for (const p of batch) {
        if (p.times.mtime === undefined) continue;
        try {
          setFileMetaSync(p.fd, p.times);
        } catch (e) {
          first ??= new QsyncError('TARGET', `cannot set the times of ${p.shown}: ${(e as Error).message}`, { file: p.shown }, { cause: e });
        }
      }
    } finally {
      for (const p of batch) closeSync(p.fd);
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
  const { src, srcStat, dstStat, dstDir, dstName, relPath } = job;
  const size = Number(srcStat.size);
  const none = { transferred: false, created: false, scanned: 0, literal: 0, matched: 0 };
  if (dstStat && quick) return { method: 'quick', ...none };
  const dst = job.dst;
  const method = !dstStat ? 'new' : opts.wholeFile ? 'whole' : 'compare';
  if (opts.dryRun) return { method, ...none, transferred: true, created: !dstStat };

  await ctx.sources.checkUsable(srcStat, src);
  const data = await ctx.sources.readWhole!(job.srcDir, job.srcName, srcStat, src, ctx.small!.source);
  ctx.hooks.fileStart?.(relPath, size, method);
  const dir = dstDir!;
  if (method === 'compare' && dstStat!.size === srcStat.size) {
    const fd = openTarget(job);
    try {
      const old = ctx.small!.target.subarray(0, size);
      if (readUpToSync(fd, old, 0) === size && old.equals(data)) {
        // Identical: only the attributes change, on the inode that was read.
        setFileMetaSync(fd, job.meta);
        ctx.hooks.fileProgress?.(relPath, size, 0);
        return { method, transferred: true, created: false, scanned: size, literal: 0, matched: size, inode: { dev: dstStat!.dev, ino: dstStat!.ino } };
      }
    } finally {
      closeSync(fd);
    }
  }

  // A new copy under a temporary name (created no wider than 0600 and the source), complete with owner and mode before it takes the real name.
  let created: { fd: number; name: string; st: BigIntStats };
  try {
    created = dir.createTempSync(dstName, Number(srcStat.mode & 0o600n));
  } catch (e) {
    if (e instanceof QsyncError) throw e;
    throw new QsyncError('TARGET', `cannot write ${dst}: ${(e as Error).message}`, { file: dst, hint: 'check the permissions of the destination' }, { cause: e });
  }
  const { fd, name: tmp } = created;
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
    for (let done = 0; done < size; ) done += writeSync(fd, data, done, size - done, done);
    setFileMetaSync(fd, now);
    try {
      dir.renameSync(tmp, dir, dstName);
    } catch (e) {
      throw new QsyncError('TARGET', `cannot put ${dst} in place: ${(e as Error).message}`, { file: dst }, { cause: e });
    }
  } catch (e) {
    closeSync(fd);
    await dir.unlink(tmp).catch(() => {});
    throw e;
  }
  // A manifest an earlier run kept for this name describes another file now.
  if (dstStat) await forgetManifestAt(job.manifestPath);
  ctx.hooks.fileProgress?.(relPath, size, size);
  await ctx.small!.add(fd, created.st.dev, size, { atime, mtime }, dst);
  return { method, transferred: true, created: !dstStat, scanned: size, literal: size, matched: 0, inode: { dev: created.st.dev, ino: created.st.ino } };
}


/** The existing target, for reading, only while it is the inode the walk saw. */
function openTarget(job: FileJob): number {
  const { fd, st } = job.dstDir!.openFileSync(job.dstName, constants.O_RDONLY);
  if (st.ino !== job.dstStat!.ino || st.dev !== job.dstStat!.dev) {
    closeSync(fd);
    throw new QsyncError('TARGET', `${job.dst} was replaced while qsync worked on it; left alone`, { file: job.dst, hint: 'run again' });
  }
  return fd;
}
