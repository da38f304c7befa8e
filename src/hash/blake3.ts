import * as napi from '@napi-rs/blake-hash';

/**
 * The binding's types (1.3.4: the last version published for every
 * platform, which `npm ci` needs) say Buffer; it reads any Uint8Array,
 * shared memory included (test/hash.test.ts checks that).
 */
const blake3 = napi.blake3 as (input: Uint8Array) => Buffer;
const blake3UrlSafeBase64 = napi.blake3UrlSafeBase64 as (input: Uint8Array) => string;

/** An incremental BLAKE3 hasher fed Uint8Arrays. */
export interface Hasher {
  update(input: Uint8Array): unknown;
  digestBuffer(): Buffer;
}
export const newHasher = (): Hasher => new napi.Blake3Hasher() as unknown as Hasher;

export const DIGEST_LEN = 32;

/** BLAKE3-256 of one block. */
export const digestOf = (data: Uint8Array): Buffer => blake3(data);

const zeroDigests = new Map<number, Buffer>();

/**
 * Digest of `length` zero bytes. A block whose digest equals it is a zero
 * block (BLAKE3 collisions aside), so zero detection costs one compare.
 */
export function zeroDigest(length: number): Buffer {
  let d = zeroDigests.get(length);
  if (!d) {
    d = blake3(Buffer.alloc(length));
    zeroDigests.set(length, d);
  }
  return d;
}

/**
 * Hash `data` block by block into `out` (DIGEST_LEN bytes per block, from
 * `outOffset`). The digest comes back as a base64 string decoded in place:
 * a small string the young generation frees at once, where a Buffer per
 * block would pile up as native memory until a full GC (~15 MiB of RSS per
 * GiB hashed) and is slower too.
 */
export function hashBlocksInto(data: Uint8Array, blockSize: number, out: Uint8Array, outOffset = 0): number {
  const o = Buffer.from(out.buffer, out.byteOffset, out.byteLength);
  let n = 0;
  for (let off = 0; off < data.length; off += blockSize, n++) {
    o.write(blake3UrlSafeBase64(data.subarray(off, Math.min(off + blockSize, data.length))), outOffset + n * DIGEST_LEN, DIGEST_LEN, 'base64url');
  }
  return n;
}
