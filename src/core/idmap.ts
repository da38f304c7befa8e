/**
 * --usermap/--groupmap STRING (and --chown, which the command line turns
 * into "*:USER" and "*:GROUP"), as `man rsync` describes it: FROM:TO pairs
 * separated by commas, the first pair whose FROM matches a source's owner
 * or group giving its new one. A FROM is
 *
 * - an ID ("0") or an inclusive range of IDs ("1000-1999"): it starts with
 *   a digit, and matches the number whatever its name;
 * - a wildcard (it holds '*', '?' or '['): matched against the source's
 *   name by wildmatch, so "*" matches every entry, named or not;
 * - else a name, compared whole: an empty one matches the IDs that have no
 *   name (all of them with --numeric-ids).
 *
 * TO is a name or an ID on the receiving side, resolved at run time
 * (src/sync/id-map.ts). The words of the errors, the 32-bit bound on IDs
 * and the order in which pairs are checked (the last pair first, so the
 * message names the last bad one) are rsync 3.5's, observed and pinned by
 * test/args.test.ts and test/rsync-options.test.ts.
 */
import { QsyncError } from './errors.js';
import { wildmatch } from './filter.js';

/** What a pair's FROM matches. */
export type IdFrom = { ids: [low: number, high: number] } | { pattern: string } | { name: string };

export interface IdRule {
  from: IdFrom;
  /** The receiver's name or ID, as given. */
  to: string;
}

const MAX_ID = 2 ** 32 - 1;

function idNumber(text: string): number {
  const id = Number(text);
  if (id > MAX_ID) throw new QsyncError('USAGE', `Invalid ID number: ${text}`, { value: text });
  return id;
}

function parsePair(item: string, option: string): IdRule {
  const colon = item.indexOf(':');
  if (colon < 0) throw new QsyncError('USAGE', `No colon found in ${option}: ${item}`, { option, value: item });
  const from = item.slice(0, colon);
  const to = item.slice(colon + 1);
  if (!to) throw new QsyncError('USAGE', `No name found after colon ${option}: ${item}`, { option, value: item });
  let source: IdFrom;
  if (/^\d/.test(from)) {
    const range = /^(\d+)(?:-(\d+))?$/.exec(from);
    if (!range) throw new QsyncError('USAGE', `Invalid number in ${option}: ${from}`, { option, value: from });
    const low = idNumber(range[1]!);
    source = { ids: [low, range[2] === undefined ? low : idNumber(range[2])] };
  } else {
    source = /[*?[]/.test(from) ? { pattern: from } : { name: from };
  }
  if (/^\d+$/.test(to)) idNumber(to);
  return { from: source, to };
}

/** The pairs of a --usermap ('user') or --groupmap ('group') STRING, in order; a bad one is a USAGE error in rsync's words. */
export function parseIdMap(text: string, kind: 'user' | 'group'): IdRule[] {
  const option = `--${kind}map`;
  const items = text.split(',');
  const rules: IdRule[] = new Array<IdRule>(items.length);
  for (let i = items.length - 1; i >= 0; i--) rules[i] = parsePair(items[i]!, option);
  return rules;
}

function matches(from: IdFrom, id: number, name: string): boolean {
  if ('ids' in from) return id >= from.ids[0] && id <= from.ids[1];
  if ('pattern' in from) return wildmatch(from.pattern, name);
  return from.name === name;
}

/** The first rule that matches an ID and its sender-side name (undefined: no name, matched as ""). */
export function matchIdRule(rules: readonly IdRule[], id: number, name: string | undefined): IdRule | undefined {
  return rules.find((r) => matches(r.from, id, name ?? ''));
}
