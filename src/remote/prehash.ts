/**
 * A push's source hashed ahead: while ssh connects and the far side starts
 * (a second or so in which this side only waits), the pool hashes a file
 * opened ahead (SourceServer.answerAhead), so that its scan, when the far
 * side asks for it, compares digests and reads only the blocks it sends,
 * and the link carries them at its own rate from the first.
 *
 * The digests stand for the file only if it did not change since they were
 * read: the scan takes them only if the file's size, mtime and ctime are
 * those taken before hashing began, and a file written less than a second
 * before is not hashed ahead (a write in the same clock tick could leave
 * its mtime as it was). Hashing ahead stops when the scan (of any file)
 * needs the pool: the blocks not hashed by then are scanned as ever.
 */
import type { BigIntStats } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { QsyncError } from '../core/errors.js';
import { blockCount } from '../core/geometry.js';
import type { WriteRun } from '../core/plan.js';
import { DIGEST_LEN, hashBlocksInto } from '../hash/blake3.js';
import type { HashPool } from '../hash/pool.js';
import { readUpTo } from '../io/local-file.js';
import { chunkPlanner, type PlannedChunk, type ScanPlan } from '../sync/source.js';

/** At most this many bytes of digests are kept (a 64 GiB file at 64 KiB blocks); the rest of a larger file is scanned as ever. */
const MAX_DIGEST_BYTES = 32 << 20;
/** A file modified this recently is not hashed ahead. */
const SETTLED_NS = 1_000_000_000n;

const STOP = Symbol('stop');

export class Prehash {
  private stopping = false;
  /** Blocks [0, hashed) have their digests in `digests`. */
  private hashed = 0;
  private readonly done: Promise<void>;

  private constructor(
    pool: HashPool,
    fh: FileHandle,
    shown: string,
    private readonly st: BigIntStats,
    private readonly digests: Buffer,
  ) {
    const bs = pool.blockSize;
    const size = Math.min(Number(st.size), (digests.length / DIGEST_LEN) * bs);
    this.done = pool
      .scan({ fd: fh.fd, size, path: shown }, (c) => {
        if (this.stopping) throw STOP;
        Buffer.from(c.digests.buffer, c.digests.byteOffset, c.digests.length).copy(this.digests, (c.offset / bs) * DIGEST_LEN);
        this.hashed = Math.ceil((c.offset + c.data.length) / bs);
      })
      // A read that fails here fails again in the scan, which reports it.
      .catch(() => {});
  }

  /** Start hashing `fh` on the pool; undefined for an empty file or one written in the last second. */
  static async start(pool: HashPool, fh: FileHandle, shown: string): Promise<Prehash | undefined> {
    const st = await fh.stat({ bigint: true });
    if (!st.isFile() || st.size === 0n) return undefined;
    const now = BigInt(Date.now()) * 1_000_000n;
    if (now - st.mtimeNs < SETTLED_NS || now - st.ctimeNs < SETTLED_NS) return undefined;
    const n = Math.min(blockCount(Number(st.size), pool.blockSize), Math.floor(MAX_DIGEST_BYTES / DIGEST_LEN));
    return new Prehash(pool, fh, shown, st, Buffer.alloc(n * DIGEST_LEN));
  }

  /** Stop hashing and free the pool. */
  async stop(): Promise<void> {
    this.stopping = true;
    await this.done;
  }

  /**
   * Stop, and the digests of blocks [0, blocks) as hashed ahead, if `fh`
   * is still the file as it was then; undefined if not (scan it all).
   */
  async take(fh: FileHandle): Promise<{ digests: Buffer; blocks: number } | undefined> {
    await this.stop();
    const st = await fh.stat({ bigint: true });
    const same = st.ino === this.st.ino && st.dev === this.st.dev && st.size === this.st.size && st.mtimeNs === this.st.mtimeNs && st.ctimeNs === this.st.ctimeNs;
    if (!same || this.hashed === 0) return undefined;
    return { digests: this.digests.subarray(0, this.hashed * DIGEST_LEN), blocks: this.hashed };
  }
}

/**
 * Blocks [0, ahead.blocks) of a manifest scan, from digests hashed ahead:
 * planned as scanAndPlan plans them, a stretch of `per` blocks at a time,
 * and the blocks to send read and hashed again (what goes is what its
 * digests say). Returns the first block left to scan.
 */
export async function planAhead(fh: FileHandle, shown: string, plan: ScanPlan, ahead: { digests: Buffer; blocks: number }, per: number, onChunk: (c: PlannedChunk) => Promise<void>): Promise<number> {
  const { blockSize: bs, size } = plan;
  const planned = chunkPlanner(plan, per);
  for (let first = 0; first < ahead.blocks; first += per) {
    const n = Math.min(per, ahead.blocks - first);
    const digests = Buffer.from(ahead.digests.subarray(first * DIGEST_LEN, (first + n) * DIGEST_LEN));
    const { changed, runs } = await planned(first, digests);
    const data = new Map<WriteRun, Buffer>();
    for (const r of runs) {
      if (r.zero) continue;
      const at = r.first * bs;
      const buf = Buffer.alloc(Math.min(size, (r.first + r.count) * bs) - at);
      if ((await readUpTo(fh, buf, at)) !== buf.length) {
        throw new QsyncError('SOURCE', `file has vanished: ${shown} (it shrank while qsync read it; not read)`, { file: shown, vanished: true });
      }
      hashBlocksInto(buf, bs, digests, (r.first - first) * DIGEST_LEN);
      data.set(r, buf);
    }
    await onChunk({ first, digests, changed, runs, bytes: (r) => data.get(r)!, scanned: Math.min(size, (first + n) * bs) - first * bs });
  }
  return ahead.blocks;
}
