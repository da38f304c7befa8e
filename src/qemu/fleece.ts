/**
 * A point-in-time view of live disks (image fleecing, docs/ARCHITECTURE.md "Two views of an image"): a qcow2
 * overlay backed by the disk, filled by a `sync=none` backup job with the old
 * contents of whatever the guest overwrites, exported read-only over NBD.
 * One transaction starts the next dirty bitmap of every disk, freezes the
 * current ones and starts the jobs, so the frozen bitmaps and the views
 * describe the same instant.
 */
import { spawn } from 'node:child_process';
import { constants } from 'node:fs';
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { QsyncError } from '../core/errors.js';
import { openRegular } from '../io/safe-fs.js';
import { isQmpError } from './errors.js';
import type { QmpAction, QmpClient } from './qmp.js';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export interface FleeceDisk {
  node: string;
  size: number;
  /** Bitmap created in the transaction; it records from the fleece instant on. */
  newBitmap: string;
  persistent: boolean;
  /** Bitmap to disable in the transaction and export (incremental runs). */
  freeze?: string;
}

export interface FleeceOptions {
  /** Everything qsync creates for one DEST starts with this (`qsync-<tag>-`). */
  prefix: string;
  disks: FleeceDisk[];
  /** Folder for the overlays and the NBD socket; QEMU must be able to reach it and write there. */
  tempDir: string;
  /** Who QEMU runs as: the overlays are created 0600 for this user (default: this process's). */
  owner?: { uid: number; gid: number };
}

type DiskStep = 'file' | 'node' | 'job' | 'exp';

const names = (prefix: string, i: number) => ({
  node: `${prefix}fleece${i}`,
  job: `${prefix}job${i}`,
  exp: `${prefix}exp${i}`,
  exportName: `${prefix}snap${i}`,
});

/**
 * Point-in-time views of several disks of one QEMU, taken at one instant: one
 * transaction rotates every bitmap and starts every backup job, so the disks
 * of a VM are backed up as of the same moment (as a snapshot would).
 */
export class Fleece {
  /** NBD URI of each disk's view, in the order of `opts.disks`. */
  readonly uris: string[];
  /** Milliseconds from the first QMP command to the exports being ready. */
  setupMs = 0;
  /** What is set up, so that stop() undoes exactly that. */
  #steps: Record<DiskStep, boolean>[];
  #server = false;
  #files: string[];
  #sock: string;

  private constructor(
    private readonly qmp: QmpClient,
    private readonly opts: FleeceOptions,
  ) {
    const { prefix, tempDir, disks } = opts;
    this.#steps = disks.map(() => ({ file: false, node: false, job: false, exp: false }));
    this.#files = disks.map((_, i) => join(tempDir, `${prefix}fleece${i}-${process.pid}.qcow2`));
    this.#sock = join(tempDir, `${prefix}nbd-${process.pid}.sock`);
    this.uris = disks.map((_, i) => `nbd+unix:///${names(prefix, i).exportName}?socket=${this.#sock}`);
  }

  /** Set everything up; on failure whatever was set up is torn down again before the error is thrown. */
  static async start(qmp: QmpClient, opts: FleeceOptions): Promise<Fleece> {
    const f = new Fleece(qmp, opts);
    const t0 = performance.now();
    try {
      await f.#start();
    } catch (e) {
      await f.stop().catch(() => {});
      throw e;
    }
    f.setupMs = performance.now() - t0;
    return f;
  }

  async #start(): Promise<void> {
    const { qmp, opts } = this;
    for (const [i, d] of opts.disks.entries()) {
      await createOverlay(this.#files[i]!, d.size, opts.owner);
      this.#steps[i]!.file = true;
      await qmp.execute('blockdev-add', {
        driver: 'qcow2', 'node-name': names(opts.prefix, i).node, file: { driver: 'file', filename: this.#files[i] }, backing: d.node,
      });
      this.#steps[i]!.node = true;
    }
    // Before the transaction: a server someone else runs is refused while no bitmap has moved.
    try {
      await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: this.#sock } } });
    } catch (e) {
      if (isQmpError(e) && /already running/i.test(e.desc)) {
        throw new QsyncError('LOCKED', 'QEMU already runs an NBD server (another backup tool, or another qsync on this VM)', {
          hint: 'run one image-mode backup per QEMU at a time',
        }, { cause: e });
      }
      throw e;
    }
    this.#server = true;
    const actions: QmpAction[] = [];
    for (const [i, d] of opts.disks.entries()) {
      actions.push({ type: 'block-dirty-bitmap-add', data: { node: d.node, name: d.newBitmap, persistent: d.persistent } });
      if (d.freeze) actions.push({ type: 'block-dirty-bitmap-disable', data: { node: d.node, name: d.freeze } });
      actions.push({ type: 'blockdev-backup', data: { 'job-id': names(opts.prefix, i).job, device: d.node, target: names(opts.prefix, i).node, sync: 'none' } });
    }
    await qmp.transaction(actions);
    for (const s of this.#steps) s.job = true;
    for (const [i, d] of opts.disks.entries()) {
      const n = names(opts.prefix, i);
      await qmp.execute('block-export-add', {
        type: 'nbd', id: n.exp, 'node-name': n.node, writable: false, name: n.exportName, bitmaps: d.freeze ? [d.freeze] : [],
      });
      this.#steps[i]!.exp = true;
    }
  }

  /** Undo disk `i`'s part in reverse order (the NBD server stays for the others); the first error is thrown at the end. */
  async stopDisk(i: number): Promise<void> {
    const errors: unknown[] = [];
    await this.#stopDisk(i, errors);
    if (errors.length) throw errors[0];
  }

  async #stopDisk(i: number, errors: unknown[], only?: DiskStep[]): Promise<void> {
    const n = names(this.opts.prefix, i);
    const steps = this.#steps[i]!;
    const step = async (key: DiskStep, fn: () => Promise<unknown>): Promise<void> => {
      if (!steps[key] || (only && !only.includes(key))) return;
      try {
        await fn();
        steps[key] = false;
      } catch (e) {
        errors.push(e);
      }
    };
    await step('exp', () => deleteExport(this.qmp, n.exp));
    await step('job', () => cancelJob(this.qmp, n.job));
    await step('node', () => this.qmp.execute('blockdev-del', { 'node-name': n.node }));
    await step('file', () => rm(this.#files[i]!, { force: true }));
  }

  /** Tear down everything left; every step is tried, the first error is thrown at the end. */
  async stop(): Promise<void> {
    const errors: unknown[] = [];
    const all = this.opts.disks.map((_, i) => i);
    for (const i of all) await this.#stopDisk(i, errors, ['exp']);
    if (this.#server) {
      await this.qmp.execute('nbd-server-stop').then(
        () => void (this.#server = false),
        (e: unknown) => void errors.push(e),
      );
    }
    for (const i of all) await this.#stopDisk(i, errors);
    await rm(this.#sock, { force: true }).catch(() => {});
    if (errors.length) throw errors[0];
  }
}

/**
 * The overlay QEMU writes the old contents into: made 0600 (it holds guest
 * data) by this process, formatted by qemu-img through the same descriptor
 * (/dev/fd/3: no name is looked up again, so a file swapped in meanwhile is
 * never formatted), then handed to the user QEMU runs as.
 */
async function createOverlay(file: string, size: number, owner: FleeceOptions['owner']): Promise<void> {
  // One of this name can only be a dead run's whose pid was ours.
  await rm(file, { force: true });
  const fh = await openRegular(file, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL, 0o600);
  try {
    const child = spawn('qemu-img', ['create', '-q', '-f', 'qcow2', '/dev/fd/3', String(size)], { stdio: ['ignore', 'ignore', 'pipe', fh.fd] });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => void (stderr += d.toString()));
    const code = await new Promise<number | null>((res, rej) => child.once('error', rej).once('close', (c) => res(c)));
    if (code !== 0) throw new QsyncError('IO', `qemu-img could not create the overlay ${file}: ${stderr.trim() || `exit ${code}`}`, { file });
    if (owner) await fh.chown(owner.uid, owner.gid);
  } catch (e) {
    await rm(file, { force: true });
    throw e;
  } finally {
    await fh.close();
  }
}

/** The export is gone only once QEMU says so; until then the bitmap it uses stays busy. */
async function deleteExport(qmp: QmpClient, id: string): Promise<void> {
  const gone = qmp.waitEvent('BLOCK_EXPORT_DELETED', (ev) => ev.data.id === id, 30_000);
  try {
    await qmp.execute('block-export-del', { id, mode: 'hard' });
  } catch (e) {
    gone.cancel();
    throw e;
  }
  await gone;
}

async function cancelJob(qmp: QmpClient, id: string): Promise<void> {
  const gone = qmp.waitEvent('JOB_STATUS_CHANGE', (ev) => ev.data.id === id && ev.data.status === 'null', 30_000);
  try {
    await qmp.execute('block-job-cancel', { device: id, force: true });
  } catch (e) {
    gone.cancel();
    throw e;
  }
  await gone;
}

/**
 * Remove what a killed qsync left behind for this DEST (exports, NBD
 * server, jobs, overlay nodes and files), for every disk at once, before
 * any new setup: a later run of the first disk must not meet what was left
 * for the second. `prefixes`: this DEST's prefix, and the per-disk prefixes
 * older qsync versions named these after. Returns true if QEMU held any of it.
 */
export async function removeLeftovers(qmp: QmpClient, prefixes: string[], tempDir: string): Promise<boolean> {
  const ours = (id: string): boolean => id.startsWith('qsync-') && prefixes.some((p) => id.startsWith(p));
  let found = false;
  const exports = await qmp.execute<{ id: string }[]>('query-block-exports');
  for (const e of exports.filter((x) => ours(x.id))) {
    found = true;
    await deleteExport(qmp, e.id);
  }
  // Our exports were the reason the server ran, or our socket (of a dead run) is its address: stop it,
  // unless exports of others remain.
  const files = await readdir(tempDir).catch(() => [] as string[]);
  const stale = files.filter((f) => {
    const m = f.match(/^(qsync-[0-9a-f]+-)(?:fleece\d*|nbd)-(\d+)\.(?:qcow2|sock)$/);
    return m && prefixes.includes(m[1]!) && !alive(Number(m[2]));
  });
  const othersLeft = exports.some((x) => !ours(x.id));
  if ((found || stale.some((f) => f.endsWith('.sock'))) && !othersLeft) await qmp.execute('nbd-server-stop').catch(() => {});
  for (const j of (await qmp.execute<{ id: string }[]>('query-jobs')).filter((x) => ours(x.id))) {
    found = true;
    await cancelJob(qmp, j.id);
  }
  const nodes = await qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true });
  for (const x of nodes.filter((x) => ours(x['node-name']))) {
    found = true;
    await qmp.execute('blockdev-del', { 'node-name': x['node-name'] });
  }
  // Overlays and sockets of runs that are gone (their pid is in the name).
  for (const f of stale) await rm(join(tempDir, f), { force: true });
  return found;
}
