/**
 * Hash worker. For a scan, worker `index` of `workers` takes every
 * `workers`-th chunk of the file, on its own: it waits (Atomics.wait) for
 * one of its slots to be free, reads the chunk straight into it, hashes it
 * block by block into the slot's digest area and, in compare mode, reads the
 * target's range and flags the blocks that differ. Then it marks the slot
 * ready. No message per chunk: the main thread consumes slots in file order
 * and frees them, so workers run ahead by their slots and never wait on a
 * round trip through the event loop.
 */
import { readSync } from 'node:fs';
import { parentPort } from 'node:worker_threads';
import { hashBlocksInto } from './blake3.js';
import { ABORT, FAILED, FREE, READY, slotViews, stateIndex, type ScanMessage, type SlotViews, type WorkerReport } from './slots.js';

/** Read exactly `length` bytes or fewer only at end of file. */
function readFully(fd: number, buf: Uint8Array, length: number, position: number): number {
  let done = 0;
  while (done < length) {
    const n = readSync(fd, buf, done, length - done, position + done);
    if (n === 0) break;
    done += n;
  }
  return done;
}

let scratch: Buffer | undefined;

/** Fill one slot for the chunk at `offset`. Throws with `side` set on failure. */
function fillSlot(m: ScanMessage, v: SlotViews, offset: number): void {
  const length = Math.min(m.chunkSize, m.size - offset);
  const data = v.data.subarray(0, length);
  const got = readFully(m.fd, data, length, offset);
  if (got !== length) throw Object.assign(new Error(`short read: ${got} of ${length} bytes (file shrank while being read?)`), { side: 'source' });
  hashBlocksInto(data, m.blockSize, v.digests);
  if (m.targetFd === undefined) return;

  const count = Math.ceil(length / m.blockSize);
  const targetLen = Math.max(0, Math.min(length, m.targetSize - offset));
  scratch ??= Buffer.allocUnsafe(m.chunkSize);
  let tgot: number;
  try {
    tgot = targetLen > 0 ? readFully(m.targetFd, scratch, targetLen, offset) : 0;
  } catch (e) {
    throw Object.assign(e as Error, { side: 'target' });
  }
  for (let i = 0; i < count; i++) {
    const start = i * m.blockSize;
    const end = Math.min(start + m.blockSize, length);
    v.differs[i] = end > tgot || Buffer.compare(data.subarray(start, end), scratch.subarray(start, end)) !== 0 ? 1 : 0;
  }
  if (m.hashTarget) hashBlocksInto(scratch.subarray(0, tgot), m.blockSize, v.targetDigests);
  v.meta[0] = tgot; // bytes of target in this chunk: how many target digests are valid
}

function scan(m: ScanMessage): WorkerReport {
  const state = new Int32Array(m.control);
  for (let c = m.index, j = 0; m.from + c * m.chunkSize < m.size; c += m.workers, j++) {
    const slot = j % m.slotsPerWorker;
    const at = m.index * m.slotsPerWorker + slot;
    const st = stateIndex(at);
    // Wait until the main thread has consumed what this slot held.
    while (Atomics.load(state, st) !== FREE) {
      if (Atomics.load(state, ABORT) !== 0) return { scanId: m.scanId };
      Atomics.wait(state, st, READY, 200);
    }
    if (Atomics.load(state, ABORT) !== 0) return { scanId: m.scanId };
    const offset = m.from + c * m.chunkSize;
    try {
      fillSlot(m, slotViews(m.buffers[at], m.chunkSize, m.blockSize), offset);
    } catch (e) {
      const err = e as NodeJS.ErrnoException & { side?: 'source' | 'target' };
      Atomics.store(state, st, FAILED);
      Atomics.notify(state, st);
      return { scanId: m.scanId, error: { message: err.message, code: err.code, side: err.side ?? 'source', offset } };
    }
    Atomics.store(state, st, READY);
    Atomics.notify(state, st);
  }
  return { scanId: m.scanId };
}

parentPort?.on('message', (m: ScanMessage) => parentPort!.postMessage(scan(m)));
