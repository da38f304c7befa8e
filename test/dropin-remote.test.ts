/**
 * The drop-in line pushed to another host, as a libvirt host backs up:
 * `qsync -a IMAGES/ host:DEST/` over a real sshd on 127.0.0.1. The walk runs
 * on the far side; the files the near host's domains hold are left to the
 * near side, which backs them up through their domain (one instant for all
 * of a domain's disks) into the far DEST over the same ssh session: a qcow2
 * stays a qcow2 (written there through the far host's QEMU), a raw image
 * raw, and only changed blocks cross. A real libvirtd, a TCG q35 domain with
 * a qcow2 disk, a shut-off domain with a raw disk; guest writes are HMP
 * qemu-io writes.
 */
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { FileReport } from '../src/sync/events.js';
import { needTools } from './helpers/env.js';
import { QSYNC, runQsync } from './helpers/cli.js';
import { Channel } from '../src/remote/channel.js';
import { hello } from '../src/remote/session.js';
import { defineDomain, dropDomain, ensureLibvirtd, startDomain, virsh } from './helpers/libvirt.js';
import { qemuImgCreate, qemuIo } from './helpers/qemu.js';
import { useQsyncOverSsh } from './helpers/qsync-ssh.js';

const MiB = 1 << 20;

interface Doc {
  files: FileReport[];
  notices: { message: string }[];
  errors: { message: string }[];
}

const ready = needTools('virsh', 'libvirtd', 'virtlogd', 'qemu-system-x86_64', 'qemu-img', 'qemu-io', 'qemu-storage-daemon', 'sshd', 'ssh');

describe.skipIf(!ready)('the drop-in line to host:DEST over ssh', () => {
  const ssh = useQsyncOverSsh('qsync-dropin-remote-', ready);
  let images: string;
  let dest: string;
  const vm = `qsync-rdrop-${process.pid}`;
  const off = `qsync-rdrop-off-${process.pid}`;
  const qdev = new Map<string, string>();
  const disk = (name: string): string => path.join(images, name);

  beforeAll(async () => {
    await ensureLibvirtd();
    fs.chmodSync(ssh.dir, 0o755); // QEMU runs as libvirt-qemu: it must reach the images
    images = path.join(ssh.dir, 'images');
    fs.mkdirSync(path.join(images, 'archive'), { recursive: true, mode: 0o755 });
    fs.mkdirSync(path.join(images, 'data'), { mode: 0o755 }); // the domain's second disk, in another folder of the tree
    dest = path.join(ssh.dir, 'far', 'backup');
    fs.mkdirSync(path.dirname(dest));
    qemuImgCreate(disk('web.qcow2'), '32M');
    qemuImgCreate(disk('data/db.qcow2'), '16M');
    qemuIo(disk('data/db.qcow2'), 'qcow2', 'write -P 0x21 2M 2M');
    qemuImgCreate(disk('archive/old.raw'), '8M', 'raw');
    qemuIo(disk('web.qcow2'), 'qcow2', 'write -P 0x11 0 4M');
    qemuIo(disk('archive/old.raw'), 'raw', 'write -P 0x31 1M 1M');
    fs.writeFileSync(disk('notes.txt'), 'not a disk\n');
    await defineDomain(ssh.dir, vm, [{ file: disk('web.qcow2'), format: 'qcow2', target: 'vda' }, { file: disk('data/db.qcow2'), format: 'qcow2', target: 'vdb' }]);
    await defineDomain(ssh.dir, off, [{ file: disk('archive/old.raw'), format: 'raw', target: 'vda' }]);
    for (const [f, dev] of await startDomain(vm, [disk('web.qcow2'), disk('data/db.qcow2')])) qdev.set(path.basename(f), dev);
  });

  afterAll(async () => {
    for (const d of [vm, off]) await dropDomain(d);
  });

  const hmp = (cmd: string): Promise<string> => virsh('qemu-monitor-command', vm, '--hmp', cmd);

  async function push(...extra: string[]): Promise<Doc & { code: number | null; stderr: string; wire: number }> {
    const r = await ssh.overSsh(['-a', '--json', '--verify-sample', '0', ...extra, `${images}/`, ssh.at(`${dest}/`)]);
    return { ...(JSON.parse(r.stdout) as Doc), code: r.code, stderr: r.stderr, wire: r.wire };
  }
  const file = (doc: Doc, name: string): FileReport | undefined => doc.files.find((f) => f.path === name);
  const formatOf = (f: string): string => (JSON.parse(execFileSync('qemu-img', ['info', '--output=json', f], { encoding: 'utf8' })) as { format: string }).format;

  /** The far copies equal the disks as the guest sees them, with the domain paused (its writes flushed). */
  async function expectEqualToDisks(): Promise<void> {
    await virsh('suspend', vm);
    try {
      for (const f of ['web.qcow2', 'data/db.qcow2']) {
        await hmp(`qemu-io -d ${qdev.get(path.basename(f))} "flush"`);
        expect(formatOf(path.join(dest, f)), `${f} stays a qcow2`).toBe('qcow2');
        execFileSync('qemu-img', ['check', '-q', path.join(dest, f)]);
        execFileSync('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', disk(f), path.join(dest, f)]);
      }
      expect(formatOf(path.join(dest, 'archive/old.raw'))).toBe('raw');
      expect(fs.readFileSync(path.join(dest, 'archive/old.raw')).equals(fs.readFileSync(disk('archive/old.raw')))).toBe(true);
    } finally {
      await virsh('resume', vm);
    }
  }

  it('-n lists the domains\' files as new and writes nothing on either side', async () => {
    const r = await push('-n');
    expect(r.code, r.stderr + JSON.stringify(r.errors)).toBe(0);
    for (const f of ['web.qcow2', 'data/db.qcow2', 'archive/old.raw', 'notes.txt']) expect(file(r, f)?.itemize, f).toBe('>f+++++++++');
    expect(r.notices.map((n) => n.message)).toContain(`would back up web.qcow2, data/db.qcow2 through libvirt domain ${vm}`);
    expect(fs.existsSync(dest)).toBe(false);
    expect((await virsh('checkpoint-list', vm, '--name')).trim()).toBe('');
  });

  it('first push: the running domain\'s disks through the domain in one backup (two folders, one instant), kept qcow2 on the far side; the raw and the plain file too', async () => {
    const r = await push('-i');
    expect(r.code, r.stderr + JSON.stringify(r.errors)).toBe(0);
    for (const f of ['web.qcow2', 'data/db.qcow2', 'archive/old.raw', 'notes.txt']) expect(file(r, f)?.itemize, f).toBe('>f+++++++++');
    // One backup job for both disks: one notice naming both, one checkpoint.
    expect(r.notices.map((n) => n.message).join('\n')).toMatch(new RegExp(`backed up through libvirt domain ${vm}, all its disks as of one instant: (data/db|web)\\.qcow2 .*(web|data/db)\\.qcow2`));
    expect((await virsh('checkpoint-list', vm, '--name')).trim().split('\n')).toHaveLength(1);
    expect(fs.statSync(path.join(dest, 'web.qcow2')).mode & 0o777).toBe(0o600);
    expect(fs.readFileSync(path.join(dest, 'notes.txt'), 'utf8')).toBe('not a disk\n');
    await expectEqualToDisks();
    // The far side keeps the state: the qcow2's manifest describes the guest view, apart from file mode's manifests.
    const kept = (fs.readdirSync(ssh.serverState, { recursive: true }) as string[]).filter((f) => f.endsWith('.qsm'));
    expect(kept.filter((f) => f.endsWith('web.qcow2.qsm')).map((f) => path.basename(path.dirname(f)))).toEqual(['guest']);
    expect(kept.some((f) => f.endsWith(path.join('manifests', 'archive', 'old.raw.qsm')))).toBe(true);
  });

  it('after guest writes: only the dirty extents are read and cross the wire, the far qcow2 updated in place', async () => {
    const ino = fs.statSync(path.join(dest, 'web.qcow2')).ino;
    expect(await hmp(`qemu-io -d ${qdev.get('web.qcow2')} "write -P 0x55 1M 1M"`)).not.toMatch(/error|failed/i);
    qemuIo(disk('archive/old.raw'), 'raw', 'write -P 0x32 4M 64k');
    const r = await push();
    expect(r.code, r.stderr + JSON.stringify(r.errors)).toBe(0);
    expect(file(r, 'web.qcow2')).toMatchObject({ method: 'bitmap', scanned: MiB, literal: MiB });
    expect(file(r, 'archive/old.raw')?.literal).toBe(64 << 10);
    expect(file(r, 'notes.txt')).toMatchObject({ unchanged: true, literal: 0 });
    // Changed bytes: 1 MiB + 64 KiB; what crossed is those blocks, their digests and the session.
    expect(r.wire).toBeLessThanOrEqual(1.1 * (MiB + (64 << 10)) + 64 * 1024);
    expect(fs.statSync(path.join(dest, 'web.qcow2')).ino).toBe(ino);
    await expectEqualToDisks();
  });

  it('--delete keeps the domains\' copies and removes what the source no longer has', async () => {
    fs.writeFileSync(path.join(dest, 'stale.txt'), 'gone from the source\n');
    const r = await push('--delete');
    expect(r.code, r.stderr + JSON.stringify(r.errors)).toBe(0);
    expect(fs.existsSync(path.join(dest, 'stale.txt'))).toBe(false);
    expect(fs.existsSync(path.join(dest, 'web.qcow2'))).toBe(true);
    expect(fs.existsSync(path.join(dest, 'archive/old.raw'))).toBe(true);
    await expectEqualToDisks();
  });

  it('the client killed while its domain backup writes to the far side: the job it left is ended, the next push converges', async () => {
    // Enough guest data that the copy takes a while.
    expect(await hmp(`qemu-io -d ${qdev.get('web.qcow2')} "write -P 0x5a 6M 24M"`)).not.toMatch(/error|failed/i);
    let pid = 0;
    const run = runQsync(['-a', '-e', ssh.sshd.rsh, '--qsync-path', ssh.serverCmd, `${images}/`, ssh.at(`${dest}/`)], { onSpawn: (p) => (pid = p) });
    const backupJob = (): Promise<boolean> => virsh('backup-dumpxml', vm).then(() => true, () => false);
    for (let i = 0; i < 600 && !(await backupJob()); i++) await new Promise((res) => setTimeout(res, 20));
    process.kill(pid, 'SIGKILL');
    expect((await run).signal).toBe('SIGKILL');
    // Killed mid-backup: libvirt's job outlives the client.
    expect(await backupJob()).toBe(true);
    const r = await push();
    expect(r.code, r.stderr + JSON.stringify(r.errors)).toBe(0);
    expect((await virsh('domjobinfo', vm)).trim()).toMatch(/None/);
    await expectEqualToDisks();
  });

  it('a far host without QEMU\'s tools: the qcow2 copies fail (exit 23) saying what to install there; the raw copy and the plain file arrive', async () => {
    const bare = path.join(ssh.dir, 'far', 'bare');
    fs.mkdirSync(bare);
    const bin = path.join(ssh.dir, 'bin-without-qemu');
    fs.mkdirSync(bin);
    for (const t of ['setpriv', 'sh', 'sync']) fs.symlinkSync(execFileSync('sh', ['-c', `command -v ${t}`], { encoding: 'utf8' }).trim(), path.join(bin, t));
    const r = await runQsync(['-a', '-e', ssh.sshd.rsh, '--qsync-path', `PATH=${bin} ${ssh.serverCmd}`, `${images}/`, ssh.at(`${bare}/`)]);
    expect(r.code, r.stderr).toBe(23);
    expect(r.stderr).toMatch(new RegExp(`web\\.qcow2, data/db\\.qcow2: backup through libvirt domain ${vm} failed: .*install QEMU's tools on the host that holds DEST`));
    expect(fs.existsSync(path.join(bare, 'web.qcow2'))).toBe(false); // no empty file left for the next run to refuse
    expect(formatOf(path.join(bare, 'archive/old.raw'))).toBe('raw');
    expect(fs.readFileSync(path.join(bare, 'notes.txt'), 'utf8')).toBe('not a disk\n');
    // The tools installed: the next run makes the copies.
    const again = await ssh.overSsh(['-a', `${images}/`, ssh.at(`${bare}/`)]);
    expect(again.code, again.stderr).toBe(0);
    for (const f of ['web.qcow2', 'data/db.qcow2']) expect(formatOf(path.join(bare, f))).toBe('qcow2');
  });

  it('a far copy qsync will not write (not a qcow2): that domain\'s file fails (exit 23) and is left alone, the rest is synced', async () => {
    const elsewhere = path.join(ssh.dir, 'far', 'junk');
    fs.mkdirSync(elsewhere);
    fs.writeFileSync(path.join(elsewhere, 'web.qcow2'), 'not an image\n');
    const r = await ssh.overSsh(['-a', `${images}/`, ssh.at(`${elsewhere}/`)]);
    expect(r.code).toBe(23);
    expect(r.stderr).toMatch(new RegExp(`web\\.qcow2, data/db\\.qcow2: backup through libvirt domain ${vm} failed: \\S+/web\\.qcow2 is not a qcow2 image; left alone`));
    expect(fs.existsSync(path.join(elsewhere, 'data', 'db.qcow2'))).toBe(false); // the same backup: not written either
    expect(fs.readFileSync(path.join(elsewhere, 'web.qcow2'), 'utf8')).toBe('not an image\n');
    expect(fs.readFileSync(path.join(elsewhere, 'notes.txt'), 'utf8')).toBe('not a disk\n');
    expect(formatOf(path.join(elsewhere, 'archive/old.raw'))).toBe('raw'); // the other domain's: backed up
  });

  describe('a pull from the libvirt host (qsync -a host:IMAGES/ DEST/)', () => {
    let local: string;
    async function pull(...extra: string[]): Promise<Doc & { code: number | null; stderr: string; wire: number }> {
      const r = await ssh.overSsh(['-a', '--json', '--verify-sample', '0', ...extra, ssh.at(`${images}/`), `${local}/`]);
      return { ...(JSON.parse(r.stdout) as Doc), code: r.code, stderr: r.stderr, wire: r.wire };
    }

    it('the far host backs up its domains\' files into this DEST, one backup per domain; then only what the guest wrote crosses', async () => {
      local = path.join(ssh.dir, 'pulled');
      const checkpoints = async (): Promise<number> => (await virsh('checkpoint-list', vm, '--name')).trim().split('\n').filter(Boolean).length;
      const before = await checkpoints();
      const r = await pull('-i');
      expect(r.code, r.stderr + JSON.stringify(r.errors)).toBe(0);
      for (const f of ['web.qcow2', 'data/db.qcow2', 'archive/old.raw', 'notes.txt']) expect(file(r, f)?.itemize, f).toBe('>f+++++++++');
      expect(r.notices.map((n) => n.message).join('\n')).toMatch(new RegExp(`backed up through libvirt domain ${vm}, all its disks as of one instant: (data/db|web)\\.qcow2 .*(web|data/db)\\.qcow2`));
      expect(await checkpoints()).toBe(before + 1);
      expect(fs.readFileSync(path.join(local, 'notes.txt'), 'utf8')).toBe('not a disk\n');

      expect(await hmp(`qemu-io -d ${qdev.get('db.qcow2')} "write -P 0x77 5M 128k"`)).not.toMatch(/error|failed/i);
      const again = await pull();
      expect(again.code, again.stderr + JSON.stringify(again.errors)).toBe(0);
      expect(file(again, 'data/db.qcow2')).toMatchObject({ method: 'bitmap', scanned: 128 << 10, literal: 128 << 10 });
      expect(file(again, 'web.qcow2')).toMatchObject({ method: 'bitmap', literal: 0 });
      expect(again.wire).toBeLessThanOrEqual(1.1 * (128 << 10) + 64 * 1024);
      await virsh('suspend', vm);
      try {
        for (const f of ['web.qcow2', 'data/db.qcow2']) {
          await hmp(`qemu-io -d ${qdev.get(path.basename(f))} "flush"`);
          expect(formatOf(path.join(local, f)), `${f} stays a qcow2`).toBe('qcow2');
          execFileSync('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', disk(f), path.join(local, f)]);
        }
        expect(fs.readFileSync(path.join(local, 'archive/old.raw')).equals(fs.readFileSync(disk('archive/old.raw')))).toBe(true);
      } finally {
        await virsh('resume', vm);
      }
    });
  });

  it('a hostile client of a --restrict server cannot have a domain\'s disk outside DIR backed up to it: refused, no job, no checkpoint', async () => {
    const jail = path.join(images, 'archive'); // web.qcow2 (the running domain's) lies outside it
    const server = spawn(process.execPath, [QSYNC, '--server', '--restrict', jail], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, QSYNC_STATE_DIR: ssh.serverState } });
    const ch = new Channel(server.stdout!, server.stdin!, { peer: 'the server' });
    const exited = new Promise<number | null>((res) => server.on('close', (code) => res(code)));
    const before = await virsh('checkpoint-list', vm, '--name');
    try {
      await ch.send(hello('sender', { blockSize: 65536, domains: {} }));
      const h = await ch.control();
      const st = fs.statSync(disk('web.qcow2'), { bigint: true });
      const key = `${st.dev}:${st.ino}`;
      // Only disks inside DIR are named to it (by device and inode); the one outside is not.
      expect(h.claims).toEqual([`${fs.statSync(disk('archive/old.raw')).dev}:${fs.statSync(disk('archive/old.raw')).ino}`]);
      // Never listed to it (outside DIR), claimed all the same (a client could guess its numbers).
      await ch.send({ op: 'claimed', files: [{ rel: 'web.qcow2', key, size: Number(st.size) }], dest: 'thief:/loot', options: {} });
      await expect(ch.control()).rejects.toThrow(/no file of a domain in the tree served/);
    } finally {
      await ch.end().catch(() => {});
    }
    expect(await exited).toBe(12);
    expect(await virsh('checkpoint-list', vm, '--name')).toBe(before);
    expect((await virsh('domjobinfo', vm)).trim()).toMatch(/None/);
  });
});
