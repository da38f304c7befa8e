/**
 * Image mode on a VM with two disks (a.qcow2 on vda, b.qcow2 on vdb): both
 * are taken at one instant, a qsync killed on the second disk does not block
 * the next run, a foreign block job is refused before anything changes,
 * targets are named after the image files (and old names adopted), and
 * `qsync forget` drops what a DEST owns.
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { listBitmaps } from '../src/qemu/block.js';
import { QmpClient } from '../src/qemu/qmp.js';
import { runImageBackup, type DiskSummary, type ImageBackupOptions } from '../src/sync/image-backup.js';
import { bitmapPrefix } from '../src/sync/image-names.js';
import { runQsync, stateOf } from './helpers/cli.js';
import { needTools } from './helpers/env.js';
import { qemuImgCreate, qemuIo, readLive, run, startVm, tmpDir, type QemuProcess } from './helpers/qemu.js';

const MiB = 1 << 20;

describe.skipIf(!needTools('qemu-system-x86_64', 'qemu-storage-daemon', 'qemu-img', 'qemu-io'))('image mode on a VM with two disks', () => {
  let dir: string;
  let vm: QemuProcess;
  let qmp: QmpClient;
  let dest: string;
  const disk = (n: 'a' | 'b'): string => path.join(dir, `${n}.qcow2`);
  const opts = (extra: Partial<ImageBackupOptions> = {}): ImageBackupOptions => ({ qmp: vm.qmp2, dest, tempDir: dir, verifySamplePct: 0, ...extra });
  const live = (n: 'a' | 'b'): Promise<Buffer> => readLive(qmp, n === 'a' ? 'drive0' : 'drive1', dir);
  const byName = (r: DiskSummary[], n: string): DiskSummary => r.find((d) => d.name === n)!;
  const same = (file: string, want: Buffer): boolean => fs.readFileSync(file).equals(want);

  async function guestWrite(dev: 'vda' | 'vdb', cmd: string): Promise<void> {
    const out = await qmp.execute<string>('human-monitor-command', { 'command-line': `qemu-io -d ${dev}/virtio-backend "${cmd}"` });
    expect(out).not.toMatch(/error|failed/i);
  }

  async function noLeftovers(): Promise<void> {
    expect(await qmp.execute('query-block-exports')).toEqual([]);
    expect(await qmp.execute('query-jobs')).toEqual([]);
    expect(fs.readdirSync(dir).filter((f) => f.startsWith('qsync-'))).toEqual([]);
  }

  /** A qsync process (compiled) that kills itself (-9) when it starts copying the second disk. */
  async function killedOnSecondDisk(o: ImageBackupOptions): Promise<void> {
    spawnSync('npx', ['tsc', '-p', '.'], { stdio: 'ignore' });
    const mod = path.resolve('dist/src/sync/image-backup.js');
    const child = spawn(process.execPath, ['--input-type=module', '-e',
      `const m = await import(${JSON.stringify(mod)});
       await m.runImageBackup(${JSON.stringify(o)}, { fileStart: (rel) => { if (rel === 'b.raw') process.kill(process.pid, 'SIGKILL'); } });`,
    ], { stdio: 'ignore' });
    const [, signal] = await new Promise<[number | null, string | null]>((res) => child.once('exit', (c, s) => res([c, s])));
    expect(signal).toBe('SIGKILL');
  }

  beforeAll(async () => {
    dir = tmpDir('qsync-disks-');
    dest = path.join(dir, 'dest');
    qemuImgCreate(disk('a'), '64M');
    qemuImgCreate(disk('b'), '64M');
    qemuIo(disk('a'), 'qcow2', 'write -P 0x11 0 8M');
    qemuIo(disk('b'), 'qcow2', 'write -P 0x21 0 8M');
    vm = await startVm(dir, [disk('a'), disk('b')]);
    qmp = await QmpClient.connect(vm.qmp);
  });
  afterAll(async () => {
    await qmp?.close();
    await vm?.kill();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('takes every disk as of one instant: what the guest writes to vdb while vda is copied is not in this backup of vdb', async () => {
    for (const incremental of [false, true]) {
      const b0 = await live('b');
      let during: Promise<void> | undefined;
      const notices: string[] = [];
      const r = await runImageBackup(opts(), {
        notice: (m) => notices.push(m),
        fileStart: (rel) => {
          if (rel === 'a.raw') during = guestWrite('vdb', `write -P ${incremental ? '0x98' : '0x99'} ${incremental ? 3 : 1}M 64k`);
        },
      });
      await during;
      expect(r.map((d) => d.name)).toEqual(['a', 'b']);
      expect(r.map((d) => d.mode)).toEqual(incremental ? ['bitmap', 'bitmap'] : ['full', 'full']);
      expect(same(byName(r, 'b').target, b0)).toBe(true);
      expect(same(byName(r, 'a').target, await live('a'))).toBe(true);
      // Every notice names its disk.
      if (!incremental) expect(notices.sort()).toEqual(['a: first run: full run', 'b: first run: full run']);
    }
    // The writes are in the next run.
    const [a, b] = await runImageBackup(opts());
    expect(a!.dirty).toBe(0);
    expect(b!.dirty).toBe(64 << 10);
    expect(same(b!.target, await live('b'))).toBe(true);
    await noLeftovers();
  });

  it('a qsync killed (-9) while it backs up the second disk: the next run cleans every leftover first, and is incremental and correct', async () => {
    await guestWrite('vda', 'write -P 0xa1 10M 64k');
    await guestWrite('vdb', 'write -P 0xb1 10M 64k');
    await killedOnSecondDisk(opts());
    // It left its export, job and overlay of vdb (and the NBD server) in QEMU.
    expect((await qmp.execute<{ id: string }[]>('query-block-exports')).length).toBeGreaterThan(0);
    await guestWrite('vda', 'write -P 0xa2 20M 64k');
    await guestWrite('vdb', 'write -P 0xb2 20M 64k');

    const r = await runImageBackup(opts());
    expect(r.map((d) => [d.name, d.mode, d.reason])).toEqual([['a', 'bitmap', undefined], ['b', 'bitmap', undefined]]);
    // vda was finished before the kill: only its later write. vdb: both writes.
    expect(byName(r, 'a').dirty).toBe(64 << 10);
    expect(byName(r, 'b').dirty).toBe(128 << 10);
    expect(same(byName(r, 'a').target, await live('a'))).toBe(true);
    expect(same(byName(r, 'b').target, await live('b'))).toBe(true);
    await noLeftovers();
  });

  it('a foreign block job on a disk: refused up front (exit 3) naming disk and job; no state or bitmap is touched', async () => {
    const other = path.join(dir, 'other.qcow2');
    qemuImgCreate(other, '64M');
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'other-ov', file: { driver: 'file', filename: other }, backing: 'drive1' });
    await qmp.execute('blockdev-backup', { 'job-id': 'other-backup', device: 'drive1', target: 'other-ov', sync: 'none' });
    const imageState = path.join(stateOf(dest), 'image');
    const stateBefore = fs.readdirSync(imageState).map((f) => fs.readFileSync(path.join(imageState, f), 'utf8'));
    const bitmapsBefore = [...(await listBitmaps(qmp, 'drive0')), ...(await listBitmaps(qmp, 'drive1'))].map((b) => b.name);
    try {
      const r = await runQsync(['--qmp', vm.qmp2, `${dest}/`]);
      expect(r.code, r.stderr).toBe(3);
      expect(r.stderr).toMatch(/disk b .*in use by block job 'other-backup' \(backup\)/);
      expect(fs.readdirSync(imageState).map((f) => fs.readFileSync(path.join(imageState, f), 'utf8'))).toEqual(stateBefore);
      const bitmapsAfter = [...(await listBitmaps(qmp, 'drive0')), ...(await listBitmaps(qmp, 'drive1'))].map((b) => b.name);
      expect(bitmapsAfter.sort()).toEqual(bitmapsBefore.sort());
    } finally {
      const gone = qmp.waitEvent('JOB_STATUS_CHANGE', (e) => e.data.id === 'other-backup' && e.data.status === 'null');
      await qmp.execute('block-job-cancel', { device: 'other-backup', force: true });
      await gone;
      await qmp.execute('blockdev-del', { 'node-name': 'other-ov' });
    }
    await guestWrite('vdb', 'write -P 0xb3 30M 64k');
    const r = await runImageBackup(opts());
    expect(r.map((d) => d.mode)).toEqual(['bitmap', 'bitmap']);
    expect(byName(r, 'b').dirty).toBe(64 << 10);
    expect(same(byName(r, 'b').target, await live('b'))).toBe(true);
  });

  it('what a qsync killed on another DEST left: refused as another qsync\'s job (exit 3); that DEST\'s next run cleans it up', async () => {
    const other = path.join(dir, 'other-dest');
    await killedOnSecondDisk(opts({ dest: other }));
    const r = await runQsync(['--qmp', vm.qmp2, `${dest}/`]);
    expect(r.code, r.stderr).toBe(3);
    expect(r.stderr).toMatch(/disk b .*in use by block job 'qsync-[0-9a-f]{12}-job1' \(backup\)/);
    expect(r.stderr).toMatch(/another qsync .*run it again to clean up/);
    await runImageBackup(opts({ dest: other }));
    const after = await runImageBackup(opts());
    expect(after.map((d) => d.mode)).toEqual(['bitmap', 'bitmap']);
    await noLeftovers();
  });

  it('adopts a target an older qsync named after the device (vda.raw): renamed with manifest, state and bitmap, and the run stays incremental', async () => {
    // The layout an older qsync left: DEST/vda.raw, its manifest and state under that name, bitmaps of that prefix.
    const st = stateOf(dest);
    const [oldP, newP] = [bitmapPrefix(dest, 'vda'), bitmapPrefix(dest, 'a')];
    fs.renameSync(path.join(dest, 'a.raw'), path.join(dest, 'vda.raw'));
    fs.renameSync(path.join(st, 'manifests', 'a.raw.qsm'), path.join(st, 'manifests', 'vda.raw.qsm'));
    const state = JSON.parse(fs.readFileSync(path.join(st, 'image', 'a.json'), 'utf8')) as { bitmap: string };
    fs.writeFileSync(path.join(st, 'image', 'vda.json'), JSON.stringify({ ...state, bitmap: state.bitmap.replace(newP, oldP) }), { mode: 0o600 });
    fs.rmSync(path.join(st, 'image', 'a.json'));
    for (const b of await listBitmaps(qmp, 'drive0')) {
      if (!b.name.startsWith(newP)) continue;
      await qmp.transaction([
        { type: 'block-dirty-bitmap-add', data: { node: 'drive0', name: b.name.replace(newP, oldP), persistent: true } },
        { type: 'block-dirty-bitmap-merge', data: { node: 'drive0', target: b.name.replace(newP, oldP), bitmaps: [b.name] } },
        { type: 'block-dirty-bitmap-remove', data: { node: 'drive0', name: b.name } },
      ]);
    }
    await guestWrite('vda', 'write -P 0xa4 40M 64k');
    const notices: string[] = [];
    const r = await runImageBackup(opts(), { notice: (m) => notices.push(m) });
    expect(notices).toEqual(['a: vda.raw renamed to a.raw (targets are named after the disk\'s image file now)']);
    expect(byName(r, 'a').mode).toBe('bitmap');
    expect(byName(r, 'a').dirty).toBe(64 << 10);
    expect(same(path.join(dest, 'a.raw'), await live('a'))).toBe(true);
    expect(fs.readdirSync(dest).sort()).toEqual(['a.raw', 'b.raw']);
    expect(fs.readdirSync(path.join(st, 'image')).sort()).toEqual(['a.json', 'b.json']);
    expect((await listBitmaps(qmp, 'drive0')).filter((b) => b.name.startsWith(oldP))).toEqual([]);
  });

  it('qsync forget DEST --qmp drops this DEST\'s bitmaps and image state, and nothing else', async () => {
    await qmp.execute('block-dirty-bitmap-add', { node: 'drive0', name: 'someone-elses' });
    const other = path.join(dir, 'dest2');
    await runImageBackup(opts({ dest: other }));
    const r = await runQsync(['forget', dest, '--qmp', vm.qmp2]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/a: dropped 1 bitmap/);
    const left = [...(await listBitmaps(qmp, 'drive0')), ...(await listBitmaps(qmp, 'drive1'))].map((b) => b.name);
    expect(left.filter((n) => n.startsWith(bitmapPrefix(dest, 'a')) || n.startsWith(bitmapPrefix(dest, 'b')))).toEqual([]);
    expect(left).toContain('someone-elses');
    expect(left.filter((n) => n.startsWith(bitmapPrefix(other, 'a')) || n.startsWith(bitmapPrefix(other, 'b')))).toHaveLength(2);
    expect(fs.readdirSync(path.join(stateOf(dest), 'image'))).toEqual([]);
    expect(fs.readdirSync(dest).sort()).toEqual(['a.raw', 'b.raw']);
    // The next run is full, and writes nothing (the manifests still vouch for the targets).
    const [a] = await runImageBackup(opts({ drives: ['vda'] }));
    expect(a!.mode).toBe('full');
    expect(a!.reason).toBe('no bitmap recorded for this target');
    expect(a!.written).toBe(0);
  });

  it('the VM shut down: --image on its file writes the same target, incrementally (the bitmap lives in the file)', async () => {
    await runImageBackup(opts());
    await guestWrite('vdb', 'write -P 0xb5 50M 64k');
    await qmp.execute('quit').catch(() => {});
    await qmp.close();
    await vm.kill();
    qemuIo(disk('b'), 'qcow2', 'write -P 0xb6 60M 64k');
    const [b] = await runImageBackup({ image: disk('b'), dest, tempDir: dir, verifySamplePct: 0 });
    expect(b!.name).toBe('b');
    expect(b!.target).toBe(path.join(dest, 'b.raw'));
    expect(b!.mode, b!.reason).toBe('bitmap');
    expect(b!.dirty).toBe(128 << 10);
    run('qemu-img', ['convert', '-O', 'raw', disk('b'), path.join(dir, 'b-convert.raw')]);
    expect(same(b!.target, fs.readFileSync(path.join(dir, 'b-convert.raw')))).toBe(true);
    expect(b!.size).toBe(64 * MiB);

    // forget through --image: the persistent bitmap leaves the file.
    expect(run('qemu-img', ['info', disk('b')])).toContain(bitmapPrefix(dest, 'b'));
    const f = await runQsync(['forget', dest, '--image', disk('b')]);
    expect(f.code, f.stderr).toBe(0);
    expect(run('qemu-img', ['info', disk('b')])).not.toContain(bitmapPrefix(dest, 'b'));
    const bad = await runQsync(['forget', dest]);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/usage: qsync forget DEST --qmp SOCKET\|--image FILE/);
  });
});
