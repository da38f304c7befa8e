/**
 * rsync's --include/--exclude semantics as a pure matcher (rsync's
 * exclude.c rule_matches and lib/wildmatch.c, ported):
 *
 * - rules are tried in order and the first match decides;
 * - a leading '/' anchors the pattern at the transfer root;
 * - a trailing '/' matches directories only;
 * - a pattern with no '/' (other than a trailing one) and no '**' matches
 *   the last path component at any depth;
 * - an unanchored pattern with an inner '/' and no '**' matches the last
 *   N+1 components (N = its slashes); with '**' it may match after any '/';
 * - '*' matches within a component, '**' across '/', '?' one byte but not
 *   '/', '[...]' a class ('!' or '^' negates, ranges, [:alpha:] ...), '\'
 *   quotes the next character;
 * - 'dir/***' matches dir itself and everything inside it;
 * - "+ " and "- " at the start of a pattern make it an include or exclude
 *   whatever option gave it, and a lone "!" clears the rules before it.
 *
 * Paths are relative to the transfer root with '/' separators. An excluded
 * directory is not descended: the caller's walker must skip it.
 */

import { QsyncError } from './errors.js';

export type FilterRule =
  | { type: 'include' | 'exclude'; pattern: string }
  | { type: 'include-from' | 'exclude-from'; file: string };

export interface Filter {
  excluded(relPath: string, isDir: boolean): boolean;
}

/** An include or exclude rule with its pattern (a *-from rule once its file is read). */
export type PatternRule = Extract<FilterRule, { pattern: string }>;

/**
 * Replaces each --include-from/--exclude-from rule, in place, by the rules of
 * its file as rsync reads it: one pattern per line (LF, CRLF or CR), blank
 * lines and lines starting with ';' or '#' skipped; with -0 (`from0`), one
 * pattern per NUL-ended name. `readFile` gets the name as typed ("-" is rsync's stdin).
 */
export function expandFilterFiles(rules: readonly FilterRule[], readFile: (file: string) => string, from0 = false): PatternRule[] {
  return rules.flatMap((rule): PatternRule[] => {
    if ('pattern' in rule) return [rule];
    const type = rule.type === 'include-from' ? 'include' : 'exclude';
    let text: string;
    try {
      text = readFile(rule.file);
    } catch (cause) {
      throw new QsyncError('IO', `failed to open ${type} file ${rule.file}`, { file: rule.file }, { cause });
    }
    return text
      .split(from0 ? '\0' : /\r\n|\r|\n/)
      .filter((line) => line !== '' && !line.startsWith(';') && !line.startsWith('#'))
      .map((pattern) => ({ type, pattern }));
  });
}

interface Compiled {
  include: boolean;
  /** The pattern without its leading '/' (if anchored) and trailing '/'. */
  pattern: string;
  bytes: Uint8Array;
  anchored: boolean;
  dirOnly: boolean;
  /** Slashes in the pattern, a leading one included (rsync's slash_cnt). */
  slashes: number;
  wild: boolean;
  /** Contains '**'. */
  wild2: boolean;
  /** Starts with '**'. */
  wild2Prefix: boolean;
  /** Ends with '***'. */
  wild3Suffix: boolean;
}

const utf8 = new TextEncoder();

export function compileFilters(rules: readonly PatternRule[]): Filter {
  let compiled: Compiled[] = [];
  for (const rule of rules) {
    let include = rule.type === 'include';
    let pat = rule.pattern;
    if (pat.startsWith('- ') || pat.startsWith('+ ')) {
      include = pat[0] === '+';
      pat = pat.slice(2);
    } else if (pat === '!') {
      compiled = [];
      continue;
    }
    if (!pat) continue;
    const dirOnly = pat.length > 1 && pat.endsWith('/');
    if (dirOnly) pat = pat.slice(0, -1);
    const wild = /[*?[]/.test(pat);
    const wild2 = wild && pat.includes('**');
    const anchored = pat.startsWith('/');
    const pattern = anchored ? pat.slice(1) : pat;
    compiled.push({
      include,
      pattern,
      bytes: utf8.encode(pattern),
      anchored,
      dirOnly,
      slashes: pat.split('/').length - 1,
      wild,
      wild2,
      wild2Prefix: wild2 && pat.startsWith('**'),
      wild3Suffix: wild2 && pat.endsWith('***'),
    });
  }
  return {
    excluded(relPath: string, isDir: boolean): boolean {
      for (const rule of compiled) if (matches(rule, relPath, isDir)) return !rule.include;
      return false;
    },
  };
}

/** rsync's rule_matches() for a name relative to the transfer root. */
function matches(rule: Compiled, path: string, isDir: boolean): boolean {
  if (!path) return false;
  let name = path;
  if (!rule.slashes && !rule.wild2) name = path.slice(path.lastIndexOf('/') + 1);
  else if (rule.wild2Prefix) name = `/${name}`; // lets a leading "**/" match at the root
  if (isDir) {
    if (rule.wild3Suffix) name += '/'; // lets "dir/***" match dir itself
  } else if (rule.dirOnly) return false;

  if (!rule.wild) {
    if (rule.anchored) return name === rule.pattern;
    return name === rule.pattern || name.endsWith(`/${rule.pattern}`);
  }
  let where: number;
  if (!rule.anchored && rule.slashes && !rule.wild2) where = rule.slashes + 1; // the last N components
  else if (!rule.anchored && !rule.wild2Prefix && rule.wild2) where = -1; // after any '/'
  else where = 0;
  return wildmatchAt(rule.bytes, utf8.encode(name), where);
}

const TRUE = 1;
const FALSE = 0;
const ABORT_ALL = -1;
const ABORT_TO_STARSTAR = -2;
const ch = (s: string): number => s.charCodeAt(0);
const SLASH = ch('/');
const STAR = ch('*');

/** rsync's wildmatch(): the whole of `text` against `pattern` ('*', '?', '[...]', '\\'), as --usermap matches names. */
export const wildmatch = (pattern: string, text: string): boolean => wildmatchAt(utf8.encode(pattern), utf8.encode(text), 0);

/** wildmatch_array(): where > 0 matches the last `where` components, < 0 at the start or after any '/'. */
function wildmatchAt(p: Uint8Array, t: Uint8Array, where: number): boolean {
  let start = 0;
  if (where > 0) {
    let count = where;
    start = -1;
    for (let i = t.length - 1; i >= 0; i--) {
      if (t[i] === SLASH && !--count) {
        start = i + 1;
        break;
      }
    }
    if (start < 0 && count === 1) start = 0;
    if (start < 0) return false;
  }
  let matched = dowild(p, 0, t, start);
  if (matched !== TRUE && where < 0 && matched !== ABORT_ALL) {
    for (let i = start; ; ) {
      if (i >= t.length) return false;
      if (t[i++] === SLASH && (matched = dowild(p, 0, t, i)) !== FALSE && matched !== ABORT_TO_STARSTAR) break;
    }
  }
  return matched === TRUE;
}

const CLASSES: Record<string, (c: number) => boolean> = {
  alnum: (c) => /[A-Za-z0-9]/.test(String.fromCharCode(c)),
  alpha: (c) => /[A-Za-z]/.test(String.fromCharCode(c)),
  blank: (c) => c === 0x20 || c === 0x09,
  cntrl: (c) => c < 0x20 || c === 0x7f,
  digit: (c) => c >= 0x30 && c <= 0x39,
  graph: (c) => c > 0x20 && c < 0x7f,
  lower: (c) => c >= 0x61 && c <= 0x7a,
  print: (c) => c >= 0x20 && c < 0x7f,
  punct: (c) => c > 0x20 && c < 0x7f && !/[A-Za-z0-9]/.test(String.fromCharCode(c)),
  space: (c) => (c >= 0x09 && c <= 0x0d) || c === 0x20,
  upper: (c) => c >= 0x41 && c <= 0x5a,
  xdigit: (c) => /[0-9A-Fa-f]/.test(String.fromCharCode(c)),
};

/** rsync's dowild(): pattern p from pi against text t from ti, over bytes. */
function dowild(p: Uint8Array, pi: number, t: Uint8Array, ti: number): number {
  const at = (i: number): number => p[i] ?? 0; // 0 marks the end, as the C string's NUL
  for (; pi < p.length; pi++, ti++) {
    let pch = p[pi]!;
    if (ti >= t.length && pch !== STAR) return ABORT_ALL;
    const tch = t[ti] ?? 0;
    switch (String.fromCharCode(pch)) {
      case '\\':
        if (tch !== at(++pi)) return FALSE;
        continue;
      case '?':
        if (tch === SLASH) return FALSE;
        continue;
      case '*': {
        const special = at(pi + 1) === STAR;
        while (at(pi) === STAR) pi++;
        if (pi >= p.length) {
          // A trailing "**" matches everything, a trailing "*" only up to the next '/'.
          return special || !t.subarray(ti).includes(SLASH) ? TRUE : FALSE;
        }
        for (; ti < t.length; ti++) {
          const matched = dowild(p, pi, t, ti);
          if (matched !== FALSE) {
            if (!special || matched !== ABORT_TO_STARSTAR) return matched;
          } else if (!special && t[ti] === SLASH) return ABORT_TO_STARSTAR;
        }
        return ABORT_ALL;
      }
      case '[': {
        pch = at(++pi);
        if (pch === ch('^')) pch = ch('!');
        const negated = pch === ch('!');
        if (negated) pch = at(++pi);
        let prev = 0;
        let matched = false;
        do {
          if (!pch) return ABORT_ALL;
          if (pch === ch('\\')) {
            pch = at(++pi);
            if (!pch) return ABORT_ALL;
            if (tch === pch) matched = true;
          } else if (pch === ch('-') && prev && at(pi + 1) && at(pi + 1) !== ch(']')) {
            pch = at(++pi);
            if (pch === ch('\\')) {
              pch = at(++pi);
              if (!pch) return ABORT_ALL;
            }
            if (tch <= pch && tch >= prev) matched = true;
            pch = 0; // no range may start here
          } else if (pch === ch('[') && at(pi + 1) === ch(':')) {
            const s = (pi += 2);
            while (at(pi) && at(pi) !== ch(']')) pi++;
            if (!at(pi)) return ABORT_ALL;
            if (pi - s - 1 < 0 || at(pi - 1) !== ch(':')) {
              // No ":]": a plain '['.
              pi = s - 2;
              pch = ch('[');
              if (tch === pch) matched = true;
              continue;
            }
            const test = CLASSES[new TextDecoder().decode(p.subarray(s, pi - 1))];
            if (!test) return ABORT_ALL;
            if (test(tch)) matched = true;
            pch = 0;
          } else if (tch === pch) matched = true;
        } while (((prev = pch), (pch = at(++pi)) !== ch(']')));
        if (matched === negated || tch === SLASH) return FALSE;
        continue;
      }
      default:
        if (tch !== pch) return FALSE;
    }
  }
  return ti >= t.length ? TRUE : FALSE;
}
