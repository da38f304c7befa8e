/**
 * What the differential tests against real rsync compare: a tree's entries
 * (types, content, modes, owners, µs mtimes, link targets, device numbers),
 * folder times, and output lines; and how they run rsync and set up trees.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { lstatSync, lutimesSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { AS_NOBODY, NOBODY, nobodyStateBase, QSYNC } from './cli.js';

export interface Entry {
  type: string;
  mode: number;
  mtimeUs?: number;
  uid: number;
  gid: number;
  rdev?: number;
  content?: string;
  link?: string;
}

/** Paths as bytes: names need not be UTF-8. Keys are the bytes read as latin1. */
export const B = (p: string | Buffer) => (typeof p === 'string' ? Buffer.from(p) : p);
export const joinB = (...parts: (string | Buffer)[]) => Buffer.concat(parts.flatMap((p, i) => (i ? [Buffer.from('/'), B(p)] : [B(p)])));
export const listB = (dir: Buffer) => readdirSync(dir, { encoding: 'buffer' }).sort(Buffer.compare);

/** Everything a user compares after a sync, keyed by relative path (qsync keeps nothing of its own in DEST). */
export function snapshot(dir: string | Buffer, rel?: Buffer): Record<string, Entry> {
  const out: Record<string, Entry> = {};
  for (const name of listB(rel ? joinB(dir, rel) : B(dir))) {
    const r = rel ? joinB(rel, name) : name;
    const p = joinB(dir, r);
    const st = lstatSync(p, { bigint: true });
    const type = st.isDirectory() ? 'dir' : st.isSymbolicLink() ? 'link' : st.isFile() ? 'file' : st.isFIFO() ? 'fifo' : st.isSocket() ? 'socket' : st.isBlockDevice() ? 'block' : 'char';
    const e: Entry = { type, mode: Number(st.mode), uid: Number(st.uid), gid: Number(st.gid) };
    // rsync gives a link made in this second its own time rather than the source's:
    // compare times of everything but folders (dirTimes), and of links from the past.
    const recent = Date.now() * 1000 - Number(st.mtimeNs / 1000n) < 60e6;
    if (!st.isDirectory() && !(st.isSymbolicLink() && recent)) e.mtimeUs = Number(st.mtimeNs / 1000n);
    if (st.isFile()) e.content = readFileSync(p).toString('base64');
    if (st.isSymbolicLink()) e.link = readlinkSync(p, { encoding: 'buffer' }).toString('latin1');
    if (st.isBlockDevice() || st.isCharacterDevice()) e.rdev = Number(st.rdev);
    out[r.toString('latin1')] = e;
    if (st.isDirectory()) Object.assign(out, snapshot(dir, r));
  }
  return out;
}

/**
 * Directory mtimes, compared apart so that a failure says which kind of
 * entry differs. A folder the run changed itself (a deletion in a folder
 * that stays) has the time of that change: any time in the last minute reads 'now'.
 */
export function dirTimes(dir: string): Record<string, number | 'now'> {
  const out: Record<string, number | 'now'> = {};
  const walk = (rel?: Buffer) => {
    for (const name of listB(rel ? joinB(dir, rel) : B(dir))) {
        const r = rel ? joinB(rel, name) : name;
      const st = lstatSync(joinB(dir, r), { bigint: true });
      if (st.isDirectory()) {
        const us = Number(st.mtimeNs / 1000n);
        out[r.toString('latin1')] = Date.now() * 1000 - us < 60e6 ? 'now' : us;
        walk(r);
      }
    }
  };
  walk();
  return out;
}

export const T_SRC = new Date('2025-01-02T03:04:05.678901Z');
export const T_DEST = new Date('2024-06-07T08:09:10.111213Z');

/** Give every entry below `dir` (and `dir`) the time `when`, links included. */
export function ageAll(dir: string | Buffer, when: Date): void {
  for (const n of listB(B(dir))) {
    const p = joinB(dir, n);
    if (lstatSync(p).isDirectory()) ageAll(p, when);
    else lutimesSync(p, when, when);
  }
  lutimesSync(dir, when, when);
}

/** Run a bash script in `cwd` (the source), with $D the destination's starting state. */
export const sh = (script: string, cwd: string, dest: string) => execFileSync('bash', ['-ec', script], { cwd, env: { ...process.env, D: dest } });
/** Output lines, sorted; rsync's "sent N bytes" and speedup count its protocol's bytes, which qsync has none of. */
export const sortedLines = (s: string) =>
  s
    .split('\n')
    .filter((l) => l && !l.startsWith('sent '))
    .map((l) => l.replace(/ {2}speedup is .*/, ''))
    .sort();

export function runRsync(args: string[], nobody: boolean): { code: number; stdout: string; stderr: string } {
  const [cmd, argv] = nobody ? ['setpriv', [...AS_NOBODY, 'rsync', ...args]] : ['rsync', args];
  const r = spawnSync(cmd, argv, { encoding: 'latin1', timeout: 60_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/**
 * Output with its times and rates made constant, and nothing else: progress
 * rates ("12.34kB/s") and times ("0:00:01"), "N bytes/sec", the seconds of
 * rsync's "File list ... time" lines, and the byte counts of rsync's protocol
 * ("sent N bytes  received N bytes", "Total bytes sent/received", and the
 * speedup made of them), which a local qsync has no protocol for.
 */
export const normaliseOutput = (s: string): string =>
  s
    .replace(/ +[\d.,]+[kMG]B\/s /g, ' RATE ')
    .replace(/ +\d+:\d\d:\d\d/g, ' TIME')
    .replace(/^sent \S+ bytes {2}received \S+ bytes {2}\S+ bytes\/sec$/gm, 'sent N bytes  received N bytes  R bytes/sec')
    .replace(/^(total size is \S+ {2}speedup is )\S+/gm, '$1S')
    .replace(/^(Total bytes (sent|received): )\S+$/gm, '$1N')
    .replace(/^(File list (generation|transfer) time: )\S+/gm, '$1T');

/**
 * rsync and qsync with the same arguments on `src` into `D` (each in a folder
 * of its own below `base`, made from `seed` when given, cp -a), or the
 * `operands` given instead of SRC/; as nobody
 * with `nobody` (then the folders are nobody's). Output as latin1 (names are bytes).
 */
export async function runBoth(base: string, src: string, args: string[], opts: { seed?: string; nobody?: boolean; operands?: string[] } = {}) {
  const out: Record<'rsync' | 'qsync', { code: number | null; stdout: string; stderr: string }> = {} as never;
  for (const tool of ['rsync', 'qsync'] as const) {
    const cwd = `${base}/${tool}`;
    execFileSync('rm', ['-rf', cwd]);
    execFileSync('mkdir', ['-p', cwd]);
    if (opts.seed) execFileSync('cp', ['-a', opts.seed, `${cwd}/D`]);
    if (opts.nobody) execFileSync('chown', ['-R', `${NOBODY}:${NOBODY}`, cwd]);
    const argv = [...args, ...(opts.operands ?? [`${src}/`]), 'D/'];
    const [cmd, cmdArgs] = tool === 'rsync' ? ['rsync', argv] : ['node', [QSYNC, ...argv]];
    const env = tool === 'qsync' && opts.nobody ? { ...process.env, QSYNC_STATE_DIR: nobodyStateBase() } : process.env;
    const r = opts.nobody ? spawnSync('setpriv', [...AS_NOBODY, cmd, ...cmdArgs], { cwd, env, encoding: 'latin1' }) : spawnSync(cmd, cmdArgs, { cwd, env, encoding: 'latin1' });
    out[tool] = { code: r.status, stdout: normaliseOutput(r.stdout), stderr: r.stderr };
  }
  return out;
}
