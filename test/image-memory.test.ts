/**
 * Image mode's memory does not grow with the disk: a 2 TiB qcow2 holding a
 * few MiB (32 Mi blocks of 64 KiB, 32 windows of the extent map) is backed
 * up, first in full and then incrementally after qemu-io writes, by the
 * qsync command, whose peak RSS stays at or below 100 MiB each time (one
 * byte of state per block took 105 MiB and 113 MiB here), and whose target
 * is the guest view (qemu-img compare) and stays sparse.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runQsync } from './helpers/cli.js';
import { needTools } from './helpers/env.js';
import { qemuImgCreate, qemuIo, run, tmpDir } from './helpers/qemu.js';

const TIB = 2 ** 40;
const GIB = 2 ** 30;
const MIB = 2 ** 20;
/** Past the 512 GiB where one byte per 64 KiB block crossed 100 MiB, and a full run still within seconds. */
const SIZE = 2 * TIB;
const LIMIT_MIB = 100;

describe.skipIf(!needTools('qemu-storage-daemon', 'qemu-img', 'qemu-io'))('qsync --image of a 2 TiB sparse disk', () => {
  let dir: string;
  const img = () => path.join(dir, 'big.qcow2');
  const dest = () => path.join(dir, 'backup');
  const target = () => path.join(dest(), 'big.raw');

  beforeAll(() => {
    dir = tmpDir('qsync-image-memory-');
    // The raw target is as large as the disk, sparse: the test's filesystem must allow such a file.
    const probe = path.join(dir, 'probe');
    fs.writeFileSync(probe, '');
    try {
      fs.truncateSync(probe, SIZE);
    } catch (e) {
      throw new Error(`${dir} cannot hold a sparse file of ${SIZE / TIB} TiB (${(e as Error).message}): point TMPDIR at ext4 or xfs`);
    }
    fs.rmSync(probe);
    qemuImgCreate(img(), `${SIZE}`);
    // Data in the first, a middle and the last window of the map (64 GiB each).
    qemuIo(img(), 'qcow2', 'write -P 0x11 0 1M', `write -P 0x22 ${700 * GIB} 2M`, `write -P 0x33 ${SIZE - MIB} 1M`);
  });
  afterAll(() => {
    // The 1 GiB manifest goes with the test file's state folder (test/helpers/state-base.ts).
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  const identical = (): void => {
    // qemu-img compare exits 0 only when the guest views are the same (a raw target of all zeros where the qcow2 has holes).
    expect(run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', img(), target()])).toMatch(/identical/);
  };

  it('first run in full, then an incremental of what qemu-io wrote: each at most 100 MiB peak RSS, the target the guest view', async () => {
    const first = await runQsync(['--image', img(), '--json', `${dest()}/`], { peakRss: true });
    expect(first.code, first.stderr).toBe(0);
    const full = (JSON.parse(first.stdout) as { disks: { mode: string; size: number; read: number }[] }).disks[0]!;
    expect(full).toMatchObject({ mode: 'full', size: SIZE, read: 4 * MIB });
    expect(first.peakRssMiB).toBeLessThanOrEqual(LIMIT_MIB);
    identical();
    expect(fs.statSync(target()).blocks * 512).toBeLessThan(64 * MIB);

    // Changes in windows the first run found empty and in one it found data in; a zeroed stretch becomes a hole.
    qemuIo(img(), 'qcow2', `write -P 0x44 ${65 * GIB} 1M`, `write -P 0x55 ${700 * GIB + MIB} 64K`, `write -z ${SIZE - MIB} 1M`, `write -P 0x66 ${1500 * GIB} 128K`);
    const second = await runQsync(['--image', img(), '--json', `${dest()}/`], { peakRss: true });
    expect(second.code, second.stderr).toBe(0);
    const inc = (JSON.parse(second.stdout) as { disks: { mode: string; dirty: number; written: number }[] }).disks[0]!;
    expect(inc).toMatchObject({ mode: 'bitmap', dirty: 2 * MIB + 192 * 1024, written: MIB + 192 * 1024 });
    expect(second.peakRssMiB).toBeLessThanOrEqual(LIMIT_MIB);
    identical();
    expect(fs.statSync(target()).blocks * 512).toBeLessThan(64 * MIB);
  });
});
