/** BlockSource and BlockSink over a local file or block device. */
import { execFile } from 'node:child_process';
import { open, type FileHandle } from 'node:fs/promises';
import { promisify } from 'node:util';
import { QsyncError } from '../core/errors.js';
import type { BlockSink, BlockSource } from './types.js';

const ZEROES = Buffer.alloc(1 << 20);
const run = promisify(execFile);
/** Cleared once punching failed: later zero runs are written without trying again. */
let canPunch = true;

/** Punch a hole in a regular file; false when it could not be done (the caller writes zeros). */
async function punchHole(fh: FileHandle, offset: number, length: number): Promise<boolean> {
  if (!canPunch || !(await fh.stat()).isFile()) return false;
  try {
    await run('fallocate', ['--punch-hole', '--offset', String(offset), '--length', String(length), `/proc/${process.pid}/fd/${fh.fd}`], { timeout: 60_000 });
    return true;
  } catch {
    canPunch = false;
    return false;
  }
}

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

  /**
   * A regular file gets a hole (fallocate(2) PUNCH_HOLE, through util-linux's
   * `fallocate`: Node has no binding; it reopens this very file through
   * /proc/PID/fd); where that cannot be done (no tool, a file system without
   * holes, a block device) zeros are written.
   */
  async writeZeroes(offset: number, length: number): Promise<void> {
    if (length > 0 && (await punchHole(this.fh, offset, length))) return;
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

  async close(): Promise<void> {
    await this.fh.close();
  }
}
