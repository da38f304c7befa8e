/**
 * The tree walk: rsync's semantics for which entries are copied, created,
 * skipped or deleted, and the metadata they get. Regular files go to
 * syncFile; this module owns directories, links, devices and --delete.
 */
import { execFile } from 'node:child_process';
import type { BigIntStats } from 'node:fs';
import { chmod, lchown, lstat, lutimes, mkdir, readdir, readlink, rm, rmdir, symlink, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { errnoOf, QsyncError } from '../core/errors.js';
import type { Filter } from '../core/filter.js';
import type { FileReport, RunStats, SyncHooks } from './events.js';
import { syncFile, nsToSeconds, type FileSyncContext, type FileSyncOptions, type FileSyncResult } from './file-sync.js';
import { majorMinor } from '../io/dev-numbers.js';
import { forgetManifests, manifestPathFor, STATE_DIR } from './manifest-store.js';
import { joinRel, type Plan } from './operands.js';

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

async function lstatOrUndefined(p: string): Promise<BigIntStats | undefined> {
  try {
    return await lstat(p, { bigint: true });
  } catch (e) {
    if (errnoOf(e) === 'ENOENT') return undefined;
    throw e;
  }
}

export class TreeSync {
  private readonly stats: RunStats = {
    files: 0, regularFiles: 0, dirs: 0, created: 0, deleted: 0, transferred: 0,
    totalSize: 0, transferredSize: 0, literal: 0, matched: 0, scanned: 0, elapsedMs: 0,
  };
  private partial = false;
  private vanished = false;
  /** Directories whose times/modes are set after their contents, deepest last in, first out. */
  private readonly dirFixups: { src: BigIntStats; dst: string; created: boolean }[] = [];

  constructor(
    private readonly plan: Plan,
    private readonly opts: TreeOptions,
    private readonly filter: Filter,
    private readonly ctx: FileSyncContext,
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
    for (const t of this.plan.transfers) await this.entry(t.operand, t.stat, t.destRel, t.stat.dev);
    for (const d of this.dirFixups.reverse()) await this.fixDir(d.src, d.dst, d.created);
    this.stats.elapsedMs = performance.now() - t0;
    return { stats: this.stats, partial: this.partial, vanished: this.vanished };
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
    if (errno === 'ENOENT' && !(e instanceof QsyncError)) {
      this.vanished = true;
      this.hooks.warning?.(`file has vanished: ${path}`, path);
      return;
    }
    this.partial = true;
    const msg = e instanceof QsyncError ? e.message + (e.context.hint ? ` (${e.context.hint})` : '') : `${path}: ${(e as Error).message}`;
    this.hooks.warning?.(msg, path);
  }

  private async entry(src: string, st: BigIntStats, rel: string, rootDev: bigint): Promise<void> {
    const dst = join(this.plan.destRoot, rel);
    const shown = rel || '.';
    try {
      this.stats.files++;
      if (st.isDirectory()) {
        if (!this.opts.recursive) {
          this.hooks.notice?.(`skipping directory ${shown}`, shown);
          return;
        }
        await this.dir(src, st, rel, dst, rootDev);
      } else if (st.isFile()) {
        await this.file(src, st, rel, dst);
      } else if (st.isSymbolicLink()) {
        if (!this.opts.links) return this.hooks.notice?.(`skipping non-regular file "${shown}"`, shown);
        await this.symlink(src, st, rel, dst);
      } else {
        const dev = st.isCharacterDevice() || st.isBlockDevice();
        if (dev ? !this.opts.devices : !this.opts.specials) return this.hooks.notice?.(`skipping non-regular file "${shown}"`, shown);
        await this.special(st, rel, dst);
      }
    } catch (e) {
      this.fail(e, shown);
    }
  }

  /** Remove what stands at `dst` when it is of another type than `want`. Returns the stat left. */
  private async clearOtherType(dst: string, want: Kind): Promise<BigIntStats | undefined> {
    const cur = await lstatOrUndefined(dst);
    if (!cur || kindOf(cur) === want) return cur;
    if (this.noWrite) return undefined;
    if (cur.isDirectory()) {
      await rmdir(dst).catch((e) => {
        throw new QsyncError('TARGET', `cannot delete non-empty directory ${dst} to put a ${want} there`, { file: dst }, { cause: e });
      });
    } else await unlink(dst);
    return undefined;
  }

  private async dir(src: string, st: BigIntStats, rel: string, dst: string, rootDev: bigint): Promise<void> {
    this.stats.dirs++;
    const fresh = rel === '' && this.plan.destCreated === true;
    const cur = fresh ? undefined : await this.clearOtherType(dst, 'dir');
    if (!cur) {
      if (!this.noWrite && !fresh) await mkdir(dst).catch((e) => {
        throw new QsyncError('TARGET', `cannot create directory ${dst}: ${(e as Error).message}`, { file: dst }, { cause: e });
      });
      this.stats.created++;
    }
    const changes = cur ? this.metaChanges(st, cur) : undefined;
    this.report({ path: rel ? `${rel}/` : './', kind: 'dir', created: !cur, changes, size: 0 });
    if (!this.noWrite) this.dirFixups.push({ src: st, dst, created: !cur });
    // rsync -x: a mount point is created, its contents are not copied.
    if (this.opts.oneFileSystem && st.dev !== rootDev) return;

    const names = (await readdir(src)).sort();
    const keep = new Set<string>();
    const children: { name: string; st: BigIntStats }[] = [];
    for (const name of names) {
      if (rel === '' && name === STATE_DIR) continue;
      const childRel = joinRel(rel, name);
      let cst: BigIntStats;
      try {
        cst = await lstat(join(src, name), { bigint: true });
      } catch (e) {
        this.fail(e, childRel);
        continue;
      }
      if (this.filter.excluded(childRel, cst.isDirectory())) continue;
      keep.add(name);
      children.push({ name, st: cst });
    }
    if (this.opts.delete && cur) await this.deleteExtraneous(rel, dst, keep);
    for (const c of children) await this.entry(join(src, c.name), c.st, joinRel(rel, c.name), rootDev);
  }

  private async deleteExtraneous(rel: string, dst: string, keep: Set<string>): Promise<void> {
    for (const name of (await readdir(dst)).sort()) {
      if (keep.has(name) || (rel === '' && name === STATE_DIR)) continue;
      const childRel = joinRel(rel, name);
      const path = join(dst, name);
      const st = await lstatOrUndefined(path);
      if (!st) continue;
      // Excluded names are protected from deletion, as in rsync without --delete-excluded.
      if (this.filter.excluded(childRel, st.isDirectory())) continue;
      this.hooks.deleted?.(st.isDirectory() ? `${childRel}/` : childRel);
      this.stats.deleted++;
      if (this.noWrite) continue;
      await rm(path, { recursive: true, force: true });
      if (st.isFile() || st.isDirectory()) await forgetManifests(this.plan.destRoot, childRel, st.isDirectory());
    }
  }

  private async file(src: string, st: BigIntStats, rel: string, dst: string): Promise<void> {
    this.stats.regularFiles++;
    this.stats.totalSize += Number(st.size);
    const cur = await this.clearOtherType(dst, 'file');
    const manifest = this.opts.manifest ?? manifestPathFor(this.plan.destRoot, rel);
    let r: FileSyncResult | undefined;
    try {
      r = await syncFile({ src, srcStat: st, dst, dstStat: cur, manifestPath: manifest, relPath: rel }, this.opts, this.ctx);
    } catch (e) {
      if (errnoOf(e) === 'ENOENT' && !(await lstatOrUndefined(src))) {
        this.vanished = true;
        this.hooks.warning?.(`file has vanished: ${src}`, rel);
        return;
      }
      throw e;
    }
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
    if (!this.noWrite) await this.applyMeta(dst, st, !cur);
    this.report({ path: rel, kind: 'file', created: !cur, changes, size: Number(st.size), result: r });
  }

  private async symlink(src: string, st: BigIntStats, rel: string, dst: string): Promise<void> {
    const target = await readlink(src);
    const cur = await this.clearOtherType(dst, 'symlink');
    if (cur && (await readlink(dst)) === target) {
      const changes = this.metaChanges(st, cur);
      if (!this.noWrite) await this.applyMeta(dst, st, false);
      this.report({ path: rel, kind: 'symlink', created: false, changes, size: 0 });
      return;
    }
    if (!this.noWrite) {
      if (cur) await unlink(dst);
      await symlink(target, dst);
      await this.applyMeta(dst, st, true);
    }
    if (!cur) this.stats.created++;
    this.report({ path: `${rel} -> ${target}`, kind: 'symlink', created: !cur, changes: cur ? 'c' : undefined, size: 0 });
  }

  private async special(st: BigIntStats, rel: string, dst: string): Promise<void> {
    const kind = kindOf(st);
    const cur = await this.clearOtherType(dst, kind);
    const sameNode = cur && cur.rdev === st.rdev && (cur.mode & 0o170000n) === (st.mode & 0o170000n);
    if (!sameNode && !this.noWrite) {
      if (cur) await unlink(dst);
      if (st.isFIFO()) await run('mkfifo', [dst]);
      else if (st.isSocket()) throw new QsyncError('UNSUPPORTED', `cannot recreate socket ${rel}`, { file: rel });
      else {
        const [major, minor] = majorMinor(Number(st.rdev));
        await run('mknod', [dst, st.isBlockDevice() ? 'b' : 'c', String(major), String(minor)]);
      }
    }
    if (!cur) this.stats.created++;
    if (!this.noWrite) await this.applyMeta(dst, st, !cur);
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

  /** Owner, group, mode, and the times of links and directories. */
  private async applyMeta(dst: string, st: BigIntStats, created: boolean): Promise<void> {
    const o = this.opts;
    const isLink = st.isSymbolicLink();
    if ((o.owner || o.group) && process.getuid?.() === 0) {
      await lchown(dst, o.owner ? Number(st.uid) : -1, o.group ? Number(st.gid) : -1);
    }
    if (!isLink) {
      const mode = Number(st.mode & 0o7777n);
      if (o.perms) await chmod(dst, mode);
      else if (created) await chmod(dst, mode & ~UMASK);
    }
    // Regular files got their mtime from syncFile; rsync leaves the times of devices and fifos alone.
    if (o.preserveTimes && (isLink || st.isDirectory())) await lutimes(dst, nsToSeconds(st.atimeNs), nsToSeconds(st.mtimeNs));
  }

  private async fixDir(src: BigIntStats, dst: string, created: boolean): Promise<void> {
    try {
      await this.applyMeta(dst, src, created);
    } catch (e) {
      this.fail(e, dst);
    }
  }
}
