/**
 * Point-in-time history from reverse deltas (`--backup-dir`): each run that
 * changed a file leaves, in DIR, one delta file named by the run's start time
 * whose member for that file turns the mirror as that run left it back into
 * what it was before. Restoring walks them newest → older onto a sparse copy
 * of the mirror; the mirror is never written.
 *
 * The walk is checked link by link: it starts from the mirror's fingerprint,
 * and each member must apply to the state the previous one gave (same size,
 * and same fingerprint where both are known). A member that does not name
 * its result (an interrupted run could not vouch for it) only leads on to
 * older ones; a point is listed only where the fingerprint is known, and
 * restoring checks the result against it. The walk stops at the first
 * broken link.
 */
import { constants } from 'node:fs';
import { link, mkdir, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join, relative, resolve } from 'node:path';
import { errnoOf, QsyncError } from '../core/errors.js';
import { blockCount } from '../core/geometry.js';
import { MemberPatch, openDelta, readDeltaFile, summarize, type DeltaMemberSummary } from '../io/delta-file.js';
import { fsyncDir } from '../io/fsync-dir.js';
import { copySparse } from '../io/local-file.js';
import { checkOwnDir, checkOwnStat, Dir, isTempNameFor, lstatOrUndefined, openBeneathMaking, openRegular, resolveTrusted } from '../io/safe-fs.js';
import { intentPathFor, readIntent } from './intent.js';
import { lockIn, type DestLock } from './lock.js';
import { manifestPathFor, openManifest } from './manifest-store.js';
import { stateBase, stateFolderFor } from './state-dir.js';
import { hashFile } from './target-digests.js';
import { assessManifest } from './trust.js';

export const HISTORY_SUFFIX = '.qdelta';
/** Restored images hold someone's data: owner-only. */
const RESTORE_MODE = 0o600;

/** The delta file name for a run that started at `ms`: sorts by time. */
export const historyFileName = (ms: number): string => `${new Date(ms).toISOString().replace(/[:]/g, '-')}${HISTORY_SUFFIX}`;

export interface HistoryPoint {
  /** 1 = the state before the newest run that changed the file. */
  n: number;
  /** Start of the run that changed the file afterwards: the state held until then. */
  until: Date;
  size: number;
  records: number;
  file: string;
  /** How many chain steps (members, newest first) restore it. */
  steps: number;
  fingerprint: Buffer;
  blockSize: number;
}

interface Step {
  file: string;
  /** `file` through the held history folder. */
  at: string;
  member: DeltaMemberSummary;
}

interface Chain {
  steps: Step[];
  points: HistoryPoint[];
  /** Runs after which the walk could not go on (a broken link), for the user. */
  stoppedAt?: string;
}

const isZero = (b: Buffer) => b.every((x) => x === 0);

/**
 * The history folder's path leads through no other user's symlink
 * (resolveTrusted, as for a --write-batch path), its last component
 * included: `DIR/` with a trailing slash would follow one.
 */
async function checkHistoryPath(dir: string): Promise<void> {
  const r = await resolveTrusted(dir, true).catch((e) => {
    if (errnoOf(e) === 'ENOENT') return undefined;
    throw e;
  });
  await r?.dir.close();
}

/**
 * Hold the history folder by descriptor, reached through no other user's
 * symlink, a symlink in its place refused; `own`: it must be ours (we write
 * in it). Every later step goes through this descriptor, never the path
 * again: a folder on the way renamed meanwhile steers nothing.
 */
export async function openHistoryDir(dir: string, own = false): Promise<Dir> {
  try {
    await checkHistoryPath(dir); // names another user's symlink on the way, a trailing slash's last one included
    const { dir: parent, name } = await resolveTrusted(dir, false);
    let d: Dir;
    try {
      d = await parent.openDir(name);
    } finally {
      await parent.close();
    }
    if (own) {
      try {
        checkOwnStat(await d.stat(), dir, 'backup dir');
      } catch (e) {
        await d.close();
        throw e;
      }
    }
    return d;
  } catch (e) {
    if (errnoOf(e) === 'ENOENT') throw new QsyncError('USAGE', `backup dir ${dir} does not exist`, { file: dir });
    if (errnoOf(e) === 'ELOOP' || errnoOf(e) === 'ENOTDIR') {
      throw new QsyncError('TARGET', `backup dir ${dir} is a symlink or not a directory: qsync does not follow it`, { file: dir }, { cause: e });
    }
    throw e;
  }
}

/** Delta file names in DIR, newest first. */
async function historyNames(d: Dir): Promise<string[]> {
  return (await d.readdir()).filter((n) => n.endsWith(HISTORY_SUFFIX) && !n.startsWith('.')).sort().reverse();
}

/**
 * The destination root a mirror file belongs to and its name relative to it
 * (members are matched by that whole name, never by a suffix): the folder
 * above it whose name for it is one the history holds (`names`), the one
 * with qsync state first. The history alone decides when the state is
 * elsewhere (another --state-dir, or lost); two folders it could belong to,
 * neither with state, are refused rather than guessed. Without a member for
 * it, the nearest folder with state (the history has no point for it).
 */
async function locate(target: string, names: ReadonlySet<string>): Promise<{ root: string; rel: string }> {
  const abs = resolve(target);
  const named: { root: string; rel: string }[] = [];
  let stated: { root: string; rel: string } | undefined;
  for (let d = dirname(abs); ; d = dirname(d)) {
    const at = { root: d, rel: relative(d, abs) };
    const hasState = (await lstatOrUndefined(stateFolderFor(d)))?.isDirectory();
    if (names.has(at.rel)) {
      if (hasState) return at;
      named.push(at);
    } else if (hasState) stated ??= at;
    if (dirname(d) === d) break;
  }
  if (named.length > 1) {
    throw new QsyncError('USAGE', `${target}: the history holds files of that name below ${named.map((n) => n.root).join(' and ')}, and no qsync state in ${stateBase()} tells which destination it belongs to`, {
      file: target,
      hint: 'give the --state-dir the syncs used',
    });
  }
  const found = named[0] ?? stated;
  if (found) return found;
  throw new QsyncError('USAGE', `${target} is not in a destination qsync synced (the history names no such file, and no folder above it has qsync state in ${stateBase()})`, {
    file: target,
    hint: 'give the mirror file as it lies in the destination',
  });
}

/** The mirror's fingerprint: its manifest's when trusted, else by hashing it. */
async function mirrorFingerprint(fh: FileHandle, root: string, rel: string, blockSize: number): Promise<Buffer> {
  const manifestPath = manifestPathFor(root, rel);
  const st = await fh.stat({ bigint: true });
  const manifest = await openManifest(manifestPath).catch(() => undefined);
  try {
    const trust = assessManifest(manifest, await readIntent(intentPathFor(manifestPath)), st, blockSize);
    if (manifest && trust.trusted && !trust.unknown) return manifest.fingerprint;
  } finally {
    await manifest?.close();
  }
  return hashFile(fh, Number(st.size), blockSize);
}

async function openMirror(target: string): Promise<FileHandle> {
  try {
    return await openRegular(target, constants.O_RDONLY);
  } catch (e) {
    if (e instanceof QsyncError) throw e;
    throw new QsyncError('SOURCE', `cannot read ${target}: ${(e as Error).message}`, { file: target }, { cause: e });
  }
}

/** What the history walk could not use, told to the user (points older than it are missing). */
export type HistoryWarn = (message: string) => void;

/** Walk the history of `target` from the mirror back, checking every link; `warn` hears of damaged files and a broken chain. */
async function walk(dir: string, d: Dir, target: string, mirror: FileHandle, warn: HistoryWarn = () => {}): Promise<Chain> {
  const files: { file: string; at: string; reverse: DeltaMemberSummary[] }[] = [];
  for (const name of await historyNames(d)) {
    const file = join(dir, name);
    const fh = await openDelta(d.at(name), file);
    try {
      files.push({ file, at: d.at(name), reverse: (await summarize(fh, file)).filter((x) => x.header.kind === 'reverse') });
    } catch (e) {
      if (!(e instanceof QsyncError)) throw e;
      // A damaged file is not part of the chain: the link check stops the walk there if it mattered.
      warn(`history file ${file} cannot be read (${e.message}): a point it holds for ${target} is not listed, nor older ones`);
    } finally {
      await fh.close();
    }
  }
  const { root, rel } = await locate(target, new Set(files.flatMap((f) => f.reverse.map((m) => m.header.name))));
  const members: Step[] = [];
  for (const f of files) {
    const m = f.reverse.find((x) => x.header.name === rel);
    if (m) members.push({ file: f.file, at: f.at, member: m });
  }
  const chain: Chain = { steps: [], points: [] };
  if (!members.length) return chain;
  const bs = members[0].member.header.blockSize;
  let fp: Buffer | undefined = await mirrorFingerprint(mirror, root, rel, bs);
  let size = Number((await mirror.stat()).size);
  for (const s of members) {
    const h = s.member.header;
    const known = !isZero(h.resultFingerprint);
    const point = () =>
      chain.points.push({ n: chain.points.length + 1, until: new Date(h.createdMs), size, records: s.member.records, file: s.file, steps: chain.steps.length, fingerprint: fp!, blockSize: bs });
    if (h.blockSize !== bs) {
      chain.stoppedAt = s.file;
      break;
    }
    // Already the state this member leads to (a run whose target was never committed, or that changed nothing): a point, nothing to apply.
    if (fp && known && h.resultFingerprint.equals(fp) && h.resultSize === size) {
      point();
      continue;
    }
    // A member naming no base (a crash's torn member) follows only a state no fingerprint names, whatever its size;
    // after such a state a member naming its base is taken on trust of size, and the point's final check decides.
    const linked = isZero(h.baseFingerprint) ? fp === undefined : h.baseSize === size && (fp === undefined || h.baseFingerprint.equals(fp));
    if (!linked || h.resultSize > size + s.member.records * bs) {
      chain.stoppedAt = s.file;
      break;
    }
    chain.steps.push(s);
    fp = known ? h.resultFingerprint : undefined;
    size = h.resultSize;
    if (fp) point();
  }
  if (chain.stoppedAt) warn(`the history of ${target} breaks at ${chain.stoppedAt} (it does not follow from the newer state: a file is missing or damaged); older points cannot be restored`);
  return chain;
}

/** The points in time of `target`, newest first; each one restores. */
export async function listPoints(dir: string, target: string, warn?: HistoryWarn): Promise<HistoryPoint[]> {
  const mirror = await openMirror(target);
  try {
    const d = await openHistoryDir(dir);
    try {
      return (await walk(dir, d, target, mirror, warn)).points;
    } finally {
      await d.close();
    }
  } finally {
    await mirror.close();
  }
}

/** `N` (a point number) or a time (anything Date parses): the point to restore, or undefined for the mirror as it is. */
function pointFor(chain: Chain, at: string): HistoryPoint | undefined {
  const { points } = chain;
  if (/^\d+$/.test(at)) {
    const n = Number(at);
    if (n < 1 || n > points.length) throw new QsyncError('USAGE', `there are ${points.length} points in time; --at ${at} is not one of them`);
    return points[n - 1];
  }
  const t = Date.parse(at);
  if (Number.isNaN(t)) throw new QsyncError('USAGE', `--at ${at}: not a point number nor a time`);
  // The state at t is the one before every run that started after t.
  const after = points.filter((p) => p.until.getTime() > t);
  const steps = chain.steps.filter((s) => s.member.header.createdMs > t).length;
  const p = after.at(-1);
  if ((p?.steps ?? 0) < steps) {
    throw new QsyncError('USAGE', `the state at ${at} cannot be restored exactly (a run after it was interrupted); list the points with --list`);
  }
  return p;
}


/** Apply one chain step onto `out` (of `size` bytes): resize, then every record (zero records past the old end stay holes). */
async function patch(out: FileHandle, s: Step, size: number): Promise<number> {
  const fh = await openDelta(s.at, s.file);
  let inMember = false;
  let p: MemberPatch | undefined;
  try {
    for await (const ev of readDeltaFile(fh, s.file)) {
      if (ev.type === 'header') {
        inMember = ev.at.offset === s.member.offset;
        if (inMember) {
          if (!ev.header.resultFingerprint.equals(s.member.header.resultFingerprint) || ev.header.resultSize !== s.member.header.resultSize) {
            throw new QsyncError('FORMAT', `${s.file} changed while restoring from it`, { file: s.file });
          }
          await out.truncate(ev.header.resultSize);
          p = new MemberPatch(out, ev.header, blockCount(size, ev.header.blockSize));
        }
      } else if (ev.type === 'record' && inMember) {
        await p!.write(ev.record.index, ev.content);
      } else if (ev.type === 'trailer' && inMember) {
        if (!ev.trailer.streamHash.equals(s.member.streamHash)) throw new QsyncError('FORMAT', `${s.file} changed while restoring from it`, { file: s.file });
        return s.member.header.resultSize;
      }
    }
  } finally {
    await fh.close();
  }
  throw new QsyncError('FORMAT', `${s.file} changed while restoring from it`, { file: s.file });
}

/**
 * Write `target` as it was at point `at` into the new file `out` (owner-only).
 * The result is hashed and checked against the point's fingerprint.
 */
export async function restorePoint(dir: string, target: string, at: string, outPath: string, warn?: HistoryWarn): Promise<{ size: number; applied: number }> {
  const mirror = await openMirror(target);
  const d = await openHistoryDir(dir).catch(async (e) => {
    await mirror.close();
    throw e;
  });
  try {
    const chain = await walk(dir, d, target, mirror, warn);
    const point = pointFor(chain, at);
    // OUT's folder is reached through no other user's symlink; OUT is written under a temp name and
    // takes its name (never replacing anything there) only once complete and checked: a killed restore leaves no torn OUT.
    const cannotCreate = (e: unknown) =>
      e instanceof QsyncError ? e : new QsyncError('TARGET', `cannot create ${outPath}: ${(e as Error).message}`, { file: outPath, hint: 'OUT must not exist yet' }, { cause: e });
    const place = await resolveTrusted(outPath, false).catch((e) => {
      throw cannotCreate(e);
    });
    try {
      if (await place.dir.lstatOrUndefined(place.name)) throw cannotCreate(new Error('it already exists'));
      // What a killed restore to this OUT left: its temp file (a regular file of ours, named for OUT).
      for (const entry of await place.dir.readdir()) {
        if (!isTempNameFor(entry, place.name)) continue;
        const st = await place.dir.lstatOrUndefined(entry);
        if (st?.isFile() && st.uid === BigInt(process.geteuid?.() ?? 0)) await place.dir.unlink(entry).catch(() => undefined);
      }
      const { fh: out, name: tmp } = await place.dir.createTemp(place.name, RESTORE_MODE).catch((e) => {
        throw cannotCreate(e);
      });
      try {
        let size = await copySparse(mirror, out);
        const steps = chain.steps.slice(0, point?.steps ?? 0);
        for (const s of steps) size = await patch(out, s, size);
        await out.sync();
        if (point) {
          const fp = await hashFile(out, size, point.blockSize);
          if (!fp.equals(point.fingerprint)) {
            throw new QsyncError('FORMAT', `restored ${outPath} does not match the point's fingerprint: ${target} or the history in ${dir} changed while restoring`, { file: outPath });
          }
        }
        await out.close();
        // link(2) never replaces: an OUT made meanwhile is left alone.
        await link(place.dir.at(tmp), place.dir.at(place.name)).catch((e) => {
          throw cannotCreate(e);
        });
        await place.dir.unlink(tmp);
        await place.dir.sync();
        return { size, applied: steps.length };
      } catch (e) {
        await out.close().catch(() => undefined);
        await place.dir.unlink(tmp).catch(() => undefined);
        throw e;
      }
    } finally {
      await place.dir.close();
    }
  } finally {
    await d.close();
    await mirror.close();
  }
}

/**
 * Keep the newest `keep` run files in DIR and delete the older ones, oldest
 * first, each deletion made durable before the next: reverse deltas chain
 * from the mirror backwards, so a kept point never needs a deleted file, and
 * a prune interrupted at any moment leaves the newest files, every one of
 * them still reachable.
 */
export async function prune(dir: string, keep: number): Promise<string[]> {
  await checkOwnDir(dir, 'backup dir');
  const d = await openHistoryDir(dir, true);
  const lock = await lockHistory(d, dir).catch(async (e) => {
    await d.close();
    throw e;
  });
  try {
    const names = await historyNames(d);
    const drop = names.slice(keep).reverse();
    for (const name of drop) {
      if (!(await d.lstat(name)).isFile()) continue;
      await d.unlink(name);
      await d.sync();
    }
    return drop.map((n) => join(dir, n));
  } finally {
    await lock.release();
    await d.close();
  }
}

/**
 * One writer at a time per history folder (a sync keeping history, a
 * prune): a run salvages what a crashed run left, which must not be the temp
 * file of a run still going.
 */
export async function lockHistory(d: Dir, dir: string): Promise<DestLock> {
  try {
    return await lockIn(d, join(dir, 'lock'), () => `another qsync is writing the history in ${dir}; wait for it to finish`, async () => {});
  } catch (e) {
    if (e instanceof QsyncError && e.code === 'LOCKED') {
      throw new QsyncError('LOCKED', `another qsync is writing the history in ${dir}; wait for it to finish`, { file: dir, hint: e.context.hint });
    }
    throw e;
  }
}

/**
 * Make the history folder (owner-only) if needed; a symlink or another user's folder is refused.
 * `within` (qsync --server --restrict DIR): the folders on the way are made from DIR, none through a symlink.
 */
export async function ensureHistoryDir(dir: string, within?: string): Promise<void> {
  await checkHistoryPath(dir);
  if (await checkOwnDir(dir, 'backup dir')) return;
  if (within === undefined) await mkdir(dir, { recursive: true, mode: 0o700 });
  else {
    const parent = await openBeneathMaking(within, relative(within, dirname(dir)));
    try {
      await parent.mkdir(basename(dir), 0o700);
    } finally {
      await parent.close();
    }
  }
  await checkHistoryPath(dir);
  await checkOwnDir(dir, 'backup dir');
  await fsyncDir(dirname(dir));
}
