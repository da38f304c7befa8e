/**
 * The QEMU process behind a local QMP socket, found the way ss(8) does it:
 * the socket's inodes in /proc/net/unix, then the process holding one of
 * them among /proc/PID/fd (Node cannot read SO_PEERCRED). Used to create
 * files QEMU must open as the user it runs as (libvirt runs it as
 * libvirt-qemu), and to say whose monitor a busy socket is.
 */
import type { Stats } from 'node:fs';
import { readdir, readFile, readlink, stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { QsyncError } from '../core/errors.js';

export interface QemuProcessInfo {
  pid: number;
  uid: number;
  gid: number;
  /** Supplementary groups. */
  groups: number[];
  /** `-name guest=NAME,...`: the libvirt domain (or the name given by hand). */
  name?: string;
  /** Started by libvirt (its command line has libvirt's marks). */
  libvirt: boolean;
}

export interface QemuBehind {
  proc: QemuProcessInfo;
  /** Clients connected to this socket that the process has accepted (a monitor serves one at a time). */
  clients: number;
}

/** Descriptor links of a process read at once. */
const LINKS_AT_ONCE = 64;

/** SS_CONNECTED in /proc/net/unix's St column. */
const CONNECTED = '03';

/** Undefined for a tcp: address, or when no process of this host holds the socket (or /proc cannot tell). */
export async function qemuBehind(qmpAddress: string): Promise<QemuBehind | undefined> {
  if (qmpAddress.startsWith('tcp:')) return undefined;
  const path = resolve(qmpAddress.startsWith('unix:') ? qmpAddress.slice(5) : qmpAddress);
  const table = await readFile('/proc/net/unix', 'utf8').catch(() => '');
  // The listening socket and the accepted ones all carry the path; keyed as /proc/PID/fd links name them.
  const inodes = new Map<string, boolean>();
  for (const line of table.split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length >= 8 && f.slice(7).join(' ') === path) inodes.set(`socket:[${f[6]}]`, f[5] === CONNECTED);
  }
  if (!inodes.size) return undefined;
  for (const pid of await readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(pid) || Number(pid) === process.pid) continue;
    // A few links at a time: a process may hold tens of thousands of descriptors (a promise and a string each, all at once, were 20 MiB more peak RSS).
    const fds = await readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
    const held: string[] = [];
    for (let i = 0; i < fds.length; i += LINKS_AT_ONCE) {
      const links = await Promise.all(fds.slice(i, i + LINKS_AT_ONCE).map((fd) => readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')));
      held.push(...links.filter((l) => inodes.has(l)));
    }
    if (!held.length) continue;
    const proc = await describe(Number(pid));
    return proc && { proc, clients: held.filter((l) => inodes.get(l)).length };
  }
  return undefined;
}

async function describe(pid: number): Promise<QemuProcessInfo | undefined> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8').catch(() => '');
  const field = (name: string): number[] =>
    (status.match(new RegExp(`^${name}:\\s*(.*)$`, 'm'))?.[1] ?? '').split(/\s+/).filter(Boolean).map(Number);
  const [uid, gid] = [field('Uid')[1], field('Gid')[1]];
  if (uid === undefined || gid === undefined) return undefined;
  const args = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
  const nameArg = args[args.indexOf('-name') + 1];
  const name = args.includes('-name') ? nameArg?.match(/^(?:guest=)?((?:[^,]|,,)+)/)?.[1]?.replace(/,,/g, ',') : undefined;
  // libvirt names the guest with guest=... and hands QEMU its secrets and monitor as numbered objects.
  const libvirt = !!nameArg?.startsWith('guest=') && args.some((a) => a.startsWith('id=charmonitor') || a.includes('chardev=charmonitor'));
  return { pid, uid, gid, groups: field('Groups'), name, libvirt };
}

export interface QemuUser {
  uid: number;
  gid: number;
  groups: number[];
}

/**
 * Who QEMU runs as, when that is not this process's user: the owner of the
 * process behind the QMP socket, else of the first image file (libvirt
 * hands its images to the user it runs QEMU as). Undefined: same user, or
 * cannot tell (a tcp: monitor of another host).
 */
export async function qemuUser(qmpAddress: string, files: (string | undefined)[]): Promise<QemuUser | undefined> {
  const behind = await qemuBehind(qmpAddress);
  let user: QemuUser | undefined = behind && { uid: behind.proc.uid, gid: behind.proc.gid, groups: behind.proc.groups };
  for (const f of files) {
    if (user || !f) break;
    const st = await stat(f).catch(() => undefined);
    if (st) user = { uid: st.uid, gid: st.gid, groups: [] };
  }
  return user && user.uid !== process.getuid?.() ? user : undefined;
}

/** QEMU (as `user`) must pass through every folder above `dir` and create its NBD socket in it. */
export async function checkReachable(dir: string, user: QemuUser): Promise<void> {
  const gids = new Set([user.gid, ...user.groups]);
  const may = (st: Stats, bits: number): boolean => {
    const shift = st.uid === user.uid ? 6 : gids.has(st.gid) ? 3 : 0;
    return ((st.mode >> shift) & bits) === bits;
  };
  const full = resolve(dir);
  const parts = full.split('/').filter(Boolean);
  for (let i = 0; i <= parts.length; i++) {
    const p = '/' + parts.slice(0, i).join('/');
    const st = await stat(p).catch(() => undefined);
    const need = i === parts.length ? 3 : 1;
    if (st && !may(st, need)) {
      throw new QsyncError('TARGET', `QEMU runs as uid ${user.uid} and cannot ${need === 3 ? 'create its NBD socket in' : 'pass through'} ${p} (the temp folder is ${full})`, {
        file: p,
        hint: 'point TMPDIR at a folder that user can write (e.g. a 1777 one like /tmp), or run QEMU as root',
      });
    }
  }
}
