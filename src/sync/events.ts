/**
 * What the engine reports while it works. The engine calls these hooks (all
 * optional, default no-ops); src/cli picks a printer (TTY bars, plain
 * --progress lines, --json) that implements them.
 */

/** How a file was brought up to date, cheapest first (docs/ARCHITECTURE.md "Costs, best first"). */
export type SyncMethod =
  | 'quick' // size + mtime unchanged since the manifest: not read
  | 'bitmap' // image mode: only dirty extents read
  | 'manifest' // source read and hashed, compared with the trusted manifest
  | 'compare' // no trusted manifest: source and target read, differences written
  | 'new' // no target yet: full copy
  | 'whole'; // -W/--whole-file: full rewrite

export interface FileReport {
  /** Path relative to the destination root, as rsync prints it. */
  path: string;
  /** rsync's --itemize-changes string, e.g. ">f.st......" or "cd+++++++++". */
  itemize: string;
  kind: 'file' | 'dir' | 'symlink' | 'device' | 'special';
  size: number;
  method?: SyncMethod;
  /** Source bytes read and hashed. */
  scanned: number;
  /** Bytes written to the target ("Literal data"). */
  literal: number;
  /** Bytes found already equal on the target ("Matched data"). */
  matched: number;
  /** Nothing changed (content, or metadata either). */
  unchanged: boolean;
  /** The source's st_size, whatever its kind (a folder's, a symlink's target length): rsync's %l. */
  length?: number;
  /** A symlink's target (`path` ends in " -> TARGET"). */
  target?: string;
  /** Its index in rsync's file list (src/sync/tree.ts), when the walk numbers entries: progress's "to-chk". */
  index?: number;
  /** The source's path on this side (rsync's %f), mtime in seconds (%M), owner, group and st_mode (%U %G %B). */
  source?: string;
  mtime?: number;
  uid?: number;
  gid?: number;
  mode?: number;
}

export interface RunStats {
  files: number; // entries considered (files + dirs + links ...)
  regularFiles: number;
  dirs: number;
  created: number;
  deleted: number;
  transferred: number; // regular files whose content was written
  totalSize: number; // sum of regular file sizes in the source
  transferredSize: number; // sum of sizes of files transferred
  literal: number;
  matched: number;
  scanned: number;
  elapsedMs: number;
  /** Entries of these kinds met, also when skipped (rsync lists them): "Number of files" of --stats. */
  symlinks?: number;
  /** About the bytes rsync's file list would take for the entries reported (a local run has no list to measure). */
  flistSize?: number;
  /** Milliseconds spent counting the file list first (TreeOptions.countFirst): rsync's "File list generation time". */
  flistMs?: number;
  devices?: number;
  specials?: number;
  /** A remote sync: bytes this side sent and received through the remote shell (rsync's "sent"/"received"). */
  wireSent?: number;
  wireReceived?: number;
}

/** A run's counts before anything is counted. */
export const noStats = (): RunStats => ({
  files: 0, regularFiles: 0, dirs: 0, created: 0, deleted: 0, transferred: 0,
  totalSize: 0, transferredSize: 0, literal: 0, matched: 0, scanned: 0, elapsedMs: 0,
});

/** rsync's --info categories of the lines SyncHooks.info prints. */
export const INFO_CATEGORIES = ['nonreg', 'skip', 'misc', 'always'] as const;
export type InfoCategory = (typeof INFO_CATEGORIES)[number];

export interface SyncHooks {
  /** A regular file is about to be synced; `size` is the source size. */
  fileStart?(path: string, size: number, method: SyncMethod): void;
  /** Called at most every few MiB: bytes of this file scanned and written so far. */
  fileProgress?(path: string, scanned: number, written: number): void;
  /** An entry is done (any kind). */
  fileEnd?(report: FileReport): void;
  /** An entry was deleted from the destination (--delete). */
  deleted?(path: string): void;
  /** One line for the user, e.g. "manifest stale: falling back to compare". */
  notice?(message: string, path?: string): void;
  /**
   * One of rsync's own informational lines, which it prints on stdout when
   * the --info level of `category` allows ('always': whatever the levels, but -q):
   * "skipping non-regular file", "cannot delete non-empty directory", ...
   * qsync's own messages are notices.
   */
  info?(message: string, category: InfoCategory): void;
  /** The file list is counted (TreeOptions.countFirst): `entries` in all, `size` bytes of files and link targets. */
  listTotal?(entries: number, size: number): void;
  /** A per-file problem that did not stop the run (rsync exit 23); `bare`: printed without qsync's name, as rsync prints some. */
  warning?(message: string, path?: string, bare?: boolean): void;
}

/**
 * The same hooks with `prefix: ` before every notice and warning (a disk's
 * name). Every hook is called on `hooks` itself: a printer is a class whose
 * methods a spread would lose.
 */
export function prefixedHooks(hooks: SyncHooks, prefix: string): SyncHooks {
  return {
    fileStart: hooks.fileStart && ((...a) => hooks.fileStart!(...a)),
    fileProgress: hooks.fileProgress && ((...a) => hooks.fileProgress!(...a)),
    fileEnd: hooks.fileEnd && ((...a) => hooks.fileEnd!(...a)),
    deleted: hooks.deleted && ((...a) => hooks.deleted!(...a)),
    notice: hooks.notice && ((m, p) => hooks.notice!(`${prefix}: ${m}`, p)),
    info: hooks.info && ((...a) => hooks.info!(...a)),
    listTotal: hooks.listTotal && ((...a) => hooks.listTotal!(...a)),
    warning: hooks.warning && ((m, ...rest) => hooks.warning!(`${prefix}: ${m}`, ...rest)),
  };
}
