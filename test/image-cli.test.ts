/**
 * Image mode through the qsync command, against a running q35 VM: the flags
 * reach the engine, the per-disk summary is printed, --json is one
 * document, and the target equals `qemu-img convert -O raw` of the disk.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient } from '../src/qemu/qmp.js';
import { runQsync, sha256, stateOf } from './helpers/cli.js';
import { needTools } from './helpers/env.js';
import { qemuImgCreate, qemuIo, run, startVm, tmpDir, type QemuProcess } from './helpers/qemu.js';

describe.skipIf(!needTools('qemu-system-x86_64', 'qemu-img', 'qemu-io'))('qsync --qmp on a running VM', () => {
  let dir: string;
  let vm: QemuProcess;
  const disk = () => path.join(dir, 'vm.qcow2');
  const dest = () => path.join(dir, 'backup');

  beforeAll(async () => {
    dir = tmpDir('qsync-image-cli-');
    qemuImgCreate(disk(), '64M');
    qemuIo(disk(), 'qcow2', 'write -P 0x11 0 8M', 'write -P 0x22 32M 4M');
    vm = await startVm(dir, disk());
  });
  afterAll(async () => {
    await vm?.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** The guest view right now, as qemu-img sees it (VM paused so the file is consistent). */
  async function guestViewSha(): Promise<string> {
    const q = await QmpClient.connect(vm.qmp);
    try {
      await q.execute('stop');
      const out = path.join(dir, 'convert.raw');
      run('qemu-img', ['convert', '-U', '-O', 'raw', disk(), out]);
      await q.execute('cont');
      return sha256(out);
    } finally {
      await q.close();
    }
  }

  async function guestWrite(cmd: string): Promise<void> {
    const q = await QmpClient.connect(vm.qmp);
    try {
      await q.execute('human-monitor-command', { 'command-line': `qemu-io -d vda/virtio-backend "${cmd}"` });
    } finally {
      await q.close();
    }
  }

  it('first run is full, the next reads only what the guest wrote; both print a summary per disk', async () => {
    const first = await runQsync(['--qmp', vm.qmp2, `${dest()}/`]);
    expect(first.code, first.stderr).toBe(0);
    expect(first.stdout).toMatch(/: full/);
    const target = path.join(dest(), fs.readdirSync(dest()).find((n) => n.endsWith('.raw'))!);
    expect(await sha256(target)).toBe(await guestViewSha());

    const manifest = path.join(stateOf(dest()), 'manifests', `${path.basename(target)}.qsm`);
    const manifestIno = fs.statSync(manifest).ino;

    await guestWrite('write -P 0xee 2M 64k');
    await guestWrite('write -P 0xef 40M 128k');
    const second = await runQsync(['--qmp', vm.qmp2, '--json', `${dest()}/`]);
    expect(second.code, second.stderr).toBe(0);
    const doc = JSON.parse(second.stdout) as { disks: { mode: string; dirty: number; read: number }[] };
    expect(doc.disks).toHaveLength(1);
    expect(doc.disks[0].mode).toBe('bitmap');
    expect(doc.disks[0].dirty).toBe(192 * 1024);
    // Dirty extents plus the verify sample (0.5% of the clean blocks, at least one).
    expect(doc.disks[0].read).toBeLessThan(192 * 1024 + 64 * 1024 * 8);
    expect(await sha256(target)).toBe(await guestViewSha());
    // Three changed blocks: their digests were patched into the manifest (same file), which still verifies.
    expect(fs.statSync(manifest).ino).toBe(manifestIno);
    const verify = await runQsync(['verify', target]);
    expect(verify.code, verify.stderr + verify.stdout).toBe(0);
  });

  it('bad image-mode input: a source operand, or a socket that is not there, gives a clear message and exit code', async () => {
    const extra = await runQsync(['--qmp', vm.qmp2, dir, `${dest()}/`]);
    expect(extra.code).toBe(1);
    expect(extra.stderr).toMatch(/takes only the destination operand/);
    const missing = await runQsync(['--qmp', path.join(dir, 'nope.sock'), `${dest()}/`]);
    expect(missing.code).not.toBe(0);
    expect(missing.stderr).toMatch(/nope\.sock/);
    expect(missing.stderr).not.toMatch(/^\s+at /m);
  });
});

describe.skipIf(!needTools('qemu-storage-daemon', 'qemu-img', 'qemu-io'))('qsync --image after a killed qsync', () => {
  it('a qemu-storage-daemon an earlier qsync left behind (orphaned) is stopped, not taken for a running VM', async () => {
    const dir = tmpDir('qsync-image-orphan-');
    try {
      const img = path.join(dir, 'vm.qcow2');
      qemuImgCreate(img, '64M');
      qemuIo(img, 'qcow2', 'write -P 0x33 0 1M');
      fs.mkdirSync(path.join(dir, 'qsync-qsd-left'));
      // What a qsync killed before the daemon's parent-death signal was armed leaves: a daemon re-parented to init.
      run('setsid', ['sh', '-c', `qemu-storage-daemon --blockdev driver=file,node-name=ivm-file,filename=${img} --blockdev driver=qcow2,node-name=ivm,file=ivm-file --chardev socket,id=qmp0,path=${dir}/qsync-qsd-left/qmp.sock,server=on,wait=off --monitor chardev=qmp0 >/dev/null 2>&1 &`]);
      const until = Date.now() + 10_000;
      while (!fs.existsSync(path.join(dir, 'qsync-qsd-left', 'qmp.sock')) && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
      const r = await runQsync(['--image', img, `${path.join(dir, 'out')}/`]);
      expect(r.code, r.stderr).toBe(0);
      run('qemu-img', ['convert', '-O', 'raw', img, path.join(dir, 'convert.raw')]);
      expect(await sha256(path.join(dir, 'out', 'vm.raw'))).toBe(await sha256(path.join(dir, 'convert.raw')));
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
