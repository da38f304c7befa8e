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
import type { BigIntStats } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { errnoOf, QsyncError } from '../core/errors.js';
import type { Filter } from '../core/filter.js';
import type { FileReport, RunStats, SyncHooks } from './events.js';
import { syncFile, nsToSeconds, type FileSyncContext, type FileSyncOptions, type FileSyncResult } from './file-sync.js';
import { majorMinor } from '../io/dev-numbers.js';
import { Dir, removeTreeAt, setMetaAt, type MetaChange } from '../io/safe-fs.js';
import { forgetManifests, manifestPathFor, STATE_DIR } from './manifest-store.js';
import { joinRel, type Plan, type Transfer } from './operands.js';

export interface TreeOptions extends FileSyncOptions {
  recursive: boolean;
  links: boolean;
  perms: boolean;
  owner: boolean;
  group: boolean;
  devices: boolean;
  specials: boolean;
  delete: boolean;
  oneFileSystem: boolean;
  /** --manifest PATH: only for a single-file transfer. */
  manifest?: string;
}

/** Outcome flags the CLI turns into rsync's exit codes. */
export interface TreeOutcome {
  stats: RunStats;
  /** Some entries failed (rsync 23). */
  partial: boolean;
  /** Some source entries vanished while walking (rsync 24). */
  vanished: boolean;
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

type Kind = FileReport['kind'];
const kindOf = (s: BigIntStats): Kind =>
  s.isFile() ? 'file' : s.isDirectory() ? 'dir' : s.isSymbolicLink() ? 'symlink' : s.isCharacterDevice() || s.isBlockDevice() ? 'device' : 'special';
const TYPE_CHAR: Record<Kind, string> = { file: 'f', dir: 'd', symlink: 'L', device: 'D', special: 'S' };

/** A source the walk reaches: its folder (held) and name in it. */
interface Here {
  dir: Dir;
  name: string;
}

export class TreeSync {
  private readonly stats: RunStats = {
    files: 0, regularFiles: 0, dirs: 0, created: 0, deleted: 0, transferred: 0,
    totalSize: 0, transferredSize: 0, literal: 0, matched: 0, scanned: 0, elapsedMs: 0,
  };
  private partial = false;
  private vanished = false;

  /** `dest`: the destination root, held (undefined only with -n when it does not exist yet). */
  constructor(
    private readonly plan: Plan,
    private readonly opts: TreeOptions,
    private readonly filter: Filter,
    private readonly ctx: FileSyncContext,
    private readonly dest: Dir | undefined,
  ) {}

  /** -n, or --only-write-batch (only file contents are recorded): the destination is left alone. */
  private get noWrite(): boolean {
    return this.opts.dryRun || this.opts.recordOnly === true;
  }

  private get hooks(): SyncHooks {
    return this.ctx.hooks;
  }

  async run(): Promise<TreeOutcome> {
    const t0 = performance.now();
    for (const t of this.plan.transfers) await this.transfer(t);
    this.stats.elapsedMs = performance.now() - t0;
    return { stats: this.stats, partial: this.partial, vanished: this.vanished };
  }

  /** One operand: its folder contents into the destination root, or the operand itself into it. */
  private async transfer(t: Transfer): Promise<void> {
    const shown = t.destRel || '.';
    if (t.destRel === '') {
      // SRC/ (or .): the operand is the folder itself; the user's path to it is followed, as rsync does.
      let src: Dir | undefined;
      try {
        this.stats.files++;
        src = await Dir.open(t.operand);
        await this.checkSame(src, t.stat, t.operand);
        const cur = this.plan.destCreated ? undefined : await this.dest?.stat();
        this.stats.dirs++;
        if (!cur) this.stats.created++;
        await this.dirBody(src, t.stat, this.dest, cur, '', t.stat.dev);
      } catch (e) {
        this.fail(e, shown);
      } finally {
        await src?.close();
      }
      return;
    }
    const abs = resolve(t.operand);
    let parent: Dir;
    try {
      parent = await Dir.open(dirname(abs));
    } catch (e) {
      this.fail(e, shown);
      return;
    }
    try {
      await this.entry({ dir: parent, name: basename(abs) }, t.stat, this.dest, t.destRel, t.stat.dev);
    } finally {
      await parent.close();
    }
  }

  /** A folder opened by the walk must be the one listed: another one in its place is skipped as vanished. */
  private async checkSame(d: Dir, listed: BigIntStats, shown: string): Promise<void> {
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
    const msg = e instanceof QsyncError ? e.message + (e.context.hint ? ` (${e.context.hint})` : '') : `${path}: ${(e as Error).message}`;
    this.hooks.warning?.(msg, path);
  }

  /** The destination side of an entry: the folder that holds it (undefined: it cannot exist, -n) and its name. */
  private async entry(src: Here, st: BigIntStats, dst: Dir | undefined, rel: string, rootDev: bigint): Promise<void> {
    const shown = rel || '.';
    const name = basename(rel);
    try {
      this.stats.files++;
      if (st.isDirectory()) {
        if (!this.opts.recursive) {
          this.hooks.notice?.(`skipping directory ${shown}`, shown);
          return;
        }
        await this.dir(src, st, dst, name, rel, rootDev);
      } else if (st.isFile()) {
        await this.file(src, st, dst, name, rel);
      } else if (st.isSymbolicLink()) {
        if (!this.opts.links) return this.hooks.notice?.(`skipping non-regular file "${shown}"`, shown);
        await this.symlink(src, st, dst, name, rel);
      } else {
        const dev = st.isCharacterDevice() || st.isBlockDevice();
        if (dev ? !this.opts.devices : !this.opts.specials) return this.hooks.notice?.(`skipping non-regular file "${shown}"`, shown);
        await this.special(st, dst, name, rel);
      }
    } catch (e) {
      this.fail(e, shown);
    }
  }

  /** Remove what stands at `name` in `dst` when it is of another type than `want`. Returns the stat left. */
  private async clearOtherType(dst: Dir | undefined, name: string, want: Kind): Promise<BigIntStats | undefined> {
    const cur = await dst?.lstatOrUndefined(name);
    if (!cur || kindOf(cur) === want) return cur;
    if (this.noWrite) return undefined;
    if (cur.isDirectory()) {
      await dst!.rmdir(name).catch((e) => {
        throw new QsyncError('TARGET', `cannot delete non-empty directory ${dst!.path}/${name} to put a ${want} there`, { file: name }, { cause: e });
      });
    } else await dst!.unlink(name);
    return undefined;
  }

  private async dir(src: Here, st: BigIntStats, dst: Dir | undefined, name: string, rel: string, rootDev: bigint): Promise<void> {
    this.stats.dirs++;
    const cur = await this.clearOtherType(dst, name, 'dir');
    if (!cur) {
      // 0700 until its contents are done; its own mode comes last, through its descriptor.
      if (!this.noWrite) await dst!.mkdir(name, 0o700).catch((e) => {
        throw new QsyncError('TARGET', `cannot create directory ${join(this.plan.destRoot, rel)}: ${(e as Error).message}`, { file: rel }, { cause: e });
      });
      this.stats.created++;
    }
    let srcDir: Dir | undefined;
    let dstDir: Dir | undefined;
    try {
      srcDir = await src.dir.openDir(src.name).catch((e) => {
        throw errnoOf(e) === 'ENOENT' || errnoOf(e) === 'ELOOP' || errnoOf(e) === 'ENOTDIR'
          ? new QsyncError('SOURCE', `file has vanished: ${rel} (${(e as Error).message})`, { file: rel, vanished: true })
          : e;
      });
      await this.checkSame(srcDir, st, rel);
      if (dst && (cur || !this.noWrite)) dstDir = await dst.openDir(name);
      await this.dirBody(srcDir, st, dstDir, cur, rel, rootDev);
    } finally {
      await srcDir?.close();
      await dstDir?.close();
    }
  }

  /** A folder's contents, then its own metadata (after them: a read-only or timed folder stays so). */
  private async dirBody(src: Dir, st: BigIntStats, dst: Dir | undefined, cur: BigIntStats | undefined, rel: string, rootDev: bigint): Promise<void> {
    const changes = cur ? this.metaChanges(st, cur) : undefined;
    this.report({ path: rel ? `${rel}/` : './', kind: 'dir', created: !cur, changes, size: 0 });
    // rsync -x: a mount point is created, its contents are not copied.
    if (!this.opts.oneFileSystem || st.dev === rootDev) {
      const keep = new Set<string>();
      const children: { name: string; st: BigIntStats }[] = [];
      for (const name of (await utf8Names(src, rel, (e, r) => this.fail(e, r), 'copy')).sort()) {
        if (rel === '' && name === STATE_DIR) continue;
        const childRel = joinRel(rel, name);
        let cst: BigIntStats;
        try {
          cst = await src.lstat(name);
        } catch (e) {
          this.fail(e, childRel);
          continue;
        }
        if (this.filter.excluded(childRel, cst.isDirectory())) continue;
        keep.add(name);
        children.push({ name, st: cst });
      }
      if (this.opts.delete && cur && dst) await this.deleteExtraneous(rel, dst, keep);
      for (const c of children) await this.entry({ dir: src, name: c.name }, c.st, dst, joinRel(rel, c.name), rootDev);
    }
    if (!this.noWrite && dst) {
      try {
        await dst.setMeta(this.metaFor(st, !cur, true));
      } catch (e) {
        this.fail(e, rel || '.');
      }
    }
  }

  private async deleteExtraneous(rel: string, dst: Dir, keep: Set<string>): Promise<void> {
    for (const name of (await utf8Names(dst, rel, (e, r) => this.fail(e, r), 'delete')).sort()) {
      if (keep.has(name) || (rel === '' && name === STATE_DIR)) continue;
      const childRel = joinRel(rel, name);
      const st = await dst.lstatOrUndefined(name);
      if (!st) continue;
      // Excluded names are protected from deletion, as in rsync without --delete-excluded.
      if (this.filter.excluded(childRel, st.isDirectory())) continue;
      this.hooks.deleted?.(st.isDirectory() ? `${childRel}/` : childRel);
      this.stats.deleted++;
      if (this.noWrite) continue;
      await removeTreeAt(dst, name);
      if (st.isFile() || st.isDirectory()) await forgetManifests(this.plan.destRoot, childRel, st.isDirectory());
    }
  }

  private async file(src: Here, st: BigIntStats, dst: Dir | undefined, name: string, rel: string): Promise<void> {
    this.stats.regularFiles++;
    this.stats.totalSize += Number(st.size);
    const cur = await this.clearOtherType(dst, name, 'file');
    const manifest = this.opts.manifest ?? manifestPathFor(this.plan.destRoot, rel);
    const r = await syncFile({
      src: join(src.dir.path, src.name), srcStat: st, srcDir: src.dir, srcName: src.name,
      dst: join(this.plan.destRoot, rel), dstStat: cur, dstDir: dst, dstName: name,
      meta: this.metaFor(st, !cur, true), manifestPath: manifest, relPath: rel,
    }, this.opts, this.ctx);
    if (!r) return; // --existing / --ignore-existing / --update
    if (r.transferred) {
      this.stats.transferred++;
      this.stats.transferredSize += Number(st.size);
      if (r.created) this.stats.created++;
    }
    this.stats.literal += r.literal;
    this.stats.matched += r.matched;
    this.stats.scanned += r.scanned;
    const changes = cur ? this.metaChanges(st, cur, r.transferred && !r.created) : undefined;
    // A transferred file got its metadata through its descriptor; an unchanged one gets owner and mode here.
    if (!this.noWrite && !r.transferred) await setMetaAt(dst!, name, cur!, this.metaFor(st, false, false));
    this.report({ path: rel, kind: 'file', created: !cur, changes, size: Number(st.size), result: r });
  }

  private async symlink(src: Here, st: BigIntStats, dst: Dir | undefined, name: string, rel: string): Promise<void> {
    const target = await src.dir.readlink(src.name);
    const cur = await this.clearOtherType(dst, name, 'symlink');
    if (cur && (await dst!.readlink(name)) === target) {
      const changes = this.metaChanges(st, cur);
      if (!this.noWrite) await setMetaAt(dst!, name, cur, this.metaFor(st, false, true));
      this.report({ path: rel, kind: 'symlink', created: false, changes, size: 0 });
      return;
    }
    if (!this.noWrite) {
      if (cur) await dst!.unlink(name);
      await dst!.symlink(target, name);
      await setMetaAt(dst!, name, await dst!.lstat(name), this.metaFor(st, true, true));
    }
    if (!cur) this.stats.created++;
    this.report({ path: `${rel} -> ${target}`, kind: 'symlink', created: !cur, changes: cur ? 'c' : undefined, size: 0 });
  }

  private async special(st: BigIntStats, dst: Dir | undefined, name: string, rel: string): Promise<void> {
    const kind = kindOf(st);
    const cur = await this.clearOtherType(dst, name, kind);
    const sameNode = cur && cur.rdev === st.rdev && (cur.mode & 0o170000n) === (st.mode & 0o170000n);
    if (!sameNode && !this.noWrite) {
      if (cur) await dst!.unlink(name);
      // mkfifo and mknod run in a child: they reach the held folder through this process's descriptor.
      const at = `/proc/${process.pid}/fd/${dst!.fd}/${name}`;
      if (st.isFIFO()) await run('mkfifo', [at]);
      else if (st.isSocket()) throw new QsyncError('UNSUPPORTED', `cannot recreate socket ${rel}`, { file: rel });
      else {
        const [major, minor] = majorMinor(Number(st.rdev));
        await run('mknod', [at, st.isBlockDevice() ? 'b' : 'c', String(major), String(minor)]);
      }
    }
    if (!cur) this.stats.created++;
    // rsync leaves the times of devices and fifos alone.
    if (!this.noWrite) await setMetaAt(dst!, name, await dst!.lstat(name), this.metaFor(st, !cur, false));
    this.report({ path: rel, kind, created: !cur, changes: cur && !sameNode ? 'c' : cur ? this.metaChanges(st, cur) : undefined, size: 0 });
  }

  /** rsync's itemize attribute letters (positions c s t p o g) for an existing entry. */
  private metaChanges(src: BigIntStats, dst: BigIntStats, contentChanged = false): string {
    const o = this.opts;
    const isFile = src.isFile();
    const c = contentChanged && o.checksum ? 'c' : '.';
    const s = isFile && src.size !== dst.size ? 's' : '.';
    const tDiff = src.mtimeNs / 1000n !== dst.mtimeNs / 1000n;
    const t = src.isSymbolicLink() && !o.preserveTimes ? '.' : o.preserveTimes ? (tDiff ? 't' : '.') : contentChanged ? 'T' : '.';
    const p = o.perms && !src.isSymbolicLink() && (src.mode & 0o7777n) !== (dst.mode & 0o7777n) ? 'p' : '.';
    const ow = o.owner && src.uid !== dst.uid ? 'o' : '.';
    const g = o.group && src.gid !== dst.gid ? 'g' : '.';
    return `${c}${s}${t}${p}${ow}${g}`;
  }

  private report(r: { path: string; kind: Kind; created: boolean; changes?: string; size: number; result?: FileSyncResult }): void {
    const y = r.kind === 'file' ? (r.result?.transferred ? '>' : '.') : r.created || r.changes?.startsWith('c') ? 'c' : '.';
    const rest = r.created ? '+++++++++' : `${(r.changes ?? '......').padEnd(6, '.')}...`;
    const unchanged = !r.created && !r.result?.transferred && !/[^.]/.test(r.changes ?? '');
    this.hooks.fileEnd?.({
      path: r.path,
      itemize: `${y}${TYPE_CHAR[r.kind]}${rest}`,
      kind: r.kind,
      size: r.size,
      method: r.result?.method,
      scanned: r.result?.scanned ?? 0,
      literal: r.result?.literal ?? 0,
      matched: r.result?.matched ?? 0,
      unchanged,
    });
  }

  /** Owner, group, mode, and (`times`) the times an entry gets from its source, as rsync's options say. */
  private metaFor(st: BigIntStats, created: boolean, times: boolean): MetaChange {
    const o = this.opts;
    const m: MetaChange = {};
    if ((o.owner || o.group) && process.getuid?.() === 0) {
      if (o.owner) m.uid = Number(st.uid);
      if (o.group) m.gid = Number(st.gid);
    }
    if (!st.isSymbolicLink()) {
      const mode = Number(st.mode & 0o7777n);
      if (o.perms) m.mode = mode;
      else if (created) m.mode = mode & ~UMASK;
    }
    if (times && o.preserveTimes) {
      m.atime = nsToSeconds(st.atimeNs);
      m.mtime = nsToSeconds(st.mtimeNs);
    }
    return m;
  }
}

/**
 * The names in a folder (source: to copy; destination: to delete). A name
 * that is not UTF-8 cannot be carried through qsync's string paths (it would
 * reach another file, or none): it is reported as an error (exit 23), never
 * skipped as if it had vanished or were not there.
 */
async function utf8Names(dir: Dir, rel: string, fail: (e: unknown, rel: string) => void, verb: 'copy' | 'delete'): Promise<string[]> {
  const names: string[] = [];
  for (const raw of await dir.readdirRaw()) {
    const name = raw.toString();
    if (Buffer.from(name).equals(raw)) {
      names.push(name);
      continue;
    }
    const shown = joinRel(rel, [...raw].map((b) => (b < 0x20 || b > 0x7e || b === 0x5c ? `\\x${b.toString(16).padStart(2, '0')}` : String.fromCharCode(b))).join(''));
    fail(new QsyncError(verb === 'copy' ? 'SOURCE' : 'TARGET', `cannot ${verb} ${shown}: its name is not valid UTF-8, which qsync does not handle`, { file: shown, hint: 'rename it to UTF-8, or exclude it' }), shown);
  }
  return names;
}
