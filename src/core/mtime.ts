/**
 * When two modification times are "the same", as rsync's --modify-window
 * says (observed against rsync): window > 0, whole seconds at most `window`
 * apart (the fractions ignored); window < 0, to the nanosecond; 0, qsync's
 * default, to the microsecond (rsync's default compares whole seconds only:
 * README "Where qsync differs on purpose").
 */
const NS = 1_000_000_000n;

const seconds = (ns: bigint): bigint => (ns >= 0n ? ns / NS : -((-ns + NS - 1n) / NS));

export function sameMtime(aNs: bigint, bNs: bigint, window = 0): boolean {
  if (aNs === bNs || window < 0) return aNs === bNs;
  if (window === 0) return aNs / 1000n === bNs / 1000n;
  const d = seconds(aNs) - seconds(bNs);
  return (d < 0n ? -d : d) <= BigInt(window);
}

/**
 * -u: the receiver's copy is newer, so it is left alone. rsync skips when
 * the source is less than `window` whole seconds newer; without a window,
 * when the target's time is later at all.
 */
export function newerOnReceiver(srcNs: bigint, dstNs: bigint, window = 0): boolean {
  return window > 0 ? seconds(srcNs) - seconds(dstNs) < BigInt(window) : dstNs > srcNs;
}
