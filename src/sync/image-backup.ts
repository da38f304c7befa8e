/**
 * Image mode (docs/IMAGE-MODE.md): back up the guest-visible contents of each disk of a
 * QEMU (running VM, qemu-storage-daemon, or an offline image served by one)
 * into DEST/<disk>.raw, a raw sparse image, with a manifest beside it.
 *
 * Per disk: decide whether the dirty bitmap can be trusted (tied to the
 * manifest it was started with), take a fleece snapshot in one transaction
 * with the next bitmap, read only dirty extents (or, for a full run, the
 * allocated ones) over NBD, check a random sample of clean blocks against the
 * manifest, write what differs, commit target → manifest → state, and only
 * then drop the frozen bitmap. On any failure the frozen bitmap is merged
 * into the new one, so no change is ever forgotten.
 */
import { createHash, randomInt } from 'node:crypto';
import { mkdir, stat } from 'node:fs/promises';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { errnoOf, errnoText, QsyncError } from '../core/errors.js';
import { blockCount, DEFAULT_BLOCK_SIZE, isValidBlockSize } from '../core/geometry.js';
import { planChunk } from '../core/plan.js';
import { DIGEST_LEN, hashBlocksInto, zeroDigest } from '../hash/blake3.js';
import { LocalFileSink, punchingSink } from '../io/local-file.js';
import type { BlockSink } from '../io/types.js';
import { NbdClient } from '../io/nbd/client.js';
import { CONTEXT_ALLOCATION, dirtyBitmapContext } from '../io/nbd/constants.js';
import { findDrives, listBitmaps, type Drive } from '../qemu/block.js';
import { Fleece, removeLeftovers } from '../qemu/fleece.js';
import { serveImage, type ServedImage } from '../qemu/offline.js';
import { QmpClient } from '../qemu/qmp.js';
import type { SyncHooks, SyncMethod } from './events.js';
import type { FileSyncContext } from './file-sync.js';
import { intentPathFor, readIntent } from './intent.js';
import { lockDestination } from './lock.js';
import { emptyFingerprint, manifestPathFor, openManifest, type Manifest } from './manifest-store.js';
import { imageStatePath, readImageState, removeImageState, writeImageState } from './image-state.js';
import { hashFile } from './target-digests.js';
import { assessManifest, type Trust } from './trust.js';
import { commitTarget, fileData, LocalTargetState, type StateWriter } from './target.js';


export interface ImageBackupOptions {
  /** QMP socket of a running QEMU or qemu-storage-daemon (`--qmp`): a path, `unix:PATH` or `tcp:HOST:PORT`. */
  qmp?: string;
  /** An image no VM has open (`--image`). Exactly one of qmp/image. */
  image?: string;
  /** `--drive NAME` (repeatable): node-name, drive id or device id. Default: every disk. */
  drives?: string[];
  dest: string;
  blockSize?: number;
  /** `--verify-sample PCT`: share of clean blocks re-read and checked against the manifest (default 0.5). */
  verifySamplePct?: number;
  /** Where the fleece overlay and NBD socket go; QEMU must be able to write there. Default os.tmpdir(). */
  tempDir?: string;
  /** Abort (SIGINT) → cleanup, then an INTERRUPTED error. Without one, SIGINT/SIGTERM are caught for the run. */
  signal?: AbortSignal;
  /** Deltas (--write-batch, --backup-dir): wraps each disk's target, as in the file engine. */
  wrapSink?: FileSyncContext['wrapSink'];
}

export interface DiskSummary {
  name: string;
  node: string;
  target: string;
  /** bitmap: only dirty extents read; full: every allocated extent read. */
  mode: 'bitmap' | 'full';
  method: SyncMethod;
  /** Why the run is full (first run, bitmap gone, sample mismatch ...). */
  reason?: string;
  size: number;
  /** Bytes the bitmap called dirty (full run: the disk size). */
  dirty: number;
  /** Bytes read over NBD (incl. the verify sample). */
  read: number;
  /** Of `read`, bytes of clean blocks re-read by the verify sample. */
  sampled: number;
  /** Bytes written to the target as data. */
  written: number;
  /** Bytes read and hashed that matched the manifest. */
  unchanged: number;
  /** Bytes known or found to be zero (not read, or written as holes). */
  zero: number;
  /** QMP transaction + fleece + export, ms. */
  setupMs: number;
  /** Dirty/allocation map over NBD, ms. */
  mapMs: number;
  elapsedMs: number;
}

/** Back up every selected disk; one summary per disk. */
export async function runImageBackup(opts: ImageBackupOptions, hooks: SyncHooks = {}): Promise<DiskSummary[]> {
  if (!!opts.qmp === !!opts.image) throw new QsyncError('USAGE', 'image mode needs exactly one of --qmp SOCKET or --image FILE');
  const blockSize = opts.blockSize ?? DEFAULT_BLOCK_SIZE;
  if (!isValidBlockSize(blockSize)) throw new QsyncError('USAGE', `invalid block size ${blockSize}`);
  const pct = opts.verifySamplePct ?? 0.5;
  if (!(pct >= 0 && pct <= 100)) throw new QsyncError('USAGE', `--verify-sample must be 0..100, not ${pct}`);
  const dest = resolve(opts.dest);
  const tempDir = opts.tempDir ?? os.tmpdir();

  const ac = new AbortController();
  const onSignal = (): void => ac.abort();
  const own = !opts.signal;
  if (opts.signal) opts.signal.addEventListener('abort', onSignal, { once: true });
  else for (const s of ['SIGINT', 'SIGTERM'] as const) process.on(s, onSignal);

  // DEST is the user's folder, made as asked (as rsync makes a missing destination folder).
  await mkdir(dest, { recursive: true }).catch((e) => {
    throw new QsyncError('TARGET', `cannot create destination directory ${dest}: ${errnoText(e)}`, { file: dest }, { cause: e });
  });
  const lock = await lockDestination(dest);
  let served: ServedImage | undefined;
  try {
    served = opts.image ? await serveImage(opts.image, tempDir) : undefined;
    const qmp = await QmpClient.connect(served?.qmp ?? opts.qmp!);
    try {
      const drives = await findDrives(qmp, opts.drives);
      if (!drives.length) throw new QsyncError('SOURCE', 'QEMU has no disk to back up');
      const out: DiskSummary[] = [];
      for (const found of drives) {
        const name = served ? served.node.slice(1) : found.name;
        // A killed run's backup job leaves a filter node above the disk: remove it, then look again.
        const stale = await removeLeftovers(qmp, bitmapPrefix(dest, name), tempDir);
        const d = stale ? (await findDrives(qmp, [found.qdev ?? found.device ?? found.node]))[0]! : found;
        out.push(await backupDisk(qmp, { ...d, name }, { dest, blockSize, pct, tempDir, signal: ac.signal, hooks, wrapSink: opts.wrapSink }));
      }
      return out;
    } finally {
      await qmp.close();
    }
  } finally {
    await served?.stop();
    await lock.release();
    if (own) for (const s of ['SIGINT', 'SIGTERM'] as const) process.off(s, onSignal);
    else opts.signal!.removeEventListener('abort', onSignal);
  }
}

export interface DiskContext {
  dest: string;
  blockSize: number;
  pct: number;
  tempDir: string;
  signal: AbortSignal;
  hooks: SyncHooks;
  wrapSink: FileSyncContext['wrapSink'];
}

/** Bitmap names are per target: `qsync-<hash of DEST and disk>-<n>`; others are never touched. */
function bitmapPrefix(dest: string, name: string): string {
  return `qsync-${createHash('sha256').update(`${dest}\0${name}`).digest('hex').slice(0, 12)}-`;
}

async function backupDisk(qmp: QmpClient, drive: Drive, ctx: DiskContext): Promise<DiskSummary> {
  const t0 = performance.now();
  const { dest, blockSize, hooks } = ctx;
  const rel = `${drive.name}.raw`;
  const target = join(dest, rel);
  const manifestPath = manifestPathFor(dest, rel);
  const statePath = imageStatePath(dest, drive.name);
  const prefix = bitmapPrefix(dest, drive.name);

  let manifest: Manifest | undefined;
  try {
    manifest = await openManifest(manifestPath);
  } catch (e) {
    if (!(e instanceof QsyncError) || e.code !== 'FORMAT') throw e;
    hooks.notice?.(`${e.message}; full run`, rel);
  }
  try {
    const tStat = await stat(target, { bigint: true }).catch((e: unknown) => {
      if (errnoOf(e) === 'ENOENT') return undefined;
      throw e;
    });
    const intent = await readIntent(intentPathFor(manifestPath));
    const trust: Trust = tStat ? assessManifest(manifest, intent, tStat, blockSize) : { trusted: false };
    const state = await readImageState(statePath);
    const ours = (await listBitmaps(qmp, drive.node)).filter((b) => b.name.startsWith(prefix));
    const base = state ? ours.find((b) => b.name === state.bitmap) : undefined;

    let reason: string | undefined;
    if (!tStat) reason = 'first run';
    else if (!trust.trusted) reason = trust.reason ?? 'no manifest';
    else if (!state || state.node !== drive.node) reason = 'no bitmap recorded for this target';
    else if (state.baseChecksum !== manifest!.checksum.toString('hex')) reason = 'the bitmap belongs to another manifest';
    else if (!base) reason = `bitmap ${state.bitmap} is gone (QEMU restarted or it was removed)`;
    else if (base.inconsistent) reason = `bitmap ${base.name} is inconsistent (QEMU did not shut down cleanly)`;
    else if (drive.size !== manifest!.header.targetSize) reason = `disk was resized (${manifest!.header.targetSize} → ${drive.size})`;

    if (!reason) {
      // A killed run left its frozen bitmap disabled and a newer one recording:
      // record again first, then fold the newer ones in, so there is no gap.
      if (!base!.recording) await qmp.execute('block-dirty-bitmap-enable', { node: drive.node, name: base!.name });
      for (const b of ours) {
        if (b.name === base!.name) continue;
        await qmp.execute('block-dirty-bitmap-merge', { node: drive.node, target: base!.name, bitmaps: [b.name] });
        await qmp.execute('block-dirty-bitmap-remove', { node: drive.node, name: b.name });
      }
    } else {
      hooks.notice?.(`${reason}: full run`, rel);
      await removeImageState(statePath);
      for (const b of ours) await qmp.execute('block-dirty-bitmap-remove', { node: drive.node, name: b.name });
    }

    const newBitmap = `${prefix}${Date.now().toString(36)}`;
    let fleece: Fleece | undefined;
    let ok = false;
    let summary: (DiskSummary & { checksum: string }) | undefined;
    try {
      fleece = await Fleece.start(qmp, {
        node: drive.node, size: drive.size, prefix, newBitmap, persistent: drive.driver === 'qcow2',
        freeze: reason ? undefined : base!.name, tempDir: ctx.tempDir,
      });
      summary = await copyDisk(fleece, drive, {
        ...ctx, rel, target, manifestPath, manifest, trust, tStat: !!tStat, reason,
        frozen: reason ? undefined : base!.name,
      });
      summary.setupMs = fleece.setupMs;
      ok = true;
    } finally {
      const errors: unknown[] = [];
      const node = drive.node;
      // The new manifest is committed: name its bitmap at once, before the teardown (a kill there would
      // leave the state tied to the old manifest, and the next run full).
      let stated = false;
      if (ok) {
        await writeImageState(statePath, { node, bitmap: newBitmap, baseChecksum: summary!.checksum, size: drive.size }).then(
          () => void (stated = true),
          (e: unknown) => void errors.push(e),
        );
      }
      await fleece?.stop().catch((e: unknown) => errors.push(e));
      try {
        if (ok) {
          // A kill before this leaves the frozen bitmap beside the new one: the next run folds it in (rereads, loses nothing).
          if (stated && !reason) await qmp.execute('block-dirty-bitmap-remove', { node, name: base!.name });
        } else if ((await listBitmaps(qmp, node)).some((b) => b.name === newBitmap)) {
          // The transaction happened. Incremental: keep every change since the manifest,
          // frozen ∪ new, under the new name. Full: the new bitmap is relative to nothing.
          if (!reason) {
            await qmp.execute('block-dirty-bitmap-merge', { node, target: newBitmap, bitmaps: [base!.name] });
            await qmp.execute('block-dirty-bitmap-remove', { node, name: base!.name });
            await writeImageState(statePath, { ...state!, bitmap: newBitmap });
          } else {
            await qmp.execute('block-dirty-bitmap-remove', { node, name: newBitmap });
          }
        }
      } catch (e) {
        errors.push(e);
      }
      if (ok && errors.length) throw errors[0];
    }
    const { checksum: _c, ...rest } = summary!;
    return { ...rest, elapsedMs: performance.now() - t0 };
  } finally {
    await manifest?.close();
  }
}

export interface CopyContext extends DiskContext {
  rel: string;
  target: string;
  manifestPath: string;
  manifest: Manifest | undefined;
  trust: Trust;
  tStat: boolean;
  /** Set: full run, and why. */
  reason: string | undefined;
  /** Incremental: the dirty bitmap the export carries (its NBD meta context is qemu:dirty-bitmap:<frozen>). */
  frozen: string | undefined;
}

/** Per-block bits: from the extent map, then what this run does with the block. */
const DIRTY = 1;
const DATA = 2;
/** Hashed in this run. */
const WANT = 4;
/** The manifest does not vouch for the target here (grown, or touched by an interrupted run): written even when the digest matches. */
const SUSPECT = 8;

/** Largest NBD read: adjacent wanted blocks are read together up to this (or the server's maximum). */
const MAX_READ = 4 << 20;
/** Reads ahead of the hashing, by bytes and by count: scattered 64 KiB blocks need many in flight to keep QEMU busy. */
const READ_AHEAD_BYTES = 16 << 20;
const READS_AHEAD = 64;
/** NBD connections reading at once when the export allows it: QEMU serves at most 16 requests of one connection at a time. */
const READ_CONNECTIONS = 4;
/** Target writes in flight behind the hashing, by bytes. */
const WRITE_BEHIND_BYTES = 16 << 20;
/** Writes issued together after one intent record (one intent write per batch, not per block). */
const BATCH_BLOCKS = 256;
const BATCH_BYTES = 8 << 20;
/** Digests per manifest piece (1 MiB): old ones read and new ones appended in these; a read never spans two. */
const PIECE = 32768;

/** Copy one exported disk (any NBD export: a fleece, libvirt's backup job, an offline image) into its target. */
export async function copyDisk(source: { uri: string }, drive: Pick<Drive, 'name' | 'node'>, c: CopyContext): Promise<DiskSummary & { checksum: string }> {
  const { blockSize: bs, hooks, rel } = c;
  const contexts = [CONTEXT_ALLOCATION, ...(c.frozen ? [dirtyBitmapContext(c.frozen)] : [])];
  const nbd = await NbdClient.connect(source.uri, { metaContexts: contexts, maxInFlight: READS_AHEAD });
  const readers: Promise<NbdClient>[] = [Promise.resolve(nbd)];
  const check = (): void => {
    if (c.signal.aborted) throw new QsyncError('INTERRUPTED', 'interrupted');
  };
  try {
    const size = nbd.size;
    const nBlocks = blockCount(size, bs);
    const kind = new Uint8Array(nBlocks);
    let dirty = 0;
    const tMap = performance.now();
    for await (const e of nbd.extents(0, size)) {
      if (e.dirty) dirty += e.length;
      const first = Math.floor(e.offset / bs);
      const last = Math.ceil((e.offset + e.length) / bs);
      const bits = (e.dirty ? DIRTY : 0) | (e.zero ? 0 : DATA);
      for (let b = first; b < last; b++) kind[b]! |= bits;
    }
    const mapMs = performance.now() - tMap;
    check();

    let reason = c.reason;
    const s = {
      name: drive.name, node: drive.node, target: c.target, size, dirty,
      read: 0, sampled: 0, written: 0, unchanged: 0, zero: 0, setupMs: 0, mapMs, elapsedMs: 0,
    };
    if (nbd.canMultiConn) {
      for (let i = 1; i < READ_CONNECTIONS; i++) {
        const more = NbdClient.connect(source.uri, { maxInFlight: READS_AHEAD });
        more.catch(() => {}); // surfaces through the reads
        readers.push(more);
      }
    }
    let turn = 0;
    const readBlocks = async (first: number, count: number, buf: Buffer): Promise<void> => {
      const len = Math.min(count * bs, size - first * bs);
      await (await readers[turn++ % readers.length]!).read(buf.subarray(0, len), first * bs);
      s.read += len;
    };
    const blockLen = (b: number): number => Math.min(bs, size - b * bs);

    if (!reason && c.pct > 0) {
      const bad = await verifySample(c, kind, nBlocks, blockLen, readBlocks);
      s.sampled = s.read;
      if (bad !== undefined) {
        reason = `verify sample: block ${bad} changed but the bitmap calls it clean (change tracking lied)`;
        hooks.warning?.(`${reason}; full run`, rel);
      }
    }
    check();
    const full = reason !== undefined;
    const manifest = c.trust.trusted ? c.manifest : undefined;
    const method: SyncMethod = !full ? 'bitmap' : !c.tStat ? 'new' : manifest ? 'manifest' : 'compare';
    if (full) s.dirty = size;
    hooks.fileStart?.(rel, size, method);

    const file = await LocalFileSink.open(c.target, !c.tStat);
    let writer: StateWriter;
    let oldSize: number;
    try {
      oldSize = manifest?.header.targetSize ?? (c.tStat ? (await file.fh.stat()).size : 0);
      // The state's half of the write (src/sync/target.ts): a manifest not used for this run is removed first
      // (it would describe the old target); with a trusted one of the same size only the changed digests are patched into it.
      writer = await new LocalTargetState(c.manifestPath).begin({ blockSize: bs, oldSize, newSize: size, base: manifest });
    } catch (e) {
      await file.close();
      throw e;
    }
    const oldBlocks = blockCount(oldSize, bs);
    const holes: [number, number][] = [];
    const target = punchingSink(file, holes);
    let sink: BlockSink = target;
    let checksum: Buffer;
    try {
      if (c.wrapSink) {
        // A delta names its base: the manifest's fingerprint, the empty one for a new target, else a hash of the old target.
        const before = manifest ? manifest.fingerprint : !c.tStat ? emptyFingerprint(bs) : await hashFile(file.fh, oldSize, bs);
        const info = { relPath: rel, blockSize: bs, oldSize, newSize: size, fingerprints: () => ({ before, after: writer.fingerprint }) };
        sink = await c.wrapSink(target, info);
      }
      if (size !== oldSize) await sink.truncate(size);
      // Hashed: every block in a full run; else dirty ones, and those the manifest cannot vouch for.
      for (let b = 0; b < nBlocks; b++) if (full || kind[b]! & DIRTY) kind[b]! |= WANT;
      if (manifest) {
        for (let b = Math.min(oldBlocks, c.trust.unknownFrom ?? Infinity); b < nBlocks; b++) kind[b]! |= WANT | SUSPECT;
        for (const b of c.trust.unknown ?? []) if (b < nBlocks) kind[b]! |= WANT | SUSPECT;
      }
      const compare = !manifest && c.tStat;
      const maxRun = Math.max(1, Math.floor(Math.min(MAX_READ, nbd.blockSizes.maximum) / bs));
      // Delta sinks take one write at a time.
      const pipe = new CopyPipeline(bs, size, kind, oldBlocks, sink, !!c.wrapSink, manifest, writer);

      /** Runs of wanted blocks, in order: same kind (data or zero), within one piece, at most one read long. */
      let planned = 0;
      const nextRun = (): BlockRun | undefined => {
        let b = planned;
        while (b < nBlocks && !(kind[b]! & WANT)) b++;
        if (b >= nBlocks) return undefined;
        const data = (kind[b]! & DATA) !== 0;
        // Zero runs need no I/O unless the target must be read to compare.
        const limit = Math.min(nBlocks, (Math.floor(b / PIECE) + 1) * PIECE, data || compare ? b + maxRun : Infinity);
        let e = b + 1;
        while (e < limit && kind[e]! & WANT && ((kind[e]! & DATA) !== 0) === data) e++;
        planned = e;
        const off = b * bs;
        const len = Math.min(e * bs, size) - off;
        const r: BlockRun = { first: b, count: e - b, src: data ? Buffer.allocUnsafe(len) : undefined, ready: Promise.resolve() };
        if (compare && b < oldBlocks) r.old = Buffer.allocUnsafe(len);
        const jobs: Promise<void>[] = [];
        if (r.src) jobs.push(readBlocks(b, e - b, r.src));
        if (r.old) jobs.push(readTarget(file, r.old, off, oldSize));
        r.ready = Promise.all(jobs).then(() => {});
        r.ready.catch(() => {}); // awaited in order below
        return r;
      };
      const ahead: BlockRun[] = [];
      let aheadBytes = 0;
      const held = (r: BlockRun): number => (r.src?.length ?? 0) + (r.old?.length ?? 0);
      const fill = (): void => {
        while (ahead.length < READS_AHEAD && aheadBytes < READ_AHEAD_BYTES) {
          const r = nextRun();
          if (!r) return;
          ahead.push(r);
          aheadBytes += held(r);
        }
      };
      fill();
      while (ahead.length) {
        check();
        const r = ahead.shift()!;
        await r.ready;
        aheadBytes -= held(r);
        fill();
        await pipe.take(r, s);
        hooks.fileProgress?.(rel, s.read, s.written);
      }
      await pipe.finish();
      // The one commit sequence: data durable, then the manifest naming this inode, then the intent gone.
      checksum = await commitTarget(fileData(target), sink, writer, { size, mtimeNs: 0n });
      await sink.close();
    } catch (e) {
      await writer.abort();
      await sink.close().catch(() => {});
      throw e;
    }
    hooks.fileEnd?.({
      path: rel, itemize: s.written || holes.length ? '>f.st......' : '.f.........', kind: 'file', size, method,
      scanned: s.read, literal: s.written, matched: s.unchanged, unchanged: !s.written && !holes.length,
    });
    return { ...s, mode: full ? 'full' : 'bitmap', method, reason, checksum: checksum.toString('hex') };
  } finally {
    await Promise.all(readers.map((r) => r.then((c) => c.close()).catch(() => {})));
  }
}

/** Wanted blocks [first, first+count): read (data) or known zero, hashed and compared in order. */
interface BlockRun {
  first: number;
  count: number;
  /** Source bytes; a zero run has none. */
  src?: Buffer;
  /** The old target's bytes, when there is no manifest to compare with. */
  old?: Buffer;
  /** Both reads done. */
  ready: Promise<void>;
}

interface Counts {
  written: number;
  unchanged: number;
  zero: number;
}

/**
 * The in-order half of a copy: hash each run, compare it with the manifest
 * (or the old target), build the new manifest a piece at a time, and write
 * what changed in batches, each behind one intent record, with a bounded
 * number of bytes in flight.
 */
class CopyPipeline {
  readonly #piece = Buffer.alloc(PIECE * DIGEST_LEN);
  #pieceIndex = -1;
  /** Blocks of the current piece whose digest differs from the manifest's. */
  #pieceChanged: number[] = [];
  /** New digests of the run being taken (a run never spans two pieces). */
  readonly #runDigests = Buffer.alloc(PIECE * DIGEST_LEN);
  /** Changed stretches to write: data, or zeros (a hole) when `data` is undefined. */
  #batch: { off: number; len: number; data?: Buffer }[] = [];
  #batchBlocks: number[] = [];
  #batchBytes = 0;
  readonly #writes: { done: Promise<void>; bytes: number }[] = [];
  #writeBytes = 0;
  #intentChain = Promise.resolve();
  #lastWrite: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly bs: number,
    private readonly size: number,
    private readonly kind: Uint8Array,
    /** Blocks of the old target (the manifest's, or the file's). */
    private readonly oldBlocks: number,
    private readonly sink: BlockSink,
    /** One write at a time, in order (delta sinks). */
    private readonly serial: boolean,
    private readonly manifest: Manifest | undefined,
    /** The target's state: the intent before each batch, the new manifest a piece at a time. */
    private readonly writer: StateWriter,
  ) {}

  #pieceLen(p: number): number {
    return Math.min(PIECE, this.kind.length - p * PIECE);
  }

  /** Make piece `p` current (old digests loaded), appending the digests of the pieces before it. */
  async #seek(p: number): Promise<void> {
    while (this.#pieceIndex < p) {
      if (this.#pieceIndex >= 0) await this.#appendPiece(this.#pieceIndex);
      this.#pieceIndex++;
      await this.manifest?.readDigests(this.#pieceIndex * PIECE, this.#pieceLen(this.#pieceIndex), this.#piece);
    }
  }

  async #appendPiece(p: number): Promise<void> {
    await this.writer.append(this.#piece.subarray(0, this.#pieceLen(p) * DIGEST_LEN), this.#pieceChanged);
    this.#pieceChanged = [];
  }

  async take(r: BlockRun, s: Counts): Promise<void> {
    const { bs, size, manifest } = this;
    await this.#seek(Math.floor(r.first / PIECE));
    const at = r.first - this.#pieceIndex * PIECE;
    const blockLen = (i: number): number => Math.min(bs, size - (r.first + i) * bs);
    const digests = this.#runDigests.subarray(0, r.count * DIGEST_LEN);
    if (r.src) hashBlocksInto(r.src, bs, digests);
    else for (let i = 0; i < r.count; i++) zeroDigest(blockLen(i)).copy(digests, i * DIGEST_LEN);
    const old = this.#piece.subarray(at * DIGEST_LEN, (at + r.count) * DIGEST_LEN);
    // Without a manifest: compare with the old target's bytes where there are any; elsewhere the target is already a hole.
    let differs: Uint8Array | undefined;
    if (!manifest && r.old) {
      differs = new Uint8Array(r.count);
      for (let i = 0; i < r.count; i++) {
        const [from, len] = [i * bs, blockLen(i)];
        differs[i] = r.old.subarray(from, from + len).equals(r.src ? r.src.subarray(from, from + len) : zeroBlock(len)) ? 0 : 1;
      }
    }
    const { changed, runs } = planChunk({
      first: r.first, digests, size, blockSize: bs,
      mode: manifest ? 'manifest' : differs ? 'compare' : 'rewrite',
      old, oldBlocks: this.oldBlocks, differs,
      suspect: (b) => (this.kind[b]! & SUSPECT) !== 0,
      // Zeros that differ become holes (punched at commit), except where the target is already one.
      holeFrom: manifest || differs ? Infinity : 0,
      zeroDigest,
    });
    for (let i = 0, k = 0; i < r.count; i++) {
      const b = r.first + i;
      const d = digests.subarray(i * DIGEST_LEN, (i + 1) * DIGEST_LEN);
      while (k < changed.length && changed[k]! < b) k++;
      if (d.equals(zeroDigest(blockLen(i)))) s.zero += blockLen(i);
      else if (changed[k] !== b) s.unchanged += blockLen(i);
      if (manifest && !d.equals(old.subarray(i * DIGEST_LEN, (i + 1) * DIGEST_LEN))) this.#pieceChanged.push(b);
    }
    digests.copy(old);
    for (const w of runs) await this.#changed(r, w.first - r.first, w.first - r.first + w.count, w.zero, s);
  }

  /** Blocks [from, to) of run `r` changed: zeros (a hole), or data to write. */
  async #changed(r: BlockRun, from: number, to: number, zero: boolean, s: Counts): Promise<void> {
    for (let i = from; i < to; i++) this.#batchBlocks.push(r.first + i);
    const off = (r.first + from) * this.bs;
    const len = Math.min(this.size, (r.first + to) * this.bs) - off;
    if (zero) this.#batch.push({ off, len });
    else {
      this.#batch.push({ off, len, data: r.src!.subarray(from * this.bs, from * this.bs + len) });
      this.#batchBytes += len;
      s.written += len;
    }
    if (this.#batchBlocks.length >= BATCH_BLOCKS || this.#batchBytes >= BATCH_BYTES) await this.#flush();
  }

  async #flush(): Promise<void> {
    const [blocks, batch] = [this.#batchBlocks, this.#batch];
    [this.#batchBlocks, this.#batch, this.#batchBytes] = [[], [], 0];
    // The intent must be on disk before its blocks are written, but hashing need not wait for it.
    if (blocks.length) {
      const writer = this.writer;
      this.#intentChain = this.#intentChain.then(() => writer.record(blocks));
      this.#intentChain.catch(() => {}); // surfaces through the writes and finish()
    }
    const recorded = this.#intentChain;
    for (const { off, len, data } of batch) {
      const bytes = data?.length ?? 0;
      while (this.#writes.length && this.#writeBytes + bytes > WRITE_BEHIND_BYTES) {
        const w = this.#writes.shift()!;
        await w.done;
        this.#writeBytes -= w.bytes;
      }
      const after = this.serial ? Promise.all([this.#lastWrite, recorded]) : recorded;
      const done = after.then(() => (data ? this.sink.write(off, data) : this.sink.writeZeroes(off, len)));
      done.catch(() => {});
      this.#lastWrite = done;
      this.#writes.push({ done, bytes });
      this.#writeBytes += bytes;
    }
  }

  /** Write what is left and append the rest of the manifest. */
  async finish(): Promise<void> {
    await this.#flush();
    const pieces = Math.ceil(this.kind.length / PIECE);
    if (pieces) {
      await this.#seek(pieces - 1);
      await this.#appendPiece(pieces - 1);
    }
    await Promise.all([...this.#writes.map((w) => w.done), this.#intentChain]);
  }
}

const zeroBlocks = new Map<number, Buffer>();
function zeroBlock(len: number): Buffer {
  let z = zeroBlocks.get(len);
  if (!z) zeroBlocks.set(len, (z = Buffer.alloc(len)));
  return z;
}

/** Read `buf.length` bytes of the old target at `offset`; past its old end it reads as zero. */
async function readTarget(sink: LocalFileSink, buf: Buffer, offset: number, oldSize: number): Promise<void> {
  buf.fill(0);
  const want = Math.max(0, Math.min(buf.length, oldSize - offset));
  for (let done = 0; done < want; ) {
    const { bytesRead } = await sink.fh.read(buf, done, want - done, offset + done);
    if (!bytesRead) break;
    done += bytesRead;
  }
}

/**
 * Re-read a random sample of the blocks the bitmap calls clean and compare
 * them with the manifest. Returns the first block that differs.
 */
async function verifySample(
  c: CopyContext,
  kind: Uint8Array,
  nBlocks: number,
  blockLen: (b: number) => number,
  readBlocks: (first: number, count: number, buf: Buffer) => Promise<void>,
): Promise<number | undefined> {
  const clean: number[] = [];
  for (let b = 0; b < nBlocks; b++) if (!(kind[b]! & DIRTY)) clean.push(b);
  const want = Math.min(clean.length, Math.ceil((clean.length * c.pct) / 100));
  // Partial Fisher-Yates: `want` distinct blocks.
  for (let i = 0; i < want; i++) {
    const j = randomInt(i, clean.length);
    [clean[i], clean[j]] = [clean[j]!, clean[i]!];
  }
  const sample = clean.slice(0, want).sort((a, b) => a - b);
  const digest = Buffer.alloc(DIGEST_LEN);
  // A batch's reads all in flight at once (few at a time would idle the server), old digests looked up meanwhile.
  const batch = Math.max(1, Math.floor(READ_AHEAD_BYTES / c.blockSize));
  for (let i = 0; i < sample.length; i += batch) {
    const part = sample.slice(i, i + batch);
    const bufs = part.map((b) => (kind[b]! & DATA ? Buffer.allocUnsafe(c.blockSize) : undefined));
    const reads = Promise.all(part.map((b, k) => (bufs[k] ? readBlocks(b, 1, bufs[k]!) : undefined)));
    reads.catch(() => {}); // awaited below
    const old = Buffer.alloc(part.length * DIGEST_LEN);
    // One at a time, in order: the manifest reads ahead in windows.
    for (let k = 0; k < part.length; k++) await c.manifest!.readDigests(part[k]!, 1, old.subarray(k * DIGEST_LEN, (k + 1) * DIGEST_LEN));
    await reads;
    for (let k = 0; k < part.length; k++) {
      const b = part[k]!;
      const len = blockLen(b);
      if (bufs[k]) hashBlocksInto(bufs[k]!.subarray(0, len), c.blockSize, digest);
      else zeroDigest(len).copy(digest);
      if (!old.subarray(k * DIGEST_LEN, (k + 1) * DIGEST_LEN).equals(digest)) return b;
    }
  }
  return undefined;
}

