/**
 * Hash worker: reads a chunk of the source straight into a shared slot (no
 * copy through the main thread), hashes it block by block and, in compare
 * mode, reads the same range of the target and flags the blocks that differ.
 * The main thread keeps the slot until it has written what it needs from it.
 */
import { readSync } from 'node:fs';
import { parentPort } from 'node:worker_threads';
import { DIGEST_LEN, hashBlocksInto } from './blake3.js';

export interface InitMessage {
  type: 'init';
  slots: SharedArrayBuffer[];
  blockSize: number;
}

export interface JobMessage {
  type: 'job';
  id: number;
  slot: number;
  fd: number;
  offset: number;
  length: number;
  /** Compare mode: the target's fd and size; blocks past its end differ. */
  targetFd?: number;
  targetSize?: number;
  /** Also return the digests of the target's blocks in this range (a delta's base fingerprint). */
  hashTarget?: boolean;
}

export interface ResultMessage {
  id: number;
  digests?: Uint8Array;
  /** Compare mode: 1 per block whose target bytes differ. */
  differs?: Uint8Array;
  /** With hashTarget: digests of the target's blocks that lie in the range. */
  targetDigests?: Uint8Array;
  error?: { message: string; code?: string; side: 'source' | 'target'; offset: number };
}

/** Read exactly `length` bytes or fail: a short read means the file changed under us. */
function readFully(fd: number, buf: Uint8Array, length: number, position: number): number {
  let done = 0;
  while (done < length) {
    const n = readSync(fd, buf, done, length - done, position + done);
    if (n === 0) break;
    done += n;
  }
  return done;
}

let slots: Uint8Array[] = [];
let blockSize = 0;
let scratch: Buffer | undefined;
let side: 'source' | 'target' = 'source';

function runJob(job: JobMessage): ResultMessage {
  const data = slots[job.slot].subarray(0, job.length);
  side = 'source';
  const got = readFully(job.fd, data, job.length, job.offset);
  if (got !== job.length) {
    return {
      id: job.id,
      error: { message: `short read: ${got} of ${job.length} bytes (file shrank while being read?)`, code: 'ESHORT', side: 'source', offset: job.offset },
    };
  }
  const count = Math.ceil(job.length / blockSize);
  const digests = new Uint8Array(count * DIGEST_LEN);
  hashBlocksInto(data, blockSize, digests);
  if (job.targetFd === undefined) return { id: job.id, digests };

  const differs = new Uint8Array(count);
  const targetLen = Math.max(0, Math.min(job.length, (job.targetSize ?? 0) - job.offset));
  scratch ??= Buffer.allocUnsafe(slots[0].length);
  side = 'target';
  const tgot = targetLen > 0 ? readFully(job.targetFd, scratch, targetLen, job.offset) : 0;
  for (let i = 0; i < count; i++) {
    const start = i * blockSize;
    const end = Math.min(start + blockSize, job.length);
    differs[i] = end > tgot || Buffer.compare(data.subarray(start, end), scratch.subarray(start, end)) !== 0 ? 1 : 0;
  }
  if (!job.hashTarget) return { id: job.id, digests, differs };
  const targetDigests = new Uint8Array(Math.ceil(tgot / blockSize) * DIGEST_LEN);
  hashBlocksInto(scratch.subarray(0, tgot), blockSize, targetDigests);
  return { id: job.id, digests, differs, targetDigests };
}

parentPort?.on('message', (msg: InitMessage | JobMessage) => {
  if (msg.type === 'init') {
    slots = msg.slots.map((s) => new Uint8Array(s));
    blockSize = msg.blockSize;
    return;
  }
  try {
    parentPort!.postMessage(runJob(msg));
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    parentPort!.postMessage({ id: msg.id, error: { message: err.message, code: err.code, side, offset: msg.offset } });
  }
});
