/**
 * Reads and hashes a file on a pool of worker threads, so both cores work at
 * once, and hands the chunks back in order. Memory is bounded by the slot
 * pool (slots × chunkSize), whatever the size of the file.
 */
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { QsyncError } from '../core/errors.js';
import type { JobMessage, ResultMessage } from './worker.js';

export interface ScannedChunk {
  /** Byte offset of the chunk in the source (a multiple of the block size). */
  offset: number;
  /** The chunk's bytes: valid only until the onChunk callback settles. */
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
  slots?: number;
}

/** The compiled worker: under vitest this module runs from src/*.ts, so use dist's build of it. */
function workerPath(): string {
  const here = fileURLToPath(import.meta.url);
  if (here.endsWith('.js')) return join(dirname(here), 'worker.js');
  const built = join(dirname(here), '../../dist/src/hash/worker.js');
  if (!existsSync(built)) throw new Error(`hash worker not built: run "npx tsc -p ." (${built})`);
  return built;
}

export class HashPool {
  readonly blockSize: number;
  readonly chunkSize: number;
  private readonly nWorkers: number;
  private readonly nSlots: number;
  /** Started on the first scan: a run that only quick-checks never pays for them. */
  private workers: Worker[] = [];
  private slots: SharedArrayBuffer[] = [];
  private readonly pending = new Map<number, (r: ResultMessage) => void>();
  private nextId = 1;
  private nextWorker = 0;

  constructor(blockSize: number, opts: PoolOptions = {}) {
    this.blockSize = blockSize;
    // Chunks are whole blocks; 1 MiB keeps message overhead small (a few thousand per GiB) and memory flat.
    this.chunkSize = Math.max(blockSize, Math.floor((opts.chunkSize ?? 1 << 20) / blockSize) * blockSize);
    // Six slots keep both workers busy; fewer when huge blocks make chunks large.
    this.nSlots = opts.slots ?? Math.max(3, Math.min(6, Math.floor((8 << 20) / this.chunkSize)));
    this.nWorkers = Math.max(1, opts.workers ?? 2);
  }

  private start(): void {
    if (this.workers.length) return;
    this.slots = Array.from({ length: this.nSlots }, () => new SharedArrayBuffer(this.chunkSize));
    const path = workerPath();
    this.workers = Array.from({ length: this.nWorkers }, () => {
      // A small young generation: the workers allocate little, and each MiB here is RSS.
      const w = new Worker(path, { resourceLimits: { maxYoungGenerationSizeMb: 2, maxOldGenerationSizeMb: 32 } });
      w.postMessage({ type: 'init', slots: this.slots, blockSize: this.blockSize });
      w.on('message', (r: ResultMessage) => {
        const done = this.pending.get(r.id);
        this.pending.delete(r.id);
        done?.(r);
      });
      w.on('error', (e) => this.failAll(e));
      return w;
    });
  }

  private failAll(e: Error): void {
    for (const [id, done] of this.pending) done({ id, error: { message: e.message, side: 'source', offset: 0 } });
    this.pending.clear();
  }

  private run(job: Omit<JobMessage, 'type' | 'id'>): Promise<ResultMessage> {
    const id = this.nextId++;
    const w = this.workers[this.nextWorker++ % this.workers.length];
    return new Promise((resolve) => {
      this.pending.set(id, resolve);
      w.postMessage({ type: 'job', id, ...job } satisfies JobMessage);
    });
  }

  /**
   * Scan `job.fd` chunk by chunk, calling `onChunk` strictly in file order.
   * Reads run ahead of `onChunk` by up to the number of slots.
   */
  async scan(job: ScanJob, onChunk: (c: ScannedChunk) => Promise<void> | void): Promise<void> {
    this.start();
    const free = this.slots.map((_, i) => i);
    const inflight: { offset: number; slot: number; result: Promise<ResultMessage> }[] = [];
    let next = job.from ?? 0;
    const dispatch = () => {
      while (free.length && next < job.size) {
        const slot = free.shift()!;
        const length = Math.min(this.chunkSize, job.size - next);
        const result = this.run({ slot, fd: job.fd, offset: next, length, targetFd: job.targetFd, targetSize: job.targetSize, hashTarget: job.hashTarget });
        inflight.push({ offset: next, slot, result });
        next += length;
      }
    };
    dispatch();
    try {
      while (inflight.length) {
        const head = inflight[0];
        const r = await head.result;
        if (r.error) {
          const what = r.error.side === 'target' ? 'target' : 'source';
          throw new QsyncError(what === 'source' ? 'SOURCE' : 'TARGET', `cannot read ${what} ${job.path ?? ''} at offset ${r.error.offset}: ${r.error.message}`, {
            file: job.path,
            offset: r.error.offset,
          });
        }
        const length = Math.min(this.chunkSize, job.size - head.offset);
        const data = Buffer.from(this.slots[head.slot], 0, length);
        await onChunk({ offset: head.offset, data, digests: r.digests!, differs: r.differs, targetDigests: r.targetDigests });
        inflight.shift();
        free.push(head.slot);
        dispatch();
      }
    } finally {
      // Let jobs still in flight finish before their slots can be reused by another scan.
      await Promise.allSettled(inflight.map((f) => f.result));
    }
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}
