/**
 * Memory shared by the hash pool and its workers: one buffer per slot
 * (chunk data, its digests, the target's digests, per-block "differs" flags,
 * and how many target bytes the chunk held), and a control array: an abort
 * flag and one state word per slot, handed back and forth with Atomics.
 */
import { DIGEST_LEN } from './blake3.js';

export const FREE = 0; // the worker may fill it
export const READY = 1; // filled: the main thread may consume it
export const FAILED = 2; // the worker failed on it and reported why

/** Index of the abort flag in the control array; slot states follow it. */
export const ABORT = 0;
export const stateIndex = (slot: number): number => 1 + slot;
export const controlLength = (slots: number): number => 1 + slots;

const META = 8;

export interface SlotViews {
  /** [0]: bytes of target read into this chunk (compare mode). */
  meta: Int32Array;
  data: Uint8Array;
  digests: Uint8Array;
  targetDigests: Uint8Array;
  differs: Uint8Array;
}

export function slotBytes(chunkSize: number, blockSize: number): number {
  const blocks = Math.ceil(chunkSize / blockSize);
  return META + chunkSize + 2 * blocks * DIGEST_LEN + blocks;
}

export function slotViews(buf: SharedArrayBuffer, chunkSize: number, blockSize: number): SlotViews {
  const blocks = Math.ceil(chunkSize / blockSize);
  let off = META;
  const take = (n: number) => new Uint8Array(buf, (off += n) - n, n);
  return {
    meta: new Int32Array(buf, 0, 1),
    data: take(chunkSize),
    digests: take(blocks * DIGEST_LEN),
    targetDigests: take(blocks * DIGEST_LEN),
    differs: take(blocks),
  };
}

/** Start of a scan, one message to each worker. */
export interface ScanMessage {
  scanId: number;
  control: SharedArrayBuffer;
  buffers: SharedArrayBuffer[];
  slotsPerWorker: number;
  index: number;
  workers: number;
  chunkSize: number;
  blockSize: number;
  fd: number;
  size: number;
  from: number;
  targetFd?: number;
  targetSize: number;
  hashTarget: boolean;
}

/** A worker's end of a scan: finished, stopped by abort, or failed at `error.offset`. */
export interface WorkerReport {
  scanId: number;
  error?: { message: string; code?: string; side: 'source' | 'target'; offset: number };
}
