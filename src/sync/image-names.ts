/**
 * What image mode names after a DEST and a disk (docs/IMAGE-MODE.md "Names
 * and state"): the prefixes of qsync's bitmaps and temp objects in QEMU, and
 * the move of a target from the name older versions gave it (the device id,
 * e.g. vda.raw) to the one it has now (the image file's, e.g. web.raw).
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { Dir } from '../io/safe-fs.js';
import { listBitmaps, type Drive } from '../qemu/block.js';
import type { QmpAction, QmpClient } from '../qemu/qmp.js';
import type { SyncHooks } from './events.js';
import { imageStatePath, readImageState, removeImageState, writeImageState } from './image-state.js';
import { manifestPathFor } from './manifest-store.js';
import { withStateParent } from './state-dir.js';

const tag = (s: string): string => createHash('sha256').update(s).digest('hex').slice(0, 12);

/** Bitmap names are per target: `qsync-<hash of DEST and disk>-<n>`; others are never touched. */
export const bitmapPrefix = (dest: string, name: string): string => `qsync-${tag(`${dest}\0${name}`)}-`;

/** Temp objects of one run (overlay nodes and files, jobs, exports, NBD socket): `qsync-<hash of DEST>-`. */
export const destPrefix = (dest: string): string => `qsync-${tag(dest)}-`;

/** Every prefix a run for `dest` may have left objects under in QEMU: the DEST's, and each disk's (older versions). */
export const leftoverPrefixes = (dest: string, drives: Drive[]): string[] =>
  [destPrefix(dest), ...drives.flatMap((d) => [bitmapPrefix(dest, d.name), bitmapPrefix(dest, d.legacy)])];

/**
 * A target an older qsync wrote under the disk's device name (DEST/vda.raw)
 * is moved to its name now (DEST/web.raw) with its manifest, state and
 * bitmaps, so that its next run is incremental, not a second full copy.
 * Every step can be repeated: a run killed halfway finishes the move next
 * time (the target is renamed last; until then the old name is the trigger).
 * Skipped when the old name is another disk's name now, or the new one is taken.
 */
export async function adoptLegacyTarget(qmp: QmpClient, dest: string, drive: Drive, names: Set<string>, hooks: SyncHooks): Promise<void> {
  const { legacy, name, node } = drive;
  if (legacy === name || names.has(legacy)) return;
  const [oldRel, newRel] = [`${legacy}.raw`, `${name}.raw`];
  const dir = await Dir.open(dest);
  try {
    if (!(await dir.lstatOrUndefined(oldRel))?.isFile() || (await dir.lstatOrUndefined(newRel))) return;
    const [oldP, newP] = [bitmapPrefix(dest, legacy), bitmapPrefix(dest, name)];
    const renamed = (b: string): string => (b.startsWith(oldP) ? newP + b.slice(oldP.length) : b);
    // Bitmaps cannot be renamed: each is copied under the new name and dropped, in one transaction (no write falls between).
    const moves = (await listBitmaps(qmp, node)).filter((b) => b.name.startsWith(oldP));
    if (moves.length) {
      const actions = moves.flatMap((b): QmpAction[] => [
        { type: 'block-dirty-bitmap-add', data: { node, name: renamed(b.name), persistent: b.persistent, granularity: b.granularity, disabled: !b.recording } },
        { type: 'block-dirty-bitmap-merge', data: { node, target: renamed(b.name), bitmaps: [b.name] } },
        { type: 'block-dirty-bitmap-remove', data: { node, name: b.name } },
      ]);
      // An inconsistent bitmap cannot be merged: left as it is, the run goes full and drops it.
      await qmp.transaction(actions).catch(() => {});
    }
    const oldState = imageStatePath(dest, legacy);
    const state = await readImageState(oldState);
    if (state) await writeImageState(imageStatePath(dest, name), { ...state, bitmap: renamed(state.bitmap) });
    await removeImageState(oldState);
    const [oldM, newM] = [manifestPathFor(dest, oldRel), manifestPathFor(dest, newRel)];
    await withStateParent(oldM, false, async ({ dir: md, name: from }) => {
      const to = newM.slice(newM.lastIndexOf('/') + 1);
      for (const suffix of ['', '.intent', '.journal']) {
        if (await md.lstatOrUndefined(from + suffix)) await md.rename(from + suffix, md, to + suffix);
      }
      await md.sync();
    });
    await dir.rename(oldRel, dir, newRel);
    await dir.sync();
    hooks.notice?.(`${name}: ${oldRel} renamed to ${newRel} (targets are named after the disk's image file now)`, join(dest, newRel));
  } finally {
    await dir.close();
  }
}
