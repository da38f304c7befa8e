/**
 * rsync's -A (POSIX ACLs) and -X (extended attributes): compared, itemized
 * (letters `a` and `x`) and copied the way rsync 3 does it.
 *
 * -X: names outside `system.*`; as root all namespaces (user, trusted,
 * security), otherwise `user.*` only; rsync's own `user.rsync.%*` names are
 * left out, as rsync does with a single -X. Names gone from the source are
 * removed from the target.
 *
 * -A: the access ACL of everything but symlinks, and the default ACL of
 * folders. The kernel keeps them as `system.posix_acl_access` and
 * `system.posix_acl_default`, in one canonical binary form; qsync copies
 * that value as is (ids numerically, as rsync does locally). An ACL absent
 * from the source is removed from the target. `a` is reported as rsync
 * does: an access ACL differs when its named entries, its mask's presence
 * or (with a mask) its group entry differ; the permission bits themselves
 * are the mode's (`p`).
 *
 * Every read and write goes through a descriptor of the inode
 * (src/io/attr-tool.ts), never through a path that could be swapped.
 */
import { constants, type BigIntStats } from 'node:fs';
import { open, stat, type FileHandle } from 'node:fs/promises';
import { QsyncError } from '../core/errors.js';
import { O_PATH, setMetaByFd, type Dir } from '../io/safe-fs.js';
import { readAttrs, runWithFds, writeAttrs, type AttrMap, type AttrWrite } from '../io/attr-tool.js';

const ACCESS = 'system.posix_acl_access';
const DEFAULT = 'system.posix_acl_default';

export interface ExtAttrOptions {
  acls: boolean;
  xattrs: boolean;
  /** -n / --only-write-batch: compare and report, change nothing. */
  noWrite: boolean;
  /** Targets get their source's owner (-o as root): a target reached again by name must have it. */
  owners: boolean;
}

/** An entry reached through its folder (checked against `expect`), or a folder held by descriptor. */
export type Node = { dir: Dir; name: string; expect: BigIntStats } | { held: Dir };

/**
 * A source whose attributes were read where it lies: a peer's entry, read
 * there through the same machinery (src/remote/serve-sources.ts).
 */
export type SourceAttrs = { attrs: AttrMap };

/** Which attributes a run compares: what a peer serving its files needs to send. */
export interface AttrChoice {
  acls: boolean;
  xattrs: boolean;
}

/** The AttrChoice of a run's options: undefined without -A and -X. */
export const attrChoice = (o: { acls?: boolean; xattrs?: boolean }): AttrChoice | undefined =>
  o.acls || o.xattrs ? { acls: o.acls === true, xattrs: o.xattrs === true } : undefined;

const typeBits = (s: BigIntStats) => s.mode & 0o170000n;

/** fstat of any descriptor, O_PATH included (through /proc, as setMetaByFd reaches it). */
const fstatBig = (fd: number): Promise<BigIntStats> => stat(`/proc/self/fd/${fd}`, { bigint: true });

/** For messages. */
const nodePath = (n: Node): string => ('held' in n ? n.held.path : n.dir.shown(n.name));

/** `name` in `dir` itself (never what a symlink points to), held without opening it (no FIFO blocks, no device opens). */
const openPath = (dir: Dir, name: string): Promise<FileHandle> => open(dir.at(name), O_PATH | constants.O_NOFOLLOW);

/** An O_PATH descriptor of `name` in `dir`, checked to be of `expect`'s type (and, `sameInode`, its inode). */
export async function openNode(n: { dir: Dir; name: string; expect: BigIntStats; sameInode: boolean }): Promise<FileHandle> {
  const fh = await openPath(n.dir, n.name);
  const st = await fh.stat({ bigint: true });
  if (typeBits(st) !== typeBits(n.expect) || (n.sameInode && (st.ino !== n.expect.ino || st.dev !== n.expect.dev))) {
    await fh.close();
    throw new QsyncError('SOURCE', `file has vanished: ${n.dir.shown(n.name)} (another entry took its name while qsync worked)`, { file: n.name, vanished: true });
  }
  return fh;
}

/** The attributes of `node` (one getfattr run). */
export async function readNodeAttrs(node: Node): Promise<AttrMap> {
  const fh = 'held' in node ? undefined : await openNode({ ...node, sameInode: true });
  try {
    return (await readAttrs([fh?.fd ?? (node as { held: Dir }).held.fd], [nodePath(node)]))[0]!;
  } finally {
    await fh?.close();
  }
}

/**
 * The attributes of the entries `names` of `dir`, read with one getfattr run
 * (each entry through an O_PATH descriptor of its own, with the inode it was
 * read from). An entry that cannot be held is left out; a failed run throws.
 */
export async function readEntryAttrs(dir: Dir, names: string[]): Promise<Map<string, Cached>> {
  const out = new Map<string, Cached>();
  const held: { name: string; fh: FileHandle; st: BigIntStats }[] = [];
  try {
    for (const name of names) {
      const fh = await openPath(dir, name).catch(() => undefined);
      if (fh) held.push({ name, fh, st: await fh.stat({ bigint: true }) });
    }
    const maps = await readAttrs(held.map((o) => o.fh.fd), held.map((o) => dir.shown(o.name)));
    held.forEach((o, k) => out.set(o.name, { dev: o.st.dev, ino: o.st.ino, attrs: maps[k]! }));
    return out;
  } finally {
    for (const o of held) await o.fh.close();
  }
}

/** The part of `m` a run with `want` compares, as [name, value] pairs (what a peer sends). */
export function chosenAttrs(m: AttrMap, want: AttrChoice): [string, string][] {
  return [...m].filter(([n]) => (n === ACCESS || n === DEFAULT ? want.acls : want.xattrs && !n.startsWith('system.')));
}

/** The entries of a binary POSIX ACL (header u32 version, then u16 tag, u16 perm, u32 id each). */
function aclEntries(value: string | undefined): { tag: number; perm: number; id: number }[] {
  if (value === undefined || !value.startsWith('0s')) return [];
  const b = Buffer.from(value.slice(2), 'base64');
  const out: { tag: number; perm: number; id: number }[] = [];
  for (let off = 4; off + 8 <= b.length && out.length < 4096; off += 8) out.push({ tag: b.readUInt16LE(off), perm: b.readUInt16LE(off + 2), id: b.readUInt32LE(off + 4) });
  return out;
}

const USER_OBJ = 0x01, GROUP_OBJ = 0x04, MASK = 0x10, OTHER = 0x20;

/** rsync's rsync_acl_equal_enough: the parts of an access ACL the mode does not carry. */
function accessAclsEqual(a: string | undefined, b: string | undefined): boolean {
  const view = (v: string | undefined) => {
    const e = aclEntries(v);
    const mask = e.find((x) => x.tag === MASK);
    const group = mask ? e.find((x) => x.tag === GROUP_OBJ)?.perm : undefined;
    const named = e.filter((x) => ![USER_OBJ, GROUP_OBJ, MASK, OTHER].includes(x.tag)).map((x) => `${x.tag}:${x.id}:${x.perm}`).sort().join(',');
    return `${mask ? 'm' : ''}|${group ?? ''}|${named}`;
  };
  return view(a) === view(b);
}

/** The attributes of one source and its target, read before the target is brought up to date. */
export class AttrPair {
  constructor(
    private readonly owner: ExtAttrs,
    private readonly kind: 'dir' | 'symlink' | 'other',
    readonly src: AttrMap,
    /** The target's inode as it was (undefined: none yet), and its attributes. */
    private readonly dstId: { dev: bigint; ino: bigint } | undefined,
    private readonly heldDst: Dir | undefined,
    private readonly dst: AttrMap | undefined,
  ) {}

  /**
   * rsync's itemize string with the `a` and `x` letters (positions 8 and 9
   * after YX). `changes` holds c s t p o g; when the access ACL is set on an
   * entry that was not rewritten, the permission bits come with it, so `p`
   * stays only for a change of the set-id and sticky bits (rsync applies the
   * ACL before it compares the mode; with -n it applies nothing).
   */
  letters(changes: string, srcSt: BigIntStats, dstSt: BigIntStats | undefined, rewritten: boolean): string {
    const c = changes.padEnd(9, '.').split('');
    if (!this.dst || !dstSt) return c.join('');
    const aclMoves = this.owner.o.acls && this.kind !== 'symlink' && !accessAclsEqual(this.src.get(ACCESS), this.dst.get(ACCESS));
    const a = aclMoves || (this.owner.o.acls && this.kind === 'dir' && this.src.get(DEFAULT) !== this.dst.get(DEFAULT));
    if (a) c[7] = 'a';
    if (this.owner.o.xattrs && this.owner.differ(this.src, this.dst, false)) c[8] = 'x';
    if (aclMoves && !rewritten && !this.owner.o.noWrite && c[3] === 'p' && (srcSt.mode & 0o7000n) === (dstSt.mode & 0o7000n)) c[3] = '.';
    return c.join('');
  }

  /**
   * Make the target's attributes the source's. `at`: where the target is now
   * (a file may have been replaced by a new inode under its name), and
   * `inode`, the one the run left there when it knows it (a file it wrote or
   * checked): another inode under the name is refused, owner or not; a held
   * folder is the target itself.
   */
  async apply(at?: { dir: Dir; name: string; expect: BigIntStats; inode?: { dev: bigint; ino: bigint } }): Promise<void> {
    if (this.owner.o.noWrite) return;
    if (this.heldDst) {
      // A folder: held by the walk, which closes it when done; written now.
      await this.owner.write(this.heldDst.fd, this.src, this.dst ?? new Map(), this.kind, this.heldDst.path);
      return;
    }
    const now = at && (await openNode({ ...at, sameInode: false }));
    if (!now) return;
    const nowSt = await now.stat({ bigint: true });
    // Not the inode qsync wrote (or gave the source's owner): another file took the name (a user who owns the folder
    // renamed one of theirs over it). Its attributes are not ours to set: as root they may be security.* ones.
    const other = at.inode && (at.inode.ino !== nowSt.ino || at.inode.dev !== nowSt.dev);
    if (other || (this.owner.o.owners && nowSt.uid !== at.expect.uid)) {
      await now.close();
      const why = other ? 'another file took its name' : `owned by uid ${nowSt.uid}, not ${at.expect.uid}`;
      throw new QsyncError('TARGET', `${at.dir.shown(at.name)} changed while qsync worked on it (${why}); its ACLs and xattrs left alone`, {
        file: at.name,
        hint: 'run again',
      });
    }
    const a = this.dstId;
    // The inode read before keeps what it carried then; a new one (a new or rewritten file) is read back. Written with others.
    const known = a && a.ino === nowSt.ino && a.dev === nowSt.dev ? (this.dst ?? new Map()) : undefined;
    await this.owner.queue(now, this.src, this.kind, at.dir.shown(at.name), known);
  }
}

/** Entries read per getfattr run by prefetch (each one descriptor passed to it). */
export const ATTR_BATCH = 64;

export interface Cached {
  dev: bigint;
  ino: bigint;
  attrs: AttrMap;
}

/** Before anything is written: the tools -A/-X need must be there (a missing one is one clear error, not one per file). */
export async function checkAttrTools(): Promise<void> {
  for (const tool of ['getfattr', 'setfattr']) await runWithFds(tool, ['--version'], []);
}

export class ExtAttrs {
  private readonly root = process.getuid?.() === 0;
  /** Per held folder: attributes read ahead by prefetch, with the inode they were read from. */
  private readonly cache = new WeakMap<Dir, Map<string, Cached>>();

  constructor(readonly o: ExtAttrOptions) {}


  /** The names qsync manages on an entry of `kind`, as rsync chooses them. */
  private managed(name: string, kind: AttrPair['kind']): boolean {
    if (name === ACCESS) return this.o.acls && kind !== 'symlink';
    if (name === DEFAULT) return this.o.acls && kind === 'dir';
    if (!this.o.xattrs || name.startsWith('system.')) return false;
    if (!this.root && !name.startsWith('user.')) return false;
    return !name.startsWith('user.rsync.%');
  }

  /** Do the managed names differ (ACLs too when `acls`)? */
  differ(a: AttrMap, b: AttrMap, acls: boolean): boolean {
    const pick = (m: AttrMap) =>
      [...m].filter(([n]) => (n === ACCESS || n === DEFAULT ? acls : this.managed(n, 'other'))).sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0)).join('\n');
    return pick(a) !== pick(b);
  }

  /**
   * Read the source's attributes and the target's (when it exists: `dst`)
   * before the target is touched. The source must still be the inode listed
   * (a peer's source comes with its attributes, read there).
   */
  async read(src: Node | SourceAttrs, dst: Node | undefined, kind: AttrPair['kind']): Promise<AttrPair> {
    // Read ahead from the very inode listed: no need to reach it again.
    const early = 'attrs' in src ? src.attrs : 'held' in src ? undefined : this.cached(src.dir, src.name, src.expect);
    const srcFh = 'attrs' in src || 'held' in src || early ? undefined : await openNode({ ...src, sameInode: true });
    let dstFh: FileHandle | undefined;
    try {
      dstFh = dst && !('held' in dst) ? await openNode({ ...dst, sameInode: true }).catch(() => undefined) : undefined;
      const dstSt = await dstFh?.stat({ bigint: true });
      const dstEarly = dstSt && dst && !('held' in dst) ? this.cached(dst.dir, dst.name, dstSt) : undefined;
      const fds: number[] = [];
      const shown: string[] = [];
      if (!early) {
        fds.push(srcFh?.fd ?? (src as { held: Dir }).held.fd);
        shown.push(nodePath(src as Node));
      }
      const dstFd = dstEarly ? undefined : (dstFh?.fd ?? (dst && 'held' in dst ? dst.held.fd : undefined));
      if (dstFd !== undefined) {
        fds.push(dstFd);
        shown.push(nodePath(dst!));
      }
      const maps = fds.length ? await readAttrs(fds, shown) : [];
      const s = early ?? maps.shift()!;
      const d = dstEarly ?? (dstFd === undefined ? undefined : maps.shift());
      return new AttrPair(this, kind, s, dstSt && { dev: dstSt.dev, ino: dstSt.ino }, dst && 'held' in dst ? dst.held : undefined, d);
    } finally {
      await dstFh?.close();
      await srcFh?.close();
    }
  }

  /** What prefetch read of `name` in `dir`, if it was read from the inode `st` describes (used once). */
  private cached(dir: Dir, name: string, st: BigIntStats): AttrMap | undefined {
    const m = this.cache.get(dir);
    const c = m?.get(name);
    m?.delete(name);
    return c && c.ino === st.ino && c.dev === st.dev ? c.attrs : undefined;
  }

  /**
   * Read the attributes of the entries `names` of `dir` (a folder being
   * walked) ahead, up to ATTR_BATCH per getfattr run, each through its own
   * descriptor: read() then runs nothing for them. Best effort: what cannot
   * be read ahead is read one by one later.
   */
  async prefetch(dir: Dir | undefined, names: string[]): Promise<void> {
    if (!dir) return;
    const cached = new Map<string, Cached>();
    this.cache.set(dir, cached);
    for (let i = 0; i < names.length; i += ATTR_BATCH) {
      // A batch that fails is read one by one instead, later.
      const got = await readEntryAttrs(dir, names.slice(i, i + ATTR_BATCH)).catch(() => new Map<string, Cached>());
      for (const [name, c] of got) cached.set(name, c);
    }
  }

  /** What makes the attributes behind `fd` (now `cur`) the managed part of `src`. */
  private diff(fd: number, src: AttrMap, cur: AttrMap, kind: AttrPair['kind'], shown: string): AttrWrite {
    const set: [string, string][] = [];
    for (const [n, v] of src) {
      // chown drops a file's capabilities: set them again even when they were equal before.
      if (this.managed(n, kind) && (cur.get(n) !== v || n === 'security.capability')) set.push([n, v]);
    }
    const remove = [...cur.keys()].filter((n) => this.managed(n, kind) && !src.has(n));
    return { fd, set, remove, shown };
  }

  /** Make the attributes behind `fd` (now `cur`) the managed part of `src`. */
  async write(fd: number, src: AttrMap, cur: AttrMap, kind: AttrPair['kind'], shown: string): Promise<void> {
    const w = this.diff(fd, src, cur, kind, shown);
    if (w.set.length || w.remove.length) await this.writeAll([w]);
  }

  /**
   * writeAttrs, and not as root: user.* attributes need write permission on
   * the inode, which a read-only copy of a read-only source lacks; its owner
   * gets it for the time of the write (through the descriptor), as rsync does.
   */
  private async writeAll(writes: AttrWrite[]): Promise<void> {
    const lent: { fd: number; mode: number }[] = [];
    try {
      if (!this.root) {
        for (const w of writes) {
          const st = await fstatBig(w.fd);
          const mode = Number(st.mode & 0o7777n);
          if ((st.isFile() || st.isDirectory()) && !(mode & 0o200)) {
            await setMetaByFd(w.fd, { mode: mode | 0o200 });
            lent.push({ fd: w.fd, mode });
          }
        }
      }
      await writeAttrs(writes);
    } finally {
      for (const l of lent) await setMetaByFd(l.fd, { mode: l.mode });
    }
  }

  /** New inodes waiting for their attributes (held by descriptor): read back and written ATTR_BATCH at a time. */
  private readonly pending: { fh: FileHandle; src: AttrMap; kind: AttrPair['kind']; shown: string; cur?: AttrMap }[] = [];

  /**
   * Give the inode behind `fh` (now owned here) the managed attributes of
   * `src`, soon: see flush(). `cur`: what it carries, when known; else it
   * is read back (a new inode may carry a folder's default ACL, a label).
   */
  async queue(fh: FileHandle, src: AttrMap, kind: AttrPair['kind'], shown: string, cur?: AttrMap): Promise<void> {
    const w = cur && this.diff(fh.fd, src, cur, kind, shown);
    if (w && !w.set.length && !w.remove.length) return void (await fh.close());
    this.pending.push({ fh, src, kind, shown, cur });
    if (this.pending.length >= ATTR_BATCH) await this.flush();
  }

  /**
   * Write what queue() holds: one getfattr run reads what the new inodes
   * carry already (a folder's default ACL, a security label), one setfattr
   * run writes them all. Called when a folder is done and at the end.
   */
  async flush(): Promise<void> {
    const batch = this.pending.splice(0);
    if (!batch.length) return;
    try {
      const unknown = batch.filter((b) => !b.cur);
      const read = unknown.length ? await readAttrs(unknown.map((b) => b.fh.fd), unknown.map((b) => b.shown)) : [];
      unknown.forEach((b, i) => (b.cur = read[i]));
      await this.writeAll(batch.map((b) => this.diff(b.fh.fd, b.src, b.cur!, b.kind, b.shown)));
    } finally {
      for (const b of batch) await b.fh.close();
    }
  }
}
