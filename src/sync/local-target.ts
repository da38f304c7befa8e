/**
 * A destination folder on this host as the drivers' Target (src/sync/target.ts):
 * locked for the run (src/sync/lock.ts), its files reached through the
 * folder held by descriptor and opened without following a symlink
 * (src/io/safe-fs.ts), its state in qsync's state folder: the manifest,
 * intent and journal beside each other, and a driver's note (image mode's
 * bitmap record, src/sync/image-state.ts).
 */
import { constants } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { isAbsolute, join, relative, resolve } from 'node:path';
import { errnoOf, errnoText, QsyncError } from '../core/errors.js';
import { LocalFileSink, punchingSink, readUpTo } from '../io/local-file.js';
import { checkName, Dir, fsPath, openBeneathMaking } from '../io/safe-fs.js';
import { imageStatePath, readImageState, removeImageState, writeImageState } from './image-state.js';
import { lockDestination, type DestLock } from './lock.js';
import { manifestPathFor } from './manifest-store.js';
import { fileData, LocalTargetState, type Destination, type OpenData, type Target, type TargetIdentity } from './target.js';

export class LocalDestination implements Destination {
  private constructor(
    readonly root: string,
    private readonly dir: Dir,
    /** Undefined: a folder below a destination whose run holds the lock (the drop-in's domain disks, src/sync/dropin.ts). */
    private readonly lock: DestLock | undefined,
    /** Where the targets' state is kept: that destination's root, and this folder's path below it ('' or 'sub/'). */
    readonly stateAt: { root: string; prefix: string } = { root, prefix: '' },
  ) {}

  get shown(): string {
    return this.root;
  }

  /**
   * The destination folder, made as asked (as rsync makes a missing
   * destination folder), then locked. `within` (qsync --server --restrict
   * DIR): DEST lies below that folder and is reached from it one folder at a
   * time, each made if missing and none through a symlink, so a folder
   * swapped for a symlink after the path was checked leads nowhere else.
   */
  static async open(dest: string, opts: { within?: string } = {}): Promise<LocalDestination> {
    const root = resolve(dest);
    const rel = opts.within === undefined ? undefined : relative(resolve(opts.within), root);
    if (rel !== undefined && (rel === '..' || rel.startsWith('../') || isAbsolute(rel))) throw new QsyncError('USAGE', `${root} is not inside ${opts.within}`, { file: root });
    if (rel === undefined) {
      await mkdir(fsPath(root), { recursive: true }).catch((e) => {
        throw new QsyncError('TARGET', `cannot create destination directory ${root}: ${errnoText(e)}`, { file: root }, { cause: e });
      });
    }
    const lock = await lockDestination(root);
    try {
      return new LocalDestination(root, rel === undefined ? await Dir.open(root, { follow: true }) : await openBeneathMaking(opts.within!, rel), lock);
    } catch (e) {
      await lock.release();
      throw new QsyncError('TARGET', `cannot open destination directory ${root}: ${(e as Error).message}`, { file: root }, { cause: e });
    }
  }

  /**
   * Folder `rel` ('' or 'a/b') of destination `destRoot`, whose lock the
   * caller holds: opened below the root without following a symlink, not
   * locked again; its targets' state is the destination's (`rel/name`).
   */
  static async within(destRoot: string, rel: string, held?: Dir): Promise<LocalDestination> {
    const root = resolve(destRoot, rel);
    let dir: Dir;
    try {
      // The root as the run holds it (`held`: the very folder its walk wrote, whatever its path leads to now; else a symlink
      // given as DEST is followed, as rsync does); nothing below it is.
      const top = held ?? (await Dir.open(resolve(destRoot), { follow: true }));
      dir = await top.openBeneath(rel).finally(() => (held ? undefined : top.close()));
    } catch (e) {
      throw new QsyncError('TARGET', `cannot open destination directory ${root}: ${(e as Error).message}`, { file: root }, { cause: e });
    }
    return new LocalDestination(root, dir, undefined, { root: resolve(destRoot), prefix: rel ? `${rel}/` : '' });
  }

  target(name: string): Target {
    checkName(name);
    return new LocalTarget(this.root, this.dir, name, this.stateAt);
  }

  /** The folder, held: for targets of other kinds (src/sync/qcow2-target.ts). */
  get folder(): Dir {
    return this.dir;
  }

  async close(): Promise<void> {
    await this.dir.close().catch(() => {});
    await this.lock?.release();
  }
}

export class LocalTarget implements Target {
  readonly state: LocalTargetState;
  readonly shown: string;
  private readonly notePath: string;

  /** `stateAt`: where the state is kept (a destination's root, and the path of `root` below it); `manifests`: the manifest folder. */
  constructor(
    root: string,
    protected readonly dir: Dir,
    protected readonly name: string,
    stateAt: { root: string; prefix: string } = { root, prefix: '' },
    manifests: 'manifests' | 'guest' = 'manifests',
  ) {
    this.shown = join(root, name);
    const rel = `${stateAt.prefix}${name}`;
    this.state = new LocalTargetState(manifestPathFor(stateAt.root, rel, manifests));
    this.notePath = imageStatePath(stateAt.root, rel.replace(/\.raw$/, ''));
  }

  async identity(): Promise<TargetIdentity | undefined> {
    const st = await this.dir.lstatOrUndefined(this.name);
    if (st && !st.isFile()) throw new QsyncError('TARGET', `${this.shown} is not a regular file; left alone`, { file: this.shown, hint: 'move it away, or back up into another folder' });
    return st;
  }

  async open(create: boolean): Promise<OpenData> {
    const fh = await (create ? this.dir.createFile(this.name, 0o600) : this.dir.openFile(this.name, constants.O_RDWR)).catch((e) => {
      throw new QsyncError('TARGET', `cannot ${create ? 'create' : 'open'} ${this.shown}: ${errnoOf(e) === 'ELOOP' ? 'it is a symlink (qsync does not follow symlinks in the destination)' : errnoText(e)}`, { file: this.shown }, { cause: e });
    });
    // Zeroed ranges become holes at commit (punched before the fsync), as a guest's trimmed blocks should.
    const file = punchingSink(LocalFileSink.of(fh, this.shown), []);
    return { ...fileData(file), file, reader: { readAt: (buf, offset) => readUpTo(fh, buf, offset) }, close: () => file.close().catch(() => {}) };
  }

  readNote() {
    return readImageState(this.notePath);
  }

  writeNote(n: Parameters<Target['writeNote']>[0]) {
    return writeImageState(this.notePath, n);
  }

  dropNote() {
    return removeImageState(this.notePath);
  }
}
