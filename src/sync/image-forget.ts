/**
 * `qsync forget DEST --qmp SOCKET|--image FILE [--drive NAME]...`: drop
 * the dirty bitmaps this DEST owns in that QEMU and DEST's image state for
 * those disks. The targets and their manifests stay: the next run is full
 * (it reads every allocated block) but writes only what differs.
 */
import { resolve } from 'node:path';
import { listBitmaps } from '../qemu/block.js';
import { DEFAULT_URI, surveyDomain } from '../qemu/libvirt.js';
import { fsPath, lstatOrUndefined } from '../io/safe-fs.js';
import { defaultCopyName, dropCheckpoint, prefixFor } from './domain-backup.js';
import type { SyncHooks } from './events.js';
import { LocalDestination } from './local-target.js';
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

/**
 * `qsync forget DEST --domain NAME [--connect URI]`: delete the libvirt
 * checkpoints DEST owns on that domain (those `--domain` made, or the
 * drop-in line writing into the DEST folder), and DEST's notes of the
 * domain's disks. DEST may be gone: its checkpoints are what would pile up;
 * when it is there it is locked meanwhile, so no run into it is under way.
 * The copies and manifests stay: the next run reads each disk in full and
 * writes only what differs.
 */
export async function forgetDomain(o: { domain: string; connect?: string; dest: string }, hooks: SyncHooks = {}): Promise<string[]> {
  const uri = o.connect ?? DEFAULT_URI;
  const dest = resolve(o.dest);
  const destination = (await lstatOrUndefined(fsPath(dest))) ? await LocalDestination.open(dest) : undefined;
  try {
    // The domain and its checkpoints, asked in one virsh.
    const { domain: dom, checkpoints } = await surveyDomain(uri, o.domain, true);
    const prefix = prefixFor(dest);
    // Newest first: each deletion merges its bitmap into the one before.
    const ours = checkpoints.filter((cp) => cp.startsWith(prefix)).reverse();
    for (const cp of ours) await dropCheckpoint(uri, dom.name, cp, hooks);
    if (destination) for (const d of dom.disks) await destination.target(defaultCopyName(d)).dropNote();
    return ours;
  } finally {
    await destination?.close();
  }
}
