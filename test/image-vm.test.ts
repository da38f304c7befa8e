import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient } from '../src/qemu/qmp.js';
import { runImageBackup, type ImageBackupOptions } from '../src/sync/image-backup.js';
import { needTools } from './helpers/env.js';
import { qemuImgCreate, qemuIo, readLive, run, startQsd, startVm, tmpDir, type QemuProcess } from './helpers/qemu.js';

const MiB = 1 << 20;

/** A guest write: through the device's own backend, as the guest's would go. */
async function guestWrite(qmp: QmpClient, cmd: string): Promise<void> {
  const out = await qmp.execute<string>('human-monitor-command', { 'command-line': `qemu-io -d vda/virtio-backend "${cmd}"` });
  expect(out).not.toMatch(/error|failed/i);
}


const equalsTarget = (target: string, live: Buffer): boolean => fs.readFileSync(target).equals(live);

describe.skipIf(!needTools('qemu-system-x86_64', 'qemu-img', 'qemu-io'))('image mode against a running q35 VM', () => {
  let dir: string;
  let disk: string;
  let vm: QemuProcess;
  let qmp: QmpClient;
  let dest: string;
  const opts = (extra: Partial<ImageBackupOptions> = {}): ImageBackupOptions => ({ qmp: vm.qmp2, dest, tempDir: dir, ...extra });
  const boot = async (): Promise<void> => {
    vm = await startVm(dir, disk);
    qmp = await QmpClient.connect(vm.qmp);
  };

  beforeAll(async () => {
    dir = tmpDir();
    disk = path.join(dir, 'disk.qcow2');
    dest = path.join(dir, 'dest');
    qemuImgCreate(disk, '128M');
    qemuIo(disk, 'qcow2', 'write -P 0x11 0 32M', 'write -P 0x12 100M 8M');
    await boot();
  });
  afterAll(async () => {
    await qmp?.close();
    await vm?.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('finds the disk by device id, names the target after its file; full, then guest writes, then only dirty extents; writes during a backup land in the next', async () => {
    expect((await qmp.execute<{ status: string }>('query-status')).status).toBe('running');
    const [full] = await runImageBackup(opts({ drives: ['vda'] }));
    expect(full!.name).toBe('disk');
    expect(full!.target).toBe(path.join(dest, 'disk.raw'));
    expect(full!.node).toBe('drive0');
    expect(full!.read).toBe(40 * MiB);
    expect(equalsTarget(full!.target, await readLive(qmp, 'drive0', dir))).toBe(true);

    await guestWrite(qmp, 'write -P 0xee 2M 64k');
    await guestWrite(qmp, 'write -P 0xef 50M 192k');
    const before = await readLive(qmp, 'drive0', dir);
    // Written while the backup runs (after its fleece transaction): not in this backup.
    let during: Promise<void> | undefined;
    const [inc] = await runImageBackup(opts({ verifySamplePct: 0 }), {
      fileStart: () => {
        during = guestWrite(qmp, 'write -P 0xdd 2M 128k').then(() => guestWrite(qmp, 'write -P 0xdc 120M 64k'));
      },
    });
    await during;
    expect(inc!.mode).toBe('bitmap');
    expect(inc!.dirty).toBe(256 << 10);
    expect(inc!.read).toBe(256 << 10);
    expect(equalsTarget(inc!.target, before)).toBe(true);

    const [next] = await runImageBackup(opts({ verifySamplePct: 0 }));
    expect(next!.mode).toBe('bitmap');
    expect(next!.dirty).toBe(192 << 10);
    expect(equalsTarget(next!.target, await readLive(qmp, 'drive0', dir))).toBe(true);
  });

  it('qsync killed mid-backup: the next run still captures every change', async () => {
    await guestWrite(qmp, 'write -P 0xa1 10M 64k');
    // A separate qsync process (compiled), killed with SIGKILL once its fleece export exists.
    // Errors elsewhere in the tree do not stop tsc from emitting this module.
    spawnSync('npx', ['tsc', '-p', '.'], { stdio: 'ignore' });
    const mod = path.resolve('dist/src/sync/image-backup.js');
    expect(fs.existsSync(mod)).toBe(true);
    const child = spawn(process.execPath, ['--input-type=module', '-e',
      `const m = await import(${JSON.stringify(mod)}); await m.runImageBackup(${JSON.stringify({ ...opts(), verifySamplePct: 0 })}); setTimeout(() => {}, 60000);`,
    ], { stdio: 'ignore' });
    try {
      for (let i = 0; i < 400; i++) {
        const ex = await qmp.execute<{ id: string }[]>('query-block-exports');
        if (ex.some((e) => e.id.startsWith('qsync-'))) break;
        await new Promise((r) => setTimeout(r, 10));
      }
    } finally {
      child.kill('SIGKILL');
    }
    await new Promise((r) => child.once('exit', r));
    await guestWrite(qmp, 'write -P 0xa2 11M 64k');
    const [r] = await runImageBackup(opts({ verifySamplePct: 0 }));
    expect(r!.mode, r!.reason).toBe('bitmap');
    expect(r!.dirty).toBeGreaterThanOrEqual(128 << 10);
    expect(equalsTarget(r!.target, await readLive(qmp, 'drive0', dir))).toBe(true);
    expect(await qmp.execute('query-block-exports')).toEqual([]);
    expect(fs.readdirSync(dir).filter((f) => f.includes('fleece'))).toEqual([]);
  });

  it('QEMU killed (bitmap left in use): the next run is full and correct', async () => {
    await guestWrite(qmp, 'write -P 0xb1 12M 64k');
    await qmp.close();
    await vm.kill('SIGKILL');
    await boot();
    await guestWrite(qmp, 'write -P 0xb2 13M 64k');
    const notices: string[] = [];
    const [r] = await runImageBackup(opts(), { notice: (m) => notices.push(m) });
    expect(r!.mode).toBe('full');
    expect(r!.reason).toMatch(/gone|inconsistent/);
    expect(notices.join('\n')).toMatch(/full run/);
    expect(equalsTarget(r!.target, await readLive(qmp, 'drive0', dir))).toBe(true);
  });
});

describe.skipIf(!needTools('qemu-storage-daemon', 'qemu-img', 'qemu-io'))('image mode on an offline image (--image)', () => {
  let dir: string;
  let disk: string;
  beforeAll(() => {
    dir = tmpDir();
    disk = path.join(dir, 'vm1.qcow2');
    qemuImgCreate(disk, '64M');
    qemuIo(disk, 'qcow2', 'write -P 0x21 0 4M');
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  const raw = (): Buffer => {
    run('qemu-img', ['convert', '-O', 'raw', disk, path.join(dir, 'expect.raw')]);
    return fs.readFileSync(path.join(dir, 'expect.raw'));
  };

  it('uses the persistent bitmap it left in the image, and refuses an image a QEMU holds open', async () => {
    const dest = path.join(dir, 'dest');
    const [full] = await runImageBackup({ image: disk, dest, tempDir: dir });
    expect(full!.name).toBe('vm1');
    expect(full!.mode).toBe('full');
    expect(full!.read).toBe(4 * MiB);
    expect(equalsTarget(full!.target, raw())).toBe(true);
    expect(run('qemu-img', ['info', disk])).toMatch(/qsync-/);

    // The VM runs (here: qemu-io) and its writes are recorded in the persistent bitmap.
    qemuIo(disk, 'qcow2', 'write -P 0x22 1M 64k', 'write -P 0x23 30M 128k');
    const [inc] = await runImageBackup({ image: disk, dest, tempDir: dir, verifySamplePct: 0 });
    expect(inc!.mode).toBe('bitmap');
    expect(inc!.read).toBe(192 << 10);
    expect(equalsTarget(inc!.target, raw())).toBe(true);

    const holder = await startQsd(dir, disk, 'held');
    try {
      await expect(runImageBackup({ image: disk, dest, tempDir: dir })).rejects.toMatchObject({ code: 'LOCKED' });
    } finally {
      await holder.kill();
    }
  });
});
