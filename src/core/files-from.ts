/**
 * Names relative to a source folder: the lines of a --files-from list and
 * the operands of -R, as `man rsync` describes them. Details the manual
 * leaves open were taken from rsync 3.5's answers and are pinned by the
 * differential cases in test/rsync-options.test.ts.
 *
 * A --files-from line: lines end at LF or CR (at NUL with -0); empty ones
 * and those starting with '#' or ';' are skipped, one holding a NUL is
 * refused. A leading '/' is dropped and '..' takes back the component
 * before it (at the top it is dropped), so a name never leaves SRC. A leading "./" sends SRC's own folder too;
 * a name ending in '/', "/." or ".." (or naming SRC itself) has its
 * contents listed. A "/./" further in, where rsync starts the relative
 * path over, is refused.
 *
 * A -R operand keeps its path from its first "/./" on (the part before is
 * the folder it is read from), or all of it; '.' components and doubled
 * slashes are dropped, and a '..' is refused in rsync's words.
 */
import { QsyncError } from './errors.js';

export interface ListedName {
  /** Relative to SRC and DEST, '/'-separated, no '.' or '..' ('' is SRC itself). */
  rel: string;
  /** Its contents are listed too (a trailing '/', "." ): one level, or all with -r. */
  contents: boolean;
  /** Given as "./NAME": SRC's folder itself is sent first (rsync's implied dot dir). */
  dotDir: boolean;
}

/** The components of a path, without the empty ones that doubled, leading and trailing slashes leave. */
const components = (path: string): string[] => path.split('/').filter((c) => c !== '');

/** Whether a name asks for a folder's contents: it ends in '/', "/.", "/.." or is "." or "..". */
const endsAsFolder = (path: string): boolean => /(^|\/)\.{0,2}$/.test(path);

/** The names of a --files-from list's text, comments and empty lines left out. */
export function splitFilesFrom(text: string, from0: boolean): string[] {
  return text.split(from0 ? '\0' : /\r|\n/).filter((line) => line !== '' && line[0] !== '#' && line[0] !== ';');
}

/** One name of a --files-from list; `list` names the list in messages. */
export function listedName(line: string, list: string): ListedName {
  if (line.includes('\0')) {
    throw new QsyncError('USAGE', `--files-from ${list}: the name ${JSON.stringify(line)} holds a NUL byte, which no file name can`, {
      file: list,
      value: line,
      hint: 'end the names with newlines, or give -0 for a list that ends them with NUL',
    });
  }
  let path = line.replace(/^\/+/, '');
  const dotDir = path.startsWith('./');
  if (dotDir) path = path.slice(2).replace(/^\/+/, '');
  if (path.includes('/./') || path.startsWith('./')) {
    throw new QsyncError('UNSUPPORTED', `--files-from ${list}: the name "${line}" has a "/./" inside, which qsync does not support`, {
      file: list,
      value: line,
      hint: 'list the name from SRC without the "/./"',
    });
  }
  const kept: string[] = [];
  for (const c of components(path)) {
    if (c === '..') kept.pop();
    else if (c !== '.') kept.push(c);
  }
  return { rel: kept.join('/'), contents: kept.length === 0 || endsAsFolder(path), dotDir };
}

/** A -R operand: the folder it is read from (`base`) and its name below it. */
export function relativeOperand(operand: string): { base: string; name: ListedName } {
  const marker = operand.indexOf('/./');
  const base = marker >= 0 ? operand.slice(0, marker) || '/' : operand.startsWith('/') ? '/' : '.';
  const path = marker >= 0 ? operand.slice(marker + 3) : operand;
  const kept = components(path).filter((c) => c !== '.');
  if (kept.includes('..')) {
    const shown = (marker < 0 && operand.startsWith('/') ? '/' : '') + kept.join('/');
    throw new QsyncError('USAGE', `found ".." dir in relative path: ${shown}`, { operand });
  }
  return { base, name: { rel: kept.join('/'), contents: kept.length === 0 || endsAsFolder(path), dotDir: path.startsWith('./') } };
}
