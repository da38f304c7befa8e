/**
 * The verify sample's draw (src/core/sample.ts): n distinct ranks of N in
 * ascending order, every rank as likely as any other, whatever the source.
 */
import { describe, expect, it } from 'vitest';
import { sampleRanks } from '../src/core/sample.js';

const unit = (): number => (Math.floor(Math.random() * 2 ** 48) + 0.5) / 2 ** 48;
const below = (k: number): number => Math.floor(Math.random() * k);

describe('sampleRanks', () => {
  it('gives exactly n distinct ranks below N, ascending; all of them when n ≥ N, none when n is 0', () => {
    for (const [N, n] of [[1, 1], [5, 5], [10, 3], [1000, 1], [1000, 999], [100_000, 500], [7, 20], [50, 0]] as const) {
      const got = [...sampleRanks(N, n, unit, below)];
      expect(got).toHaveLength(Math.min(n, N));
      for (let i = 0; i < got.length; i++) {
        expect(got[i]).toBeGreaterThanOrEqual(i ? got[i - 1]! + 1 : 0);
        expect(got[i]).toBeLessThan(N);
      }
    }
    // The extremes: the same source value every time still gives n distinct ranks in range.
    for (const v of [1e-15, 1 - 1e-15]) {
      const got = [...sampleRanks(1000, 10, () => v, (k) => (v < 0.5 ? 0 : k - 1))];
      expect(new Set(got).size).toBe(10);
      expect(Math.max(...got)).toBeLessThan(1000);
    }
  });

  it('picks every rank, and every pair of neighbours, as often as a uniform sample does', () => {
    // 3 of 12, 60,000 times: each rank is in a quarter of the samples (15,000, σ ≈ 106), each neighbour pair in 1/22.
    const [N, n, rounds] = [12, 3, 60_000];
    const hits = new Array<number>(N).fill(0);
    const pairs = new Array<number>(N - 1).fill(0);
    for (let r = 0; r < rounds; r++) {
      const got = [...sampleRanks(N, n, unit, below)];
      for (const k of got) hits[k]!++;
      for (let i = 1; i < got.length; i++) if (got[i] === got[i - 1]! + 1) pairs[got[i - 1]!]!++;
    }
    const each = (rounds * n) / N;
    for (const h of hits) expect(Math.abs(h - each)).toBeLessThan(6 * Math.sqrt(each));
    // P(k and k+1 both chosen) = C(N-2, n-2) / C(N, n) = n(n-1) / (N(N-1)).
    const pair = (rounds * n * (n - 1)) / (N * (N - 1));
    for (const p of pairs) expect(Math.abs(p - pair)).toBeLessThan(6 * Math.sqrt(pair));
  });
});
