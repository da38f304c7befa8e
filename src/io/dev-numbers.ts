/** glibc's major()/minor() of a dev_t (st_dev, st_rdev): 12+ bits of major, 20 of minor. */
export function majorMinor(dev: number): [major: number, minor: number] {
  const high = Math.floor(dev / 2 ** 32);
  const major = ((dev >> 8) & 0xfff) | (high & ~0xfff);
  const minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
  return [major, minor];
}
