/**
 * File system access that trusts no path between check and use: qsync runs
 * as root over trees that other users own, and any of them may swap a name
 * for a symlink while it runs.
 *
 * Linux has openat(2) and friends; Node does not. The same guarantee comes
 * from holding a directory open (O_DIRECTORY|O_NOFOLLOW) and reaching its
 * entries through `/proc/self/fd/N/NAME`: the kernel resolves the held
 * directory by its descriptor, then looks NAME up in it, and the calls used
 * on such a path never follow NAME itself when it is a symlink (open with
 * O_NOFOLLOW, lstat, lchown, lutimes, mkdir, symlink, unlink, rmdir,
 * rename). Metadata of the entry itself is changed through a descriptor of
 * it: an O_PATH|O_NOFOLLOW descriptor and `/proc/self/fd/M` (the idiom glibc
 * uses for fchmodat(AT_SYMLINK_NOFOLLOW)), so chmod, chown and utimes reach
 * exactly the inode that was checked. docs/RELIABILITY.md has the promises
 * built on this.
 */
import { closeSync, constants, fchmodSync, readdirSync, readlinkSync, fchownSync, fstatSync, futimesSync, lstatSync, openSync, renameSync, type BigIntStats, type PathLike } from 'node:fs';
import { chmod, chown, lchown, lutimes, mkdir, open, rename, rmdir, symlink, unlink, utimes, type FileHandle } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { errnoOf, QsyncError } from '../core/errors.js';
import { fsyncFd } from './syncfs.js';

/** Linux's O_PATH (the same value on x86-64 and arm64); node:fs does not export it. */
export const O_PATH = 0o10000000;
const { O_RDONLY, O_DIRECTORY, O_NOFOLLOW, O_NONBLOCK, O_CREAT, O_EXCL } = constants;

/**
 * lstat a path; undefined when nothing is there. On this thread: an lstat
 * answered from the kernel's caches costs microseconds, a trip through
 * libuv's thread pool ten times that, and a walk makes one or two per entry.
 */
export async function lstatOrUndefined(path: PathLike): Promise<BigIntStats | undefined> {
  return lstatSync(path, { bigint: true, throwIfNoEntry: false });
}

const typeName = (s: BigIntStats): string =>
  s.isFile() ? 'a regular file' : s.isDirectory() ? 'a directory' : s.isSymbolicLink() ? 'a symlink' : s.isFIFO() ? 'a FIFO' : s.isSocket() ? 'a socket' : 'a device';

const oneComponent = (name: string): boolean => !!name && name !== '.' && name !== '..' && !name.includes('/') && !name.includes('\0');

/** A path below a folder, relative: each of its parts a name (not empty, `.` or `..`, no NUL). */
export const isRelPath = (p: string): boolean => p.split('/').every(oneComponent);

/** A name inside one directory: no slash, not `.` or `..`, not empty. */
export function checkName(name: string): string {
  if (!oneComponent(name)) {
    throw new QsyncError('USAGE', `internal: ${JSON.stringify(name)} is not a single path component`);
  }
  return name;
}

/**
 * Names are bytes on Linux and need not be UTF-8. qsync carries a name as a
 * string in which each byte that is not part of valid UTF-8 stands as the
 * lone surrogate U+DC00+byte (Python's "surrogateescape"): valid names are
 * plain strings, and every name maps back to its exact bytes (a valid
 * UTF-8 string never holds a lone surrogate).
 */
const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true });

/** The name for `bytes`: a plain string when valid UTF-8, else with escaped bytes. */
export function decodeName(bytes: Buffer): string {
  try {
    return STRICT_UTF8.decode(bytes);
  } catch {
    let out = '';
    for (let i = 0; i < bytes.length; ) {
      const n = utf8SeqLen(bytes, i);
      if (n > 0) {
        out += bytes.subarray(i, i + n).toString('utf8');
        i += n;
      } else out += String.fromCharCode(0xdc00 + bytes[i++]!);
    }
    return out;
  }
}

/** Length of the valid UTF-8 sequence at `i`, or 0 when the byte there starts none. */
function utf8SeqLen(b: Buffer, i: number): number {
  const c = b[i]!;
  if (c < 0x80) return 1;
  const n = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
  if (n === 0 || i + n > b.length) return 0;
  for (let k = 1; k < n; k++) if ((b[i + k]! & 0xc0) !== 0x80) return 0;
  const second = b[i + 1]!;
  // Overlong forms, surrogates and code points past U+10FFFF are not valid UTF-8.
  if ((c === 0xe0 && second < 0xa0) || (c === 0xed && second >= 0xa0) || (c === 0xf0 && second < 0x90) || (c === 0xf4 && second >= 0x90)) return 0;
  return n;
}

/** An escaped byte: a lone surrogate U+DC80..U+DCFF (with `u`, never half of a valid pair). */
const ESCAPED = /[\u{dc80}-\u{dcff}]/u;

/** The exact bytes of a name or path made by decodeName. */
export function encodeName(name: string): Buffer {
  if (!ESCAPED.test(name)) return Buffer.from(name, 'utf8');
  const parts: Buffer[] = [];
  let run = '';
  for (const ch of name) {
    const code = ch.charCodeAt(0);
    if (ch.length === 1 && code >= 0xdc80 && code <= 0xdcff) {
      parts.push(Buffer.from(run, 'utf8'), Buffer.of(code - 0xdc00));
      run = '';
    } else run += ch;
  }
  parts.push(Buffer.from(run, 'utf8'));
  return Buffer.concat(parts);
}

/** A path for the fs calls: the string itself when it is plain, its bytes when it holds escaped ones. */
/**
 * A name a folder can hold, as a local listing gives it: one component (as
 * checkName), and in the one spelling decodeName gives its bytes (so two
 * names a peer sends never stand for the same file).
 */
export const isEntryName = (name: string): boolean => oneComponent(name) && decodeName(encodeName(name)) === name;

export const fsPath = (path: string): PathLike => (ESCAPED.test(path) ? encodeName(path) : path);

/** Any UTF-16 surrogate: a character past U+FFFF, or an escaped byte. */
const SURROGATE = /[\ud800-\udfff]/;

/**
 * Order of names as rsync sorts them: by their bytes. Without surrogates,
 * UTF-16 order is code point order, which is UTF-8's byte order: the strings
 * are compared as they are (sorting a folder makes no Buffer per comparison).
 */
export const compareNames = (a: string, b: string): number =>
  SURROGATE.test(a) || SURROGATE.test(b) ? Buffer.compare(encodeName(a), encodeName(b)) : a < b ? -1 : a > b ? 1 : 0;

/** A fresh unpredictable name to create beside `name` and rename over it once complete. */
export const tempNameFor = (name: string): string => `.${name.slice(0, 200)}.${randomBytes(6).toString('hex')}.tmp`;

/** Whether `entry` is a name tempNameFor(`name`) gives (a temp file made for `name`). */
export const isTempNameFor = (entry: string, name: string): boolean => {
  const stem = `.${name.slice(0, 200)}.`;
  return entry.length === stem.length + 16 && entry.startsWith(stem) && /^[0-9a-f]{12}\.tmp$/.test(entry.slice(stem.length));
};

/**
 * A directory held open by descriptor; every entry is reached relative to it.
 * Opened, stat'ed and closed on this thread, as entries are lstat'ed: a
 * folder's open is a few microseconds, and a round trip through libuv's
 * thread pool for each of a tree's thousands of folders cost more than the
 * walk itself. The descriptor is closed once; a closed Dir reaches nothing.
 */
export class Dir {
  #fd: number;

  private constructor(
    fd: number,
    /** For messages only: never used to reach the directory again. */
    readonly path: string,
  ) {
    this.#fd = fd;
  }

  /**
   * Open a directory by path. `follow` (the default) lets the last component
   * be a symlink, as a DEST operand given by the user may be; without it a
   * symlink is refused (ELOOP/ENOTDIR).
   */
  static async open(path: string, opts: { follow?: boolean } = {}): Promise<Dir> {
    const flags = O_RDONLY | O_DIRECTORY | (opts.follow === false ? O_NOFOLLOW : 0);
    return new Dir(openSync(fsPath(path), flags), path);
  }

  get fd(): number {
    return this.#fd;
  }

  /** How `name` inside this directory is named in messages (no `//` below `/`). */
  shown(name: string): string {
    return this.path.endsWith('/') ? `${this.path}${name}` : `${this.path}/${name}`;
  }

  /** The path that reaches `name` inside this directory without trusting any other path. */
  at(name: string): string {
    return `/proc/self/fd/${this.#fd}/${checkName(name)}`;
  }

  /** As `at`, as bytes when the name is not valid UTF-8 (what the fs calls below take). */
  ref(name: string): PathLike {
    return fsPath(this.at(name));
  }

  /** This directory itself, by descriptor. */
  get self(): string {
    return `/proc/self/fd/${this.#fd}`;
  }

  /** Open a subdirectory; a symlink in its place is refused. */
  async openDir(name: string): Promise<Dir> {
    return new Dir(openSync(this.ref(name), O_RDONLY | O_DIRECTORY | O_NOFOLLOW), this.shown(name));
  }

  /**
   * Open a subdirectory to pass through (as `cd` does): one the caller may
   * search but not list (mode 0711, say) is held by an O_PATH descriptor,
   * which reaches its entries but cannot list them. A symlink is refused.
   */
  async openPassage(name: string): Promise<Dir> {
    return Dir.passage(this.ref(name), this.shown(name), O_NOFOLLOW);
  }

  /** This directory's parent, as a passage. */
  async parent(): Promise<Dir> {
    return Dir.passage(`${this.self}/..`, `${this.path}/..`, 0);
  }

  private static async passage(path: PathLike, shown: string, extra: number): Promise<Dir> {
    try {
      return new Dir(openSync(path, O_RDONLY | O_DIRECTORY | extra), shown);
    } catch (e) {
      if (errnoOf(e) !== 'EACCES') throw e;
      return new Dir(openSync(path, O_PATH | O_DIRECTORY | extra), shown);
    }
  }

  /** Open a chain of subdirectories (`a/b/c`), none of which may be a symlink. */
  async openBeneath(rel: string): Promise<Dir> {
    const parts = rel.split('/').filter((p) => p && p !== '.');
    let d: Dir = this;
    for (const p of parts) {
      const next = await d.openDir(p);
      if (d !== this) await d.close();
      d = next;
    }
    return d === this ? this.dup() : d;
  }

  /** A second handle on the same directory (closed independently). */
  async dup(): Promise<Dir> {
    return new Dir(openSync(this.self, O_RDONLY | O_DIRECTORY), this.path);
  }

  /** Open `name` as a regular file, never through a symlink, never blocking on a FIFO. */
  async openFile(name: string, flags: number, mode = 0o600): Promise<FileHandle> {
    return openRegular(this.ref(name), flags, mode, this.shown(name));
  }

  /**
   * As openFile, on this thread; returns the descriptor and its fstat (a small
   * file's few syscalls cost less than a thread pool trip each, and its
   * identity check needs no second fstat).
   */
  openFileSync(name: string, flags: number, mode = 0o600): { fd: number; st: BigIntStats } {
    return openRegularSync(this.ref(name), flags, mode, this.shown(name));
  }

  /** As createTemp, on this thread; returns the descriptor. */
  createTempSync(name: string, mode: number): { fd: number; name: string; st: BigIntStats } {
    for (;;) {
      const tmp = tempNameFor(name);
      try {
        return { ...this.openFileSync(tmp, constants.O_RDWR | O_CREAT | O_EXCL, mode), name: tmp };
      } catch (e) {
        if (errnoOf(e) !== 'EEXIST') throw e;
      }
    }
  }

  /** As rename, on this thread. */
  renameSync(from: string, to: Dir, toName: string): void {
    renameSync(this.ref(from), to.ref(toName));
  }

  /** Create `name` (O_EXCL: never an existing file, never a symlink's target) with `mode`. */
  createFile(name: string, mode: number, flags = constants.O_RDWR): Promise<FileHandle> {
    return this.openFile(name, flags | O_CREAT | O_EXCL, mode);
  }

  /** Create a file with a fresh unpredictable name beside `name`; returns it and its name. */
  async createTemp(name: string, mode: number): Promise<{ fh: FileHandle; name: string }> {
    for (;;) {
      const tmp = tempNameFor(name);
      try {
        return { fh: await this.createFile(tmp, mode), name: tmp };
      } catch (e) {
        if (errnoOf(e) !== 'EEXIST') throw e;
      }
    }
  }

  /** On this thread, as lstatOrUndefined. */
  async lstat(name: string): Promise<BigIntStats> {
    return lstatSync(this.ref(name), { bigint: true });
  }

  lstatOrUndefined(name: string): Promise<BigIntStats | undefined> {
    return lstatOrUndefined(this.ref(name));
  }

  /** lstat and lstatOrUndefined without a promise, for a walk's once-per-entry calls. */
  lstatSync(name: string): BigIntStats;
  lstatSync(name: string, missing: 'undefined'): BigIntStats | undefined;
  lstatSync(name: string, missing?: 'undefined'): BigIntStats | undefined {
    return lstatSync(this.ref(name), { bigint: true, throwIfNoEntry: missing === undefined });
  }

  async stat(): Promise<BigIntStats> {
    return fstatSync(this.#fd, { bigint: true });
  }

  /** Entry names, those that are not valid UTF-8 with their bytes escaped (decodeName). */
  async readdir(): Promise<string[]> {
    // Read as UTF-8 first (no Buffer per name: half the cost); a name that is not valid UTF-8 reads as U+FFFD,
    // and then the folder is read again as bytes.
    const names = readdirSync(this.self);
    return names.some((n) => n.includes('\ufffd')) ? (await this.readdirRaw()).map(decodeName) : names;
  }

  /** Entry names as raw bytes (names need not be UTF-8). */
  readdirRaw(): Promise<Buffer[]> {
    return Promise.resolve(readdirSync(this.self, { encoding: 'buffer' }));
  }

  async mkdir(name: string, mode: number): Promise<void> {
    await mkdir(this.ref(name), mode);
  }

  unlink(name: string): Promise<void> {
    return unlink(this.ref(name));
  }

  rmdir(name: string): Promise<void> {
    return rmdir(this.ref(name));
  }

  symlink(target: string, name: string): Promise<void> {
    return symlink(fsPath(target), this.ref(name));
  }

  /** A symlink's target, escaped as names are when it is not valid UTF-8. */
  async readlink(name: string): Promise<string> {
    return decodeName(readlinkSync(this.ref(name), { encoding: 'buffer' }));
  }

  /** rename(2) from this directory to `to` (which may be this one): neither name is followed. */
  rename(from: string, to: Dir, toName: string): Promise<void> {
    return rename(this.ref(from), to.ref(toName));
  }

  /** Owner and group of `name` itself (a symlink's own, never its target's). */
  lchown(name: string, uid: number, gid: number): Promise<void> {
    return lchown(this.ref(name), uid, gid);
  }

  /** Times of `name` itself (a symlink's own, never its target's). */
  lutimes(name: string, atime: number, mtime: number): Promise<void> {
    return lutimes(this.ref(name), atime, mtime);
  }

  /** fsync the directory, so that names created or renamed in it are durable. */
  sync(): Promise<void> {
    return fsyncFd(this.#fd);
  }

  /** Metadata of the directory itself, through its descriptor. */
  /** Owner, mode and times of the folder itself; what it has already (read with fstat, on this thread) is not set again. */
  async setMeta(m: MetaChange): Promise<void> {
    const st = fstatSync(this.#fd, { bigint: true });
    const change = changedMeta(st, m);
    // utimes keeps whole microseconds: a folder already at that microsecond is not timed again.
    if (change.mtime !== undefined && sameMicros(change, st)) change.mtime = change.atime = undefined;
    if (change.uid === undefined && change.gid === undefined && change.mode === undefined && change.mtime === undefined) return;
    return setMetaByFd(this.#fd, change);
  }

  async close(): Promise<void> {
    const fd = this.#fd;
    if (fd < 0) return;
    this.#fd = -1;
    closeSync(fd);
  }
}

/** What to change of an inode; undefined fields are left alone (-1 ids: unchanged). */
export interface MetaChange {
  mode?: number;
  uid?: number;
  gid?: number;
  /** Seconds, as utimes takes them. */
  atime?: number;
  mtime?: number;
}

/**
 * chown, chmod and utimes of the inode behind an open descriptor (any kind:
 * O_PATH included) through `/proc/self/fd/N`, which reaches that inode and
 * no other. Order: owner first (chown clears set-id bits), then mode, then times.
 */
export async function setMetaByFd(fd: number, m: MetaChange): Promise<void> {
  const p = `/proc/self/fd/${fd}`;
  if (m.uid !== undefined || m.gid !== undefined) await chown(p, m.uid ?? -1, m.gid ?? -1);
  if (m.mode !== undefined) await chmod(p, m.mode);
  if (m.mtime !== undefined) await utimes(p, m.atime ?? m.mtime, m.mtime);
}

/**
 * Whether the mtime `m` sets is what `st` has already, to the microsecond
 * (all utimes keeps). The atime is not asked: reading a folder or a symlink
 * moves it (relatime), so comparing it would re-time every folder and link
 * on every run; qsync, as rsync without --atimes, keeps mtimes only.
 */
function sameMicros(m: MetaChange, st: BigIntStats): boolean {
  return m.mtime === undefined || BigInt(Math.floor(m.mtime * 1e6)) === st.mtimeNs / 1000n;
}

/** What of `m` differs from `st` (owner, group, mode: an entry that has them already needs no call). */
function changedMeta(st: BigIntStats, m: MetaChange): MetaChange {
  const out = { ...m };
  if (out.uid !== undefined && BigInt(out.uid) === st.uid) out.uid = undefined;
  if (out.gid !== undefined && BigInt(out.gid) === st.gid) out.gid = undefined;
  // chown clears set-id bits: a mode is only left out when no chown comes before it.
  if (out.mode !== undefined && out.uid === undefined && out.gid === undefined && BigInt(out.mode) === (st.mode & 0o7777n)) out.mode = undefined;
  return out;
}

/**
 * Change the metadata of `name` in `dir`, whatever its type, without
 * following it: symlinks through lchown/lutimes (their mode cannot change),
 * everything else through an O_PATH|O_NOFOLLOW descriptor checked to be of
 * the type `expect` says (so a swapped entry is refused, not changed).
 */
export async function setMetaAt(dir: Dir, name: string, expect: BigIntStats, change: MetaChange): Promise<void> {
  const m = changedMeta(expect, change);
  if (m.uid === undefined && m.gid === undefined && m.mode === undefined && m.mtime === undefined) return;
  if (expect.isSymbolicLink()) {
    const st = await dir.lstat(name);
    if (!st.isSymbolicLink()) throw swapped(dir.shown(name), expect, st);
    if (m.uid !== undefined || m.gid !== undefined) await dir.lchown(name, m.uid ?? -1, m.gid ?? -1);
    if (m.mtime !== undefined && !sameMicros(m, st)) await dir.lutimes(name, m.atime ?? m.mtime, m.mtime);
    return;
  }
  const fh = await open(dir.ref(name), O_PATH | O_NOFOLLOW);
  try {
    const st = await fh.stat({ bigint: true });
    if ((st.mode & 0o170000n) !== (expect.mode & 0o170000n)) throw swapped(dir.shown(name), expect, st);
    await setMetaByFd(fh.fd, m);
  } finally {
    await fh.close();
  }
}

function swapped(path: string, want: BigIntStats, got: BigIntStats): QsyncError {
  return new QsyncError('TARGET', `${path} changed while qsync worked on it: it is now ${typeName(got)}, not ${typeName(want)}; left alone`, { file: path });
}

/**
 * open(2) a path that must name a regular file: O_NOFOLLOW (a symlink as
 * the last component fails with ELOOP) and O_NONBLOCK (a FIFO put in its
 * place does not hang the open), then fstat: anything but a regular file is
 * closed and refused with a message naming what it is.
 */
export async function openRegular(path: PathLike, flags: number, mode = 0o600, shown = String(path)): Promise<FileHandle> {
  let fh: FileHandle;
  try {
    fh = await open(path, flags | O_NOFOLLOW | O_NONBLOCK, mode);
  } catch (e) {
    if (errnoOf(e) === 'ELOOP') {
      throw new QsyncError('IO', `${shown} is a symlink: qsync does not follow symlinks here; remove it`, { file: shown }, { cause: e });
    }
    throw e;
  }
  const st = await fh.stat({ bigint: true });
  if (!st.isFile()) {
    await fh.close();
    throw new QsyncError('IO', `${shown} is ${typeName(st)}, not a regular file; remove it`, { file: shown });
  }
  return fh;
}

/**
 * Folder `rel` below `top` (qsync --server --restrict DIR: `top` is DIR,
 * reached as its path says), each folder on the way made if missing (0777
 * less the umask, as mkdir -p) and none followed if it is a symlink: a
 * folder swapped for one after the path was checked leads nowhere else.
 */
export async function openBeneathMaking(top: string, rel: string): Promise<Dir> {
  let d = await Dir.open(top, { follow: true });
  try {
    for (const name of rel.split('/').filter((c) => c && c !== '.')) {
      await d.mkdir(name, 0o777).catch((e) => {
        if (errnoOf(e) !== 'EEXIST') throw e;
      });
      const next = await d.openDir(name).catch((e) => {
        if (errnoOf(e) === 'ELOOP' || errnoOf(e) === 'ENOTDIR') throw new QsyncError('USAGE', `${d.shown(name)} is not a folder (a symlink on the way is refused here)`, { file: d.shown(name) });
        throw e;
      });
      await d.close();
      d = next;
    }
    return d;
  } catch (e) {
    await d.close();
    throw e;
  }
}

/** As openRegular, on this thread; returns the descriptor and the fstat that checked it. */
export function openRegularSync(path: PathLike, flags: number, mode = 0o600, shown = String(path)): { fd: number; st: BigIntStats } {
  let fd: number;
  try {
    fd = openSync(path, flags | O_NOFOLLOW | O_NONBLOCK, mode);
  } catch (e) {
    if (errnoOf(e) === 'ELOOP') {
      throw new QsyncError('IO', `${shown} is a symlink: qsync does not follow symlinks here; remove it`, { file: shown }, { cause: e });
    }
    throw e;
  }
  const st = fstatSync(fd, { bigint: true });
  if (!st.isFile()) {
    closeSync(fd);
    throw new QsyncError('IO', `${shown} is ${typeName(st)}, not a regular file; remove it`, { file: shown });
  }
  return { fd, st };
}

/** setMetaByFd for a descriptor of a regular file opened for reading or writing, on this thread (fchown, fchmod, futimes). */
export function setFileMetaSync(fd: number, m: MetaChange): void {
  if (m.uid !== undefined || m.gid !== undefined) fchownSync(fd, m.uid ?? -1, m.gid ?? -1);
  if (m.mode !== undefined) fchmodSync(fd, m.mode);
  if (m.mtime !== undefined) futimesSync(fd, m.atime ?? m.mtime, m.mtime);
}

/** The parent directory and last name of an absolute or relative path. */
export function splitPath(path: string): { dir: string; name: string } {
  const trimmed = path.replace(/\/+$/, '') || '/';
  const i = trimmed.lastIndexOf('/');
  if (i < 0) return { dir: '.', name: trimmed };
  return { dir: trimmed.slice(0, i) || '/', name: trimmed.slice(i + 1) };
}

/**
 * Remove `name` in `dir` and, when it is a directory, everything below it,
 * walking by descriptors: each folder is opened O_NOFOLLOW through its
 * parent, so a folder swapped for a symlink is unlinked, never followed.
 * Holds one descriptor per level (the depth of the tree, not its width).
 */
export async function removeTreeAt(dir: Dir, name: string): Promise<void> {
  let sub: Dir;
  try {
    sub = await dir.openDir(name);
  } catch (e) {
    const errno = errnoOf(e);
    if (errno === 'ENOENT') return;
    if (errno !== 'ENOTDIR' && errno !== 'ELOOP') throw e;
    return dir.unlink(name).catch((u) => {
      if (errnoOf(u) !== 'ENOENT') throw u;
    });
  }
  try {
    for (const n of await sub.readdir()) await removeTreeAt(sub, n);
  } finally {
    await sub.close();
  }
  await dir.rmdir(name).catch((e) => {
    if (errnoOf(e) !== 'ENOENT') throw e;
  });
}

/** At most this many symlinks are followed resolving one path (Linux's MAXSYMLINKS). */
const MAX_LINKS = 40;

/**
 * Resolve a path root was given (an exclude file, a batch file) to its
 * folder, held open, and its last name, one component at a time. A symlink
 * on the way is followed only when root or the caller owns it (the owner of
 * a symlink decides where it points), and only if it was not replaced while
 * read; any other symlink is refused, so a user cannot point root's reads or
 * writes into a folder of their choosing. `followLast`: a symlink as the last
 * component is resolved too (to read through it); without it the last name
 * is returned as is (to create or replace it, which never follows it).
 */
export async function resolveTrusted(path: string, followLast: boolean, opts: { guarded?: boolean } = {}): Promise<{ dir: Dir; name: string }> {
  const me = BigInt(process.getuid?.() ?? 0);
  const parts = (p: string) => p.split('/').filter((s) => s && s !== '.').reverse();
  const todo = parts(path);
  let dir = await Dir.open(path.startsWith('/') ? '/' : '.');
  let links = 0;
  const moveTo = async (next: Dir) => {
    await dir.close();
    dir = next;
    if (opts.guarded) checkGuarded(await dir.stat(), dir.path, path, me);
  };
  try {
    if (opts.guarded) checkGuarded(await dir.stat(), dir.path, path, me);
    for (;;) {
      const name = todo.pop();
      if (name === undefined) throw new QsyncError('USAGE', `${path} is a folder, not a file name`, { file: path });
      if (name === '..') {
        await moveTo(await dir.parent());
        continue;
      }
      const last = todo.length === 0;
      const st = await dir.lstatOrUndefined(name);
      if (st?.isSymbolicLink() && (followLast || !last)) {
        const shown = dir.shown(name);
        if (st.uid !== 0n && st.uid !== me) {
          throw new QsyncError('USAGE', `${path}: ${shown} is a symlink owned by uid ${st.uid}; qsync (uid ${me}) follows only symlinks that root or uid ${me} own`, {
            file: path,
            hint: 'give the path it points to, if that is what you mean',
          });
        }
        if (++links > MAX_LINKS) throw new QsyncError('USAGE', `${path}: too many levels of symlinks`, { file: path });
        const target = await dir.readlink(name);
        const again = await dir.lstat(name);
        if (again.ino !== st.ino || again.ctimeNs !== st.ctimeNs) {
          throw new QsyncError('USAGE', `${path}: ${shown} changed while qsync read it; left alone`, { file: path });
        }
        if (target.startsWith('/')) await moveTo(await Dir.open('/'));
        todo.push(...parts(target));
        continue;
      }
      if (last) return { dir, name };
      await moveTo(await dir.openPassage(name));
    }
  } catch (e) {
    await dir.close();
    throw e;
  }
}

/**
 * resolveTrusted's `guarded` walk (to qsync's state base): every folder
 * passed must be one that only root or the caller can change, owned by one
 * of them and writable by no one else unless sticky (as /tmp is: there no
 * one renames what another made). Whoever can write a folder on the way
 * could rename what lies below it and put something else there.
 */
function checkGuarded(st: BigIntStats, shown: string, path: string, me: bigint): void {
  if (st.uid !== 0n && st.uid !== me) {
    throw new QsyncError('USAGE', `${path}: ${shown} belongs to uid ${st.uid}, who could replace what qsync (uid ${me}) keeps below it`, {
      file: path,
      hint: 'give a --state-dir whose folders only root or you can change',
    });
  }
  if (st.mode & 0o022n && !(st.mode & 0o1000n)) {
    throw new QsyncError('USAGE', `${path}: ${shown} is writable by other users (mode ${(st.mode & 0o7777n).toString(8)}), who could replace what qsync keeps below it`, {
      file: path,
      hint: 'give a --state-dir whose folders only root or you can change',
    });
  }
}

/**
 * A directory qsync keeps its own files in (a state folder, a history
 * folder) must be a real directory owned by the user qsync runs as: a
 * symlink, or a folder another user owns, could steer qsync's writes or
 * feed it forged state. Returns false when nothing is there.
 */
export async function checkOwnDir(path: string, what: string): Promise<boolean> {
  const st = await lstatOrUndefined(path);
  if (!st) return false;
  checkOwnStat(st, path, what);
  return true;
}

/** checkOwnDir's test on a stat already taken (of a directory held open, say). */
export function checkOwnStat(st: BigIntStats, path: string, what: string): void {
  if (!st.isDirectory()) {
    throw new QsyncError('TARGET', `${what} ${path} is ${typeName(st)}, not a directory: qsync does not follow it`, { file: path, hint: 'remove it, or give a real directory' });
  }
  const uid = process.geteuid?.();
  if (uid !== undefined && st.uid !== BigInt(uid)) {
    throw new QsyncError('TARGET', `${what} ${path} belongs to uid ${st.uid}, not to the user qsync runs as (${uid}): refused`, { file: path, hint: 'remove it, or run qsync as its owner' });
  }
}
