/**
 * `node dist/bench/hash-rate.js FILE [ROUNDS]`: the single-core costs behind
 * qsync's forced read (bench/README.md "What bounds qsync's forced read"),
 * each over all of FILE (warm it first: `cat FILE >/dev/null`), in one thread:
 * - read: readSync 1 MiB at a time into one buffer (the copy out of the page cache);
 * - per block: BLAKE3 of each 64 KiB block into a digest array, as the hash workers do;
 * - per chunk: one BLAKE3 call per 1 MiB (what a many-blocks-per-call hash would cost at best).
 * The hashes run over the last chunk read, so they measure hashing alone.
 * Figures are CPU seconds (user + system) of the one thread.
 */
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { digestOf, hashBlocksInto } from '../src/hash/blake3.js';

const CHUNK = 1 << 20;
const BLOCK = 64 * 1024;

function main(): void {
  const [file, roundsArg] = process.argv.slice(2);
  if (!file) {
    process.stderr.write('usage: node dist/bench/hash-rate.js FILE [ROUNDS]\n');
    process.exitCode = 1;
    return;
  }
  const fd = openSync(file, 'r');
  const size = Math.floor(fstatSync(fd).size / CHUNK) * CHUNK;
  const buf = Buffer.allocUnsafe(CHUNK);
  const digests = new Uint8Array((CHUNK / BLOCK) * 32);
  // CPU time of this (single) thread: on a shared machine the wall time measures its share of the cores.
  const time = (f: () => void): string => {
    const c0 = process.cpuUsage();
    f();
    const c = process.cpuUsage(c0);
    const s = (c.user + c.system) / 1e6;
    return `${s.toFixed(3)} s CPU (${(size / s / 1e9).toFixed(2)} GB/s)`;
  };
  for (let r = 0; r < Number(roundsArg ?? 3); r++) {
    const read = time(() => {
      for (let off = 0; off < size; off += CHUNK) readSync(fd, buf, 0, CHUNK, off);
    });
    const perBlock = time(() => {
      for (let off = 0; off < size; off += CHUNK) hashBlocksInto(buf, BLOCK, digests);
    });
    const perChunk = time(() => {
      for (let off = 0; off < size; off += CHUNK) digestOf(buf);
    });
    process.stdout.write(`${(size / 2 ** 30).toFixed(2)} GiB: read ${read}; BLAKE3 per 64 KiB block ${perBlock}; one call per 1 MiB ${perChunk}\n`);
  }
  closeSync(fd);
}

main();
