/**
 * The tree walk: rsync's semantics for which entries are copied, created,
 * skipped or deleted, and the metadata they get. Regular files go to
 * syncFile; this module owns directories, links, devices and --delete.
 *
 * qsync runs as root over trees other users own, so no path below the
 * operands is trusted: both trees are walked with folders held by
 * descriptor (src/io/safe-fs.ts), each entry reached through its parent and
 * never through a symlink; metadata is set through descriptors. Only the
 * folders on the way down are held: descriptors grow with depth, not width.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createServer } from 'node:net';
import type { BigIntStats } from 'node:fs';
import { basename, join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { errnoOf, errnoText, QsyncError, rsyncErrnoText } from '../core/errors.js';
import { newerOnReceiver, sameMtime } from '../core/mtime.js';
import type { Filter } from '../core/filter.js';
import type { ListedName } from '../core/files-from.js';
import { parseChmod, tweakMode, type ChmodRule } from '../core/chmod.js';
import { IdMapper } from './id-map.js';
import { noStats, type FileReport, type RunStats, type SyncHooks } from './events.js';
import { SmallFileBatch } from './small-file.js';
import { syncFile, nsToSeconds, type FileSyncContext, type FileSyncOptions, type FileSyncResult } from './file-sync.js';
import { majorMinor } from '../io/dev-numbers.js';
import { compareNames, Dir, encodeName, setMetaAt, type MetaChange } from '../io/safe-fs.js';
import { StatList } from '../io/stat-list.js';
import { forgetManifests, manifestPathFor } from './manifest-store.js';
import type { SourceDir } from './source.js';
import { joinRel, type Plan, type Transfer } from './operands.js';
import { HardLinks, type HardLinkHost } from './hard-links.js';
import { ExtAttrs, type Node, type SourceAttrs } from './ext-attrs.js';

export interface TreeOptions extends FileSyncOptions {
  recursive: boolean;
  /** false (--no-implied-dirs): the folders on the way to a -R or --files-from name are not sent (TreeSync.implied). */
  impliedDirs?: boolean;
  links: boolean;
  perms: boolean;
  owner: boolean;
  group: boolean;
  devices: boolean;
  specials: boolean;
  delete: boolean;
  /** --delete-excluded: names the filter excludes are deleted from DEST too. */
  deleteExcluded?: boolean;
  /**
   * Names never deleted, whatever --delete-excluded says: a --backup-dir
   * inside DEST (rsync protects it too).
   */
  protect?: Filter;
  /** --max-delete: at most this many deletions (-1 or undefined: no limit). */
  maxDelete?: number;
  /** --min-size/--max-size in bytes (-1 or undefined: none). */
  minSize?: number;
  maxSize?: number;
  /** -m: folders with nothing but folders below them (after the filters) are left out. */
  pruneEmptyDirs?: boolean;
  /** --safe-links: symlinks leading out of the transfer are left out of it. */
  safeLinks?: boolean;
  /** --force: a non-empty folder in the way of another kind of entry is deleted, as under --delete. */
  force?: boolean;
  /** -O: folders are left out of preserveTimes. */
  omitDirTimes?: boolean;
  /** -d: folders are made without -r (contents walked only of an operand ending in '/' or "."). */
  dirs?: boolean;
  /** --chmod arguments (src/core/chmod.ts), checked already. */
  chmod?: string[];
  /** --usermap/--groupmap (--chown is one of them), checked already; --numeric-ids: no names matched. */
  usermap?: string;
  groupmap?: string;
  numericIds?: boolean;
  verbose?: number;
  oneFileSystem: boolean;
  /** -H, -A, -X (src/sync/hard-links.ts, src/sync/ext-attrs.ts). */
  hardLinks?: boolean;
  acls?: boolean;
  xattrs?: boolean;
  /** --manifest PATH: only for a single-file transfer. */
  manifest?: string;
  /**
   * qsync's state base (src/sync/state-dir.ts), when it exists: a folder of
   * qsync's own that is being written while this run walks, so it is never
   * copied from a source nor deleted from the destination.
   */
  stateBase?: { dev: bigint; ino: bigint };
  /**
   * A regular file the walk meets at `rel` that another driver writes (the
   * drop-in's domain disks, src/sync/dropin.ts): true, and the walk leaves it.
   */
  claim?: (st: BigIntStats, rel: string) => boolean;
  /**
   * Count the whole transfer (entries and bytes, rsync's file list) before
   * the walk and give it to hooks.listTotal: the progress lines say
   * "to-chk=R/T" as rsync does once its list is complete.
   */
  countFirst?: boolean;
}

/** Outcome flags the CLI turns into rsync's exit codes. */
export interface TreeOutcome {
  stats: RunStats;
  /** Some entries failed (rsync 23). */
  partial: boolean;
  /** Some source entries vanished while walking (rsync 24). */
  vanished: boolean;
  /** Deletions --max-delete stopped (rsync 25 when > 0). */
  skippedDeletes: number;
}

const run = promisify(execFile);

/** Errors of the destination as a whole, not of one file. */
const DEST_FATAL: Record<string, string> = {
  ENOSPC: 'no space left on the destination',
  EDQUOT: 'disk quota exceeded on the destination',
  EROFS: 'the destination is read-only',
  EIO: 'I/O error on the destination',
};
const UMASK = process.umask();
/** Who runs qsync: not root (0), it may only open up folders and files of its own, as rsync does. */
const ME = process.getuid?.() ?? 0;
/** The groups a user who is not root may give files (rsync's is_in_group): others are neither set nor reported. */
const MY_GROUPS = new Set(ME === 0 ? [] : [process.getegid?.() ?? 0, ...(process.getgroups?.() ?? [])]);
const mayGiveGroup = (gid: bigint): boolean => ME === 0 || MY_GROUPS.has(Number(gid));

type Kind = FileReport['kind'];
const kindOf = (s: BigIntStats): Kind =>
  s.isFile() ? 'file' : s.isDirectory() ? 'dir' : s.isSymbolicLink() ? 'symlink' : s.isCharacterDevice() || s.isBlockDevice() ? 'device' : 'special';
const TYPE_CHAR: Record<Kind, string> = { file: 'f', dir: 'd', symlink: 'L', device: 'D', special: 'S' };
/** rsync's words in "could not make way for new ...". */
const MAKE_WAY_WORD: Record<Kind, string> = { file: 'regular file', dir: 'directory', symlink: 'symlink', device: 'device file', special: 'special file' };

/**
 * The path qsync's state uses for a file: `rel` itself, but with its
 * escaped bytes (names that are not UTF-8) as %XX and `%` as %25, so that
 * two names differing only in such bytes never share a manifest.
 */
const stateRel = (rel: string): string =>
  /[%\u{dc80}-\u{dcff}]/u.test(rel) ? rel.replace(/[%\u{dc80}-\u{dcff}]/gu, (c) => `%${(c === '%' ? 0x25 : c.charCodeAt(0) - 0xdc00).toString(16).toUpperCase().padStart(2, '0')}`) : rel;

/** A source the walk reaches: its folder (held) and name in it. */
interface Here {
  dir: SourceDir;
  name: string;
}

/**
 * -A/-X: a source as ExtAttrs reads it: this host's entry through its
 * descriptors, or a peer's with the attributes the peer read of it.
 * `name` undefined: the folder `dir` itself.
 */
async function attrSource(dir: SourceDir, name: string | undefined, st: BigIntStats): Promise<Node | SourceAttrs> {
  if (dir instanceof Dir) return name === undefined ? { held: dir } : { dir, name, expect: st };
  if (!dir.attrs) throw new Error('a source folder without attributes');
  return { attrs: await dir.attrs(name, st) };
}

export class TreeSync {
  private readonly stats: RunStats = noStats();
  private partial = false;
  private vanished = false;
  private skippedDeletes = 0;
  private readonly links: HardLinks | undefined;
  private readonly ext: ExtAttrs | undefined;
  private readonly chmod: ChmodRule[];
  private readonly ids: IdMapper | undefined;
  private readonly ctx: FileSyncContext;
  /** -R with an absolute SRC: rsync prints its names with their leading '/'. */
  private shownPrefix = '';
  /**
   * rsync's file-list index of the entries listed and not yet reported, by
   * path: a folder's list is its non-folders, then its folders (each sorted
   * by bytes), and the lists follow one another folder by folder, depth
   * first, as the walk goes; the progress lines count with it.
   */
  private readonly indexOf = new Map<string, number>();
  /** The entry of a folder's list the walk is at, and its index (the map holds the operands' only). */
  private at: { rel: string; index: number } | undefined;
  /** Where the next folder's list starts in that numbering. */
  private nextList = 0;

  /** `dest`: the destination root, held (undefined only with -n when it does not exist yet). */
  constructor(
    private readonly plan: Plan,
    private readonly opts: TreeOptions,
    private readonly filter: Filter,
    context: FileSyncContext,
    private readonly dest: Dir | undefined,
  ) {
    // A single file given its own --manifest keeps one, whatever its size.
    this.ctx = opts.manifest ? context : { ...context, small: new SmallFileBatch() };
    this.links = opts.hardLinks ? new HardLinks() : undefined;
    this.chmod = (opts.chmod ?? []).flatMap((c) => parseChmod(c, UMASK) ?? []);
    this.ids = opts.usermap !== undefined || opts.groupmap !== undefined ? new IdMapper(opts.usermap, opts.groupmap, opts.numericIds === true) : undefined;
    const acls = opts.acls === true;
    const xattrs = opts.xattrs === true;
    const owners = opts.owner && process.getuid?.() === 0;
    this.ext = acls || xattrs ? new ExtAttrs({ acls, xattrs, noWrite: this.noWrite, owners }) : undefined;
  }

  /** -n, or --only-write-batch (only file contents are recorded): the destination is left alone. */
  private get noWrite(): boolean {
    return this.opts.dryRun || this.opts.recordOnly === true;
  }

  private get hooks(): SyncHooks {
    return this.ctx.hooks;
  }

  async run(): Promise<TreeOutcome> {
    try {
      return await this.walk();
    } catch (e) {
      // The small files written so far get their times once durable, whatever stopped the walk.
      await this.ctx.small?.flush().catch(() => {});
      throw e;
    }
  }

  private async walk(): Promise<TreeOutcome> {
    const t0 = performance.now();
    if (!this.ctx.sources.remote) this.destRoot = await this.dest?.stat().catch(() => undefined);
    await this.ids?.prepare((m) => this.hooks.warning?.(m, undefined, true));
    const done = new Map<string, BigIntStats>();
    for (const l of this.plan.lists ?? []) {
      this.shownPrefix = l.shownPrefix ?? '';
      await this.listed(l.base, l.names, l.dirs, done);
    }
    this.shownPrefix = '';
    await this.retimeListed(done);
    if (this.opts.countFirst && !this.plan.lists?.length) {
      const c0 = performance.now();
      const total = await this.count();
      this.stats.flistMs = performance.now() - c0;
      this.hooks.listTotal?.(total.entries, total.size);
    }
    // The operands make the first list ("." alone for SRC/, whose contents are the next), in rsync's order
    // (its files, then its folders, by name) when each is copied by its name.
    const transfers = this.plan.transfers.some((t) => t.destRel === '')
      ? this.plan.transfers
      : [...this.plan.transfers].sort((a, b) => Number(a.stat.isDirectory()) - Number(b.stat.isDirectory()) || compareNames(a.destRel, b.destRel));
    transfers.forEach((t, i) => this.indexOf.set(t.destRel, i));
    this.nextList = transfers.length;
    for (const t of transfers) await this.transfer(t);
    // -H: files with other links waited for the whole walk (rsync semantics).
    await this.links?.finish(this.linkHost());
    await this.ext?.flush().catch((e) => this.fail(e, '.'));
    // Small files written are made durable, then timed (src/sync/small-file.ts).
    await this.ctx.small?.flush().catch((e) => this.fail(e, '.'));
    this.stats.elapsedMs = performance.now() - t0;
    // rsync's words, on stderr without its name.
    if (this.skippedDeletes) this.hooks.warning?.(`Deletions stopped due to --max-delete limit (${this.skippedDeletes} skipped)`, undefined, true);
    return { stats: this.stats, partial: this.partial, vanished: this.vanished, skippedDeletes: this.skippedDeletes };
  }

  /** One operand: its folder contents into the destination root, or the operand itself into it. */
  private async transfer(transfer: Transfer): Promise<void> {
    const t = { ...transfer, stat: await this.seen(transfer.stat) };
    const shown = t.destRel || '.';
    this.links?.transfer(t);
    if (t.destRel === '') {
      // Neither -r nor -d: rsync skips a folder's contents as it skips a folder, and lists nothing of it.
      if (!this.opts.recursive && !this.opts.dirs) return this.hooks.info?.('skipping directory .', 'nonreg');
      // SRC/ (or .): the operand is the folder itself; the user's path to it is followed, as rsync does.
      let src: SourceDir | undefined;
      try {
        this.stats.files++;
        src = await this.ctx.sources.openOperand(t.operand);
        await this.checkSame(src, t.stat, t.operand);
        const cur = this.plan.destCreated ? undefined : await this.dest?.stat();
        this.stats.dirs++;
        if (!cur) this.stats.created++;
        // -d without -r: the folder's contents, one level (its folders made, not walked).
        await this.dirBody(src, t.stat, this.dest, cur, '', t.stat.dev, this.opts.dirs && !this.opts.recursive ? 1 : undefined);
      } catch (e) {
        this.fail(e, shown);
      } finally {
        await src?.close();
      }
      return;
    }
    let parent: { dir: SourceDir; name: string };
    try {
      parent = await this.ctx.sources.openParent(t.operand);
    } catch (e) {
      this.fail(e, shown);
      return;
    }
    try {
      // -d without -r: a folder named without a trailing slash is made, its contents not walked.
      await this.entry(parent, t.stat, this.dest, t.destRel, t.stat.dev, this.opts.dirs && !this.opts.recursive ? 0 : undefined);
    } finally {
      await parent.dir.close();
    }
  }

  /**
   * --files-from and -R: each name below `base`, the folders on its way
   * first (rsync's implied dirs: made and given their source's attributes,
   * their contents not walked), then the name itself. A folder's contents
   * are walked under -r; a --files-from folder (`dirs`) is made without -r,
   * and its contents walked one level when listed with a trailing '/', as
   * rsync does. Both sides are reached folder by folder from `base` and
   * DEST, never through a symlink. `done`: what is done, across lists.
   */
  private async listed(base: string, names: ListedName[], dirs: boolean, done: Map<string, BigIntStats>): Promise<void> {
    let root: SourceDir;
    try {
      root = await this.ctx.sources.openOperand(base);
    } catch (e) {
      this.fail(e, base);
      return;
    }
    this.links?.list(base);
    try {
      for (const n of names) {
        const parts = n.rel ? n.rel.split('/') : [];
        if (n.dotDir) await this.listedOne(root, base, '', 0, done);
        for (let i = 1; i < parts.length; i++) {
          const onTheWay = parts.slice(0, i).join('/');
          if (this.opts.impliedDirs === false) await this.implied(onTheWay);
          else await this.listedOne(root, base, onTheWay, 0, done);
        }
        await this.listedOne(root, base, n.rel, this.opts.recursive || !dirs ? undefined : n.contents ? 1 : 0, done);
      }
    } finally {
      await root.close();
    }
  }

  /**
   * --no-implied-dirs: a folder on the way to a listed name, in DEST only, as
   * rsync's receiver makes it: when missing, plain (0777 less the umask), not
   * named, not counted; whatever stands there is left as it is (a symlink,
   * or a file, fails the names below it, never followed).
   */
  private async implied(rel: string): Promise<void> {
    if (this.noWrite) return;
    let at: { dir: Dir | undefined; name: string } | undefined;
    try {
      at = await this.destParent(rel);
      if (!at.dir || (await at.dir.lstatOrUndefined(at.name))) return;
      await at.dir.mkdir(at.name, 0o777);
    } catch (e) {
      // rsync's words.
      this.fail(new QsyncError('TARGET', `recv_generator: mkdir "${join(this.plan.destRoot, rel)}" failed: ${rsyncErrnoText(e)}`, { file: rel }, { cause: e }), rel);
    } finally {
      if (at?.dir && at.dir !== this.dest) await at.dir.close();
    }
  }

  /** The times of the folders of --files-from/-R lists, set again: names made inside them later changed them. */
  private async retimeListed(done: Map<string, BigIntStats>): Promise<void> {
    if (this.noWrite || !this.opts.preserveTimes || this.opts.omitDirTimes) return;
    // Deepest first, so that setting one folder's time changes no other's.
    for (const [rel, st] of [...done].filter(([, st]) => st.isDirectory()).reverse()) {
      const m = this.metaFor(st, false, true);
      if (!rel) {
        await this.dest?.setMeta({ atime: m.atime, mtime: m.mtime }).catch((e) => this.fail(e, '.'));
        continue;
      }
      const at = await this.destParent(rel).catch(() => undefined);
      if (!at?.dir) continue;
      try {
        const cur = await at.dir.lstatOrUndefined(at.name);
        if (cur?.isDirectory()) await setMetaAt(at.dir, at.name, cur, { atime: m.atime, mtime: m.mtime });
      } catch (e) {
        this.fail(e, rel || '.');
      } finally {
        if (at.dir !== this.dest) await at.dir.close();
      }
    }
  }

  /** One name of a --files-from list (or a folder on its way), once; `levels` as in dirBody. */
  private async listedOne(root: SourceDir, base: string, rel: string, levels: number | undefined, done: Map<string, BigIntStats>): Promise<void> {
    // Listed again (or on the way to another name): once is enough, unless its contents are asked for now.
    if (done.has(rel) && (levels === 0 || !done.get(rel)!.isDirectory())) return;
    const parts = rel ? rel.split('/') : [];
    const chain: SourceDir[] = [];
    let dst: { dir: Dir | undefined; name: string } | undefined;
    try {
      let dir = root;
      for (const p of parts.slice(0, -1)) chain.push((dir = await dir.openDir(p)));
      if (!rel) {
        const st = await this.seen(await root.stat());
        done.set('', st);
        this.stats.files++;
        this.stats.dirs++;
        const cur = this.plan.destCreated ? undefined : await this.dest?.stat();
        if (!cur) this.stats.created++;
        await this.dirBody(root, st, this.dest, cur, '', st.dev, levels);
        return;
      }
      const name = parts[parts.length - 1]!;
      let st: BigIntStats;
      try {
        st = await this.seen(await dir.lstat(name));
      } catch (e) {
        if (errnoOf(e) !== 'ENOENT') throw e;
        // rsync's words for a listed name that is not there.
        this.partial = true;
        // A peer's base is its path there, as given (this side cannot resolve it).
        this.hooks.warning?.(`link_stat "${join(this.ctx.sources.remote ? base : resolve(base), rel)}" failed: No such file or directory (2)`, rel);
        return;
      }
      if (this.filter.excluded(rel, st.isDirectory()) || this.isStateBase(st)) return;
      done.set(rel, st);
      dst = await this.destParent(rel);
      await this.entry({ dir, name }, st, dst.dir, rel, st.dev, levels);
    } catch (e) {
      this.fail(e, rel || '.');
    } finally {
      for (const d of chain.reverse()) await d.close();
      if (dst?.dir && dst.dir !== this.dest) await dst.dir.close();
    }
  }

  /** The destination folder that holds `rel` (held; undefined where -n has not made it) and its name there. */
  private async destParent(rel: string): Promise<{ dir: Dir | undefined; name: string }> {
    const cut = rel.lastIndexOf('/');
    const name = rel.slice(cut + 1);
    if (cut < 0 || !this.dest) return { dir: this.dest, name };
    try {
      return { dir: await this.dest.openBeneath(rel.slice(0, cut)), name };
    } catch (e) {
      if (this.noWrite && errnoOf(e) === 'ENOENT') return { dir: undefined, name };
      throw e;
    }
  }

  /**
   * A source's stat as the transfer sees it: --chmod changes the mode (never
   * a symlink's), as rsync's sender does, and --usermap/--groupmap/--chown
   * the owner and group, as its receiver does.
   */
  private async seen(st: BigIntStats): Promise<BigIntStats> {
    if (!this.chmod.length && !this.ids) return st;
    const mode = this.chmod.length && !st.isSymbolicLink() && st.mode ? BigInt(tweakMode(Number(st.mode), this.chmod)) : st.mode;
    const ids = this.ids ? await this.ids.map(st.uid, st.gid) : st;
    if (mode === st.mode && ids.uid === st.uid && ids.gid === st.gid) return st;
    return Object.assign(Object.create(Object.getPrototypeOf(st) as object) as BigIntStats, st, { mode, uid: ids.uid, gid: ids.gid });
  }

  /** A folder opened by the walk must be the one listed: another one in its place is skipped as vanished. */
  private async checkSame(d: SourceDir, listed: BigIntStats, shown: string): Promise<void> {
    const st = await d.stat();
    if (st.dev !== listed.dev || st.ino !== listed.ino) {
      throw new QsyncError('SOURCE', `file has vanished: ${shown} (another folder took its name while qsync worked)`, { file: shown, vanished: true });
    }
  }

  private fail(e: unknown, path: string): void {
    if (e instanceof QsyncError && e.context.fatal) throw e;
    const errno = errnoOf(e instanceof QsyncError ? e.cause : e);
    const ofSource = e instanceof QsyncError && e.code === 'SOURCE';
    if (errno && DEST_FATAL[errno] && !ofSource) {
      // Every later file would fail the same way: stop, as rsync does (exit 11).
      throw new QsyncError('TARGET', `${DEST_FATAL[errno]} while writing ${path} in ${this.plan.destRoot}`, {
        file: path,
        hint: 'fix that and run again: the next run finishes what this one started',
        fatal: true,
      }, { cause: e });
    }
    if (e instanceof QsyncError && e.context.vanished) {
      this.vanished = true;
      this.hooks.warning?.(e.message, path);
      return;
    }
    if (errno === 'ENOENT' && !(e instanceof QsyncError)) {
      this.vanished = true;
      this.hooks.warning?.(`file has vanished: ${path}`, path);
      return;
    }
    this.partial = true;
    const msg = e instanceof QsyncError ? e.message + (e.context.hint ? ` (${e.context.hint})` : '') : `${path}: ${errnoText(e)}`;
    this.hooks.warning?.(msg, path);
  }

  /**
   * The destination side of an entry: the folder that holds it (undefined: it
   * cannot exist, -n) and its name. `levels`: under --files-from and -d, how many
   * levels of a folder's contents are walked (0: the folder alone);
   * undefined: as -r says.
   */
  private async entry(src: Here, st: BigIntStats, dst: Dir | undefined, rel: string, rootDev: bigint, levels?: number): Promise<void> {
    const shown = rel || '.';
    const name = basename(rel);
    try {
      this.stats.files++;
      if ((this.opts.existing || this.opts.ignoreExisting) && (await this.skipByExistence(st, dst, name, rel))) return await this.countSkipped(src, st, rel, rootDev, levels);
      if (st.isDirectory()) {
        if (!this.opts.recursive && levels === undefined) {
          this.hooks.info?.(`skipping directory ${shown}`, 'nonreg');
          return;
        }
        await this.dir(src, st, dst, name, rel, rootDev, levels);
      } else if (st.isFile()) {
        // Before -H takes it: the other links of a file left alone are left alone too.
        if (this.outsideSizes(st, rel)) return;
        if (!this.links?.defer(st, rel)) await this.file(src, st, dst, name, rel);
      } else if (st.isSymbolicLink()) {
        this.stats.symlinks = (this.stats.symlinks ?? 0) + 1;
        if (!this.opts.links) {
          // Listed all the same: rsync counts the link's length in the total size.
          this.stats.totalSize += Number(st.size);
          return this.hooks.info?.(`skipping non-regular file "${shown}"`, 'nonreg');
        }
        if (!this.links?.defer(st, rel)) await this.symlink(src, st, dst, name, rel);
      } else {
        const dev = st.isCharacterDevice() || st.isBlockDevice();
        if (dev) this.stats.devices = (this.stats.devices ?? 0) + 1;
        else this.stats.specials = (this.stats.specials ?? 0) + 1;
        if (dev ? !this.opts.devices : !this.opts.specials) return this.hooks.info?.(`skipping non-regular file "${shown}"`, 'nonreg');
        if (!this.links?.defer(st, rel)) await this.special(src, st, dst, name, rel);
      }
    } catch (e) {
      this.fail(e, shown);
    }
  }

  /** --max-size/--min-size: a file outside is counted, and left alone whatever is in DEST (rsync says so with -vv). */
  private outsideSizes(st: BigIntStats, rel: string): boolean {
    const { maxSize = -1, minSize = -1 } = this.opts;
    const over = maxSize >= 0 && st.size > BigInt(maxSize);
    if (!over && !(minSize >= 0 && st.size < BigInt(minSize))) return false;
    this.stats.regularFiles++;
    this.stats.totalSize += Number(st.size);
    this.hooks.info?.(`${rel} is ${over ? 'over max' : 'under min'}-size`, 'skip');
    return true;
  }

  /**
   * rsync's --existing (nothing new is created: no file, folder, link or
   * node, and nothing below a folder not made) and --ignore-existing
   * (anything but a folder that exists, of whatever type, is left alone; a
   * folder whose name holds something else cannot be entered: exit 23).
   */
  /** An entry --existing or --ignore-existing leaves alone is in rsync's list all the same, with what is below it: counted in the totals. */
  private async countSkipped(src: Here, st: BigIntStats, rel: string, rootDev: bigint, levels: number | undefined): Promise<void> {
    const total = { entries: 0, size: st.isFile() || st.isSymbolicLink() ? Number(st.size) : 0, dirs: st.isDirectory() ? 1 : 0, links: st.isSymbolicLink() ? 1 : 0 };
    if (st.isDirectory() && (this.opts.recursive || levels !== undefined)) {
      const d = await src.dir.openDir(src.name).catch(() => undefined);
      if (d) await this.countBelow(total, d, st, rel, rootDev, levels).finally(() => d.close());
    }
    this.stats.files += total.entries;
    this.stats.totalSize += total.size;
    this.stats.dirs += total.dirs;
    this.stats.symlinks = (this.stats.symlinks ?? 0) + total.links;
  }

  private async skipByExistence(st: BigIntStats, dst: Dir | undefined, name: string, rel: string): Promise<boolean> {
    if (!name) return false;
    const cur = await dst?.lstatOrUndefined(name);
    if (this.opts.existing && !cur) return true;
    if (!this.opts.ignoreExisting || !cur) return false;
    if (!st.isDirectory()) return true;
    if (cur.isDirectory()) return false;
    throw new QsyncError('TARGET', `opendir ${join(this.plan.destRoot, rel)} failed: not a directory (--ignore-existing leaves what is there)`, { file: rel });
  }

  /**
   * Remove what stands at `name` in `dst` when it is of another type than
   * `want`, as rsync makes way: a folder in the way goes with its contents
   * only under --delete (excluded names in it are kept, and keep it), else
   * only when empty. Returns the stat left.
   */
  private clearOtherType(dst: Dir | undefined, name: string, want: Kind, rel: string): Promise<BigIntStats | undefined> | BigIntStats | undefined {
    const cur = dst?.lstatSync(name, 'undefined');
    // Nothing there, or of the same type: no promise (once per entry of a walk).
    if (!cur || kindOf(cur) === want) return cur;
    return this.makeWay(dst!, name, want, rel, cur);
  }

  private async makeWay(dst: Dir, name: string, want: Kind, rel: string, cur: BigIntStats): Promise<undefined> {
    if (cur.isDirectory()) {
      const skipped = this.skippedDeletes;
      const wipes = this.opts.delete || this.opts.force;
      const gone = wipes ? await this.deleteEntry(dst!, name, rel, cur, 'make-room') : await this.rmdirIfEmpty(dst!, name, rel, 1);
      if (!gone) {
        throw new QsyncError('TARGET', `could not make way for new ${MAKE_WAY_WORD[want]}: ${rel}`, {
          file: rel,
          hint: !wipes
            ? 'remove the folder, or run with --force or --delete'
            : this.skippedDeletes > skipped
              ? 'the --max-delete limit stopped the deletions inside it'
              : 'the folder holds excluded names, which --delete keeps',
        });
      }
    } else if (!this.noWrite) await dst.unlink(name);
    return undefined;
  }

  private async dir(src: Here, st: BigIntStats, dst: Dir | undefined, name: string, rel: string, rootDev: bigint, levels?: number): Promise<void> {
    this.stats.dirs++;
    const cur = await this.clearOtherType(dst, name, 'dir', rel);
    if (!cur) {
      // 0700 until its contents are done; its own mode comes last, through its descriptor.
      if (!this.noWrite) await dst!.mkdir(name, 0o700).catch((e) => {
        throw new QsyncError('TARGET', `cannot create directory ${join(this.plan.destRoot, rel)}: ${(e as Error).message}`, { file: rel }, { cause: e });
      });
      this.stats.created++;
    }
    let srcDir: SourceDir | undefined;
    let dstDir: Dir | undefined;
    try {
      try {
        srcDir = await src.dir.openDir(src.name).catch((e) => {
          const errno = errnoOf(e);
          const shown = src.dir.shown(src.name);
          if (errno === 'ENOENT' || errno === 'ELOOP' || errno === 'ENOTDIR') throw new QsyncError('SOURCE', `file has vanished: ${shown}`, { file: rel, vanished: true });
          this.listError = true;
          throw new QsyncError('SOURCE', `opendir "${this.ctx.sources.remote ? shown : resolve(shown)}" failed: ${rsyncErrnoText(e)}`, { file: rel }, { cause: e });
        });
        await this.checkSame(srcDir, st, rel);
      } catch (e) {
        // Listed, then unreadable or gone: its folder here is reported and gets the listed metadata, as rsync gives it (a new one: not 0700).
        if (!this.noWrite) await setMetaAt(dst!, name, cur ?? (await dst!.lstat(name)), this.metaFor(st, !cur, true)).catch(() => {});
        this.report({ path: `${rel}/`, kind: 'dir', created: !cur, changes: cur ? this.metaChanges(st, cur) : undefined, size: 0, length: st.size });
        throw e;
      }
      if (dst && (cur || !this.noWrite)) {
        dstDir = await dst.openDir(name).catch((e) => {
          // Gone (ENOENT) is the destination's doing too: not a source that vanished.
          throw errnoOf(e) === 'ELOOP' || errnoOf(e) === 'ENOTDIR' || errnoOf(e) === 'ENOENT'
            ? new QsyncError('TARGET', `${rel} in the destination was replaced by something other than a folder while qsync worked; nothing written into it`, { file: rel, hint: 'run again' }, { cause: e })
            : e;
        });
      }
      await this.dirBody(srcDir, st, dstDir, cur, rel, rootDev, levels);
    } finally {
      await srcDir?.close();
      await dstDir?.close();
    }
  }

  /**
   * The entries of source folder `src` (at `rel`) the transfer takes, in
   * rsync's list order: its non-folders, then its folders, each sorted by
   * bytes. Not `quiet`: an entry that cannot be read is reported as failed.
   */
  private async listChildren(src: SourceDir, rel: string, quiet = false): Promise<StatList> {
    const files = new StatList();
    const dirs: { name: string; st: BigIntStats }[] = [];
    for (const name of (await src.readdir()).sort(compareNames)) {
      const childRel = joinRel(rel, name);
      let cst: BigIntStats;
      try {
        const raw = src instanceof Dir ? src.lstatSync(name) : await src.lstat(name);
        cst = this.chmod.length || this.ids ? await this.seen(raw) : raw;
      } catch (e) {
        if (!quiet) this.fail(e, childRel);
        continue;
      }
      if (this.filter.excluded(childRel, cst.isDirectory())) continue;
      if (this.isStateBase(cst)) {
        if (!quiet) this.hooks.notice?.(`skipping ${childRel}/: it is qsync's state folder`, childRel);
        continue;
      }
      // -m: a folder with nothing to copy below it is not in the transfer (so --delete removes one in DEST).
      if (this.opts.pruneEmptyDirs && cst.isDirectory() && !(await this.holdsNonDir(src, name, childRel))) continue;
      if (cst.isDirectory()) dirs.push({ name, st: cst });
      else files.push(name, cst);
    }
    for (const d of dirs) files.push(d.name, d.st);
    return files;
  }

  /** Whether the walk goes into a folder's contents (-x, -d levels). */
  private walksInto(st: BigIntStats, rootDev: bigint, levels: number | undefined): boolean {
    return (!this.opts.oneFileSystem || st.dev === rootDev) && levels !== 0 && !(this.destRoot && st.dev === this.destRoot.dev && st.ino === this.destRoot.ino);
  }

  /**
   * DEST's own folder, when the sources are here: met in a source (DEST
   * inside SRC, as "qsync -a ./ D/"), it is made and not walked, as the copy
   * in it would be walked again without end (rsync, whose list is taken
   * ahead, finds it empty).
   */
  private destRoot?: { dev: bigint; ino: bigint };

  /**
   * A source folder could not be read: as rsync, no deletion after it (what
   * the list lacks might be there), said once.
   */
  private listError = false;
  private listErrorSaid = false;

  /** Add to `total` the entries below folder `d` (`st`) the walk would list, and the bytes of their files and link targets. */
  private async countBelow(total: { entries: number; size: number; dirs?: number; links?: number }, d: SourceDir, st: BigIntStats, rel: string, rootDev: bigint, lv: number | undefined): Promise<void> {
    if (!this.walksInto(st, rootDev, lv)) return;
    const list = await this.listChildren(d, rel, true);
    for (let i = 0; i < list.length; i++) {
      const name = list.names[i]!;
      const cst = list.stat(i);
      total.entries++;
      if (cst.isFile() || cst.isSymbolicLink()) total.size += Number(cst.size);
      if (cst.isSymbolicLink() && total.links !== undefined) total.links++;
      if (!cst.isDirectory()) continue;
      if (total.dirs !== undefined) total.dirs++;
      if (!this.opts.recursive && lv === undefined) continue;
      const sub = await d.openDir(name).catch(() => undefined);
      if (!sub) continue;
      try {
        await this.countBelow(total, sub, cst, joinRel(rel, name), rootDev, lv === undefined ? undefined : lv - 1);
      } finally {
        await sub.close();
      }
    }
  }

  /** The file list the walk will go through, counted first (countFirst): entries, and bytes of files and link targets. */
  private async count(): Promise<{ entries: number; size: number }> {
    const total = { entries: 0, size: 0 };
    const levels = this.opts.dirs && !this.opts.recursive ? 1 : undefined;
    const below = (d: SourceDir, st: BigIntStats, rel: string, rootDev: bigint, lv: number | undefined) => this.countBelow(total, d, st, rel, rootDev, lv);
    for (const t of this.plan.transfers) {
      total.entries++;
      const st = await this.seen(t.stat);
      if (st.isFile() || st.isSymbolicLink()) total.size += Number(st.size);
      if (!st.isDirectory()) continue;
      try {
        if (t.destRel === '') {
          const d = await this.ctx.sources.openOperand(t.operand);
          await below(d, st, '', st.dev, levels).finally(() => d.close());
        } else if (this.opts.recursive) {
          const parent = await this.ctx.sources.openParent(t.operand);
          const d = await parent.dir.openDir(parent.name).finally(() => parent.dir.close());
          await below(d, st, t.destRel, st.dev, undefined).finally(() => d.close());
        }
      } catch {
        // The walk reports what cannot be read.
      }
    }
    return total;
  }

  /** A folder's contents, then its own metadata (after them: a read-only or timed folder stays so). */
  private async dirBody(src: SourceDir, st: BigIntStats, dst: Dir | undefined, cur: BigIntStats | undefined, rel: string, rootDev: bigint, levels?: number): Promise<void> {
    const attrs = this.ext && (await this.ext.read(await attrSource(src, undefined, st), dst && { held: dst }, 'dir'));
    const changes = cur ? this.metaChanges(st, cur) : undefined;
    const walks = this.walksInto(st, rootDev, levels);
    // rsync -x: a mount point is created, its contents are not copied.
    const children = walks ? await this.listChildren(src, rel) : new StatList();
    // Not root: an existing folder of one's own that one cannot write or enter is opened up
    // while its contents are synced (its mode is set again after them), as rsync does.
    const opened = !this.noWrite && dst !== undefined && cur !== undefined && ME !== 0 && cur.uid === BigInt(ME) && (cur.mode & 0o300n) !== 0o300n;
    if (opened) await dst.setMeta({ mode: Number(cur.mode & 0o7777n) | 0o300 });
    // rsync deletes in a folder as its list starts, and names the folder after (its line waits in rsync's output buffer).
    if (walks && this.opts.delete && cur && dst) {
      if (!this.listError) await this.deleteExtraneous(rel, dst, new Set(children.names));
      else if (!this.listErrorSaid) {
        this.listErrorSaid = true;
        this.hooks.info?.('IO error encountered -- skipping file deletion', 'always');
      }
    }
    this.report({ path: rel ? `${rel}/` : './', kind: 'dir', created: !cur, changes: changes && (attrs?.letters(changes, st, cur, false) ?? changes), size: 0, length: st.size, st, source: rel ? src.shown('.').replace(/\/\.$/, '') : src.shown('.') });
    if (walks) {
      const start = this.nextList;
      this.nextList += children.length;
      const { names } = children;
      // -A/-X: the children's attributes, both sides, in a few tool runs rather than one each.
      if (src instanceof Dir) await this.ext?.prefetch(src, names);
      if (cur) await this.ext?.prefetch(dst, names);
      for (let i = 0; i < names.length; i++) {
        const childRel = joinRel(rel, names[i]!);
        this.at = { rel: childRel, index: start + i };
        await this.entry({ dir: src, name: names[i]! }, children.stat(i), dst, childRel, rootDev, levels === undefined ? undefined : levels - 1);
      }
      // An entry skipped or failed was never reported.
      this.at = undefined;
      // New entries' attributes, written together.
      await this.ext?.flush().catch((e) => this.fail(e, rel || '.'));
    }
    if (!this.noWrite && dst) {
      try {
        const m = this.metaFor(st, !cur, true);
        // Without -p, a new folder keeps the setgid bit the kernel gave it in a setgid parent, as with rsync.
        if (!cur && !this.opts.perms && m.mode !== undefined) m.mode |= Number((await dst.stat()).mode & 0o2000n);
        await dst.setMeta(opened && m.mode === undefined ? { ...m, mode: Number(cur.mode & 0o7777n) } : m);
        await attrs?.apply();
      } catch (e) {
        this.fail(e, rel || '.');
      }
    }
  }

  /**
   * -m (rsync's prune of empty directory chains): whether anything but
   * folders, not excluded, lies below the source folder `name`. A folder
   * that cannot be read counts as holding something: the walk reports it.
   */
  private async holdsNonDir(parent: SourceDir, name: string, rel: string): Promise<boolean> {
    let d: SourceDir;
    try {
      d = await parent.openDir(name);
    } catch {
      return true;
    }
    try {
      const subdirs: string[] = [];
      for (const n of await d.readdir()) {
        const r = joinRel(rel, n);
        const st = await d.lstat(n).catch(() => undefined);
        if (!st || this.filter.excluded(r, st.isDirectory()) || this.isStateBase(st)) continue;
        if (!st.isDirectory()) return true;
        subdirs.push(n);
      }
      for (const n of subdirs) if (await this.holdsNonDir(d, n, joinRel(rel, n))) return true;
      return false;
    } catch {
      return true;
    } finally {
      await d.close();
    }
  }

  private isStateBase(st: BigIntStats): boolean {
    const b = this.opts.stateBase;
    return b !== undefined && st.isDirectory() && st.ino === b.ino && st.dev === b.dev;
  }

  /** --delete: the names in `dst` the source does not have (rsync's order: reverse, by bytes). */
  private async deleteExtraneous(rel: string, dst: Dir, keep: Set<string>): Promise<void> {
    for (const { name, st } of deleteOrder(dst, (await dst.readdir()).filter((n) => !keep.has(n)))) {
      await this.deleteChild(dst, name, joinRel(rel, name), st, 'top');
    }
  }

  /** Delete one name found in a folder being cleared (`st`: its lstat as deleteOrder took it), unless excluded; true when it is gone. */
  private async deleteChild(dir: Dir, name: string, rel: string, st: BigIntStats | undefined, level: 'top' | 'nested'): Promise<boolean> {
    try {
      if (!st) return true;
      // Excluded names are protected from deletion, as in rsync without --delete-excluded.
      if (this.opts.protect?.excluded(rel, st.isDirectory())) return false;
      if (!this.opts.deleteExcluded && this.filter.excluded(rel, st.isDirectory())) return false;
      if (this.isStateBase(st)) {
        this.hooks.notice?.(`not deleting ${rel}/: it is qsync's state folder`, rel);
        return false;
      }
      return await this.deleteEntry(dir, name, rel, st, level);
    } catch (e) {
      this.fail(e, rel);
      return false;
    }
  }

  /**
   * rsync's delete of an entry: a folder's contents first (the filter
   * applies inside it too: excluded names stay, and so does their folder,
   * "cannot delete non-empty directory"), then the folder. Each removal is
   * reported, except the folder itself when it only makes way for an entry
   * of another type. Folders are walked by descriptor, never through a symlink.
   */
  private async deleteEntry(dir: Dir, name: string, rel: string, st: BigIntStats, level: 'top' | 'nested' | 'make-room'): Promise<boolean> {
    if (st.isDirectory()) {
      let kept = false;
      // Not root: a read-only folder of one's own is made writable to empty it, as rsync does.
      if (ME !== 0 && st.uid === BigInt(ME) && !(st.mode & 0o200n) && !this.noWrite) {
        await setMetaAt(dir, name, st, { mode: Number(st.mode & 0o7777n) | 0o200 });
      }
      const sub = await dir.openDir(name);
      try {
        for (const { name: n, st: nst } of deleteOrder(sub, await sub.readdir())) {
          if (!(await this.deleteChild(sub, n, joinRel(rel, n), nst, 'nested'))) kept = true;
        }
      } finally {
        await sub.close();
      }
      // rsync says it once for what it kept inside, and a second time when it then tries to
      // remove a folder below the one it deletes (unless --max-delete stops it first).
      if (kept) this.hooks.info?.(`cannot delete non-empty directory: ${rel}`, 'always');
      if (kept && level !== 'nested') return false;
      if (this.atDeleteLimit(level)) return false;
      if (kept) {
        this.hooks.info?.(`cannot delete non-empty directory: ${rel}`, 'always');
        return false;
      }
      // -n: the folder would be empty once its contents are gone.
      if (!this.noWrite && !(await this.rmdirIfEmpty(dir, name, rel, level === 'nested' ? 2 : 1))) return false;
      if (!this.noWrite) await forgetManifests(this.plan.destRoot, stateRel(rel), true);
    } else {
      if (this.atDeleteLimit(level)) return false;
      if (!this.noWrite) {
        await dir.unlink(name);
        if (st.isFile()) await forgetManifests(this.plan.destRoot, stateRel(rel), false);
      }
    }
    this.stats.deleted++;
    if (level !== 'make-room') this.hooks.deleted?.(this.shownPrefix + (st.isDirectory() ? `${rel}/` : rel));
    return true;
  }

  /** --max-delete reached: this deletion is skipped and counted (making way for another type is no deletion). */
  private atDeleteLimit(level: 'top' | 'nested' | 'make-room'): boolean {
    const max = this.opts.maxDelete ?? -1;
    if (level === 'make-room' || max < 0 || this.stats.deleted < max) return false;
    this.skippedDeletes++;
    return true;
  }

  /** rmdir (-n: whether it would work); a folder that is not empty stays, and rsync's line says so (`times` times). */
  private async rmdirIfEmpty(dir: Dir, name: string, rel: string, times: number): Promise<boolean> {
    let gone: boolean;
    if (this.noWrite) {
      const sub = await dir.openDir(name);
      gone = (await sub.readdirRaw().finally(() => sub.close())).length === 0;
    } else {
      gone = await dir.rmdir(name).then(
        () => true,
        (e) => {
          if (errnoOf(e) !== 'ENOTEMPTY' && errnoOf(e) !== 'EEXIST') throw e;
          return false;
        },
      );
    }
    if (!gone) for (let i = 0; i < times; i++) this.hooks.info?.(`cannot delete non-empty directory: ${rel}`, 'always');
    return gone;
  }

  private async file(src: Here, st: BigIntStats, dst: Dir | undefined, name: string, rel: string): Promise<void> {
    this.stats.regularFiles++;
    this.stats.totalSize += Number(st.size);
    if (this.opts.claim?.(st, rel)) return;
    const cur = await this.clearOtherType(dst, name, 'file', rel);
    // -A/-X: the target's attributes as they were, before a rewrite may replace its inode.
    const attrs = await this.ext?.read(await attrSource(src.dir, src.name, st), cur && { dir: dst!, name, expect: cur }, 'other');
    const shown = src.dir.shown(src.name);
    const { opts, plan } = this;
    const meta = () => this.metaFor(st, !cur, true);
    // The target's path, metadata and manifest are made when asked for: a small file unchanged needs none.
    const r = await syncFile({
      src: shown, srcStat: st, srcDir: src.dir, srcName: src.name,
      get dst() { return join(plan.destRoot, rel); },
      dstStat: cur, dstDir: dst, dstName: name,
      get meta() { return meta(); },
      get manifestPath() { return opts.manifest ?? manifestPathFor(plan.destRoot, stateRel(rel)); },
      relPath: rel,
    }, this.opts, this.ctx);
    if (!r) return; // --existing / --ignore-existing / --update
    // -c: data found identical was not sent (rsync's checksums say so before sending): only attributes changed.
    const sent = r.transferred && !(this.opts.checksum && !this.noWrite && !r.created && r.literal === 0 && cur!.size === st.size);
    if (sent) {
      this.stats.transferred++;
      this.stats.transferredSize += Number(st.size);
      if (r.created) this.stats.created++;
    }
    this.stats.literal += r.literal;
    this.stats.matched += r.matched;
    this.stats.scanned += r.scanned;
    let changes = cur ? this.metaChanges(st, cur, sent && !r.created) : undefined;
    // A transferred file got its metadata through its descriptor; an unchanged one gets owner and mode here,
    // and its time when it differs (--size-only), as rsync does.
    const timeDiffers = cur !== undefined && !sameMtime(cur.mtimeNs, st.mtimeNs, this.opts.modifyWindow);
    // Owner, group and mode as they are, the time too: nothing to set (what setMetaAt would find).
    const same = (c: BigIntStats) => !timeDiffers && c.uid === st.uid && c.gid === st.gid && c.mode === st.mode;
    if (!this.noWrite && !r.transferred && !same(cur!)) await setMetaAt(dst!, name, cur!, this.metaFor(st, false, timeDiffers));
    if (attrs) {
      if (changes) changes = attrs.letters(changes, st, cur, r.transferred);
      // The inode written, or the target as it was when nothing was: nothing else under the name gets the attributes.
      await attrs.apply({ dir: dst!, name, expect: st, inode: r.inode ?? cur });
    }
    this.report({ path: rel, kind: 'file', created: !cur, changes, size: Number(st.size), result: sent === r.transferred ? r : { ...r, transferred: sent }, st, source: shown });
  }

  private async symlink(src: Here, st: BigIntStats, dst: Dir | undefined, name: string, rel: string): Promise<void> {
    const target = await src.dir.readlink(src.name);
    // rsync counts a link's length (its target's bytes) in the total size.
    this.stats.totalSize += encodeName(target).length;
    // --safe-links: one leading out of the transfer stays in the list (what DEST has under its name is not deleted), but is not made.
    if (this.opts.safeLinks && unsafeLink(target, rel.split('/').length - 1)) {
      this.hooks.info?.(`ignoring unsafe symlink "${rel}" -> "${target}"`, 'misc');
      return;
    }
    const cur = await this.clearOtherType(dst, name, 'symlink', rel);
    if (cur && (await dst!.readlink(name)) === target) {
      const attrs = await this.ext?.read(await attrSource(src.dir, src.name, st), { dir: dst!, name, expect: cur }, 'symlink');
      const changes = this.metaChanges(st, cur);
      if (!this.noWrite) await setMetaAt(dst!, name, cur, this.metaFor(st, false, true));
      await attrs?.apply({ dir: dst!, name, expect: st, inode: cur });
      this.report({ path: `${rel} -> ${target}`, kind: 'symlink', created: false, changes: attrs?.letters(changes, st, cur, false) ?? changes, size: 0, length: st.size, target, st, source: src.dir.shown(src.name) });
      return;
    }
    if (!this.noWrite) {
      if (cur) await dst!.unlink(name);
      await dst!.symlink(target, name);
      // The link made (a symlink cannot be held open): metadata and attributes go to it alone, not to one put in its place.
      const made = await dst!.lstat(name);
      await setMetaAt(dst!, name, made, this.metaFor(st, true, true));
      await (await this.ext?.read(await attrSource(src.dir, src.name, st), undefined, 'symlink'))?.apply({ dir: dst!, name, expect: st, inode: made });
    }
    if (!cur) this.stats.created++;
    this.report({ path: `${rel} -> ${target}`, kind: 'symlink', created: !cur, changes: cur && `c${this.metaChanges(st, cur).slice(1)}`, size: 0, length: st.size, target, st, source: src.dir.shown(src.name) });
  }

  private async special(src: Here, st: BigIntStats, dst: Dir | undefined, name: string, rel: string): Promise<void> {
    const kind = kindOf(st);
    const cur = await this.clearOtherType(dst, name, kind, rel);
    const sameNode = cur && cur.rdev === st.rdev && (cur.mode & 0o170000n) === (st.mode & 0o170000n);
    const attrs = await this.ext?.read(await attrSource(src.dir, src.name, st), sameNode ? { dir: dst!, name, expect: cur } : undefined, 'other');
    if (!sameNode && !this.noWrite) await makeNode(dst!, name, st);
    if (!cur) this.stats.created++;
    const made = this.noWrite ? undefined : await dst!.lstat(name);
    if (made) await setMetaAt(dst!, name, made, this.metaFor(st, !cur, true));
    await attrs?.apply({ dir: dst!, name, expect: st, inode: made });
    const changes = cur && (sameNode ? this.metaChanges(st, cur) : `c${this.metaChanges(st, cur).slice(1)}`);
    this.report({ path: rel, kind, created: !cur, changes: sameNode && changes ? (attrs?.letters(changes, st, cur, false) ?? changes) : changes, size: 0, length: st.size, st, source: src.dir.shown(src.name) });
  }

  /** What the hard-link pass (src/sync/hard-links.ts) needs of the walk. */
  private linkHost(): HardLinkHost {
    return {
      sources: this.ctx.sources,
      dest: this.dest,
      noWrite: this.noWrite,
      syncEntry: (src, st, dst, name, rel) =>
        st.isFile() ? this.file(src, st, dst, name, rel) : st.isSymbolicLink() ? this.symlink(src, st, dst, name, rel) : this.special(src, st, dst, name, rel),
      counted: (st) => {
        if (!st.isFile()) return;
        this.stats.regularFiles++;
        this.stats.totalSize += Number(st.size);
      },
      report: (r) => this.hooks.fileEnd?.(r),
      fail: (e, rel) => this.fail(e, rel),
      forgetManifest: (rel) => forgetManifests(this.plan.destRoot, stateRel(rel), false),
      dirMeta: (st) => this.metaFor(st, false, true),
      changes: (src, dst) => this.metaChanges(src, dst),
      skips: (st, cur) =>
        cur ? this.opts.ignoreExisting || (this.opts.update && cur.isFile() && newerOnReceiver(st.mtimeNs, cur.mtimeNs, this.opts.modifyWindow)) : this.opts.existing,
      attrLetters:
        this.ext &&
        (async (src, st, dst, name, cur, changes) => {
          const kind = st.isSymbolicLink() ? 'symlink' : 'other';
          return (await this.ext!.read(await attrSource(src.dir, src.name, st), { dir: dst, name, expect: cur }, kind)).letters(changes, st, cur, true);
        }),
    };
  }

  /** rsync's itemize attribute letters (positions c s t p o g) for an existing entry. */
  private metaChanges(src: BigIntStats, dst: BigIntStats, contentChanged = false): string {
    const o = this.opts;
    const isFile = src.isFile();
    const c = contentChanged && o.checksum ? 'c' : '.';
    const s = isFile && src.size !== dst.size ? 's' : '.';
    const tDiff = !sameMtime(src.mtimeNs, dst.mtimeNs, o.modifyWindow);
    // -O: a folder's time is not kept, so not compared.
    const keepsTime = o.preserveTimes && !(o.omitDirTimes && src.isDirectory());
    const t = src.isSymbolicLink() && !o.preserveTimes ? '.' : keepsTime ? (tDiff ? 't' : '.') : contentChanged ? 'T' : '.';
    const p = o.perms && !src.isSymbolicLink() && (src.mode & 0o7777n) !== (dst.mode & 0o7777n) ? 'p' : '.';
    // Not root: owners cannot be set, nor groups one is not in; rsync says nothing of them.
    const ow = o.owner && ME === 0 && src.uid !== dst.uid ? 'o' : '.';
    const g = o.group && src.gid !== dst.gid && mayGiveGroup(src.gid) ? 'g' : '.';
    return `${c}${s}${t}${p}${ow}${g}`;
  }

  /**
   * `length`: the source's st_size (a folder's, a link's target length), for
   * --log-file's %l; `st` and `source` (its path on this side) for the other
   * escapes of --out-format and --log-file-format.
   */
  private report(r: { path: string; kind: Kind; created: boolean; changes?: string; size: number; length?: bigint; target?: string; result?: FileSyncResult; st?: BigIntStats; source?: string }): void {
    const y = r.kind === 'file' ? (r.result?.transferred ? '>' : '.') : r.created || r.changes?.startsWith('c') ? 'c' : '.';
    const rest = r.created ? '+++++++++' : (r.changes ?? '').padEnd(9, '.');
    const unchanged = !r.created && !r.result?.transferred && !/[^.]/.test(r.changes ?? '');
    const rel = r.kind === 'dir' ? r.path.replace(/\/$/, '').replace(/^\.$/, '') : r.target !== undefined ? r.path.slice(0, -(r.target.length + 4)) : r.path;
    let index: number | undefined;
    if (this.at?.rel === rel) {
      index = this.at.index;
      this.at = undefined;
    } else {
      index = this.indexOf.get(rel);
      this.indexOf.delete(rel);
    }
    // What rsync's file list would carry for it, about: its name and ten bytes of attributes.
    this.stats.flistSize = (this.stats.flistSize ?? 0) + Buffer.byteLength(basename(rel)) + 10;
    this.hooks.fileEnd?.({
      path: this.shownPrefix + r.path,
      length: r.length === undefined ? r.size : Number(r.length),
      target: r.target,
      itemize: `${y}${TYPE_CHAR[r.kind]}${rest}`,
      kind: r.kind,
      size: r.size,
      method: r.result?.method,
      scanned: r.result?.scanned ?? 0,
      literal: r.result?.literal ?? 0,
      matched: r.result?.matched ?? 0,
      unchanged,
      index,
      source: r.source,
      ...(r.st && { mtime: Number(r.st.mtimeNs / 1_000_000_000n), uid: Number(r.st.uid), gid: Number(r.st.gid), mode: Number(r.st.mode) }),
    });
  }

  /** Owner, group, mode, and (`times`) the times an entry gets from its source, as rsync's options say. */
  private metaFor(st: BigIntStats, created: boolean, times: boolean): MetaChange {
    const o = this.opts;
    const m: MetaChange = {};
    if ((o.owner || o.group) && ME === 0) {
      if (o.owner) m.uid = Number(st.uid);
      if (o.group) m.gid = Number(st.gid);
    } else if (o.group && mayGiveGroup(st.gid)) m.gid = Number(st.gid);
    if (!st.isSymbolicLink()) {
      const mode = Number(st.mode & 0o7777n);
      if (o.perms) m.mode = mode;
      // rsync without -p: a new entry gets the source's permissions less the umask, never setuid, setgid or sticky.
      else if (created) m.mode = mode & 0o777 & ~UMASK;
    }
    if (times && o.preserveTimes && !(o.omitDirTimes && st.isDirectory())) {
      m.atime = nsToSeconds(st.atimeNs);
      m.mtime = nsToSeconds(st.mtimeNs);
    }
    return m;
  }
}

/**
 * rsync's --safe-links test, lexical, as its manual states it: an empty or
 * absolute target is unsafe; so is one whose leading `..` parts climb above
 * the transfer's top from the folder the link is in (`depth` folders below
 * it), and one with a `..` anywhere after its leading ones.
 */
export function unsafeLink(target: string, depth: number): boolean {
  if (!target || target.startsWith('/')) return true;
  const parts = target.split('/');
  let i = 0;
  let up = 0;
  for (; i < parts.length && (parts[i] === '..' || parts[i] === '.' || parts[i] === ''); i++) if (parts[i] === '..') up++;
  return up > depth || parts.slice(i).includes('..');
}

/** rsync's order of deletions in a folder: its list (non-folders, then folders, each by bytes) from the end. */
function deleteOrder(dir: Dir, names: string[]): { name: string; st: BigIntStats | undefined }[] {
  // Each name's lstat, taken once: deleteChild decides with it (undefined: gone meanwhile).
  const all = names.sort(compareNames).map((name) => ({ name, st: dir.lstatSync(name, 'undefined') }));
  return [...all.filter((e) => !e.st?.isDirectory()), ...all.filter((e) => e.st?.isDirectory())].reverse();
}

/**
 * Make a FIFO, device or socket like `st` at `name`: made under a temporary
 * name (plain ASCII, whatever `name` is) and renamed into place. mkfifo and
 * mknod run in a child, reaching the held folder through this process's
 * descriptor; a socket is made by binding one (as rsync does where mknod
 * cannot make sockets), renamed, then the listener is closed.
 */
async function makeNode(dir: Dir, name: string, st: BigIntStats): Promise<void> {
  const tmp = `.qsync-node.${randomBytes(6).toString('hex')}`;
  const at = `/proc/${process.pid}/fd/${dir.fd}/${tmp}`;
  try {
    if (st.isFIFO()) await run('mkfifo', [at]);
    else if (st.isSocket()) {
      const server = createServer();
      await new Promise<void>((ok, fail) => {
        server.once('error', fail);
        server.listen(at, ok);
      });
      // Closing a listener unlinks its path: the socket takes its real name first.
      try {
        await dir.rename(tmp, dir, name);
      } finally {
        await new Promise((done) => server.close(done));
      }
      return;
    } else {
      const [major, minor] = majorMinor(Number(st.rdev));
      await run('mknod', [at, st.isBlockDevice() ? 'b' : 'c', String(major), String(minor)]);
    }
    await dir.rename(tmp, dir, name);
  } catch (e) {
    await dir.unlink(tmp).catch(() => {});
    throw e;
  }
}
