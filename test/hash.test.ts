/** The BLAKE3 binding as qsync uses it: on views of shared memory, block by block, incrementally. */
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { blake3 } from '@napi-rs/blake-hash';
import { DIGEST_LEN, digestOf, hashBlocksInto, newHasher, zeroDigest } from '../src/hash/blake3.js';

describe('BLAKE3 per block', () => {
  it('hashes views of a SharedArrayBuffer as it hashes Buffers, the short last block included', () => {
    const bs = 4096;
    const shared = new Uint8Array(new SharedArrayBuffer(5 * bs + 100));
    shared.set(randomBytes(shared.length));
    const out = new Uint8Array(6 * DIGEST_LEN);
    expect(hashBlocksInto(shared, bs, out)).toBe(6);
    for (let i = 0; i < 6; i++) {
      const copy = Buffer.from(shared.slice(i * bs, Math.min((i + 1) * bs, shared.length)));
      expect(Buffer.from(out.subarray(i * DIGEST_LEN, (i + 1) * DIGEST_LEN)).equals(blake3(copy))).toBe(true);
      expect(digestOf(shared.subarray(i * bs, Math.min((i + 1) * bs, shared.length))).equals(blake3(copy))).toBe(true);
    }
  });

  it('knows the digest of a zero block', () => {
    expect(zeroDigest(65536).equals(blake3(Buffer.alloc(65536)))).toBe(true);
  });

  it('an incremental hasher can be read part way and keeps going (fingerprints rely on it)', () => {
    const a = randomBytes(1000);
    const b = randomBytes(1000);
    const h = newHasher();
    h.update(new Uint8Array(a));
    expect(h.digestBuffer().equals(blake3(a))).toBe(true);
    h.update(b);
    expect(h.digestBuffer().equals(blake3(Buffer.concat([a, b])))).toBe(true);
  });
});
