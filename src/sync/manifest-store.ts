/**
 * Manifests on disk: where they live, reading one with full verification
 * (streamed, flat memory), and writing a new one atomically (temp file,
 * fsync, rename, fsync dir) once the target's data is durable.
 */
import { Blake3Hasher, blake3 } from '@napi-rs/blake-hash';
import { open, rename, mkdir, rm, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { errnoOf, QsyncError } from '../core/errors.js';
import { fsyncDir } from '../io/fsync-dir.js';
import {
  decodeManifestHeader,
  encodeManifestHeader,
  fingerprintPrefix,
  manifestBlockCount,
  MANIFEST_DIGEST_LEN,
  MANIFEST_HEADER_LEN,
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
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0) throw new QsyncError('FORMAT', `manifest ${file} is truncated at byte ${position + done}`, { file });
    done += bytesRead;
  }
}

/**
 * Open and fully verify a manifest. Returns undefined when there is none;
 * throws QsyncError('FORMAT') when it exists but cannot be trusted.
 */
export async function openManifest(path: string): Promise<Manifest | undefined> {
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
    const trailer = Buffer.alloc(64);
    await readExactly(fh, trailer, MANIFEST_HEADER_LEN + count * MANIFEST_DIGEST_LEN, path);
    const fingerprint = fp.digest();
    const checksum = blake3(Buffer.concat([head, fingerprint]));
    const win = { first: 0, count: 0, buf: Buffer.alloc(0) };
    if (!fingerprint.equals(trailer.subarray(0, 32)) || !checksum.equals(trailer.subarray(32, 64))) {
      throw new QsyncError('FORMAT', `manifest ${path} failed its checksum (corrupted)`, { file: path });
    }
    return {
      path,
      header,
      fingerprint,
      checksum,
      async readDigests(first, n, out) {
        const avail = Math.max(0, Math.min(n, count - first));
        if (avail <= 0) return;
        // Scans read in order: fetch a window of digests ahead, one read per WINDOW_BLOCKS blocks.
        if (first < win.first || first + avail > win.first + win.count) {
          win.first = first;
          win.count = Math.min(Math.max(avail, WINDOW_BLOCKS), count - first);
          if (win.buf.length < win.count * MANIFEST_DIGEST_LEN) win.buf = Buffer.alloc(win.count * MANIFEST_DIGEST_LEN);
          await readExactly(fh, win.buf.subarray(0, win.count * MANIFEST_DIGEST_LEN), MANIFEST_HEADER_LEN + first * MANIFEST_DIGEST_LEN, path);
        }
        const at = (first - win.first) * MANIFEST_DIGEST_LEN;
        out.set(win.buf.subarray(at, at + avail * MANIFEST_DIGEST_LEN));
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
  private readonly h = new Blake3Hasher();
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

/** Streams digests to a temp file beside the manifest; `commit` makes it the manifest. */
export class ManifestWriter {
  private readonly fp: Fingerprinter;
  private readonly buf = Buffer.alloc(READ_CHUNK);
  private fill = 0;
  private written = 0;
  private constructor(
    readonly path: string,
    private readonly tmp: string,
    private readonly fh: FileHandle,
    private readonly blockSize: number,
    private readonly targetSize: number,
  ) {
    this.fp = new Fingerprinter(blockSize, targetSize);
  }

  static async create(path: string, blockSize: number, targetSize: number): Promise<ManifestWriter> {
    await mkdir(dirname(path), { recursive: true });
    const tmp = join(dirname(path), `.${basename(path)}.tmp-${process.pid}`);
    const fh = await open(tmp, 'w');
    return new ManifestWriter(path, tmp, fh, blockSize, targetSize);
  }

  /** Append the next blocks' digests, in block order. */
  async append(digests: Uint8Array): Promise<void> {
    this.fp.append(digests);
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
    await this.fh.write(this.buf, 0, this.fill, MANIFEST_HEADER_LEN + this.written);
    this.written += this.fill;
    this.fill = 0;
  }

  /** Write header and trailer, fsync, rename over the old manifest, fsync the folder. */
  async commit(h: Omit<ManifestHeader, 'blockSize' | 'targetSize'>): Promise<Buffer> {
    await this.flush();
    const header = encodeManifestHeader({ ...h, blockSize: this.blockSize, targetSize: this.targetSize });
    const expected = manifestBlockCount({ blockSize: this.blockSize, targetSize: this.targetSize }) * MANIFEST_DIGEST_LEN;
    if (this.written !== expected) throw new Error(`internal: manifest got ${this.written} digest bytes, expected ${expected}`);
    const fingerprint = this.fp.digest();
    const checksum = blake3(Buffer.concat([header, fingerprint]));
    await this.fh.write(header, 0, header.length, 0);
    await this.fh.write(Buffer.concat([fingerprint, checksum]), 0, 64, MANIFEST_HEADER_LEN + this.written);
    await this.fh.sync();
    await this.fh.close();
    await rename(this.tmp, this.path);
    await fsyncDir(dirname(this.path));
    return checksum;
  }

  /** The fingerprint of the digests appended so far: the new manifest's, once all are in. */
  get fingerprint(): Buffer {
    return this.fp.digest();
  }

  async abort(): Promise<void> {
    await this.fh.close().catch(() => {});
    await rm(this.tmp, { force: true });
  }
}
