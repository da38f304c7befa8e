/**
 * The delta files of one run: --write-batch / --only-write-batch (a forward
 * delta of every file written) and --backup-dir (a reverse delta: the old
 * blocks, a point in time to restore). One delta file per run, one member
 * per file; the engine reaches them through FileSyncContext.wrapSink.
 */
import { QsyncError } from '../core/errors.js';
import type { DeltaFileWriter } from '../io/delta-file.js';
import type { BlockSink } from '../io/types.js';
import type { Dir } from '../io/safe-fs.js';
import { ensureHistoryDir, lockHistory, openHistoryDir } from './delta-history.js';
import { forwardDeltaSink, openBatch, openHistory, reverseDeltaSink, teeDeltaSink } from './delta-sinks.js';
import type { DestLock } from './lock.js';
import type { FileSyncContext } from './file-sync.js';

export interface DeltaOptions {
  writeBatch?: string;
  onlyWriteBatch?: string;
  /** Absolute. */
  backupDir?: string;
  compress: boolean;
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
  if (o.onlyWriteBatch && o.backupDir) throw new QsyncError('USAGE', '--backup-dir keeps the old blocks of a target that --only-write-batch leaves alone: use one or the other');
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
    await ensureHistoryDir(o.backupDir);
    historyDir = await openHistoryDir(o.backupDir, true);
    try {
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
  const recordOnly = Boolean(o.onlyWriteBatch);

  const wrapSink: FileSyncContext['wrapSink'] = async (target, info) => {
    let sink: BlockSink | undefined = target;
    if (history && target) {
      sink = await reverseDeltaSink(target, history, info);
      historyMembers++;
    }
    if (batch) sink = recordOnly ? forwardDeltaSink(batch, info) : teeDeltaSink(sink!, batch, info);
    return sink!;
  };

  const close = async (w: DeltaFileWriter | undefined, keep: boolean) => {
    if (!w) return;
    if (keep) await w.finish();
    else await w.abort();
  };
  return {
    recordOnly,
    wrapSink: batch || history ? wrapSink : undefined,
    async finish(ok) {
      try {
        await close(batch, ok);
        await close(history, ok && historyMembers > 0);
      } finally {
        await dropHistoryDir();
      }
    },
  };
}
