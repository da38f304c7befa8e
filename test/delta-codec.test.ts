import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import {
  decodeFrame,
  decodeHeader,
  encodeHeader,
  encodeRecord,
  encodeTrailer,
  FRAME_LEN,
  headerLength,
  type DeltaHeader,
} from '../src/core/delta-codec.js';
import { DeltaDecoder } from '../src/core/delta-decoder.js';
import { QsyncError } from '../src/core/errors.js';
import { writeDelta } from './helpers/delta.js';

const header: DeltaHeader = {
  kind: 'reverse',
  compression: 'brotli',
  blockSize: 65536,
  baseSize: 3 * 65536 + 17,
  resultSize: 5 * 65536,
  createdMs: 1_700_000_123_456,
  baseFingerprint: Buffer.alloc(32, 1),
  resultFingerprint: Buffer.alloc(32, 2),
  name: 'vm/disk0.qcow2',
};

/** Feed `bytes` to a decoder in pieces of `step` bytes and list what it reported. */
function decodeAll(bytes: Buffer, step: number): string[] {
  const seen: string[] = [];
  const d = new DeltaDecoder({
    header: (h, at) => seen.push(`H ${at.offset} ${h.name} ${h.baseSize}->${h.resultSize}`),
    record: (r, payload, at) => seen.push(`R#${at.record}@${at.offset} ${r.kind} ${r.index} ${r.payloadLength} ${payload.toString('hex').slice(0, 16)}`),
    trailer: (t, _h, at) => seen.push(`T ${at.offset} ${t.recordCount} ${t.streamHash.toString('hex')}`),
  });
  for (let off = 0; off < bytes.length; off += step) d.write(bytes.subarray(off, off + step));
  d.end();
  return seen;
}

describe('delta codec', () => {
  it('round-trips a header', () => {
    const buf = Buffer.alloc(headerLength(header) + 5);
    expect(encodeHeader(header, buf, 5)).toBe(buf.length);
    expect(decodeHeader(buf, 5, { offset: 5 })).toEqual(header);
  });

  it('round-trips record and trailer frames, checked against the header', () => {
    const buf = Buffer.alloc(FRAME_LEN * 2);
    const rec = { index: 4, kind: 'data' as const, compressed: true, payloadLength: 1000, digest: randomBytes(32) };
    encodeRecord(rec, buf, 0);
    encodeTrailer({ recordCount: 7, streamHash: Buffer.alloc(32, 9) }, buf, FRAME_LEN);
    expect(decodeFrame(buf, 0, header, { offset: 0 })).toEqual({ type: 'record', ...rec });
    expect(decodeFrame(buf, FRAME_LEN, header, { offset: 0 })).toEqual({ type: 'trailer', recordCount: 7, streamHash: Buffer.alloc(32, 9) });
  });

  it('rejects frames outside the header limits before any payload', () => {
    const buf = Buffer.alloc(FRAME_LEN);
    const bad = (r: Parameters<typeof encodeRecord>[0]) => {
      encodeRecord(r, buf, 0);
      return () => decodeFrame(buf, 0, header, { offset: 0, record: 3 });
    };
    const digest = Buffer.alloc(32);
    expect(bad({ index: 5, kind: 'data', compressed: false, payloadLength: 65536, digest })).toThrow(/record #3\): block index 5 out of range/);
    expect(bad({ index: 1, kind: 'data', compressed: false, payloadLength: 2 ** 31, digest })).toThrow(/payload length/);
    expect(bad({ index: 1, kind: 'data', compressed: true, payloadLength: 65537, digest })).toThrow(/payload length/);
    expect(bad({ index: 1, kind: 'zero', compressed: false, payloadLength: 1, digest })).toThrow(/zero record/);
    buf[20] ^= 1;
    expect(() => decodeFrame(buf, 0, header, { offset: 0 })).toThrow(QsyncError);
  });

  it('decodes a file the same whole, in odd pieces and one byte at a time', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'qsync-codec-'));
    const bs = 4096;
    const base = randomBytes(bs * 20 + 100);
    const result = Buffer.concat([base.subarray(0, bs * 3), Buffer.alloc(bs * 2), randomBytes(bs * 30)]);
    const file = join(dir, 'd.qdelta');
    await writeDelta(file, [{ base, result, name: 'a' }, { base: Buffer.alloc(0), result: Buffer.from('hello'), name: 'b' }], bs, 'brotli');
    const bytes = await readFile(file);
    const whole = decodeAll(bytes, bytes.length);
    expect(whole[0]).toMatch(/^H 0 a /);
    expect(whole.filter((l) => l.startsWith('T'))).toHaveLength(2);
    expect(decodeAll(bytes, 977)).toEqual(whole);
    expect(decodeAll(bytes, 1)).toEqual(whole);
  });

  it('says where a truncated stream ends', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'qsync-codec-'));
    const file = join(dir, 'd.qdelta');
    await writeDelta(file, [{ base: Buffer.alloc(8192), result: randomBytes(8192) }], 4096);
    const bytes = await readFile(file);
    expect(() => decodeAll(bytes.subarray(0, bytes.length - 10), 100)).toThrow(/offset \d+, record #2\): truncated/);
    expect(() => decodeAll(Buffer.alloc(0), 1)).toThrow(/truncated inside the header/);
  });
});
