/** BlockSource and BlockSink over a local file or block device. */
import { execFile } from 'node:child_process';
import { readSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { promisify } from 'node:util';
import { QsyncError } from '../core/errors.js';
import type { BlockSink, BlockSource } from './types.js';

const ZEROES = Buffer.alloc(1 << 20);

/** Read into `buf` from `position` until it is full or the file ends; returns the bytes read. */
export async function readUpTo(fh: FileHandle, buf: Uint8Array, position: number): Promise<number> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return done;
}

/** readUpTo on this thread, for a descriptor: a small file read whole without a trip through libuv's pool. */
export function readUpToSync(fd: number, buf: Uint8Array, position: number): number {
  let done = 0;
  for (let n = -1; done < buf.length && n !== 0; done += n) n = readSync(fd, buf, done, buf.length - done, position + done);
  return done;
}

/**
 * Copy all of `from` to the start of `to`, leaving holes where `from` reads
 * as zeros (a sparse image stays sparse), and set `to`'s size; returns it.
 */
export async function copySparse(from: FileHandle, to: FileHandle): Promise<number> {
  if (await reflink(from, to)) return (await to.stat()).size;
  const buf = Buffer.alloc(1 << 20);
  const out = LocalFileSink.of(to, '');
  let pos = 0;
  for (;;) {
    const n = await readUpTo(from, buf, pos);
    const part = buf.subarray(0, n);
    if (part.some((b) => b !== 0)) await out.write(pos, part);
    pos += n;
    if (n < buf.length) break;
  }
  await to.truncate(pos);
  return pos;
}

/**
 * Make `to` (empty) share `from`'s extents, where the file system can (XFS,
 * Btrfs): nothing is copied, holes stay holes, only blocks written later
 * take new space. coreutils' `cp --reflink=always` does the FICLONE on this
 * process's descriptors (/proc/PID/fd/N): an existing file keeps its mode,
 * so the copy is never wider than it was made, not even for a moment. False
 * where it cannot (ext4, tmpfs, a copy made 0400 that cannot be opened
 * again for writing): the caller copies the bytes through the descriptors.
 */
async function reflink(from: FileHandle, to: FileHandle): Promise<boolean> {
  const fd = (h: FileHandle) => `/proc/${process.pid}/fd/${h.fd}`;
  return run('cp', ['--reflink=always', '--', fd(from), fd(to)]).then(
    () => true,
    () => false,
  );
}

export class LocalFileSource implements BlockSource {
  private constructor(private readonly fh: FileHandle, readonly size: number, readonly path: string) {}

  static async open(path: string): Promise<LocalFileSource> {
    const fh = await open(path, 'r');
    const { size } = await fh.stat();
    return new LocalFileSource(fh, size, path);
  }

  async readAt(buf: Buffer, offset: number): Promise<number> {
    const want = Math.max(0, Math.min(buf.length, this.size - offset));
    const done = await readUpTo(this.fh, buf.subarray(0, want), offset);
    if (done < want) throw new QsyncError('SOURCE', `${this.path}: short read at ${offset + done} (file shrank?)`, { file: this.path, offset: offset + done });
    return done;
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}

export class LocalFileSink implements BlockSink {
  private constructor(readonly fh: FileHandle, readonly path: string) {}

  /** Open for in-place update, creating the file if it does not exist. */
  static async open(path: string, create: boolean): Promise<LocalFileSink> {
    return new LocalFileSink(await open(path, create ? 'w+' : 'r+'), path);
  }

  /** A sink over a file the caller opened (safely: see src/io/safe-fs.ts); `path` is for messages. */
  static of(fh: FileHandle, path: string): LocalFileSink {
    return new LocalFileSink(fh, path);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.fh.write(data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    for (let done = 0; done < length; done += ZEROES.length) {
      await this.write(offset + done, ZEROES.subarray(0, Math.min(ZEROES.length, length - done)));
    }
  }

  async truncate(size: number): Promise<void> {
    await this.fh.truncate(size);
  }

  async commit(): Promise<void> {
    await this.fh.sync();
  }

  async writeback(): Promise<void> {
    await this.fh.datasync();
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

/**
 * The target as the pipeline (and a delta sink around it) writes it: zeroed
 * ranges are collected and punched as holes at commit, before the fsync
 * (image mode, and -S where a target's blocks became zero).
 */
export function punchingSink(file: LocalFileSink, holes: [number, number][]): LocalFileSink {
  return {
    fh: file.fh,
    path: file.path,
    write: (offset, data) => file.write(offset, data),
    async writeZeroes(offset, length) {
      const last = holes.at(-1);
      if (last && last[0] + last[1] === offset) last[1] += length;
      else holes.push([offset, length]);
    },
    truncate: (size) => file.truncate(size),
    async commit() {
      await punchHoles(file, holes);
      await file.commit();
    },
    writeback: () => file.writeback(),
    close: () => file.close(),
  };
}

/** Holes punched by one shell: Node cannot fallocate, and a process per hole costs more than the hole. */
const HOLES_PER_SHELL = 1000;
const PUNCH_SCRIPT = 'f=$1; shift; while [ $# -gt 0 ]; do fallocate --punch-hole --keep-size --offset "$1" --length "$2" "$f" || exit 1; shift 2; done';
const run = promisify(execFile);

/**
 * Make zeroed ranges holes again (fstrim in the guest keeps the backup thin);
 * zeros where the filesystem (or the tool) cannot. The shell reaches the very
 * file written through this process's descriptor, never through its name.
 */
async function punchHoles(file: LocalFileSink, holes: [number, number][]): Promise<void> {
  for (let i = 0; i < holes.length; i += HOLES_PER_SHELL) {
    const part = holes.slice(i, i + HOLES_PER_SHELL);
    try {
      await run('sh', ['-c', PUNCH_SCRIPT, 'sh', `/proc/${process.pid}/fd/${file.fh.fd}`, ...part.flatMap(([off, len]) => [String(off), String(len)])]);
    } catch {
      for (const [off, len] of part) await file.writeZeroes(off, len);
    }
  }
}
