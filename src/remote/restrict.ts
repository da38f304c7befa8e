/**
 * `qsync --server --restrict DIR`: the paths a client names are mapped into
 * DIR (rsync's rrsync idea). Absolute paths and `..` are refused, and so is
 * a symlink anywhere on the way from DIR to what exists of the path.
 * Below that, the walk reaches entries through held folders and never
 * follows a symlink; what an operand opens is checked again once open
 * (src/remote/serve-sources.ts).
 */
import { lstat, readlink, realpath } from 'node:fs/promises';
import { isAbsolute, join, relative, resolve } from 'node:path';
import { errnoOf, QsyncError } from '../core/errors.js';
import { fsPath } from '../io/safe-fs.js';

/**
 * A path the client named, inside the --restrict root, through no symlink
 * (what exists of it). `lastMayBeLink`: a source operand's last component
 * without a trailing slash, which is lstat'ed and never followed.
 */
export async function restrictedPath(p: string, root: string | undefined, opts: { lastMayBeLink?: boolean } = {}): Promise<string> {
  if (root === undefined) return p;
  if (isAbsolute(p)) throw new QsyncError('USAGE', `${p}: absolute paths are refused here (this server serves only paths inside its root)`, { file: p });
  const parts = p.split('/').filter((c) => c && c !== '.');
  if (parts.includes('..')) throw new QsyncError('USAGE', `${p}: ".." is refused here (this server serves only paths inside its root)`, { file: p });
  let at = root;
  for (const [i, c] of parts.entries()) {
    at = join(at, c);
    // A source operand without a trailing slash is taken as it is (lstat): a symlink there is copied as a symlink, not followed.
    if (opts.lastMayBeLink && i === parts.length - 1 && !p.endsWith('/')) break;
    const st = await lstat(fsPath(at)).catch((e) => {
      if (errnoOf(e) === 'ENOENT' || errnoOf(e) === 'ENOTDIR') return undefined;
      throw e;
    });
    if (!st) break;
    if (st.isSymbolicLink()) throw new QsyncError('USAGE', `${p}: a symlink on the way is refused here (this server serves only paths inside its root)`, { file: p });
  }
  return join(root, ...parts) + (p.endsWith('/') || parts.length === 0 ? '/' : '');
}


/**
 * With --restrict: what `path` reaches now (a `/proc/self/fd/N` link to a
 * held folder or file, or a path with its symlinks resolved) must lie in
 * `root`. Checked once open, so that a folder swapped for a symlink after
 * restrictedPath looked leads nowhere else.
 */
export async function checkInside(path: string, root: string): Promise<void> {
  const realRoot = await realpath(root);
  const real = path.startsWith('/proc/self/fd/') ? await readlink(path) : await realpath(fsPath(path) as string);
  if (real !== realRoot && !real.startsWith(`${realRoot === '/' ? '' : realRoot}/`)) {
    throw new QsyncError('USAGE', `a path outside the served root was refused (it resolves to a place outside ${root})`, {});
  }
}

/**
 * --backup-dir as the user gave it: relative to the destination root, as rsync takes it. With `within`
 * (qsync --server --restrict DIR) it must stay inside DIR: an absolute path, one that leads out of DIR,
 * and a symlink on its way are refused, as for DEST.
 */
export async function historyPath(destRoot: string, backupDir: string, within: string | undefined): Promise<string> {
  const abs = resolve(destRoot, backupDir);
  if (within === undefined) return abs;
  const rel = relative(within, abs);
  if (isAbsolute(backupDir) || rel === '..' || rel.startsWith('../') || isAbsolute(rel)) {
    throw new QsyncError('USAGE', `--backup-dir ${backupDir} lies outside the folder this server serves (give a path relative to DEST that stays inside it)`, { file: backupDir });
  }
  return restrictedPath(rel, within);
}
