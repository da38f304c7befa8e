/**
 * rsync's --files-from list: which names, relative to the one SRC, are
 * transferred (rsync's read_line, sanitize_path and send_file_list, ported
 * for local lists). Lines end at LF or CR (NUL with -0); empty lines and
 * lines starting with '#' or ';' are skipped. A leading '/' and '..'
 * components are dropped (sanitize_path: a name never leaves SRC); a
 * leading "./" makes SRC's own folder part of the transfer (its attributes
 * go to DEST); a name ending in '/' (or "/.", or "." alone) has its
 * contents listed too, one level unless -r.
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

/** Split a --files-from text into its names (rsync's read_line with comments dropped). */
export function splitFilesFrom(text: string, from0: boolean): string[] {
  return text.split(from0 ? '\0' : /\r|\n/).filter((l) => l !== '' && !l.startsWith('#') && !l.startsWith(';'));
}

/** One line of the list as rsync reads it; `list` names the list in messages. */
export function listedName(line: string, list: string): ListedName {
  // sanitize_path() keeping dot dirs: slashes collapsed, '..' takes back the component before it (or is dropped).
  const parts: string[] = [];
  for (const c of line.split('/')) {
    if (c === '') continue;
    if (c === '..') parts.pop();
    else parts.push(c);
  }
  if (!parts.length) return { rel: '', contents: true, dotDir: false };
  const dotDir = parts[0] === '.' && parts.length > 1;
  const rest = dotDir ? parts.slice(1) : parts;
  const last = rest.length - 1;
  if (rest.some((c, i) => c === '.' && i < last)) {
    throw new QsyncError('UNSUPPORTED', `--files-from ${list}: "${line}" marks where the relative path starts with "/./", which qsync does not support`, {
      file: list,
      hint: 'list the names relative to SRC, and give the folder before "/./" as SRC',
    });
  }
  // "NAME/", "NAME/." and "NAME/X/.." (which sanitizes to "NAME/") all end in a slash for rsync.
  const names = rest.filter((c) => c !== '.');
  return { rel: names.join('/'), contents: names.length === 0 || /\/(\.|\.\.)?$/.test(line), dotDir };
}

/**
 * One SRC under -R (rsync's send_file_list with relative paths): the
 * folder it is taken from (what comes before a "/./", else "/" for an
 * absolute path, else ".") and its name below that folder, which it keeps
 * in DEST. A ".." in that name is refused, as rsync refuses it.
 */
export function relativeOperand(operand: string): { base: string; name: ListedName } {
  const cut = operand.indexOf('/./');
  const base = cut >= 0 ? operand.slice(0, cut) || '/' : operand.startsWith('/') ? '/' : '.';
  const active = cut >= 0 ? operand.slice(cut + 3) : operand;
  const parts = active.split('/').filter((c) => c !== '');
  const names = parts.filter((c) => c !== '.');
  if (names.includes('..')) throw new QsyncError('USAGE', `found ".." dir in relative path: ${names.join('/')}`, { file: operand });
  return { base, name: { rel: names.join('/'), contents: /\/\.?$/.test(active) || !names.length, dotDir: parts[0] === '.' && names.length > 0 } };
}
