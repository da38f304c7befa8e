/**
 * The delta files of one run: --write-batch / --only-write-batch (a forward
 * delta of every file written) and --backup-dir (a reverse delta: the old
 * blocks, a point in time to restore). One delta file per run, one member
 * per file; the engine reaches them through FileSyncContext.wrapSink.
 */
import { basename, join } from 'node:path';
import { errnoOf, errnoText, QsyncError } from '../core/errors.js';
import type { DeltaFileWriter } from '../io/delta-file.js';
import type { BlockSink } from '../io/types.js';
import type { Dir } from '../io/safe-fs.js';
import { checkInside } from '../remote/restrict.js';
import { ensureHistoryDir, lockHistory, openHistoryDir } from './delta-history.js';
import { forwardDeltaSink, openBatch, openHistory, reverseDeltaSink, teeDeltaSink, type DeltaSinkInfo } from './delta-sinks.js';
import type { DestLock } from './lock.js';
import type { FileSyncContext } from './file-sync.js';

export interface DeltaOptions {
  writeBatch?: string;
  onlyWriteBatch?: string;
  /** Absolute. */
  backupDir?: string;
  compress: boolean;
  /** The forward delta is written elsewhere (a push's client, src/remote/batch-relay.ts): each file's member goes there. */
  relay?: BatchRelay;
  /** qsync --server --restrict DIR: the history folder is made from DIR one folder at a time and must lie in it. */
  within?: string;
}

/** A forward delta recorded on another host: told of each file's member as the engine writes it. */
export interface BatchRelay {
  /** --only-write-batch: the target is left alone. */
  readonly recordOnly: boolean;
  /** One file's member: a sink around the target's (undefined when record-only), its commit ending the member. */
  wrap(target: BlockSink | undefined, info: DeltaSinkInfo): BlockSink;
  /** The run ends: the delta is kept or dropped. */
  finish(keep: boolean): Promise<void>;
}

export interface RunDeltas {
  /** The target is left alone: only the batch is written. */
  recordOnly: boolean;
  wrapSink?: FileSyncContext['wrapSink'];
  /** Close the delta files: kept on success (history only if it holds a file), dropped on failure. */
  finish(ok: boolean): Promise<void>;
}

export async function openRunDeltas(o: DeltaOptions, startedMs: number): Promise<RunDeltas> {
  if (o.writeBatch && o.onlyWriteBatch) throw new QsyncError('USAGE', '--write-batch and --only-write-batch cannot be used together');
  if ((o.onlyWriteBatch || o.relay?.recordOnly) && o.backupDir) throw new QsyncError('USAGE', '--backup-dir keeps the old blocks of a target that --only-write-batch leaves alone: use one or the other');
  const compression = o.compress ? 'brotli' : 'none';
  let historyLock: DestLock | undefined;
  let history: DeltaFileWriter | undefined;
  // The history folder is held from here to the end: every step reaches it through this descriptor, never its path.
  let historyDir: Dir | undefined;
  const dropHistoryDir = async () => {
    try {
      await historyLock?.release();
    } finally {
      await historyDir?.close();
    }
  };
  if (o.backupDir) {
    await ensureHistoryDir(o.backupDir, o.within);
    historyDir = await openHistoryDir(o.backupDir, true);
    try {
      if (o.within !== undefined) await checkInside(historyDir.self, o.within);
      historyLock = await lockHistory(historyDir, o.backupDir);
      history = await openHistory(historyDir, o.backupDir, startedMs, compression);
    } catch (e) {
      await dropHistoryDir();
      throw e;
    }
  }
  const batchPath = o.writeBatch ?? o.onlyWriteBatch;
  const batch = batchPath
    ? await openBatch(batchPath, compression, startedMs).catch(async (e) => {
        await history?.abort();
        await dropHistoryDir();
        throw e;
      })
    : undefined;
  let historyMembers = 0;
  const relay = o.relay;
  const recordOnly = Boolean(o.onlyWriteBatch) || relay?.recordOnly === true;

  const wrapSink: FileSyncContext['wrapSink'] = async (target, info) => {
    let sink: BlockSink | undefined = target;
    if (history && target) {
      if (!('fh' in target)) throw new QsyncError('UNSUPPORTED', '--backup-dir needs a target on this host');
      sink = await reverseDeltaSink(target, history, info);
      historyMembers++;
    }
    if (batch) sink = recordOnly ? forwardDeltaSink(batch, info) : teeDeltaSink(sink!, batch, info);
    if (relay) sink = relay.wrap(recordOnly ? undefined : sink, info);
    return sink!;
  };

  /** Finish (or drop) a history or batch file; one that cannot be finished (its disk full, say) is dropped and named. */
  let finished = false;
  const close = async (w: DeltaFileWriter | undefined, keep: boolean, what: string, shown: string) => {
    if (!w) return;
    if (!keep) return w.abort();
    try {
      await w.finish();
    } catch (e) {
      await w.abort();
      throw new QsyncError('IO', `could not finish ${what} ${shown}: ${errnoText(e)}`, {
        file: shown,
        hint: errnoOf(e) === 'ENOSPC' || errnoOf(e) === 'EDQUOT' ? `free space where it lies (the targets were written; this run's ${what === 'the history file' ? 'old blocks are not kept' : 'batch is not written'})` : undefined,
      }, { cause: e });
    }
  };
  return {
    recordOnly,
    wrapSink: batch || history || relay ? wrapSink : undefined,
    async finish(ok) {
      // Once: a caller's error path may come here again after a failed finish.
      if (finished) return;
      finished = true;
      try {
        // Each is closed whatever became of the other; the first failure is the run's.
        const closing = await Promise.allSettled([
          close(batch, ok, 'the batch', batchPath ?? ''),
          (async () => {
            // A failed run's history is kept too: each file it wrote holds the old content of the blocks written (src/sync/delta-sinks.ts).
            if (history?.inMember) await history.endTorn();
            await close(history, historyMembers > 0, 'the history file', history ? join(o.backupDir ?? '', basename(history.path)) : '');
          })(),
        ]);
        const failed = closing.find((r): r is PromiseRejectedResult => r.status === 'rejected');
        if (failed) throw failed.reason;
        await relay?.finish(ok);
      } finally {
        await dropHistoryDir();
      }
    },
  };
}
