/**
 * Stats held for a while, kept small. Node's BigIntStats carries 18 BigInts
 * and 4 Dates (about 700 bytes); a folder's listing holds one per entry
 * until the walk is past the folder, and the folders above it keep theirs
 * too: a folder of 18,000 names held 15 MB. A StatList keeps the fields the
 * walk uses (STAT_FIELDS, the same a peer sends: src/remote/wire-stats.ts)
 * as 64-bit integers, and gives each back as an object that answers as a
 * BigIntStats does for them (statOf).
 */
import { constants, type BigIntStats } from 'node:fs';

/** The fields of a stat the walk and the engine read. */
export const STAT_FIELDS = ['dev', 'ino', 'mode', 'nlink', 'uid', 'gid', 'rdev', 'size', 'atimeNs', 'mtimeNs', 'ctimeNs'] as const;
export type StatField = (typeof STAT_FIELDS)[number];

const type = (st: { mode: bigint }) => Number(st.mode) & constants.S_IFMT;

/** The methods of a stat: its type, from its mode. */
const PROTO = {
  isFile(this: { mode: bigint }) { return type(this) === constants.S_IFREG; },
  isDirectory(this: { mode: bigint }) { return type(this) === constants.S_IFDIR; },
  isSymbolicLink(this: { mode: bigint }) { return type(this) === constants.S_IFLNK; },
  isBlockDevice(this: { mode: bigint }) { return type(this) === constants.S_IFBLK; },
  isCharacterDevice(this: { mode: bigint }) { return type(this) === constants.S_IFCHR; },
  isFIFO(this: { mode: bigint }) { return type(this) === constants.S_IFIFO; },
  isSocket(this: { mode: bigint }) { return type(this) === constants.S_IFSOCK; },
};

/** A stat of the STAT_FIELDS `value` gives (and their ...Ms, as BigIntStats has them). */
export function statOf(value: (f: StatField, i: number) => bigint): BigIntStats {
  const st = Object.create(PROTO) as Record<string, unknown>;
  for (let i = 0; i < STAT_FIELDS.length; i++) st[STAT_FIELDS[i]!] = value(STAT_FIELDS[i]!, i);
  for (const f of ['atime', 'mtime', 'ctime'] as const) st[`${f}Ms`] = (st[`${f}Ns`] as bigint) / 1_000_000n;
  return st as unknown as BigIntStats;
}

/** statOf for a StatList's row: one shape for all (the walk makes one per entry). */
class PackedStat {
  readonly dev: bigint; readonly ino: bigint; readonly mode: bigint; readonly nlink: bigint; readonly uid: bigint; readonly gid: bigint;
  readonly rdev: bigint; readonly size: bigint; readonly atimeNs: bigint; readonly mtimeNs: bigint; readonly ctimeNs: bigint;
  readonly atimeMs: bigint; readonly mtimeMs: bigint; readonly ctimeMs: bigint;
  constructor(v: BigInt64Array, at: number) {
    this.dev = v[at]!; this.ino = v[at + 1]!; this.mode = v[at + 2]!; this.nlink = v[at + 3]!; this.uid = v[at + 4]!; this.gid = v[at + 5]!;
    this.rdev = v[at + 6]!; this.size = v[at + 7]!; this.atimeNs = v[at + 8]!; this.mtimeNs = v[at + 9]!; this.ctimeNs = v[at + 10]!;
    this.atimeMs = this.atimeNs / 1_000_000n; this.mtimeMs = this.mtimeNs / 1_000_000n; this.ctimeMs = this.ctimeNs / 1_000_000n;
  }
}
Object.assign(PackedStat.prototype, PROTO);

const WIDTH = STAT_FIELDS.length;

/** Names and their stats, in the order pushed, at 88 bytes a stat. */
export class StatList {
  readonly names: string[] = [];
  private values = new BigInt64Array(WIDTH * 8);
  /** Stats whose values do not fit 64 bits signed (none that node gives): kept as they are. */
  private odd: Map<number, BigIntStats> | undefined;

  get length(): number {
    return this.names.length;
  }

  push(name: string, st: BigIntStats): void {
    const i = this.names.length;
    this.names.push(name);
    if ((i + 1) * WIDTH > this.values.length) {
      const grown = new BigInt64Array(this.values.length * 2);
      grown.set(this.values);
      this.values = grown;
    }
    const at = i * WIDTH;
    for (let k = 0; k < WIDTH; k++) {
      const v = st[STAT_FIELDS[k]!];
      this.values[at + k] = v;
      if (this.values[at + k] !== v) (this.odd ??= new Map()).set(i, st);
    }
  }

  /** The stat of entry `i`, a new object each time. */
  stat(i: number): BigIntStats {
    const odd = this.odd?.get(i);
    if (odd) return odd;
    return new PackedStat(this.values, i * WIDTH) as unknown as BigIntStats;
  }
}
