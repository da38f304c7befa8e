/**
 * Per-block digests of a target kept in a scratch file (32 bytes a block, at
 * index × 32), so that applying a delta can rebuild the target's manifest
 * with flat memory: start from the old manifest or a hash of the target,
 * overwrite the digests of the blocks the delta writes, then stream the file
 * into a ManifestWriter whose fingerprint must equal the delta's result.
 */
import { constants } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { blockCount, blockLength } from '../core/geometry.js';
import { DIGEST_LEN, hashBlocksInto, zeroDigest } from '../hash/blake3.js';
import { Fingerprinter, type Manifest, type ManifestWriter } from './manifest-store.js';
import { openStateFile, openStateParent, unlinkState, type StateParent } from './state-dir.js';

const BATCH_BLOCKS = 4096;

export class DigestScratch {
  private constructor(
    private readonly fh: FileHandle,
    readonly path: string,
    private readonly sp: StateParent,
  ) {}

  /** Open (or create, 0600) the scratch file in the state folder, never through a symlink; existing content is kept (resume). */
  static async open(path: string): Promise<DigestScratch> {
    const sp = await openStateParent(path, true);
    try {
      const fh = (await openStateFile(sp.dir, sp.name, constants.O_RDWR | constants.O_CREAT))!;
      return new DigestScratch(fh, path, sp);
    } catch (e) {
      await sp.release();
      throw e;
    }
  }

  /** Digests of blocks first, first+1, ... */
  async set(first: number, digests: Buffer): Promise<void> {
    await this.fh.write(digests, 0, digests.length, first * DIGEST_LEN);
  }

  /** Digests of blocks [first, first+count) into `out`. */
  async read(first: number, count: number, out: Uint8Array): Promise<void> {
    const len = count * DIGEST_LEN;
    const { bytesRead } = await this.fh.read(out, 0, len, first * DIGEST_LEN);
    if (bytesRead !== len) throw new Error(`digest scratch ${this.path} is short at block ${first}`);
  }

  /** Copy a trusted manifest's digests in. */
  async fillFromManifest(m: Manifest): Promise<void> {
    const n = blockCount(m.header.targetSize, m.header.blockSize);
    const buf = Buffer.alloc(BATCH_BLOCKS * DIGEST_LEN);
    for (let first = 0; first < n; first += BATCH_BLOCKS) {
      const k = Math.min(BATCH_BLOCKS, n - first);
      await m.readDigests(first, k, buf);
      await this.fh.write(buf, 0, k * DIGEST_LEN, first * DIGEST_LEN);
    }
  }

  /** Set blocks [from, blockCount(size)) to the digest of zeros (the area a resize adds), a batch per write. */
  async fillZeros(from: number, size: number, blockSize: number): Promise<void> {
    const n = blockCount(size, blockSize);
    const full = zeroDigest(blockSize);
    const buf = Buffer.alloc(BATCH_BLOCKS * DIGEST_LEN);
    for (let first = from; first < n; first += BATCH_BLOCKS) {
      const k = Math.min(BATCH_BLOCKS, n - first);
      for (let j = 0; j < k; j++) (blockLength(first + j, size, blockSize) === blockSize ? full : zeroDigest(blockLength(first + j, size, blockSize))).copy(buf, j * DIGEST_LEN);
      await this.set(first, buf.subarray(0, k * DIGEST_LEN));
    }
  }

  /** Stream the digests of blocks [0, blockCount(size)) into a new manifest writer (its fingerprint is checked by the caller). */
  async writeTo(w: Pick<ManifestWriter, 'append'>, blockSize: number, size: number): Promise<void> {
    await this.each(blockSize, size, (d) => w.append(d));
  }

  /** The manifest fingerprint of blocks [0, blockCount(size)) as the scratch file holds them. */
  async fingerprint(blockSize: number, size: number): Promise<Buffer> {
    const fp = new Fingerprinter(blockSize, size);
    await this.each(blockSize, size, async (d) => fp.append(d));
    return fp.digest();
  }

  private async each(blockSize: number, size: number, fn: (digests: Buffer) => Promise<void>): Promise<void> {
    const n = blockCount(size, blockSize);
    const buf = Buffer.alloc(BATCH_BLOCKS * DIGEST_LEN);
    for (let first = 0; first < n; first += BATCH_BLOCKS) {
      const len = Math.min(BATCH_BLOCKS, n - first) * DIGEST_LEN;
      const { bytesRead } = await this.fh.read(buf, 0, len, first * DIGEST_LEN);
      if (bytesRead !== len) throw new Error(`digest scratch ${this.path} is short at block ${first}`);
      await fn(buf.subarray(0, len));
    }
  }

  async sync(): Promise<void> {
    await this.fh.sync();
  }

  async close(remove = false): Promise<void> {
    try {
      await this.fh.close();
      if (remove) await unlinkState(this.sp.dir, this.sp.name);
    } finally {
      await this.sp.release();
    }
  }
}

/**
 * Hash a file block by block, reading sequentially; `each` gets the digests
 * of each run of blocks read. Returns the manifest-style fingerprint.
 */
export async function hashFile(
  fh: FileHandle,
  size: number,
  blockSize: number,
  each?: (first: number, digests: Buffer) => Promise<void>,
): Promise<Buffer> {
  const fp = new Fingerprinter(blockSize, size);
  const per = Math.max(1, Math.floor((4 << 20) / blockSize));
  const buf = Buffer.alloc(per * blockSize);
  for (let first = 0; first < blockCount(size, blockSize); first += per) {
    const want = Math.min(buf.length, size - first * blockSize);
    let got = 0;
    while (got < want) {
      const { bytesRead } = await fh.read(buf, got, want - got, first * blockSize + got);
      if (bytesRead === 0) throw new Error(`file shrank while hashing (at ${first * blockSize + got})`);
      got += bytesRead;
    }
    const digests = Buffer.alloc(blockCount(want, blockSize) * DIGEST_LEN);
    hashBlocksInto(buf.subarray(0, want), blockSize, digests);
    fp.append(digests);
    await each?.(first, digests);
  }
  return fp.digest();
}
