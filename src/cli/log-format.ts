/**
 * rsync's log-format escapes, for --out-format (src/cli/output.ts) and
 * --log-file-format (src/cli/log-file.ts): %[-][WIDTH]X, right-justified to
 * WIDTH ('-': left). What each gives, and those qsync has no value for:
 * README.md, "--out-format".
 */
import { QsyncError } from '../core/errors.js';
import type { FileReport } from '../sync/events.js';

/** rsync's escapes qsync refuses: %c and %C are checksums of rsync's protocol, which qsync does not compute. */
const NOT_GIVEN = new Set(['c', 'C']);

/** Refuse a format with an escape qsync cannot fill, naming it and the option (`--out-format`, `--log-file-format`). */
export function checkLogFormat(format: string, option = '--log-file-format'): void {
  for (const m of format.matchAll(/%'?-?\d*([a-zA-Z%])/g)) {
    if (NOT_GIVEN.has(m[1]!)) {
      throw new QsyncError('UNSUPPORTED', `${option}: %${m[1]} is not supported (qsync computes no rsync checksums)`, {
        option,
        hint: 'use %t %p %o %n %L %i %l %f %b %M %U %G %B',
      });
    }
  }
}

const pad2 = (n: number): string => String(n).padStart(2, '0');
/** Local time as rsync writes it in its log file: "2026/12/07 19:57:12". */
export function timestring(d: Date, sep = ' '): string {
  return `${d.getFullYear()}/${pad2(d.getMonth() + 1)}/${pad2(d.getDate())}${sep}${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
}

/** One line's values. */
export interface Item {
  op: 'send' | 'del.';
  name: string;
  link: string;
  itemize: string;
  length: number;
  /** %f: the source's path on this side (a deletion: its name). */
  source: string;
  /** %b: bytes written. */
  bytes?: number;
  mtime?: number;
  uid?: number;
  gid?: number;
  mode?: number;
}

/** rsync's %B: "rwxr-xr-x", with s/S and t/T for the special bits. */
function permString(mode: number): string {
  let out = '';
  for (const [shift, special, ch] of [[6, 0o4000, 's'], [3, 0o2000, 's'], [0, 0o1000, 't']] as const) {
    const bits = (mode >> shift) & 7;
    out += bits & 4 ? 'r' : '-';
    out += bits & 2 ? 'w' : '-';
    const x = bits & 1;
    out += mode & special ? (x ? ch : ch.toUpperCase()) : x ? 'x' : '-';
  }
  return out;
}

/** rsync's %i: an entry with nothing changed ('.', 'c' or 'h', then only dots) shows spaces after its type, ".d          ". */
const shownItemize = (i: string): string => (/^[.ch].\.+$/.test(i) ? i.slice(0, 2).padEnd(i.length) : i);

/** The values of a report, as rsync's sending side logs an entry. */
export function itemOf(r: FileReport): Item {
  const arrow = r.target !== undefined ? ` -> ${r.target}` : r.itemize.startsWith('h') && r.path.includes(' => ') ? r.path.slice(r.path.lastIndexOf(' => ')) : '';
  const name = r.path.slice(0, r.path.length - arrow.length);
  const shown = r.kind === 'dir' && !name.endsWith('/') ? `${name || '.'}/` : name;
  return {
    op: 'send',
    name: shown,
    link: arrow,
    itemize: shownItemize(r.itemize),
    length: r.length ?? r.size,
    // rsync's sending side works from '/', and drops it.
    source: (r.source ?? shown.replace(/(.)\/$/, '$1')).replace(/^\/+/, ''),
    bytes: r.literal,
    mtime: r.mtime,
    uid: r.uid,
    gid: r.gid,
    mode: r.mode,
  };
}

/** The values of a deletion of `path` (a folder's ends in '/'), for the terminal and the log file alike: %n keeps the slash, %f drops it, as rsync's. */
export function deletionItem(path: string): Item {
  return { op: 'del.', name: path, link: '', itemize: '*deleting  ', length: 0, source: path.replace(/(.)\/$/, '$1') };
}

/** `format` filled in for `item`; escapes without a value here (rsync's daemon ones, %a %h %m %P %u) stay as typed, as rsync leaves them outside a daemon. */
export function formatItem(format: string, item: Item, now: Date): string {
  return format.replace(/%('?)(-?)(\d*)([a-zA-Z%])/g, (all, _q: string, left: string, width: string, c: string) => {
    const value: Record<string, string | undefined> = {
      t: timestring(now),
      p: String(process.pid),
      o: item.op,
      n: item.name,
      L: item.link,
      i: item.itemize,
      l: String(item.length),
      f: item.source,
      b: String(item.bytes ?? 0),
      M: item.mtime === undefined ? undefined : timestring(new Date(item.mtime * 1000), '-'),
      U: item.uid === undefined ? undefined : String(item.uid),
      G: item.gid === undefined ? undefined : String(item.gid),
      B: item.mode === undefined ? undefined : permString(item.mode),
      '%': '%',
    };
    const v = value[c];
    if (v === undefined) return all;
    const w = Number(width || 0);
    return left ? v.padEnd(w) : v.padStart(w);
  });
}

/** Whether `format` (--out-format, --log-file-format) uses one of the escapes `letters` (as `[oi]`), with or without a width. */
export const usesEscape = (format: string | undefined, letters: string): boolean => format !== undefined && new RegExp(`%'?-?\\d*[${letters}]`).test(format);
