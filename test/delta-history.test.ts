import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, readdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { blockCount } from '../src/core/geometry.js';
import { LocalFileSink } from '../src/io/local-file.js';
import type { BlockSink } from '../src/io/types.js';
import { applyDelta } from '../src/sync/delta-apply.js';
import { ensureHistoryDir, listPoints, openHistoryDir, prune, restorePoint } from '../src/sync/delta-history.js';
import { forwardDeltaSink, openBatch, openHistory, reverseDeltaSink, teeDeltaSink, type DeltaSinkInfo } from '../src/sync/delta-sinks.js';
import { stateOf } from './helpers/cli.js';
import { fingerprintOf } from './helpers/delta.js';

const bs = 4096;

/** What the engine does to a sink: resize, then write the changed blocks in runs (zero runs as writeZeroes), commit. */
async function engineRun(sink: BlockSink, before: Buffer, after: Buffer): Promise<void> {
  if (after.length !== before.length) await sink.truncate(after.length);
  const resized = Buffer.alloc(after.length);
  before.copy(resized, 0, 0, Math.min(before.length, after.length));
  const n = blockCount(after.length, bs);
  for (let i = 0; i < n; ) {
    const differs = (k: number) => !resized.subarray(k * bs, (k + 1) * bs).equals(after.subarray(k * bs, (k + 1) * bs));
    if (!differs(i)) {
      i++;
      continue;
    }
    let j = i + 1;
    while (j < n && differs(j)) j++;
    const run = after.subarray(i * bs, j * bs);
    if (run.every((b) => b === 0)) await sink.writeZeroes(i * bs, run.length);
    else await sink.write(i * bs, run);
    i = j;
  }
  await sink.commit();
  await sink.close();
}

const info = (before: Buffer, after: Buffer): DeltaSinkInfo => ({
  relPath: 'vm/disk.img',
  blockSize: bs,
  oldSize: before.length,
  newSize: after.length,
  fingerprints: () => ({ before: fingerprintOf(before, bs), after: fingerprintOf(after, bs) }),
});

function next(prev: Buffer, k: number): Buffer {
  const size = [bs * 30, bs * 41 + 77, bs * 25 + 3, bs * 25 + 3, bs * 50][k % 5];
  const b = Buffer.alloc(size);
  prev.copy(b, 0, 0, Math.min(prev.length, size));
  randomBytes(bs * 3).copy(b, bs * (2 + k));
  b.fill(0, bs * 10, bs * 12);
  if (size > prev.length) randomBytes(size - prev.length - bs > 0 ? bs : 0).copy(b, prev.length);
  return b;
}

describe('reverse-delta history', () => {
  it('a chain of 5 runs restores every point byte-identical; prune keeps the rest restorable', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'qsync-hist-'));
    const history = join(dir, 'history');
    const mirror = join(dir, 'mirror', 'vm', 'disk.img');
    await mkdir(join(dir, 'mirror', 'vm'), { recursive: true });
    await mkdir(stateOf(join(dir, 'mirror')), { recursive: true, mode: 0o700 }); // the destination root, as a sync leaves it
    const states: Buffer[] = [randomBytes(bs * 20 + 500)];
    await writeFile(mirror, states[0]);
    for (let k = 1; k <= 5; k++) {
      states.push(next(states[k - 1], k));
      await ensureHistoryDir(history);
      const hd = await openHistoryDir(history, true);
      const w = await openHistory(hd, history, Date.UTC(2026, 0, k), 'brotli');
      await engineRun(await reverseDeltaSink(await LocalFileSink.open(mirror, false), w, info(states[k - 1], states[k])), states[k - 1], states[k]);
      await w.finish();
      await hd.close();
    }
    expect((await readFile(mirror)).equals(states[5])).toBe(true);
    const points = await listPoints(history, mirror);
    expect(points.map((p) => p.size)).toEqual([4, 3, 2, 1, 0].map((k) => states[k].length));
    for (let n = 1; n <= 5; n++) {
      const out = join(dir, `at-${n}.img`);
      await restorePoint(history, mirror, String(n), out);
      expect((await readFile(out)).equals(states[5 - n]), `point ${n}`).toBe(true);
    }
    // By time: the state on Jan 3 12:00 is the one run 4 (Jan 4) started from.
    await restorePoint(history, mirror, '2026-01-03T12:00:00Z', join(dir, 'jan3.img'));
    expect((await readFile(join(dir, 'jan3.img'))).equals(states[3])).toBe(true);
    expect((await readFile(mirror)).equals(states[5])).toBe(true);

    expect(await prune(history, 2)).toHaveLength(3);
    expect(await readdir(history)).toHaveLength(2);
    for (let n = 1; n <= 2; n++) {
      const out = join(dir, `pruned-${n}.img`);
      await restorePoint(history, mirror, String(n), out);
      expect((await readFile(out)).equals(states[5 - n])).toBe(true);
    }
    await expect(restorePoint(history, mirror, '3', join(dir, 'gone.img'))).rejects.toThrow(/there are 2 points/);
  });
});

describe('forward-delta sinks', () => {
  it('--only-write-batch leaves the target alone; --write-batch updates it; both deltas apply elsewhere', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'qsync-fwd-'));
    const before = randomBytes(bs * 16 + 9);
    const after = next(before, 1);
    const target = join(dir, 'disk.img');
    await writeFile(target, before);

    const only = await openBatch(join(dir, 'only.qdelta'), 'none');
    await engineRun(forwardDeltaSink(only, info(before, after)), before, after);
    await only.finish();
    expect((await readFile(target)).equals(before)).toBe(true);

    const tee = await openBatch(join(dir, 'tee.qdelta'), 'brotli');
    await engineRun(teeDeltaSink(await LocalFileSink.open(target, false), tee, info(before, after)), before, after);
    await tee.finish();
    expect((await readFile(target)).equals(after)).toBe(true);

    for (const name of ['only', 'tee']) {
      const elsewhere = join(dir, `${name}-copy.img`);
      await writeFile(elsewhere, before);
      await applyDelta(join(dir, `${name}.qdelta`), elsewhere);
      expect((await readFile(elsewhere)).equals(after)).toBe(true);
    }
  });
});
