/**
 * The drop-in line on a libvirt host: `qsync -a IMAGES/ DEST/` over a folder
 * like /var/lib/libvirt/images backs up the disks of libvirt's domains
 * through the domain (one instant for all its disks), keeps a qcow2 a qcow2
 * (written through QEMU's qcow2 driver) and a raw image raw, and syncs every
 * other file as rsync does. A real libvirtd (started by the test when it
 * does not answer), a TCG q35 domain with two qcow2 disks, a shut-off domain
 * with a raw disk; guest writes are HMP qemu-io writes.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { FileReport } from '../src/sync/events.js';
import { runQsync, stateOf } from './helpers/cli.js';
import { needTools } from './helpers/env.js';
import { defineDomain, dropDomain, ensureLibvirtd, startDomain, virsh } from './helpers/libvirt.js';
import { qemuImgCreate, qemuIo, startQsd, tmpDir } from './helpers/qemu.js';

const MiB = 1 << 20;

interface Doc {
  files: FileReport[];
  notices: { message: string }[];
  errors: { message: string }[];
  exitCode: number;
}

describe.skipIf(!needTools('virsh', 'libvirtd', 'virtlogd', 'qemu-system-x86_64', 'qemu-img', 'qemu-io', 'qemu-storage-daemon', 'rsync'))('the drop-in line on a libvirt host', () => {
  let dir: string;
  let images: string;
  let dest: string;
  const vm = `qsync-dropin-${process.pid}`;
  const off = `qsync-dropin-off-${process.pid}`;
  const qdev = new Map<string, string>();
  const disk = (name: string): string => path.join(images, name);

  beforeAll(async () => {
    await ensureLibvirtd();
    dir = tmpDir('qsync-dropin-');
    fs.chmodSync(dir, 0o755); // QEMU runs as libvirt-qemu: it must reach the images
    images = path.join(dir, 'images');
    fs.mkdirSync(images, { mode: 0o755 });
    fs.mkdirSync(path.join(images, 'archive'), { mode: 0o755 }); // a disk in a folder of the tree: the same path below DEST
    dest = path.join(dir, 'backup');
    qemuImgCreate(disk('web.qcow2'), '32M');
    qemuImgCreate(disk('data.qcow2'), '16M');
    qemuImgCreate(disk('archive/old.raw'), '8M', 'raw');
    qemuIo(disk('web.qcow2'), 'qcow2', 'write -P 0x11 0 4M');
    qemuIo(disk('data.qcow2'), 'qcow2', 'write -P 0x21 2M 2M');
    qemuIo(disk('archive/old.raw'), 'raw', 'write -P 0x31 1M 1M');
    fs.writeFileSync(disk('notes.txt'), 'not a disk\n');
    await defineDomain(dir, vm, [{ file: disk('web.qcow2'), format: 'qcow2', target: 'vda' }, { file: disk('data.qcow2'), format: 'qcow2', target: 'vdb' }]);
    await defineDomain(dir, off, [{ file: disk('archive/old.raw'), format: 'raw', target: 'vda' }]);
    await start();
  });

  afterAll(async () => {
    for (const d of [vm, off]) await dropDomain(d);
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  async function start(): Promise<void> {
    for (const [f, dev] of await startDomain(vm, [disk('web.qcow2'), disk('data.qcow2')])) qdev.set(path.basename(f), dev);
  }

  const hmp = (cmd: string): Promise<string> => virsh('qemu-monitor-command', vm, '--hmp', cmd);
  async function guestWrite(f: string, pattern: number, off: number, len: number): Promise<void> {
    expect(await hmp(`qemu-io -d ${qdev.get(f)} "write -P ${pattern} ${off} ${len}"`)).not.toMatch(/error|failed/i);
  }

  async function dropIn(...extra: string[]): Promise<Doc & { code: number | null; stderr: string }> {
    const r = await runQsync(['-a', '--json', '--verify-sample', '0', ...extra, `${images}/`, `${dest}/`]);
    return { ...(JSON.parse(r.stdout) as Doc), code: r.code, stderr: r.stderr };
  }
  const file = (doc: Doc, name: string): FileReport => doc.files.find((f) => f.path === name)!;
  const formatOf = (f: string): string => (JSON.parse(execFileSync('qemu-img', ['info', '--output=json', f], { encoding: 'utf8' })) as { format: string }).format;

  /** Each backed-up disk equals its source as the guest sees it, taken with the domain paused (its writes flushed). */
  async function expectEqualToDisks(running: boolean): Promise<void> {
    if (running) {
      await virsh('suspend', vm);
      for (const f of ['web.qcow2', 'data.qcow2']) await hmp(`qemu-io -d ${qdev.get(f)} "flush"`);
    }
    try {
      for (const f of ['web.qcow2', 'data.qcow2']) {
        expect(formatOf(path.join(dest, f)), `${f} stays a qcow2`).toBe('qcow2');
        execFileSync('qemu-img', ['check', '-q', path.join(dest, f)]); // no corruption, no leaked cluster
        execFileSync('qemu-img', ['compare', ...(running ? ['-U'] : []), '-f', 'qcow2', '-F', 'qcow2', disk(f), path.join(dest, f)]);
      }
      expect(formatOf(path.join(dest, 'archive/old.raw'))).toBe('raw');
      expect(fs.readFileSync(path.join(dest, 'archive/old.raw')).equals(fs.readFileSync(disk('archive/old.raw')))).toBe(true);
    } finally {
      if (running) await virsh('resume', vm);
    }
  }

  it('-n says what the run would do and does nothing: no DEST, no backup job, no checkpoint', async () => {
    const r = await dropIn('-n');
    expect(r.code, r.stderr + JSON.stringify(r.errors)).toBe(0);
    for (const f of ['web.qcow2', 'data.qcow2', 'archive/old.raw', 'notes.txt']) expect(file(r, f)?.itemize, f).toBe('>f+++++++++');
    expect(r.notices.map((n) => n.message)).toContain(`would back up data.qcow2, web.qcow2 through libvirt domain ${vm}`);
    expect(fs.existsSync(dest)).toBe(false);
    expect((await virsh('checkpoint-list', vm, '--name')).trim()).toBe('');
  });

  it('first run: the disks through their domains (qcow2 stays qcow2, raw stays raw), the plain file as rsync does', async () => {
    const r = await dropIn('-i');
    expect(r.code, r.stderr + JSON.stringify(r.errors)).toBe(0);
    for (const f of ['web.qcow2', 'data.qcow2', 'archive/old.raw', 'notes.txt']) expect(file(r, f)?.itemize, f).toBe('>f+++++++++');
    await expectEqualToDisks(true);
    // The new qcow2 is the owner's alone.
    expect(fs.statSync(path.join(dest, 'web.qcow2')).mode & 0o777).toBe(0o600);
    expect(r.notices.map((n) => n.message).join('\n')).toMatch(new RegExp(`backed up through libvirt domain ${vm}, all its disks as of one instant: web.qcow2 .*data.qcow2`));
    // The plain file: what rsync -a makes of it.
    const ref = path.join(dir, 'rsync-ref');
    execFileSync('rsync', ['-a', `${disk('notes.txt')}`, `${ref}/`]);
    const [a, b] = [fs.statSync(path.join(dest, 'notes.txt'), { bigint: true }), fs.statSync(path.join(ref, 'notes.txt'), { bigint: true })];
    expect([a.mode, a.mtimeNs / 1000n, a.size]).toEqual([b.mode, b.mtimeNs / 1000n, b.size]);
    expect(fs.readFileSync(path.join(dest, 'notes.txt'), 'utf8')).toBe('not a disk\n');
    // Their state is DEST's: a raw copy's manifest where file mode keeps one (the bytes are the guest view), a qcow2's apart.
    expect(fs.existsSync(path.join(stateOf(dest), 'manifests', 'archive', 'old.raw.qsm'))).toBe(true);
    expect(fs.existsSync(path.join(stateOf(dest), 'guest', 'web.qcow2.qsm'))).toBe(true);
    expect(fs.existsSync(path.join(stateOf(dest), 'manifests', 'web.qcow2.qsm'))).toBe(false);
  });

  it('second run after guest writes: only the dirty extents are read, the qcow2 updated in place', async () => {
    const ino = fs.statSync(path.join(dest, 'web.qcow2')).ino;
    await guestWrite('web.qcow2', 0x55, 1 * MiB, 1 * MiB);
    await guestWrite('data.qcow2', 0x66, 8 * MiB, 64 << 10);
    qemuIo(disk('archive/old.raw'), 'raw', 'write -P 0x32 4M 64k');
    const r = await dropIn();
    expect(r.code, r.stderr + JSON.stringify(r.errors)).toBe(0);
    expect(file(r, 'web.qcow2')).toMatchObject({ method: 'bitmap', scanned: MiB, literal: MiB });
    expect(file(r, 'data.qcow2')).toMatchObject({ method: 'bitmap', scanned: 64 << 10, literal: 64 << 10 });
    expect(file(r, 'archive/old.raw').literal).toBe(64 << 10); // shut off: read in full, only the change written
    // Only the disks changed: no folder's time moved when a disk's copy was made in it.
    expect(r.files.filter((f) => !f.unchanged).map((f) => f.path).sort()).toEqual(['archive/old.raw', 'data.qcow2', 'web.qcow2']);
    expect(fs.statSync(path.join(dest, 'web.qcow2')).ino).toBe(ino);
    await expectEqualToDisks(true);
  });

  it('the domain shut down between runs: read offline, still changed blocks only; started again, changed blocks only', async () => {
    await guestWrite('web.qcow2', 0x71, 20 * MiB, 64 << 10);
    // A clean QEMU exit: the checkpoint bitmaps are stored in the images.
    await hmp('quit').catch(() => {});
    for (let i = 0; i < 100 && !(await virsh('domstate', vm)).includes('shut off'); i++) await new Promise((r) => setTimeout(r, 100));
    const down = await dropIn();
    expect(down.code, down.stderr + JSON.stringify(down.errors)).toBe(0);
    // The checkpoint's bitmap, stored in each image at shutdown, says what changed.
    expect(file(down, 'web.qcow2')).toMatchObject({ method: 'bitmap', scanned: 64 << 10, literal: 64 << 10 });
    expect(file(down, 'data.qcow2')).toMatchObject({ method: 'bitmap', scanned: 0, literal: 0 });
    await expectEqualToDisks(false);

    await start();
    await guestWrite('data.qcow2', 0x72, 3 * MiB, 64 << 10);
    const up = await dropIn();
    expect(up.code, up.stderr + JSON.stringify(up.errors)).toBe(0);
    expect(file(up, 'data.qcow2')).toMatchObject({ method: 'bitmap', scanned: 64 << 10, literal: 64 << 10 });
    // web: the write before the shutdown is in its checkpoint too, and is found already equal.
    expect(file(up, 'web.qcow2')).toMatchObject({ method: 'bitmap', scanned: 64 << 10, literal: 0 });
    await expectEqualToDisks(true);
  });

  it('the copy boots when copied back: a boot sector the guest wrote runs from the restored qcow2', async () => {
    // 16-bit code the BIOS runs from sector 0: write one sector of 'Q' (int 13h) to sector 1 of the boot disk, then halt.
    const code = Buffer.from([
      0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0, // xor ax,ax; mov ds,ax; mov es,ax
      0xbf, 0x00, 0x7e, 0xb9, 0x00, 0x02, 0xb0, 0x51, 0xfc, 0xf3, 0xaa, // mov di,0x7e00; mov cx,512; mov al,'Q'; cld; rep stosb
      0xbb, 0x00, 0x7e, 0xb8, 0x01, 0x03, 0xb9, 0x02, 0x00, 0x30, 0xf6, 0xcd, 0x13, // es:bx=0x7e00; ah=3 al=1; ch=0 cl=2; dh=0; int 13h (dl: the boot drive)
      0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt; jmp back to hlt
    ]);
    const sector = Buffer.alloc(512);
    code.copy(sector);
    sector.writeUInt16LE(0xaa55, 510);
    const boot = path.join(dir, 'boot.bin');
    fs.writeFileSync(boot, sector);
    expect(await hmp(`qemu-io -d ${qdev.get('web.qcow2')} "write -s ${boot} 0 512"`)).not.toMatch(/error|failed/i);
    const r = await dropIn();
    expect(r.code, r.stderr + JSON.stringify(r.errors)).toBe(0);
    expect(file(r, 'web.qcow2')).toMatchObject({ method: 'bitmap', literal: 64 << 10 });

    const restored = path.join(dir, 'restored');
    fs.mkdirSync(restored, { mode: 0o755 });
    fs.copyFileSync(path.join(dest, 'web.qcow2'), path.join(restored, 'web.qcow2'));
    const back = `qsync-dropin-back-${process.pid}`;
    await defineDomain(dir, back, [{ file: path.join(restored, 'web.qcow2'), format: 'qcow2', target: 'vda' }]);
    try {
      await virsh('start', back);
      // What the boot sector writes shows up in the image once the guest has run it (a data write into a cluster the
      // image already has: read beside the running QEMU with -U). Bounded wait: TCG is slow on a loaded machine.
      const written = (): string => spawnSync('qemu-io', ['-U', '-r', '-f', 'qcow2', '-c', 'read -P 0x51 512 512', path.join(restored, 'web.qcow2')], { encoding: 'utf8' }).stdout;
      let out = written();
      for (let i = 0; i < 600 && /verification failed/i.test(out); i++) {
        await new Promise((res) => setTimeout(res, 100));
        out = written();
      }
      expect(out).toMatch(/read 512\/512 bytes at offset 512/);
      expect(out).not.toMatch(/verification failed/i);
    } finally {
      await dropDomain(back);
    }
  });

  it('--backup-dir: the raw copy keeps its history (an earlier version restores byte for byte); the qcow2 copies are named as kept without', async () => {
    const hist = path.join(dir, 'history');
    const first = await dropIn('--backup-dir', hist);
    expect(first.code, first.stderr + JSON.stringify(first.errors)).toBe(0);
    const before = fs.readFileSync(path.join(dest, 'archive/old.raw'));
    qemuIo(disk('archive/old.raw'), 'raw', 'write -P 0x3c 2M 128k');
    const r = await dropIn('--backup-dir', hist);
    expect(r.code, r.stderr + JSON.stringify(r.errors)).toBe(0);
    expect(file(r, 'archive/old.raw').literal).toBe(128 << 10);
    // No silent gap: each qcow2 copy is named, the raw one is not.
    const named = r.errors.map((e) => e.message).filter((m) => /without --backup-dir history/.test(m));
    expect(named.map((m) => m.split(':')[0]).sort()).toEqual(['data.qcow2', 'web.qcow2']);
    const out = path.join(dir, 'old-before.raw');
    const restored = await runQsync(['restore', path.join(dest, 'archive/old.raw'), out, '--backup-dir', hist, '--at', '1']);
    expect(restored.code, restored.stderr).toBe(0);
    expect(fs.readFileSync(out).equals(before)).toBe(true);
    expect(fs.readFileSync(path.join(dest, 'archive/old.raw')).equals(fs.readFileSync(disk('archive/old.raw')))).toBe(true);
  });

  it('a DEST copy qsync will not write (not a qcow2): that domain\'s files fail (exit 23) and are left alone, the rest is synced', async () => {
    const elsewhere = path.join(dir, 'junk-backup');
    fs.mkdirSync(elsewhere);
    fs.writeFileSync(path.join(elsewhere, 'web.qcow2'), 'not an image\n');
    const cps = await virsh('checkpoint-list', vm, '--name');
    const r = await runQsync(['-a', `${images}/`, `${elsewhere}/`]);
    expect(r.code).toBe(23);
    expect(r.stderr).toMatch(new RegExp(`data\\.qcow2, web\\.qcow2: backup through libvirt domain ${vm} failed: \\S+/web\\.qcow2 is not a qcow2 image; left alone`));
    expect(fs.readFileSync(path.join(elsewhere, 'web.qcow2'), 'utf8')).toBe('not an image\n');
    expect(fs.existsSync(path.join(elsewhere, 'data.qcow2'))).toBe(false);
    expect(fs.readFileSync(path.join(elsewhere, 'notes.txt'), 'utf8')).toBe('not a disk\n');
    expect(formatOf(path.join(elsewhere, 'archive/old.raw'))).toBe('raw'); // another domain's: backed up
    expect(await virsh('checkpoint-list', vm, '--name')).toBe(cps);
  });

  it('a second name of a disk (a hard link) is no second copy: the first goes through the domain, the other is refused as a held file (exit 23)', async () => {
    const other = path.join(dir, 'linked');
    fs.linkSync(disk('web.qcow2'), disk('zz-web.qcow2'));
    try {
      const r = await runQsync(['-a', '--json', '--verify-sample', '0', `${images}/`, `${other}/`]);
      const doc = JSON.parse(r.stdout) as Doc;
      expect(r.code).toBe(23);
      expect(file(doc, 'web.qcow2')?.itemize).toBe('>f+++++++++');
      expect(formatOf(path.join(other, 'web.qcow2'))).toBe('qcow2');
      expect(doc.errors.map((e) => e.message).join('\n')).toMatch(/zz-web\.qcow2 is open in a running QEMU/);
      expect(fs.existsSync(path.join(other, 'zz-web.qcow2'))).toBe(false);
    } finally {
      fs.unlinkSync(disk('zz-web.qcow2'));
    }
  });

  it('no libvirt answering (--connect to a socket nobody serves): the run is what it was, the running domain\'s disks refused', async () => {
    const elsewhere = path.join(dir, 'no-libvirt');
    const r = await runQsync(['-a', '--connect', `qemu+unix:///system?socket=${path.join(dir, 'nobody.sock')}`, `${images}/`, `${elsewhere}/`]);
    expect(r.code).toBe(23);
    expect(r.stderr).toMatch(/web\.qcow2 is open in a running QEMU/);
    expect(r.stderr).toMatch(/data\.qcow2 is open in a running QEMU/);
    expect(r.stderr).not.toMatch(/libvirt|virsh/);
    // The shut-off domain's raw image is a plain file then, copied as rsync would.
    expect(fs.readFileSync(path.join(elsewhere, 'archive/old.raw')).equals(fs.readFileSync(disk('archive/old.raw')))).toBe(true);
    expect(fs.readFileSync(path.join(elsewhere, 'notes.txt'), 'utf8')).toBe('not a disk\n');
    expect(fs.existsSync(path.join(elsewhere, 'web.qcow2'))).toBe(false);
  });

  it('a file a QEMU outside libvirt holds is still refused (exit 23), with the hint', async () => {
    const other = path.join(dir, 'other');
    fs.mkdirSync(other);
    const held = path.join(other, 'held.qcow2');
    qemuImgCreate(held, '8M');
    const qsd = await startQsd(dir, held);
    try {
      const r = await runQsync(['-a', `${other}/`, path.join(dir, 'other-backup')]);
      expect(r.code).toBe(23);
      expect(r.stderr).toMatch(/held\.qcow2 is open in a running QEMU.*image mode/);
    } finally {
      await qsd.kill();
    }
  });
});
