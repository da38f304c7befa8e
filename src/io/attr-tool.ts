/**
 * Extended attributes (POSIX ACLs included: the kernel keeps them as the
 * `system.posix_acl_access` and `system.posix_acl_default` attributes)
 * through the system's `getfattr`/`setfattr` (package attr). Node has no
 * xattr API, and no hand-written syscall shim is wanted.
 *
 * The tools take paths, and a path can be swapped between check and use. So
 * they never get one: the inode is held by a descriptor (an O_PATH one, or
 * a folder's), that descriptor is handed to the child as its fd 3 (4, ...),
 * and the tool is pointed at `/proc/self/fd/3`, which the kernel resolves to
 * exactly that inode (a symlink itself included: the /proc link is followed,
 * the symlink it lands on is not, so `-h` must NOT be given). No shell; the
 * output read is bounded, and every run has a timeout.
 */
import { spawn } from 'node:child_process';
import { QsyncError } from '../core/errors.js';

/** A dump larger than this is refused (Linux caps one value at 64 KiB; a file has a handful). */
export const MAX_DUMP = 8 << 20;
const TIMEOUT_MS = 60_000;

export interface ToolResult {
  code: number;
  stdout: Buffer;
  stderr: string;
}

/** A tool's message with the /proc paths it was given replaced by the names they stand for. */
const named = (stderr: string, shown: string[]): string => stderr.replace(/\/proc\/self\/fd\/(\d+)/g, (p, n: string) => shown[Number(n) - 3] ?? p);

/** Run `cmd args` with `fds` as the child's fds 3, 4, ...; stdin from `input`. */
export function runWithFds(cmd: string, args: string[], fds: number[], input?: string): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: [input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe', ...fds] });
    const out: Buffer[] = [];
    let outLen = 0;
    let stderr = '';
    let failed: Error | undefined;
    const fail = (e: Error) => {
      failed ??= e;
      child.kill('SIGKILL');
    };
    const timer = setTimeout(() => fail(new QsyncError('IO', `${cmd} did not finish within ${TIMEOUT_MS / 1000} s; stopped`, { tool: cmd })), TIMEOUT_MS);
    child.stdout!.on('data', (d: Buffer) => {
      outLen += d.length;
      if (outLen > MAX_DUMP) fail(new QsyncError('IO', `${cmd} printed more than ${MAX_DUMP} bytes of attributes; refused`, { tool: cmd }));
      else out.push(d);
    });
    child.stderr!.on('data', (d: Buffer) => {
      if (stderr.length < 4096) stderr += d.toString();
    });
    child.stdin?.on('error', () => {}); // a child that exits early closes its stdin: its exit code says why
    child.stdin?.end(input);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(
        (e as NodeJS.ErrnoException).code === 'ENOENT'
          ? new QsyncError('UNSUPPORTED', `${cmd} is not installed: -A and -X need it (package attr)`, { tool: cmd, hint: 'apt-get install attr' })
          : e,
      );
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      if (failed) reject(failed);
      else resolve({ code: code ?? -1, stdout: Buffer.concat(out), stderr: stderr.trim() });
    });
  });
}

/**
 * getfattr prints bytes past 0x7f of a name raw; as `\ooo` (which setfattr
 * unquotes too) the name is plain ASCII and survives argv and stdin intact.
 */
const quoteHigh = (latin1: string): string => latin1.replace(/[\x80-\xff]/g, (c) => `\\${c.charCodeAt(0).toString(8)}`);

/** Attribute name (getfattr's quoted form, which setfattr takes back) → value, as getfattr's `0s` base64 text (`""` when empty). */
export type AttrMap = Map<string, string>;

/**
 * Read all attributes of the inodes behind `fds` (one map each), with one
 * getfattr run. A file system without xattr support gives empty maps.
 */
export async function readAttrs(fds: number[], shown: string[]): Promise<AttrMap[]> {
  const paths = fds.map((_, i) => `/proc/self/fd/${i + 3}`);
  const r = await runWithFds('getfattr', ['--absolute-names', '-d', '-m', '-', '-e', 'base64', '--', ...paths], fds);
  if (r.code !== 0 && !/not supported/i.test(r.stderr)) {
    throw new QsyncError('IO', `cannot read the extended attributes of ${shown.join(', ')}: ${named(r.stderr, shown) || `getfattr exited with ${r.code}`}`, { file: shown[0] });
  }
  const maps = fds.map(() => new Map<string, string>());
  let cur: AttrMap | undefined;
  for (const line of r.stdout.toString('latin1').split('\n')) {
    const file = /^# file: \/proc\/self\/fd\/(\d+)$/.exec(line);
    if (file) {
      cur = maps[Number(file[1]) - 3];
      continue;
    }
    if (!line || line.startsWith('#') || !cur) continue;
    // Names come quoted (`=`, `\`, controls and spaces as \ooo): the first `=` ends the name.
    const eq = line.indexOf('=');
    // An empty value as `""`: setfattr refuses an empty `0s`.
    const value = eq < 0 ? '' : line.slice(eq + 1);
    cur.set(quoteHigh(eq < 0 ? line : line.slice(0, eq)), value === '' || value === '0s' ? '""' : value);
  }
  return maps;
}

/** An inode (behind `fd`) to give `set` (added or replaced) and take `remove` from; `shown` names it in messages. */
export interface AttrWrite {
  fd: number;
  set: [string, string][];
  remove: string[];
  shown: string;
}

/**
 * Apply `writes`: one setfattr run for all the values of all of them
 * (--restore from stdin, one section per descriptor), one run per removal
 * (setfattr removes one name per run).
 */
export async function writeAttrs(writes: AttrWrite[]): Promise<void> {
  const fail = (r: ToolResult, what: string, shown: string[]) =>
    new QsyncError('IO', `cannot ${what} of ${shown.join(', ')}: ${named(r.stderr, shown) || `setfattr exited with ${r.code}`}`, {
      file: shown[0],
      hint: 'the destination file system must support them (ext4/xfs/btrfs; mount options user_xattr, acl)',
    });
  for (const w of writes) {
    for (const name of w.remove) {
      const r = await runWithFds('setfattr', ['-x', name, '--', '/proc/self/fd/3'], [w.fd]);
      // Already gone (an ACL the kernel dropped with a chmod): nothing to do.
      if (r.code !== 0 && !/No such attribute/.test(r.stderr)) throw fail(r, `remove attribute ${name}`, [w.shown]);
    }
  }
  const sets = writes.filter((w) => w.set.length);
  if (!sets.length) return;
  const dump = sets.map((w, i) => `# file: /proc/self/fd/${i + 3}\n${w.set.map(([n, v]) => `${n}=${v}\n`).join('')}\n`).join('');
  const r = await runWithFds('setfattr', ['--restore=-'], sets.map((w) => w.fd), dump);
  if (r.code !== 0) throw fail(r, `set attributes (${[...new Set(sets.flatMap((w) => w.set.map(([n]) => n)))].join(', ')})`, sets.map((w) => w.shown));
}
