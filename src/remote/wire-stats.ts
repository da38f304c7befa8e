/**
 * A file's stat over the wire: the fields the walk uses, in a fixed order,
 * as decimal strings (they are 64-bit), rebuilt on the far side into an
 * object that answers as node's BigIntStats does for them
 * (docs/FORMATS.md "Wire protocol").
 */
import type { BigIntStats } from 'node:fs';
import { QsyncError } from '../core/errors.js';
import { protocolError } from '../core/wire.js';
import { STAT_FIELDS as FIELDS, statOf, type StatField as Field } from '../io/stat-list.js';

export type WireStats = string[];

export function statsToWire(st: BigIntStats): WireStats {
  return FIELDS.map((f: Field) => st[f].toString());
}

/** Rebuild a stat from the wire; every field must be a decimal integer in range. */
export function statsFromWire(w: unknown): BigIntStats {
  if (!Array.isArray(w) || w.length !== FIELDS.length) throw new QsyncError('PROTOCOL', 'protocol error: a stat is not a list of its fields');
  const st = statOf((f, i) => {
    const v: unknown = w[i];
    if (typeof v !== 'string' || !/^-?[0-9]{1,20}$/.test(v)) throw protocolError(`stat field ${f} is not an integer`);
    return BigInt(v);
  });
  if (st.size < 0n || st.size > BigInt(Number.MAX_SAFE_INTEGER)) throw new QsyncError('PROTOCOL', 'protocol error: a stat size is out of range');
  return st;
}
