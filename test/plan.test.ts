/** Diff planning, block by block: which blocks a chunk writes, in which runs. */
import { describe, expect, it } from 'vitest';
import { planChunk, type ChunkPlanInput } from '../src/core/plan.js';

const BS = 4096;
const Z = new Uint8Array(32); // stands for the digest of a zero block
const d = (tag: number) => new Uint8Array(32).fill(tag);
const digests = (...tags: number[]) => {
  const out = new Uint8Array(tags.length * 32);
  tags.forEach((t, i) => out.set(t === 0 ? Z : d(t), i * 32));
  return out;
};
const base = (over: Partial<ChunkPlanInput>): ChunkPlanInput => ({
  first: 10,
  digests: digests(1, 2, 3, 4),
  size: 100 * BS,
  blockSize: BS,
  mode: 'manifest',
  old: digests(1, 2, 3, 4),
  oldBlocks: 100,
  holeFrom: 100,
  zeroDigest: () => Z,
  ...over,
});

describe('planChunk', () => {
  it('an unchanged chunk writes nothing', () => {
    expect(planChunk(base({}))).toEqual({ changed: [], runs: [] });
  });

  it('writes the blocks whose digest differs from the manifest, adjacent ones as one run', () => {
    const p = planChunk(base({ digests: digests(1, 9, 9, 4) }));
    expect(p.changed).toEqual([11, 12]);
    expect(p.runs).toEqual([{ first: 11, count: 2, zero: false }]);
  });

  it('splits runs where data turns to zeros, and keeps zero runs apart', () => {
    const p = planChunk(base({ digests: digests(9, 0, 0, 9) }));
    expect(p.runs).toEqual([
      { first: 10, count: 1, zero: false },
      { first: 11, count: 2, zero: true },
      { first: 13, count: 1, zero: false },
    ]);
  });

  it('rewrites suspect blocks (an interrupted run) even when the digests agree', () => {
    expect(planChunk(base({ suspect: (b) => b === 12 })).changed).toEqual([12]);
  });

  it('blocks past the old end are new; zero ones there need no write (the resize left a hole)', () => {
    const p = planChunk(base({ oldBlocks: 12, holeFrom: 12, digests: digests(1, 2, 0, 7) }));
    expect(p.changed).toEqual([13]);
  });

  it('compare mode follows the byte comparison', () => {
    const p = planChunk(base({ mode: 'compare', old: undefined, differs: Uint8Array.of(0, 1, 0, 1) }));
    expect(p.changed).toEqual([11, 13]);
  });

  it('a new file writes every block, zeros too, unless -S leaves them as holes', () => {
    const all = planChunk(base({ mode: 'rewrite', old: undefined, digests: digests(1, 0, 0, 2), holeFrom: Infinity }));
    expect(all.changed).toEqual([10, 11, 12, 13]);
    const sparse = planChunk(base({ mode: 'rewrite', old: undefined, digests: digests(1, 0, 0, 2), holeFrom: 0 }));
    expect(sparse.changed).toEqual([10, 13]);
  });

  it('the short last block is hashed as it is, and its zero digest asked for its own length', () => {
    const lens: number[] = [];
    planChunk(base({ first: 98, digests: digests(5, 6), size: 99 * BS + 10, oldBlocks: 98, holeFrom: 98, zeroDigest: (l) => (lens.push(l), Z) }));
    expect(lens).toEqual([BS, 10]);
  });
});
