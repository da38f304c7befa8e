/**
 * The fault campaign's small shared runner: a seeded PRNG, child processes
 * under a timeout (a timeout is a hang), per-class tallies and one-line
 * reproductions, and black-box checks on files (tree equality, snapshots of
 * what must not change). Nothing here knows how qsync works inside: the
 * campaign drives the built CLI (dist/src/cli/main.js) only.
 */
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { lstatSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const QSYNC_CLI = join(import.meta.dirname, '../../src/cli/main.js');

/** rsync's exit values: the only ones qsync may return. */
export const RSYNC_CODES: ReadonlySet<number> = new Set([0, 1, 2, 3, 5, 10, 11, 12, 20, 23, 24, 30]);

// ---------------------------------------------------------------- PRNG

/** A seeded PRNG (mulberry32): the same seed gives the same campaign. */
export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  /** Uniform in [0, 1). */
  next(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  /** Integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  /** Integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  bytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i += 4) {
      const v = (this.next() * 4294967296) >>> 0;
      for (let k = 0; k < 4 && i + k < n; k++) b[i + k] = (v >>> (8 * k)) & 0xff;
    }
    return b;
  }
}

/** The seed of one trial: a function of the campaign seed, the class and the trial number only. */
export function trialSeed(seed: number, cls: string, trial: number): number {
  return createHash('sha256').update(`${seed}/${cls}/${trial}`).digest().readUInt32LE(0);
}

// ---------------------------------------------------------------- processes

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** Killed by the timeout. */
  hung: boolean;
  /** Killed by `killAfterMs` (the fault injected on purpose). */
  killed: boolean;
  ms: number;
}

export interface RunOptions {
  timeoutMs: number;
  /** SIGKILL the child (its whole process group) this long after the spawn: the injected crash. */
  killAfterMs?: number;
  /**
   * The injected kill hits qsync alone (as the OOM killer would), not its children: what it started
   * (qemu-storage-daemon) lives on until `reapGroup(pid)`. The run ends when qsync exits.
   */
  killLeaderOnly?: boolean;
  env?: NodeJS.ProcessEnv;
  onSpawn?: (pid: number) => void;
}

const MAX_CAPTURE = 1 << 20;

/**
 * Run a command in its own process group, under a timeout. On timeout or
 * on `killAfterMs` the whole group gets SIGKILL (qsync's own children, such
 * as qemu-storage-daemon, are in it), so nothing outlives the trial.
 */
export function run(cmd: string, args: readonly string[], o: RunOptions): Promise<RunResult> {
  const t0 = performance.now();
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: o.env ?? process.env, detached: true });
  if (child.pid !== undefined) o.onSpawn?.(child.pid);
  let stdout = '';
  let stderr = '';
  let hung = false;
  let killed = false;
  child.stdout!.on('data', (d: Buffer) => {
    if (stdout.length < MAX_CAPTURE) stdout += d.toString();
  });
  child.stderr!.on('data', (d: Buffer) => {
    if (stderr.length < MAX_CAPTURE) stderr += d.toString();
  });
  const killGroup = () => {
    if (child.pid !== undefined) reapGroup(child.pid);
  };
  const timer = setTimeout(() => {
    hung = true;
    killGroup();
  }, o.timeoutMs);
  const crash =
    o.killAfterMs === undefined
      ? undefined
      : setTimeout(() => {
          killed = true;
          if (!o.killLeaderOnly) killGroup();
          else child.kill('SIGKILL');
        }, o.killAfterMs);
  return new Promise((resolve) => {
    const done = (code: number | null, signal: NodeJS.Signals | null) => {
      clearTimeout(timer);
      if (crash) clearTimeout(crash);
      if (!(killed && o.killLeaderOnly)) killGroup(); // anything it left in its group (a daemon) goes with it
      resolve({ code, signal, stdout, stderr, hung, killed: killed && !hung, ms: performance.now() - t0 });
    };
    child.on('error', (e) => {
      stderr += `spawn failed: ${e.message}\n`;
    });
    // A child it left running may hold the pipes open: with killLeaderOnly the run ends at qsync's exit.
    if (o.killLeaderOnly) child.on('exit', (code, signal) => (killed ? done(code, signal) : undefined));
    child.on('close', done);
  });
}

/** Kill what is left of a process group the campaign started (orphans of a killed run). */
export function reapGroup(pid: number): void {
  try {
    process.kill(-pid, 'SIGKILL');
  } catch {
    /* nothing left */
  }
}

/** The pid of a process that has exited (for stale locks). */
export const deadPid = (): number => spawnSync('true').pid;

/** Run the built qsync CLI. */
export const qsync = (args: readonly string[], o: RunOptions): Promise<RunResult> => run(process.execPath, [QSYNC_CLI, ...args], o);

/** As user nobody (65534), no supplementary groups. */
export const asNobody = (cmd: string, args: readonly string[]): [string, string[]] => [
  'setpriv',
  ['--reuid=65534', '--regid=65534', '--clear-groups', cmd, ...args],
];

/** What is wrong with how a run ended, if anything (a stack trace, an exit code outside rsync's set). */
export function badEnding(r: RunResult, allowed: ReadonlySet<number> = RSYNC_CODES): string | undefined {
  if (r.hung) return 'hang (timeout)';
  if (/^\s+at /m.test(r.stderr)) return `stack trace in stderr: ${firstLine(r.stderr)}`;
  if (/internal error/i.test(r.stderr)) return `"internal error" in stderr: ${firstLine(r.stderr)}`;
  if (r.killed) return undefined;
  if (r.code === null) return `ended by signal ${r.signal}`;
  if (!allowed.has(r.code)) return `exit ${r.code} (not in ${[...allowed].join('/')}): ${firstLine(r.stderr)}`;
  return undefined;
}

export const firstLine = (s: string): string =>
  s
    .split('\n')
    .map((l) => l.trim())
    .find((l) => l.length > 0)
    ?.slice(0, 200) ?? '(empty)';

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------- tallies

/** The outcome counters of one class; every one but trials/converged/refused/skipped is a bad outcome. */
export interface Tally {
  trials: number;
  converged: number;
  /** Mutation class: a clean refusal (non-zero rsync code, a message, nothing damaged). Not bad. */
  refused: number;
  unconverged: number;
  unrestorable: number;
  lies: number;
  hangs: number;
  crashes: number;
  outside: number;
  readable: number;
  overlaps: number;
  skipped: number;
}

export const BAD_KEYS = ['unconverged', 'unrestorable', 'lies', 'hangs', 'crashes', 'outside', 'readable', 'overlaps'] as const;
export type BadKey = (typeof BAD_KEYS)[number];

export const emptyTally = (): Tally => ({
  trials: 0,
  converged: 0,
  refused: 0,
  unconverged: 0,
  unrestorable: 0,
  lies: 0,
  hangs: 0,
  crashes: 0,
  outside: 0,
  readable: 0,
  overlaps: 0,
  skipped: 0,
});

export interface Failure {
  cls: string;
  seed: number;
  trial: number;
  kind: BadKey;
  what: string;
}

/** What one trial found; a class module fills it, the campaign sums it. */
export class TrialReport {
  readonly bad: { kind: BadKey; what: string }[] = [];
  converged = false;
  refused = false;
  skipped?: string;
  note(kind: BadKey, what: string): void {
    this.bad.push({ kind, what });
  }
  /**
   * A set-up run (no fault injected yet) must succeed for the trial to mean anything: false, with the
   * bad outcome noted (its bad ending, or "unconverged" with its exit code and message), when it did not.
   */
  setup(r: RunResult, label: string): boolean {
    if (this.ending(r, `${label} (no fault injected)`)) return false;
    if (r.code === 0) return true;
    this.note('unconverged', `${label} (no fault injected) exit ${r.code}: ${firstLine(r.stderr)}`);
    return false;
  }
  /** Record a bad ending of a run (hang, stack trace, exit code); true if there was one. */
  ending(r: RunResult, label: string, allowed?: ReadonlySet<number>): boolean {
    const why = badEnding(r, allowed);
    if (!why) return false;
    this.note(r.hung ? 'hangs' : 'crashes', `${label}: ${why}`);
    return true;
  }
}

export interface TrialContext {
  rng: Rng;
  trial: number;
  seed: number;
  /** A fresh temporary folder for this trial, removed afterwards (unless --keep). */
  ws: string;
  /** Per-run timeout (ms). */
  timeoutMs: number;
  log: (msg: string) => void;
}

export interface FaultClass {
  name: string;
  summary: string;
  /** Trials for a default (CI-bounded) campaign. */
  defaultTrials: number;
  /** Per-run timeout for this class (ms); --timeout overrides it. */
  timeoutMs: number;
  /** Why the class cannot run here (missing tools, no mount), if so. */
  unavailable?: () => string | undefined;
  trial(ctx: TrialContext, report: TrialReport): Promise<void>;
}

/** A trial's folder; the qsync runs of the trial keep their state in it too (QSYNC_STATE_DIR), so it goes with it. */
export function newWorkspace(cls: string, trial: number): string {
  const ws = mkdtempSync(join(tmpdir(), `qsync-faults-${cls}-${trial}-`));
  process.env.QSYNC_STATE_DIR = join(ws, 'state');
  return ws;
}

export const removeWorkspace = (ws: string) => rmSync(ws, { recursive: true, force: true, maxRetries: 3 });

// ---------------------------------------------------------------- files

export const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** Regular files under `root` (relative paths). */
export function listFiles(root: string, rel = ''): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  for (const e of readdirSync(join(root, rel), { withFileTypes: true })) {
    const r = rel ? join(rel, e.name) : e.name;
    if (e.isDirectory()) for (const [k, v] of listFiles(root, r)) out.set(k, v);
    else if (e.isFile()) out.set(r, readFileSync(join(root, r)));
    else out.set(r, Buffer.from(`<${e.isSymbolicLink() ? 'symlink' : 'special'}>`));
  }
  return out;
}

/** Why the regular files of `dest` differ from `src` (undefined: equal). */
export function treeDiff(src: string, dest: string): string | undefined {
  const a = listFiles(src);
  const b = listFiles(dest);
  for (const [k, v] of a) {
    const w = b.get(k);
    if (!w) return `${k} missing in ${dest}`;
    if (!w.equals(v)) return `${k} differs (${w.length} bytes vs ${v.length} in the source, first difference at ${firstDiff(v, w)})`;
  }
  for (const k of b.keys()) if (!a.has(k)) return `${k} in ${dest} but not in the source`;
  return undefined;
}

export function firstDiff(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

export interface Entry {
  type: string;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtimeNs: bigint;
  digest?: string;
  link?: string;
}

/** Everything about a tree that must not change: type, mode, owner, size, mtime, content. */
export function snapshot(root: string): Map<string, Entry> {
  const out = new Map<string, Entry>();
  const walk = (rel: string) => {
    const p = rel ? join(root, rel) : root;
    const st = lstatSync(p, { bigint: true });
    const type = st.isFile() ? 'file' : st.isDirectory() ? 'dir' : st.isSymbolicLink() ? 'symlink' : 'other';
    const e: Entry = { type, mode: Number(st.mode), uid: Number(st.uid), gid: Number(st.gid), size: Number(st.size), mtimeNs: st.mtimeNs };
    if (type === 'file') e.digest = sha(readFileSync(p));
    out.set(rel || '.', e);
    if (type === 'dir') for (const n of readdirSync(p).sort()) walk(rel ? join(rel, n) : n);
  };
  walk('');
  return out;
}

/** Why `after` differs from `before` (undefined: nothing changed). */
export function snapshotDiff(before: Map<string, Entry>, after: Map<string, Entry>, root: string): string | undefined {
  for (const [k, e] of before) {
    const f = after.get(k);
    if (!f) return `${join(root, k)} was removed`;
    for (const key of ['type', 'mode', 'uid', 'gid', 'size', 'mtimeNs', 'digest'] as const) {
      if (e[key] !== f[key] && !(key === 'mtimeNs' && e.type === 'dir' && k === '.')) {
        return `${join(root, k)}: ${key} changed (${String(e[key])} -> ${String(f[key])})`;
      }
    }
  }
  for (const k of after.keys()) if (!before.has(k)) return `${join(root, k)} was created`;
  return undefined;
}
