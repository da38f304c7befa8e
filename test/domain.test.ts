/**
 * `qsync --domain`: a libvirt domain (TCG q35, two qcow2 disks, no OS) backed
 * up through libvirt's own pull-mode backup. Guest writes are HMP qemu-io
 * writes through libvirt's monitor; what each disk must hold is kept in a
 * model (the patterns written), so the check never reads a qcow2 QEMU holds.
 * libvirtd is started when it does not answer (and left running).
 */
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runDomainBackup } from '../src/sync/domain-backup.js';
import { virshBatch, VirshError } from '../src/qemu/libvirt.js';
import type { DiskSummary } from '../src/sync/image-backup.js';
import { QSYNC, runQsync, sha256, stateOf } from './helpers/cli.js';
import { startSshd } from './helpers/sshd.js';
import { needTools } from './helpers/env.js';
import { qemuImgCreate, qemuIo, tmpDir } from './helpers/qemu.js';
import { defineDomain, dropDomain, ensureLibvirtd, startDomain, URI, virsh } from './helpers/libvirt.js';

const pexec = promisify(execFile);
const MiB = 1 << 20;

interface TestDisk {
  name: string;
  target: string;
  file: string;
  size: number;
  /** What the guest must see. */
  model: Buffer;
  /** The QEMU device whose backend qemu-io writes through. */
  qdev?: string;
}

describe.skipIf(!needTools('virsh', 'libvirtd', 'virtlogd', 'qemu-system-x86_64', 'qemu-img', 'qemu-io', 'qemu-storage-daemon'))('qsync --domain (libvirt pull-mode backup)', () => {
  let dir: string;
  let dest: string;
  const dom = `qsync-test-${process.pid}`;
  const disks: TestDisk[] = [];

  beforeAll(async () => {
    await ensureLibvirtd();
    dir = tmpDir('qsync-domain-');
    fs.chmodSync(dir, 0o755); // QEMU runs as libvirt-qemu: it must reach the images
    dest = path.join(dir, 'backup');
    for (const [name, target, size] of [['web', 'vda', 64 * MiB], ['db', 'vdb', 32 * MiB]] as const) {
      const file = path.join(dir, `${name}.qcow2`);
      qemuImgCreate(file, String(size));
      disks.push({ name, target, file, size, model: Buffer.alloc(size) });
    }
    // Data before the domain starts: written offline, into the model too.
    qemuIo(disks[0]!.file, 'qcow2', 'write -P 0x11 0 8M');
    disks[0]!.model.fill(0x11, 0, 8 * MiB);
    qemuIo(disks[1]!.file, 'qcow2', 'write -P 0x21 4M 4M');
    disks[1]!.model.fill(0x21, 4 * MiB, 8 * MiB);
    await defineDomain(dir, dom, disks.map((d) => ({ file: d.file, format: 'qcow2', target: d.target })));
    await start();
  });

  afterAll(async () => {
    await dropDomain(dom);
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Start the domain and learn which device backs each disk. */
  async function start(): Promise<void> {
    const devices = await startDomain(dom, disks.map((d) => d.file));
    for (const d of disks) d.qdev = devices.get(d.file);
  }

  /** A guest write of `pattern` at [off, off+len), through the disk's device, as the guest's would go. */
  async function guestWrite(d: TestDisk, pattern: number, off: number, len: number): Promise<void> {
    const out = await virsh('qemu-monitor-command', dom, '--hmp', `qemu-io -d ${d.qdev} "write -P ${pattern} ${off} ${len}"`);
    expect(out).not.toMatch(/error|failed/i);
    d.model.fill(pattern, off, off + len);
  }

  const target = (d: TestDisk): string => path.join(dest, `${d.name}.raw`);
  const expectTargets = (): void => {
    for (const d of disks) expect(fs.readFileSync(target(d)).equals(d.model), `${d.name}.raw holds what the guest wrote`).toBe(true);
  };
  const ourCheckpoints = async (): Promise<string[]> =>
    (await virsh('checkpoint-list', dom, '--name')).split('\n').map((l) => l.trim()).filter((l) => l.startsWith('qsync-'));

  async function backup(...extra: string[]): Promise<{ code: number | null; disks: DiskSummary[]; stderr: string }> {
    const r = await runQsync(['--domain', dom, '--connect', URI, '--json', ...extra, dest]);
    const doc = JSON.parse(r.stdout || '{"disks":[]}') as { disks: DiskSummary[] };
    return { code: r.code, disks: doc.disks, stderr: r.stderr };
  }
  const byName = (ds: DiskSummary[], name: string): DiskSummary => ds.find((x) => x.name === name)!;

  it('several virsh commands in one process: each answer apart, any word passed as is, an error fails the batch unless tolerated', async () => {
    const odd = `it's "odd"; echo \\ # x`;
    const [state, echoed, list] = await virshBatch(URI, [['domstate', '--', dom], ['echo', '--', odd], ['checkpoint-list', '--name', '--', dom]]);
    expect(state!.trim()).toBe('running');
    expect(echoed).toBe(`${odd}\n`);
    expect(list).toBeDefined();
    const gone = `${dom}-none`;
    const err = await virshBatch(URI, [['domstate', '--', dom], ['domstate', '--', gone]]).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(VirshError);
    expect((err as VirshError).message).toMatch(new RegExp(`failed to get domain '${gone}'`));
    const [, none] = await virshBatch(URI, [['domstate', '--', dom], ['backup-dumpxml', '--', dom]], /no domain backup job/);
    expect(none!.trim()).toBe(''); // the failed command printed nothing
  });

  it('full, then incremental after guest writes on both disks: each target equals what its guest wrote, one checkpoint kept', async () => {
    const full = await backup();
    expect(full.code, full.stderr).toBe(0);
    expect(full.disks.map((x) => x.name).sort()).toEqual(['db', 'web']);
    for (const x of full.disks) expect(x.mode).toBe('full');
    expect(byName(full.disks, 'web').read).toBe(8 * MiB); // allocated extents only
    expect(byName(full.disks, 'db').read).toBe(4 * MiB);
    expectTargets();
    const [first] = await ourCheckpoints();
    expect(await ourCheckpoints()).toHaveLength(1);

    await guestWrite(disks[0]!, 0x55, 1 * MiB, 1 * MiB);
    await guestWrite(disks[0]!, 0x56, 40 * MiB, 128 << 10);
    await guestWrite(disks[1]!, 0x66, 0, 64 << 10);
    const inc = await backup('--verify-sample', '0');
    expect(inc.code, inc.stderr).toBe(0);
    const [web, db] = [byName(inc.disks, 'web'), byName(inc.disks, 'db')];
    expect(web.mode, web.reason).toBe('bitmap');
    expect(db.mode, db.reason).toBe('bitmap');
    expect(web.dirty).toBe(MiB + (128 << 10));
    expect(web.read).toBe(MiB + (128 << 10));
    expect(db.read).toBe(64 << 10);
    expectTargets();
    // The new checkpoint replaced the old one.
    const now = await ourCheckpoints();
    expect(now).toHaveLength(1);
    expect(now[0]).not.toBe(first);
    expect(await virsh('domjobinfo', dom)).toMatch(/Job type:\s+None/);
  });

  it('another backup job on the domain: refused with exit 3, nothing touched; after it ends nothing was lost', async () => {
    await guestWrite(disks[0]!, 0x77, 2 * MiB, 64 << 10);
    const before = { cps: await ourCheckpoints(), sums: disks.map((d) => sha256(target(d))) };
    const state = fs.readdirSync(path.join(stateOf(dest), 'image')).map((f) => fs.readFileSync(path.join(stateOf(dest), 'image', f), 'utf8'));
    const other = path.join(dir, 'other');
    fs.mkdirSync(other);
    fs.chownSync(other, Number((await pexec('id', ['-u', 'libvirt-qemu'])).stdout), Number((await pexec('id', ['-g', 'libvirt-qemu'])).stdout));
    fs.writeFileSync(path.join(dir, 'other.xml'), `<domainbackup mode='pull'><server transport='unix' socket='${other}/nbd.sock'/><disks>${
      disks.map((d) => `<disk name='${d.target}' backup='yes' type='file'><scratch file='${other}/${d.target}.scratch'/></disk>`).join('')}</disks></domainbackup>`);
    await virsh('backup-begin', dom, path.join(dir, 'other.xml'));
    try {
      const r = await runQsync(['--domain', dom, dest]);
      expect(r.code).toBe(3);
      expect(r.stderr).toMatch(/already runs a backup job/);
      expect(await virsh('backup-dumpxml', dom)).toContain(`${other}/nbd.sock`); // the other job still runs
      expect(await ourCheckpoints()).toEqual(before.cps);
      expect(disks.map((d) => sha256(target(d)))).toEqual(before.sums);
      expect(fs.readdirSync(path.join(stateOf(dest), 'image')).map((f) => fs.readFileSync(path.join(stateOf(dest), 'image', f), 'utf8'))).toEqual(state);
    } finally {
      await virsh('domjobabort', dom);
    }
    for (let i = 0; i < 100 && !/Job type:\s+None/.test(await virsh('domjobinfo', dom)); i++) await new Promise((r) => setTimeout(r, 100));
    const r = await backup('--verify-sample', '0');
    expect(r.code, r.stderr).toBe(0);
    expect(byName(r.disks, 'web').mode).toBe('bitmap');
    expect(byName(r.disks, 'web').read).toBe(64 << 10);
    expectTargets();
  });

  it('a run that fails after backup-begin: the job ends and its new checkpoint is deleted, the old base stays', async () => {
    const before = await ourCheckpoints();
    await guestWrite(disks[1]!, 0x88, 10 * MiB, 64 << 10);
    await expect(runDomainBackup({ domain: dom, dest, tempDir: dir }, {
      fileStart: () => {
        throw new Error('injected failure');
      },
    })).rejects.toThrow(/injected failure/);
    expect(await virsh('domjobinfo', dom)).toMatch(/Job type:\s+None/);
    expect(await ourCheckpoints()).toEqual(before);
    expect(fs.readdirSync(dir).filter((f) => f.startsWith('qsync-'))).toEqual([]);
    const r = await backup('--verify-sample', '0');
    expect(r.code, r.stderr).toBe(0);
    expect(byName(r.disks, 'db').mode).toBe('bitmap');
    expect(byName(r.disks, 'db').read).toBe(64 << 10);
    expectTargets();
  });

  it('qsync killed mid-run (first disk committed, second being copied): the next run ends the left job and is correct', async () => {
    await guestWrite(disks[0]!, 0x91, 20 * MiB, 64 << 10);
    await guestWrite(disks[1]!, 0x92, 20 * MiB, 64 << 10);
    // A qsync (compiled) that stops dead when it starts its second disk; then SIGKILL, as the OOM killer would.
    const mod = path.resolve('dist/src/sync/domain-backup.js');
    expect(fs.existsSync(mod), 'built by npm test (npx tsc -p .)').toBe(true);
    const child = spawn(process.execPath, ['--input-type=module', '-e', `
      const m = await import(${JSON.stringify(mod)});
      let n = 0;
      await m.runDomainBackup(${JSON.stringify({ domain: dom, dest, verifySamplePct: 0 })}, {
        fileStart: () => { if (++n === 2) { process.stdout.write('stopped\\n'); Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0); } },
      });`], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      await new Promise<void>((res, rej) => {
        child.stdout.on('data', (b: Buffer) => b.toString().includes('stopped') && res());
        child.once('exit', (code) => rej(new Error(`the qsync to kill exited ${code} first`)));
      });
      expect(await virsh('domjobinfo', dom)).toMatch(/Backup/);
    } finally {
      child.kill('SIGKILL');
    }
    await new Promise((r) => child.once('exit', r));
    expect((await ourCheckpoints()).length).toBe(2); // the killed run's new checkpoint, and the old base

    await guestWrite(disks[0]!, 0x93, 21 * MiB, 64 << 10);
    await guestWrite(disks[1]!, 0x94, 21 * MiB, 64 << 10);
    const r = await backup('--verify-sample', '0');
    expect(r.code, r.stderr).toBe(0);
    // web was committed by the killed run (incremental from its checkpoint); db from the old one.
    expect(byName(r.disks, 'web').mode).toBe('bitmap');
    expect(byName(r.disks, 'web').read).toBe(64 << 10);
    expect(byName(r.disks, 'db').mode).toBe('bitmap');
    expect(byName(r.disks, 'db').read).toBe(128 << 10);
    expectTargets();
    const left = await ourCheckpoints();
    expect(left).toHaveLength(1);
    // No run folder (socket, scratch files) of this DEST is left in the temp dir.
    const prefix = left[0]!.replace(/[^-]+$/, '');
    expect(fs.readdirSync(os.tmpdir()).filter((f) => f.startsWith(prefix))).toEqual([]);
  });

  it('QEMU killed (its bitmaps never saved): the broken checkpoint is found, each disk read in full and correct', async () => {
    await guestWrite(disks[0]!, 0xb1, 24 * MiB, 64 << 10);
    // The guest's writes are durable (a guest flush: qcow2 metadata too); the bitmaps are only saved when QEMU closes the image.
    for (const d of disks) await virsh('qemu-monitor-command', dom, '--hmp', `qemu-io -d ${d.qdev} "flush"`);
    const pid = Number(fs.readFileSync(`/run/libvirt/qemu/${dom}.pid`, 'utf8'));
    process.kill(pid, 'SIGKILL');
    for (let i = 0; i < 100 && !(await virsh('domstate', dom)).includes('shut off'); i++) await new Promise((r) => setTimeout(r, 100));
    await start();
    await guestWrite(disks[1]!, 0xb2, 24 * MiB, 64 << 10);
    const notices: string[] = [];
    const r = await runDomainBackup({ domain: dom, dest, tempDir: dir }, { notice: (m) => notices.push(m) });
    for (const x of r) expect(x.reason).toMatch(/^checkpoint qsync-\S+ is broken/);
    expect(notices.filter((m) => /^(web \(vda\)|db \(vdb\)): checkpoint .* is broken/.test(m))).toHaveLength(2);
    expectTargets();
    expect(await ourCheckpoints()).toHaveLength(1);
    const [next] = [await backup('--verify-sample', '0')];
    expect(next.code, next.stderr).toBe(0);
    for (const x of next.disks) expect(x.mode).toBe('bitmap');
  });

  it('shut off: only the changes the checkpoint bitmap in each image counts are read offline, and it stays the base; started again, incremental', async () => {
    await guestWrite(disks[0]!, 0xa1, 30 * MiB, 64 << 10);
    // A clean QEMU exit (no guest OS to shut down): the persistent checkpoint bitmaps are stored, not left in use.
    // (virsh may see the monitor close before its answer: the state below is what counts.)
    await virsh('qemu-monitor-command', dom, '--hmp', 'quit').catch(() => {});
    for (let i = 0; i < 100 && !(await virsh('domstate', dom)).includes('shut off'); i++) await new Promise((r) => setTimeout(r, 100));
    expect(await virsh('domstate', dom, '--reason')).toMatch(/shut off \(shutdown\)/);
    const notices: string[] = [];
    const off = await runDomainBackup({ domain: dom, dest, tempDir: dir }, { notice: (m) => notices.push(m) });
    for (const x of off) expect(x.mode, x.reason).toBe('bitmap');
    expect(notices).toEqual([
      expect.stringMatching(new RegExp(`^web \\(vda\\): domain is shut off: changes since checkpoint qsync-\\S+ read from ${disks[0]!.file}$`)),
      expect.stringMatching(new RegExp(`^db \\(vdb\\): domain is shut off: changes since checkpoint qsync-\\S+ read from ${disks[1]!.file}$`)),
    ]);
    expectTargets();
    expect(byName(off, 'web')).toMatchObject({ dirty: 64 << 10, written: 64 << 10 });
    expect(byName(off, 'db')).toMatchObject({ dirty: 0, written: 0 });

    await start();
    await guestWrite(disks[0]!, 0xa2, 31 * MiB, 64 << 10);
    const r = await backup('--verify-sample', '0');
    expect(r.code, r.stderr).toBe(0);
    expect(byName(r.disks, 'web').mode, byName(r.disks, 'web').reason).toBe('bitmap');
    expect(byName(r.disks, 'web').read).toBe(128 << 10); // since the checkpoint: the write before the shutdown, and this one
    expectTargets();
  });

  it('to a remote DEST over ssh (the far side holds targets and state): full, then incremental after guest writes', async () => {
    const sshd = await startSshd();
    try {
      const rdest = path.join(dir, 'far');
      const serverCmd = `QSYNC_STATE_DIR=${path.join(dir, 'far-state')} ${process.execPath} ${QSYNC}`;
      const push = async () => {
        const r = await runQsync(['--domain', dom, '--connect', URI, '--json', '-e', sshd.rsh, '--qsync-path', serverCmd, `${sshd.host}:${rdest}/`]);
        return { code: r.code, stderr: r.stderr, disks: (JSON.parse(r.stdout || '{"disks":[]}') as { disks: DiskSummary[] }).disks };
      };
      const full = await push();
      expect(full.code, full.stderr).toBe(0);
      for (const x of full.disks) expect(x.mode).toBe('full');
      await guestWrite(disks[1]!, 0xb1, 2 * MiB, 128 << 10);
      const inc = await push();
      expect(inc.code, inc.stderr).toBe(0);
      for (const x of inc.disks) expect(x.mode, x.reason).toBe('bitmap');
      expect(byName(inc.disks, 'db').written).toBe(128 << 10);
      for (const d of disks) expect(fs.readFileSync(path.join(rdest, `${d.name}.raw`)).equals(d.model), `${d.name}.raw on the far side`).toBe(true);
    } finally {
      await sshd.stop();
    }
  });

  it('qsync forget DEST --domain: that DEST\'s checkpoints and notes go, another\'s stay; its next run is full and correct; a DEST moved away is forgotten too', async () => {
    const other = path.join(dir, 'other-backup');
    const o = await runQsync(['--domain', dom, '--connect', URI, '--json', other]);
    expect(o.code, o.stderr).toBe(0);
    const before = await ourCheckpoints();
    expect(before.length).toBeGreaterThanOrEqual(2); // this file's DESTs each keep one

    const f = await runQsync(['forget', dest, '--domain', dom, '--connect', URI]);
    expect(f.code, f.stderr).toBe(0);
    expect(f.stdout).toBe(`${dom}: dropped 1 checkpoint and the image state of ${dest}\n`);
    const after = await ourCheckpoints();
    expect(after).toHaveLength(before.length - 1);
    expect(fs.readdirSync(path.join(stateOf(dest), 'image')).filter((n) => n.endsWith('.json'))).toEqual([]);

    // The copies stay; the next run reads each disk in full and they still equal what the guest wrote.
    await guestWrite(disks[0]!, 0xc1, 3 * MiB, 64 << 10);
    const next = await backup('--verify-sample', '0');
    expect(next.code, next.stderr).toBe(0);
    for (const x of next.disks) expect(x.mode).toBe('full');
    expect(byName(next.disks, 'web').written).toBe(64 << 10);
    expectTargets();

    // A DEST the user moved away: its checkpoint would pile up in the domain; forget drops it and makes nothing.
    fs.renameSync(other, `${other}.moved`);
    const g = await runQsync(['forget', other, '--domain', dom, '--connect', URI]);
    expect(g.code, g.stderr).toBe(0);
    expect(g.stdout).toMatch(/dropped 1 checkpoint/);
    expect(fs.existsSync(other)).toBe(false);
    expect(await ourCheckpoints()).toHaveLength(before.length - 1); // this DEST's new one, and no other
  });
});
