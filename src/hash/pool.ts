/**
 * Reads and hashes a file on a pool of worker threads, so both cores work at
 * once, and hands the chunks back in file order. Workers claim the next chunk
 * as they come free and fill a ring of slots shared by all of them; the main
 * thread consumes slots in order and hands them on (src/hash/slots.ts).
 * Memory is bounded by the ring (workers × slots × chunk size), whatever the
 * size of the file.
 */
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { QsyncError } from '../core/errors.js';
import { DIGEST_LEN } from './blake3.js';
import { sizeHeap } from './heap.js';
import { ABORT, controlLength, FAILED, readyIndex, resetControl, slotBytes, slotViews, turnIndex, type PoolSetup, type ScanMessage, type SlotViews, type WorkerReport } from './slots.js';

export interface ScannedChunk {
  /** Byte offset of the chunk in the source (a multiple of the block size). */
  offset: number;
  /** The chunk's bytes. This and the arrays below are valid only until onChunk settles. */
  data: Buffer;
  /** DIGEST_LEN bytes per block. */
  digests: Uint8Array;
  /** Compare mode only: 1 per block whose target bytes differ. */
  differs?: Uint8Array;
  /** With hashTarget: digests of the target's blocks in this chunk. */
  targetDigests?: Uint8Array;
}

export interface ScanJob {
  fd: number;
  size: number;
  /** Compare mode: read the target too and flag differing blocks. */
  targetFd?: number;
  targetSize?: number;
  hashTarget?: boolean;
  /** Only the byte range [from, size) is scanned; `from` is block-aligned. */
  from?: number;
  path?: string;
}

export interface PoolOptions {
  workers?: number;
  chunkSize?: number;
  slotsPerWorker?: number;
}

/** The compiled worker: under vitest this module runs from src/*.ts, so use dist's build of it. */
function workerPath(): string {
  const here = fileURLToPath(import.meta.url);
  if (here.endsWith('.js')) return join(dirname(here), 'worker.js');
  const built = join(dirname(here), '../../dist/src/hash/worker.js');
  if (!existsSync(built)) throw new Error(`hash worker not built: run "npx tsc -p ." (${built})`);
  return built;
}

type WaitAsync = (a: Int32Array, index: number, value: number, timeoutMs: number) => { async: boolean; value: Promise<string> | string };
const waitAsync = (Atomics as unknown as { waitAsync: WaitAsync }).waitAsync;

export class HashPool {
  readonly blockSize: number;
  readonly chunkSize: number;
  private readonly nWorkers: number;
  private readonly slotsPerWorker: number;
  /** Started by warm() or the first scan: a run that only quick-checks never pays for them. */
  private workers: Worker[] = [];
  private buffers: SharedArrayBuffer[] = [];
  private views: SlotViews[] = [];
  private control = new SharedArrayBuffer(4);
  private readonly reports: ((r: WorkerReport) => void)[] = [];
  private broken?: Error;
  private scanId = 0;

  constructor(blockSize: number, opts: PoolOptions = {}) {
    this.blockSize = blockSize;
    // Chunks are whole blocks; 1 MiB is ~0.25 ms of hashing, long beside a slot hand-over, and RSS stays low.
    this.chunkSize = Math.max(blockSize, Math.floor((opts.chunkSize ?? 1 << 20) / blockSize) * blockSize);
    this.nWorkers = Math.max(1, opts.workers ?? 2);
    // Three slots each keep a worker busy while the main thread writes; fewer when blocks are huge.
    this.slotsPerWorker = opts.slotsPerWorker ?? Math.max(2, Math.min(3, Math.floor((3 << 20) / this.chunkSize)));
  }

  /** Start the workers now, so that they boot while the caller walks the tree. */
  warm(): void {
    if (this.workers.length) return;
    const n = this.nWorkers * this.slotsPerWorker;
    this.buffers = Array.from({ length: n }, () => new SharedArrayBuffer(slotBytes(this.chunkSize, this.blockSize)));
    this.views = this.buffers.map((b) => slotViews(b, this.chunkSize, this.blockSize));
    this.control = new SharedArrayBuffer(4 * controlLength(n));
    const path = workerPath();
    const workerData: PoolSetup = { control: this.control, buffers: this.buffers, chunkSize: this.chunkSize, blockSize: this.blockSize };
    this.workers = Array.from({ length: this.nWorkers }, (_, index) => {
      // A small young generation: the workers allocate little, and each MiB here is RSS.
      const w = new Worker(path, { workerData, resourceLimits: { maxYoungGenerationSizeMb: 2, maxOldGenerationSizeMb: 32 } });
      w.on('message', (r: WorkerReport) => this.reports[index]?.(r));
      // A worker's start set V8's flags again from the command line: the main heap's sizing is set again.
      w.once('online', sizeHeap);
      w.on('error', (e) => {
        this.broken = e;
        this.reports[index]?.({ scanId: this.scanId, error: { message: `hash worker failed: ${e.message}`, side: 'source', offset: 0 } });
      });
      return w;
    });
  }

  /**
   * Scan `job.fd` chunk by chunk, calling `onChunk` strictly in file order.
   * Workers read ahead of `onChunk` by up to their slots.
   */
  async scan(job: ScanJob, onChunk: (c: ScannedChunk) => Promise<void> | void): Promise<void> {
    this.warm();
    if (this.broken) throw this.broken;
    const scanId = ++this.scanId;
    const state = new Int32Array(this.control);
    const slots = this.views.length;
    resetControl(state, slots);
    const from = job.from ?? 0;
    const m: ScanMessage = { scanId, fd: job.fd, size: job.size, from, targetFd: job.targetFd, targetSize: job.targetSize ?? 0, hashTarget: Boolean(job.hashTarget) };
    const done = this.workers.map(
      (w, index) =>
        new Promise<WorkerReport>((resolve) => {
          this.reports[index] = resolve;
          w.postMessage(m);
        }),
    );
    const fail = (e: NonNullable<WorkerReport['error']>) => {
      throw new QsyncError(e.side === 'source' ? 'SOURCE' : 'TARGET', `cannot read ${e.side} ${job.path ?? ''} at offset ${e.offset}: ${e.message}`, {
        file: job.path,
        offset: e.offset,
      });
    };
    // Stop workers still running ahead, and wait for them: the slots are reused by the next scan.
    const stop = (): Promise<WorkerReport[]> => {
      Atomics.store(state, ABORT, 1);
      for (let i = 1; i < state.length; i++) Atomics.notify(state, i);
      return Promise.all(done);
    };
    try {
      const chunks = Math.ceil(Math.max(0, job.size - from) / this.chunkSize);
      for (let c = 0; c < chunks; c++) {
        const at = c % slots;
        const ready = readyIndex(at);
        for (let r; (r = Atomics.load(state, ready)) !== c + 1; ) {
          if (r === FAILED) {
            // The reason comes in the report of whichever worker had claimed the chunk.
            const errors = (await stop()).flatMap((x) => (x.error ? [x.error] : []));
            fail(errors.find((e) => e.offset === from + c * this.chunkSize) ?? errors[0]!);
          }
          if (this.broken) throw this.broken;
          const w = waitAsync(state, ready, r, 1000);
          if (w.async) await w.value;
        }
        const v = this.views[at]!;
        const offset = from + c * this.chunkSize;
        const length = Math.min(this.chunkSize, job.size - offset);
        const blocks = Math.ceil(length / this.blockSize);
        await onChunk({
          offset,
          data: Buffer.from(v.data.buffer, v.data.byteOffset, length),
          digests: v.digests.subarray(0, blocks * DIGEST_LEN),
          differs: job.targetFd === undefined ? undefined : v.differs.subarray(0, blocks),
          targetDigests: job.hashTarget ? v.targetDigests.subarray(0, Math.ceil(v.meta[0]! / this.blockSize) * DIGEST_LEN) : undefined,
        });
        Atomics.store(state, turnIndex(at), c + slots);
        Atomics.notify(state, turnIndex(at));
      }
    } finally {
      await stop();
    }
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}
