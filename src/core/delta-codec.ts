/**
 * Delta codec (docs/FORMATS.md "Delta"): pure encode/decode functions over
 * buffers. A delta is a header, records (one block each) and a trailer;
 * several deltas may follow each other in one file (a batch). Streams and
 * files live in src/io; the chunk-fed parser is ./delta-decoder.ts.
 */
import { DIGEST_LEN, digestOf } from '../hash/blake3.js';
import { QsyncError } from './errors.js';
import { blockCount, blockLength, isValidBlockSize } from './geometry.js';

export const DELTA_MAGIC = 'QSYNCDLT';
export const DELTA_VERSION = 1;
export const HEADER_FIXED_LEN = 128;
/** Records and the trailer are frames of this fixed size (a record's payload follows its frame). */
export const FRAME_LEN = 56;
export const MAX_NAME_LEN = 4096;
const HEADER_CHECK_AT = 112;
const HEADER_CHECK_LEN = 16;
const FRAME_CHECK_AT = 48;
const FRAME_CHECK_LEN = 8;

const KIND_CODES = { forward: 1, reverse: 2 } as const;
const COMPRESSION_CODES = { none: 0, brotli: 1 } as const;
const FRAME_DATA = 0x44; // 'D'
const FRAME_ZERO = 0x5a; // 'Z'
const FRAME_TRAILER = 0x54; // 'T'
const RECORD_COMPRESSED = 1;

/** forward: old target → new target; reverse: new target → the old one (history). */
export type DeltaKind = keyof typeof KIND_CODES;
export type DeltaCompression = keyof typeof COMPRESSION_CODES;

export interface DeltaHeader {
  kind: DeltaKind;
  compression: DeltaCompression;
  blockSize: number;
  /** Size of the file the delta applies to. */
  baseSize: number;
  /** Size of the file it produces. */
  resultSize: number;
  /** Milliseconds since the epoch: when the run that made it started. */
  createdMs: number;
  /** Manifest fingerprints (src/core/manifest.ts) of base and result. */
  baseFingerprint: Buffer;
  resultFingerprint: Buffer;
  /** Path of the file relative to the batch root; '' for a single-file delta. */
  name: string;
}

export interface DeltaRecord {
  index: number;
  /** 'zero': the block reads as zeros; no payload. */
  kind: 'data' | 'zero';
  /** Payload compressed with the header's compression (else stored as is). */
  compressed: boolean;
  payloadLength: number;
  /** BLAKE3-256 of the block's content in the result (blockLength bytes). */
  digest: Buffer;
}

export interface DeltaTrailer {
  recordCount: number;
  /** BLAKE3-256 of every record frame and payload, the trailer's first 16 bytes, then the header. */
  streamHash: Buffer;
}

/** Where a problem was found, for the message and QsyncError.context. */
export interface DeltaPosition {
  offset: number;
  record?: number;
  file?: string;
}

export function formatError(what: string, at: DeltaPosition): QsyncError {
  const where = [at.file, `offset ${at.offset}`, at.record !== undefined ? `record #${at.record}` : undefined]
    .filter(Boolean)
    .join(', ');
  return new QsyncError('FORMAT', `invalid delta (${where}): ${what}`, { ...at });
}

const check = (buf: Buffer, start: number, end: number, extra?: Buffer): Buffer =>
  digestOf(extra ? Buffer.concat([buf.subarray(start, end), extra]) : buf.subarray(start, end));

function readSafe(buf: Buffer, off: number, what: string, at: DeltaPosition): number {
  const v = buf.readBigUInt64LE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw formatError(`${what} ${v} out of range`, at);
  return Number(v);
}

const codeName = <T extends Record<string, number>>(codes: T, code: number): keyof T | undefined =>
  (Object.keys(codes) as (keyof T)[]).find((k) => codes[k] === code);

export const headerLength = (h: Pick<DeltaHeader, 'name'>): number => HEADER_FIXED_LEN + Buffer.byteLength(h.name);

export const recordBlockLength = (h: DeltaHeader, index: number): number =>
  blockLength(index, h.resultSize, h.blockSize);

/** Write `h` at `off` (headerLength(h) bytes); returns the offset after it. */
export function encodeHeader(h: DeltaHeader, buf: Buffer, off: number): number {
  const name = Buffer.from(h.name);
  if (name.length > MAX_NAME_LEN) throw new QsyncError('USAGE', `delta member name longer than ${MAX_NAME_LEN} bytes`);
  const b = buf.subarray(off, off + HEADER_FIXED_LEN);
  b.fill(0);
  b.write(DELTA_MAGIC, 0, 'latin1');
  b.writeUInt16LE(DELTA_VERSION, 8);
  b.writeUInt8(KIND_CODES[h.kind], 10);
  b.writeUInt8(COMPRESSION_CODES[h.compression], 11);
  b.writeUInt32LE(h.blockSize, 12);
  b.writeBigUInt64LE(BigInt(h.baseSize), 16);
  b.writeBigUInt64LE(BigInt(h.resultSize), 24);
  b.writeBigUInt64LE(BigInt(h.createdMs), 32);
  b.writeUInt16LE(name.length, 40);
  // 42..48 reserved, zero.
  h.baseFingerprint.copy(b, 48, 0, DIGEST_LEN);
  h.resultFingerprint.copy(b, 80, 0, DIGEST_LEN);
  name.copy(buf, off + HEADER_FIXED_LEN);
  check(b, 0, HEADER_CHECK_AT, name).copy(b, HEADER_CHECK_AT, 0, HEADER_CHECK_LEN);
  return off + HEADER_FIXED_LEN + name.length;
}

/**
 * From the fixed part alone (HEADER_FIXED_LEN bytes at `off`): validate magic,
 * version and name length, and return the whole header's length.
 */
export function decodeHeaderLength(buf: Buffer, off: number, at: DeltaPosition): number {
  if (buf.toString('latin1', off, off + 8) !== DELTA_MAGIC) throw formatError('not a qsync delta (bad magic)', at);
  const version = buf.readUInt16LE(off + 8);
  if (version !== DELTA_VERSION) throw formatError(`unsupported version ${version} (this qsync reads ${DELTA_VERSION})`, at);
  const nameLength = buf.readUInt16LE(off + 40);
  if (nameLength > MAX_NAME_LEN) throw formatError(`name length ${nameLength} exceeds ${MAX_NAME_LEN}`, at);
  return HEADER_FIXED_LEN + nameLength;
}

/** Decode the whole header at `off` (decodeHeaderLength bytes) and check it. */
export function decodeHeader(buf: Buffer, off: number, at: DeltaPosition): DeltaHeader {
  const len = decodeHeaderLength(buf, off, at);
  const b = buf.subarray(off, off + HEADER_FIXED_LEN);
  const name = buf.subarray(off + HEADER_FIXED_LEN, off + len);
  if (!check(b, 0, HEADER_CHECK_AT, name).subarray(0, HEADER_CHECK_LEN).equals(b.subarray(HEADER_CHECK_AT))) {
    throw formatError('header checksum mismatch', at);
  }
  const kind = codeName(KIND_CODES, b.readUInt8(10));
  if (!kind) throw formatError(`unknown delta kind ${b.readUInt8(10)}`, at);
  const compression = codeName(COMPRESSION_CODES, b.readUInt8(11));
  if (!compression) throw formatError(`unknown compression ${b.readUInt8(11)}`, at);
  const blockSize = b.readUInt32LE(12);
  if (!isValidBlockSize(blockSize)) throw formatError(`block size ${blockSize}`, at);
  if (b.readUInt16LE(42) !== 0 || b.readUInt32LE(44) !== 0) throw formatError('reserved header bytes set', at);
  return {
    kind,
    compression,
    blockSize,
    baseSize: readSafe(b, 16, 'base size', at),
    resultSize: readSafe(b, 24, 'result size', at),
    createdMs: readSafe(b, 32, 'creation time', at),
    baseFingerprint: Buffer.from(b.subarray(48, 80)),
    resultFingerprint: Buffer.from(b.subarray(80, 112)),
    name: name.toString('utf8'),
  };
}

function sealFrame(b: Buffer): void {
  check(b, 0, FRAME_CHECK_AT).copy(b, FRAME_CHECK_AT, 0, FRAME_CHECK_LEN);
}

/** Write a record's frame (FRAME_LEN bytes) at `off`; its payload follows it. */
export function encodeRecord(r: DeltaRecord, buf: Buffer, off: number): number {
  const b = buf.subarray(off, off + FRAME_LEN);
  b.fill(0);
  b.writeUInt8(r.kind === 'data' ? FRAME_DATA : FRAME_ZERO, 0);
  b.writeUInt8(r.compressed ? RECORD_COMPRESSED : 0, 1);
  b.writeUInt32LE(r.payloadLength, 4);
  b.writeBigUInt64LE(BigInt(r.index), 8);
  r.digest.copy(b, 16, 0, DIGEST_LEN);
  sealFrame(b);
  return off + FRAME_LEN;
}

export function encodeTrailer(t: DeltaTrailer, buf: Buffer, off: number): number {
  const b = buf.subarray(off, off + FRAME_LEN);
  b.fill(0);
  b.writeUInt8(FRAME_TRAILER, 0);
  b.writeBigUInt64LE(BigInt(t.recordCount), 8);
  t.streamHash.copy(b, 16, 0, DIGEST_LEN);
  sealFrame(b);
  return off + FRAME_LEN;
}

/** The trailer bytes covered by the stream hash (kind and count). */
export const TRAILER_HASHED_LEN = 16;

export type DeltaFrame = ({ type: 'record' } & DeltaRecord) | ({ type: 'trailer' } & DeltaTrailer);

/**
 * Decode and check the frame at `off` against the limits of `h`: index in
 * range, payload length no more than the block's length, zero records empty.
 */
export function decodeFrame(buf: Buffer, off: number, h: DeltaHeader, at: DeltaPosition): DeltaFrame {
  const b = buf.subarray(off, off + FRAME_LEN);
  if (!check(b, 0, FRAME_CHECK_AT).subarray(0, FRAME_CHECK_LEN).equals(b.subarray(FRAME_CHECK_AT))) {
    throw formatError('record checksum mismatch (corrupt or truncated)', at);
  }
  const tag = b.readUInt8(0);
  if (tag === FRAME_TRAILER) {
    if (b.readUInt8(1) !== 0 || b.readUInt16LE(2) !== 0 || b.readUInt32LE(4) !== 0) throw formatError('reserved trailer bytes set', at);
    return { type: 'trailer', recordCount: readSafe(b, 8, 'record count', at), streamHash: Buffer.from(b.subarray(16, 48)) };
  }
  if (tag !== FRAME_DATA && tag !== FRAME_ZERO) throw formatError(`unknown frame type 0x${tag.toString(16)}`, at);
  const flags = b.readUInt8(1);
  if ((flags & ~RECORD_COMPRESSED) !== 0 || b.readUInt16LE(2) !== 0) throw formatError('unknown record flags', at);
  const index = readSafe(b, 8, 'block index', at);
  const count = blockCount(h.resultSize, h.blockSize);
  if (index >= count) throw formatError(`block index ${index} out of range (result has ${count} blocks)`, at);
  const payloadLength = b.readUInt32LE(4);
  const compressed = flags === RECORD_COMPRESSED;
  const full = recordBlockLength(h, index);
  if (tag === FRAME_ZERO) {
    if (payloadLength !== 0 || compressed) throw formatError('zero record with a payload', at);
  } else if (compressed ? h.compression === 'none' || payloadLength === 0 || payloadLength > full : payloadLength !== full) {
    throw formatError(`payload length ${payloadLength} invalid for block ${index} of ${full} bytes`, at);
  }
  return {
    type: 'record',
    index,
    kind: tag === FRAME_DATA ? 'data' : 'zero',
    compressed,
    payloadLength,
    digest: Buffer.from(b.subarray(16, 48)),
  };
}
