import { describe, expect, it } from 'vitest';
import { BufferRing, type Loan } from '../src/io/buffer-ring.js';

/** Loans that are out at once never share a byte. */
function disjoint(loans: Loan[]): boolean {
  const spans = loans.map((l) => [l.buf.byteOffset, l.buf.byteOffset + l.buf.length] as const).sort((a, b) => a[0] - b[0]);
  return spans.every((s, i) => i === 0 || spans[i - 1]![1] <= s[0]);
}

describe('BufferRing', () => {
  it('lends disjoint slices up to its capacity, and no more until the oldest loans are back', () => {
    const ring = new BufferRing(100);
    const a = ring.tryLend(40)!;
    const b = ring.tryLend(40)!;
    expect(disjoint([a, b])).toBe(true);
    expect(ring.tryLend(30)).toBeUndefined(); // 20 left at the end
    b.release(); // not the oldest: its room comes back only with a's
    expect(ring.tryLend(30)).toBeUndefined();
    a.release();
    const c = ring.tryLend(100)!;
    expect(c.buf.length).toBe(100);
  });

  it('wraps around: a loan that does not fit at the end starts over at the beginning once that is free', () => {
    const ring = new BufferRing(100);
    const a = ring.tryLend(60)!;
    const b = ring.tryLend(30)!;
    a.release();
    const c = ring.tryLend(50)!; // 10 at the end are too few: from 0
    expect(c.buf.byteOffset).toBe(a.buf.byteOffset);
    expect(disjoint([b, c])).toBe(true);
    expect(ring.tryLend(20)).toBeUndefined(); // 10 between c and b
    const d = ring.tryLend(10)!;
    expect(disjoint([b, c, d])).toBe(true);
    a.release(); // twice: nothing happens
    expect(ring.tryLend(1)).toBeUndefined();
  });

  it('waiters are served in order as room comes back', async () => {
    const ring = new BufferRing(64);
    const a = ring.tryLend(64)!;
    const got: number[] = [];
    const w1 = ring.lend(32).then((l) => (got.push(1), l));
    const w2 = ring.lend(32).then((l) => (got.push(2), l));
    expect(ring.tryLend(1)).toBeUndefined(); // behind the waiters
    a.release();
    const [l1, l2] = await Promise.all([w1, w2]);
    expect(got).toEqual([1, 2]);
    expect(disjoint([l1, l2])).toBe(true);
  });

  it('refuses a loan larger than the ring', () => {
    expect(() => new BufferRing(10).tryLend(11)).toThrow(RangeError);
  });
});
