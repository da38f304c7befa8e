/**
 * `qsync forget DEST --qmp SOCKET|--image FILE [--drive NAME]...`: drop
 * the dirty bitmaps this DEST owns in that QEMU and DEST's image state for
 * those disks. The targets and their manifests stay: the next run is full
 * (it reads every allocated block) but writes only what differs.
 */
import { listBitmaps } from '../qemu/block.js';
import { bitmapPrefix } from './image-names.js';
import { imageStatePath, removeImageState } from './image-state.js';
import { withImageSource, type ImageSourceOptions } from './image-source.js';

export interface Forgotten {
  name: string;
  /** Bitmaps removed from the disk. */
  bitmaps: number;
}

export function forgetImage(opts: ImageSourceOptions): Promise<Forgotten[]> {
  return withImageSource(opts, async ({ qmp, drives, dest }) => {
    const out: Forgotten[] = [];
    for (const d of drives) {
      // The names older versions used too (the device's).
      const names = [...new Set([d.name, d.legacy])];
      const prefixes = names.map((n) => bitmapPrefix(dest, n));
      const ours = (await listBitmaps(qmp, d.node)).filter((b) => prefixes.some((p) => b.name.startsWith(p)));
      for (const b of ours) await qmp.execute('block-dirty-bitmap-remove', { node: d.node, name: b.name });
      for (const n of names) await removeImageState(imageStatePath(dest, n));
      out.push({ name: d.name, bitmaps: ours.length });
    }
    return out;
  });
}
