/**
 * A real Linux guest for image-mode tests: Debian's kernel (fetched with apt
 * once and cached), a busybox initramfs whose /init runs a shell workload,
 * ext4 disks formatted on the host, and a look into a backed-up ext4 image
 * as the guest would find it after a crash (e2fsck replays the journal, as
 * mount would; debugfs reads files without mounting).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { run, startVm, type QemuProcess } from './qemu.js';

/** The modules an ext4-on-virtio-blk guest needs, in load order. */
export const GUEST_MODULES = [
  'virtio_ring', 'virtio', 'virtio_pci_modern_dev', 'virtio_pci_legacy_dev', 'virtio_pci', 'virtio_blk',
  'crc32c_generic', 'crc16', 'mbcache', 'jbd2', 'ext4',
] as const;

export interface GuestKernel {
  /** Debian package and version, e.g. linux-image-6.1.0-57-amd64_6.1.192-3. */
  readonly id: string;
  readonly vmlinuz: string;
  /** GUEST_MODULES' files, in load order. */
  readonly modules: string[];
}

const CACHE = path.join(os.tmpdir(), 'qsync-guest-cache');

function cached(dir: string, id: string): GuestKernel | undefined {
  const k = { id, vmlinuz: path.join(dir, 'vmlinuz'), modules: GUEST_MODULES.map((m) => path.join(dir, `${m}.ko`)) };
  return [k.vmlinuz, ...k.modules].every((f) => fs.existsSync(f)) ? k : undefined;
}

/** Every file below `dir` (no links followed). */
function walk(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    return e.isDirectory() ? walk(p) : [p];
  });
}

/**
 * Debian's current 6.1 kernel (the linux-image-6.1.0-N-amd64 with the highest
 * N apt knows), its vmlinuz and GUEST_MODULES kept in
 * $TMPDIR/qsync-guest-cache/<package>_<version>/ so later runs reuse them.
 */
export function guestKernel(): GuestKernel {
  const found = run('apt-cache', ['search', '--names-only', '^linux-image-6.1.0-[0-9]+-amd64$'])
    .split('\n')
    .map((l) => l.split(' ')[0]!)
    .filter((p) => /^linux-image-6\.1\.0-\d+-amd64$/.test(p))
    .sort((a, b) => Number(a.split('-')[3]) - Number(b.split('-')[3]));
  const pkg = found.at(-1);
  if (!pkg) throw new Error("apt knows no linux-image-6.1.0-N-amd64 (a Debian 12 machine with apt's lists: run apt-get update)");
  const version = /^Version: (\S+)$/m.exec(run('apt-cache', ['show', '--no-all-versions', pkg]))?.[1];
  if (!version) throw new Error(`apt-cache show ${pkg} names no version`);
  const id = `${pkg}_${version}`.replace(/[^A-Za-z0-9._+-]/g, '_');
  // A kernel the tests boot as root: only from a cache folder this user made.
  fs.mkdirSync(CACHE, { recursive: true, mode: 0o755 });
  const st = fs.lstatSync(CACHE);
  if (!st.isDirectory() || st.uid !== process.getuid!() || st.mode & 0o022) {
    throw new Error(`${CACHE} is not a folder of this user's that only it can write: remove it`);
  }
  const dir = path.join(CACHE, id);
  const have = cached(dir, id);
  if (have) return have;

  const work = fs.mkdtempSync(path.join(CACHE, '.fetch-'));
  try {
    run('sh', ['-c', 'cd "$1" && apt-get download -q "$2"', 'sh', work, pkg]);
    const deb = fs.readdirSync(work).find((f) => f.endsWith('.deb'));
    if (!deb) throw new Error(`apt-get download ${pkg} left no .deb`);
    const x = path.join(work, 'x');
    run('dpkg', ['-x', path.join(work, deb), x]);
    const out = path.join(work, 'out');
    fs.mkdirSync(out);
    const boot = fs.readdirSync(path.join(x, 'boot')).find((f) => f.startsWith('vmlinuz-'));
    if (!boot) throw new Error(`${deb} holds no boot/vmlinuz-*`);
    fs.copyFileSync(path.join(x, 'boot', boot), path.join(out, 'vmlinuz'));
    const kos = walk(path.join(x, 'lib', 'modules'));
    for (const m of GUEST_MODULES) {
      const ko = kos.find((f) => path.basename(f) === `${m}.ko`);
      if (!ko) throw new Error(`${deb} holds no ${m}.ko`);
      fs.copyFileSync(ko, path.join(out, `${m}.ko`));
    }
    // Another test process may have filled the cache meanwhile: theirs is as good.
    try {
      fs.renameSync(out, dir);
    } catch (e) {
      if (!cached(dir, id)) throw e;
    }
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
  return cached(dir, id)!;
}

/**
 * An initramfs (uncompressed newc cpio, by busybox) of busybox, the modules
 * and an /init that mounts proc, sysfs and devtmpfs, loads the modules and
 * runs `workload` (busybox sh). Folders `mnts` are made for the workload.
 */
export function buildInitramfs(dir: string, kernel: GuestKernel, workload: string, mnts: string[] = []): string {
  const root = path.join(dir, 'initramfs');
  for (const d of ['bin', 'lib/modules', 'proc', 'sys', 'dev', ...mnts]) fs.mkdirSync(path.join(root, d), { recursive: true });
  fs.copyFileSync(run('sh', ['-c', 'command -v busybox']).trim(), path.join(root, 'bin', 'busybox'));
  fs.chmodSync(path.join(root, 'bin', 'busybox'), 0o755);
  for (const ko of kernel.modules) fs.copyFileSync(ko, path.join(root, 'lib', 'modules', path.basename(ko)));
  const init = [
    '#!/bin/busybox sh',
    '/bin/busybox --install -s /bin',
    'mount -t proc proc /proc',
    'mount -t sysfs sys /sys',
    'mount -t devtmpfs dev /dev',
    `for m in ${GUEST_MODULES.join(' ')}; do insmod /lib/modules/$m.ko || echo "GUEST: insmod $m failed"; done`,
    workload,
    '',
  ].join('\n');
  fs.writeFileSync(path.join(root, 'init'), init, { mode: 0o755 });
  const out = path.join(dir, 'initramfs.cpio');
  run('sh', ['-c', 'cd "$1" && find . | busybox cpio -o -H newc > "$2"', 'sh', root, out]);
  fs.rmSync(root, { recursive: true, force: true });
  return out;
}

/**
 * A qcow2 `file` holding a fresh ext4 of `sizeMiB` (formatted by mkfs.ext4 on
 * a raw file, then converted), holding the files of folder `content` if given.
 */
export function makeExt4(file: string, sizeMiB: number, content?: string): void {
  const raw = `${file}.mkfs.raw`;
  fs.writeFileSync(raw, '');
  fs.truncateSync(raw, sizeMiB << 20);
  try {
    // Inode tables and journal written now: the guest's lazy init would write in the background.
    run('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', ...(content ? ['-d', content] : []), raw]);
    run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, file]);
  } finally {
    fs.rmSync(raw, { force: true });
  }
}

export interface Guest {
  readonly vm: QemuProcess;
  /** The guest's serial console (kernel messages and the workload's output). */
  readonly serial: string;
  readonly console: () => string;
}

/**
 * Boot `kernel` with `initrd` under TCG (q35, -cpu max, 256 MiB) with the
 * qcow2 `disks` as virtio-blk vda, vdb, ... (nodes drive0, drive1, ...: see
 * startVm), the serial console to DIR/serial.log. A guest that panics
 * (its workload ended) makes QEMU exit.
 */
export async function startGuest(dir: string, disks: string[], kernel: GuestKernel, initrd: string): Promise<Guest> {
  const serial = path.join(dir, 'serial.log');
  fs.writeFileSync(serial, '');
  const vm = await startVm(dir, disks, [
    '-m', '256', '-cpu', 'max', '-no-reboot',
    '-kernel', kernel.vmlinuz, '-initrd', initrd,
    '-append', 'console=ttyS0 rdinit=/init panic=-1 loglevel=4',
    '-serial', `file:${serial}`,
  ]);
  return { vm, serial, console: () => fs.readFileSync(serial, 'utf8') };
}

/** Poll `cond` every 100 ms until it holds; after `timeoutMs` fail with `what` and `detail()`. */
export async function waitUntil(cond: () => boolean, what: string, timeoutMs: number, detail: () => string = () => ''): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}\n${detail()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export interface RecoveredExt4 {
  /** e2fsck -fy's exit code (0: clean, 1: fixed: a journal replay, the free counts) and output. */
  readonly fsck: { code: number | null; output: string };
  /** e2fsck -fn's exit code after the repair: 0 when the first pass left a clean file system. */
  readonly recheck: number | null;
  /** The contents of `file` (absolute path in the file system); throws when it is missing. */
  cat(file: string): Buffer;
  remove(): void;
}

/**
 * What a guest would find on `image` (a raw ext4) after a crash: a sparse
 * copy in `dir`, repaired by `e2fsck -fy` (the journal replay mount would
 * do, and whatever else it finds), then read with debugfs.
 */
export function recoverExt4(image: string, dir: string): RecoveredExt4 {
  const copy = path.join(dir, `recover-${path.basename(image)}-${process.hrtime.bigint()}`);
  run('cp', ['--sparse=always', image, copy]);
  const fsck = spawnSync('e2fsck', ['-fy', copy], { encoding: 'utf8' });
  const recheck = spawnSync('e2fsck', ['-fn', copy], { encoding: 'utf8' });
  return {
    fsck: { code: fsck.status, output: `${fsck.stdout}${fsck.stderr}` },
    recheck: recheck.status,
    cat(file) {
      const r = spawnSync('debugfs', ['-R', `cat ${file}`, copy], { maxBuffer: 256 << 20 });
      const err = r.stderr.toString().replace(/^debugfs [^\n]*\n/, '').trim();
      if (r.status !== 0 || err) throw new Error(`debugfs cat ${file} on ${image}: ${err || `exit ${r.status}`}`);
      return r.stdout;
    },
    remove: () => fs.rmSync(copy, { force: true }),
  };
}
