/** Test images and the changes the scenarios make to them. */
import { execFile } from 'node:child_process';
import { randomFillSync, randomInt } from 'node:crypto';
import { closeSync, ftruncateSync, openSync, statSync, utimesSync, writeSync } from 'node:fs';
import { promisify } from 'node:util';
import { BLOCK } from './args.js';

const run = promisify(execFile);
const CHUNK = 4 * 1024 * 1024;
/** qemu-io commands per process: keeps argv far below the kernel's limit. */
const QEMU_IO_BATCH = 1000;

/** Writes `length` random bytes at `offset` of an open file. */
function fillRandom(fd: number, offset: number, length: number, buf: Buffer): void {
  for (let done = 0; done < length; ) {
    const n = Math.min(buf.length, length - done);
    randomFillSync(buf, 0, n);
    writeSync(fd, buf, 0, n, offset + done);
    done += n;
  }
}

export function writeRandomFile(path: string, size: number): void {
  const fd = openSync(path, 'w');
  try {
    fillRandom(fd, 0, size, Buffer.allocUnsafe(CHUNK));
  } finally {
    closeSync(fd);
  }
}

/** A sparse file of `size` with `chunks` random 1 MiB islands spread evenly. */
export function writeSparseFile(path: string, size: number, chunks: number): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
    const island = 1024 * 1024;
    const buf = Buffer.allocUnsafe(island);
    const stride = Math.floor(size / chunks / island) * island;
    for (let i = 0; i < chunks; i++) fillRandom(fd, i * stride, island, buf);
  } finally {
    closeSync(fd);
  }
}

/** `count` distinct block indices in [0, nblocks), scattered uniformly. */
export function pickScattered(nblocks: number, count: number): number[] {
  const picked = new Set<number>();
  while (picked.size < Math.min(count, nblocks)) picked.add(randomInt(nblocks));
  return [...picked].sort((a, b) => a - b);
}

/** `count` distinct block indices in [0, nblocks), in runs of 16 to 256 blocks (1 to 16 MiB). */
export function pickClustered(nblocks: number, count: number): number[] {
  const picked = new Set<number>();
  const want = Math.min(count, nblocks);
  while (picked.size < want) {
    const len = Math.min(randomInt(16, 257), want - picked.size, nblocks);
    const start = randomInt(nblocks - len + 1);
    for (let i = start; i < start + len; i++) picked.add(i);
  }
  return [...picked].sort((a, b) => a - b);
}

/** Overwrites the given 64 KiB blocks of a raw file with new random data. */
export function overwriteBlocks(path: string, blocks: readonly number[]): void {
  const fd = openSync(path, 'r+');
  try {
    const buf = Buffer.allocUnsafe(BLOCK);
    for (const b of blocks) fillRandom(fd, b * BLOCK, BLOCK, buf);
  } finally {
    closeSync(fd);
  }
}

export function appendRandom(path: string, bytes: number): void {
  const fd = openSync(path, 'r+');
  try {
    fillRandom(fd, statSync(path).size, bytes, Buffer.allocUnsafe(CHUNK));
  } finally {
    closeSync(fd);
  }
}

/** Moves the file's mtime forward by a minute: every tool's quick check sees it. */
export function bumpMtime(path: string): void {
  const st = statSync(path);
  utimesSync(path, st.atime, new Date(st.mtimeMs + 60_000));
}

async function qemuIo(image: string, commands: string[]): Promise<void> {
  for (let i = 0; i < commands.length; i += QEMU_IO_BATCH) {
    const args = commands.slice(i, i + QEMU_IO_BATCH).flatMap((c) => ['-c', c]);
    await run('qemu-io', ['-f', 'qcow2', ...args, image], { maxBuffer: 64 * 1024 * 1024 });
  }
}

/** Guest writes of fresh random data: qemu-io reads `len` bytes of its pattern file, here /dev/urandom. */
const randomWrite = (offset: number, len: number): string => `write -q -s /dev/urandom ${offset} ${len}`;

/**
 * A real qcow2 (64 KiB clusters) of virtual size `size`, 90% of its 1 MiB
 * guest ranges written with random data in random order, so the file's
 * cluster layout is shuffled against the guest's, as after a guest's life.
 */
export async function makeQcow2(path: string, size: number): Promise<void> {
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', path, String(size)]);
  const mib = 1024 * 1024;
  const ranges = Math.floor(size / mib);
  const order = pickScattered(ranges, Math.ceil(ranges * 0.9));
  for (let i = order.length - 1; i > 0; i--) {
    const j = randomInt(i + 1);
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  await qemuIo(path, order.map((r) => randomWrite(r * mib, mib)));
}

/** Guest writes to the given 64 KiB clusters (allocated or not) of a qcow2. */
export async function qcow2WriteBlocks(path: string, blocks: readonly number[]): Promise<void> {
  await qemuIo(path, blocks.map((b) => randomWrite(b * BLOCK, BLOCK)));
}
