/**
 * A file's stat over the wire: the fields the walk uses, as decimal strings
 * (they are 64-bit), rebuilt on the far side into an object that answers as
 * node's BigIntStats does for them (docs/FORMATS.md "Wire protocol").
 */
import { constants, type BigIntStats } from 'node:fs';
import { QsyncError } from '../core/errors.js';

const FIELDS = ['dev', 'ino', 'mode', 'nlink', 'uid', 'gid', 'rdev', 'size', 'atimeNs', 'mtimeNs', 'ctimeNs'] as const;
type Field = (typeof FIELDS)[number];
export type WireStats = Record<Field, string>;

export function statsToWire(st: BigIntStats): WireStats {
  const out = {} as WireStats;
  for (const f of FIELDS) out[f] = st[f].toString();
  return out;
}

const type = (st: { mode: bigint }) => Number(st.mode) & constants.S_IFMT;

const PROTO = {
  isFile(this: { mode: bigint }) { return type(this) === constants.S_IFREG; },
  isDirectory(this: { mode: bigint }) { return type(this) === constants.S_IFDIR; },
  isSymbolicLink(this: { mode: bigint }) { return type(this) === constants.S_IFLNK; },
  isBlockDevice(this: { mode: bigint }) { return type(this) === constants.S_IFBLK; },
  isCharacterDevice(this: { mode: bigint }) { return type(this) === constants.S_IFCHR; },
  isFIFO(this: { mode: bigint }) { return type(this) === constants.S_IFIFO; },
  isSocket(this: { mode: bigint }) { return type(this) === constants.S_IFSOCK; },
};

/** Rebuild a stat from the wire; every field must be a decimal integer in range. */
export function statsFromWire(w: unknown): BigIntStats {
  if (typeof w !== 'object' || w === null) throw new QsyncError('PROTOCOL', 'protocol error: a stat is not an object');
  const st = Object.create(PROTO) as Record<string, unknown>;
  for (const f of FIELDS) {
    const v = (w as Record<string, unknown>)[f];
    if (typeof v !== 'string' || !/^-?[0-9]{1,20}$/.test(v)) throw new QsyncError('PROTOCOL', `protocol error: stat field ${f} is not an integer`);
    st[f] = BigInt(v);
  }
  if ((st.size as bigint) < 0n || (st.size as bigint) > BigInt(Number.MAX_SAFE_INTEGER)) throw new QsyncError('PROTOCOL', 'protocol error: a stat size is out of range');
  for (const f of ['atime', 'mtime', 'ctime'] as const) st[`${f}Ms`] = (st[`${f}Ns`] as bigint) / 1_000_000n;
  return st as unknown as BigIntStats;
}
