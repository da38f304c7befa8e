/**
 * Image mode (docs/IMAGE-MODE.md): back up the guest-visible contents of each disk of a
 * QEMU (running VM, qemu-storage-daemon, or an offline image served by one)
 * into DEST/<disk>.raw, a raw sparse image, with a manifest beside it.
 *
 * Per disk, decide whether the dirty bitmap can be trusted (tied to the
 * manifest it was started with); then take every disk's fleece snapshot with
 * its next bitmap in one transaction (all disks as of one instant); then per
 * disk read only dirty extents (or, for a full run, the allocated ones) over
 * NBD, check a random sample of clean blocks against the manifest, write
 * what differs, commit target → manifest → state, and only then drop the
 * frozen bitmap. On any failure the frozen bitmap is merged into the new
 * one, so no change is ever forgotten.
 */
import { randomInt } from 'node:crypto';
import { QsyncError } from '../core/errors.js';
import { blockCount, DEFAULT_BLOCK_SIZE, isValidBlockSize } from '../core/geometry.js';
import { planChunk } from '../core/plan.js';
import { sampleRanks } from '../core/sample.js';
import { DIGEST_LEN, hashBlocksInto, zeroDigest } from '../hash/blake3.js';
import { borrowRing, returnRing, type BufferRing, type Loan } from '../io/buffer-ring.js';
import type { BlockSink } from '../io/types.js';
import { NbdClient } from '../io/nbd/client.js';
import { CONTEXT_ALLOCATION, dirtyBitmapContext } from '../io/nbd/constants.js';
import { jobsByNode, listBitmaps, type BitmapInfo, type Drive } from '../qemu/block.js';
import { Fleece } from '../qemu/fleece.js';
import { checkReachable, qemuUser, type QemuUser } from '../qemu/process.js';
import { QmpClient } from '../qemu/qmp.js';
import { prefixedHooks, type SyncHooks, type SyncMethod } from './events.js';
import type { FileSyncContext } from './file-sync.js';
import { emptyFingerprint, type Manifest } from './manifest-store.js';
import { adoptLegacyTarget, bitmapPrefix, destPrefix } from './image-names.js';
import { withImageSource, type ImageSourceOptions } from './image-source.js';
import { hashFile } from './target-digests.js';
import type { Trust } from './trust.js';
import { LocalDestination } from './local-target.js';
import { commitTarget, type Destination, type OpenData, type StateWriter, type Target, type TargetNote } from './target.js';


export interface ImageBackupOptions extends ImageSourceOptions {
  blockSize?: number;
  /** `--verify-sample PCT`: share of clean blocks re-read and checked against the manifest (default 0.5). */
  verifySamplePct?: number;
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
  /** Reading, hashing and writing the data, ms: the verify sample included; the map, the target's commit (fsync, manifest) and the teardown not. */
  copyMs: number;
  elapsedMs: number;
}

/** Back up every selected disk, all as of one instant; one summary per disk. */
export async function runImageBackup(opts: ImageBackupOptions, hooks: SyncHooks = {}): Promise<DiskSummary[]> {
  const blockSize = opts.blockSize ?? DEFAULT_BLOCK_SIZE;
  if (!isValidBlockSize(blockSize)) throw new QsyncError('USAGE', `invalid block size ${blockSize}`);
  const pct = opts.verifySamplePct ?? 0.5;
  if (!(pct >= 0 && pct <= 100)) throw new QsyncError('USAGE', `--verify-sample must be 0..100, not ${pct}`);

  const ac = new AbortController();
  const onSignal = (): void => ac.abort();
  const own = !opts.signal;
  if (opts.signal) opts.signal.addEventListener('abort', onSignal, { once: true });
  else for (const s of ['SIGINT', 'SIGTERM'] as const) process.on(s, onSignal);
  try {
    return await withImageSource(opts, async ({ qmp, address, drives, dest, destination, tempDir }) => {
      // Refused before anything is decided: no state and no bitmap is touched.
      await refuseBusyDisks(qmp, drives);
      const owner = await qemuUser(address, drives.map((d) => d.file));
      if (owner) await checkReachable(tempDir, owner);
      const names = new Set(drives.map((d) => d.name));
      // Targets of older versions are renamed where they lie on this host.
      if (destination instanceof LocalDestination) for (const d of drives) await adoptLegacyTarget(qmp, dest, d, names, hooks);
      return backupDisks(qmp, drives, { dest, destination, blockSize, pct, tempDir, owner, signal: ac.signal, hooks, wrapSink: opts.wrapSink });
    });
  } finally {
    if (own) for (const s of ['SIGINT', 'SIGTERM'] as const) process.off(s, onSignal);
    else opts.signal!.removeEventListener('abort', onSignal);
  }
}

export interface DiskContext {
  /** DEST as the bitmaps' names are keyed (src/sync/image-source.ts). */
  dest: string;
  /** Where the targets are, here or on another host. */
  destination: Destination;
  blockSize: number;
  pct: number;
  tempDir: string;
  /** Who QEMU runs as, when not as this process: its overlays are made for that user. */
  owner: QemuUser | undefined;
  signal: AbortSignal;
  hooks: SyncHooks;
  wrapSink: FileSyncContext['wrapSink'];
}

/** A disk held by a block job that is not this run's (another qsync, what one left for another DEST, libvirt's backup) is refused. */
async function refuseBusyDisks(qmp: QmpClient, drives: Drive[]): Promise<void> {
  const held = await jobsByNode(qmp);
  for (const d of drives) {
    const job = held.get(d.node)?.[0];
    if (!job) continue;
    throw new QsyncError('LOCKED', `disk ${d.name} (node ${d.node}) is in use by block job '${job.id}' (${job.type}); nothing was changed`, {
      hint: job.id.startsWith('qsync-')
        ? 'another qsync backs this disk up to another DEST (or was killed doing so: run it again to clean up); wait for it'
        : 'another backup (e.g. libvirt\'s: virsh domjobinfo / domjobabort) holds the disk; wait for it to finish',
    });
  }
}

/** One disk of a run: what was decided before the fleece, and what its teardown needs. */
interface DiskPlan {
  drive: Drive;
  /** The run's hooks, with the disk's name in front of every notice and warning. */
  hooks: SyncHooks;
  rel: string;
  target: Target;
  manifest: Manifest | undefined;
  tStat: boolean;
  trust: Trust;
  state: TargetNote | undefined;
  /** This target's bitmaps before the run (a full run drops them once set up). */
  ours: BitmapInfo[];
  /** The bitmap of the incremental run (frozen in the transaction); undefined for a full run. */
  base: BitmapInfo | undefined;
  /** Set: a full run, and why. */
  reason: string | undefined;
  newBitmap: string;
  settled: boolean;
}


/**
 * Decide whether the disk's bitmap can be trusted. Nothing is deleted here
 * (a setup that fails must leave state and bitmaps as they were); only a
 * killed run's bitmaps are folded together, which loses nothing.
 */
async function planDisk(qmp: QmpClient, drive: Drive, ctx: DiskContext): Promise<DiskPlan> {
  const { dest, blockSize } = ctx;
  const hooks = prefixedHooks(ctx.hooks, drive.name);
  const rel = `${drive.name}.raw`;
  const prefix = bitmapPrefix(dest, drive.name);
  const target = ctx.destination.target(rel);
  const tStat = await target.identity();
  // A manifest that fails its own checks is no manifest: the reason says why, and the run is full.
  const { manifest, trust } = await target.state.assess(tStat, { blockSize });
  try {
    const state = await target.readNote();
    const ours = (await listBitmaps(qmp, drive.node)).filter((b) => b.name.startsWith(prefix));
    const base = state ? ours.find((b) => b.name === state.bitmap) : undefined;

    // The bitmap's name ties it to this DEST and disk; its node may be named otherwise in another QEMU
    // (the VM's, or the daemon of --image after a shutdown): it lives in the image file.
    let reason: string | undefined;
    if (!tStat) reason = 'first run';
    else if (!trust.trusted) reason = trust.reason ?? 'no manifest';
    else if (!state) reason = 'no bitmap recorded for this target';
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
    }
    return {
      drive, hooks, rel, target, manifest, tStat: !!tStat, trust, state,
      ours, base: reason ? undefined : base, reason,
      newBitmap: `${prefix}${Date.now().toString(36)}`, settled: false,
    };
  } catch (e) {
    await manifest?.close();
    throw e;
  }
}

/**
 * Plan every disk, take them all in one transaction, then copy each and
 * settle it (state, its part of the fleece, bitmaps) before the next.
 */
async function backupDisks(qmp: QmpClient, drives: Drive[], ctx: DiskContext): Promise<DiskSummary[]> {
  const plans: DiskPlan[] = [];
  try {
    for (const d of drives) plans.push(await planDisk(qmp, d, ctx));
    let fleece: Fleece;
    try {
      fleece = await Fleece.start(qmp, {
        prefix: destPrefix(ctx.dest), tempDir: ctx.tempDir, owner: ctx.owner,
        disks: plans.map((p) => ({
          node: p.drive.node, size: p.drive.size, newBitmap: p.newBitmap, persistent: p.drive.driver === 'qcow2', freeze: p.base?.name,
        })),
      });
    } catch (e) {
      for (const p of plans) await settle(qmp, p, undefined).catch(() => {});
      throw e;
    }
    const out: DiskSummary[] = [];
    try {
      // Set up: only now is what a full run replaces dropped.
      for (const p of plans) {
        if (!p.reason) continue;
        await p.target.dropNote();
        for (const b of p.ours) await qmp.execute('block-dirty-bitmap-remove', { node: p.drive.node, name: b.name });
      }
      for (const [i, p] of plans.entries()) {
        const t0 = performance.now();
        let summary: (DiskSummary & { checksum: string }) | undefined;
        try {
          summary = await copyDisk({ uri: fleece.uris[i]! }, p.drive, {
            ...ctx, hooks: p.hooks, rel: p.rel, target: p.target, manifest: p.manifest,
            trust: p.trust, tStat: p.tStat, reason: p.reason, frozen: p.base?.name,
          });
          summary.setupMs = fleece.setupMs;
        } finally {
          await settle(qmp, p, summary, fleece, i);
        }
        const { checksum: _c, ...rest } = summary;
        out.push({ ...rest, elapsedMs: fleece.setupMs + performance.now() - t0 });
      }
    } catch (e) {
      for (const [i, p] of plans.entries()) if (!p.settled) await settle(qmp, p, undefined, fleece, i).catch(() => {});
      await fleece.stop().catch(() => {});
      throw e;
    }
    await fleece.stop();
    return out;
  } finally {
    for (const p of plans) await p.manifest?.close();
  }
}

/**
 * After a disk's copy (`summary`) or its failure (undefined): name the new
 * bitmap in the state, take down the disk's part of the fleece, then drop
 * the frozen bitmap, or on failure keep every change since the manifest
 * (frozen ∪ new) under the new bitmap's name. Throws only after a success.
 */
async function settle(qmp: QmpClient, p: DiskPlan, summary: { checksum: string } | undefined, fleece?: Fleece, i = 0): Promise<void> {
  p.settled = true;
  const errors: unknown[] = [];
  const { node, size } = p.drive;
  const frozen = p.base?.name;
  // The new manifest is committed: name its bitmap at once, before the teardown (a kill there would
  // leave the state tied to the old manifest, and the next run full).
  let stated = false;
  if (summary) {
    await p.target.writeNote({ node, bitmap: p.newBitmap, baseChecksum: summary.checksum, size }).then(
      () => void (stated = true),
      (e: unknown) => void errors.push(e),
    );
  }
  await fleece?.stopDisk(i).catch((e: unknown) => errors.push(e));
  try {
    if (summary) {
      // A kill before this leaves the frozen bitmap beside the new one: the next run folds it in (rereads, loses nothing).
      if (stated && frozen) await qmp.execute('block-dirty-bitmap-remove', { node, name: frozen });
    } else if ((await listBitmaps(qmp, node)).some((b) => b.name === p.newBitmap)) {
      // The transaction happened. Incremental: frozen ∪ new under the new name. Full: the new bitmap is relative to nothing.
      if (frozen) {
        await qmp.execute('block-dirty-bitmap-merge', { node, target: p.newBitmap, bitmaps: [frozen] });
        await qmp.execute('block-dirty-bitmap-remove', { node, name: frozen });
        await p.target.writeNote({ ...p.state!, node, bitmap: p.newBitmap });
      } else {
        await qmp.execute('block-dirty-bitmap-remove', { node, name: p.newBitmap });
      }
    }
  } catch (e) {
    errors.push(e);
  }
  if (summary && errors.length) throw errors[0];
}

export interface CopyContext extends DiskContext {
  rel: string;
  target: Target;
  manifest: Manifest | undefined;
  trust: Trust;
  tStat: boolean;
  /** Set: full run, and why. */
  reason: string | undefined;
  /** Incremental: the dirty bitmap the export carries (its NBD meta context is qemu:dirty-bitmap:<frozen>). */
  frozen: string | undefined;
}

/** Per-block bits of the extent map: in the dirty bitmap, allocated (not known to read as zeros). */
const DIRTY = 1;
const DATA = 2;

/** Largest run of adjacent wanted blocks read, hashed and planned together. */
const MAX_READ = 4 << 20;
/**
 * Largest NBD request: a longer run is read as several, spread over the
 * connections, so that QEMU serves it in parallel and sends one piece while
 * it reads the next (one 4 MiB request is read whole, then sent).
 */
const READ_REQUEST = 1 << 20;
/**
 * Reads ahead of the hashing, by bytes and by count: scattered 64 KiB blocks
 * need many in flight to keep QEMU busy (bench/image-read.ts: 64 left the
 * server idle between replies; 256 is 64 queued per connection).
 */
const READ_AHEAD_BYTES = 16 << 20;
const READS_AHEAD = 256;
/** NBD connections reading at once when the export allows it: QEMU serves at most 16 requests of one connection at a time. */
const READ_CONNECTIONS = 4;
/**
 * The verify sample's reads in flight, by bytes: 64 blocks of 64 KiB keep the
 * 16 requests QEMU serves per connection busy on each of the 4, and the
 * ring's memory a sample touches stays 4 MiB whatever the sample's size.
 */
const SAMPLE_AHEAD = 4 << 20;
/** Target writes in flight behind the hashing, by bytes. */
const WRITE_BEHIND_BYTES = 16 << 20;
/**
 * All a copy's data in memory at once (read ahead, being hashed, waiting in a
 * batch, being written) is lent from one ring of this size, or of room for
 * two runs when a run is larger (a compared run lends its old bytes too), so
 * read-ahead and write-behind share it: a run that finds no room waits for
 * writes to finish. Only the part of the ring a copy uses is ever resident.
 * Measured (bench/README.md, image mode): 8, 16, 24 and 32 MiB copy a disk
 * equally fast, and 8 MiB read dirty data no slower than 16
 * (bench/image-read.ts); each 8 MiB more is 8 MiB more peak RSS once more
 * than that much is copied.
 */
const RING_BYTES = 8 << 20;
/** Writes issued together after one intent record (one intent write per batch, not per block). */
const BATCH_BLOCKS = 256;
const BATCH_BYTES = 8 << 20;
/** Written bytes after which the target is asked to put them on storage (BlockSink.writeback), one such flush at a time. */
const WRITEBACK_BYTES = 64 << 20;
/** Digests per manifest piece (1 MiB): old ones read and new ones appended in these; a read never spans two. */
const PIECE = 32768;
/**
 * Blocks per window of the extent map (64 GiB of 64 KiB blocks): a copy
 * holds the map of one window only, one byte per block, and asks the server
 * for the next when it gets there, so its memory is the same whatever the
 * disk's size. A whole number of pieces: a run never spans two windows.
 */
const MAP_WINDOW = 32 * PIECE;

/**
 * The extent map of a disk, one window at a time (MAP_WINDOW blocks): DIRTY
 * and DATA per block of the window held. A disk of one window is asked once;
 * a larger one once per pass over it (the export is a fixed point in time:
 * every pass finds the same map).
 */
class BlockMap {
  readonly kind: Uint8Array;
  /** The window held: blocks [start, end). */
  start = 0;
  end = 0;
  /** Bytes of the window held that the bitmap calls dirty. */
  dirty = 0;
  /** Time spent asking for the map, ms. */
  ms = 0;

  constructor(
    private readonly nbd: NbdClient,
    private readonly bs: number,
    readonly nBlocks: number,
  ) {
    this.kind = new Uint8Array(Math.min(MAP_WINDOW, nBlocks));
  }

  /** Hold the window of block `b` (< nBlocks). */
  async seek(b: number): Promise<void> {
    if (b >= this.start && b < this.end) return;
    const t = performance.now();
    const { bs, kind } = this;
    const start = b - (b % MAP_WINDOW);
    const end = Math.min(this.nBlocks, start + MAP_WINDOW);
    kind.fill(0);
    // Held as empty until filled: a failure part way leaves no half-filled window behind.
    [this.start, this.end, this.dirty] = [0, 0, 0];
    let dirty = 0;
    for await (const e of this.nbd.extents(start * bs, (end - start) * bs)) {
      if (e.dirty) dirty += e.length;
      const bits = (e.dirty ? DIRTY : 0) | (e.zero ? 0 : DATA);
      const last = Math.min(end, Math.ceil((e.offset + e.length) / bs));
      for (let i = Math.floor(e.offset / bs); i < last; i++) kind[i - start]! |= bits;
    }
    [this.start, this.end, this.dirty] = [start, end, dirty];
    this.ms += performance.now() - t;
  }

  /** The bits of block `b` of the window held. */
  at(b: number): number {
    return this.kind[b - this.start]!;
  }

  /** Blocks with no dirty byte, over the whole disk. */
  async cleanBlocks(check: () => void): Promise<number> {
    let clean = 0;
    for (let w = 0; w < this.nBlocks; w += MAP_WINDOW) {
      check();
      await this.seek(w);
      for (let i = 0; i < this.end - this.start; i++) if (!(this.kind[i]! & DIRTY)) clean++;
    }
    return clean;
  }
}

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
    const map = new BlockMap(nbd, bs, nBlocks);
    const tMap = performance.now();
    if (nBlocks) await map.seek(0);
    check();

    let reason = c.reason;
    const s = {
      name: drive.name, node: drive.node, target: c.target.shown, size, dirty: 0,
      read: 0, sampled: 0, written: 0, unchanged: 0, zero: 0, setupMs: 0, mapMs: 0, copyMs: 0, elapsedMs: 0,
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
      const jobs: Promise<void>[] = [];
      for (let at = 0; at < len; at += READ_REQUEST) {
        const n = Math.min(READ_REQUEST, len - at);
        const reader = readers[turn++ % readers.length]!;
        jobs.push(reader.then((c) => c.read(buf.subarray(at, at + n), first * bs + at)));
      }
      await Promise.all(jobs);
      s.read += len;
    };
    const blockLen = (b: number): number => Math.min(bs, size - b * bs);
    // Without a trusted manifest, an existing target's bytes are read to compare with.
    const manifest = c.trust.trusted ? c.manifest : undefined;
    const compare = !manifest && c.tStat;
    // Room for two runs (and their old bytes) whatever the block size; the next disk reuses it.
    const ring = borrowRing(Math.max(RING_BYTES, 2 * Math.max(bs, MAX_READ) * (compare ? 2 : 1)));

    if (!reason && c.pct > 0) {
      const bad = await verifySample(c, map, check, blockLen, readBlocks, ring);
      s.sampled = s.read;
      if (bad !== undefined) {
        reason = `verify sample: block ${bad} changed but the bitmap calls it clean (change tracking lied)`;
        hooks.warning?.(`${reason}; full run`, rel);
      }
    }
    check();
    const full = reason !== undefined;
    const method: SyncMethod = !full ? 'bitmap' : !c.tStat ? 'new' : manifest ? 'manifest' : 'compare';
    hooks.fileStart?.(rel, size, method);

    const dst = await c.target.open(!c.tStat);
    let writer: StateWriter;
    let oldSize: number;
    try {
      oldSize = manifest?.header.targetSize ?? (c.tStat ? Number((await c.target.identity())?.size ?? 0) : 0);
      // The state's half of the write (src/sync/target.ts): a manifest not used for this run is removed first
      // (it would describe the old target); with a trusted one of the same size only the changed digests are patched into it.
      writer = await c.target.state.begin({ blockSize: bs, oldSize, newSize: size, base: manifest });
    } catch (e) {
      await dst.close();
      throw e;
    }
    const oldBlocks = blockCount(oldSize, bs);
    // Zeroed stretches become holes where the target lies (punched at its commit).
    let sink: BlockSink = dst.sink;
    let checksum: Buffer;
    let zeroed = 0;
    try {
      if (c.wrapSink) {
        // A delta names its base: the manifest's fingerprint, the empty one for a new target, else a hash of the old target
        // (a remote target's is hashed where it is: src/remote/remote-target.ts).
        const file = dst.file;
        const before = manifest ? manifest.fingerprint : !c.tStat ? emptyFingerprint(bs) : file ? await hashFile(file.fh, oldSize, bs) : await dst.hash!(oldSize, bs);
        const info = { relPath: rel, blockSize: bs, oldSize, newSize: size, fingerprints: () => ({ before, after: writer.fingerprint }) };
        sink = await c.wrapSink(file ?? dst.sink, info);
      }
      if (size !== oldSize) await sink.truncate(size);
      // The manifest does not vouch for the target (grown, or touched by an interrupted run): written even when the digest matches.
      const suspectFrom = manifest ? Math.min(oldBlocks, c.trust.unknownFrom ?? Infinity) : Infinity;
      const unknown = manifest && c.trust.unknown?.size ? c.trust.unknown : undefined;
      const suspect = (b: number): boolean => b >= suspectFrom || (unknown?.has(b) ?? false);
      // Hashed: every block in a full run; else dirty ones, and those the manifest cannot vouch for.
      const wanted = (b: number, k: number): boolean => full || (k & DIRTY) !== 0 || suspect(b);
      const maxRun = Math.max(1, Math.floor(Math.min(MAX_READ, nbd.blockSizes.maximum) / bs));
      // Delta sinks take one write at a time.
      const pipe = new CopyPipeline(bs, size, nBlocks, suspect, oldBlocks, sink, !!c.wrapSink, manifest, writer);

      /** Runs of wanted blocks, in order: same kind (data or zero), within one piece, at most one read long. */
      let planned = 0;
      /** The map's windows passed: each adds its dirty bytes once. */
      let windows = 0;
      const planRun = async (): Promise<{ b: number; e: number; data: boolean } | undefined> => {
        let b = planned;
        for (;;) {
          if (b >= nBlocks) return undefined;
          if (b >= windows * MAP_WINDOW) {
            await map.seek(b);
            s.dirty += map.dirty;
            windows++;
            check();
          }
          const end = map.end;
          while (b < end && !wanted(b, map.at(b))) b++;
          if (b < end) break;
        }
        const data = (map.at(b) & DATA) !== 0;
        // Zero runs need no I/O unless the target must be read to compare. A piece never spans two windows of the map.
        const limit = Math.min(nBlocks, (Math.floor(b / PIECE) + 1) * PIECE, data || compare ? b + maxRun : Infinity);
        let e = b + 1;
        while (e < limit && wanted(e, map.at(e)) && ((map.at(e) & DATA) !== 0) === data) e++;
        planned = e;
        return { b, e, data };
      };
      /** A planned run that found no room in the ring yet. */
      let waiting: Awaited<ReturnType<typeof planRun>>;
      /** The next run with its reads started, or undefined: none left, or no room for it (`waiting`). */
      const nextRun = async (): Promise<BlockRun | undefined> => {
        const p = waiting ?? (await planRun());
        waiting = undefined;
        if (!p) return undefined;
        const { b, e, data } = p;
        const off = b * bs;
        const len = Math.min(e * bs, size) - off;
        const withOld = compare && b < oldBlocks;
        const need = (data ? len : 0) + (withOld ? len : 0);
        const loan = need ? ring.tryLend(need) : undefined;
        if (need && !loan) {
          waiting = p;
          return undefined;
        }
        const r: BlockRun = { first: b, count: e - b, src: data ? loan!.buf.subarray(0, len) : undefined, ready: Promise.resolve(), loan, refs: 1 };
        if (withOld) r.old = loan!.buf.subarray(need - len);
        const jobs: Promise<void>[] = [];
        if (r.src) jobs.push(readBlocks(b, e - b, r.src));
        if (r.old) jobs.push(readTarget(dst.reader, r.old, off, oldSize));
        r.ready = Promise.all(jobs).then(() => {});
        r.ready.catch(() => {}); // awaited in order below
        return r;
      };
      const ahead: BlockRun[] = [];
      let aheadBytes = 0;
      const held = (r: BlockRun): number => (r.src?.length ?? 0) + (r.old?.length ?? 0);
      const fill = async (): Promise<void> => {
        while (ahead.length < READS_AHEAD && aheadBytes < READ_AHEAD_BYTES) {
          const r = await nextRun();
          if (!r) return;
          ahead.push(r);
          aheadBytes += held(r);
        }
      };
      await fill();
      while (ahead.length || waiting) {
        check();
        if (!ahead.length) {
          // The ring is full of data on its way to the target: wait for some of it to be written.
          await pipe.makeRoom();
          await fill();
          continue;
        }
        const r = ahead.shift()!;
        await r.ready;
        aheadBytes -= held(r);
        await fill();
        await pipe.take(r, s);
        unref(r);
        hooks.fileProgress?.(rel, s.read, s.written);
      }
      await pipe.finish();
      if (full) s.dirty = size;
      s.mapMs = map.ms;
      s.copyMs = performance.now() - tMap - map.ms;
      zeroed = pipe.zeroed;
      // The one commit sequence: data durable, in place, then the manifest naming it, then the intent gone.
      checksum = await commitTarget(dst, sink, writer, { size, mtimeNs: 0n });
      await sink.close();
      await dst.close();
      // Every read and write is done (after a failure some may not be: that ring is left to the GC).
      returnRing(ring);
    } catch (e) {
      await writer.abort();
      await sink.close().catch(() => {});
      await dst.close();
      throw e;
    }
    hooks.fileEnd?.({
      path: rel, itemize: s.written || zeroed ? '>f.st......' : '.f.........', kind: 'file', size, method,
      scanned: s.read, literal: s.written, matched: s.unchanged, unchanged: !s.written && !zeroed,
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
  /** Where src and old lie; given back once nothing refers to them. */
  loan: Loan | undefined;
  /** References to the loan: the pipeline's while it takes the run, one per write of its data until it settles. */
  refs: number;
}

function unref(r: BlockRun): void {
  if (--r.refs === 0) r.loan?.release();
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
  /** Stretches of zeros written (holes punched where the target can). */
  zeroed = 0;
  readonly #piece = Buffer.alloc(PIECE * DIGEST_LEN);
  #pieceIndex = -1;
  /** Blocks of the current piece whose digest differs from the manifest's. */
  #pieceChanged: number[] = [];
  /** New digests of the run being taken (a run never spans two pieces). */
  readonly #runDigests = Buffer.alloc(PIECE * DIGEST_LEN);
  /** Changed stretches to write: data (of run `run`), or zeros (a hole) when `data` is undefined. */
  #batch: { off: number; len: number; data?: Buffer; run?: BlockRun }[] = [];
  #batchBlocks: number[] = [];
  #batchBytes = 0;
  readonly #writes: { done: Promise<void>; bytes: number }[] = [];
  #writeBytes = 0;
  #intentChain = Promise.resolve();
  #lastWrite: Promise<unknown> = Promise.resolve();
  /** Bytes written since the last writeback began, and the one in flight (its failure surfaces in finish()). */
  #unflushed = 0;
  #writeback: Promise<void> | undefined;
  #writebackBusy = false;

  constructor(
    private readonly bs: number,
    private readonly size: number,
    private readonly nBlocks: number,
    /** Blocks the manifest does not vouch for: written even when their digest matches. */
    private readonly suspect: (b: number) => boolean,
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
    return Math.min(PIECE, this.nBlocks - p * PIECE);
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
    // A piece's blocks are written before its digests are appended: a remote target checks each block it wrote
    // against the digest that describes it (src/remote/serve-target.ts), and a block it had described is never written.
    await this.#flush();
    await this.#drain();
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
    else {
      // Only the disk's last block may be short.
      digests.fill(zeroDigest(bs));
      zeroDigest(blockLen(r.count - 1)).copy(digests, (r.count - 1) * DIGEST_LEN);
    }
    const old = this.#piece.subarray(at * DIGEST_LEN, (at + r.count) * DIGEST_LEN);
    if (!r.src && !manifest && !r.old) {
      // Zeros where the target reads as zeros already (a new target, or past the old one's end): nothing to write.
      s.zero += Math.min(size, (r.first + r.count) * bs) - r.first * bs;
      digests.copy(old);
      return;
    }
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
      suspect: this.suspect,
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
    if (zero) {
      this.#batch.push({ off, len });
      this.zeroed++;
    } else {
      r.refs++;
      this.#batch.push({ off, len, data: r.src!.subarray(from * this.bs, from * this.bs + len), run: r });
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
    for (const { off, len, data, run } of batch) {
      const bytes = data?.length ?? 0;
      while (this.#writes.length && this.#writeBytes + bytes > WRITE_BEHIND_BYTES) {
        const w = this.#writes.shift()!;
        await w.done;
        this.#writeBytes -= w.bytes;
      }
      const after = this.serial ? Promise.all([this.#lastWrite, recorded]) : recorded;
      const done = after.then(() => (data ? this.sink.write(off, data) : this.sink.writeZeroes(off, len)));
      done.catch(() => {});
      // The sink is done with the data once its write settles (src/io/types.ts BlockSink).
      if (run) void done.then(() => unref(run), () => unref(run));
      this.#unflushed += bytes;
      if (this.#unflushed >= WRITEBACK_BYTES) this.#startWriteback(done);
      this.#lastWrite = done;
      this.#writes.push({ done, bytes });
      this.#writeBytes += bytes;
    }
  }

  /**
   * Once `after` is written, let the target start putting what it holds on
   * storage, so the disk works while more is read and hashed, and commit's
   * fsync finds little left. One at a time; a failure is kept for finish().
   */
  #startWriteback(after: Promise<void>): void {
    const sink = this.sink;
    if (!sink.writeback || this.#writebackBusy) return;
    this.#writebackBusy = true;
    this.#unflushed = 0;
    const prev = this.#writeback ?? Promise.resolve();
    this.#writeback = Promise.all([prev, after.catch(() => {})])
      .then(() => sink.writeback!())
      .finally(() => (this.#writebackBusy = false));
    this.#writeback.catch(() => {}); // surfaces in finish()
  }

  /** Send the batch on, then wait for the oldest write: its data's room in the ring comes back. */
  async makeRoom(): Promise<void> {
    await this.#flush();
    const w = this.#writes.shift();
    if (!w) throw new QsyncError('IO', 'image copy: no room in memory for the next run, and nothing is being written');
    await w.done;
    this.#writeBytes -= w.bytes;
  }

  /** Wait for every write issued (and the intent records before them). */
  async #drain(): Promise<void> {
    const writes = this.#writes.splice(0);
    this.#writeBytes = 0;
    await Promise.all([...writes.map((w) => w.done), this.#intentChain]);
  }

  /** Write what is left and append the rest of the manifest. */
  async finish(): Promise<void> {
    await this.#flush();
    const pieces = Math.ceil(this.nBlocks / PIECE);
    if (pieces) {
      await this.#seek(pieces - 1);
      await this.#appendPiece(pieces - 1);
    }
    await this.#drain();
    await this.#writeback;
  }
}

const zeroBlocks = new Map<number, Buffer>();
function zeroBlock(len: number): Buffer {
  let z = zeroBlocks.get(len);
  if (!z) zeroBlocks.set(len, (z = Buffer.alloc(len)));
  return z;
}

/** Read `buf.length` bytes of the old target at `offset`; past its old end it reads as zero. */
async function readTarget(reader: OpenData['reader'], buf: Buffer, offset: number, oldSize: number): Promise<void> {
  buf.fill(0);
  const want = Math.max(0, Math.min(buf.length, oldSize - offset));
  if (want) await reader.readAt(buf.subarray(0, want), offset);
}

/** A uniform number in (0, 1), from the system's random source. */
const randomUnit = (): number => (randomInt(0, 2 ** 48 - 1) + 0.5) / 2 ** 48;

/**
 * Re-read a random sample of the blocks the bitmap calls clean and compare
 * them with the manifest. Returns the first block that differs. The sample
 * is drawn in block order as the map is walked (src/core/sample.ts), and
 * read through SAMPLE_AHEAD slots of the ring, the oldest checked as soon as
 * its read is done and its slot taken by the next: nothing held grows with
 * the disk or with the sample.
 */
async function verifySample(
  c: CopyContext,
  map: BlockMap,
  check: () => void,
  blockLen: (b: number) => number,
  readBlocks: (first: number, count: number, buf: Buffer) => Promise<void>,
  ring: BufferRing,
): Promise<number | undefined> {
  const bs = c.blockSize;
  const cleanCount = await map.cleanBlocks(check);
  const want = Math.min(cleanCount, Math.ceil((cleanCount * c.pct) / 100));
  if (!want) return undefined;
  const ranks = sampleRanks(cleanCount, want, randomUnit, (k) => randomInt(0, k));
  const slots = Math.max(1, Math.min(want, Math.floor(SAMPLE_AHEAD / bs)));
  const loan = await ring.lend(slots * bs);
  const digest = Buffer.alloc(DIGEST_LEN);
  const old = Buffer.alloc(DIGEST_LEN);
  /** Sampled blocks in order, their reads started (a block without data reads as zeros: none). */
  const reading: { b: number; buf: Buffer | undefined; read: Promise<void> }[] = [];
  /** Check the oldest block read: its slot is free after. */
  const checkOldest = async (): Promise<number | undefined> => {
    const { b, buf, read } = reading[0]!;
    // The manifest reads ahead in windows: one block at a time, in order.
    await c.manifest!.readDigests(b, 1, old);
    await read;
    reading.shift();
    const len = blockLen(b);
    if (buf) hashBlocksInto(buf.subarray(0, len), bs, digest);
    else zeroDigest(len).copy(digest);
    return old.equals(digest) ? undefined : b;
  };
  try {
    let next = ranks.next();
    for (let b = 0, rank = 0, taken = 0; b < map.nBlocks && !next.done; b++) {
      if (b >= map.end || b < map.start) {
        check();
        await map.seek(b);
      }
      const k = map.at(b);
      if (k & DIRTY) continue;
      if (rank++ !== next.value) continue;
      next = ranks.next();
      if (reading.length === slots) {
        const bad = await checkOldest();
        if (bad !== undefined) return bad;
      }
      // Slot i is taken again by the block `slots` after, read only once this one is checked.
      const slot = taken++ % slots;
      const buf = k & DATA ? loan.buf.subarray(slot * bs, (slot + 1) * bs) : undefined;
      const read = buf ? readBlocks(b, 1, buf) : Promise.resolve();
      read.catch(() => {}); // awaited in checkOldest
      reading.push({ b, buf, read });
    }
    while (reading.length) {
      const bad = await checkOldest();
      if (bad !== undefined) return bad;
    }
    return undefined;
  } finally {
    // The slots are the reads' until they are done.
    await Promise.all(reading.map((r) => r.read.catch(() => {})));
    loan.release();
  }
}
