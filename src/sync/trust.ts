/**
 * Whether a manifest still describes its target (docs/ARCHITECTURE.md "Manifest"), and
 * which of its blocks an interrupted run may have changed.
 */
import type { BigIntStats } from 'node:fs';
import type { Manifest } from './manifest-store.js';
import type { Intent } from './intent.js';

export interface Trust {
  trusted: boolean;
  /** Why the manifest is not used (or was partly distrusted), for the user. */
  reason?: string;
  /** Blocks an interrupted run may have written: rewrite them whatever the digests say. */
  unknown?: Set<number>;
  /** Blocks from this index on are unknown (an interrupted resize). */
  unknownFrom?: number;
}

/**
 * `strict` (-c: the user asks that nothing be taken on trust) also refuses a
 * manifest that an interrupted run left behind: the target's size and mtime
 * must equal the recorded ones, intent or not.
 */
export function assessManifest(m: Manifest | undefined, intent: Intent | undefined, target: Pick<BigIntStats, 'size' | 'mtimeNs' | 'ino' | 'dev'>, blockSize: number, strict = false): Trust {
  if (!m) return { trusted: false, reason: intent ? 'an earlier run was interrupted before its first manifest' : undefined };
  const h = m.header;
  if (h.blockSize !== blockSize) return { trusted: false, reason: `block size changed (${h.blockSize} → ${blockSize})` };
  if (h.targetIno !== target.ino || h.targetDev !== target.dev) return { trusted: false, reason: 'target was replaced since the last run' };
  const sameTimes = Number(target.size) === h.targetSize && target.mtimeNs === h.targetMtimeNs;
  const changed: Trust = { trusted: false, reason: 'target changed since the last run (size or mtime differ from the manifest)' };
  if (strict && !sameTimes) return changed;
  // An intent that lists no block and no resize: nothing was written, so the target's mtime must still match.
  const wroteSomething = intent?.blocks?.size !== 0 || Number(target.size) !== h.targetSize;
  if (intent && intent.baseChecksum.equals(m.checksum) && wroteSomething) {
    if (!intent.sameBoot || !intent.blocks) return { trusted: false, reason: 'an interrupted run cannot be bounded (reboot since, or too many blocks)' };
    const sizes = [h.targetSize, intent.oldSize, intent.newSize];
    if (!sizes.includes(Number(target.size))) return { trusted: false, reason: 'target size changed behind qsync' };
    return {
      trusted: true,
      reason: `resuming an interrupted run (${intent.blocks.size} blocks to re-check)`,
      unknown: intent.blocks,
      unknownFrom: Math.floor(Math.min(...sizes) / blockSize),
    };
  }
  return sameTimes ? { trusted: true } : changed;
}
