import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { QsyncError } from '../src/core/errors.js';
import { verifyDeltaFile } from '../src/io/delta-file.js';
import { applyDelta } from '../src/sync/delta-apply.js';
import { writeDelta } from './helpers/delta.js';

const bs = 4096;

function mutate(base: Buffer): Buffer {
  const b = Buffer.from(base);
  b.fill(7, bs * 2, bs * 3);
  randomBytes(bs * 2).copy(b, bs * 10);
  return b;
}

async function setup(base: Buffer, result: Buffer, compression: 'none' | 'brotli' = 'none') {
  const dir = await mkdtemp(join(tmpdir(), 'qsync-apply-'));
  const delta = join(dir, 'd.qdelta');
  const target = join(dir, 'disk.img');
  await writeDelta(delta, [{ base, result }], bs, compression);
  await writeFile(target, base);
  return { dir, delta, target };
}

describe('apply', () => {
  it('turns the base into the result; twice is the same; a summary counts records', async () => {
    const base = randomBytes(bs * 40 + 123);
    const result = mutate(base);
    const { delta, target } = await setup(base, result, 'brotli');
    const [summary] = await verifyDeltaFile(delta);
    expect(summary.records).toBe(3);
    expect((await applyDelta(delta, target))[0].status).toBe('applied');
    expect((await readFile(target)).equals(result)).toBe(true);
    // The second time the target's new manifest shows it is already the result.
    expect((await applyDelta(delta, target))[0].status).toBe('already');
    expect((await readFile(target)).equals(result)).toBe(true);
  });

  it.each([
    ['grows', bs * 7 + 5, bs * 12 + 999],
    ['shrinks', bs * 12 + 999, bs * 7 + 5],
    ['starts empty', 0, bs * 3 + 1],
  ])('handles a target that %s', async (_name, from, to) => {
    const base = randomBytes(from);
    const result = Buffer.concat([base.subarray(0, Math.min(from, to) - 700 > 0 ? Math.min(from, to) - 700 : 0), randomBytes(to)]).subarray(0, to);
    const { delta, target } = await setup(base, result);
    await applyDelta(delta, target);
    expect((await readFile(target)).equals(result)).toBe(true);
  });

  it('refuses a wrong base and leaves it untouched', async () => {
    const base = randomBytes(bs * 10);
    const { delta, target } = await setup(base, mutate(base));
    const other = randomBytes(bs * 10);
    await writeFile(target, other);
    const err = await applyDelta(delta, target).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QsyncError);
    expect((err as QsyncError).code).toBe('BASE_MISMATCH');
    expect((await readFile(target)).equals(other)).toBe(true);
  });

  it('applies a batch to a directory, each member to its file', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'qsync-batch-'));
    const a = randomBytes(bs * 5);
    const b = randomBytes(bs * 2 + 1);
    const delta = join(dir, 'batch.qdelta');
    const a2 = mutate(Buffer.concat([a, Buffer.alloc(bs * 8)]));
    await writeDelta(delta, [{ base: a, result: a2, name: 'x/a.img' }, { base: Buffer.alloc(0), result: b, name: 'b.img' }], bs);
    await mkdir(join(dir, 'dst', 'x'), { recursive: true });
    await writeFile(join(dir, 'dst', 'x', 'a.img'), a);
    await applyDelta(delta, join(dir, 'dst'));
    expect((await readFile(join(dir, 'dst', 'x', 'a.img'))).equals(a2)).toBe(true);
    expect((await readFile(join(dir, 'dst', 'b.img'))).equals(b)).toBe(true);
  });
});
