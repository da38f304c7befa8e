/**
 * rsync's -H: regular files that are hard links of one another in the
 * source (same device and inode, within this run's transfer) become hard
 * links of one another in the destination.
 *
 * As in rsync, a file with more than one link waits until the walk has seen
 * the whole transfer. Then, per group, in rsync's file-list order (within a
 * folder its files first, then its subfolders, names compared as bytes):
 * the leader is the first member whose target exists as a regular file, or
 * else the last member; it is brought up to date like any file (a target
 * with other links is never written through: a new file replaces it). Every
 * other member is then made a link of it, unless it already is one: a new
 * link is made under a temporary name and renamed over the member's name,
 * so an existing target (a member of another group, a stale copy) is
 * replaced atomically. Itemized as rsync does: `hf+++++++++ b => a` for a
 * new link, `hf.st...... b => a` for a replaced target, nothing for an
 * unchanged one. Links outside the transfer are not looked for (rsync
 * semantics: within one run only).
 *
 * Creating names changes folders' times, and the folders were finished
 * already: their metadata is set again afterwards, from their sources.
 */
import type { BigIntStats } from 'node:fs';
import { link } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import { errnoOf, QsyncError } from '../core/errors.js';
import { Dir, tempNameFor, type MetaChange } from '../io/safe-fs.js';
import type { FileReport } from './events.js';
import type { Transfer } from './operands.js';
import type { SourceDir, Sources } from './source.js';

interface Member {
  rel: string;
  st: BigIntStats;
  /** Index of its transfer in `bases`. */
  t: number;
}

/**
 * Where a transfer's sources are: the operand, reopened through the run's
 * Sources (this host's or a peer's): the folder itself when its contents
 * land in DEST (`whole`), else the folder that holds it; `prefix` is where
 * it lands.
 */
interface Base {
  operand: string;
  whole: boolean;
  prefix: string;
  /** A --files-from or -R list's folder: DEST's root is not one of its folders unless listed (its times are the list's). */
  list?: boolean;
}

/** A base reopened: its folder, and the operand's name in it (not `whole`). */
interface OpenBase {
  dir: SourceDir;
  name: string;
}

/** The source folder `rel` below `base`, one folder at a time, none through a symlink; `base` itself for '.' (left open by done()). */
async function sourceFolder(base: SourceDir, rel: string): Promise<{ dir: SourceDir; done(): Promise<void> }> {
  let d = base;
  try {
    for (const p of rel.split('/').filter((x) => x && x !== '.')) {
      const next = await d.openDir(p);
      if (d !== base) await d.close();
      d = next;
    }
  } catch (e) {
    if (d !== base) await d.close();
    throw e;
  }
  return { dir: d, done: async () => void (d !== base && (await d.close())) };
}

export interface HardLinkHost {
  /** The run's sources: this host's files or a peer's (the members' groups are by the stats they list, dev and ino). */
  sources: Sources;
  dest: Dir | undefined;
  noWrite: boolean;
  /** Bring the leader up to date as any entry of its type (report included). */
  syncEntry(src: { dir: SourceDir; name: string }, st: BigIntStats, dst: Dir | undefined, name: string, rel: string): Promise<void>;
  /** A member made a link (or found one): counts as an entry of the transfer (a regular file: its size too). */
  counted(st: BigIntStats): void;
  report(r: FileReport): void;
  fail(e: unknown, rel: string): void;
  forgetManifest(rel: string): Promise<void>;
  /** The metadata a finished folder gets from its source (times included). */
  dirMeta(st: BigIntStats): MetaChange;
  /** The itemize letters c s t p o g of an existing target against its source. */
  changes(src: BigIntStats, dst: BigIntStats): string;
  /** --existing, --ignore-existing, --update: this member is left alone. */
  skips(st: BigIntStats, cur: BigIntStats | undefined): boolean;
  /** With -A/-X: `changes` with the letters a and x of an existing target against its source. */
  attrLetters?(src: { dir: SourceDir; name: string }, st: BigIntStats, dst: Dir, name: string, cur: BigIntStats, changes: string): Promise<string>;
}

/** rsync's file-list order: within a folder its files before its subfolders; names as bytes. */
export function flistCompare(a: string, b: string): number {
  const pa = a.split('/');
  const pb = b.split('/');
  for (let i = 0; ; i++) {
    const dirA = i < pa.length - 1;
    const dirB = i < pb.length - 1;
    if (pa[i] !== pb[i] || dirA !== dirB) {
      if (dirA !== dirB) return dirA ? 1 : -1;
      return Buffer.compare(Buffer.from(pa[i]!), Buffer.from(pb[i]!));
    }
    if (!dirA) return 0;
  }
}

export class HardLinks {
  private readonly groups = new Map<string, Member[]>();
  private readonly bases: Base[] = [];
  /** Destination folders that got new names after they were finished, and their transfer. */
  private readonly touched = new Map<string, number>();
  /** Their modes, for those made writable for a while (see writable()). */
  private readonly modes = new Map<string, number>();

  /** A transfer starts: its members are reached later through its operand. */
  transfer(t: Transfer): void {
    this.bases.push({ operand: t.operand, whole: t.destRel === '', prefix: t.destRel });
  }

  /** A --files-from or -R list starts: its names are below `base`, as they are below DEST. */
  list(base: string): void {
    this.bases.push({ operand: base, whole: true, prefix: '', list: true });
  }

  /** The source path of member `rel` of transfer `t`, below its reopened base. */
  private srcRel(t: number, b: OpenBase, rel: string): string {
    const base = this.bases[t]!;
    return base.whole ? rel : b.name + rel.slice(base.prefix.length);
  }

  /** The walk met a file, symlink or special file: true when it waits for its group (it has other links). */
  defer(st: BigIntStats, rel: string): boolean {
    if (st.nlink < 2n || st.isDirectory() || !this.bases.length) return false;
    const key = `${st.dev}:${st.ino}`;
    let g = this.groups.get(key);
    if (!g) this.groups.set(key, (g = []));
    g.push({ rel, st, t: this.bases.length - 1 });
    return true;
  }

  /** After the walk: every group, then the folders it changed. */
  async finish(host: HardLinkHost): Promise<void> {
    const opened = new Map<number, OpenBase>();
    const base = async (t: number): Promise<OpenBase> => {
      let d = opened.get(t);
      if (!d) {
        const b = this.bases[t]!;
        d = b.whole ? { dir: await host.sources.openOperand(b.operand), name: '' } : await host.sources.openParent(b.operand);
        opened.set(t, d);
      }
      return d;
    };
    try {
      for (const members of this.groups.values()) {
        members.sort((a, b) => flistCompare(a.rel, b.rel));
        await this.group(host, members, base);
      }
      if (!host.noWrite) await this.refreshFolders(host, base);
    } finally {
      for (const d of opened.values()) await d.dir.close();
    }
  }

  /** The source folder that holds member `m`, and its name there. */
  private async sourceOf(m: Member, base: (t: number) => Promise<OpenBase>): Promise<{ dir: SourceDir; name: string; done(): Promise<void> }> {
    const b = await base(m.t);
    const srcRel = this.srcRel(m.t, b, m.rel);
    return { ...(await sourceFolder(b.dir, dirname(srcRel))), name: basename(srcRel) };
  }

  private async group(host: HardLinkHost, all: Member[], base: (t: number) => Promise<OpenBase>): Promise<void> {
    // Members --existing, --ignore-existing or --update leave alone are out of the group, as in rsync.
    const members: Member[] = [];
    const curs: (BigIntStats | undefined)[] = [];
    for (const m of all) {
      const dir = await this.destFolder(host, m.rel).catch(() => undefined);
      const cur = await dir?.lstatOrUndefined(basename(m.rel)).finally(() => dir?.close());
      if (host.skips(m.st, cur)) continue;
      members.push(m);
      curs.push(cur);
    }
    if (!members.length) return;
    // The leader: the first member whose target is a regular file, else the last; of other types, the first.
    let li = members[0]!.st.isFile() ? curs.findIndex((c) => c?.isFile()) : 0;
    if (li < 0) li = members.length - 1;
    const leader = members[li]!;
    let lh: Dir | undefined;
    try {
      lh = await this.destFolder(host, leader.rel);
      await this.writable(host, lh, leader);
      const src = await this.sourceOf(leader, base);
      const before = await lh?.lstatOrUndefined(basename(leader.rel));
      try {
        await host.syncEntry(src, leader.st, lh, basename(leader.rel), leader.rel);
      } finally {
        await src.done();
      }
      const now = await lh?.lstatOrUndefined(basename(leader.rel));
      // A new inode took the name (new file, or a copy replacing one with other links): its folder changed.
      if (now && now.ino !== before?.ino) this.touch(leader);
      if (!now && !host.noWrite) return; // skipped (--existing, ...): nothing to link to
      for (let i = 0; i < members.length; i++) {
        if (i === li) continue;
        const m = members[i]!;
        let dir: Dir | undefined;
        try {
          dir = await this.destFolder(host, m.rel);
          await this.writable(host, dir, m);
          await this.linkMember(host, m, dir, leader.rel, lh, now, base);
        } catch (e) {
          host.fail(e, m.rel);
        } finally {
          await dir?.close();
        }
      }
    } catch (e) {
      host.fail(e, leader.rel);
    } finally {
      await lh?.close();
    }
  }

  /** Make member `m` (in its target folder `dir`) a link of the leader, whose target is `leaderSt` in `lh`. */
  private async linkMember(
    host: HardLinkHost,
    m: Member,
    dir: Dir | undefined,
    leaderRel: string,
    lh: Dir | undefined,
    leaderSt: BigIntStats | undefined,
    sourceBase: (t: number) => Promise<OpenBase>,
  ): Promise<void> {
    host.counted(m.st);
    const name = basename(m.rel);
    const leaderName = basename(leaderRel);
    const cur = await dir?.lstatOrUndefined(name);
    const [kind, letter] = m.st.isFile() ? (['file', 'f'] as const) : m.st.isSymbolicLink() ? (['symlink', 'L'] as const) : m.st.isCharacterDevice() || m.st.isBlockDevice() ? (['device', 'D'] as const) : (['special', 'S'] as const);
    const base = { path: m.rel, kind, size: m.st.isFile() ? Number(m.st.size) : 0, scanned: 0, literal: 0, matched: 0 };
    const linked = cur && leaderSt && cur.ino === leaderSt.ino && cur.dev === leaderSt.dev;
    const sameType = cur && (cur.mode & 0o170000n) === (m.st.mode & 0o170000n);
    let changes = sameType ? host.changes(m.st, cur!).padEnd(9, '.') : '+++++++++';
    // rsync -n compares the old target's ACLs and xattrs too (its real run compares the new link: always equal).
    if (sameType && host.noWrite && host.attrLetters) {
      const src = await this.sourceOf(m, sourceBase);
      try {
        changes = await host.attrLetters(src, m.st, dir!, name, cur!, changes);
      } finally {
        await src.done();
      }
    }
    if (linked) {
      // Already a link of the leader: it is what the leader is now (with -n, what it was: rsync shows how that differs).
      const unchanged = !/[^.]/.test(changes);
      host.report({ ...base, itemize: `h${letter}${unchanged ? '         ' : changes}`, unchanged });
      return;
    }
    if (!host.noWrite) {
      if (cur?.isDirectory()) {
        await dir!.rmdir(name).catch((e) => {
          throw new QsyncError('TARGET', `cannot delete non-empty directory ${dir!.shown(name)} to put a hard link there`, { file: m.rel }, { cause: e });
        });
      }
      const tmp = tempNameFor(name);
      await link(lh!.at(leaderName), dir!.at(tmp));
      try {
        // The leader's name may have been swapped since it was synced: link only to the inode qsync wrote.
        const made = await dir!.lstat(tmp);
        if (made.ino !== leaderSt!.ino || made.dev !== leaderSt!.dev) {
          throw new QsyncError('TARGET', `${lh!.shown(leaderName)} changed while qsync worked on it; ${m.rel} left alone`, { file: m.rel, hint: 'run again' });
        }
        await dir!.rename(tmp, dir!, name);
      } catch (e) {
        await dir!.unlink(tmp).catch(() => {});
        throw e;
      }
      await host.forgetManifest(m.rel);
      this.touch(m);
    }
    host.report({ ...base, path: `${m.rel} => ${leaderRel}`, itemize: `h${letter}${changes}`, unchanged: false });
  }

  /** The target folder of `rel`, reached from the destination root without following symlinks (undefined: it does not exist, -n). */
  private async destFolder(host: HardLinkHost, rel: string): Promise<Dir | undefined> {
    if (!host.dest) return undefined;
    const d = dirname(rel);
    try {
      return d === '.' ? await host.dest.dup() : await host.dest.openBeneath(d);
    } catch (e) {
      if (host.noWrite && (errnoOf(e) === 'ENOENT' || errnoOf(e) === 'ENOTDIR')) return undefined;
      throw e;
    }
  }

  /**
   * Not as root, a finished folder may be read-only (its source is): it is
   * made writable for its owner while names are made in it, and gets its
   * mode back with its times (as rsync does).
   */
  private async writable(host: HardLinkHost, dir: Dir | undefined, m: Member): Promise<void> {
    if (!dir || host.noWrite || process.getuid?.() === 0) return;
    const mode = Number((await dir.stat()).mode & 0o7777n);
    if (mode & 0o200) return;
    const d = dirname(m.rel);
    const rel = d === '.' ? '' : d;
    if (!this.modes.has(rel)) this.modes.set(rel, mode);
    await dir.setMeta({ mode: mode | 0o200 });
    this.touched.set(rel, m.t);
  }

  private touch(m: Member): void {
    const d = dirname(m.rel);
    this.touched.set(d === '.' ? '' : d, m.t);
  }

  /** Set again the metadata (times) of the folders that got names after they were finished. */
  private async refreshFolders(host: HardLinkHost, base: (t: number) => Promise<OpenBase>): Promise<void> {
    for (const [rel, t] of this.touched) {
      // The destination root is a folder of the transfer only when the contents of a folder land in it.
      if (rel === '' && (!this.bases[t]!.whole || this.bases[t]!.list)) continue;
      try {
        const root = await base(t);
        const at = await sourceFolder(root.dir, this.srcRel(t, root, rel));
        const src = at.dir;
        try {
          const dst = rel === '' ? await host.dest!.dup() : await host.dest!.openBeneath(rel);
          try {
            const meta = host.dirMeta(await src.stat());
            meta.mode ??= this.modes.get(rel);
            await dst.setMeta(meta);
          } finally {
            await dst.close();
          }
        } finally {
          await at.done();
        }
      } catch (e) {
        host.fail(e, rel || '.');
      }
    }
  }
}
