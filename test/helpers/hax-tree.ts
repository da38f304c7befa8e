/**
 * The tree test/hax.test.ts and test/remote-hax.test.ts give qsync and rsync
 * with -H, -A, -X (hard-link groups, ACLs, user./trusted./security. xattrs,
 * names that are not UTF-8), its changes, and what a user compares after.
 */
import { execFileSync } from 'node:child_process';
import { appendFileSync, chmodSync, linkSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, symlinkSync, unlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SMALL_FILE_MAX } from '../../src/sync/small-file.js';

export const sh = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { encoding: 'utf8' });

/** Every entry below `dir`, sorted. */
export function entries(dir: string, rel = ''): string[] {
  const out: string[] = [];
  for (const name of readdirSync(join(dir, rel)).sort()) {
    const r = rel ? `${rel}/${name}` : name;
    out.push(r);
    if (lstatSync(join(dir, r)).isDirectory()) out.push(...entries(dir, r));
  }
  return out;
}

/** What a user compares after a backup: per entry its type, mode, owner, content, mtime, ACLs, xattrs, and its hard-link group. */
export function snapshot(dir: string, opts: { dirTimes: boolean }): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const byInode = new Map<bigint, string[]>();
  const all = entries(dir);
  for (const r of all) {
    const p = join(dir, r);
    const st = lstatSync(p, { bigint: true });
    if (st.isFile()) byInode.set(st.ino, [...(byInode.get(st.ino) ?? []), r]);
  }
  for (const r of all) {
    const p = join(dir, r);
    const st = lstatSync(p, { bigint: true });
    const e: Record<string, unknown> = { mode: st.mode.toString(8), uid: st.uid, gid: st.gid };
    if (st.isFile()) {
      e.content = readFileSync(p, 'utf8');
      e.links = byInode.get(st.ino)!.join(' ');
      e.nlink = st.nlink;
    }
    if (st.isSymbolicLink()) e.target = readlinkSync(p);
    if (st.isFile() || (st.isDirectory() && opts.dirTimes)) e.mtimeUs = st.mtimeNs / 1000n;
    // The tools run on the path itself (the test's own tree): -h reads a symlink's own attributes.
    e.xattrs = sh('getfattr', '-h', '-d', '-m', '-', '-e', 'base64', '--absolute-names', p).replace(/^# file: .*\n/m, '');
    if (!st.isSymbolicLink()) e.acl = sh('getfacl', '-p', '-n', p).replace(/^# file: .*\n/m, '');
    out[r] = e;
  }
  return out;
}

/** rsync -i lines, sorted (the order in which rsync finishes hard links depends on its pipeline). */
export const lines = (stdout: string) =>
  stdout
    .split('\n')
    .filter((l) => l && !l.startsWith('created directory'))
    .sort();

export function makeTree(src: string): void {
  mkdirSync(join(src, 'sub/deep'), { recursive: true });
  mkdirSync(join(src, 'shared'));
  writeFileSync(join(src, 'a'), 'group one\n');
  linkSync(join(src, 'a'), join(src, 'sub/deep/x'));
  linkSync(join(src, 'a'), join(src, 'z'));
  writeFileSync(join(src, 'b'), 'group two\n');
  linkSync(join(src, 'b'), join(src, 'c'));
  // Big enough to get a manifest (a small file has none: src/sync/small-file.ts), which round 1 makes stale.
  writeFileSync(join(src, 'plain'), Buffer.alloc(SMALL_FILE_MAX + 1, 'p'));
  // A file whose other link is outside the transfer: copied as a plain file.
  writeFileSync(join(src, 'outside-linked'), 'half of a pair\n');
  linkSync(join(src, 'outside-linked'), join(src, '..', 'outside'));
  sh('setfattr', '-n', 'user.comment', '-v', 'kept', join(src, 'plain'));
  sh('setfattr', '-n', 'user.bin', '-v', '0sAAEC/w==', join(src, 'plain'));
  sh('setfattr', '-n', 'user.odd=name with space', '-v', 'line1\nline2', join(src, 'plain'));
  sh('setfattr', '-n', 'trusted.root-only', '-v', 't', join(src, 'plain'));
  sh('setfattr', '-n', 'user.empty', join(src, 'plain'));
  // A name that is not UTF-8 (byte 0xff): bytes all the way.
  sh('sh', '-c', `setfattr -n "$(printf 'user.\\377x')" -v v "$1"`, 'sh', join(src, 'plain'));
  sh('setfattr', '-n', 'security.label', '-v', 's', join(src, 'b'));
  sh('setfattr', '-n', 'user.on-dir', '-v', 'd', join(src, 'sub'));
  sh('setfacl', '-m', 'u:1234:rw,g:4321:r', join(src, 'plain'));
  sh('setfacl', '-m', 'u:1234:rx', join(src, 'shared'));
  sh('setfacl', '-d', '-m', 'u:1234:rwx,g:4321:rx', join(src, 'shared'));
  writeFileSync(join(src, 'shared/doc'), 'doc\n');
  sh('setfacl', '-m', 'u:77:r', join(src, 'shared/doc'));
  symlinkSync('plain', join(src, 'link'));
  // rsync links symlinks (and special files) of one inode too.
  symlinkSync('plain', join(src, 'sub/sl1'));
  linkSync(join(src, 'sub/sl1'), join(src, 'sub/sl2'));
  sh('setfattr', '-h', '-n', 'trusted.on-link', '-v', 'l', join(src, 'link'));
  const old = new Date('2024-03-01T12:00:00.123456Z');
  for (const f of ['a', 'b', 'plain', 'outside-linked', 'shared/doc']) utimesSync(join(src, f), old, old);
  ageDirs(src);
}

export function mutateTree(src: string): void {
  sh('setfattr', '-x', 'user.comment', join(src, 'plain'));
  sh('setfattr', '-n', 'user.bin', '-v', 'changed', join(src, 'plain'));
  sh('setfattr', '-n', 'user.new', '-v', 'n', join(src, 'sub/deep/x'));
  sh('setfacl', '-m', 'u:1235:r', join(src, 'plain'));
  sh('setfacl', '-b', join(src, 'shared/doc'));
  sh('setfacl', '-k', join(src, 'shared'));
  sh('setfattr', '-x', 'user.on-dir', join(src, 'sub'));
  sh('setfattr', '-h', '-n', 'trusted.on-link', '-v', 'changed', join(src, 'link'));
  // Split group two: c becomes a file of its own; group one grows and changes.
  unlinkSync(join(src, 'c'));
  writeFileSync(join(src, 'c'), 'c alone\n');
  linkSync(join(src, 'a'), join(src, 'shared/a-too'));
  appendFileSync(join(src, 'a'), 'more\n');
  chmodSync(join(src, 'b'), 0o640);
  ageDirs(src);
}

export function ageDirs(dir: string, when = new Date('2025-01-02T03:04:05.678901Z')): void {
  for (const e of readdirSync(dir, { withFileTypes: true })) if (e.isDirectory()) ageDirs(join(dir, e.name), when);
  utimesSync(dir, when, when);
}

/**
 * In a destination made from makeTree: a target that is a member of another
 * group is replaced by a link of its own group; a plain file whose target
 * got other links gets a new file (the links keep theirs).
 */
export function relinkTargets(d: string): void {
  unlinkSync(join(d, 'z'));
  linkSync(join(d, 'b'), join(d, 'z'));
  unlinkSync(join(d, 'plain'));
  linkSync(join(d, 'b'), join(d, 'plain'));
}
