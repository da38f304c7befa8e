/**
 * --log-file=FILE and --log-file-format=FMT, as rsync writes them for a
 * local run: each line "YYYY/MM/DD HH:MM:SS [PID] TEXT", appended;
 * "building file list" first, then a line (in FMT, default "%i %n%L") for
 * each entry that changed and each deletion, the notices and errors the run
 * prints (not the bare rsync-style warnings, which rsync does not log
 * either; with -n, neither the files it would send nor deletions), and at the end "sent N bytes  received N bytes  total size N"
 * and, for a failure, the exit line. A Printer wrapped around the one that
 * prints to the terminal.
 */
import { closeSync, constants, writeSync } from 'node:fs';
import { resolveTrusted } from '../io/safe-fs.js';
import { errnoText, QsyncError } from '../core/errors.js';
import type { FileReport, RunStats } from '../sync/events.js';
import { describeExit } from './exit-codes.js';
import { closingLines, KindTally, type Printer } from './output.js';
import { deletionItem, formatItem, itemOf, timestring, usesEscape } from './log-format.js';
import type { SyncOptions } from './args.js';

export const DEFAULT_LOG_FORMAT = '%i %n%L';

/**
 * `inner` with every line that rsync would log also appended to `path`. The
 * log is reached through no other user's symlink (resolveTrusted, as a batch
 * file is) and must be a regular file: root logging into a folder a user owns
 * appends nowhere else, and a FIFO there does not hang the run.
 */
export async function withLogFile(inner: Printer, path: string, o: Pick<SyncOptions, 'logFileFormat' | 'dryRun' | 'info' | 'human'>): Promise<Printer & { failed(e: unknown, code: number): void }> {
  const { dryRun } = o;
  let fd: number;
  try {
    const { dir, name } = await resolveTrusted(path, false);
    try {
      fd = dir.openFileSync(name, constants.O_WRONLY | constants.O_APPEND | constants.O_CREAT, 0o666).fd;
    } finally {
      await dir.close();
    }
  } catch (e) {
    throw new QsyncError('IO', `failed to open log-file ${path}: ${errnoText(e)}`, { file: path }, { cause: e });
  }
  const fmt = o.logFileFormat ?? DEFAULT_LOG_FORMAT;
  const hasOpOrItemize = usesEscape(fmt, 'oi');
  const log = (text: string): void => {
    // Control characters in names become rsync's \#ooo, so a name cannot forge a line.
    const safe = text.replace(/[\x00-\x08\x0a-\x1f]/g, (c) => `\\#${c.charCodeAt(0).toString(8).padStart(3, '0')}`);
    writeSync(fd, `${timestring(new Date())} [${process.pid}] ${safe}\n`);
  };
  const close = (): void => {
    if (fd >= 0) closeSync(fd);
    fd = -1;
  };
  const tally = new KindTally();
  log('building file list');
  return {
    fileStart: (...a) => inner.fileStart?.(...a),
    fileProgress: (...a) => inner.fileProgress?.(...a),
    fileEnd(r: FileReport) {
      inner.fileEnd?.(r);
      tally.fileEnd(r);
      // -n: rsync logs what its receiving side would change, not the files it would send.
      if (r.unchanged || !fmt || (dryRun && r.itemize.startsWith('>'))) return;
      log(formatItem(fmt, itemOf(r), new Date()));
    },
    deleted(path: string) {
      inner.deleted?.(path);
      tally.deleted(path);
      if (dryRun) return;
      log(formatItem(hasOpOrItemize ? fmt : 'deleting %n', deletionItem(path), new Date()));
    },
    info(message, category) {
      inner.info?.(message, category);
      log(message);
    },
    listTotal: (...a) => inner.listTotal?.(...a),
    wantsTotal: inner.wantsTotal,
    notice(message: string, path?: string) {
      inner.notice?.(message, path);
      log(message);
    },
    warning(message: string, path?: string, bare?: boolean) {
      inner.warning?.(message, path, bare);
      if (!bare) log(`qsync: ${message}`);
    },
    finish(stats: RunStats | undefined, exitCode: number, error?: unknown) {
      // rsync logs the closing lines of its --info=stats level (-q or not: -q only quiets stdout), else one line of its own.
      if (stats && o.info.stats >= 1) {
        for (const line of closingLines(stats, o.info.stats, tally, o)) if (line) log(line);
      } else if (stats) log(`sent ${stats.wireSent ?? stats.literal} bytes  received ${stats.wireReceived ?? 0} bytes  total size ${stats.totalSize}`);
      if (exitCode !== 0) log(describeExit(exitCode));
      close();
      return inner.finish(stats, exitCode, error);
    },
    /** The run ended on an error before finish(): it is logged as rsync logs its last words. */
    failed(e: unknown, code: number) {
      if (fd < 0) return;
      log(`qsync: ${e instanceof Error ? e.message : String(e)}`);
      log(describeExit(code));
      close();
    },
  };
}
