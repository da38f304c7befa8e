/**
 * Class "mutate": every kind of state and delta file (manifest, patch
 * journal, intent, lock, delta, history member) flipped, truncated,
 * extended, replaced by random bytes, or replaced by a FIFO, a directory, a
 * symlink to a victim file or /dev/zero; then sync/apply/verify/restore.
 * No stack trace, no hang, an rsync exit code, and never a silent lie (exit
 * 0 with a wrong target) nor a changed victim.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { MANIFEST_HEADER_LEN, MANIFEST_TRAILER_LEN, MANIFEST_DIGEST_LEN } from '../../src/core/manifest.js';
import { bootId, IntentWriter, intentPathFor } from '../../src/sync/intent.js';
import { encodeJournal, journalPathFor, manifestPathFor } from '../../src/sync/manifest-store.js';
import { stateFolderFor } from '../../src/sync/state-dir.js';
import { deadPid, qsync, snapshot, snapshotDiff, treeDiff, type FaultClass, type Rng, type RunResult } from './runner.js';
import { BLOCK, changeContent, randomContent, writeTree, type Version } from './tree-model.js';

const KINDS = ['manifest', 'journal', 'intent', 'lock', 'delta', 'history'] as const;
const MUTATIONS = ['flip', 'truncate', 'extend', 'replace', 'fifo', 'directory', 'symlink-victim', 'dev-zero'] as const;
type Mutation = (typeof MUTATIONS)[number];

export const MUTATION_KINDS = KINDS.length * MUTATIONS.length;

export const mutateClass: FaultClass = {
  name: 'mutate',
  summary: 'state and delta files flipped/truncated/extended/replaced/FIFO/dir/symlink/dev-zero: no trace, no hang, no lie',
  defaultTrials: 2 * MUTATION_KINDS,
  timeoutMs: 15_000,
  async trial(c, report) {
    const { rng, ws } = c;
    const kind = KINDS[c.trial % KINDS.length]!;
    // Every kind meets every mutation within 48 trials, and the first 12 already cover every kind and every mutation.
    const mutation = MUTATIONS[(c.trial + Math.floor(c.trial / KINDS.length)) % MUTATIONS.length]!;
    const src = join(ws, 'src');
    const dest = join(ws, 'dest');
    const hist = join(ws, 'hist');
    const victims = join(ws, 'victims');
    mkdirSync(victims);
    const victim = join(victims, 'secret');
    writeFileSync(victim, rng.bytes(4096), { mode: 0o600 });
    const victimsBefore = snapshot(victims);
    const modes = new Map<string, number>();
    const v0: Version = new Map([
      ['f0.img', randomContent(rng, rng.range(4, 12) * BLOCK + rng.int(BLOCK))],
      ['f1.img', randomContent(rng, rng.range(1, 3) * BLOCK + rng.int(BLOCK))],
    ]);
    const v1: Version = new Map([...v0].map(([k, b]) => [k, changeContent(rng, b)]));
    const runs: string[] = [];
    const q = async (label: string, args: string[]): Promise<RunResult> => {
      runs.push(`${label}: qsync ${args.join(' ')}`);
      const r = await qsync(args, { timeoutMs: c.timeoutMs });
      report.ending(r, `${kind}/${mutation}: ${label}`);
      return r;
    };
    const setup = async (args: string[]): Promise<boolean> => {
      runs.push(`setup: qsync ${args.join(' ')}`);
      return report.setup(await qsync(args, { timeoutMs: c.timeoutMs }), `${kind}/${mutation}: setup run`);
    };
    mkdirSync(src);
    writeTree(src, v0, modes);
    const manifest = manifestPathFor(dest, 'f0.img');

    // 1. The file to mutate, in the state a real run leaves it in.
    let path: string;
    const delta = join(ws, 'batch.qdelta');
    const applied = join(ws, 'applied');
    if (kind === 'delta') {
      mkdirSync(dest);
      writeTree(dest, v0, modes);
      writeTree(src, v1, modes);
      if (!(await setup(['-a', `--only-write-batch=${delta}`, `${src}/`, `${dest}/`]))) return;
      mkdirSync(applied);
      writeTree(applied, v0, modes);
      path = delta;
    } else if (kind === 'history') {
      if (!(await setup(['-a', `--backup-dir=${hist}`, `${src}/`, `${dest}/`]))) return;
      writeTree(src, v1, modes);
      if (!(await setup(['-a', `--backup-dir=${hist}`, `${src}/`, `${dest}/`]))) return;
      path = join(hist, rng.pick(readdirSync(hist).filter((n) => n.endsWith('.qdelta'))));
    } else {
      if (!(await setup(['-a', `${src}/`, `${dest}/`]))) return;
      const m = readFileSync(manifest);
      const blocks = (m.length - MANIFEST_HEADER_LEN - MANIFEST_TRAILER_LEN) / MANIFEST_DIGEST_LEN;
      const some = [...new Set(Array.from({ length: rng.range(1, 4) }, () => rng.int(blocks)))];
      if (kind === 'manifest') path = manifest;
      else if (kind === 'journal') {
        // A whole journal a crash left just before deleting it: re-applying it changes nothing.
        path = journalPathFor(manifest);
        const digests = Buffer.concat(some.map((i) => m.subarray(MANIFEST_HEADER_LEN + i * MANIFEST_DIGEST_LEN, MANIFEST_HEADER_LEN + (i + 1) * MANIFEST_DIGEST_LEN)));
        const trailerAt = m.length - MANIFEST_TRAILER_LEN;
        writeFileSync(path, encodeJournal(some, digests, m.subarray(0, MANIFEST_HEADER_LEN), m.subarray(trailerAt), trailerAt));
      } else if (kind === 'intent') {
        // A killed run's intent naming the current manifest: the next run rewrites those blocks.
        path = intentPathFor(manifest);
        const size = v0.get('f0.img')!.length;
        const w = await IntentWriter.create(path, m.subarray(m.length - 32), size, size);
        await w.add(some);
        await w.close();
      } else {
        // A lock left by a dead run (the pid of a process that has exited).
        path = join(stateFolderFor(dest), 'lock');
        const dead = deadPid();
        writeFileSync(path, `${dead} ${bootId()}\n`);
      }
    }

    // 2. The mutation.
    const original = readFileSync(path);
    const detail = mutate(path, mutation, original, victim, rng);
    const changedBytes = existsSync(path) && statSync(path).isFile() && !readFileSync(path).equals(original);
    const what = `${kind}/${mutation} (${detail})`;
    c.log(what);

    // 3. The command a user runs next, and what it may do.
    let lie: string | undefined;
    let r: RunResult;
    if (kind === 'delta') {
      const cmd = rng.pick(['verify', 'info', 'apply', 'read-batch'] as const);
      r =
        cmd === 'verify' || cmd === 'info'
          ? await q(cmd, [cmd, delta])
          : cmd === 'apply'
            ? await q(cmd, ['apply', delta, applied])
            : await q(cmd, ['-a', `--read-batch=${delta}`, `${applied}/`]);
      if (cmd === 'verify' || cmd === 'info') {
        if (r.code === 0 && changedBytes) lie = `${cmd} exit 0 on a delta whose bytes were changed`;
      } else if (r.code === 0) {
        const d = treeDiff(src, applied);
        if (d) lie = `${cmd} exit 0 but ${d}`;
      } else {
        writeTree(join(ws, 'base'), v0, modes);
        const d = treeDiff(join(ws, 'base'), applied);
        if (d) lie = `${cmd} refused (exit ${r.code}) yet changed the target: ${d}`;
      }
    } else if (kind === 'history') {
      const cmd = rng.pick(['restore', 'list', 'prune', 'sync'] as const);
      if (cmd === 'restore') {
        const at = rng.range(1, 2);
        const out = join(ws, 'restored.img');
        r = await q(cmd, ['restore', join(dest, 'f0.img'), out, '--backup-dir', hist, '--at', String(at)]);
        const want = at === 1 ? v0.get('f0.img')! : Buffer.alloc(0);
        if (r.code === 0 && !readFileSync(out).equals(want)) lie = `restore --at ${at} exit 0 but the restored file is not the file at that point`;
      } else if (cmd === 'list') r = await q(cmd, ['restore', join(dest, 'f0.img'), '--backup-dir', hist, '--list']);
      else if (cmd === 'prune') r = await q(cmd, ['prune', hist, '--keep', '1']);
      else {
        const v2: Version = new Map([...v1].map(([k, b]) => [k, changeContent(rng, b)]));
        writeTree(src, v2, modes);
        r = await q(cmd, ['-a', `--backup-dir=${hist}`, `${src}/`, `${dest}/`]);
        const d = r.code === 0 ? treeDiff(src, dest) : undefined;
        if (d) lie = `sync --backup-dir exit 0 but ${d}`;
      }
    } else {
      if (rng.chance(0.5)) writeTree(src, v1, modes);
      if (rng.chance(0.2)) {
        r = await q('verify', ['verify', join(dest, 'f0.img')]);
        // The target was never touched: verify may pass, but not on a manifest whose bytes changed.
        if (kind === 'manifest' && r.code === 0 && changedBytes) lie = 'verify exit 0 on a manifest whose bytes were changed';
      } else {
        r = await q('sync', ['-a', `${src}/`, `${dest}/`]);
        const d = r.code === 0 ? treeDiff(src, dest) : undefined;
        if (d) lie = `sync exit 0 but ${d}`;
      }
    }
    if (lie) report.note('lies', `${what}: ${lie}`);
    const v = snapshotDiff(victimsBefore, snapshot(victims), victims);
    if (v) report.note('outside', `${what}: victim changed: ${v}`);
    if (r.code === 0 && !lie) report.converged = true;
    else if (!r.hung && r.code !== 0) report.refused = true;
    if (report.bad.length) c.log(runs.join('\n'));
  },
};

/** Apply one mutation to `path`; returns a short description (for the reproduction line). */
function mutate(path: string, m: Mutation, orig: Buffer, victim: string, rng: Rng): string {
  const replaceWith = (make: () => void) => {
    rmSync(path, { recursive: true, force: true });
    make();
  };
  switch (m) {
    case 'flip': {
      const b = Buffer.from(orig);
      const n = rng.range(1, 4);
      const at: number[] = [];
      for (let i = 0; i < n && b.length; i++) {
        const off = rng.chance(0.5) ? rng.int(Math.min(b.length, 200)) : rng.int(b.length);
        b[off]! ^= 1 << rng.int(8);
        at.push(off);
      }
      writeFileSync(path, b);
      return `bits flipped at ${at.join(',')} of ${orig.length}`;
    }
    case 'truncate': {
      const len = rng.int(Math.max(1, orig.length));
      writeFileSync(path, orig.subarray(0, len));
      return `truncated to ${len} of ${orig.length}`;
    }
    case 'extend': {
      const add = rng.pick([1, 8, 56, 4096, rng.range(1, 100_000)]);
      const fd = openSync(path, 'a');
      writeSync(fd, rng.chance(0.3) ? Buffer.alloc(add) : rng.bytes(add));
      closeSync(fd);
      return `${add} bytes appended to ${orig.length}`;
    }
    case 'replace': {
      const len = rng.chance(0.5) ? orig.length : rng.range(0, 2 * orig.length + 64);
      writeFileSync(path, rng.bytes(len));
      return `replaced by ${len} random bytes`;
    }
    case 'fifo':
      replaceWith(() => execFileSync('mkfifo', [path]));
      return 'a FIFO';
    case 'directory':
      replaceWith(() => {
        mkdirSync(path);
        writeFileSync(join(path, 'x'), 'x');
      });
      return 'a directory';
    case 'symlink-victim':
      replaceWith(() => symlinkSync(victim, path));
      return `a symlink to ${victim}`;
    case 'dev-zero':
      replaceWith(() => symlinkSync('/dev/zero', path));
      return 'a symlink to /dev/zero';
  }
}
