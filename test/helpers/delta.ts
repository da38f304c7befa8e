/** Test helpers for deltas: build one from two in-memory images, fingerprint an image. */
import { blake3 } from '@napi-rs/blake-hash';
import type { DeltaCompression, DeltaKind } from '../../src/core/delta-codec.js';
import { blockCount } from '../../src/core/geometry.js';
import { fingerprintPrefix } from '../../src/core/manifest.js';
import { hashBlocksInto, DIGEST_LEN } from '../../src/hash/blake3.js';
import { DeltaFileWriter } from '../../src/io/delta-file.js';

/** The manifest fingerprint of an image held in memory. */
export function fingerprintOf(data: Buffer, blockSize: number): Buffer {
  const digests = Buffer.alloc(blockCount(data.length, blockSize) * DIGEST_LEN);
  hashBlocksInto(data, blockSize, digests);
  return blake3(Buffer.concat([fingerprintPrefix(blockSize, data.length), digests]));
}

export interface MemberSpec {
  base: Buffer;
  result: Buffer;
  name?: string;
  kind?: DeltaKind;
}

/** Write a delta file whose members turn each `base` into its `result`. */
export async function writeDelta(path: string, members: MemberSpec[], blockSize: number, compression: DeltaCompression = 'none'): Promise<void> {
  const w = await DeltaFileWriter.create(path, compression);
  for (const m of members) {
    w.beginMember({ kind: m.kind ?? 'forward', blockSize, baseSize: m.base.length, resultSize: m.result.length, name: m.name, createdMs: 1_700_000_000_000 });
    const resized = Buffer.alloc(m.result.length);
    m.base.copy(resized, 0, 0, Math.min(m.base.length, m.result.length));
    for (let i = 0; i < blockCount(m.result.length, blockSize); i++) {
      const a = resized.subarray(i * blockSize, (i + 1) * blockSize);
      const b = m.result.subarray(i * blockSize, (i + 1) * blockSize);
      // Blocks wholly past the base's end get a record even when zero, as qsync's writers do (a result is never larger than base + records).
      if (!a.equals(b) || i * blockSize >= m.base.length) await w.addBlock(i, b);
    }
    await w.endMember({ baseFingerprint: fingerprintOf(m.base, blockSize), resultFingerprint: fingerprintOf(m.result, blockSize) });
  }
  await w.finish();
}
