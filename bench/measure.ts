/**
 * Runs one command and measures it from outside the process.
 *
 * A bash wrapper starts the command under GNU time and, after it has been
 * reaped, prints its own /proc/$$/io. Linux adds a reaped child's I/O
 * counters to the parent's (wait_task_zombie: task_io_accounting_add), the
 * same way it adds rusage, so the wrapper's counters are the command's plus
 * every process the command waited for (rsync's receiver and generator), and
 * a few KiB for the wrapper itself. GNU time gives CPU (user+sys of the child
 * and its reaped descendants) and peak RSS (ru_maxrss: of the largest single
 * process, not a sum over rsync's three). Wall time comes from bash's
 * EPOCHREALTIME around the command (microseconds; GNU time's %e has 10 ms).
 */
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface Measurement {
  exitCode: number;
  wallS: number;
  userS: number;
  sysS: number;
  maxRssKiB: number;
  /** Bytes through read(2)-like calls (pipes included; mmap not counted). */
  rchar: number;
  wchar: number;
  /** Bytes fetched from storage (0 when the page cache was warm). */
  readBytes: number;
  /** Bytes of page cache dirtied for storage: what the command wrote to files. */
  writeBytes: number;
  cancelledWriteBytes: number;
  /** The end of stderr, kept for failures. */
  stderr: string;
}

export const TIME_BIN = '/usr/bin/time';

// GNU time cannot open /dev/fd/3 (Node's stdio pipes are sockets), so it
// writes to a file on tmpfs, where writes do not count in write_bytes.
const WRAPPER = `
t0=$EPOCHREALTIME
${TIME_BIN} -f '%U %S %M' -o "$BENCH_TIME_OUT" "$@"
rc=$?
t1=$EPOCHREALTIME
echo "wall $t0 $t1 $rc" >&3
cat /proc/$$/io >&3
exit $rc
`;

const STDERR_KEEP = 4096;
const timeDir = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
let seq = 0;

export function measure(argv: string[]): Promise<Measurement> {
  const timeOut = join(timeDir, `qsync-bench-${process.pid}-${seq++}`);
  return new Promise((resolve, reject) => {
    const child = spawn('bash', ['-c', WRAPPER, 'bench', ...argv], {
      env: { ...process.env, LC_ALL: 'C', BENCH_TIME_OUT: timeOut },
      stdio: ['ignore', 'ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    let report = '';
    child.stderr!.setEncoding('utf8').on('data', (s: string) => {
      stderr = (stderr + s).slice(-STDERR_KEEP);
    });
    (child.stdio[3] as NodeJS.ReadableStream).setEncoding('utf8');
    (child.stdio[3] as NodeJS.ReadableStream).on('data', (s: string) => (report += s));
    child.on('error', reject);
    child.on('close', () => {
      try {
        resolve({ ...parseReport(report + readFileSync(timeOut, 'utf8')), stderr });
      } catch (e) {
        reject(new Error(`could not measure ${argv.join(' ')}: ${(e as Error).message}\n${stderr}`));
      } finally {
        rmSync(timeOut, { force: true });
      }
    });
  });
}

/** Parses the wrapper's fd 3: the "wall" line, /proc/PID/io, then GNU time's output. */
export function parseReport(text: string): Omit<Measurement, 'stderr'> {
  const lines = text.trim().split('\n');
  const wall = lines.find((l) => l.startsWith('wall '))?.split(' ').slice(1).map(Number);
  // GNU time may print "Command exited with non-zero status N" before its format line.
  const timeLine = lines.find((l) => /^[\d.]+ [\d.]+ \d+$/.test(l))?.split(' ').map(Number);
  if (!timeLine || !wall || wall.length !== 3 || wall.some(Number.isNaN)) {
    throw new Error(`unexpected wrapper output: ${JSON.stringify(text)}`);
  }
  const io = new Map<string, number>();
  for (const l of lines) {
    const m = /^(\w+): (\d+)$/.exec(l);
    if (m) io.set(m[1]!, Number(m[2]));
  }
  const field = (k: string): number => {
    const v = io.get(k);
    if (v === undefined) throw new Error(`no ${k} in /proc/PID/io`);
    return v;
  };
  const [userS, sysS, maxRssKiB] = timeLine as [number, number, number];
  const [t0, t1, exitCode] = wall as [number, number, number];
  return {
    exitCode,
    wallS: t1 - t0,
    userS,
    sysS,
    maxRssKiB,
    rchar: field('rchar'),
    wchar: field('wchar'),
    readBytes: field('read_bytes'),
    writeBytes: field('write_bytes'),
    cancelledWriteBytes: field('cancelled_write_bytes'),
  };
}
