/**
 * qsync's state (manifests, journals, intents, the lock, image state, digest
 * scratch) lives outside the destination, in a state folder of qsync's own:
 * `--state-dir DIR`, else `$QSYNC_STATE_DIR`, else `/var/lib/qsync` for root
 * and `$XDG_STATE_HOME/qsync` (`~/.local/state/qsync`) for other users. Each
 * destination gets `BASE/dest/<name>-<hash>/`, keyed by the destination's
 * real path (symlinks resolved), so DEST holds the mirror and nothing else
 * (docs/FORMATS.md "State folder").
 *
 * Nothing in it is reached by trusting a path. The base is reached following
 * only symlinks that root or the caller own, through folders no other user
 * can change (resolveTrusted's guarded walk); from the base
 * down every folder is opened by descriptor with O_NOFOLLOW, created 0700
 * when missing, and must belong to the user running qsync and be writable by
 * no one else; every state file is opened O_NOFOLLOW|O_NONBLOCK, must be a
 * regular file of that user, and is created 0600 under an unpredictable temp
 * name (O_EXCL) before it is renamed into place. A state path that is a
 * symlink, a FIFO, a device, a folder or someone else's is refused with a
 * message naming it, never followed, never waited on.
 *
 * A path outside the base (a `--manifest PATH` of the user's) follows its
 * folders as given, except another user's symlink (resolveTrusted), and only
 * its last component is held to the rules above.
 */
import { createHash } from 'node:crypto';
import { constants, realpathSync, type BigIntStats } from 'node:fs';
import { mkdir, type FileHandle } from 'node:fs/promises';
import { homedir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { errnoOf, errnoText, QsyncError } from '../core/errors.js';
import { readUpTo } from '../io/local-file.js';
import { decodeName, Dir, encodeName, fsPath, resolveTrusted, splitPath } from '../io/safe-fs.js';

export const STATE_DIR_MODE = 0o700;
export const STATE_FILE_MODE = 0o600;

/** The folder holding a state file (held open by descriptor) and the file's name in it. */
export interface StateParent {
  dir: Dir;
  name: string;
  /** For messages only. */
  path: string;
  /** Done with `dir` (it may stay open for the next state file in that folder). */
  release(): Promise<void>;
}

const euid = (): number => process.geteuid?.() ?? 0;

let baseOverride: string | undefined;
const folderCache = new Map<string, string>();

/** `--state-dir DIR`: where this process keeps state (undefined: the default). */
export function setStateBase(dir: string | undefined): void {
  // resolve('') is the current folder: an unset variable in a script (--state-dir "$DIR") would put state wherever one stands.
  if (dir === '') throw new QsyncError('USAGE', '--state-dir needs a folder: it was given an empty name', { option: '--state-dir' });
  baseOverride = dir === undefined ? undefined : resolve(dir);
  folderCache.clear();
}

/** The folder under which qsync keeps the state of every destination (see the module comment). */
export function stateBase(): string {
  if (baseOverride !== undefined) return baseOverride;
  const env = process.env.QSYNC_STATE_DIR;
  if (env) return resolve(env);
  if (euid() === 0) return '/var/lib/qsync';
  // The XDG base directory rules: a relative XDG_STATE_HOME is ignored.
  const xdg = process.env.XDG_STATE_HOME;
  return join(xdg?.startsWith('/') ? xdg : join(process.env.HOME || homedir(), '.local', 'state'), 'qsync');
}

/** A path with symlinks resolved; the part that does not exist yet is kept as given. */
function realOrPlanned(path: string): string {
  try {
    return decodeName(realpathSync(fsPath(path), { encoding: 'buffer' }));
  } catch (e) {
    const errno = errnoOf(e);
    if (errno !== 'ENOENT' && errno !== 'ENOTDIR') throw e;
    const up = dirname(path);
    return up === path ? path : join(realOrPlanned(up), basename(path));
  }
}

/**
 * The state folder of the destination rooted at `destRoot` (a sync's DEST
 * folder, or the folder holding a single-file DEST): `BASE/dest/NAME-HASH`,
 * HASH naming the destination's real path, so the same folder reached
 * through a symlink shares its state, and NAME (its last component, plain
 * characters only) helps a person find it.
 */
export function stateFolderFor(destRoot: string): string {
  const abs = resolve(destRoot);
  const base = stateBase();
  const key = `${base}\0${abs}`;
  const known = folderCache.get(key);
  if (known !== undefined) return known;
  const folder = stateFolderIn(base, abs);
  folderCache.set(key, folder);
  return folder;
}

/** stateFolderFor under a given base. */
export function stateFolderIn(base: string, destRoot: string): string {
  const real = realOrPlanned(resolve(destRoot));
  const hash = createHash('sha256').update(encodeName(real)).digest('hex').slice(0, 24);
  const name = basename(real).replace(/[^A-Za-z0-9._-]/g, '_').replace(/^\.+/, '').slice(0, 40) || 'root';
  return join(base, 'dest', `${name}-${hash}`);
}

const isWithin = (path: string, folder: string): boolean => path === folder || path.startsWith(folder.endsWith('/') ? folder : `${folder}/`);

/** Whether the state base lies in the folder `destRoot` (real paths): making the state folder makes the folders above it. */
export const stateBaseWithin = (destRoot: string): boolean => isWithin(realOrPlanned(stateBase()), realOrPlanned(resolve(destRoot)));

/** Refuse state that another user owns: they could have planted anything in it. */
export function checkOwner(st: BigIntStats, shown: string): void {
  const me = euid();
  if (st.uid !== BigInt(me)) {
    throw new QsyncError('IO', `${shown} belongs to uid ${st.uid}, not to the user running qsync (uid ${me}): qsync does not use state it did not write`, {
      file: shown,
      hint: `remove ${shown}, or run qsync as its owner`,
    });
  }
}

const notAFolder = (shown: string, e: unknown): QsyncError =>
  new QsyncError('IO', `${shown} is a symlink or not a folder: qsync keeps its state only in real folders it owns; remove it`, { file: shown }, { cause: e });

/** Open a state folder below `parent` (created 0700 with `create`), checked to be ours and private. */
async function openStateFolder(parent: Dir, name: string, create: boolean): Promise<Dir | undefined> {
  const shown = parent.shown(name);
  let d: Dir;
  try {
    d = await parent.openDir(name);
  } catch (e) {
    const errno = errnoOf(e);
    if (errno === 'ELOOP' || errno === 'ENOTDIR') throw notAFolder(shown, e);
    if (errno !== 'ENOENT') throw e;
    if (!create) return undefined;
    await parent.mkdir(name, STATE_DIR_MODE).catch((e2) => {
      if (errnoOf(e2) === 'EEXIST') return;
      throw new QsyncError('IO', `cannot create qsync's state folder ${shown}: ${errnoText(e2)}`, { file: shown, hint: 'give a writable folder of yours with --state-dir DIR' }, { cause: e2 });
    });
    d = await parent.openDir(name).catch((e2) => {
      throw errnoOf(e2) === 'ELOOP' || errnoOf(e2) === 'ENOTDIR' ? notAFolder(shown, e2) : e2;
    });
  }
  try {
    const st = await d.stat();
    checkOwner(st, shown);
    if (st.mode & 0o022n) {
      throw new QsyncError('IO', `${shown} is writable by other users (mode ${(st.mode & 0o7777n).toString(8)}): qsync does not use state others could have planted`, {
        file: shown,
        hint: `remove ${shown} (qsync makes a new one, 0700)`,
      });
    }
    // Folders from older versions were 0755: the digests they hold tell what the files contain.
    // Only a run that writes state tightens them: readers (qsync verify) change nothing.
    if (create && (Number(st.mode) & 0o077) !== 0) await d.setMeta({ mode: STATE_DIR_MODE });
    return d;
  } catch (e) {
    await d.close();
    throw e;
  }
}

/**
 * Check the state folder of a destination once, before anything is written
 * to it: every folder from the base down a real folder owned by the user
 * running qsync and writable by no one else (a symlink or another user's
 * folder would let that user steer root's writes); missing ones are created
 * 0700 unless `create` is false (-n).
 */
export async function checkStateRoot(destRoot: string, create: boolean): Promise<void> {
  const folder = stateFolderFor(destRoot);
  // A mirror inside the base would hold qsync's state (its `dest` folder may even be the base's own).
  if (isWithin(realOrPlanned(resolve(destRoot)), realOrPlanned(stateBase()))) {
    throw new QsyncError('USAGE', `destination ${destRoot} is inside qsync's state folder ${stateBase()}: the mirror and qsync's state must be kept apart`, {
      file: destRoot,
      hint: 'give a --state-dir outside the destination, or another destination',
    });
  }
  try {
    await (await openStateParent(join(folder, 'lock'), create))?.release();
  } catch (e) {
    if (e instanceof QsyncError) throw e;
    throw new QsyncError('IO', `cannot use qsync's state folder ${folder}: ${(e as Error).message}`, {
      file: folder,
      hint: 'give a writable folder of yours with --state-dir DIR',
    }, { cause: e });
  }
}

/**
 * The state base's identity, when it exists: a tree walk passes it by (never
 * copied from a source, never deleted from a destination: qsync writes in it
 * as it runs). Reached as the state is, through no other user's symlink.
 */
export async function stateBaseIdentity(): Promise<{ dev: bigint; ino: bigint } | undefined> {
  let at: { dir: Dir; name: string };
  try {
    at = await resolveTrusted(stateBase(), true);
  } catch (e) {
    if (errnoOf(e) === 'ENOENT' || errnoOf(e) === 'ENOTDIR') return undefined;
    throw e;
  }
  try {
    const st = await at.dir.lstatOrUndefined(at.name);
    return st?.isDirectory() ? { dev: st.dev, ino: st.ino } : undefined;
  } finally {
    await at.dir.close();
  }
}

/**
 * Folders already walked and checked, held open by descriptor, so that the
 * several state files of one target (manifest, intent, journal) and the
 * targets of one folder cost no new walk: a few folders, least recently used
 * first; one in use is never closed. A folder of ours cannot be changed by
 * another user, and the descriptor keeps naming it whatever happens to the
 * path; one that was deleted (no links left) is walked again.
 */
const held = new Map<string, { dir: Dir; refs: number }>();
const HELD_MAX = 32;

async function evictIdle(): Promise<void> {
  for (const [key, h] of held) {
    if (held.size <= HELD_MAX) return;
    if (h.refs > 0) continue;
    held.delete(key);
    await h.dir.close().catch(() => {});
  }
}

function lease(key: string, dir: Dir, name: string, path: string): StateParent {
  const h = held.get(key)!;
  h.refs++;
  let done = false;
  return {
    dir,
    name,
    path,
    release: async () => {
      if (done) return;
      done = true;
      h.refs--;
      if (held.get(key) !== h && h.refs === 0) await dir.close();
      else await evictIdle();
    },
  };
}

/**
 * Open the folder that holds the state file `path`, by descriptor, walking
 * from the destination root (see the module comment). Undefined when a
 * folder on the way is missing and `create` is false.
 */
export async function openStateParent(path: string, create: true): Promise<StateParent>;
export async function openStateParent(path: string, create: boolean): Promise<StateParent | undefined>;
export async function openStateParent(path: string, create: boolean): Promise<StateParent | undefined> {
  const base = stateBase();
  const inBase = path.startsWith(`${base}/`);
  let rootPath: string;
  let walk: string[];
  let name: string;
  if (!inBase) {
    ({ dir: rootPath, name } = splitPath(path));
    walk = [];
  } else {
    const parts = path.slice(base.length + 1).split('/');
    rootPath = base;
    walk = parts.slice(0, -1).filter((p) => p && p !== '.');
    name = parts[parts.length - 1];
  }
  // Walks that may create (and tighten) folders are kept apart from read-only ones.
  const key = `${create ? 'w' : 'r'}\0${rootPath}\0${walk.join('/')}`;
  const cached = held.get(key);
  if (cached) {
    if ((await cached.dir.stat()).nlink > 0n) {
      held.delete(key);
      held.set(key, cached); // most recently used last
      return lease(key, cached.dir, name, path);
    }
    held.delete(key);
    if (cached.refs === 0) await cached.dir.close();
  }
  // A --manifest PATH of the user's is reached as a --write-batch path is: through no other user's symlink.
  // So is the state base (an admin may have made /var/lib/qsync a symlink); from it down nothing is followed.
  const openRoot = async (): Promise<Dir | undefined> => {
    if (!inBase) return (await resolveTrusted(path, false)).dir;
    const { dir: parent, name: last } = await resolveTrusted(base, true, { guarded: true });
    try {
      return await openStateFolder(parent, last, create);
    } finally {
      await parent.close();
    }
  };
  let d: Dir | undefined;
  try {
    d = await openRoot();
  } catch (e) {
    if (errnoOf(e) !== 'ENOENT') throw e;
    if (!create) return undefined;
    // A --manifest PATH folder, or the folders above the state base (~/.local/state), that do not exist yet.
    await mkdir(inBase ? dirname(base) : rootPath, { recursive: true, mode: STATE_DIR_MODE }).catch((e2) => {
      throw new QsyncError('IO', `cannot create ${inBase ? `qsync's state folder ${base}` : rootPath}: ${(e2 as Error).message}`, {
        file: inBase ? base : rootPath,
        hint: inBase ? 'give a folder of yours with --state-dir DIR' : undefined,
      });
    });
    d = await openRoot();
  }
  if (!d) return undefined;
  for (const p of walk) {
    let next: Dir | undefined;
    try {
      next = await openStateFolder(d, p, create);
    } finally {
      await d.close();
    }
    if (!next) return undefined;
    d = next;
  }
  if (held.has(key)) {
    // Walked twice at once: keep the first.
    await d.close();
    return lease(key, held.get(key)!.dir, name, path);
  }
  held.set(key, { dir: d, refs: 0 });
  const sp = lease(key, d, name, path);
  await evictIdle();
  return sp;
}

/** Run `fn` with the state file's folder held open; undefined (fn not run) when the folder is missing and `create` is false. */
export async function withStateParent<T>(path: string, create: boolean, fn: (sp: StateParent) => Promise<T>): Promise<T | undefined> {
  const sp = await openStateParent(path, create);
  if (!sp) return undefined;
  try {
    return await fn(sp);
  } finally {
    await sp.release();
  }
}

/**
 * Open state file `name` in `dir`: never through a symlink, never blocking
 * on a FIFO, a regular file of ours or a clear error. Undefined when it does
 * not exist (and `flags` has no O_CREAT).
 */
export async function openStateFile(dir: Dir, name: string, flags: number): Promise<FileHandle | undefined> {
  const shown = dir.shown(name);
  let fh: FileHandle;
  try {
    fh = await dir.openFile(name, flags, STATE_FILE_MODE);
  } catch (e) {
    const errno = errnoOf(e);
    if (errno === 'ENOENT') return undefined;
    if (errno === 'EISDIR') throw new QsyncError('IO', `${shown} is a directory, not a regular file; remove it`, { file: shown }, { cause: e });
    // O_WRONLY|O_NONBLOCK on a FIFO without a reader.
    if (errno === 'ENXIO') throw new QsyncError('IO', `${shown} is a FIFO or a device, not a regular file; remove it`, { file: shown }, { cause: e });
    if (errno === 'ENOTDIR') throw notAFolder(shown, e);
    throw e;
  }
  try {
    checkOwner(await fh.stat({ bigint: true }), shown);
    return fh;
  } catch (e) {
    await fh.close();
    throw e;
  }
}

/** The first `max` bytes of a state file (never more: its size is bounded before reading) and its size; undefined when absent. */
export async function readStateFile(dir: Dir, name: string, max: number): Promise<{ data: Buffer; size: number } | undefined> {
  const fh = await openStateFile(dir, name, constants.O_RDONLY);
  if (!fh) return undefined;
  try {
    const { size } = await fh.stat();
    const b = Buffer.alloc(Math.min(size, max));
    return { data: b.subarray(0, await readUpTo(fh, b, 0)), size };
  } finally {
    await fh.close();
  }
}

/** Remove a state file (never follows it); nothing there is fine. */
export async function unlinkState(dir: Dir, name: string): Promise<void> {
  await dir.unlink(name).catch((e) => {
    if (errnoOf(e) === 'ENOENT') return;
    if (errnoOf(e) === 'EISDIR' || errnoOf(e) === 'EPERM') {
      throw new QsyncError('IO', `${dir.shown(name)} is a directory, not a qsync state file; remove it`, { file: dir.shown(name) }, { cause: e });
    }
    throw e;
  });
}

/** Remove the state file at `path`, if its folder and it exist. */
export async function removeStatePath(path: string): Promise<void> {
  await withStateParent(path, false, (sp) => unlinkState(sp.dir, sp.name));
}

/**
 * Write a new state file `name` in `dir` durably and atomically: a fresh
 * 0600 temp file (unpredictable name, O_EXCL), fsync, rename over `name`,
 * fsync the folder. Returns the open file when `keep` (the caller appends).
 */
export async function writeStateFile(dir: Dir, name: string, data: Buffer, keep: true): Promise<FileHandle>;
export async function writeStateFile(dir: Dir, name: string, data: Buffer, keep?: false): Promise<void>;
export async function writeStateFile(dir: Dir, name: string, data: Buffer, keep = false): Promise<FileHandle | void> {
  const { fh, name: tmp } = await createStateTemp(dir, name);
  try {
    await fh.write(data, 0, data.length, 0);
    await fh.sync();
    await renameState(dir, tmp, name);
  } catch (e) {
    await fh.close();
    await dir.unlink(tmp).catch(() => {});
    throw e;
  } finally {
    doneWithTemp(tmp);
  }
  await dir.sync();
  if (keep) return fh;
  await fh.close();
}

/** rename(2) a temp file of ours over a state file, with a clear message when a folder stands there. */
export async function renameState(dir: Dir, from: string, to: string): Promise<void> {
  await dir.rename(from, dir, to).catch((e) => {
    const errno = errnoOf(e);
    if (errno === 'EISDIR' || errno === 'ENOTEMPTY' || errno === 'EEXIST') {
      throw new QsyncError('IO', `${dir.shown(to)} is a directory, not a qsync state file; remove it`, { file: dir.shown(to) }, { cause: e });
    }
    throw e;
  });
}

/** Temp names this process has in use (never removed as stale). */
const liveTemps = new Set<string>();
/** Folders (dev:ino) already cleaned by this process. */
const cleaned = new Set<string>();

/** Create a 0600 temp file beside `name` in `dir` (Dir.createTemp), remembered as in use until `doneWithTemp`. */
export async function createStateTemp(dir: Dir, name: string): Promise<{ fh: FileHandle; name: string }> {
  const t = await dir.createTemp(name, STATE_FILE_MODE);
  liveTemps.add(t.name);
  return t;
}

export const doneWithTemp = (name: string): void => void liveTemps.delete(name);

/** Whether `entry` is a temp file qsync makes for a state file: Dir.createTemp's `.NAME.<12 hex>.tmp`, or an older qsync's `.NAME.tmp-PID`. */
export const isStateTemp = (entry: string): boolean => /^\..+\.(?:[0-9a-f]{12}\.tmp|tmp-\d+)$/.test(entry);

/**
 * Remove temp files that killed runs left in `dir` (once per folder and
 * process): only regular files of ours named as qsync names its temps, and
 * none this process is using. Runs on one destination are serialised by its
 * lock, so no other run is writing them.
 */
export async function removeStaleTemps(dir: Dir): Promise<void> {
  const st = await dir.stat();
  const key = `${st.dev}:${st.ino}`;
  if (cleaned.has(key)) return;
  cleaned.add(key);
  for (const entry of await dir.readdir()) {
    if (liveTemps.has(entry) || !isStateTemp(entry)) continue;
    const est = await dir.lstatOrUndefined(entry);
    if (!est?.isFile() || est.uid !== BigInt(euid())) continue;
    await dir.unlink(entry).catch(() => {});
  }
}
