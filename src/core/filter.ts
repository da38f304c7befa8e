/**
 * --include/--exclude (and their -from files) as `man rsync` describes them
 * under PATTERN MATCHING RULES, as a pure matcher:
 *
 * - rules are tried in order and the first match decides;
 * - a leading '/' anchors the pattern at the transfer root;
 * - a trailing '/' matches directories only;
 * - a pattern with no '/' (other than a trailing one) and no '**' matches
 *   the last path component at any depth; one with an inner '/' and no
 *   '**' the last components, as many as it has; one with '**' the whole
 *   path or any tail of it that starts after a '/';
 * - with '*', '?' or '[' in it a pattern is a wildcard: '*' matches within
 *   a component, '**' across '/', '?' one byte but not '/', '[...]' one
 *   byte of a class ('!' or '^' negates, ranges, [:alpha:] ...; never
 *   '/'), '\' quotes the next character; without one it is compared as it
 *   is (a '\' is itself);
 * - 'dir/***' matches the directory dir and everything inside it;
 * - "+ " and "- " at the start of a pattern make it an include or exclude
 *   whatever option gave it, and a lone "!" clears the rules before it.
 *
 * Details the manual leaves open were taken from rsync 3.5's answers and
 * are pinned by the differential cases in test/filter.test.ts: in an
 * unanchored pattern a leading '**' and the '/' after it may match
 * nothing (so "**" + "/c" matches a top-level c), elsewhere a '**' between
 * slashes matches at least one byte; a class never matches '/', and a
 * reversed range ("[c-a]") matches its first byte only; a pattern with an
 * unclosed '[' matches nothing; "+ " or "- " with nothing after it is
 * refused in rsync's words.
 *
 * Paths are relative to the transfer root with '/' separators; names are
 * matched as their UTF-8 bytes. An excluded directory is not descended:
 * the caller's walker must skip it.
 */

import { QsyncError } from './errors.js';
import { splitFilesFrom } from './files-from.js';

export type FilterRule =
  | { type: 'include' | 'exclude'; pattern: string }
  | { type: 'include-from' | 'exclude-from' | 'merge'; file: string };

/**
 * One --filter (-f) rule as rsync's manual writes them, without modifiers:
 * `- PATTERN` / `exclude PATTERN`, `+ PATTERN` / `include PATTERN`,
 * `. FILE` / `merge FILE` (the file's lines are rules of this form; `#` and
 * `;` lines are comments), and `!` / `clear`. Per-directory merges
 * (`dir-merge`, `:`, `-F`), rules for one side only (`hide`, `show`,
 * `protect`, `risk`) and modifiers are refused with what to use instead.
 */
export function parseFilterRule(text: string): FilterRule[] {
  const m = /^(\S+?)(,\S*)?(?: (.*))?$/s.exec(text);
  const refuse = (why: string): never => {
    throw new QsyncError('UNSUPPORTED', `filter rule "${text}": ${why}`, { value: text, hint: 'use --exclude/--include rules, or rsync' });
  };
  if (!m) throw new QsyncError('USAGE', `Unknown filter rule: ${text}`, { value: text });
  const [, word, mods, arg] = m;
  const kinds: Record<string, 'exclude' | 'include' | 'merge' | 'clear' | 'dir-merge' | 'protect'> = {
    '-': 'exclude', exclude: 'exclude', H: 'protect', hide: 'protect',
    '+': 'include', include: 'include', S: 'protect', show: 'protect',
    '.': 'merge', merge: 'merge', '!': 'clear', clear: 'clear',
    ':': 'dir-merge', 'dir-merge': 'dir-merge', P: 'protect', protect: 'protect', R: 'protect', risk: 'protect',
  };
  const kind = Object.hasOwn(kinds, word!) ? kinds[word!] : undefined;
  if (!kind) throw new QsyncError('USAGE', `Unknown filter rule: ${text}`, { value: text });
  if (mods) refuse('rule modifiers are not supported by qsync');
  if (kind === 'dir-merge') refuse('per-directory merge files (dir-merge, -F) are not supported by qsync');
  if (kind === 'protect') refuse('rules for one side only (hide, show, protect, risk) are not supported by qsync');
  if (kind === 'clear') {
    if (arg !== undefined) throw new QsyncError('USAGE', `Unknown filter rule: ${text}`, { value: text });
    return [{ type: 'exclude', pattern: '!' }];
  }
  if (!arg) throw new QsyncError('USAGE', `unexpected end of filter rule: ${text}`, { value: text });
  if (kind === 'merge') return [{ type: 'merge', file: arg }];
  // The prefix made explicit: compileFilters reads exactly one.
  return [{ type: kind === 'include' ? 'include' : 'exclude', pattern: `${kind === 'include' ? '+' : '-'} ${arg}` }];
}

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
    if (rule.type === 'merge') {
      // A merge file's lines are --filter rules; one that merges again is not followed.
      return splitFilesFrom(readFile(rule.file), false).flatMap((line) =>
        parseFilterRule(line).map((r) => {
          if ('pattern' in r) return r;
          throw new QsyncError('UNSUPPORTED', `filter rule "${line}" in ${rule.file}: a merge inside a merge file is not supported by qsync`, { file: rule.file });
        }),
      );
    }
    const type = rule.type === 'include-from' ? 'include' : 'exclude';
    let text: string;
    try {
      text = readFile(rule.file);
    } catch (e) {
      if (e instanceof QsyncError) throw e;
      throw new QsyncError('IO', `failed to open ${type} file ${rule.file}`, { file: rule.file }, { cause: e });
    }
    return splitFilesFrom(text, from0).map((pattern) => ({ type, pattern }));
  });
}

/** A name as the byte string rsync matches: one char per UTF-8 byte. */
const bytesOf = (s: string): string => Buffer.from(s, 'utf8').toString('latin1');

const escapeRe = (ch: string): string => ch.replace(/[\\^$.*+?()[\]{}|/-]/g, '\\$&');

/** The ASCII bytes of the POSIX classes a '[...]' may name. */
const POSIX_CLASSES: Record<string, string> = {
  alnum: '0-9A-Za-z',
  alpha: 'A-Za-z',
  blank: ' \\t',
  cntrl: '\\x00-\\x1f\\x7f',
  digit: '0-9',
  graph: '!-~',
  lower: 'a-z',
  print: ' -~',
  punct: '!-\\/:-@\\[-`{-~',
  space: '\\t-\\r ',
  upper: 'A-Z',
  xdigit: '0-9A-Fa-f',
};

/** The regular expression body of a '[...]' starting at `at` (on '['), and where it ends; undefined when it never closes. */
function classAt(p: string, at: number): { re: string; end: number } | undefined {
  let i = at + 1;
  const negated = p[i] === '!' || p[i] === '^';
  if (negated) i++;
  let body = '';
  for (let first = true; i < p.length; first = false) {
    const ch = p[i]!;
    if (ch === ']' && !first) return { re: negated ? `[^/${body}]` : `(?!/)[${body}]`, end: i + 1 };
    if (ch === '[' && p[i + 1] === ':') {
      const close = p.indexOf(':]', i + 2);
      const set = close < 0 ? undefined : POSIX_CLASSES[p.slice(i + 2, close)];
      if (set !== undefined) {
        body += set;
        i = close + 2;
        continue;
      }
    }
    let lo = ch;
    i++;
    if (lo === '\\' && i < p.length) lo = p[i++]!;
    if (p[i] === '-' && i + 1 < p.length && p[i + 1] !== ']') {
      let hi = p[i + 1]!;
      i += 2;
      if (hi === '\\' && i < p.length) hi = p[i++]!;
      // A reversed range (c-a) matches its first byte only.
      body += hi >= lo ? `${escapeRe(lo)}-${escapeRe(hi)}` : escapeRe(lo);
    } else {
      body += escapeRe(lo);
    }
  }
  return undefined;
}

/** A pattern's piece: one byte it takes, or a star (any run of bytes; across '/' for '**'). */
type Token = { one: (ch: string) => boolean } | { star: boolean };

/** A wildcard pattern (bytes) as tokens; undefined when it can match nothing. */
function wildTokens(p: string): Token[] | undefined {
  const out: Token[] = [];
  const literal = (x: string): Token => ({ one: (ch) => ch === x });
  let i = 0;
  while (i < p.length) {
    const ch = p[i]!;
    if (ch === '*') {
      let stars = 1;
      while (p[i + stars] === '*') stars++;
      out.push({ star: stars > 1 });
      i += stars;
    } else if (ch === '?') {
      out.push({ one: (c) => c !== '/' });
      i++;
    } else if (ch === '[') {
      const cls = classAt(p, i);
      if (!cls) return undefined;
      const re = new RegExp(`^${cls.re}$`, 's');
      out.push({ one: (c) => re.test(c) });
      i = cls.end;
    } else if (ch === '\\' && i + 1 < p.length) {
      out.push(literal(p[i + 1]!));
      i += 2;
    } else {
      out.push(literal(ch));
      i++;
    }
  }
  return out;
}

/**
 * Whether `text` (bytes) is the whole of `tokens`, every way of matching it
 * followed at once (the set of places in the pattern reached so far), so a
 * pattern with many stars costs pattern × text steps: a backtracking regular
 * expression took time exponential in the stars on a long name, which a
 * hostile name or a client's filter on a server could ask for.
 */
function tokensMatch(tokens: Token[], text: string): boolean {
  const m = tokens.length;
  let cur = new Uint8Array(m + 1);
  let next = new Uint8Array(m + 1);
  // A star may take nothing: the place after it is reached too (in order, so stars in a row all pass).
  const skipStars = (s: Uint8Array) => {
    for (let i = 0; i < m; i++) if (s[i] && 'star' in tokens[i]!) s[i + 1] = 1;
  };
  cur[0] = 1;
  skipStars(cur);
  for (let k = 0; k < text.length; k++) {
    const ch = text[k]!;
    next.fill(0);
    let alive = false;
    for (let i = 0; i < m; i++) {
      if (!cur[i]) continue;
      const t = tokens[i]!;
      // A star takes the byte and stays; any other token takes it and moves on.
      if ('star' in t ? t.star || ch !== '/' : t.one(ch)) {
        next['star' in t ? i : i + 1] = 1;
        alive = true;
      }
    }
    if (!alive) return false;
    skipStars(next);
    [cur, next] = [next, cur];
  }
  return cur[m] === 1;
}

/** Whether `text` is the pattern: a wildcard match, or the same bytes. */
type Matcher = (text: string) => boolean;

function matcherOf(p: string, leadingAnyDirs: boolean): Matcher {
  if (!/[*?[]/.test(p)) return (text) => text === p;
  const tokens = wildTokens(p);
  if (!tokens) return () => false;
  // A leading "**/" also matches nothing: the rest alone.
  const rest = leadingAnyDirs && p.startsWith('**/') ? wildTokens(p.slice(3)) : undefined;
  return rest ? (text) => tokensMatch(rest, text) || tokensMatch(tokens, text) : (text) => tokensMatch(tokens, text);
}

/** The whole of `text` against a wildcard `pattern` ('*', '?', '[...]', '\\'), as --usermap matches names. */
export const wildmatch = (pattern: string, text: string): boolean => {
  const tokens = wildTokens(bytesOf(pattern));
  return tokens !== undefined && tokensMatch(tokens, bytesOf(text));
};

/** Whether a path (bytes) is matched by pattern `p` (no leading or trailing '/'), as its shape says. */
function pathMatcher(p: string, anchored: boolean): Matcher {
  const match = matcherOf(p, !anchored);
  if (anchored) return match;
  if (!p.includes('/') && !p.includes('**')) return (path) => match(path.slice(path.lastIndexOf('/') + 1));
  if (p.includes('**')) {
    // The whole path, or any tail of it after a '/'.
    return (path) => match(path) || [...path.matchAll(/\//g)].some((m) => match(path.slice(m.index + 1)));
  }
  const slashes = p.split('/').length - 1;
  return (path) => {
    const parts = path.split('/');
    return parts.length > slashes && match(parts.slice(parts.length - slashes - 1).join('/'));
  };
}

interface Compiled {
  include: boolean;
  matches(path: string, isDir: boolean): boolean;
}

function compileRule(include: boolean, pattern: string): Compiled {
  let p = bytesOf(pattern);
  const anchored = p.startsWith('/');
  if (anchored) p = p.slice(1);
  const dirOnly = p.endsWith('/');
  if (dirOnly) p = p.slice(0, -1);
  if (p.endsWith('/***')) {
    // "dir/***": the folder itself (as "dir/") and everything inside it (as "dir/**").
    const self = pathMatcher(p.slice(0, -4), anchored);
    const inside = pathMatcher(p.slice(0, -1), anchored);
    return { include, matches: (path, isDir) => (isDir && self(path)) || ((!dirOnly || isDir) && inside(path)) };
  }
  const match = pathMatcher(p, anchored);
  return { include, matches: (path, isDir) => (!dirOnly || isDir) && match(path) };
}

/** The rules, in order, as one filter: "+ "/"- " prefixes read, "!" clearing, empty patterns ignored. */
export function compileFilters(rules: readonly PatternRule[]): Filter {
  let compiled: Compiled[] = [];
  for (const rule of rules) {
    let include = rule.type === 'include';
    let pattern = rule.pattern;
    if (pattern === '!') {
      compiled = [];
      continue;
    }
    if (pattern.startsWith('+ ') || pattern.startsWith('- ')) {
      include = pattern[0] === '+';
      if (pattern.length === 2) throw new QsyncError('USAGE', `unexpected end of filter rule: ${pattern}`, { value: pattern });
      pattern = pattern.slice(2);
    }
    if (pattern) compiled.push(compileRule(include, pattern));
  }
  return {
    excluded(relPath, isDir) {
      if (!compiled.length) return false;
      const path = bytesOf(relPath);
      const hit = compiled.find((r) => r.matches(path, isDir));
      return hit !== undefined && !hit.include;
    },
  };
}
