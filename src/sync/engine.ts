/**
 * The block engine's one step and its end (docs/ARCHITECTURE.md "The
 * Target"): a planned chunk (src/sync/source.ts: new digests, the blocks to
 * write, their bytes) goes to a target as intent → blocks → manifest
 * digests, and a scan's end commits the target through the one sequence in
 * src/sync/target.ts. The engine does not know where the chunk was planned
 * (this host's hash pool, a peer) nor what holds the target (a file, memory).
 */
import type { BlockSink } from '../io/types.js';
import type { Fingerprinter } from './manifest-store.js';
import type { PlannedChunk } from './source.js';
import type { StateWriter } from './target.js';

export interface ChunkTarget {
  /** The target's sink, or a delta wrapper around it. */
  sink: BlockSink;
  /** The target's state; absent when nothing of it is written (--only-write-batch). */
  writer?: StateWriter;
  /** Without a writer: the result's fingerprint is made here (a delta names it). */
  fingerprint?: Fingerprinter;
  blockSize: number;
  /** The target's new size. */
  size: number;
  /** -S: zero runs become holes instead of written zeros. */
  sparse: boolean;
}

/** Take one chunk: its blocks recorded in the intent before they are written, then its digests. Returns the bytes written. */
export async function takeChunk(c: PlannedChunk, t: ChunkTarget): Promise<number> {
  const { sink, blockSize, size } = t;
  await t.writer?.record(c.changed);
  let literal = 0;
  for (const r of c.runs) {
    const off = r.first * blockSize;
    const end = Math.min(size, (r.first + r.count) * blockSize);
    if (r.zero && t.sparse) await sink.writeZeroes(off, end - off);
    else await sink.write(off, c.bytes(r));
    literal += end - off;
  }
  if (t.writer) await t.writer.append(c.digests, c.changed);
  else t.fingerprint!.append(c.digests);
  return literal;
}
