/**
 * Real QEMU processes for integration tests: each lives in its own temp dir,
 * is started by the test and killed by pid (also when the test process exits).
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll } from 'vitest';
import { NbdClient } from '../../src/io/nbd/client.js';
import { QmpClient } from '../../src/qemu/qmp.js';

const live = new Set<ChildProcess>();
process.on('exit', () => {
  for (const c of live) if (c.exitCode === null && c.pid) process.kill(c.pid, 'SIGKILL');
});

export function tmpDir(prefix = 'qsync-qemu-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function run(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

export function qemuImgCreate(file: string, size: string, format = 'qcow2'): void {
  run('qemu-img', ['create', '-q', '-f', format, file, size]);
}

/** `qemu-io -c CMD` on an image no process holds open. */
export function qemuIo(file: string, format: string, ...cmds: string[]): void {
  run('qemu-io', ['-f', format, ...cmds.flatMap((c) => ['-c', c]), file]);
}

export interface QemuProcess {
  readonly pid: number;
  readonly dir: string;
  readonly qmp: string;
  /** A second monitor (QEMU serves one client per QMP socket): for the code under test. */
  readonly qmp2: string;
  readonly log: string;
  /** SIGTERM (or the given signal), SIGKILL after 5 s; resolves when it has exited. */
  kill(signal?: NodeJS.Signals): Promise<void>;
}

async function waitSocket(sock: string, child: ChildProcess, log: string): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`QEMU exited ${child.exitCode}: ${fs.readFileSync(log, 'utf8')}`);
    if (fs.existsSync(sock)) {
      const ok = await new Promise<boolean>((resolve) => {
        const s = net.connect(sock, () => {
          s.destroy();
          resolve(true);
        });
        s.on('error', () => resolve(false));
      });
      if (ok) return;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`QMP socket ${sock} did not appear`);
}

function start(bin: string, args: string[], dir: string, qmp: string): Promise<QemuProcess> {
  const log = path.join(dir, `${path.basename(bin)}.log`);
  const out = fs.openSync(log, 'a');
  const child = spawn(bin, args, { cwd: dir, stdio: ['ignore', out, out] });
  fs.closeSync(out);
  live.add(child);
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  exited.then(() => live.delete(child));
  const proc: QemuProcess = {
    pid: child.pid!,
    dir,
    qmp,
    qmp2: qmp.replace(/\.sock$/, '2.sock'),
    log,
    async kill(signal = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill(signal);
        const t = setTimeout(() => child.kill('SIGKILL'), 5000);
        await exited;
        clearTimeout(t);
      }
    },
  };
  return waitSocket(qmp, child, log).then(
    () => proc,
    async (e) => {
      await proc.kill('SIGKILL');
      throw e;
    },
  );
}

export interface StartOptions {
  /** Run QEMU as this user and group (setpriv), as libvirt runs it as libvirt-qemu. */
  user?: [user: string, group: string];
}

const asUser = (bin: string, args: string[], o: StartOptions): [string, string[]] =>
  o.user ? ['setpriv', [`--reuid=${o.user[0]}`, `--regid=${o.user[1]}`, '--clear-groups', '--', bin, ...args]] : [bin, args];

/** qemu-storage-daemon with `disk` as qcow2 node `node` (file node `${node}-file`) and a QMP socket. */
export function startQsd(dir: string, disk: string, node = 'disk0', extra: string[] = [], o: StartOptions = {}): Promise<QemuProcess> {
  const qmp = path.join(dir, 'qsd-qmp.sock');
  fs.rmSync(qmp, { force: true });
  return start(
    ...asUser('qemu-storage-daemon', [
      '--blockdev', `driver=file,node-name=${node}-file,filename=${disk}`,
      '--blockdev', `driver=qcow2,node-name=${node},file=${node}-file`,
      '--chardev', `socket,id=qmp0,path=${qmp},server=on,wait=off`,
      '--monitor', 'chardev=qmp0',
      '--chardev', `socket,id=qmp1,path=${qmp.replace(/\.sock$/, '2.sock')},server=on,wait=off`,
      '--monitor', 'chardev=qmp1',
      ...extra,
    ], o),
    dir,
    qmp,
  );
}

/**
 * A q35 TCG VM, no kernel. Disk i (one file, or several) is qcow2 node
 * `drive<i>` on virtio-blk device `vd<a+i>`; `extra` QEMU arguments last.
 */
export function startVm(dir: string, disks: string | string[], extra: string[] = []): Promise<QemuProcess> {
  const qmp = path.join(dir, 'vm-qmp.sock');
  fs.rmSync(qmp, { force: true });
  return start(
    'qemu-system-x86_64',
    [
      '-machine', 'q35,accel=tcg', '-m', '64', '-nodefaults', '-display', 'none',
      ...[disks].flat().flatMap((disk, i) => [
        '-blockdev', `driver=file,node-name=f${i},filename=${disk}`,
        '-blockdev', `driver=qcow2,node-name=drive${i},file=f${i}`,
        '-device', `virtio-blk-pci,drive=drive${i},id=vd${String.fromCharCode(97 + i)}`,
      ]),
      '-qmp', `unix:${qmp},server=on,wait=off`,
      '-qmp', `unix:${qmp.replace(/\.sock$/, '2.sock')},server=on,wait=off`,
      ...extra,
    ],
    dir,
    qmp,
  );
}

/** qemu-nbd serving `image` on a unix socket; resolves once the socket accepts. */
export function startQemuNbd(dir: string, image: string, args: string[] = []): Promise<QemuProcess & { uri: string }> {
  const sock = path.join(dir, 'qemu-nbd.sock');
  fs.rmSync(sock, { force: true });
  return start('qemu-nbd', ['--persistent', '--shared=16', `--socket=${sock}`, ...args, image], dir, sock).then((p) => ({
    ...p,
    uri: `nbd+unix:///?socket=${sock}`,
  }));
}

export interface QsdFixture {
  dir: string;
  disk: string;
  qsd: QemuProcess;
  qmp: QmpClient;
}

/**
 * In a describe block: a fresh qcow2 of `size` served by qemu-storage-daemon
 * as node disk0, with a connected QMP client; all torn down after the block.
 */
export function useQsd(size = '64M', prepare?: (disk: string) => void): QsdFixture {
  const fx = {} as QsdFixture;
  beforeAll(async () => {
    fx.dir = tmpDir();
    fx.disk = path.join(fx.dir, 'disk.qcow2');
    qemuImgCreate(fx.disk, size);
    prepare?.(fx.disk);
    fx.qsd = await startQsd(fx.dir, fx.disk);
    fx.qmp = await QmpClient.connect(fx.qsd.qmp);
  });
  afterAll(async () => {
    await fx.qmp?.close();
    await fx.qsd?.kill();
    if (fx.dir) fs.rmSync(fx.dir, { recursive: true, force: true });
  });
  return fx;
}

/**
 * Run `fn` against a short-lived NBD export of `node` (QEMU allows one NBD
 * server, so this must not overlap with a backup's own export).
 */
export async function withExport<T>(qmp: QmpClient, node: string, dir: string, writable: boolean, fn: (c: NbdClient) => Promise<T>): Promise<T> {
  const sock = path.join(dir, 'test-export.sock');
  await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  try {
    await qmp.execute('block-export-add', { type: 'nbd', id: 'test-export', 'node-name': node, writable, name: 'x' });
    const c = await NbdClient.connect(`nbd+unix:///x?socket=${sock}`);
    const out = await fn(c);
    await c.close();
    const gone = qmp.waitEvent('BLOCK_EXPORT_DELETED', (e) => e.data.id === 'test-export');
    await qmp.execute('block-export-del', { id: 'test-export' });
    await gone;
    return out;
  } finally {
    await qmp.execute('nbd-server-stop');
  }
}

/** Guest-visible contents of `node`. */
export const readLive = (qmp: QmpClient, node: string, dir: string): Promise<Buffer> =>
  withExport(qmp, node, dir, false, async (c) => {
    const buf = Buffer.alloc(c.size);
    await c.read(buf, 0);
    return buf;
  });
