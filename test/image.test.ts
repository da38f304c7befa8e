import fs from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { listBitmaps } from '../src/qemu/block.js';
import { QmpClient } from '../src/qemu/qmp.js';
import { runImageBackup, type DiskSummary, type ImageBackupOptions } from '../src/sync/image-backup.js';
import { stateOf } from './helpers/cli.js';
import { needTools } from './helpers/env.js';
import { qemuIo, readLive, useQsd, withExport } from './helpers/qemu.js';

const MiB = 1 << 20;


/** Write through an export (qemu-storage-daemon has no device for qemu-io); byte 0 = write zeroes. */
const writeLive = (qmp: QmpClient, node: string, dir: string, writes: [offset: number, length: number, byte: number][]): Promise<void> =>
  withExport(qmp, node, dir, true, async (c) => {
    for (const [off, len, byte] of writes) {
      if (byte === 0) await c.writeZeroes(off, len);
      else await c.write(off, Buffer.alloc(len, byte));
    }
    await c.flush();
  });

const sum = (w: [number, number, number][]): number => w.reduce((s, [, l]) => s + l, 0);

async function expectTarget(summary: DiskSummary, live: Buffer): Promise<void> {
  const t = fs.readFileSync(summary.target);
  expect(t.length).toBe(live.length);
  expect(t.equals(live)).toBe(true);
}

describe.skipIf(!needTools('qemu-storage-daemon', 'qemu-img', 'qemu-io'))('image mode against qemu-storage-daemon', () => {
  const fx = useQsd('128M', (disk) => qemuIo(disk, 'qcow2', 'write -P 0x11 0 8M', 'write -P 0x22 64M 1M', 'write -P 0x33 127M 1M'));
  let dest: string;
  const opts = (extra: Partial<ImageBackupOptions> = {}): ImageBackupOptions => ({ qmp: fx.qsd.qmp2, dest, tempDir: fx.dir, ...extra });
  beforeAll(() => {
    dest = path.join(fx.dir, 'dest');
  });

  it('first run reads allocated extents only; the next reads only dirty extents', async () => {
    const [full] = await runImageBackup(opts());
    expect(full!.mode).toBe('full');
    expect(full!.reason).toBe('first run');
    expect(full!.read).toBe(10 * MiB);
    await expectTarget(full!, await readLive(fx.qmp, 'disk0', fx.dir));
    // Holes stay holes.
    expect(fs.statSync(full!.target).blocks * 512).toBeLessThan(16 * MiB);

    const writes: [number, number, number][] = [[1 * MiB, 64 << 10, 0xa1], [40 * MiB, 256 << 10, 0xa2], [64 * MiB, 128 << 10, 0], [100 * MiB, 64 << 10, 0xa3]];
    await writeLive(fx.qmp, 'disk0', fx.dir, writes);
    const [inc] = await runImageBackup(opts({ verifySamplePct: 0 }));
    expect(inc!.mode).toBe('bitmap');
    expect(inc!.dirty).toBe(sum(writes));
    // The zeroed range is known zero from base:allocation: not read.
    expect(inc!.read).toBe(sum(writes) - (128 << 10));
    expect(inc!.written).toBe(sum(writes) - (128 << 10));
    await expectTarget(inc!, await readLive(fx.qmp, 'disk0', fx.dir));

    // Nothing written since: nothing dirty; the sample re-reads about 0.5% of the clean blocks.
    const [idle] = await runImageBackup(opts());
    expect(idle!.mode).toBe('bitmap');
    expect(idle!.dirty).toBe(0);
    expect(idle!.written).toBe(0);
    expect(idle!.read).toBeLessThanOrEqual(Math.ceil(2048 * 0.005) * 65536);
    // Only this target's bitmap remains, and no temp node, job or export.
    const bitmaps = await listBitmaps(fx.qmp, 'disk0');
    expect(bitmaps.map((b) => b.name)).toHaveLength(1);
    expect(await fx.qmp.execute('query-block-exports')).toEqual([]);
    expect(await fx.qmp.execute('query-jobs')).toEqual([]);
  });

  it('keeps separate bitmaps for two targets of one disk, and never touches foreign bitmaps', async () => {
    await fx.qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'someone-elses' });
    const dest2 = path.join(fx.dir, 'dest2');
    await runImageBackup(opts({ dest: dest2 }));
    await writeLive(fx.qmp, 'disk0', fx.dir, [[2 * MiB, 64 << 10, 0xb1]]);
    const [a] = await runImageBackup(opts({ verifySamplePct: 0 }));
    await writeLive(fx.qmp, 'disk0', fx.dir, [[3 * MiB, 64 << 10, 0xb2]]);
    const [b] = await runImageBackup(opts({ dest: dest2, verifySamplePct: 0 }));
    expect(a!.dirty).toBe(64 << 10);
    // dest2 saw both writes since its own last run.
    expect(b!.dirty).toBe(128 << 10);
    const live = await readLive(fx.qmp, 'disk0', fx.dir);
    await expectTarget(b!, live);
    const names = (await listBitmaps(fx.qmp, 'disk0')).map((x) => x.name);
    expect(names).toContain('someone-elses');
    expect(names.filter((n) => n.startsWith('qsync-'))).toHaveLength(2);
    const [a2] = await runImageBackup(opts({ verifySamplePct: 0 }));
    expect(a2!.dirty).toBe(64 << 10);
    await expectTarget(a2!, live);
  });

  it('catches a bitmap that missed a write with the sample check, and goes full', async () => {
    await runImageBackup(opts());
    await writeLive(fx.qmp, 'disk0', fx.dir, [[5 * MiB, 64 << 10, 0xc1]]);
    const ours = (await listBitmaps(fx.qmp, 'disk0')).filter((b) => b.name.startsWith('qsync-'));
    // Clear qsync's bitmaps by hand: the first write is forgotten by change tracking.
    for (const b of ours) await fx.qmp.execute('block-dirty-bitmap-clear', { node: 'disk0', name: b.name });
    await writeLive(fx.qmp, 'disk0', fx.dir, [[6 * MiB, 64 << 10, 0xc2]]);
    const warnings: string[] = [];
    const [r] = await runImageBackup(opts({ verifySamplePct: 100 }), { warning: (m) => warnings.push(m) });
    expect(r!.mode).toBe('full');
    expect(r!.reason).toMatch(/verify sample/);
    expect(warnings).toHaveLength(1);
    await expectTarget(r!, await readLive(fx.qmp, 'disk0', fx.dir));
  });

  it('falls back to full when the manifest the bitmap belongs to is gone, and cleans up after a failure', async () => {
    fs.rmSync(path.join(stateOf(dest), 'manifests'), { recursive: true });
    await writeLive(fx.qmp, 'disk0', fx.dir, [[7 * MiB, 64 << 10, 0xd1]]);
    const [r] = await runImageBackup(opts());
    expect(r!.mode).toBe('full');
    expect(r!.method).toBe('compare');
    expect(r!.written).toBe(64 << 10);
    await expectTarget(r!, await readLive(fx.qmp, 'disk0', fx.dir));

    // Interrupted mid-run: everything is torn down and the frozen bitmap folded back.
    await writeLive(fx.qmp, 'disk0', fx.dir, [[9 * MiB, 64 << 10, 0xd2]]);
    const ac = new AbortController();
    await expect(runImageBackup(opts({ signal: ac.signal }), { fileStart: () => ac.abort() })).rejects.toMatchObject({ code: 'INTERRUPTED' });
    expect(await fx.qmp.execute('query-block-exports')).toEqual([]);
    expect(await fx.qmp.execute('query-jobs')).toEqual([]);
    expect(fs.readdirSync(fx.dir).filter((f) => f.includes('fleece'))).toEqual([]);
    await writeLive(fx.qmp, 'disk0', fx.dir, [[10 * MiB, 64 << 10, 0xd3]]);
    const [next] = await runImageBackup(opts({ verifySamplePct: 0 }));
    expect(next!.mode).toBe('bitmap');
    expect(next!.dirty).toBe(128 << 10);
    await expectTarget(next!, await readLive(fx.qmp, 'disk0', fx.dir));
  });
  it('zeroed ranges become holes in the target without being read; a resize turns the run full', async () => {
    const [before] = await runImageBackup(opts({ verifySamplePct: 0 }));
    const allocated = (f: string): number => fs.statSync(f).blocks * 512;
    const had = allocated(before!.target);
    await writeLive(fx.qmp, 'disk0', fx.dir, [[0, 4 * MiB, 0]]);
    const [r] = await runImageBackup(opts({ verifySamplePct: 0 }));
    expect(r!.mode).toBe('bitmap');
    expect(r!.dirty).toBe(4 * MiB);
    expect(r!.read).toBe(0);
    expect(r!.written).toBe(0);
    expect(r!.zero).toBe(4 * MiB);
    expect(had - allocated(r!.target)).toBeGreaterThanOrEqual(4 * MiB);
    await expectTarget(r!, await readLive(fx.qmp, 'disk0', fx.dir));

    await fx.qmp.execute('block_resize', { 'node-name': 'disk0', size: 160 * MiB });
    const notices: string[] = [];
    const [g] = await runImageBackup(opts(), { notice: (m) => notices.push(m) });
    expect(g!.mode).toBe('full');
    expect(g!.reason).toMatch(/resized/);
    expect(notices.join()).toMatch(/resized.*full run/);
    expect(g!.size).toBe(160 * MiB);
    await expectTarget(g!, await readLive(fx.qmp, 'disk0', fx.dir));
  });
  it('refuses to share an NBD server someone else runs, and loses no change by failing', async () => {
    await runImageBackup(opts({ verifySamplePct: 0 }));
    await writeLive(fx.qmp, 'disk0', fx.dir, [[12 * MiB, 64 << 10, 0xe1]]);
    await fx.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: path.join(fx.dir, 'other.sock') } } });
    try {
      await expect(runImageBackup(opts())).rejects.toMatchObject({ code: 'LOCKED' });
    } finally {
      await fx.qmp.execute('nbd-server-stop');
    }
    expect(await fx.qmp.execute('query-jobs')).toEqual([]);
    await writeLive(fx.qmp, 'disk0', fx.dir, [[13 * MiB, 64 << 10, 0xe2]]);
    const [r] = await runImageBackup(opts({ verifySamplePct: 0 }));
    expect(r!.mode).toBe('bitmap');
    expect(r!.dirty).toBe(128 << 10);
    await expectTarget(r!, await readLive(fx.qmp, 'disk0', fx.dir));
  });
});
