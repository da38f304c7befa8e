/**
 * Image-mode figures for issue 5 (not a pass/fail test): run with
 *   QSYNC_BENCH=1 npx vitest run test/image-bench.test.ts
 * Prints: incremental bytes read vs dirty, fixed setup overhead, read rate vs
 * nbdcopy to null:, and the 1 TiB dirty map time vs nbdinfo --map.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '../src/io/nbd/client.js';
import { dirtyBitmapContext } from '../src/io/nbd/constants.js';
import { runImageBackup } from '../src/sync/image-backup.js';
import { needTools } from './helpers/env.js';
import { qemuIo, useQsd, withExport } from './helpers/qemu.js';

const GiB = 1 << 30;
const bench = process.env.QSYNC_BENCH === '1' && needTools('qemu-storage-daemon', 'nbdcopy', 'nbdinfo');
const ms = (t0: number): number => Math.round((performance.now() - t0) * 10) / 10;
const rate = (bytes: number, msec: number): string => `${((bytes / msec) * 1000 / 1e9).toFixed(2)} GB/s`;

/** `count` distinct random 64 KiB-aligned offsets below `size`. */
function scattered(size: number, count: number): number[] {
  const set = new Set<number>();
  while (set.size < count) set.add(Math.floor(Math.random() * (size / 65536)) * 65536);
  return [...set].sort((a, b) => a - b);
}

describe.skipIf(!bench)('image-mode bench: 4 GiB disk, 1% dirty', () => {
  const fx = useQsd('4G', (disk) => qemuIo(disk, 'qcow2', ...[0, 1, 2, 3].map((g) => `write -P 0x5${g} ${g}G 1G`)));

  it('measures', async () => {
    const dest = path.join(fx.dir, 'dest');
    const opts = { qmp: fx.qsd.qmp2, dest, tempDir: fx.dir };
    let t0 = performance.now();
    const [full] = await runImageBackup(opts);
    const fullMs = ms(t0);

    const offsets = scattered(4 * GiB, Math.round((4 * GiB * 0.01) / 65536));
    await withExport(fx.qmp, 'disk0', fx.dir, true, async (c) => {
      const data = Buffer.alloc(65536, 0xc3);
      await Promise.all(offsets.map((o) => c.write(o, data)));
      await c.flush();
    });
    t0 = performance.now();
    const [inc] = await runImageBackup({ ...opts, verifySamplePct: 0 });
    const incMs = ms(t0);
    const [incSampled] = await runImageBackup(opts);

    const nbdcopyMs = await withExport(fx.qmp, 'disk0', fx.dir, false, async () => {
      const uri = `nbd+unix:///x?socket=${path.join(fx.dir, 'test-export.sock')}`;
      const t = performance.now();
      execFileSync('nbdcopy', [uri, 'null:']);
      return ms(t);
    });
    // The same image in file mode (QEMU must let go of it first): a first copy, then a forced -c scan.
    await fx.qmp.close();
    await fx.qsd.kill();
    spawnSync('npx', ['tsc', '-p', '.'], { stdio: 'ignore' });
    const cli = [path.resolve('dist/src/cli/main.js'), fx.disk, path.join(fx.dir, 'filedest') + '/'];
    execFileSync(process.execPath, cli);
    t0 = performance.now();
    execFileSync(process.execPath, [cli[0]!, '-c', ...cli.slice(1)]);
    const fileScanMs = ms(t0);
    const r = {
      fileModeForcedScan: { ms: fileScanMs, bytes: fs.statSync(fx.disk).size, rate: rate(fs.statSync(fx.disk).size, fileScanMs) },
      full: { ms: fullMs, read: full!.read, setupMs: full!.setupMs, rate: rate(full!.read, fullMs - full!.setupMs) },
      incremental: {
        ms: incMs, dirty: inc!.dirty, read: inc!.read, readOverDirty: inc!.read / inc!.dirty,
        setupMs: Math.round(inc!.setupMs), mapMs: Math.round(inc!.mapMs),
        dirtyRate: rate(inc!.read, incMs - inc!.setupMs - inc!.mapMs),
      },
      incrementalWithDefaultSample: { ms: Math.round(incSampled!.elapsedMs), dirty: incSampled!.dirty, read: incSampled!.read },
      nbdcopyToNull: { ms: nbdcopyMs, bytes: 4 * GiB, rate: rate(4 * GiB, nbdcopyMs) },
    };
    console.log(JSON.stringify(r, null, 2));
    expect(inc!.read).toBe(inc!.dirty);
  });
});

describe.skipIf(!bench)('image-mode bench: dirty map of a 1 TiB sparse disk', () => {
  const fx = useQsd('1T');

  it('measures', async () => {
    await fx.qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'bm0' });
    const offsets = scattered(1024 * GiB, 200);
    await withExport(fx.qmp, 'disk0', fx.dir, true, async (c) => {
      const data = Buffer.alloc(65536, 0x77);
      await Promise.all(offsets.map((o) => c.write(o, data)));
    });
    await fx.qmp.execute('block-dirty-bitmap-disable', { node: 'disk0', name: 'bm0' });
    const sock = path.join(fx.dir, 'map.sock');
    await fx.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await fx.qmp.execute('block-export-add', { type: 'nbd', id: 'm', 'node-name': 'disk0', writable: false, name: 'm', bitmaps: ['bm0'] });
    const uri = `nbd+unix:///m?socket=${sock}`;
    const ours: number[] = [];
    const theirs: number[] = [];
    let extents = 0;
    for (let i = 0; i < 5; i++) {
      let t0 = performance.now();
      const c = await NbdClient.connect(uri, { metaContexts: [dirtyBitmapContext('bm0')] });
      extents = 0;
      for await (const e of c.extents(0, c.size)) if (e.dirty) extents++;
      await c.close();
      ours.push(ms(t0));
      t0 = performance.now();
      const out = execFileSync('nbdinfo', ['--map=qemu:dirty-bitmap:bm0', uri], { encoding: 'utf8' });
      theirs.push(ms(t0));
      expect(out.split('\n').filter((l) => / 1 +dirty/.test(l)).length).toBe(extents);
    }
    const median = (a: number[]): number => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]!;
    console.log(JSON.stringify({ size: '1 TiB', dirtyExtents: extents, oursMs: median(ours), nbdinfoMs: median(theirs), ours, theirs }, null, 2));
    fs.rmSync(sock, { force: true });
  });
});
