/**
 * One qsync at a time per destination: an exclusive lock file in the state
 * folder, holding the owner's pid and boot id so that a lock left by a dead
 * run is taken over instead of needing hand repair.
 */
import { mkdir, open, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
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

export async function lockDestination(stateDir: string): Promise<DestLock> {
  await mkdir(stateDir, { recursive: true });
  const path = join(stateDir, 'lock');
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fh = await open(path, 'wx');
      await fh.write(`${process.pid} ${bootId()}\n`);
      await fh.close();
      return { release: () => rm(path, { force: true }) };
    } catch (e) {
      if (errnoOf(e) !== 'EEXIST') throw e;
      const [pidText, boot] = (await readFile(path, 'latin1').catch(() => '')).trim().split(' ');
      const pid = Number(pidText);
      if (boot === bootId() && Number.isInteger(pid) && pid > 0 && alive(pid)) {
        throw new QsyncError('LOCKED', `another qsync (pid ${pid}) is syncing into ${stateDir.replace(/\/\.qsync$/, '')}; wait for it to finish`, {
          file: path,
          hint: `if no qsync is running, remove ${path}`,
        });
      }
      await rm(path, { force: true }); // stale: its owner is gone
    }
  }
  throw new QsyncError('LOCKED', `cannot take the lock ${path}`, { file: path });
}
