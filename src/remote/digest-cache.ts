/**
 * The sending side's verified copy of a target's digests, so that a target
 * the sender has seen before costs one fingerprint on the wire, not 32
 * bytes a block (docs/FORMATS.md "Wire protocol", "Digest cache").
 *
 * Files live in the sender's state base, `BASE/wire-cache/<fingerprint hex>`:
 * the raw digests, 32 bytes a block. They are named by what they must hash
 * to, and checked against it every time they are used: a file that is
 * short, torn or planted is never trusted, only replaced. State-folder rules
 * apply (src/sync/state-dir.ts): 0700/0600, no symlinks, ours only.
 */
import { constants } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { blockCount } from '../core/geometry.js';
import { DIGEST_LEN } from '../hash/blake3.js';
import type { Dir } from '../io/safe-fs.js';
import { Fingerprinter } from '../sync/manifest-store.js';
import type { DigestReader } from '../sync/source.js';
import { createStateTemp, doneWithTemp, isStateTemp, openStateFile, openStateParent, renameState, stateBase, unlinkState, type StateParent } from '../sync/state-dir.js';

const BATCH = 4096;

/** Digests in a file, read at block offsets. */
class FileDigests implements DigestReader {
  constructor(
    readonly fingerprint: Buffer,
    private readonly fh: FileHandle,
  ) {}

  async readDigests(first: number, count: number, out: Uint8Array): Promise<void> {
    const len = count * DIGEST_LEN;
    const { bytesRead } = await this.fh.read(out, 0, len, first * DIGEST_LEN);
    if (bytesRead !== len) throw new Error(`cached digests are short at block ${first}`);
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}

/** A file of digests being written, named by its fingerprint once complete. */
export class DigestFileWriter {
  private at = 0;
  constructor(
    private readonly cache: DigestCache,
    private readonly fh: FileHandle,
    private readonly tmp: string,
  ) {}

  async append(digests: Uint8Array): Promise<void> {
    await this.fh.write(digests, 0, digests.length, this.at);
    this.at += digests.length;
  }

  /** Keep it under `fingerprint` (the caller computed it over what was appended). */
  async keep(fingerprint: Buffer): Promise<void> {
    await this.fh.close();
    await this.cache.adopt(this.tmp, fingerprint);
  }

  async discard(): Promise<void> {
    await this.fh.close().catch(() => {});
    await this.cache.dropTemp(this.tmp);
  }
}

/** Temp files older than this are a killed run's: every run of every destination shares this folder, so younger ones may be in use. */
const TEMP_AGE_MS = 24 * 3600 * 1000;

async function removeOldTemps(dir: Dir): Promise<void> {
  const now = Date.now();
  for (const entry of await dir.readdir()) {
    if (!isStateTemp(entry)) continue;
    const st = await dir.lstatOrUndefined(entry);
    if (st?.isFile() && now - Number(st.mtimeMs) > TEMP_AGE_MS) await unlinkState(dir, entry).catch(() => {});
  }
}

export class DigestCache {
  private constructor(private readonly sp: StateParent) {}

  static async open(): Promise<DigestCache> {
    const sp = await openStateParent(join(stateBase(), 'wire-cache', 'entry'), true);
    await removeOldTemps(sp.dir).catch(() => {});
    return new DigestCache(sp);
  }

  private get dir(): Dir {
    return this.sp.dir;
  }

  /**
   * The digests of a `size`-byte target whose fingerprint is `fingerprint`,
   * if a file of exactly that many digests is here and hashes to it.
   */
  async lookup(fingerprint: Buffer, blockSize: number, size: number): Promise<(DigestReader & { close(): Promise<void> }) | undefined> {
    const name = fingerprint.toString('hex');
    const fh = await openStateFile(this.dir, name, constants.O_RDONLY).catch(() => undefined);
    if (!fh) return undefined;
    const n = blockCount(size, blockSize);
    try {
      if ((await fh.stat()).size !== n * DIGEST_LEN) throw new Error('wrong size');
      const fp = new Fingerprinter(blockSize, size);
      const buf = Buffer.alloc(BATCH * DIGEST_LEN);
      for (let first = 0; first < n; first += BATCH) {
        const len = Math.min(BATCH, n - first) * DIGEST_LEN;
        const { bytesRead } = await fh.read(buf, 0, len, first * DIGEST_LEN);
        if (bytesRead !== len) throw new Error('short');
        fp.append(buf.subarray(0, len));
      }
      if (!fp.digest().equals(fingerprint)) throw new Error('does not hash to its name');
      return new FileDigests(fingerprint, fh);
    } catch {
      await fh.close();
      await unlinkState(this.dir, name).catch(() => {});
      return undefined;
    }
  }

  /** A new file of digests (0600, under a temp name until kept). */
  async create(): Promise<DigestFileWriter> {
    const { fh, name } = await createStateTemp(this.dir, 'digests');
    return new DigestFileWriter(this, fh, name);
  }

  /** A complete temp file becomes the entry for `fingerprint`. */
  async adopt(tmp: string, fingerprint: Buffer): Promise<void> {
    try {
      await renameState(this.dir, tmp, fingerprint.toString('hex'));
    } finally {
      doneWithTemp(tmp);
    }
  }

  async dropTemp(tmp: string): Promise<void> {
    doneWithTemp(tmp);
    await unlinkState(this.dir, tmp).catch(() => {});
  }

  /** Forget the entry for `fingerprint` (a target that has moved on). */
  async drop(fingerprint: Buffer): Promise<void> {
    await unlinkState(this.dir, fingerprint.toString('hex')).catch(() => {});
  }

  close(): Promise<void> {
    return this.sp.release();
  }
}
