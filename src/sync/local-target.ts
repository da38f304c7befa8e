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
import { join, resolve } from 'node:path';
import { errnoOf, errnoText, QsyncError } from '../core/errors.js';
import { LocalFileSink, punchingSink, readUpTo } from '../io/local-file.js';
import { checkName, Dir, fsPath } from '../io/safe-fs.js';
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
  ) {}

  get shown(): string {
    return this.root;
  }

  /** The destination folder, made as asked (as rsync makes a missing destination folder), then locked. */
  static async open(dest: string): Promise<LocalDestination> {
    const root = resolve(dest);
    await mkdir(fsPath(root), { recursive: true }).catch((e) => {
      throw new QsyncError('TARGET', `cannot create destination directory ${root}: ${errnoText(e)}`, { file: root }, { cause: e });
    });
    const lock = await lockDestination(root);
    try {
      return new LocalDestination(root, await Dir.open(root, { follow: true }), lock);
    } catch (e) {
      await lock.release();
      throw new QsyncError('TARGET', `cannot open destination directory ${root}: ${(e as Error).message}`, { file: root }, { cause: e });
    }
  }

  /** A folder inside a destination the caller has locked: opened, not locked again. */
  static async within(folder: string): Promise<LocalDestination> {
    const root = resolve(folder);
    const dir = await Dir.open(root).catch((e) => {
      throw new QsyncError('TARGET', `cannot open destination directory ${root}: ${(e as Error).message}`, { file: root }, { cause: e });
    });
    return new LocalDestination(root, dir, undefined);
  }

  target(name: string): Target {
    checkName(name);
    return new LocalTarget(this.root, this.dir, name);
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

  constructor(
    root: string,
    protected readonly dir: Dir,
    protected readonly name: string,
  ) {
    this.shown = join(root, name);
    this.state = new LocalTargetState(manifestPathFor(root, name));
    this.notePath = imageStatePath(root, name.replace(/\.raw$/, ''));
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
