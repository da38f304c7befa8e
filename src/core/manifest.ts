/**
 * Manifest codec (docs/FORMATS.md "Manifest"): pure functions over buffers.
 * A manifest holds the BLAKE3 digest of every block of a target as last
 * written, and the facts that decide whether it can still be trusted.
 */
import { QsyncError } from './errors.js';
import { blockCount, isValidBlockSize } from './geometry.js';

export const MANIFEST_MAGIC = 'QSYNCMAN';
export const MANIFEST_VERSION = 1;
export const MANIFEST_HEADER_LEN = 80;
export const MANIFEST_TRAILER_LEN = 64;
export const DIGEST_ALGO_BLAKE3 = 1;
export const MANIFEST_DIGEST_LEN = 32;
/** 2^53: sizes beyond this cannot be offsets in a JS number. */
const MAX_SIZE = Number.MAX_SAFE_INTEGER;

export interface ManifestHeader {
  blockSize: number;
  targetSize: number;
  sourceSize: number;
  /** Nanoseconds since the epoch. */
  sourceMtimeNs: bigint;
  targetMtimeNs: bigint;
  targetIno: bigint;
  targetDev: bigint;
}

export const manifestBlockCount = (h: Pick<ManifestHeader, 'targetSize' | 'blockSize'>): number =>
  blockCount(h.targetSize, h.blockSize);

/** Exact byte length of a manifest file for this header. */
export const manifestFileLength = (h: Pick<ManifestHeader, 'targetSize' | 'blockSize'>): number =>
  MANIFEST_HEADER_LEN + manifestBlockCount(h) * MANIFEST_DIGEST_LEN + MANIFEST_TRAILER_LEN;

export function encodeManifestHeader(h: ManifestHeader): Buffer {
  const b = Buffer.alloc(MANIFEST_HEADER_LEN);
  b.write(MANIFEST_MAGIC, 0, 'latin1');
  b.writeUInt16LE(MANIFEST_VERSION, 8);
  b.writeUInt8(DIGEST_ALGO_BLAKE3, 10);
  b.writeUInt8(MANIFEST_DIGEST_LEN, 11);
  b.writeUInt32LE(h.blockSize, 12);
  b.writeBigUInt64LE(BigInt(h.targetSize), 16);
  b.writeBigUInt64LE(BigInt(manifestBlockCount(h)), 24);
  b.writeBigUInt64LE(BigInt(h.sourceSize), 32);
  b.writeBigInt64LE(h.sourceMtimeNs, 40);
  b.writeBigInt64LE(h.targetMtimeNs, 48);
  b.writeBigUInt64LE(h.targetIno, 56);
  b.writeBigUInt64LE(h.targetDev, 64);
  // 72..80: flags and reserved, zero in version 1.
  return b;
}

const bad = (what: string, file?: string) =>
  new QsyncError('FORMAT', `manifest ${file ?? ''} is invalid: ${what}`.replace('  ', ' '), { file });

function safeSize(v: bigint, what: string, file?: string): number {
  if (v > BigInt(MAX_SIZE)) throw bad(`${what} ${v} out of range`, file);
  return Number(v);
}

/** Decode and validate a header; `fileLength` (when known) must match exactly. */
export function decodeManifestHeader(b: Buffer, fileLength?: number, file?: string): ManifestHeader {
  if (b.length < MANIFEST_HEADER_LEN) throw bad(`truncated header (${b.length} bytes)`, file);
  if (b.toString('latin1', 0, 8) !== MANIFEST_MAGIC) throw bad('not a qsync manifest (bad magic)', file);
  const version = b.readUInt16LE(8);
  if (version !== MANIFEST_VERSION) throw bad(`unsupported version ${version} (this qsync reads ${MANIFEST_VERSION})`, file);
  if (b.readUInt8(10) !== DIGEST_ALGO_BLAKE3 || b.readUInt8(11) !== MANIFEST_DIGEST_LEN) throw bad('unknown digest algorithm', file);
  const blockSize = b.readUInt32LE(12);
  if (!isValidBlockSize(blockSize)) throw bad(`block size ${blockSize}`, file);
  const targetSize = safeSize(b.readBigUInt64LE(16), 'target size', file);
  const count = b.readBigUInt64LE(24);
  if (count !== BigInt(blockCount(targetSize, blockSize))) throw bad(`block count ${count} does not match size ${targetSize}`, file);
  if (b.readUInt32LE(72) !== 0 || b.readUInt32LE(76) !== 0) throw bad('unknown flags', file);
  const h: ManifestHeader = {
    blockSize,
    targetSize,
    sourceSize: safeSize(b.readBigUInt64LE(32), 'source size', file),
    sourceMtimeNs: b.readBigInt64LE(40),
    targetMtimeNs: b.readBigInt64LE(48),
    targetIno: b.readBigUInt64LE(56),
    targetDev: b.readBigUInt64LE(64),
  };
  if (fileLength !== undefined && fileLength !== manifestFileLength(h)) {
    throw bad(`length ${fileLength} bytes, expected ${manifestFileLength(h)} (truncated or padded)`, file);
  }
  return h;
}

/** The bytes that start the fingerprint hash: what the digests describe (block size, size). */
export function fingerprintPrefix(blockSize: number, targetSize: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt32LE(blockSize, 0);
  b.writeBigUInt64LE(BigInt(targetSize), 4);
  return b;
}
