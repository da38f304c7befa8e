import { randomBytes, randomInt } from 'node:crypto';
import { mkdtemp, readdir, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { decodeHeader, encodeHeader, encodeRecord, encodeTrailer, FRAME_LEN, type DeltaHeader, type DeltaRecord } from '../src/core/delta-codec.js';
import { DeltaDecoder } from '../src/core/delta-decoder.js';
import { QsyncError } from '../src/core/errors.js';
import { applyDelta } from '../src/sync/delta-apply.js';
import { stateOf } from './helpers/cli.js';
import { writeDelta } from './helpers/delta.js';

const bs = 4096;

/** Where the frames of a valid delta are, to forge well-sealed frames with hostile values. */
function layout(bytes: Buffer): { header: DeltaHeader; records: { at: number; r: DeltaRecord }[]; trailerAt: number } {
  let header: DeltaHeader | undefined;
  const records: { at: number; r: DeltaRecord }[] = [];
  let trailerAt = 0;
  const d = new DeltaDecoder({ header: (h) => void (header = h), record: (r, _p, at) => void records.push({ at: at.offset, r }), trailer: (_t, _h, at) => void (trailerAt = at.offset) });
  d.write(bytes);
  d.end();
  return { header: header!, records, trailerAt };
}

const HUGE = [2 ** 53, 2 ** 63, 2 ** 64 - 1, 2 ** 32, 2 ** 31, -1];
const pick = <T>(a: T[]): T => a[randomInt(a.length)];
/** Write a u64 that may exceed 2^53 or be "negative" (all ones). */
const u64 = (b: Buffer, off: number, v: number) => b.writeBigUInt64LE(v < 0 ? 2n ** 64n - 1n : BigInt(Math.min(v, 2 ** 64 - 1)) & (2n ** 64n - 1n), off);

function mutate(valid: Buffer, lay: ReturnType<typeof layout>): Buffer {
  const b = Buffer.from(valid);
  switch (randomInt(9)) {
    case 0:
      return b.subarray(0, randomInt(b.length));
    case 1:
      for (let k = randomInt(1, 5); k > 0; k--) b[randomInt(b.length)] ^= 1 << randomInt(8);
      return b;
    case 2:
      u64(b, randomInt(b.length - 8), pick(HUGE));
      return b;
    case 3: {
      // A well-sealed record with an out-of-range index or payload length.
      const { at, r } = pick(lay.records);
      const forged = randomInt(2) ? { ...r, index: pick([16, 17, 1000, 2 ** 40, 2 ** 53 - 1]) } : { ...r, payloadLength: pick([0, bs + 1, 2 ** 31, 2 ** 32 - 1]) };
      encodeRecord(forged, b, at);
      return b;
    }
    case 4: {
      const { at, r } = pick(lay.records);
      encodeRecord({ ...r, kind: r.kind === 'data' ? 'zero' : 'data', payloadLength: r.kind === 'data' ? 0 : r.payloadLength }, b, at);
      return b;
    }
    case 5:
      encodeTrailer({ recordCount: pick([0, lay.records.length + 1, 2 ** 53 - 1]), streamHash: randomBytes(32) }, b, lay.trailerAt);
      return b;
    case 6: {
      // A well-sealed header with hostile sizes or block size.
      const h = decodeHeader(b, 0, { offset: 0 });
      const forged = pick([{ ...h, resultSize: pick([0, 2 ** 53 - 1, bs]) }, { ...h, baseSize: 2 ** 50 }, { ...h, blockSize: pick([512, 2 ** 30, 3000]) }]);
      try {
        encodeHeader(forged, b, 0);
      } catch {
        b[12] ^= 0x40;
      }
      return b;
    }
    case 7: {
      const from = randomInt(b.length);
      const len = randomInt(1, FRAME_LEN * 3);
      return Buffer.concat([b.subarray(0, from), b.subarray(from + len)]);
    }
    default:
      return Buffer.concat([b, randomInt(2) ? randomBytes(randomInt(1, 200)) : b.subarray(0, randomInt(1, 300))]);
  }
}

describe('hostile deltas', () => {
  it('1,000 random mutations: each rejected with a FORMAT/BASE_MISMATCH error saying where, the target unchanged', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'qsync-hostile-'));
    const base = randomBytes(bs * 16);
    const result = Buffer.from(base);
    randomBytes(bs * 3).copy(result, bs * 2);
    Buffer.from('compressible '.repeat(1000)).copy(result, bs * 8);
    result.fill(0, bs * 12, bs * 13);
    const valid = join(dir, 'valid.qdelta');
    await writeDelta(valid, [{ base, result }], bs, 'brotli');
    const bytes = await readFile(valid);
    const lay = layout(bytes);
    const target = join(dir, 'disk.img');
    await writeFile(target, base);
    const hostile = join(dir, 'hostile.qdelta');
    const codes = new Map<string, number>();
    for (let i = 0; i < 1000; i++) {
      const m = mutate(bytes, lay);
      await writeFile(hostile, m);
      const err = await applyDelta(hostile, target).then(
        () => undefined,
        (e: unknown) => e,
      );
      if (err === undefined) {
        // Only a mutation that changed nothing that matters may apply, and then it must give the result.
        expect((await readFile(target)).equals(result)).toBe(true);
        await writeFile(target, base);
        continue;
      }
      expect(err, String(err)).toBeInstanceOf(QsyncError);
      const e = err as QsyncError;
      expect(['FORMAT', 'BASE_MISMATCH']).toContain(e.code);
      if (e.code === 'FORMAT') expect(e.message).toMatch(/offset \d+/);
      codes.set(e.code, (codes.get(e.code) ?? 0) + 1);
      expect((await readFile(target)).equals(base), `mutation ${i}: ${e.message}`).toBe(true);
    }
    expect(codes.get('FORMAT')).toBeGreaterThan(900);
    // No apply intent or scratch left behind by a rejected delta.
    expect((await readdir(join(stateOf(dir), 'manifests')).catch(() => [])).filter((n) => n.includes('apply'))).toEqual([]);
  });
});
