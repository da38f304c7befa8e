/**
 * Diff planning: which blocks of a scanned chunk must be written, and in
 * which runs. Pure: the engine feeds it digests (and, comparing, the
 * per-block verdicts) and writes what it returns.
 */
import { MANIFEST_DIGEST_LEN as D } from './manifest.js';

export interface ChunkPlanInput {
  /** Index of the chunk's first block. */
  first: number;
  /** New digests, D bytes per block. */
  digests: Uint8Array;
  size: number;
  blockSize: number;
  /**
   * manifest: differs from `old` (the trusted manifest's digests for these
   * blocks) or past its end or `suspect`; compare: as `differs` says;
   * rewrite: every block (new target, -W).
   */
  mode: 'manifest' | 'compare' | 'rewrite';
  old?: Uint8Array;
  /** Blocks in the old target. */
  oldBlocks: number;
  differs?: Uint8Array;
  /** Blocks an interrupted run may have written: rewritten whatever the digests say. */
  suspect?: (block: number) => boolean;
  /** From this block on, the target already reads as zero: zero blocks need no write. */
  holeFrom: number;
  /** Digest of `length` zero bytes. */
  zeroDigest: (length: number) => Uint8Array;
}

export interface WriteRun {
  first: number;
  count: number;
  /** Every block of the run is zero. */
  zero: boolean;
}

export interface ChunkPlan {
  /** Blocks to write, ascending: what the intent record lists and the manifest patches. */
  changed: number[];
  /** The same blocks as runs of adjacent blocks of one kind (data or zero). */
  runs: WriteRun[];
}

/** Digest `i` of `a` equals digest `j` of `b`. */
function same(a: Uint8Array, i: number, b: Uint8Array, j: number): boolean {
  for (let k = 0; k < D; k++) if (a[i * D + k] !== b[j * D + k]) return false;
  return true;
}

export function planChunk(p: ChunkPlanInput): ChunkPlan {
  const n = p.digests.length / D;
  const changed: number[] = [];
  const runs: WriteRun[] = [];
  // Most chunks of a second run are unchanged: one compare instead of one per block.
  if (p.mode === 'manifest' && !p.suspect && p.first + n <= p.oldBlocks && Buffer.compare(p.old!.subarray(0, n * D), p.digests) === 0) {
    return { changed, runs };
  }
  for (let i = 0; i < n; i++) {
    const b = p.first + i;
    const len = Math.min(p.blockSize, p.size - b * p.blockSize);
    const zero = same(p.digests, i, p.zeroDigest(len), 0);
    let differs: boolean;
    if (p.mode === 'manifest') differs = b >= p.oldBlocks || p.suspect?.(b) === true || !same(p.old!, i, p.digests, i);
    else if (p.mode === 'compare') differs = p.differs![i] === 1;
    else differs = true;
    if (!differs || (zero && b >= p.holeFrom)) continue;
    changed.push(b);
    const last = runs[runs.length - 1];
    if (last && last.first + last.count === b && last.zero === zero) last.count++;
    else runs.push({ first: b, count: 1, zero });
  }
  return { changed, runs };
}
