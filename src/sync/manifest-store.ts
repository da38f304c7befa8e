/**
 * Manifests on disk: where they live, reading one with full verification
 * (streamed, flat memory), and writing a new one atomically (temp file,
 * fsync, rename, fsync dir) once the target's data is durable.
 */
import { mkdir, open, readFile, rename, rm, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { errnoOf, QsyncError } from '../core/errors.js';
import { fsyncDir } from '../io/fsync-dir.js';
import { readUpTo } from '../io/local-file.js';
import { digestOf, newHasher } from '../hash/blake3.js';
import {
  decodeManifestHeader,
  encodeManifestHeader,
  fingerprintPrefix,
  manifestBlockCount,
  MANIFEST_DIGEST_LEN,
  MANIFEST_HEADER_LEN,
  MANIFEST_TRAILER_LEN,
  type ManifestHeader,
} from '../core/manifest.js';

/** The folder at the destination root that holds qsync's state; never user data. */
export const STATE_DIR = '.qsync';

export function manifestPathFor(destRoot: string, relPath: string): string {
  return join(destRoot, STATE_DIR, 'manifests', `${relPath}.qsm`);
}

export interface Manifest {
  path: string;
  header: ManifestHeader;
  /** BLAKE3 over block size, size and digests: names the content, not the file. */
  fingerprint: Buffer;
  checksum: Buffer;
  /** Copy the digests of blocks [first, first+count) into `out`. */
  readDigests(first: number, count: number, out: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

const READ_CHUNK = 1 << 20;
/** 64 KiB of digests: 4 GiB of a file at 64 KiB blocks. */
const WINDOW_BLOCKS = 2048;

async function readExactly(fh: FileHandle, buf: Buffer, position: number, file: string): Promise<void> {
  const done = await readUpTo(fh, buf, position);
  if (done < buf.length) throw new QsyncError('FORMAT', `manifest ${file} is truncated at byte ${position + done}`, { file });
}

/** The manifest's checksum: over its header and the fingerprint of its digests (docs/FORMATS.md). */
const checksumOf = (header: Buffer, fingerprint: Buffer): Buffer => digestOf(Buffer.concat([header, fingerprint]));

/**
 * Open and fully verify a manifest. Returns undefined when there is none;
 * throws QsyncError('FORMAT') when it exists but cannot be trusted.
 */
export async function openManifest(path: string): Promise<Manifest | undefined> {
  await replayJournal(path);
  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (e) {
    if (errnoOf(e) === 'ENOENT') return undefined;
    throw new QsyncError('IO', `cannot open manifest ${path}: ${(e as Error).message}`, { file: path }, { cause: e });
  }
  try {
    const { size } = await fh.stat();
    const head = Buffer.alloc(MANIFEST_HEADER_LEN);
    await readExactly(fh, head, 0, path);
    const header = decodeManifestHeader(head, size, path);
    const count = manifestBlockCount(header);
    const fp = new Fingerprinter(header.blockSize, header.targetSize);
    const buf = Buffer.alloc(READ_CHUNK);
    for (let off = 0; off < count * MANIFEST_DIGEST_LEN; off += READ_CHUNK) {
      const part = buf.subarray(0, Math.min(READ_CHUNK, count * MANIFEST_DIGEST_LEN - off));
      await readExactly(fh, part, MANIFEST_HEADER_LEN + off, path);
      fp.append(part);
    }
    const trailer = Buffer.alloc(MANIFEST_TRAILER_LEN);
    await readExactly(fh, trailer, MANIFEST_HEADER_LEN + count * MANIFEST_DIGEST_LEN, path);
    const fingerprint = fp.digest();
    const checksum = checksumOf(head, fingerprint);
    const win = { first: 0, count: 0, buf: Buffer.alloc(0) };
    let queue: Promise<unknown> = Promise.resolve();
    // Scans read in order: fetch a window of digests ahead, one read per WINDOW_BLOCKS blocks.
    const readWindowed = async (first: number, n: number, out: Uint8Array): Promise<void> => {
      const avail = Math.max(0, Math.min(n, count - first));
      if (avail <= 0) return;
      if (first < win.first || first + avail > win.first + win.count) {
        win.first = first;
        win.count = Math.min(Math.max(avail, WINDOW_BLOCKS), count - first);
        if (win.buf.length < win.count * MANIFEST_DIGEST_LEN) win.buf = Buffer.alloc(win.count * MANIFEST_DIGEST_LEN);
        await readExactly(fh, win.buf.subarray(0, win.count * MANIFEST_DIGEST_LEN), MANIFEST_HEADER_LEN + first * MANIFEST_DIGEST_LEN, path);
      }
      const at = (first - win.first) * MANIFEST_DIGEST_LEN;
      out.set(win.buf.subarray(at, at + avail * MANIFEST_DIGEST_LEN));
    };
    if (!fingerprint.equals(trailer.subarray(0, 32)) || !checksum.equals(trailer.subarray(32, 64))) {
      throw new QsyncError('FORMAT', `manifest ${path} failed its checksum (corrupted)`, { file: path });
    }
    return {
      path,
      header,
      fingerprint,
      checksum,
      readDigests(first, n, out) {
        // Calls run one after another: they share the read-ahead window.
        const next = queue.then(() => readWindowed(first, n, out));
        queue = next.catch(() => undefined);
        return next;
      },
      close: () => fh.close(),
    };
  } catch (e) {
    await fh.close();
    throw e;
  }
}

/** The fingerprint of a target's digests, fed block by block (docs/FORMATS.md). */
export class Fingerprinter {
  private readonly h = newHasher();
  constructor(blockSize: number, targetSize: number) {
    this.h.update(fingerprintPrefix(blockSize, targetSize));
  }
  append(digests: Uint8Array): void {
    this.h.update(digests);
  }
  /** The fingerprint of what was appended so far. */
  digest(): Buffer {
    return this.h.digestBuffer();
  }
}

/** Fingerprint of an empty file: the base of a delta made for a target that did not exist. */
export const emptyFingerprint = (blockSize: number): Buffer => new Fingerprinter(blockSize, 0).digest();

/** Beyond this many changed blocks a run writes a whole new manifest instead of patching (1 MiB of digests). */
const MAX_PATCHES = 32768;

/**
 * Writes the manifest of a target as a run hashes it. Two ways:
 * - a whole new manifest, streamed to a temp file beside it, then renamed
 *   over the old one (first runs, resizes, runs that changed many blocks);
 * - with a trusted `base` of the same geometry, only the changed digests are
 *   kept (bounded) and patched into the old file at commit, with the new
 *   header and trailer, through a journal (patchInPlace): a run that changed
 *   1% of a disk writes 1% of its manifest. Too many changes switch to a
 *   whole new manifest, built from the base plus the patches so far.
 */
export class ManifestWriter {
  private readonly fp: Fingerprinter;
  private readonly buf = Buffer.alloc(READ_CHUNK);
  private fill = 0;
  private written = 0;
  private fh?: FileHandle;
  /** Blocks appended so far. */
  private blocks = 0;
  private patches?: { index: number[]; digests: Buffer };
  private constructor(
    readonly path: string,
    private readonly tmp: string,
    private readonly blockSize: number,
    private readonly targetSize: number,
    private readonly base?: Manifest,
  ) {
    this.fp = new Fingerprinter(blockSize, targetSize);
    if (base) this.patches = { index: [], digests: Buffer.alloc(MAX_PATCHES * MANIFEST_DIGEST_LEN) };
  }

  static async create(path: string, blockSize: number, targetSize: number, base?: Manifest): Promise<ManifestWriter> {
    await mkdir(dirname(path), { recursive: true });
    const tmp = join(dirname(path), `.${basename(path)}.tmp-${process.pid}`);
    const patchable = base && base.path === path && base.header.blockSize === blockSize && base.header.targetSize === targetSize;
    const w = new ManifestWriter(path, tmp, blockSize, targetSize, patchable ? base : undefined);
    if (!patchable) w.fh = await open(tmp, 'w');
    return w;
  }

  /**
   * Append the next blocks' digests, in block order. `changed` lists the
   * blocks (absolute indices, ascending) whose digest differs from the base.
   */
  async append(digests: Uint8Array, changed: readonly number[] = []): Promise<void> {
    this.fp.append(digests);
    const first = this.blocks;
    this.blocks += digests.length / MANIFEST_DIGEST_LEN;
    const p = this.patches;
    if (p && p.index.length + changed.length <= MAX_PATCHES) {
      for (const b of changed) {
        p.digests.set(digests.subarray((b - first) * MANIFEST_DIGEST_LEN, (b - first + 1) * MANIFEST_DIGEST_LEN), p.index.length * MANIFEST_DIGEST_LEN);
        p.index.push(b);
      }
      return;
    }
    if (p) await this.spill(first);
    await this.appendWhole(digests);
  }

  /** Switch from patching to a whole manifest: the base's digests up to `upTo`, with the patches applied. */
  private async spill(upTo: number): Promise<void> {
    const p = this.patches!;
    this.patches = undefined;
    this.fh = await open(this.tmp, 'w');
    const step = READ_CHUNK / MANIFEST_DIGEST_LEN;
    const part = Buffer.alloc(READ_CHUNK);
    let k = 0;
    for (let b = 0; b < upTo; b += step) {
      const n = Math.min(step, upTo - b);
      await this.base!.readDigests(b, n, part);
      for (; k < p.index.length && p.index[k] < b + n; k++) {
        part.set(p.digests.subarray(k * MANIFEST_DIGEST_LEN, (k + 1) * MANIFEST_DIGEST_LEN), (p.index[k] - b) * MANIFEST_DIGEST_LEN);
      }
      await this.appendWhole(part.subarray(0, n * MANIFEST_DIGEST_LEN));
    }
  }

  private async appendWhole(digests: Uint8Array): Promise<void> {
    let off = 0;
    while (off < digests.length) {
      const n = Math.min(digests.length - off, this.buf.length - this.fill);
      this.buf.set(digests.subarray(off, off + n), this.fill);
      this.fill += n;
      off += n;
      if (this.fill === this.buf.length) await this.flush();
    }
  }

  private async flush(): Promise<void> {
    if (!this.fill) return;
    await this.fh!.write(this.buf, 0, this.fill, MANIFEST_HEADER_LEN + this.written);
    this.written += this.fill;
    this.fill = 0;
  }

  /** Make the new manifest durable: patched in place, or renamed over the old one. Returns its checksum. */
  async commit(h: Omit<ManifestHeader, 'blockSize' | 'targetSize'>): Promise<Buffer> {
    const header = encodeManifestHeader({ ...h, blockSize: this.blockSize, targetSize: this.targetSize });
    const count = manifestBlockCount({ blockSize: this.blockSize, targetSize: this.targetSize });
    if (this.blocks !== count) throw new Error(`internal: manifest got ${this.blocks} digests, expected ${count}`);
    const fingerprint = this.fp.digest();
    const checksum = checksumOf(header, fingerprint);
    const trailer = Buffer.concat([fingerprint, checksum]);
    if (this.patches) {
      await this.patchInPlace(header, trailer, count);
      return checksum;
    }
    await this.flush();
    await this.fh!.write(header, 0, header.length, 0);
    await this.fh!.write(trailer, 0, trailer.length, MANIFEST_HEADER_LEN + this.written);
    await this.fh!.sync();
    await this.fh!.close();
    await rm(journalPathFor(this.path), { force: true });
    await rename(this.tmp, this.path);
    await fsyncDir(dirname(this.path));
    return checksum;
  }

  /**
   * Patch through a journal: the patch (new digests, header, trailer) is
   * made durable beside the manifest first, then applied, then dropped. A
   * crash mid-apply is finished by the next openManifest (replayJournal).
   */
  private async patchInPlace(header: Buffer, trailer: Buffer, count: number): Promise<void> {
    const { index, digests } = this.patches!;
    const journal = encodeJournal(index, digests, header, trailer, MANIFEST_HEADER_LEN + count * MANIFEST_DIGEST_LEN);
    const jpath = journalPathFor(this.path);
    const jfh = await open(jpath, 'w');
    try {
      await jfh.write(journal, 0, journal.length, 0);
      await jfh.sync();
    } finally {
      await jfh.close();
    }
    await fsyncDir(dirname(this.path));
    await applyJournal(this.path, journal);
    await rm(jpath, { force: true });
  }

  /** The fingerprint of the digests appended so far: the new manifest's, once all are in. */
  get fingerprint(): Buffer {
    return this.fp.digest();
  }

  async abort(): Promise<void> {
    await this.fh?.close().catch(() => {});
    if (this.fh) await rm(this.tmp, { force: true });
  }
}

/*
 * Manifest patch journal (docs/FORMATS.md): magic, version, count, trailer
 * offset, the new header and trailer, count × (u64 block, digest), and a
 * BLAKE3 of all that. Bounded by MAX_PATCHES, so it is read whole.
 */
const JOURNAL_MAGIC = 'QSYNCJNL';
const JOURNAL_HEAD = 8 + 4 + 4 + 8 + MANIFEST_HEADER_LEN + 64;
const JOURNAL_ENTRY = 8 + MANIFEST_DIGEST_LEN;
export const journalPathFor = (manifestPath: string): string => `${manifestPath}.journal`;

export function encodeJournal(index: readonly number[], digests: Buffer, header: Buffer, trailer: Buffer, trailerAt: number): Buffer {
  const b = Buffer.alloc(JOURNAL_HEAD + index.length * JOURNAL_ENTRY + 32);
  b.write(JOURNAL_MAGIC, 0, 'latin1');
  b.writeUInt32LE(1, 8);
  b.writeUInt32LE(index.length, 12);
  b.writeBigUInt64LE(BigInt(trailerAt), 16);
  header.copy(b, 24);
  trailer.copy(b, 24 + MANIFEST_HEADER_LEN);
  index.forEach((n, i) => {
    const at = JOURNAL_HEAD + i * JOURNAL_ENTRY;
    b.writeBigUInt64LE(BigInt(n), at);
    digests.copy(b, at + 8, i * MANIFEST_DIGEST_LEN, (i + 1) * MANIFEST_DIGEST_LEN);
  });
  digestOf(b.subarray(0, b.length - 32)).copy(b, b.length - 32);
  return b;
}

/** Write a journal's patch into the manifest and fsync it; idempotent. */
async function applyJournal(path: string, j: Buffer): Promise<void> {
  const count = j.readUInt32LE(12);
  const fh = await open(path, 'r+');
  try {
    for (let i = 0; i < count; i++) {
      const at = JOURNAL_HEAD + i * JOURNAL_ENTRY;
      await fh.write(j, at + 8, MANIFEST_DIGEST_LEN, MANIFEST_HEADER_LEN + Number(j.readBigUInt64LE(at)) * MANIFEST_DIGEST_LEN);
    }
    await fh.write(j, 24, MANIFEST_HEADER_LEN, 0);
    await fh.write(j, 24 + MANIFEST_HEADER_LEN, 64, Number(j.readBigUInt64LE(16)));
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Finish a patch a crash interrupted. A journal that is not whole was never
 * applied (it is made durable first): it is dropped and the manifest is as
 * it was. One that is whole is applied again, then dropped.
 */
async function replayJournal(path: string): Promise<void> {
  const jpath = journalPathFor(path);
  let j: Buffer;
  try {
    j = await readFile(jpath);
  } catch (e) {
    if (errnoOf(e) === 'ENOENT') return;
    throw e;
  }
  const whole =
    j.length >= JOURNAL_HEAD + 32 &&
    j.toString('latin1', 0, 8) === JOURNAL_MAGIC &&
    j.readUInt32LE(8) === 1 &&
    j.readUInt32LE(12) <= MAX_PATCHES &&
    j.length === JOURNAL_HEAD + j.readUInt32LE(12) * JOURNAL_ENTRY + 32 &&
    digestOf(j.subarray(0, j.length - 32)).equals(j.subarray(j.length - 32));
  if (whole) await applyJournal(path, j).catch((e) => {
    if (errnoOf(e) !== 'ENOENT') throw e; // the manifest itself is gone: nothing to finish
  });
  await rm(jpath, { force: true });
}
