/**
 * Class "race": root runs `qsync -a SRC/ DEST/` (plain, --delete,
 * --write-batch, --backup-dir) over folders that nobody (65534) owns inside
 * SRC and DEST, while nobody swaps their entries for symlinks to root's
 * 0600 victim files and folders in a tight loop. The victims must not
 * change (content, mode, owner, mtime), no secret may land in a DEST file
 * nobody can read, and a clean run afterwards must converge.
 */
import { spawn } from 'node:child_process';
import { chmodSync, chownSync, closeSync, constants, fstatSync, lstatSync, openSync, writeSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { asNobody, firstLine, qsync, sleep, snapshot, snapshotDiff, treeDiff, type FaultClass } from './runner.js';
import { BLOCK, randomContent } from './tree-model.js';

const NOBODY = 65534;
const ATTACKER = join(import.meta.dirname, 'attacker.js');

function chownTree(p: string): void {
  chownSync(p, NOBODY, NOBODY);
  if (lstatSync(p).isDirectory()) for (const n of readdirSync(p)) chownTree(join(p, n));
}

/** Could nobody read this file by its own bits (owner nobody, group nogroup, or others)? */
function nobodyCanRead(p: string): boolean {
  const st = lstatSync(p);
  return (st.uid === NOBODY && (st.mode & 0o400) !== 0) || (st.gid === NOBODY && (st.mode & 0o040) !== 0) || (st.mode & 0o004) !== 0;
}

/** DEST files nobody can read that contain one of the secrets. */
function leaks(root: string, secrets: Buffer[]): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.isFile() && nobodyCanRead(p)) {
        const b = readFileSync(p);
        if (secrets.some((s) => b.includes(s.subarray(0, 64)))) out.push(p);
      }
    }
  };
  walk(root);
  return out;
}

function writeNoFollow(p: string, data: Buffer): void {
  let fd: number;
  try {
    fd = openSync(p, constants.O_WRONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch {
    return; // swapped for a symlink right now: skip it this time
  }
  try {
    if (fstatSync(fd).isFile()) writeSync(fd, data, 0, data.length, 0);
  } finally {
    closeSync(fd);
  }
}

/** Put back what the attacker left aside in `dir` (as root, after it is gone). */
function undoAttack(dir: string): void {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const m = /^\.(.+)\.orig$/.exec(e.name);
    if (m) {
      rmSync(join(dir, m[1]!), { recursive: true, force: true });
      renameSync(join(dir, e.name), join(dir, m[1]!));
    } else if (e.isDirectory()) undoAttack(join(dir, e.name));
  }
}

export const raceClass: FaultClass = {
  name: 'race',
  summary: 'nobody swaps entries for symlinks to root 0600 victims during root runs: victims unchanged, no secret readable by nobody',
  defaultTrials: 2,
  timeoutMs: 60_000,
  async trial(c, report) {
    const { rng, ws } = c;
    chmodSync(ws, 0o755);
    const src = join(ws, 'src');
    const dest = join(ws, 'dest');
    const victims = join(ws, 'victims');
    mkdirSync(join(victims, 'vdir'), { recursive: true });
    const secrets = [rng.bytes(8192), rng.bytes(8192)];
    writeFileSync(join(victims, 'secret'), secrets[0]!, { mode: 0o600 });
    writeFileSync(join(victims, 'vdir', 'secret2'), secrets[1]!, { mode: 0o600 });
    chmodSync(join(victims, 'vdir'), 0o700);
    const before = snapshot(victims);
    // SRC/u and its content belong to nobody, as a VM owner's folder would.
    const u = join(src, 'u');
    mkdirSync(join(u, 'd'), { recursive: true });
    for (let i = 0; i < 12; i++) writeFileSync(join(i % 3 ? u : join(u, 'd'), `f${i}.img`), randomContent(rng, rng.range(1, 6) * BLOCK), { mode: rng.pick([0o600, 0o640, 0o644]) });
    chownTree(u);
    writeFileSync(join(src, 'root.img'), randomContent(rng, 4 * BLOCK), { mode: 0o600 });
    const first = await qsync(['-a', `${src}/`, `${dest}/`], { timeoutMs: c.timeoutMs });
    if (!report.setup(first, 'first sync (no attacker)')) return;
    const variants = [[], ['--delete'], [`--write-batch=${join(ws, 'batch.qdelta')}`], [`--backup-dir=${join(ws, 'hist')}`]];
    const [cmd, args] = asNobody(process.execPath, [ATTACKER, String(rng.int(1 << 30)), join(victims, 'secret'), join(victims, 'vdir'), u, join(u, 'd'), join(dest, 'u'), join(dest, 'u', 'd')]);
    const attacker = spawn(cmd, args, { stdio: 'ignore' });
    try {
      await sleep(300);
      for (const extra of variants) {
        // Some change in the tree each time, so every run writes.
        // (O_NOFOLLOW: the attacker may have made it a symlink to a victim; the campaign must not write through it.)
        for (const n of readdirSync(u)) if (n.endsWith('.img')) writeNoFollow(join(u, n), randomContent(rng, rng.range(1, 6) * BLOCK));
        const r = await qsync(['-a', ...extra, `${src}/`, `${dest}/`], { timeoutMs: c.timeoutMs });
        report.ending(r, `qsync -a ${extra.join(' ')} under attack`);
      }
    } finally {
      attacker.kill('SIGKILL');
      await new Promise((r) => (attacker.exitCode !== null || attacker.signalCode !== null ? r(undefined) : attacker.once('exit', r)));
    }
    const changed = snapshotDiff(before, snapshot(victims), victims);
    if (changed) report.note('outside', `victim changed: ${changed}`);
    for (const p of leaks(dest, secrets)) report.note('readable', `${p} holds a root-only secret and nobody can read it`);
    undoAttack(u);
    undoAttack(join(dest, 'u'));
    const final = await qsync(['-a', '--delete', `${src}/`, `${dest}/`], { timeoutMs: c.timeoutMs });
    report.ending(final, 'clean run after the attack');
    const d = final.code === 0 ? treeDiff(src, dest) : `exit ${final.code}: ${firstLine(final.stderr)}`;
    if (d) report.note('unconverged', `clean run after the attack: ${d}`);
    else if (!report.bad.length) report.converged = true;
  },
};
