/**
 * Hash worker. For a scan, each worker claims the next chunk of the file
 * (src/hash/slots.ts: one counter for all), waits (Atomics.wait) until that
 * chunk's slot is its turn, reads the chunk straight into it, hashes it block
 * by block into the slot's digest area and, in compare mode, reads the
 * target's range and flags the blocks that differ. Then it marks the slot
 * ready. No message per chunk: the main thread consumes slots in file order
 * and hands them on, so workers run ahead by the ring and never wait on a
 * round trip through the event loop.
 *
 * Reads in flight ahead: each claim asks the kernel to start reading the
 * chunk READ_AHEAD bytes further on (src/io/file-advice.ts), so a cold file
 * keeps the device busy while both workers hash; a warm one only pays a
 * page-cache lookup.
 */
import { readSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { fileAdvice, prepareFileAdvice, type FileAdvice } from '../io/file-advice.js';
import { hashBlocksInto } from './blake3.js';
import { ABORT, FAILED, NEXT, readyIndex, slotViews, turnIndex, type PoolSetup, type ScanMessage, type SlotViews, type WorkerReport } from './slots.js';

/** How far ahead of the chunk being claimed the kernel is asked to read. */
const READ_AHEAD = 32 << 20;

const setup = workerData as PoolSetup;
const state = new Int32Array(setup.control);
const views = setup.buffers.map((b) => slotViews(b, setup.chunkSize, setup.blockSize));
const scratch = Buffer.allocUnsafe(setup.chunkSize);
await prepareFileAdvice();

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

/** Fill one slot for the chunk at `offset`. Throws with `side` set on failure. */
function fillSlot(m: ScanMessage, v: SlotViews, offset: number): void {
  const { chunkSize, blockSize } = setup;
  const length = Math.min(chunkSize, m.size - offset);
  const data = v.data.subarray(0, length);
  const got = readFully(m.fd, data, length, offset);
  if (got !== length) throw Object.assign(new Error(`short read: ${got} of ${length} bytes (file shrank while being read?)`), { side: 'source' });
  hashBlocksInto(data, blockSize, v.digests);
  if (m.targetFd === undefined) return;

  const count = Math.ceil(length / blockSize);
  const targetLen = Math.max(0, Math.min(length, m.targetSize - offset));
  let tgot: number;
  try {
    tgot = targetLen > 0 ? readFully(m.targetFd, scratch, targetLen, offset) : 0;
  } catch (e) {
    throw Object.assign(e as Error, { side: 'target' });
  }
  for (let i = 0; i < count; i++) {
    const start = i * blockSize;
    const end = Math.min(start + blockSize, length);
    v.differs[i] = end > tgot || Buffer.compare(data.subarray(start, end), scratch.subarray(start, end)) !== 0 ? 1 : 0;
  }
  if (m.hashTarget) hashBlocksInto(scratch.subarray(0, tgot), blockSize, v.targetDigests);
  v.meta[0] = tgot; // bytes of target in this chunk: how many target digests are valid
}

function scan(m: ScanMessage): WorkerReport {
  const { chunkSize } = setup;
  const slots = views.length;
  const advice: FileAdvice[] = [fileAdvice(m.fd), ...(m.targetFd === undefined ? [] : [fileAdvice(m.targetFd)])];
  for (;;) {
    if (Atomics.load(state, ABORT) !== 0) return { scanId: m.scanId };
    const c = Atomics.add(state, NEXT, 1);
    const offset = m.from + c * chunkSize;
    if (offset >= m.size) return { scanId: m.scanId };
    // The first claim sets the read-ahead going; every claim keeps it READ_AHEAD bytes ahead.
    if (c === 0) for (const a of advice) a.sequential(), a.willNeed(offset, READ_AHEAD);
    for (const a of advice) a.willNeed(offset + READ_AHEAD, chunkSize);
    const at = c % slots;
    // Wait until the main thread has consumed the chunk this slot held before.
    for (let turn; (turn = Atomics.load(state, turnIndex(at))) !== c; ) {
      if (Atomics.load(state, ABORT) !== 0) return { scanId: m.scanId };
      Atomics.wait(state, turnIndex(at), turn, 200);
    }
    try {
      fillSlot(m, views[at]!, offset);
    } catch (e) {
      const err = e as NodeJS.ErrnoException & { side?: 'source' | 'target' };
      Atomics.store(state, readyIndex(at), FAILED);
      Atomics.notify(state, readyIndex(at));
      return { scanId: m.scanId, error: { message: err.message, code: err.code, side: err.side ?? 'source', offset } };
    }
    Atomics.store(state, readyIndex(at), c + 1);
    Atomics.notify(state, readyIndex(at));
  }
}

parentPort?.on('message', (m: ScanMessage) => parentPort!.postMessage(scan(m)));
