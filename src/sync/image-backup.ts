/**
 * Image mode (issue 5): back up the guest-visible contents of each disk of a
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
import { execFile } from 'node:child_process';
import { stat, rm } from 'node:fs/promises';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { errnoOf, QsyncError } from '../core/errors.js';
import { blockCount, DEFAULT_BLOCK_SIZE, isValidBlockSize } from '../core/geometry.js';
import { DIGEST_LEN, hashBlocksInto, zeroDigest } from '../hash/blake3.js';
import { LocalFileSink } from '../io/local-file.js';
import { NbdClient } from '../io/nbd/client.js';
import { CONTEXT_ALLOCATION, dirtyBitmapContext } from '../io/nbd/constants.js';
import { findDrives, listBitmaps, type Drive } from '../qemu/block.js';
import { Fleece, removeLeftovers } from '../qemu/fleece.js';
import { serveImage, type ServedImage } from '../qemu/offline.js';
import { QmpClient } from '../qemu/qmp.js';
import type { SyncHooks, SyncMethod } from './events.js';
import { IntentWriter, intentPathFor, readIntent, removeIntent } from './intent.js';
import { lockDestination } from './lock.js';
import { manifestPathFor, ManifestWriter, openManifest, STATE_DIR, type Manifest } from './manifest-store.js';
import { imageStatePath, readImageState, removeImageState, writeImageState } from './image-state.js';
import { assessManifest, type Trust } from './trust.js';

const run = promisify(execFile);

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

  const lock = await lockDestination(join(dest, STATE_DIR));
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
        out.push(await backupDisk(qmp, { ...d, name }, { dest, blockSize, pct, tempDir, signal: ac.signal, hooks }));
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

interface DiskContext {
  dest: string;
  blockSize: number;
  pct: number;
  tempDir: string;
  signal: AbortSignal;
  hooks: SyncHooks;
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
      await fleece?.stop().catch((e: unknown) => errors.push(e));
      const node = drive.node;
      try {
        if (ok) {
          await writeImageState(statePath, { node, bitmap: newBitmap, baseChecksum: summary!.checksum, size: drive.size });
          if (!reason) await qmp.execute('block-dirty-bitmap-remove', { node, name: base!.name });
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

interface CopyContext extends DiskContext {
  rel: string;
  target: string;
  manifestPath: string;
  manifest: Manifest | undefined;
  trust: Trust;
  tStat: boolean;
  /** Set: full run, and why. */
  reason: string | undefined;
  frozen: string | undefined;
}

/** Per-block classification from the extent map. */
const DIRTY = 1;
const DATA = 2;

/** Blocks per window: the unit of reading ahead, hashing and manifest writing. */
const WINDOW_BYTES = 8 << 20;
/**
 * Reading ahead stops at this many NBD reads in flight or windows queued:
 * with scattered dirty blocks a window holds one read or none, so counting
 * windows alone would leave the server idle.
 */
const MAX_READS_AHEAD = 32;
const MAX_WINDOWS_AHEAD = 256;
/** NBD reads are split to this size so that one window is several requests in flight. */
const READ_REQUEST = 2 << 20;
/** Target writes in flight behind the hashing. */
const WRITE_BEHIND = 8;

async function copyDisk(fleece: Fleece, drive: Drive, c: CopyContext): Promise<DiskSummary & { checksum: string }> {
  const { blockSize: bs, hooks, rel } = c;
  const contexts = [CONTEXT_ALLOCATION, ...(c.frozen ? [dirtyBitmapContext(c.frozen)] : [])];
  const nbd = await NbdClient.connect(fleece.uri, { metaContexts: contexts });
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
      name: drive.name, node: drive.node, target: c.target, size, dirty: reason ? size : dirty,
      read: 0, written: 0, unchanged: 0, zero: 0, setupMs: 0, mapMs, elapsedMs: 0,
    };
    const readBlocks = async (first: number, count: number, buf: Buffer): Promise<void> => {
      const len = Math.min(count * bs, size - first * bs);
      await nbd.read(buf.subarray(0, len), first * bs);
      s.read += len;
    };
    const blockLen = (b: number): number => Math.min(bs, size - b * bs);

    if (!reason && c.pct > 0) {
      const bad = await verifySample(c, kind, nBlocks, blockLen, readBlocks);
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

    // A manifest not used for this run must not outlive it: it would describe the old target.
    if (!manifest) await rm(c.manifestPath, { force: true });
    const sink = await LocalFileSink.open(c.target, !c.tStat);
    const intentPath = intentPathFor(c.manifestPath);
    const intent = manifest ? await IntentWriter.create(intentPath, manifest.checksum, manifest.header.targetSize, size) : undefined;
    const writer = await ManifestWriter.create(c.manifestPath, bs, size);
    const oldSize = manifest?.header.targetSize ?? (c.tStat ? (await sink.fh.stat()).size : 0);
    const oldBlocks = blockCount(oldSize, bs);
    const unknown = c.trust.unknown;
    const unknownFrom = c.trust.unknownFrom ?? Infinity;
    const holes: [number, number][] = [];
    try {
      if (size !== oldSize) await sink.truncate(size);
      const W = Math.max(1, Math.floor(WINDOW_BYTES / bs));
      const perRequest = Math.max(1, Math.floor(READ_REQUEST / bs));
      const nWin = Math.ceil(nBlocks / W);
      /** Blocks of a window to hash: all in a full run, else dirty ones, those an interrupted run touched, and new ones. */
      const wanted = (b: number): boolean => full || (kind[b]! & DIRTY) !== 0 || b >= oldBlocks || b >= unknownFrom || !!unknown?.has(b);
      /** One window's reads: a buffer per run of blocks read (only what is read is allocated). */
      interface Fetched {
        runOf: Int32Array; // block → index into bufs/starts, -1 when not read
        bufs: Buffer[];
        starts: number[];
      }
      let readsInFlight = 0;
      const fetch = async (w: number): Promise<Fetched> => {
        const first = w * W;
        const n = Math.min(W, nBlocks - first);
        const f: Fetched = { runOf: new Int32Array(n).fill(-1), bufs: [], starts: [] };
        const jobs: Promise<void>[] = [];
        for (let i = 0; i < n; ) {
          if (!(wanted(first + i) && kind[first + i]! & DATA)) {
            i++;
            continue;
          }
          let j = i + 1;
          while (j < n && j - i < perRequest && wanted(first + j) && kind[first + j]! & DATA) j++;
          const buf = Buffer.allocUnsafe((j - i) * bs);
          f.runOf.fill(f.bufs.length, i, j);
          f.bufs.push(buf);
          f.starts.push(i);
          readsInFlight++;
          jobs.push(readBlocks(first + i, j - i, buf).finally(() => readsInFlight--));
          i = j;
        }
        await Promise.all(jobs);
        return f;
      };
      /** Bytes of blocks [i, j) of a window, all from one run. */
      const bytes = (f: Fetched, i: number, j: number): Buffer => {
        const r = f.runOf[i]!;
        return f.bufs[r]!.subarray((i - f.starts[r]!) * bs, (j - f.starts[r]!) * bs);
      };
      const ahead: Promise<Fetched>[] = [];
      let nextWin = 0;
      const prefetch = (): void => {
        while (nextWin < nWin && ahead.length < MAX_WINDOWS_AHEAD && readsInFlight < MAX_READS_AHEAD) {
          const p = fetch(nextWin++);
          p.catch(() => {}); // awaited in order below
          ahead.push(p);
        }
      };
      prefetch();
      const oldDigests = manifest ? new DigestReader(manifest, W) : undefined;
      const newDigests = Buffer.alloc(W * DIGEST_LEN);
      const targetBuf = manifest ? undefined : Buffer.alloc(W * bs);
      const writes: Promise<void>[] = [];
      let intentChain = Promise.resolve();
      for (let w = 0; w < nWin; w++) {
        check();
        if (!ahead.length) prefetch();
        const got = await ahead.shift()!;
        prefetch();
        const first = w * W;
        const n = Math.min(W, nBlocks - first);
        await oldDigests?.load(first, n);
        if (targetBuf && c.tStat) await readTarget(sink, targetBuf.subarray(0, n * bs), first * bs, oldSize);
        const changed: number[] = [];
        const changedZero: boolean[] = [];
        for (let i = 0; i < n; i++) {
          const b = first + i;
          const len = blockLen(b);
          const nd = newDigests.subarray(i * DIGEST_LEN, (i + 1) * DIGEST_LEN);
          const od = oldDigests ? oldDigests.digest(first + i) : ZERO_DIGEST;
          if (!wanted(b)) {
            od.copy(nd);
            continue;
          }
          const isData = (kind[b]! & DATA) !== 0;
          const data = isData ? bytes(got, i, i + 1).subarray(0, len) : undefined;
          if (data) hashBlocksInto(data, bs, nd);
          else zeroDigest(len).copy(nd);
          const zero = nd.equals(zeroDigest(len));
          let differs: boolean;
          if (manifest) differs = b >= oldBlocks || b >= unknownFrom || !!unknown?.has(b) || !od.equals(nd);
          else if (targetBuf && b < oldBlocks) differs = !targetBuf.subarray(i * bs, i * bs + len).equals(zero || !data ? zeroDigestBlock(len) : data);
          else differs = !zero; // new or grown area: already a hole
          if (zero) s.zero += len;
          if (!differs) {
            if (!zero) s.unchanged += len;
            continue;
          }
          changed.push(b);
          changedZero.push(zero);
        }
        // The intent must be on disk before the blocks are written, but the loop need not wait for it.
        if (intent && changed.length) {
          intentChain = intentChain.then(() => intent.add(changed));
          intentChain.catch(() => {}); // surfaces through the writes and the final wait
        }
        const recorded = intentChain;
        for (let i = 0; i < changed.length; ) {
          let j = i + 1;
          const sameRun = (k: number): boolean => changedZero[i] || got.runOf[changed[k]! - first] === got.runOf[changed[i]! - first];
          while (j < changed.length && changed[j] === changed[j - 1]! + 1 && changedZero[j] === changedZero[i] && sameRun(j)) j++;
          const off = changed[i]! * bs;
          const end = Math.min(size, changed[j - 1]! * bs + bs);
          if (changedZero[i]) holes.push([off, end - off]);
          else {
            if (writes.length >= WRITE_BEHIND) await writes.shift();
            const data = bytes(got, changed[i]! - first, changed[j - 1]! - first + 1).subarray(0, end - off);
            const p = recorded.then(() => sink.write(off, data));
            p.catch(() => {});
            writes.push(p);
            s.written += end - off;
          }
          i = j;
        }
        await writer.append(newDigests.subarray(0, n * DIGEST_LEN));
        hooks.fileProgress?.(rel, s.read, s.written);
      }
      await Promise.all([...writes, intentChain]);
      await punchHoles(sink, c.target, holes);
      await sink.commit();
      await sink.close();
    } catch (e) {
      await writer.abort();
      await intent?.close();
      await sink.close().catch(() => {});
      throw e;
    }
    await intent?.close();
    const t = await stat(c.target, { bigint: true });
    const checksum = await writer.commit({ sourceSize: size, sourceMtimeNs: 0n, targetMtimeNs: t.mtimeNs, targetIno: t.ino, targetDev: t.dev });
    await removeIntent(intentPath);
    hooks.fileEnd?.({
      path: rel, itemize: s.written || holes.length ? '>f.st......' : '.f.........', kind: 'file', size, method,
      scanned: s.read, literal: s.written, matched: s.unchanged, unchanged: !s.written && !holes.length,
    });
    return { ...s, mode: full ? 'full' : 'bitmap', method, reason, checksum: checksum.toString('hex') };
  } finally {
    await nbd.close().catch(() => {});
  }
}

const ZERO_DIGEST = Buffer.alloc(DIGEST_LEN);

/** The old manifest's digests, read sequentially in 1 MiB pieces (one read per window was the slowest part of a sparse run). */
class DigestReader {
  #buf: Buffer;
  #first = 0;
  #count = 0;
  constructor(private readonly m: Manifest, window: number) {
    this.#buf = Buffer.alloc(Math.max(window, 32768) * DIGEST_LEN);
  }

  /** Make blocks [first, first+n) available; windows come in order. */
  async load(first: number, n: number): Promise<void> {
    if (first >= this.#first && first + n <= this.#first + this.#count) return;
    this.#first = first;
    this.#count = this.#buf.length / DIGEST_LEN;
    await this.m.readDigests(first, this.#count, this.#buf);
  }

  digest(b: number): Buffer {
    const o = (b - this.#first) * DIGEST_LEN;
    return this.#buf.subarray(o, o + DIGEST_LEN);
  }
}

const zeroBlocks = new Map<number, Buffer>();
function zeroDigestBlock(len: number): Buffer {
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
  const old = Buffer.alloc(DIGEST_LEN);
  const digest = Buffer.alloc(DIGEST_LEN);
  const BATCH = 64;
  for (let i = 0; i < sample.length; i += BATCH) {
    const part = sample.slice(i, i + BATCH);
    const bufs = part.map((b) => (kind[b]! & DATA ? Buffer.allocUnsafe(c.blockSize) : undefined));
    await Promise.all(part.map((b, k) => (bufs[k] ? readBlocks(b, 1, bufs[k]!) : undefined)));
    for (let k = 0; k < part.length; k++) {
      const b = part[k]!;
      const len = blockLen(b);
      if (bufs[k]) hashBlocksInto(bufs[k]!.subarray(0, len), c.blockSize, digest);
      else zeroDigest(len).copy(digest);
      await c.manifest!.readDigests(b, 1, old);
      if (!old.equals(digest)) return b;
    }
  }
  return undefined;
}

/** Make zeroed ranges holes again (fstrim in the guest keeps the backup thin); zeros where the filesystem cannot. */
async function punchHoles(sink: LocalFileSink, path: string, holes: [number, number][]): Promise<void> {
  for (const [off, len] of holes) {
    try {
      await run('fallocate', ['--punch-hole', '--keep-size', '--offset', String(off), '--length', String(len), path]);
    } catch {
      await sink.writeZeroes(off, len);
    }
  }
}
