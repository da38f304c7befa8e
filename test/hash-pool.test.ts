/**
 * The hash pool (src/hash/pool.ts) on real files: chunks come back in file
 * order with the digests of their blocks whatever order the workers finish
 * in, a read that fails is reported with its offset, and the pool is usable
 * again after a failed or abandoned scan.
 */
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { digestOf, DIGEST_LEN } from '../src/hash/blake3.js';
import { HashPool } from '../src/hash/pool.js';
import { randomFile } from './helpers/data.js';

const KiB = 1024;
const BLOCK = 64 * KiB;
let dir: string;
let pool: HashPool;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'qsync-pool-'));
  // Small chunks and a small ring: many hand-overs, workers often ahead of the consumer.
  pool = new HashPool(BLOCK, { workers: 2, chunkSize: 4 * BLOCK, slotsPerWorker: 2 });
});
afterAll(async () => {
  await pool.close();
  rmSync(dir, { recursive: true, force: true });
});

/** Every chunk's offset, and its blocks' digests as one list, in the order onChunk saw them. */
async function scanAll(path: string, opts: { size?: number; from?: number; target?: string; slow?: boolean } = {}) {
  const fd = openSync(path, 'r');
  const tfd = opts.target ? openSync(opts.target, 'r') : undefined;
  const offsets: number[] = [];
  const digests: Buffer[] = [];
  const differs: number[] = [];
  try {
    const size = opts.size ?? readFileSync(path).length;
    await pool.scan({ fd, size, from: opts.from, targetFd: tfd, targetSize: tfd === undefined ? 0 : readFileSync(opts.target!).length, path }, async (c) => {
      offsets.push(c.offset);
      for (let i = 0; i < c.digests.length; i += DIGEST_LEN) digests.push(Buffer.from(c.digests.subarray(i, i + DIGEST_LEN)));
      if (c.differs) differs.push(...c.differs);
      // A consumer slower than the workers at random: they wait for their turn in the ring.
      if (opts.slow && Math.random() < 0.3) await new Promise((r) => setTimeout(r, 2));
    });
  } finally {
    closeSync(fd);
    if (tfd !== undefined) closeSync(tfd);
  }
  return { offsets, digests, differs };
}

const blockDigests = (data: Buffer, from = 0): Buffer[] => {
  const out: Buffer[] = [];
  for (let off = from; off < data.length; off += BLOCK) out.push(digestOf(data.subarray(off, Math.min(off + BLOCK, data.length))));
  return out;
};

describe('hash pool', () => {
  it('hands chunks back in file order with each block digest, a short last block included, however slow the consumer', async () => {
    const path = join(dir, 'a.raw');
    randomFile(path, 9 * 256 * KiB + 3 * BLOCK + 777); // 9 full chunks, then a chunk of 3 blocks and a short one
    const data = readFileSync(path);
    for (const slow of [false, true]) {
      const r = await scanAll(path, { slow });
      expect(r.offsets).toEqual(Array.from({ length: 10 }, (_, i) => i * 256 * KiB));
      expect(r.digests).toEqual(blockDigests(data));
    }
  });

  it('scans from a block-aligned offset on', async () => {
    const path = join(dir, 'a.raw');
    const data = readFileSync(path);
    const r = await scanAll(path, { from: 5 * BLOCK });
    expect(r.offsets[0]).toBe(5 * BLOCK);
    expect(r.digests).toEqual(blockDigests(data, 5 * BLOCK));
  });

  it('compare mode flags exactly the blocks whose target bytes differ, and those past the target end', async () => {
    const src = join(dir, 'a.raw');
    const data = readFileSync(src);
    const t = Buffer.from(data.subarray(0, 30 * BLOCK));
    t[3 * BLOCK + 5] ^= 1;
    t[17 * BLOCK] ^= 1;
    writeFileSync(join(dir, 't.raw'), t);
    const r = await scanAll(src, { target: join(dir, 't.raw') });
    const blocks = Math.ceil(data.length / BLOCK);
    expect(r.differs.flatMap((d, i) => (d ? [i] : []))).toEqual([3, 17, ...Array.from({ length: blocks - 30 }, (_, i) => 30 + i)]);
  });

  it('a source shorter than its listed size fails with the offset of the short read, and the pool scans again afterwards', async () => {
    const path = join(dir, 'short.raw');
    randomFile(path, 20 * BLOCK);
    await expect(scanAll(path, { size: 40 * BLOCK })).rejects.toThrow(/cannot read source .*short\.raw at offset 1310720: short read: 0 of 262144 bytes/);
    const r = await scanAll(path);
    expect(r.digests).toEqual(blockDigests(readFileSync(path)));
  });

  it('a consumer that throws stops the scan, and the next scan starts clean', async () => {
    const path = join(dir, 'a.raw');
    const fd = openSync(path, 'r');
    try {
      let n = 0;
      await expect(
        pool.scan({ fd, size: readFileSync(path).length }, () => {
          if (++n === 3) throw new Error('consumer gave up');
        }),
      ).rejects.toThrow('consumer gave up');
    } finally {
      closeSync(fd);
    }
    const r = await scanAll(path);
    expect(r.digests).toEqual(blockDigests(readFileSync(path)));
  });
});
