import { randomBytes, randomInt } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readSync, writeSync } from 'node:fs';

const MiB = 1 << 20;

/** A file of `size` random bytes. */
export function randomFile(path: string, size: number): void {
  const fd = openSync(path, 'w');
  for (let off = 0; off < size; off += 4 * MiB) writeSync(fd, randomBytes(Math.min(4 * MiB, size - off)), 0, Math.min(4 * MiB, size - off), off);
  closeSync(fd);
}

/** Overwrite `fraction` of the file's blocks (distinct, scattered) with random data; returns their indices. */
export function mutateBlocks(path: string, size: number, fraction: number, blockSize = 64 * 1024): number[] {
  const blocks = Math.ceil(size / blockSize);
  const chosen = new Set<number>();
  const want = Math.max(1, Math.round(blocks * fraction));
  while (chosen.size < want) chosen.add(randomInt(blocks));
  const fd = openSync(path, 'r+');
  for (const b of chosen) {
    const len = Math.min(blockSize, size - b * blockSize);
    writeSync(fd, randomBytes(len), 0, len, b * blockSize);
  }
  closeSync(fd);
  return [...chosen].sort((a, b) => a - b);
}

/** A real qcow2 made by qemu-img, filled through qemu-io with varied patterns over most of its clusters. */
export function qcow2File(path: string, virtualSize: number): void {
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', path, String(virtualSize)]);
  const cmds: string[] = [];
  for (let off = 0, i = 0; off < virtualSize * 0.9; off += 4 * MiB, i++) cmds.push('-c', `write -P ${(i * 37) % 255 + 1} ${off} ${2 * MiB + (i % 5) * 64 * 1024}`);
  execFileSync('qemu-io', ['-f', 'qcow2', ...cmds, path], { stdio: 'ignore' });
}

/** Bytes in blocks that differ between two files (the changed bytes a sync must write). */
export function differingBytes(a: string, b: string, blockSize = 64 * 1024): number {
  const fa = openSync(a, 'r');
  const fb = openSync(b, 'r');
  const ba = Buffer.alloc(blockSize);
  const bb = Buffer.alloc(blockSize);
  let total = 0;
  for (let off = 0; ; off += blockSize) {
    const na = readSync(fa, ba, 0, blockSize, off);
    const nb = readSync(fb, bb, 0, blockSize, off);
    if (na === 0 && nb === 0) break;
    if (na !== nb || !ba.subarray(0, na).equals(bb.subarray(0, nb))) total += Math.max(na, nb);
  }
  closeSync(fa);
  closeSync(fb);
  return total;
}
