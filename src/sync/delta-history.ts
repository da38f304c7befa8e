/**
 * Point-in-time history from reverse deltas (`--backup-dir`): each run that
 * changed a file leaves, in DIR, one delta file named by the run's start time
 * whose member for that file turns the mirror as that run left it back into
 * what it was before. Restoring walks them newest → older onto a sparse copy
 * of the mirror; the mirror is never written.
 */
import { constants } from 'node:fs';
import { open, readdir, rm, stat, type FileHandle } from 'node:fs/promises';
import { join, sep } from 'node:path';
import type { DeltaHeader } from '../core/delta-codec.js';
import { errnoOf, QsyncError } from '../core/errors.js';
import { blockLength } from '../core/geometry.js';
import { openDelta, readDeltaFile, verifyDeltaFile, writeAll, type DeltaMemberSummary } from '../io/delta-file.js';
import { hashFile } from './target-digests.js';

export const HISTORY_SUFFIX = '.qdelta';

/** The delta file name for a run that started at `ms`: sorts by time. */
export const historyFileName = (ms: number): string => `${new Date(ms).toISOString().replace(/[:]/g, '-')}${HISTORY_SUFFIX}`;

export interface HistoryPoint {
  /** 1 = the state before the newest run that changed the file. */
  n: number;
  /** Start of the run that changed the file afterwards: the state held until then. */
  until: Date;
  size: number;
  records: number;
  file: string;
  member: DeltaMemberSummary;
}

/** Delta files in DIR, newest first. */
async function historyFiles(dir: string): Promise<string[]> {
  const names = await readdir(dir).catch((e) => {
    if (errnoOf(e) === 'ENOENT') throw new QsyncError('USAGE', `backup dir ${dir} does not exist`, { file: dir });
    throw e;
  });
  return names.filter((n) => n.endsWith(HISTORY_SUFFIX) && !n.startsWith('.')).sort().reverse().map((n) => join(dir, n));
}

/** Does member `name` (relative to a destination root) name the file `target`? */
const names = (name: string, target: string) => target === name || target.endsWith(`${sep}${name}`);

/** The points in time of `target`, newest first, each delta file verified. */
export async function listPoints(dir: string, target: string): Promise<HistoryPoint[]> {
  const points: HistoryPoint[] = [];
  for (const file of await historyFiles(dir)) {
    const member = (await verifyDeltaFile(file)).find((m) => m.header.kind === 'reverse' && names(m.header.name, target));
    if (member) {
      points.push({ n: points.length + 1, until: new Date(member.header.createdMs), size: member.header.resultSize, records: member.records, file, member });
    }
  }
  return points;
}

/** `N` (a point number) or a time (anything Date parses): the points to walk back through. */
function pointsFor(points: HistoryPoint[], at: string): HistoryPoint[] {
  if (/^\d+$/.test(at)) {
    const n = Number(at);
    if (n > points.length) throw new QsyncError('USAGE', `there are ${points.length} points in time; --at ${at} is older`);
    return points.slice(0, n);
  }
  const t = Date.parse(at);
  if (Number.isNaN(t)) throw new QsyncError('USAGE', `--at ${at}: not a point number nor a time`);
  // The state at t is the one before every run that started after t.
  return points.filter((p) => p.until.getTime() > t);
}

const COPY_CHUNK = 1 << 20;

/** Copy `src` to a new file `out`, leaving all-zero chunks as holes. */
async function sparseCopy(src: string, out: FileHandle): Promise<number> {
  const fh = await open(src, 'r');
  try {
    const buf = Buffer.alloc(COPY_CHUNK);
    let pos = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, 0, COPY_CHUNK, pos);
      if (bytesRead === 0) break;
      const part = buf.subarray(0, bytesRead);
      if (part.some((b) => b !== 0)) await writeAll(out, part, pos);
      pos += bytesRead;
    }
    await out.truncate(pos);
    return pos;
  } finally {
    await fh.close();
  }
}

/** Write the member of `p` onto `out`: resize, then every record (zero records as holes where the area is new). */
async function patch(out: FileHandle, p: HistoryPoint): Promise<DeltaHeader> {
  const fh = await openDelta(p.file);
  let member = -1;
  const want = p.member.offset;
  let header: DeltaHeader | undefined;
  try {
    for await (const ev of readDeltaFile(fh, p.file)) {
      if (ev.type === 'header') {
        member = ev.at.offset === want ? 1 : 0;
        if (member) {
          header = ev.header;
          await out.truncate(ev.header.resultSize);
        }
      } else if (ev.type === 'record' && member === 1) {
        const h = ev.header;
        const len = blockLength(ev.record.index, h.resultSize, h.blockSize);
        await writeAll(out, ev.content ?? Buffer.alloc(len), ev.record.index * h.blockSize);
      }
    }
  } finally {
    await fh.close();
  }
  return header!;
}

/**
 * Write `target` as it was at point `at` into the new file `out`. The result
 * is hashed and checked against the oldest delta's result fingerprint.
 */
export async function restorePoint(dir: string, target: string, at: string, outPath: string): Promise<{ size: number; applied: number }> {
  const chain = pointsFor(await listPoints(dir, target), at);
  const out = await open(outPath, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL).catch((e) => {
    throw new QsyncError('TARGET', `cannot create ${outPath}: ${(e as Error).message}`, { file: outPath, hint: 'OUT must not exist yet' }, { cause: e });
  });
  try {
    let size = await sparseCopy(target, out);
    for (const p of chain) {
      const h = await patch(out, p);
      size = h.resultSize;
    }
    await out.sync();
    const last = chain.at(-1)?.member.header;
    if (last && last.resultFingerprint.some((b) => b !== 0)) {
      const fp = await hashFile(out, size, last.blockSize);
      if (!fp.equals(last.resultFingerprint)) {
        throw new QsyncError('FORMAT', `restored ${outPath} does not match the point's fingerprint: the history in ${dir} does not fit ${target}`, { file: outPath });
      }
    }
    await out.close();
    return { size, applied: chain.length };
  } catch (e) {
    await out.close().catch(() => undefined);
    await rm(outPath, { force: true });
    throw e;
  }
}

/**
 * Keep the newest `keep` run files in DIR and delete the older ones. Reverse
 * deltas chain from the mirror backwards, so no remaining point needs an
 * older delta: nothing has to be merged to keep them restorable.
 */
export async function prune(dir: string, keep: number): Promise<string[]> {
  const files = await historyFiles(dir);
  const drop = files.slice(keep);
  for (const f of drop) if ((await stat(f)).isFile()) await rm(f);
  return drop;
}
