/**
 * Memory shared by the hash pool and its workers: one buffer per slot
 * (chunk data, its digests, the target's digests, per-block "differs" flags,
 * and how many target bytes the chunk held), and a control array: an abort
 * flag, the next chunk to claim, and two words per slot handed back and
 * forth with Atomics.
 *
 * The slots are a ring shared by all workers: chunk c lives in slot
 * c % slots. A worker claims the next chunk (Atomics.add on NEXT), waits
 * until the slot's turn is that chunk (the main thread has consumed chunk
 * c - slots), fills it and sets the slot's ready word to c + 1; a failure
 * sets it to FAILED. The main thread waits for ready = c + 1, consumes the
 * chunk in file order and hands the slot on (turn = c + slots). Workers that
 * claim chunks as they come keep both cores busy when one of them is held up
 * (a shared machine, a slow read), where a fixed share would stall the other.
 */
import { DIGEST_LEN } from './blake3.js';

/** A slot's ready word after its worker failed on it (and reported why). */
export const FAILED = -1;

/** Index of the abort flag in the control array, then of the next chunk to claim; slot words follow them. */
export const ABORT = 0;
export const NEXT = 1;
/** Which chunk may fill the slot next. */
export const turnIndex = (slot: number): number => 2 + 2 * slot;
/** 1 + the chunk the slot holds, once filled; FAILED on failure. */
export const readyIndex = (slot: number): number => 3 + 2 * slot;
export const controlLength = (slots: number): number => 2 + 2 * slots;

/** Start the control array for a scan: nothing claimed, slot s free for chunk s. */
export function resetControl(state: Int32Array, slots: number): void {
  state.fill(0);
  for (let s = 0; s < slots; s++) state[turnIndex(s)] = s;
}

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

/** The pool's geometry, sent once to each worker when it starts. */
export interface PoolSetup {
  control: SharedArrayBuffer;
  buffers: SharedArrayBuffer[];
  chunkSize: number;
  blockSize: number;
}

/** Start of a scan, one message to each worker. */
export interface ScanMessage {
  scanId: number;
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
