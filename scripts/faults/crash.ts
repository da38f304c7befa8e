/**
 * Class "crash": kill -9 at a random instant during a file sync, a
 * --backup-dir run, `apply`, `restore` or `prune`; rerun without the kill;
 * the target must equal the source (or the delta's result), `qsync verify`
 * must pass, and every point `restore --list` shows must restore to the
 * bytes the target had then.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { manifestPathFor } from '../../src/sync/manifest-store.js';
import { SMALL_FILE_MAX } from '../../src/sync/small-file.js';
import { firstLine, qsync, snapshot, snapshotDiff, treeDiff, type FaultClass, type RunResult, type TrialContext, type TrialReport } from './runner.js';
import { changeContent, extraReadBits, MiB, randomContent, stateMismatch, TargetModel, writeTree, type Version } from './tree-model.js';

const OPS = ['sync', 'backup', 'apply', 'restore', 'prune'] as const;
type Op = (typeof OPS)[number];

interface Ctx {
  c: TrialContext;
  report: TrialReport;
  src: string;
  dest: string;
  hist: string;
  modes: Map<string, number>;
  model: TargetModel;
  /** Duration of the last comparable run: the kill instant is drawn below it. */
  lastMs: number;
}

/** Run qsync with SRC checked unchanged around it (qsync never writes its source). */
async function q(x: Ctx, label: string, args: string[], killAfterMs?: number): Promise<RunResult> {
  const before = snapshot(x.src);
  const r = await qsync(args, { timeoutMs: x.c.timeoutMs, killAfterMs });
  x.report.ending(r, label);
  const changed = snapshotDiff(before, snapshot(x.src), x.src);
  if (changed) x.report.note('outside', `${label}: the source changed: ${changed}`);
  return r;
}

/** A kill instant: mostly inside the work (after node's start-up), sometimes very early or just at the end. */
function killInstant(x: Ctx): number {
  const est = Math.max(150, x.lastMs);
  const r = x.c.rng.next();
  if (r < 0.15) return x.c.rng.range(20, 150);
  if (r < 0.9) return Math.round(est * (0.25 + 0.75 * x.c.rng.next()));
  return Math.round(est * (0.95 + 0.15 * x.c.rng.next()));
}

/** One sync run of `version` into DEST; returns whether it converged (exit 0). */
async function syncRun(x: Ctx, version: Version, extra: string[], label: string, kill: boolean): Promise<RunResult> {
  writeTree(x.src, version, x.modes);
  x.model.beginRun(Date.now(), version.keys());
  const r = await q(x, label, ['-a', ...extra, `${x.src}/`, `${x.dest}/`], kill ? killInstant(x) : undefined);
  if (r.code === 0 && !r.killed) {
    x.model.converged(version);
    if (!kill) x.lastMs = r.ms;
  } else x.model.interrupted(version);
  return r;
}

/** A setup run (no kill) that must succeed for the trial to go on. */
async function setupSync(x: Ctx, version: Version, extra: string[], label: string): Promise<boolean> {
  return x.report.setup(await syncRun(x, version, extra, label, false), label);
}

/** The rerun after the kill: exit 0, DEST == SRC, verify passes on every file. */
async function checkConverged(x: Ctx, target: string, label: string, r: RunResult, names: Iterable<string>): Promise<boolean> {
  if (r.code !== 0) {
    x.report.note('unconverged', `${label}: rerun after kill -9 exit ${r.code}: ${firstLine(r.stderr)}`);
    return false;
  }
  const diff = treeDiff(x.src, target);
  if (diff) {
    x.report.note('lies', `${label}: rerun exit 0 but ${diff}`);
    return false;
  }
  for (const n of names) {
    // A small file has no manifest (src/sync/small-file.ts): DEST == SRC above is all there is to check.
    if (statSync(join(target, n)).size <= SMALL_FILE_MAX) continue;
    // A nested file's manifest is in the tree's state folder (docs/FORMATS.md), not beside the file.
    const manifest = n.includes('/') ? ['--manifest', manifestPathFor(target, n)] : [];
    const v = await q(x, `verify ${n}`, ['verify', join(target, n), ...manifest]);
    if (v.code !== 0) {
      x.report.note('unconverged', `${label}: verify ${n} after the rerun exit ${v.code}: ${firstLine(v.stderr + v.stdout)}`);
      return false;
    }
  }
  return true;
}

/** Files in DEST, delta files and restored copies must not be readable by more users than the source files. */
function checkModes(x: Ctx, what: string, paths: { path: string; ref: number }[]): void {
  const bad: string[] = [];
  for (const { path, ref } of paths) {
    if (!existsSync(path)) continue;
    const extra = extraReadBits(path, ref);
    if (extra) bad.push(`${path} has read bits 0${extra.toString(8)} its source (mode 0${ref.toString(8)}) lacks`);
  }
  // One line per kind of file and trial: the first example and how many.
  if (bad.length && !x.report.bad.some((b) => b.kind === 'readable' && b.what.startsWith(what))) {
    x.report.note('readable', `${what}: ${bad[0]}${bad.length > 1 ? ` (and ${bad.length - 1} more)` : ''}`);
  }
}

const strictestMode = (x: Ctx) => [...x.modes.values()].reduce((a, m) => a & m, 0o777);

function destModes(x: Ctx): { path: string; ref: number }[] {
  return [...x.modes].map(([n, m]) => ({ path: join(x.dest, n), ref: m }));
}

function historyModes(x: Ctx): { path: string; ref: number }[] {
  if (!existsSync(x.hist)) return [];
  return readdirSync(x.hist).map((n) => ({ path: join(x.hist, n), ref: strictestMode(x) }));
}

/** Every point `restore --list` shows restores, and to what the target held then. */
async function checkPoints(x: Ctx, names: Iterable<string>): Promise<boolean> {
  let ok = true;
  for (const name of names) {
    const file = join(x.dest, name);
    const l = await q(x, `restore --list ${name}`, ['restore', file, '--backup-dir', x.hist, '--list']);
    if (l.code !== 0) {
      x.report.note('unrestorable', `restore ${name} --list exit ${l.code}: ${firstLine(l.stderr)}`);
      ok = false;
      continue;
    }
    for (const m of l.stdout.matchAll(/^\s*(\d+)\s+(\S+)\s+(\d+)\s+(\d+)\s*$/gm)) {
      const n = Number(m[1]);
      const until = Date.parse(m[2]!);
      const out = join(x.c.ws, `restored-${name.replace(/\//g, '_')}-${n}`);
      const r = await q(x, `restore ${name} --at ${n}`, ['restore', file, out, '--backup-dir', x.hist, '--at', String(n)]);
      const want = x.model.stateAt(name, until);
      if (r.code !== 0) {
        x.report.note('unrestorable', `point ${n} (${m[2]}) of ${name}: restore exit ${r.code}: ${firstLine(r.stderr)}`);
        ok = false;
        continue;
      }
      checkModes(x, 'restore OUT', [{ path: out, ref: x.modes.get(name) ?? 0o644 }]);
      const why = want ? stateMismatch(readFileSync(out), want) : 'no run started at or before that time';
      if (why) {
        x.report.note('lies', `point ${n} (${m[2]}) of ${name}: restore exit 0 but ${why}`);
        ok = false;
      }
    }
  }
  return ok;
}

function initial(x: Ctx): Version {
  const n = x.c.rng.range(2, 3);
  const v: Version = new Map();
  for (let i = 0; i < n; i++) {
    const size = i === 0 ? x.c.rng.range(2 * MiB, 5 * MiB) : x.c.rng.range(64 * 1024, 2 * MiB);
    const name = i === 2 ? `sub/disk${i}.img` : `disk${i}.img`;
    v.set(name, randomContent(x.c.rng, size + (x.c.rng.chance(0.5) ? x.c.rng.int(65536) : 0)));
    x.modes.set(name, x.c.rng.pick([0o600, 0o640, 0o644]));
  }
  return v;
}

/** A new version of the source: every file changed (so every file gets a history member). */
const next = (x: Ctx, v: Version): Version => new Map([...v].map(([k, b]) => [k, changeContent(x.c.rng, b)]));

async function opSync(x: Ctx, backup: boolean): Promise<void> {
  const extra = backup ? [`--backup-dir=${x.hist}`] : [];
  let v = initial(x);
  if (!(await setupSync(x, v, extra, 'first sync'))) return;
  if (backup) {
    v = next(x, v);
    if (!(await setupSync(x, v, extra, 'second sync'))) return;
  }
  v = next(x, v);
  const k = await syncRun(x, v, extra, 'killed sync', true);
  checkModes(x, 'DEST file', destModes(x));
  if (backup) checkModes(x, '--backup-dir history file', historyModes(x));
  const r = await syncRun(x, v, extra, 'rerun', false);
  let ok = await checkConverged(x, x.dest, `sync${backup ? ' --backup-dir' : ''} (killed at ${k.ms.toFixed(0)} ms${k.killed ? '' : ', finished first'})`, r, v.keys());
  checkModes(x, 'DEST file', destModes(x));
  if (backup) ok = (await checkPoints(x, v.keys())) && ok;
  x.report.converged = ok;
}

async function opApply(x: Ctx): Promise<void> {
  const base = initial(x);
  if (!(await setupSync(x, base, [], 'first sync'))) return;
  const v = next(x, base);
  writeTree(x.src, v, x.modes);
  const delta = join(x.c.ws, 'batch.qdelta');
  const w = await q(x, 'only-write-batch', ['-a', `--only-write-batch=${delta}`, `${x.src}/`, `${x.dest}/`]);
  if (!x.report.setup(w, '--only-write-batch')) return;
  checkModes(x, '--only-write-batch file', [{ path: delta, ref: strictestMode(x) }]);
  const target = join(x.c.ws, 'applied');
  mkdirSync(target);
  writeTree(target, base, x.modes);
  const first = await q(x, 'apply (timing)', ['verify', delta]);
  x.lastMs = first.ms * 1.5;
  const k = await q(x, 'killed apply', ['apply', delta, target], killInstant(x));
  const r = await q(x, 'apply rerun', ['apply', delta, target]);
  x.report.converged = await checkConverged(x, target, `apply (killed at ${k.ms.toFixed(0)} ms${k.killed ? '' : ', finished first'})`, r, v.keys());
}

/** A first copy, then `changes` changed versions, all synced with --backup-dir: the source's last version, if all succeeded. */
async function syncedHistory(x: Ctx, changes: number): Promise<Version | undefined> {
  const extra = [`--backup-dir=${x.hist}`];
  let v = initial(x);
  if (!(await setupSync(x, v, extra, 'first sync'))) return undefined;
  for (let i = 0; i < changes; i++) {
    v = next(x, v);
    if (!(await setupSync(x, v, extra, `sync ${i + 2}`))) return undefined;
  }
  return v;
}

async function opRestore(x: Ctx): Promise<void> {
  const v = await syncedHistory(x, 2);
  if (!v) return;
  const name = x.c.rng.pick([...v.keys()]);
  const at = x.c.rng.range(1, 2);
  const out = join(x.c.ws, 'restore-out.img');
  const args = ['restore', join(x.dest, name), out, '--backup-dir', x.hist, '--at', String(at)];
  const t = await q(x, 'restore (timing)', ['restore', join(x.dest, name), '--backup-dir', x.hist, '--list']);
  x.lastMs = t.ms * 1.5;
  const k = await q(x, 'killed restore', args, killInstant(x));
  const leftover = existsSync(out) ? statSync(out).size : undefined;
  // A restore the kill came too late for has written OUT: that is the run to check (a rerun would refuse an existing OUT).
  const r = k.killed || k.code !== 0 ? await q(x, 'restore rerun', args) : k;
  const label = `restore --at ${at} (killed at ${k.ms.toFixed(0)} ms${k.killed ? '' : ', finished first'})`;
  let ok = true;
  if (r.code !== 0) {
    x.report.note(
      'unconverged',
      `${label}: rerun exit ${r.code}: ${firstLine(r.stderr)}${leftover !== undefined && k.killed ? ` (the killed run left ${out}, ${leftover} bytes, under its real name)` : ''}`,
    );
    ok = false;
  } else {
    const until = x.model.runs[x.model.runs.length - at]!.spawnMs;
    const why = stateMismatch(readFileSync(out), x.model.stateAt(name, until)!);
    if (why) {
      x.report.note('lies', `${label}: rerun exit 0 but ${out}: ${why}`);
      ok = false;
    }
  }
  ok = (await checkPoints(x, v.keys())) && ok;
  x.report.converged = ok;
}

async function opPrune(x: Ctx): Promise<void> {
  const v = await syncedHistory(x, 3);
  if (!v) return;
  const keep = x.c.rng.range(1, 2);
  const t = await q(x, 'prune (timing)', ['prune', x.hist, '--keep', '10']);
  x.lastMs = t.ms;
  const k = await q(x, 'killed prune', ['prune', x.hist, '--keep', String(keep)], killInstant(x));
  const r = await q(x, 'prune rerun', ['prune', x.hist, '--keep', String(keep)]);
  let ok = true;
  const runsLeft = readdirSync(x.hist).filter((n) => n.endsWith('.qdelta') && !n.startsWith('.')).length;
  if (r.code !== 0 || runsLeft !== keep) {
    x.report.note('unconverged', `prune --keep ${keep} (killed at ${k.ms.toFixed(0)} ms): rerun exit ${r.code}, ${runsLeft} runs left: ${firstLine(r.stderr)}`);
    ok = false;
  }
  ok = (await checkPoints(x, v.keys())) && ok;
  x.report.converged = ok;
}

export const crashClass: FaultClass = {
  name: 'crash',
  summary: 'kill -9 during sync, --backup-dir, apply, restore, prune; rerun converges, verify passes, every point restores',
  defaultTrials: 10,
  timeoutMs: 60_000,
  async trial(c, report) {
    const op: Op = OPS[c.trial % OPS.length]!;
    const x: Ctx = {
      c,
      report,
      src: join(c.ws, 'src'),
      dest: join(c.ws, 'dest'),
      hist: join(c.ws, 'hist'),
      modes: new Map(),
      model: new TargetModel(),
      lastMs: 600,
    };
    mkdirSync(x.src);
    c.log(`op ${op}`);
    if (op === 'sync') await opSync(x, false);
    else if (op === 'backup') await opSync(x, true);
    else if (op === 'apply') await opApply(x);
    else if (op === 'restore') await opRestore(x);
    else await opPrune(x);
    // Nothing may appear beside the trees the runs were given (a temp file, a misplaced history) and qsync's state folder.
    const stray = readdirSync(c.ws).filter((n) => !/^(src|dest|hist|applied|batch\.qdelta|restore-out\.img|restored-.*|state)$/.test(n));
    if (stray.length) report.note('outside', `${op}: unexpected ${stray.map((n) => join(c.ws, n)).join(', ')} beside SRC/DEST/history`);
  },
};
