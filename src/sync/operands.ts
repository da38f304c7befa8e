/**
 * rsync's operand rules: which source lands where. `SRC/` copies the
 * contents of SRC, `SRC` copies SRC itself into DEST; a single file copied to
 * a DEST that is not an existing directory (and has no trailing slash)
 * becomes that file.
 */
import type { BigIntStats } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import type { ListedName } from '../core/files-from.js';

export interface Transfer {
  /** The source operand as typed: what is copied. */
  operand: string;
  /** Its stat (followed through a symlink for `link/`, as rsync does). */
  stat: BigIntStats;
  /** Where it lands, relative to the destination root ('' = the root itself). */
  destRel: string;
}

export interface Plan {
  /** The folder that holds `.qsync/` and against which relative paths are reported. */
  destRoot: string;
  /** The destination must be a directory (created if missing). */
  destIsDir: boolean;
  /** The destination folder did not exist before this run (it is reported as created). */
  destCreated?: boolean;
  transfers: Transfer[];
  /**
   * --files-from or -R: names below folders `base` (relative to the current
   * folder), kept as they are below DEST, instead of `transfers`. `dirs`
   * (--files-from): folders named are made even without -r.
   */
  lists?: { base: string; names: ListedName[]; dirs: boolean; shownPrefix?: string }[];
}

export function planOperands(sources: { operand: string; stat: BigIntStats }[], dest: string, destStat: BigIntStats | undefined): Plan {
  const single = sources.length === 1 && !sources[0].stat.isDirectory();
  if (single && !dest.endsWith('/') && !destStat?.isDirectory()) {
    const abs = resolve(dest);
    return { destRoot: dirname(abs), destIsDir: false, transfers: [{ ...sources[0], destRel: basename(abs) }] };
  }
  return {
    destRoot: resolve(dest),
    destIsDir: true,
    transfers: sources.map(({ operand, stat }) => ({
      operand,
      stat,
      // rsync: "dir/", "dir/." and "dir/.." send a folder's contents.
      destRel: stat.isDirectory() && (operand.endsWith('/') || basename(operand) === '.' || basename(operand) === '..') ? '' : basename(resolve(operand)),
    })),
  };
}

/** A path that join would leave as it is: no empty, `.` or `..` component. */
const CLEAN = /^(?!.*(?:^|\/)\.{1,2}(?:\/|$))(?!.*\/\/)[^]*[^/]$/;

/** `b` below `a`, as path.join makes it (a walk's child, already clean, is only joined: join's copies were a tenth of a re-run's garbage). */
export const joinRel = (a: string, b: string) => (a ? (b ? (CLEAN.test(a) && CLEAN.test(b) && !b.includes('/') ? `${a}/${b}` : join(a, b)) : a) : b);
