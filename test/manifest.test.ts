/**
 * The manifest codec and store, fed hostile files: every truncation, bit
 * flips anywhere, and headers that claim huge sizes or counts. A manifest is
 * either read back exactly or refused with a FORMAT error; never trusted
 * wrongly, never a crash.
 */
import { randomBytes, randomInt } from 'node:crypto';
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { QsyncError } from '../src/core/errors.js';
import { decodeManifestHeader, encodeManifestHeader, MANIFEST_HEADER_LEN, type ManifestHeader } from '../src/core/manifest.js';
import { hashBlocksInto } from '../src/hash/blake3.js';
import { encodeJournal, journalPathFor, ManifestWriter, openManifest } from '../src/sync/manifest-store.js';

const dir = mkdtempSync(join(tmpdir(), 'qsync-manifest-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const BS = 4096;
const SIZE = 37 * BS + 100;
const header: ManifestHeader = {
  blockSize: BS,
  targetSize: SIZE,
  sourceSize: SIZE,
  sourceMtimeNs: 1_700_000_000_123_456_789n,
  targetMtimeNs: 1_700_000_000_123_456_000n,
  targetIno: 123456n,
  targetDev: 2049n,
};
const data = randomBytes(SIZE);
const digests = new Uint8Array(38 * 32);
hashBlocksInto(data, BS, digests);

async function writeValid(path: string): Promise<void> {
  const w = await ManifestWriter.create(path, BS, SIZE);
  await w.append(digests.subarray(0, 20 * 32));
  await w.append(digests.subarray(20 * 32));
  const { blockSize: _b, targetSize: _t, ...rest } = header;
  await w.commit(rest);
}

async function expectRefused(path: string): Promise<void> {
  const e = await openManifest(path).then(
    (m) => m?.close().then(() => undefined),
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(QsyncError);
  expect((e as QsyncError).code).toBe('FORMAT');
}

describe('manifest codec', () => {
  it('round-trips a header', () => {
    expect(decodeManifestHeader(encodeManifestHeader(header))).toEqual(header);
  });

  it('writes and reads back every digest, with a stable fingerprint', async () => {
    const p = join(dir, 'ok.qsm');
    await writeValid(p);
    const m = (await openManifest(p))!;
    expect(m.header).toEqual(header);
    const out = new Uint8Array(38 * 32);
    await m.readDigests(0, 38, out);
    expect(Buffer.from(out).equals(Buffer.from(digests))).toBe(true);
    await m.close();
    await writeValid(join(dir, 'again.qsm'));
    const again = (await openManifest(join(dir, 'again.qsm')))!;
    expect(again.fingerprint.equals(m.fingerprint)).toBe(true);
    await again.close();
  });

  it('a missing manifest is "none", not an error', async () => {
    expect(await openManifest(join(dir, 'nope.qsm'))).toBeUndefined();
  });

  it('refuses every truncation', async () => {
    const p = join(dir, 'ok.qsm');
    const whole = readFileSync(p);
    const t = join(dir, 'trunc.qsm');
    for (let len = 0; len < whole.length; len += len < 200 ? 1 : 97) {
      writeFileSync(t, whole.subarray(0, len));
      await expectRefused(t);
    }
  });

  it('refuses 300 random bit flips and padding', async () => {
    const whole = readFileSync(join(dir, 'ok.qsm'));
    const t = join(dir, 'flip.qsm');
    for (let i = 0; i < 300; i++) {
      const b = Buffer.from(whole);
      const at = randomInt(b.length);
      b[at] ^= 1 << randomInt(8);
      writeFileSync(t, b);
      await expectRefused(t);
    }
    writeFileSync(t, Buffer.concat([whole, Buffer.alloc(1)]));
    await expectRefused(t);
  });

  it('refuses huge sizes and counts before allocating or reading anything', () => {
    const h = encodeManifestHeader(header);
    const huge = Buffer.from(h);
    huge.writeBigUInt64LE(2n ** 63n, 16);
    expect(() => decodeManifestHeader(huge)).toThrow(/target size .* out of range/);
    const count = Buffer.from(h);
    count.writeBigUInt64LE(2n ** 40n, 24);
    expect(() => decodeManifestHeader(count)).toThrow(/block count/);
    const bs = Buffer.from(h);
    bs.writeUInt32LE(3000, 12);
    expect(() => decodeManifestHeader(bs)).toThrow(/block size 3000/);
    const version = Buffer.from(h);
    version.writeUInt16LE(9, 8);
    expect(() => decodeManifestHeader(version)).toThrow(/unsupported version 9/);
    expect(() => decodeManifestHeader(h.subarray(0, MANIFEST_HEADER_LEN - 1))).toThrow(/truncated/);
  });
});

describe('updating a manifest', () => {
  const blocks = 70_000; // more than the patch limit, so both ways are exercised
  const size = blocks * BS;
  const identity = { sourceSize: size, sourceMtimeNs: 1n, targetMtimeNs: 2n, targetIno: 3n, targetDev: 4n };

  async function write(path: string, all: Buffer, base?: Awaited<ReturnType<typeof openManifest>>, changedOf?: (first: number, n: number) => number[]) {
    const w = await ManifestWriter.create(path, BS, size, base);
    for (let first = 0; first < blocks; first += 1000) {
      const n = Math.min(1000, blocks - first);
      await w.append(all.subarray(first * 32, (first + n) * 32), changedOf?.(first, n) ?? []);
    }
    return w.commit(identity);
  }

  async function readAll(path: string): Promise<Buffer> {
    const m = (await openManifest(path))!;
    const out = Buffer.alloc(blocks * 32);
    await m.readDigests(0, blocks, out);
    await m.close();
    return out;
  }

  it.each([
    ['a few changed blocks: patched in place, no temp file', 500],
    ['more changes than the patch limit: a whole new manifest', 40_000],
  ])('%s', async (_name, nChanged) => {
    const path = join(dir, `update-${nChanged}.qsm`);
    const old = randomBytes(blocks * 32);
    await write(path, old);
    const next = Buffer.from(old);
    const changed = new Set<number>();
    while (changed.size < nChanged) changed.add(randomInt(blocks));
    for (const b of changed) randomBytes(32).copy(next, b * 32);
    const base = (await openManifest(path))!;
    const inodeBefore = statSync(path).ino;
    await write(path, next, base, (first, n) => [...changed].filter((b) => b >= first && b < first + n).sort((a, b) => a - b));
    await base.close();
    expect((await readAll(path)).equals(next)).toBe(true);
    // Patching keeps the file (same inode); a whole rewrite renames a new one over it.
    expect(statSync(path).ino === inodeBefore).toBe(nChanged < 32768);
  });
});

describe('reading digests', () => {
  it('concurrent reads of scattered blocks each get their own digests', async () => {
    const p = join(dir, 'ok.qsm');
    const m = (await openManifest(p))!;
    const picks = [37, 0, 12, 36, 5, 20, 1];
    const outs = picks.map(() => new Uint8Array(32));
    await Promise.all(picks.map((b, i) => m.readDigests(b, 1, outs[i])));
    await m.close();
    picks.forEach((b, i) => expect(Buffer.from(outs[i]).equals(Buffer.from(digests.subarray(b * 32, b * 32 + 32)))).toBe(true));
  });
});

describe('a patch interrupted by a crash', () => {
  it('a whole journal is applied again on open; a torn one is dropped and the old manifest stands', async () => {
    const base = join(dir, 'j-base.qsm');
    const blocks = 38;
    await writeValid(base);
    const next = Buffer.from(digests);
    const changed = [3, 4, 20, 37];
    for (const b of changed) randomBytes(32).copy(next, b * 32);
    // The manifest a finished patch gives, made on a copy.
    const done = join(dir, 'j-done.qsm');
    copyFileSync(base, done);
    const m = (await openManifest(done))!;
    const w = await ManifestWriter.create(done, BS, SIZE, m);
    await w.append(next.subarray(0, 20 * 32), [3, 4]);
    await w.append(next.subarray(20 * 32), [20, 37]);
    const { blockSize: _b, targetSize: _t, ...rest } = header;
    await w.commit(rest);
    await m.close();
    const finished = readFileSync(done);

    // Crash after the journal was durable and half of the patch applied.
    const torn = join(dir, 'j-torn.qsm');
    copyFileSync(base, torn);
    const patch = Buffer.concat(changed.map((b) => next.subarray(b * 32, b * 32 + 32)));
    const journal = encodeJournal(changed, patch, finished.subarray(0, 80), finished.subarray(finished.length - 64), 80 + blocks * 32);
    writeFileSync(journalPathFor(torn), journal);
    const half = readFileSync(torn);
    next.copy(half, 80 + 3 * 32, 3 * 32, 5 * 32);
    writeFileSync(torn, half);
    const replayed = (await openManifest(torn))!;
    await replayed.close();
    expect(readFileSync(torn).equals(finished)).toBe(true);
    expect(existsSync(journalPathFor(torn))).toBe(false);

    // Crash while the journal itself was being written: the manifest was not touched yet.
    const early = join(dir, 'j-early.qsm');
    copyFileSync(base, early);
    writeFileSync(journalPathFor(early), journal.subarray(0, journal.length - 5));
    const kept = (await openManifest(early))!;
    await kept.close();
    expect(readFileSync(early).equals(readFileSync(base))).toBe(true);
    expect(existsSync(journalPathFor(early))).toBe(false);
  });
});
