/**
 * A file's stat over the wire: the fields the walk uses, in a fixed order,
 * as decimal strings (they are 64-bit), rebuilt on the far side into an
 * object that answers as node's BigIntStats does for them
 * (docs/FORMATS.md "Wire protocol").
 */
import { constants, type BigIntStats } from 'node:fs';
import { QsyncError } from '../core/errors.js';
import { protocolError } from '../core/wire.js';

const FIELDS = ['dev', 'ino', 'mode', 'nlink', 'uid', 'gid', 'rdev', 'size', 'atimeNs', 'mtimeNs', 'ctimeNs'] as const;
type Field = (typeof FIELDS)[number];
export type WireStats = string[];

export function statsToWire(st: BigIntStats): WireStats {
  return FIELDS.map((f: Field) => st[f].toString());
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
  if (!Array.isArray(w) || w.length !== FIELDS.length) throw new QsyncError('PROTOCOL', 'protocol error: a stat is not a list of its fields');
  const st = Object.create(PROTO) as Record<string, unknown>;
  for (const [i, f] of FIELDS.entries()) {
    const v: unknown = w[i];
    if (typeof v !== 'string' || !/^-?[0-9]{1,20}$/.test(v)) throw protocolError(`stat field ${f} is not an integer`);
    st[f] = BigInt(v);
  }
  if ((st.size as bigint) < 0n || (st.size as bigint) > BigInt(Number.MAX_SAFE_INTEGER)) throw new QsyncError('PROTOCOL', 'protocol error: a stat size is out of range');
  for (const f of ['atime', 'mtime', 'ctime'] as const) st[`${f}Ms`] = (st[`${f}Ns`] as bigint) / 1_000_000n;
  return st as unknown as BigIntStats;
}
