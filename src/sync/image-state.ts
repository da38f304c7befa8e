/**
 * What image mode remembers per target between runs: the dirty bitmap that
 * records changes since the target was last written, and the checksum of the
 * manifest it is relative to. A bitmap is only trusted together with that
 * manifest (Proxmox Backup Server ties its bitmap to its index the same way).
 */
import { open, readFile, rename, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { mkdir } from 'node:fs/promises';
import { errnoOf } from '../core/errors.js';
import { fsyncDir } from '../io/fsync-dir.js';
import { STATE_DIR } from './manifest-store.js';

export interface ImageState {
  node: string;
  bitmap: string;
  /** Manifest checksum (hex) the bitmap's changes are relative to. */
  baseChecksum: string;
  size: number;
}

export const imageStatePath = (dest: string, name: string): string => join(dest, STATE_DIR, 'image', `${name}.json`);

/** Undefined when there is none or it cannot be read (the run then goes full). */
export async function readImageState(path: string): Promise<ImageState | undefined> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    if (errnoOf(e) === 'ENOENT') return undefined;
    throw e;
  }
  try {
    const s = JSON.parse(text) as Partial<ImageState> & { version?: number };
    if (s.version !== 1 || typeof s.bitmap !== 'string' || typeof s.baseChecksum !== 'string' || typeof s.node !== 'string' || typeof s.size !== 'number') {
      return undefined;
    }
    return { node: s.node, bitmap: s.bitmap, baseChecksum: s.baseChecksum, size: s.size };
  } catch {
    return undefined;
  }
}

/** Replace atomically (temp file, fsync, rename, fsync dir). */
export async function writeImageState(path: string, s: ImageState): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  const tmp = `${path}.tmp-${process.pid}`;
  const fh = await open(tmp, 'w');
  try {
    await fh.write(JSON.stringify({ version: 1, ...s }) + '\n');
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
  await fsyncDir(dirname(path));
}

export const removeImageState = (path: string): Promise<void> => rm(path, { force: true });
