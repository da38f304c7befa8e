/**
 * One qsync at a time per destination: an exclusive lock file in the state
 * folder, holding the owner's pid and boot id so that a lock left by a dead
 * run is taken over instead of needing hand repair.
 */
import { rmSync } from 'node:fs';
import { mkdir, open, readFile, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { errnoOf, QsyncError } from '../core/errors.js';
import { bootId } from './intent.js';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return errnoOf(e) === 'EPERM';
  }
}

export interface DestLock {
  release(): Promise<void>;
}

/** Locks this process holds: a signal that ends it drops them (releaseHeldLocksSync). */
const held = new Set<string>();

/** For a signal handler about to exit: remove every lock file this process holds. */
export function releaseHeldLocksSync(): void {
  for (const p of held) rmSync(p, { force: true });
  held.clear();
}

export async function lockDestination(stateDir: string): Promise<DestLock> {
  await mkdir(stateDir, { recursive: true });
  const path = join(stateDir, 'lock');
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fh = await open(path, 'wx');
      await fh.write(`${process.pid} ${bootId()}\n`);
      await fh.close();
      held.add(path);
      return {
        release: async () => {
          held.delete(path);
          await rm(path, { force: true });
        },
      };
    } catch (e) {
      if (errnoOf(e) !== 'EEXIST') throw e;
      const [pidText, boot] = (await readFile(path, 'latin1').catch(() => '')).trim().split(' ');
      const pid = Number(pidText);
      if (boot === bootId() && Number.isInteger(pid) && pid > 0 && alive(pid)) {
        throw new QsyncError('LOCKED', `another qsync (pid ${pid}) is syncing into ${dirname(stateDir)}; wait for it to finish`, {
          file: path,
          hint: `if no qsync is running, remove ${path}`,
        });
      }
      await rm(path, { force: true }); // stale: its owner is gone
    }
  }
  throw new QsyncError('LOCKED', `cannot take the lock ${path}`, { file: path });
}
