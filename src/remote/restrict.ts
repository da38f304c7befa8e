/**
 * `qsync --server --restrict DIR`: the paths a client names are mapped into
 * DIR (rsync's rrsync idea). Absolute paths and `..` are refused, and so is
 * a symlink anywhere on the way from DIR to what exists of the path.
 * Below that, the walk reaches entries through held folders and never
 * follows a symlink; what an operand opens is checked again once open
 * (src/remote/serve-sources.ts).
 */
import { lstat } from 'node:fs/promises';
import { isAbsolute, join } from 'node:path';
import { errnoOf, QsyncError } from '../core/errors.js';
import { fsPath } from '../io/safe-fs.js';

/** A path the client named, inside the --restrict root, through no symlink (what exists of it). */
export async function restrictedPath(p: string, root: string | undefined): Promise<string> {
  if (root === undefined) return p;
  if (isAbsolute(p)) throw new QsyncError('USAGE', `${p}: absolute paths are refused here (this server serves only paths inside its root)`, { file: p });
  const parts = p.split('/').filter((c) => c && c !== '.');
  if (parts.includes('..')) throw new QsyncError('USAGE', `${p}: ".." is refused here (this server serves only paths inside its root)`, { file: p });
  let at = root;
  for (const c of parts) {
    at = join(at, c);
    const st = await lstat(fsPath(at)).catch((e) => {
      if (errnoOf(e) === 'ENOENT' || errnoOf(e) === 'ENOTDIR') return undefined;
      throw e;
    });
    if (!st) break;
    if (st.isSymbolicLink()) throw new QsyncError('USAGE', `${p}: a symlink on the way is refused here (this server serves only paths inside its root)`, { file: p });
  }
  return join(root, ...parts) + (p.endsWith('/') || parts.length === 0 ? '/' : '');
}

