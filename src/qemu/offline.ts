/**
 * `--image FILE`: an image no VM has open, served by a qemu-storage-daemon
 * that qsync starts (and always stops) so that the same QMP path as for a
 * running VM applies: persistent bitmaps in a qcow2 are used and rotated.
 */
import { execFile, spawn } from 'node:child_process';
import { stat, mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { QsyncError } from '../core/errors.js';
import { procStat } from '../io/proc-stat.js';
import { socketAnswers } from '../io/socket-probe.js';
import { isLockedByOther } from '../sync/qemu-locks.js';
import { imageTargetName } from './block.js';

const run = promisify(execFile);

export interface ServedImage {
  qmp: string;
  /** Node name: `i` and the target name of the file. */
  node: string;
  stop(): Promise<void>;
}

export async function serveImage(image: string, tempDir: string): Promise<ServedImage> {
  const file = resolve(image);
  const st = await stat(file).catch((e: unknown) => {
    throw new QsyncError('SOURCE', `cannot open ${image}: ${(e as Error).message}`, { file: image }, { cause: e });
  });
  if ((await isLockedByOther(st.dev, st.ino, 0)) && (await stopLeftoverDaemon(file))) {
    // Its locks go as it exits: wait for that, a bounded while.
    for (let i = 0; i < 100 && (await isLockedByOther(st.dev, st.ino, 0)); i++) await new Promise((r) => setTimeout(r, 100));
  }
  if (await isLockedByOther(st.dev, st.ino, 0)) {
    throw new QsyncError('LOCKED', `${image} is open in a running QEMU`, {
      file: image, hint: 'back it up through that QEMU: qsync --qmp /path/to/qmp.sock DEST',
    });
  }
  const { stdout } = await run('qemu-img', ['info', '--output=json', file]);
  const format = String((JSON.parse(stdout) as { format: string }).format);
  const node = 'i' + imageTargetName(file);
  const daemon = await startDaemon(tempDir, [
    '--blockdev', `driver=file,node-name=${node}-file,filename=${file}`,
    '--blockdev', `driver=${format},node-name=${node},file=${node}-file`,
  ]);
  if (typeof daemon === 'string') throw new QsyncError('SOURCE', `qemu-storage-daemon could not open ${image}: ${daemon}`, { file: image, hint: toolsMissing(daemon) ? qemuToolsHint('this host') : undefined });
  return { qmp: daemon.qmp, node, stop: daemon.stop };
}

/** What to install where a QEMU tool qsync runs is missing (`where`: "this host", "the host that holds DEST"). */
export const qemuToolsHint = (where: string): string => `install QEMU's tools on ${where} (Debian: qemu-utils and qemu-system-common)`;

/** Whether why a daemon did not start (startDaemon's answer) is that the program is missing (setpriv could not run it). */
export const toolsMissing = (why: string): boolean => /failed to execute|No such file/i.test(why);

export interface StorageDaemon {
  /** Its QMP socket, in a folder of its own (`dir`, removed by stop). */
  qmp: string;
  dir: string;
  /** SIGTERM (it closes its images cleanly: caches flushed, bitmaps written back), SIGKILL after 10 s. */
  stop(): Promise<void>;
}

/**
 * Start a qemu-storage-daemon with `args` (its block devices, exports) and a
 * QMP monitor, and wait until the monitor answers. `fds`: descriptors handed
 * to it as its fds 3, 4 ... (`filename=/dev/fd/3`: the file qsync opened, not
 * a path that could be swapped). Returns the daemon, or why it did not start.
 */
export async function startDaemon(tempDir: string, args: string[], fds: number[] = [], dir?: string): Promise<StorageDaemon | string> {
  dir ??= await mkdtemp(join(tempDir, 'qsync-qsd-'));
  const qmp = join(dir, 'qmp.sock');
  // setpriv (util-linux) gives the daemon a parent-death signal: if qsync is killed (kill -9), the daemon
  // gets SIGTERM, closes the image cleanly and exits, instead of holding it open and blocking every later run.
  const child = spawn('setpriv', ['--pdeathsig', 'TERM', '--', 'qemu-storage-daemon',
    ...args,
    '--chardev', `socket,id=qmp0,path=${qmp},server=on,wait=off`,
    '--monitor', 'chardev=qmp0',
  ], { stdio: ['ignore', 'ignore', 'pipe', ...fds] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((res) => child.once('exit', () => res()));
  const folder = dir;
  const stop = async (): Promise<void> => {
    // SIGTERM makes it close the image cleanly, which writes persistent bitmaps back.
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    const t = setTimeout(() => child.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(t);
    await rm(folder, { recursive: true, force: true });
  };
  for (let i = 0; i < 200; i++) {
    if (child.exitCode !== null) break;
    if (await socketAnswers(qmp)) return { qmp, dir, stop };
    await new Promise((r) => setTimeout(r, 50));
  }
  await stop();
  return stderr.trim() || 'no QMP socket';
}

/**
 * A qemu-storage-daemon that an earlier qsync started for `file` and that
 * outlived it (qsync killed before the daemon's parent-death signal was
 * armed, a window of a few milliseconds at its start): stopped (SIGTERM,
 * then SIGKILL after 10 s), so that the image is not refused for ever as
 * open in QEMU. Recognised by its command line (this very image, a QMP
 * socket in a qsync-qsd- folder) and by having lost its parent qsync (its
 * parent is no longer a node process). Returns whether one was stopped.
 */
async function stopLeftoverDaemon(file: string): Promise<boolean> {
  let stopped = false;
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    const args = (await readFile(`/proc/${pid}/cmdline`, 'latin1').catch(() => '')).split('\0');
    if (!args[0]?.endsWith('qemu-storage-daemon') || !args.some((a) => a.endsWith(`,filename=${file}`)) || !args.some((a) => a.includes('/qsync-qsd-'))) continue;
    const ppid = procStat(Number(pid))?.ppid;
    const parent = ppid === undefined ? '' : (await readFile(`/proc/${ppid}/comm`, 'latin1').catch(() => '')).trim();
    if (parent === 'node') continue; // its qsync still runs
    try {
      process.kill(Number(pid), 'SIGTERM');
    } catch {
      continue;
    }
    // Gone, or a zombie (it holds no file any more), within 10 s.
    const running = (): boolean => {
      const state = procStat(Number(pid))?.state;
      return state !== undefined && state !== 'Z';
    };
    for (let i = 0; i < 100 && running(); i++) await new Promise((r) => setTimeout(r, 100));
    try {
      process.kill(Number(pid), 'SIGKILL');
    } catch {
      /* gone */
    }
    stopped = true;
  }
  return stopped;
}
