/**
 * A uniform random sample of `n` of the ranks 0..N-1 (every n-subset as
 * likely), yielded in ascending order one at a time, so a caller can walk
 * its items in order beside it and keep nothing but the next rank: Vitter's
 * method A (Vitter 1984, "Faster methods for random sampling", CACM 27(7)).
 * Memory O(1), n draws of `unit`, O(N) arithmetic. `unit` gives a uniform
 * number in (0, 1); `below(k)` a uniform integer in [0, k).
 */
export function* sampleRanks(N: number, n: number, unit: () => number, below: (k: number) => number): Generator<number> {
  n = Math.min(n, N);
  let rank = -1;
  /** Ranks after `rank` not yet passed over. */
  let left = N;
  for (; n >= 2; n--) {
    // Skip s ranks with the probability that the next selected one is s further on.
    const v = unit();
    let top = left - n;
    let quot = top / left;
    let s = 0;
    while (quot > v) {
      s++;
      top--;
      left--;
      quot *= top / left;
    }
    rank += s + 1;
    left--;
    yield rank;
  }
  if (n === 1) yield rank + 1 + below(left);
}
