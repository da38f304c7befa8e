/**
 * Class "concurrent": four runs started together on one destination, with
 * no lock, a stale lock (a dead pid), a lock naming a live process that is
 * not qsync, or a garbage lock. At most one may write at a time (the others
 * exit 3), none may block forever, and the destination must converge.
 */
import { spawn } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, readlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { bootId } from '../../src/sync/intent.js';
import { stateFolderFor } from '../../src/sync/state-dir.js';
import { deadPid, firstLine, qsync, sleep, treeDiff, type FaultClass } from './runner.js';
import { BLOCK, changeContent, MiB, randomContent, writeTree, type Version } from './tree-model.js';

const LOCKS = ['none', 'dead-pid', 'live-unrelated-pid', 'garbage'] as const;
const RUNS = 4;

/** The lock file of `dest` (its state folder made as the first sync left it). */
const lockOf = (dest: string): string => join(stateFolderFor(dest), 'lock');

/** Pids among `pids` that have a file under `dest` or its state folder open for writing (from /proc/PID/fd and fdinfo flags). */
function writers(pids: number[], dest: string): string[] {
  const state = stateFolderFor(dest);
  const out: string[] = [];
  for (const pid of pids) {
    try {
      for (const fd of readdirSync(`/proc/${pid}/fd`)) {
        let target: string;
        try {
          target = readlinkSync(`/proc/${pid}/fd/${fd}`);
        } catch {
          continue;
        }
        // The lock and a run's attempts to take it (its own record under a temp name, a takeover claim) are
        // how runs meet: writing them while another run holds the lock is the protocol, not an overlap.
        if (!target.startsWith(`${dest}/`) && !target.startsWith(`${state}/`)) continue;
        if (target.startsWith(`${state}/`) && /^(?:lock|\.lock\.[0-9a-f]+\.tmp|lock\.succ-)/.test(target.slice(state.length + 1))) continue;
        const flags = /flags:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'latin1'))?.[1];
        if (flags !== undefined && (parseInt(flags, 8) & 3) !== 0) {
          out.push(`${pid} (${target})`);
          break;
        }
      }
    } catch {
      /* gone */
    }
  }
  return out;
}

export const concurrentClass: FaultClass = {
  name: 'concurrent',
  summary: '4 runs at once with no/stale/live-unrelated/garbage lock: one writer at a time, others exit 3, converges, no block',
  defaultTrials: 4,
  timeoutMs: 60_000,
  async trial(c, report) {
    const { rng, ws } = c;
    const lock = LOCKS[c.trial % LOCKS.length]!;
    const src = join(ws, 'src');
    const dest = join(ws, 'dest');
    const modes = new Map<string, number>();
    let v: Version = new Map([
      ['a.img', randomContent(rng, rng.range(1 * MiB, 4 * MiB))],
      ['b.img', randomContent(rng, rng.range(1, 8) * BLOCK)],
    ]);
    mkdirSync(src);
    writeTree(src, v, modes);
    const first = await qsync(['-a', `${src}/`, `${dest}/`], { timeoutMs: c.timeoutMs });
    if (!report.setup(first, 'first sync')) return;
    v = new Map([...v].map(([k, b]) => [k, changeContent(rng, b)]));
    writeTree(src, v, modes);
    let sleeper: ReturnType<typeof spawn> | undefined;
    if (lock === 'dead-pid') {
      const dead = deadPid();
      writeFileSync(lockOf(dest), `${dead} ${bootId()}\n`);
    } else if (lock === 'live-unrelated-pid') {
      sleeper = spawn('sleep', ['600'], { stdio: 'ignore' });
      writeFileSync(lockOf(dest), `${sleeper.pid} ${bootId()}\n`);
    } else if (lock === 'garbage') writeFileSync(lockOf(dest), rng.bytes(rng.range(0, 64)));
    c.log(`lock: ${lock}`);
    try {
      const pids: number[] = [];
      const runs = Array.from({ length: RUNS }, () => qsync(['-a', `${src}/`, `${dest}/`], { timeoutMs: c.timeoutMs, onSpawn: (p) => pids.push(p) }));
      let done = false;
      const all = Promise.all(runs).finally(() => (done = true));
      let overlap: string[] | undefined;
      while (!done) {
        // node's pid is the group leader (qsync does not fork for file syncs)
        // The pids are read one after the other: a first writer seen again after the second one held its
        // files open across the second one's sample (one lock hold), so the two really overlapped.
        const w = writers(pids, dest);
        if (w.length > 1 && !overlap) {
          const firstPid = Number(w[0]!.split(' ')[0]);
          if (writers([firstPid], dest).length) overlap = w;
        }
        await sleep(5);
      }
      const results = await all;
      results.forEach((r, i) => report.ending(r, `run ${i + 1} of ${RUNS} (lock ${lock})`, new Set([0, 3])));
      if (overlap) report.note('overlaps', `lock ${lock}: runs ${overlap.join(', ')} had files in DEST open for writing at the same time`);
      let ok = results.some((r) => r.code === 0);
      if (!ok) {
        // None synced: one more run, alone, must (a stale lock must not need hand repair).
        const again = await qsync(['-a', `${src}/`, `${dest}/`], { timeoutMs: c.timeoutMs });
        report.ending(again, 'run alone afterwards');
        ok = again.code === 0;
        if (!ok) report.note('unconverged', `lock ${lock}: all ${RUNS} runs exit ${results.map((r) => r.code).join('/')}, a run alone afterwards exit ${again.code}: ${firstLine(again.stderr)}`);
      }
      if (ok) {
        const d = treeDiff(src, dest);
        if (d) report.note('lies', `lock ${lock}: a run exit 0 but ${d}`);
        else report.converged = true;
      }
    } finally {
      sleeper?.kill('SIGKILL');
    }
  },
};
