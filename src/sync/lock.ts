/**
 * One qsync at a time per destination: the lock file `lock` in the destination's state folder
 * (0600) names its owner by pid, the pid's start time (field 22 of
 * /proc/PID/stat) and the boot id, so that a lock left by a dead run, or
 * naming a pid the kernel has since given to another process, is taken over
 * instead of needing hand repair (docs/FORMATS.md "Lock").
 *
 * Taking the lock is link(2) of a complete record file of ours to the name:
 * it fails if anything is there, so it never truncates or follows anything.
 * Taking over a stale lock must not race with another run doing the same:
 * the right to replace the record of a dead owner is itself a name,
 * `lock.succ-<hash of that record>`, taken the same way (so by exactly one
 * run; a dead claimer's claim is taken over recursively). Holding it, the
 * run checks that the lock still holds the very record it judged stale and
 * renames its own record over it. Only successors replace a record, and
 * there is one successor per record, so two runs never both hold the lock.
 */
import { rmSync } from 'node:fs';
import { link, rename, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { errnoOf, isQsyncError, QsyncError } from '../core/errors.js';
import { digestOf } from '../hash/blake3.js';
import { encodeName, fsPath, removeTreeAt, type Dir } from '../io/safe-fs.js';
import { bootId } from './intent.js';
import { procStat } from '../io/proc-stat.js';
import { createStateTemp, doneWithTemp, openStateParent, readStateFile, stateFolderFor, unlinkState, writeStateFile } from './state-dir.js';

/** How long to wait for a takeover another run is in the middle of (a few syscalls) before giving up. */
const TAKEOVER_WAIT_MS = 5000;
/** No qsync lock record is longer than this; only this much is read. */
const RECORD_MAX = 256;

/** The start time of process `pid` (/proc/PID/stat field 22); undefined when it does not exist. */
export const processStartTime = (pid: number): string | undefined => procStat(pid)?.startTime;

/** This process's lock record: `PID START BOOTID\n`. */
export const lockRecord = (): string => `${process.pid} ${processStartTime(process.pid) ?? '?'} ${bootId()}\n`;

/** The pid of a record's owner when that process still runs; undefined for a dead owner or a record that names none. */
export function liveOwner(record: string): number | undefined {
  const f = record.trim().split(' ');
  const pid = Number(f[0]);
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  // A record without a start time (an older qsync's `PID BOOTID`, or anything else) cannot tell
  // its owner from a process that was given the same pid later: it is stale.
  return f.length === 3 && f[2] === bootId() && processStartTime(pid) === f[1] ? pid : undefined;
}

export interface DestLock {
  release(): Promise<void>;
}

/** Locks this process holds (paths through their folder's descriptor): a signal that ends it drops them. */
const held = new Set<string>();

/** For a signal handler about to exit: remove every lock file this process holds. */
export function releaseHeldLocksSync(): void {
  for (const p of held) rmSync(p, { force: true });
  held.clear();
}

const readRecord = async (dir: Dir, name: string): Promise<string | undefined> => (await readStateFile(dir, name, RECORD_MAX))?.data.toString('latin1');

/**
 * Try to make `name` in `dir` hold `record`. True: it does. A number: a live
 * process holds it (its pid). Undefined: not now (it changed under us, or
 * another run is taking it over): try again.
 */
async function take(dir: Dir, name: string, record: string, depth: number): Promise<true | number | undefined> {
  const t = await createStateTemp(dir, 'lock');
  let placed = false;
  try {
    await t.fh.write(record);
    await t.fh.close();
    try {
      await link(dir.at(t.name), dir.at(name));
      return true;
    } catch (e) {
      if (errnoOf(e) !== 'EEXIST') throw e;
    }
    const cur = await readRecord(dir, name);
    if (cur === undefined) return undefined; // released meanwhile
    const pid = liveOwner(cur);
    if (pid !== undefined) return pid;
    if (depth >= 8) return undefined;
    // Stale: only the one successor of this very record may replace it.
    const claim = `lock.succ-${digestOf(Buffer.from(cur, 'latin1')).toString('hex').slice(0, 24)}`;
    if ((await take(dir, claim, record, depth + 1)) !== true) return undefined;
    try {
      if ((await readRecord(dir, name)) !== cur) return undefined;
      await rename(dir.at(t.name), dir.at(name));
      placed = true;
      return true;
    } finally {
      await unlinkState(dir, claim);
    }
  } finally {
    await t.fh.close().catch(() => {});
    if (!placed) await dir.unlink(t.name).catch(() => {});
    doneWithTemp(t.name);
  }
}

export async function lockDestination(destRoot: string): Promise<DestLock> {
  const path = join(stateFolderFor(destRoot), 'lock');
  const sp = await openStateParent(path, true).catch((e) => {
    throw lockFailed(path, e);
  });
  const lock = await lockIn(sp.dir, path, (pid) => `another qsync (pid ${pid}) is syncing into ${destRoot}; wait for it to finish`, () => sp.release());
  // Which destination the state folder serves, for people looking in it: written when it changes.
  try {
    const want = Buffer.concat([encodeName(resolve(destRoot)), Buffer.from('\n')]);
    const cur = await readStateFile(sp.dir, 'dest', want.length + 1);
    if (!cur?.data.equals(want)) await writeStateFile(sp.dir, 'dest', want);
    await checkDestIdentity(sp.dir, destRoot);
  } catch (e) {
    await lock.release();
    throw lockFailed(path, e);
  }
  return lock;
}

/**
 * The state folder serves one folder, not one path: `dest-id` records the
 * destination root's device, inode and birth time (0 where the file system
 * keeps none). When another folder stands at the path since (another backup
 * disk at the same mount point, a folder made anew), what the folder holds
 * describes other files, which can have the same device and inode numbers:
 * an interrupted run's intent would vouch for blocks of a file it never saw.
 * Its manifests and image state are dropped (the run compares).
 */
async function checkDestIdentity(dir: Dir, destRoot: string): Promise<void> {
  let st;
  try {
    st = await stat(fsPath(destRoot), { bigint: true });
  } catch (e) {
    if (errnoOf(e) === 'ENOENT') return;
    throw e;
  }
  const want = Buffer.from(`${st.dev} ${st.ino} ${st.birthtimeNs}\n`);
  const cur = await readStateFile(dir, 'dest-id', 128);
  if (cur?.data.equals(want)) return;
  // A folder from before `dest-id` was written keeps its state: its manifests still name their targets.
  if (cur) for (const name of ['manifests', 'image']) await removeTreeAt(dir, name);
  await writeStateFile(dir, 'dest-id', want);
}

// A system error here (read-only, full, no permission) ends the run before anything is written.
const lockFailed = (path: string, e: unknown): unknown =>
  isQsyncError(e) ? e : new QsyncError('IO', `cannot take the lock ${path}: ${(e as Error).message}`, { file: path, hint: 'check that the destination is writable' }, { cause: e });

/**
 * Take the lock file `lock` in the folder `dir` holds (`path`, for messages,
 * names it; `busy` the message when a live run holds it).
 * `done` runs once the lock is released, or when it could not be taken.
 */
export async function lockIn(dir: Dir, path: string, busy: (pid: number) => string, done: () => Promise<void>): Promise<DestLock> {
  const record = lockRecord();
  const deadline = Date.now() + TAKEOVER_WAIT_MS;
  try {
    for (;;) {
      const r = await take(dir, 'lock', record, 0);
      if (r === true) break;
      if (r !== undefined) {
        throw new QsyncError('LOCKED', busy(r), {
          file: path,
          hint: `if no qsync is running, remove ${path}`,
        });
      }
      if (Date.now() > deadline) throw new QsyncError('LOCKED', `cannot take the lock ${path}: other runs keep taking it over`, { file: path, hint: 'try again' });
      await new Promise((res) => setTimeout(res, 10 + Math.random() * 40));
    }
  } catch (e) {
    await done();
    throw lockFailed(path, e);
  }
  const at = dir.at('lock');
  held.add(at);
  return {
    release: async () => {
      held.delete(at);
      try {
        // Ours unless a hand removed it: never remove a record of another run.
        if ((await readRecord(dir, 'lock').catch(() => undefined)) === record) await unlinkState(dir, 'lock');
      } finally {
        await done();
      }
    },
  };
}
