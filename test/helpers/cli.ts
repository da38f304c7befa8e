import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { stateFolderIn } from '../../src/sync/state-dir.js';

export const QSYNC = join(import.meta.dirname, '../../dist/src/cli/main.js');

/** The unprivileged user the tests play (nobody). */
export const NOBODY = 65534;
/** setpriv's arguments that run a command as nobody (uid and gid 65534, no groups). */
export const AS_NOBODY = [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups'];

/** The state base of qsync runs as nobody (test/helpers/state-base.ts makes it). */
export const nobodyStateBase = (): string => process.env.QSYNC_TEST_NOBODY_STATE_DIR!;

/** The state folder qsync keeps for destination `destRoot` in this test file (as root, or as nobody). */
export const stateOf = (destRoot: string, asNobody = false): string =>
  stateFolderIn(asNobody ? nobodyStateBase() : process.env.QSYNC_STATE_DIR!, destRoot);

/** stateOf, with the folders above it made (0700) so a test can plant something in its place. */
export function stateSlot(destRoot: string, asNobody = false): string {
  const at = stateOf(destRoot, asNobody);
  mkdirSync(dirname(at), { recursive: true, mode: 0o700 });
  return at;
}

/** Where qsync keeps the manifest of `rel` below `destRoot` (a plain name). */
export const manifestOf = (destRoot: string, rel: string, asNobody = false): string => join(stateOf(destRoot, asNobody), 'manifests', `${rel}.qsm`);

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** The child's I/O counters from /proc (rchar/wchar: bytes through read/write syscalls). */
  io?: { rchar: number; wchar: number };
  /** With `peakRss`: the qsync process's peak resident set (VmHWM at its exit), MiB; NaN if it did not report one. */
  peakRssMiB?: number;
}

/**
 * Run the built qsync CLI. With `measureIo`, it runs under a shell that
 * prints its own /proc/self/io after waiting for qsync: Linux adds a reaped
 * child's counters (all its threads) to the parent's, so the numbers are the
 * child's, measured from outside it. `asNobody`: run as nobody, through setpriv.
 * `peakRss`: qsync's own peak RSS, read as it exits (test/helpers/peak-rss.mjs).
 */
export function runQsync(args: string[], opts: { measureIo?: boolean; env?: NodeJS.ProcessEnv; onSpawn?: (pid: number) => void; asNobody?: boolean; peakRss?: boolean } = {}): Promise<RunResult> {
  const rssFile = opts.peakRss ? join(mkdtempSync(join(tmpdir(), 'qsync-rss-')), 'kib') : undefined;
  const cmd = rssFile
    ? spawn('node', ['--import', join(import.meta.dirname, 'peak-rss.mjs'), QSYNC, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...(opts.env ?? process.env), QSYNC_TEST_PEAK_RSS: rssFile } })
    : opts.measureIo
    ? spawn('sh', ['-c', 'node "$@"; rc=$?; cat /proc/$$/io >&3; exit $rc', 'sh', QSYNC, ...args], { stdio: ['ignore', 'pipe', 'pipe', 'pipe'], env: opts.env ?? process.env })
    : opts.asNobody
      ? spawn('setpriv', [...AS_NOBODY, 'node', QSYNC, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...(opts.env ?? process.env), QSYNC_STATE_DIR: nobodyStateBase() } })
      : spawn('node', [QSYNC, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env });
  opts.onSpawn?.(cmd.pid!);
  let stdout = '';
  let stderr = '';
  let io = '';
  cmd.stdout!.on('data', (d) => (stdout += d));
  cmd.stderr!.on('data', (d) => (stderr += d));
  cmd.stdio[3]?.on('data', (d) => (io += d));
  return new Promise((resolve) => {
    cmd.on('close', (code, signal) => {
      const field = (k: string) => Number(io.match(new RegExp(`^${k}: (\\d+)$`, 'm'))?.[1] ?? NaN);
      let peakRssMiB: number | undefined;
      if (rssFile) {
        peakRssMiB = Number(readFileSync(rssFile, { encoding: 'utf8', flag: 'a+' }) || NaN) / 1024;
        rmSync(dirname(rssFile), { recursive: true, force: true });
      }
      resolve({ code, signal, stdout, stderr, io: opts.measureIo ? { rchar: field('rchar'), wchar: field('wchar') } : undefined, peakRssMiB });
    });
  });
}

export async function sha256(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) h.update(chunk as Buffer);
  return h.digest('hex');
}
