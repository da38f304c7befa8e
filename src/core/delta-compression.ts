/**
 * Per-record payload compression for deltas (`-z`). Brotli at quality 1 from
 * node:zlib: on disk-image blocks it matched zstd level 1's ratio at half its
 * speed, and no zstd/lz4 package with prebuilt binaries beat it clearly
 * (numbers in docs/FORMATS.md "Delta", "Compression").
 */
import { brotliCompressSync, brotliDecompressSync, constants } from 'node:zlib';
import type { DeltaCompression } from './delta-codec.js';

/** The compressed payload, or undefined when it would not be smaller than `data`. */
export function compressBlock(compression: DeltaCompression, data: Buffer): Buffer | undefined {
  if (compression === 'none') return undefined;
  const out = brotliCompressSync(data, {
    params: { [constants.BROTLI_PARAM_QUALITY]: 1, [constants.BROTLI_PARAM_SIZE_HINT]: data.length },
  });
  return out.length < data.length ? out : undefined;
}

/** Inflate a payload that must expand to exactly `length` bytes; throws otherwise (never allocates more). */
export function decompressBlock(compression: DeltaCompression, payload: Buffer, length: number): Buffer {
  if (compression === 'none') throw new Error('record marked compressed in a delta without compression');
  const out = brotliDecompressSync(payload, { maxOutputLength: length });
  if (out.length !== length) throw new Error(`payload inflates to ${out.length} bytes, expected ${length}`);
  return out;
}
