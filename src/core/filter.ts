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

export type FilterRule =
  | { type: 'include' | 'exclude'; pattern: string }
  | { type: 'include-from' | 'exclude-from'; file: string };

export interface Filter {
  excluded(relPath: string, isDir: boolean): boolean;
}
