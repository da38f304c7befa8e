/**
 * rsync's --usermap/--groupmap and --chown (its uidlist.c, ported): a
 * comma list of FROM:TO, the first FROM that matches a source's owner
 * (group) gives the id it gets. FROM is a name, a pattern of names ('*',
 * '?', '[...]'; "*" also matches an id that has no name), an id, or a range
 * of ids "LOW-HIGH". `--chown=USER:GROUP` is `--usermap=*:USER
 * --groupmap=*:GROUP`. Names are looked up where the map is used.
 */
import { QsyncError } from './errors.js';
import { wildmatch } from './filter.js';

export type IdFrom = { wild: string } | { name: string } | { lo: number; hi: number };
export interface IdRule {
  from: IdFrom;
  /** A name or an id, as given. */
  to: string;
}

/** rsync's parse_name_map(): the rules of a --usermap (`kind` "user") or --groupmap ("group"). */
export function parseIdMap(text: string, kind: 'user' | 'group'): IdRule[] {
  return text.split(',').map((item): IdRule => {
    const colon = item.indexOf(':');
    if (colon < 0) throw new QsyncError('USAGE', `No colon found in --${kind}map: ${item}`, { option: `--${kind}map`, value: text });
    const from = item.slice(0, colon);
    const to = item.slice(colon + 1);
    if (!to) throw new QsyncError('USAGE', `No name found after colon --${kind}map: ${item}`, { option: `--${kind}map`, value: text });
    if (/^\d/.test(from)) {
      const m = /^(\d+)(?:-(\d+))?$/.exec(from);
      if (!m) throw new QsyncError('USAGE', `Invalid number in --${kind}map: ${from}`, { option: `--${kind}map`, value: text });
      return { from: { lo: Number(m[1]), hi: Number(m[2] ?? m[1]) }, to };
    }
    return { from: /[*[?]/.test(from) ? { wild: from } : { name: from }, to };
  });
}

/** The rule that maps `id` (named `name`, if it has a name), as rsync's recv_add_id() finds it. */
export function matchIdRule(rules: readonly IdRule[], id: number, name: string | undefined): IdRule | undefined {
  return rules.find(({ from }) =>
    'wild' in from ? wildmatch(from.wild, name ?? '') : 'name' in from ? from.name === (name ?? '') : id >= from.lo && id <= from.hi,
  );
}
