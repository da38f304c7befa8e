/**
 * What image mode remembers per target between runs: the dirty bitmap that
 * records changes since the target was last written, and the checksum of the
 * manifest it is relative to. A bitmap is only trusted together with that
 * manifest (Proxmox Backup Server ties its bitmap to its index the same way).
 */
import { join } from 'node:path';
import { readStateFile, removeStatePath, removeStaleTemps, stateFolderFor, withStateParent, writeStateFile } from './state-dir.js';

/** A state record is a few hundred bytes; a longer file is not one (and is not read). */
const IMAGE_STATE_MAX = 64 * 1024;

export interface ImageState {
  node: string;
  bitmap: string;
  /** Manifest checksum (hex) the bitmap's changes are relative to. */
  baseChecksum: string;
  size: number;
}

export const imageStatePath = (dest: string, name: string): string => join(stateFolderFor(dest), 'image', `${name}.json`);

/** Undefined when there is none or it cannot be read (the run then goes full). */
export async function readImageState(path: string): Promise<ImageState | undefined> {
  const r = await withStateParent(path, false, (sp) => readStateFile(sp.dir, sp.name, IMAGE_STATE_MAX));
  if (!r || r.size > IMAGE_STATE_MAX) return undefined;
  try {
    const s = JSON.parse(r.data.toString('utf8')) as Partial<ImageState> & { version?: number };
    if (s.version !== 1 || typeof s.bitmap !== 'string' || typeof s.baseChecksum !== 'string' || typeof s.node !== 'string' || typeof s.size !== 'number') {
      return undefined;
    }
    return { node: s.node, bitmap: s.bitmap, baseChecksum: s.baseChecksum, size: s.size };
  } catch {
    return undefined;
  }
}

/** Replace atomically (a fresh 0600 temp file, fsync, rename, fsync dir) in the state folder. */
export async function writeImageState(path: string, s: ImageState): Promise<void> {
  await withStateParent(path, true, async (sp) => {
    await writeStateFile(sp.dir, sp.name, Buffer.from(JSON.stringify({ version: 1, ...s }) + '\n'));
    await removeStaleTemps(sp.dir);
  });
}

export const removeImageState = (path: string): Promise<void> => removeStatePath(path);
