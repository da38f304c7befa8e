/**
 * A point-in-time view of a live disk (image fleecing, docs/ARCHITECTURE.md "Two views of an image"): a qcow2
 * overlay backed by the disk, filled by a `sync=none` backup job with the old
 * contents of whatever the guest overwrites, exported read-only over NBD.
 * One transaction starts the next dirty bitmap, freezes the current one and
 * starts the job, so the frozen bitmap and the view describe the same instant.
 */
import { execFile } from 'node:child_process';
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { QsyncError } from '../core/errors.js';
import { isQmpError } from './errors.js';
import type { QmpAction, QmpClient } from './qmp.js';

const run = promisify(execFile);

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export interface FleeceOptions {
  node: string;
  size: number;
  /** Names of everything qsync creates for one target start with this (`qsync-<tag>-`). */
  prefix: string;
  /** Bitmap created in the transaction; it records from the fleece instant on. */
  newBitmap: string;
  persistent: boolean;
  /** Bitmap to disable in the transaction and export (incremental runs). */
  freeze?: string;
  /** Folder for the overlay and the NBD socket; QEMU must be able to write there. */
  tempDir: string;
}

type Step = 'file' | 'node' | 'job' | 'server' | 'exp';

const names = (prefix: string) => ({
  node: `${prefix}fleece`,
  job: `${prefix}job`,
  exp: `${prefix}exp`,
  exportName: `${prefix}snap`,
});

export class Fleece {
  readonly uri: string;
  /** Milliseconds from the first QMP command to the export being ready. */
  setupMs = 0;
  /** What is set up, so that stop() undoes exactly that. */
  #steps: Record<Step, boolean> = { file: false, node: false, job: false, server: false, exp: false };
  #file: string;
  #sock: string;

  private constructor(
    private readonly qmp: QmpClient,
    private readonly opts: FleeceOptions,
  ) {
    this.#file = join(opts.tempDir, `${opts.prefix}fleece-${process.pid}.qcow2`);
    this.#sock = join(opts.tempDir, `${opts.prefix}nbd-${process.pid}.sock`);
    this.uri = `nbd+unix:///${names(opts.prefix).exportName}?socket=${this.#sock}`;
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
    const n = names(opts.prefix);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', this.#file, String(opts.size)]);
    this.#steps.file = true;
    await qmp.execute('blockdev-add', {
      driver: 'qcow2', 'node-name': n.node, file: { driver: 'file', filename: this.#file }, backing: opts.node,
    });
    this.#steps.node = true;
    const actions: QmpAction[] = [
      { type: 'block-dirty-bitmap-add', data: { node: opts.node, name: opts.newBitmap, persistent: opts.persistent } },
    ];
    if (opts.freeze) actions.push({ type: 'block-dirty-bitmap-disable', data: { node: opts.node, name: opts.freeze } });
    actions.push({ type: 'blockdev-backup', data: { 'job-id': n.job, device: opts.node, target: n.node, sync: 'none' } });
    await qmp.transaction(actions);
    this.#steps.job = true;
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
    this.#steps.server = true;
    await qmp.execute('block-export-add', {
      type: 'nbd', id: n.exp, 'node-name': n.node, writable: false, name: n.exportName, bitmaps: opts.freeze ? [opts.freeze] : [],
    });
    this.#steps.exp = true;
  }

  /** Tear down in reverse order; every step is tried, the first error is thrown at the end. */
  async stop(): Promise<void> {
    const n = names(this.opts.prefix);
    const errors: unknown[] = [];
    const step = async (key: Step, fn: () => Promise<unknown>): Promise<void> => {
      if (!this.#steps[key]) return;
      try {
        await fn();
        this.#steps[key] = false;
      } catch (e) {
        errors.push(e);
      }
    };
    await step('exp', () => deleteExport(this.qmp, n.exp));
    await step('server', () => this.qmp.execute('nbd-server-stop'));
    await step('job', () => cancelJob(this.qmp, n.job));
    await step('node', () => this.qmp.execute('blockdev-del', { 'node-name': n.node }));
    await step('file', () => rm(this.#file, { force: true }));
    await rm(this.#sock, { force: true }).catch(() => {});
    if (errors.length) throw errors[0];
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
 * Remove what a killed qsync left behind for this target (export, NBD
 * server, job, overlay node and file). Returns true if QEMU held any of it.
 */
export async function removeLeftovers(qmp: QmpClient, prefix: string, tempDir: string): Promise<boolean> {
  const n = names(prefix);
  let found = false;
  const exports = await qmp.execute<{ id: string }[]>('query-block-exports');
  if (exports.some((e) => e.id === n.exp)) {
    found = true;
    await deleteExport(qmp, n.exp);
    // Our export was the reason the server ran; if other exports remain it is not ours to stop.
    if (exports.length === 1) await qmp.execute('nbd-server-stop').catch(() => {});
  }
  const jobs = await qmp.execute<{ id: string }[]>('query-jobs');
  if (jobs.some((j) => j.id === n.job)) {
    found = true;
    await cancelJob(qmp, n.job);
  }
  const nodes = await qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true });
  if (nodes.some((x) => x['node-name'] === n.node)) {
    found = true;
    await qmp.execute('blockdev-del', { 'node-name': n.node });
  }
  // Overlays and sockets of runs that are gone (their pid is in the name).
  for (const f of await readdir(tempDir).catch(() => [] as string[])) {
    const m = f.match(/^(.*)(?:fleece|nbd)-(\d+)\.(?:qcow2|sock)$/);
    if (m?.[1] === prefix && !alive(Number(m[2]))) await rm(join(tempDir, f), { force: true });
  }
  return found;
}
