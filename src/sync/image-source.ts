/**
 * The start every image-mode command shares: DEST locked, the QEMU reached
 * (a running one over `--qmp`, or a private qemu-storage-daemon serving
 * `--image`), and what a killed run left for this DEST, for every disk, taken
 * away before anything else is done (docs/IMAGE-MODE.md).
 */
import os from 'node:os';
import { resolve } from 'node:path';
import { QsyncError } from '../core/errors.js';
import { findDrives, type Drive } from '../qemu/block.js';
import { removeLeftovers } from '../qemu/fleece.js';
import { serveImage, type ServedImage } from '../qemu/offline.js';
import { QmpClient } from '../qemu/qmp.js';
import { leftoverPrefixes } from './image-names.js';
import { LocalDestination } from './local-target.js';
import type { Destination } from './target.js';

export interface ImageSourceOptions {
  /** QMP socket of a running QEMU or qemu-storage-daemon (`--qmp`): a path, `unix:PATH` or `tcp:HOST:PORT`. */
  qmp?: string;
  /** An image no VM has open (`--image`). Exactly one of qmp/image. */
  image?: string;
  /** `--drive NAME` (repeatable): node-name, drive id or device id. Default: every disk. */
  drives?: string[];
  dest: string;
  /**
   * Where the targets are: a destination already opened (a remote one), else
   * DEST on this host, made and locked here. `dest` then only keys the
   * bitmaps' names.
   */
  destination?: Destination;
  /** Where the fleece overlays and NBD socket go; QEMU must be able to write there. Default os.tmpdir(). */
  tempDir?: string;
}

export interface ImageSource {
  qmp: QmpClient;
  /** The QMP address connected to. */
  address: string;
  /** The selected disks (each once). */
  drives: Drive[];
  /** DEST as the bitmaps' names are keyed: its real path here, or `host:path` as given. */
  dest: string;
  destination: Destination;
  tempDir: string;
}

export async function withImageSource<T>(opts: ImageSourceOptions, fn: (src: ImageSource) => Promise<T>): Promise<T> {
  if (!!opts.qmp === !!opts.image) throw new QsyncError('USAGE', 'image mode needs exactly one of --qmp SOCKET or --image FILE');
  const dest = opts.destination ? opts.dest : resolve(opts.dest);
  const tempDir = opts.tempDir ?? os.tmpdir();
  // DEST is the user's folder, made as asked (as rsync makes a missing destination folder), and locked.
  const destination = opts.destination ?? (await LocalDestination.open(dest));
  let served: ServedImage | undefined;
  try {
    served = opts.image ? await serveImage(opts.image, tempDir) : undefined;
    const address = served?.qmp ?? opts.qmp!;
    const qmp = await QmpClient.connect(address);
    try {
      // A backup job leaves a filter node above its disk: the disks are looked up again after.
      await removeLeftovers(qmp, leftoverPrefixes(dest, await findDrives(qmp)), tempDir);
      const drives = [...new Map((await findDrives(qmp, opts.drives)).map((d) => [d.node, d])).values()];
      if (!drives.length) throw new QsyncError('SOURCE', 'QEMU has no disk to back up');
      return await fn({ qmp, address, drives, dest, destination, tempDir });
    } finally {
      await qmp.close();
    }
  } finally {
    await served?.stop();
    if (!opts.destination) await destination.close();
  }
}
