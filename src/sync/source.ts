/**
 * The source side of a sync, as the engine sees it: folders to walk and
 * files to scan. The walk (src/sync/tree.ts) and the file engine
 * (src/sync/file-sync.ts) run where the target is; the source is either this
 * host's file system (LocalSources: folders held by descriptor, files read
 * and hashed on the worker pool) or a peer over the wire
 * (src/remote/remote-source.ts), which reads and hashes its files itself
 * and sends only the blocks the plan needs.
 *
 * A scan yields planned chunks: the new digests of a stretch of blocks,
 * which of them must be written, and their bytes. The engine writes those,
 * records the intent, and feeds the digests to the manifest; it never sees
 * whether they came from a local read or from the wire.
 */
import { closeSync, constants, type BigIntStats } from 'node:fs';
import { lstat, stat, type FileHandle } from 'node:fs/promises';
import { basename, dirname, resolve } from 'node:path';
import { errnoOf, errnoText, QsyncError, rsyncErrnoText } from '../core/errors.js';
import { planChunk, type ChunkPlan, type WriteRun } from '../core/plan.js';
import { DIGEST_LEN, zeroDigest } from '../hash/blake3.js';
import type { HashPool } from '../hash/pool.js';
import { Dir, fsPath } from '../io/safe-fs.js';
import { readUpToSync } from '../io/local-file.js';
import type { AttrMap } from '../io/attr-tool.js';
import { isLockedByOther } from './qemu-locks.js';

/** A source folder held open; its entries are reached through it, never through a symlink. */
export interface SourceDir {
  /** For messages only. */
  readonly path: string;
  shown(name: string): string;
  stat(): Promise<BigIntStats>;
  readdir(): Promise<string[]>;
  lstat(name: string): Promise<BigIntStats>;
  openDir(name: string): Promise<SourceDir>;
  readlink(name: string): Promise<string>;
  /**
   * -A/-X with a peer's files: the attributes of entry `name` (undefined:
   * this folder), read by the peer from the inode `expect` describes. A
   * local folder has none: its entries are read through descriptors here
   * (src/sync/ext-attrs.ts).
   */
  attrs?(name: string | undefined, expect: BigIntStats): Promise<AttrMap>;
  close(): Promise<void>;
}

/** Old digests of the target, block by block (a manifest, or a hash of the target). */
export interface DigestReader {
  /** Fingerprint of all the old digests (docs/FORMATS.md "Fingerprint"). */
  readonly fingerprint: Buffer;
  readDigests(first: number, count: number, out: Uint8Array): Promise<void>;
}

export interface ScanPlan {
  size: number;
  blockSize: number;
  /**
   * manifest: write blocks whose digest differs from `old`; compare: blocks
   * whose bytes differ from the target's (local sources only; `target`);
   * rewrite: every block.
   */
  mode: 'manifest' | 'compare' | 'rewrite';
  old?: DigestReader;
  oldSize: number;
  /** From this block on the target reads as zero: zero blocks need no write. */
  holeFrom: number;
  /** Blocks an interrupted run may have written (rewritten whatever the digests say), and all from `from` on. */
  suspect?: { blocks: ReadonlySet<number>; from: number };
  /** compare mode, or hashing the old target (a delta's base): the target, read beside the source. */
  target?: { fd: number; size: number; hash: boolean };
}

export interface PlannedChunk {
  /** First block of the stretch. */
  first: number;
  /** New digests of the stretch's blocks, DIGEST_LEN each. */
  digests: Uint8Array;
  /** Blocks to write, ascending. */
  changed: number[];
  runs: WriteRun[];
  /** The bytes of a run (zeros for a zero run). Valid until the handler settles. */
  bytes(run: WriteRun): Buffer;
  /** Source bytes this stretch covers. */
  scanned: number;
  /** With `target.hash`: the old target's digests of these blocks. */
  targetDigests?: Uint8Array;
}

/** Where the sources of a run are. */
export interface Sources {
  /** A peer over the wire: no batch deltas (the CLI refuses them); -A/-X through SourceDir.attrs. */
  readonly remote: boolean;
  /** Whether `ScanPlan.target` may be given (compare by reading the target beside the source). */
  readonly readsTarget: boolean;
  /** An operand's stat: followed through a symlink when it ends in `/` (rsync's rule), else lstat. Throws ENOENT-coded errors when missing. */
  statOperand(operand: string): Promise<BigIntStats>;
  /** The operand folder itself (the user's symlink to it followed, as rsync does). */
  openOperand(operand: string): Promise<SourceDir>;
  /** The folder that holds an operand, and its name in it. */
  openParent(operand: string): Promise<{ dir: SourceDir; name: string }>;
  /** Refuse a file that cannot be copied consistently (an image a running QEMU holds). */
  checkUsable(listed: BigIntStats, shown: string): Promise<void>;
  /**
   * Open a listed file through its folder: never through a symlink, and
   * only while it is the inode the walk listed (else "file has vanished").
   */
  openFile(dir: SourceDir, name: string, listed: BigIntStats, shown: string): Promise<SourceFile>;
  /**
   * A small file's bytes, read whole on this thread (src/sync/small-file.ts):
   * the listed size, from the inode the walk listed. Only where reading one
   * costs less than a round trip (this host). Read into `into` (at least the
   * listed size) and returned as its first bytes.
   */
  readWhole?(dir: SourceDir, name: string, listed: BigIntStats, shown: string, into: Buffer): Promise<Buffer>;
}

/** An open source file. */
export interface SourceFile {
  /**
   * Read the file and plan it; `onChunk` is called in file order, for every
   * block. Returns the fingerprint of the new digests when the source can
   * vouch for it (a peer does: the engine checks its own against it).
   */
  scan(plan: ScanPlan, onChunk: (c: PlannedChunk) => Promise<void>): Promise<Buffer | undefined>;
  close(): Promise<void>;
}

/** A source file changed between the listing and the open: it is skipped (rsync's "vanished", exit 24), never read. */
export const vanished = (src: string, why: string) => new QsyncError('SOURCE', `file has vanished: ${src} (${why})`, { file: src, vanished: true });

/** Why a listed source could not be opened, in rsync's terms. */
function openFailure(e: unknown, shown: string): QsyncError {
  if (errnoOf(e) === 'ENOENT') return vanished(shown, 'it is gone');
  // openRegular refused it: a symlink, FIFO or other non-regular file took its name.
  if (e instanceof QsyncError) return vanished(shown, 'something other than a regular file took its name while qsync worked; not read');
  // rsync's words.
  return new QsyncError('SOURCE', `send_files failed to open "${resolve(shown)}": ${rsyncErrnoText(e)}`, { file: shown }, { cause: e });
}

/**
 * Open the listed source through its folder: never through a symlink, never
 * blocking on a FIFO, and only if it is still the inode that was listed.
 */
export async function openListed(dir: Dir, name: string, listed: BigIntStats, shown: string): Promise<FileHandle> {
  let fh: FileHandle;
  try {
    fh = await dir.openFile(name, constants.O_RDONLY);
  } catch (e) {
    throw openFailure(e, shown);
  }
  const st = await fh.stat({ bigint: true });
  if (st.dev !== listed.dev || st.ino !== listed.ino) {
    await fh.close();
    throw vanished(shown, 'another file took its name while qsync worked; not read');
  }
  return fh;
}

/**
 * Read the open file `fd` on the hash pool and plan each chunk against
 * `plan` (core/plan.ts). The scan behind LocalSources, and behind a peer
 * serving its files over the wire.
 */
export async function scanAndPlan(pool: HashPool, fd: number, shown: string, plan: ScanPlan, onChunk: (c: PlannedChunk) => Promise<void>, from = 0): Promise<void> {
  const { blockSize, size } = plan;
  const planned = chunkPlanner(plan, pool.chunkSize / blockSize);
  const t = plan.target;
  await pool.scan({ fd, size, from, targetFd: plan.mode === 'compare' || t?.hash ? t!.fd : undefined, targetSize: t?.size ?? 0, hashTarget: t?.hash, path: shown }, async (c) => {
    const first = c.offset / blockSize;
    const { changed, runs } = await planned(first, c.digests, c.differs);
    await onChunk({
      first,
      digests: c.digests,
      changed,
      runs,
      bytes: (r) => c.data.subarray(r.first * blockSize - c.offset, Math.min(size, (r.first + r.count) * blockSize) - c.offset),
      scanned: c.data.length,
      targetDigests: c.targetDigests,
    });
  });
}

/** How scanAndPlan plans a stretch of at most `chunkBlocks` blocks from their new digests: against the old ones, the suspect blocks, the holes. */
export function chunkPlanner(plan: ScanPlan, chunkBlocks: number): (first: number, digests: Uint8Array, differs?: Uint8Array) => Promise<ChunkPlan> {
  const { blockSize, size } = plan;
  const oldBlocks = Math.ceil(plan.oldSize / blockSize);
  const old = plan.mode === 'manifest' ? Buffer.alloc(chunkBlocks * DIGEST_LEN) : undefined;
  const s = plan.suspect;
  const suspect = s && ((b: number) => s.blocks.has(b) || b >= s.from);
  const mode = plan.mode === 'manifest' || plan.mode === 'compare' ? plan.mode : 'rewrite';
  return async (first, digests, differs) => {
    const known = Math.min(digests.length / DIGEST_LEN, Math.max(0, oldBlocks - first));
    if (old && known) await plan.old!.readDigests(first, known, old);
    return planChunk({ first, digests, size, blockSize, mode, old, oldBlocks, differs, suspect, holeFrom: plan.holeFrom, zeroDigest });
  };
}

/** A byte copy of an image a running QEMU holds open (its lock shows in /proc/locks) would be inconsistent. */
export async function refuseIfQemuHolds(listed: BigIntStats, shown: string): Promise<void> {
  if (await isLockedByOther(Number(listed.dev), listed.ino)) {
    throw new QsyncError('LOCKED', `${shown} is open in a running QEMU (it holds a lock on it): a byte copy would be inconsistent`, {
      file: shown,
      hint: 'back it up in image mode: qsync --qmp /path/to/qmp.sock DEST',
    });
  }
}

/** This host's file system: folders by descriptor (src/io/safe-fs.ts), files hashed on `pool`. */
export class LocalSources implements Sources {
  readonly remote = false;
  readonly readsTarget = true;
  constructor(private readonly pool: HashPool) {}

  async statOperand(operand: string): Promise<BigIntStats> {
    return operand.endsWith('/') ? stat(fsPath(operand), { bigint: true }) : lstat(fsPath(operand), { bigint: true });
  }

  openOperand(operand: string): Promise<SourceDir> {
    return Dir.open(operand);
  }

  checkUsable(listed: BigIntStats, shown: string): Promise<void> {
    return refuseIfQemuHolds(listed, shown);
  }

  async openParent(operand: string): Promise<{ dir: SourceDir; name: string }> {
    const abs = resolve(operand);
    return { dir: await Dir.open(dirname(abs)), name: basename(abs) };
  }

  async openFile(dir: SourceDir, name: string, listed: BigIntStats, shown: string): Promise<SourceFile> {
    if (!(dir instanceof Dir)) throw new Error('LocalSources.openFile: not a local folder');
    const fh = await openListed(dir, name, listed, shown);
    // The workers boot with the first file that needs them: a tree of small files never starts them.
    this.pool.warm();
    return {
      scan: async (plan, onChunk) => {
        await scanAndPlan(this.pool, fh.fd, shown, plan, onChunk);
        return undefined;
      },
      close: () => fh.close(),
    };
  }

  async readWhole(dir: SourceDir, name: string, listed: BigIntStats, shown: string, into: Buffer): Promise<Buffer> {
    if (!(dir instanceof Dir)) throw new Error('LocalSources.readWhole: not a local folder');
    let fd: number;
    let st: BigIntStats;
    try {
      ({ fd, st } = dir.openFileSync(name, constants.O_RDONLY));
    } catch (e) {
      throw openFailure(e, shown);
    }
    try {
      if (st.dev !== listed.dev || st.ino !== listed.ino) throw vanished(shown, 'another file took its name while qsync worked; not read');
      const buf = into.subarray(0, Number(listed.size));
      let got: number;
      try {
        got = readUpToSync(fd, buf, 0);
      } catch (e) {
        throw new QsyncError('SOURCE', `cannot read ${shown}: ${errnoText(e)}`, { file: shown }, { cause: e });
      }
      if (got !== buf.length) throw vanished(shown, `it shrank to ${got} bytes while qsync read it`);
      return buf;
    } finally {
      closeSync(fd);
    }
  }
}
