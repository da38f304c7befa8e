/** Fixed-block geometry: every offset/length the engine uses comes from here. */

export const DEFAULT_BLOCK_SIZE = 64 * 1024;
export const MIN_BLOCK_SIZE = 4 * 1024;
export const MAX_BLOCK_SIZE = 16 * 1024 * 1024;

export const isPowerOfTwo = (n: number): boolean => Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;

export const isValidBlockSize = (n: number): boolean =>
  isPowerOfTwo(n) && n >= MIN_BLOCK_SIZE && n <= MAX_BLOCK_SIZE;

export const blockCount = (size: number, blockSize: number): number => Math.ceil(size / blockSize);

/** Length of block `index` of a `size`-byte file (the last one may be short). */
export const blockLength = (index: number, size: number, blockSize: number): number =>
  Math.max(0, Math.min(blockSize, size - index * blockSize));
