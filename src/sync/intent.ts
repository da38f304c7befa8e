/**
 * Intent record: written beside a manifest before the first block of its
 * target is overwritten, listing every block index about to be written. If
 * the run dies, the next run trusts the old manifest except for those blocks.
 *
 * A kill leaves the page cache intact, so the list is complete up to the
 * last write issued; after a reboot (power cut) pages may have reached disk
 * out of order, so an intent from another boot means "trust nothing".
 */
import { readFileSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { readStateFile, removeStatePath, withStateParent, writeStateFile } from './state-dir.js';

const MAGIC = 'QSYNCINT';
const HEADER_LEN = 8 + 4 + 36 + 32 + 16; // magic, version, boot id, base checksum, sizes
/**
 * Beyond this many recorded blocks (16 GiB of 64 KiB blocks) the next run
 * compares everything instead: the set of them must stay small in memory.
 */
export const MAX_INTENT_BLOCKS = 1 << 18;

let cachedBootId: string | undefined;
export function bootId(): string {
  try {
    cachedBootId ??= readFileSync('/proc/sys/kernel/random/boot_id', 'latin1').trim().padEnd(36).slice(0, 36);
  } catch {
    cachedBootId = ''.padEnd(36, '?');
  }
  return cachedBootId;
}

export const intentPathFor = (manifestPath: string): string => `${manifestPath}.intent`;

export interface Intent {
  /** Checksum of the manifest that was current when the run started (zeros: none). */
  baseChecksum: Buffer;
  oldSize: number;
  newSize: number;
  sameBoot: boolean;
  /** Blocks that may hold new data; undefined when too many to list. */
  blocks?: Set<number>;
}

/** Read the intent beside a manifest; undefined when there is none. A FIFO, symlink or foreign file there is refused (QsyncError). */
export async function readIntent(path: string): Promise<Intent | undefined> {
  // Read no more than a listable intent can hold: the header says enough about a longer one.
  const max = HEADER_LEN + (MAX_INTENT_BLOCKS + 1) * 8;
  const r = await withStateParent(path, false, (sp) => readStateFile(sp.dir, sp.name, max));
  if (!r) return undefined;
  const b = r.data;
  if (b.length < HEADER_LEN || b.toString('latin1', 0, 8) !== MAGIC || b.readUInt32LE(8) !== 1) {
    return { baseChecksum: Buffer.alloc(32), oldSize: 0, newSize: 0, sameBoot: false };
  }
  const count = Math.floor((r.size - HEADER_LEN) / 8);
  let blocks: Set<number> | undefined;
  if (count <= MAX_INTENT_BLOCKS) {
    blocks = new Set();
    for (let i = 0; i < count; i++) blocks.add(Number(b.readBigUInt64LE(HEADER_LEN + i * 8)));
  }
  return {
    sameBoot: b.toString('latin1', 12, 48) === bootId(),
    baseChecksum: Buffer.from(b.subarray(48, 80)),
    oldSize: Number(b.readBigUInt64LE(80)),
    newSize: Number(b.readBigUInt64LE(88)),
    blocks,
  };
}

/** Appends block indices; the header is durable before any target block is written. */
export class IntentWriter {
  /** Where the next index goes (positional writes: the header was written with one too). */
  private at = HEADER_LEN;
  private constructor(private readonly fh: FileHandle, readonly path: string) {}

  /** A fresh 0600 file renamed over any old intent (never through a symlink), its header durable. */
  static async create(path: string, baseChecksum: Buffer | undefined, oldSize: number, newSize: number): Promise<IntentWriter> {
    const h = Buffer.alloc(HEADER_LEN);
    h.write(MAGIC, 0, 'latin1');
    h.writeUInt32LE(1, 8);
    h.write(bootId(), 12, 'latin1');
    baseChecksum?.copy(h, 48);
    h.writeBigUInt64LE(BigInt(oldSize), 80);
    h.writeBigUInt64LE(BigInt(newSize), 88);
    const fh = (await withStateParent(path, true, (sp) => writeStateFile(sp.dir, sp.name, h, true)))!;
    return new IntentWriter(fh, path);
  }

  /**
   * Record blocks before they are written (no fsync: see the module comment).
   * Past MAX_INTENT_BLOCKS the record already says "too many to list" (the
   * next run compares everything): it grows no further.
   */
  async add(blocks: number[]): Promise<void> {
    if (!blocks.length || this.at > HEADER_LEN + MAX_INTENT_BLOCKS * 8) return;
    const b = Buffer.alloc(blocks.length * 8);
    blocks.forEach((n, i) => b.writeBigUInt64LE(BigInt(n), i * 8));
    const at = this.at;
    this.at += b.length;
    await this.fh.write(b, 0, b.length, at);
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

export const removeIntent = (path: string): Promise<void> => removeStatePath(path);
