/**
 * Manifests on disk: where they live, reading one with full verification
 * (streamed, flat memory), and writing a new one atomically (temp file,
 * fsync, rename, fsync dir) once the target's data is durable.
 */
import { constants } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { isQsyncError, QsyncError } from '../core/errors.js';
import { readUpTo } from '../io/local-file.js';
import { digestOf, newHasher } from '../hash/blake3.js';
import {
  decodeManifestHeader,
  encodeManifestHeader,
  fingerprintPrefix,
  manifestBlockCount,
  MANIFEST_DIGEST_LEN,
  MANIFEST_HEADER_LEN,
  MANIFEST_TRAILER_LEN,
  type ManifestHeader,
} from '../core/manifest.js';
import { encodeName, removeTreeAt } from '../io/safe-fs.js';
import {
  createStateTemp,
  doneWithTemp,
  openStateFile,
  openStateParent,
  readStateFile,
  removeStaleTemps,
  renameState,
  stateFolderFor,
  unlinkState,
  withStateParent,
  writeStateFile,
  type StateParent,
} from './state-dir.js';

/**
 * Longest file name whose state names fit in a folder entry (255 bytes):
 * `NAME.qsm.apply-digests` and a temp name `.NAME.qsm.journal.<12 hex>.tmp`
 * add at most 36 bytes to NAME.
 */
const MAX_PLAIN_NAME = 255 - 40;

/**
 * The manifest of `relPath` (a target below `destRoot`): its folders under
 * `manifests/` in the destination's state folder, its name plus `.qsm`. A name too long to carry the
 * suffixes is named by its hash instead (`~<64 hex>.qsm`); were a short name
 * ever to look the same, the manifest's target identity tells the two apart.
 * `guest`: the manifests of qcow2 copies (src/sync/qcow2-target.ts), which
 * describe the guest view, not the file's bytes, kept apart so that file
 * mode never takes one for a manifest of the file.
 */
export function manifestPathFor(destRoot: string, relPath: string, folder: 'manifests' | 'guest' = 'manifests'): string {
  const at = relPath.lastIndexOf('/');
  const name = relPath.slice(at + 1);
  const bytes = encodeName(name);
  const stored = bytes.length > MAX_PLAIN_NAME ? `~${digestOf(bytes).toString('hex')}` : name;
  return join(stateFolderFor(destRoot), folder, `${relPath.slice(0, at + 1)}${stored}.qsm`);
}

/**
 * Forget the state of a target that was deleted: its manifest, intent and
 * journal (`folder` false), or the whole manifest folder of a deleted folder.
 * Reached through the state folder by descriptor; nothing is followed.
 */
export async function forgetManifests(destRoot: string, relPath: string, folder: boolean): Promise<void> {
  if (!folder) return forgetManifestAt(manifestPathFor(destRoot, relPath));
  await withStateParent(join(stateFolderFor(destRoot), 'manifests', relPath), false, ({ dir, name }) => removeTreeAt(dir, name));
}

/** Remove a file's manifest at `path`, with its intent and patch journal. */
export async function forgetManifestAt(path: string): Promise<void> {
  await withStateParent(path, false, async ({ dir, name }) => {
    for (const n of [name, `${name}.intent`, journalName(name)]) await unlinkState(dir, n);
  });
}

export interface Manifest {
  path: string;
  header: ManifestHeader;
  /** BLAKE3 over block size, size and digests: names the content, not the file. */
  fingerprint: Buffer;
  checksum: Buffer;
  /** Copy the digests of blocks [first, first+count) into `out`. */
  readDigests(first: number, count: number, out: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

const READ_CHUNK = 1 << 20;
/** 64 KiB of digests: 4 GiB of a file at 64 KiB blocks. */
const WINDOW_BLOCKS = 2048;

async function readExactly(fh: FileHandle, buf: Buffer, position: number, file: string): Promise<void> {
  const done = await readUpTo(fh, buf, position);
  if (done < buf.length) throw new QsyncError('FORMAT', `manifest ${file} is truncated at byte ${position + done}`, { file });
}

/** The manifest's checksum: over its header and the fingerprint of its digests (docs/FORMATS.md). */
const checksumOf = (header: Buffer, fingerprint: Buffer): Buffer => digestOf(Buffer.concat([header, fingerprint]));

/**
 * Open and fully verify a manifest. Returns undefined when there is none;
 * throws QsyncError('FORMAT') when it exists but cannot be trusted, and a
 * QsyncError('IO') when its path is not a regular file of ours (docs/FORMATS.md
 * "State folder"). A pending patch journal is finished first; `readOnly`
 * (qsync verify) applies it in memory only and writes nothing.
 */
export async function openManifest(path: string, opts: { readOnly?: boolean } = {}): Promise<Manifest | undefined> {
  const ioError = (e: unknown): unknown =>
    isQsyncError(e) ? e : new QsyncError('IO', `cannot open manifest ${path}: ${(e as Error).message}`, { file: path }, { cause: e });
  const sp = await openStateParent(path, false).catch((e) => {
    throw ioError(e);
  });
  if (!sp) return undefined;
  let fh: FileHandle | undefined;
  try {
    fh = await openStateFile(sp.dir, sp.name, constants.O_RDONLY);
    const overlay = await finishJournal(sp, fh, opts.readOnly === true);
    if (!fh) return undefined;
    return await verifyManifest(fh, path, overlay);
  } catch (e) {
    await fh?.close();
    throw ioError(e);
  } finally {
    await sp.release();
  }
}

async function verifyManifest(fh: FileHandle, path: string, overlay: JournalPatch | undefined): Promise<Manifest> {
  const { size } = await fh.stat();
  const head = Buffer.alloc(MANIFEST_HEADER_LEN);
  await readExactly(fh, head, 0, path);
  overlay?.header.copy(head);
  const header = decodeManifestHeader(head, size, path);
  const count = manifestBlockCount(header);
  const fp = new Fingerprinter(header.blockSize, header.targetSize);
  const buf = Buffer.alloc(Math.min(READ_CHUNK, count * MANIFEST_DIGEST_LEN));
  for (let off = 0; off < count * MANIFEST_DIGEST_LEN; off += READ_CHUNK) {
    const part = buf.subarray(0, Math.min(READ_CHUNK, count * MANIFEST_DIGEST_LEN - off));
    await readExactly(fh, part, MANIFEST_HEADER_LEN + off, path);
    overlay?.patch(off / MANIFEST_DIGEST_LEN, part);
    fp.append(part);
  }
  const trailer = Buffer.alloc(MANIFEST_TRAILER_LEN);
  await readExactly(fh, trailer, MANIFEST_HEADER_LEN + count * MANIFEST_DIGEST_LEN, path);
  overlay?.trailer.copy(trailer);
  const fingerprint = fp.digest();
  const checksum = checksumOf(head, fingerprint);
  const win = { first: 0, count: 0, buf: Buffer.alloc(0) };
  let queue: Promise<unknown> = Promise.resolve();
  // Scans read in order: fetch a window of digests ahead, one read per WINDOW_BLOCKS blocks.
  const readWindowed = async (first: number, n: number, out: Uint8Array): Promise<void> => {
    const avail = Math.max(0, Math.min(n, count - first));
    if (avail <= 0) return;
    if (first < win.first || first + avail > win.first + win.count) {
      win.first = first;
      win.count = Math.min(Math.max(avail, WINDOW_BLOCKS), count - first);
      if (win.buf.length < win.count * MANIFEST_DIGEST_LEN) win.buf = Buffer.alloc(win.count * MANIFEST_DIGEST_LEN);
      const part = win.buf.subarray(0, win.count * MANIFEST_DIGEST_LEN);
      await readExactly(fh, part, MANIFEST_HEADER_LEN + first * MANIFEST_DIGEST_LEN, path);
      overlay?.patch(first, part);
    }
    const at = (first - win.first) * MANIFEST_DIGEST_LEN;
    out.set(win.buf.subarray(at, at + avail * MANIFEST_DIGEST_LEN));
  };
  if (!fingerprint.equals(trailer.subarray(0, 32)) || !checksum.equals(trailer.subarray(32, 64))) {
    throw new QsyncError('FORMAT', `manifest ${path} failed its checksum (corrupted)`, { file: path });
  }
  return {
    path,
    header,
    fingerprint,
    checksum,
    readDigests(first, n, out) {
      // Calls run one after another: they share the read-ahead window.
      const next = queue.then(() => readWindowed(first, n, out));
      queue = next.catch(() => undefined);
      return next;
    },
    close: () => fh.close(),
  };
}

/** The fingerprint of a target's digests, fed block by block (docs/FORMATS.md). */
export class Fingerprinter {
  private readonly h = newHasher();
  constructor(blockSize: number, targetSize: number) {
    this.h.update(fingerprintPrefix(blockSize, targetSize));
  }
  append(digests: Uint8Array): void {
    this.h.update(digests);
  }
  /** The fingerprint of what was appended so far. */
  digest(): Buffer {
    return this.h.digestBuffer();
  }
}

/** Fingerprint of an empty file: the base of a delta made for a target that did not exist. */
export const emptyFingerprint = (blockSize: number): Buffer => new Fingerprinter(blockSize, 0).digest();

/** Beyond this many changed blocks a run writes a whole new manifest instead of patching (1 MiB of digests). */
const MAX_PATCHES = 32768;

/**
 * Writes the manifest of a target as a run hashes it. Two ways:
 * - a whole new manifest, streamed to a temp file beside it, then renamed
 *   over the old one (first runs, resizes, runs that changed many blocks);
 * - with a trusted `base` of the same geometry, only the changed digests are
 *   kept (bounded) and patched into the old file at commit, with the new
 *   header and trailer, through a journal (patchInPlace): a run that changed
 *   1% of a disk writes 1% of its manifest. Too many changes switch to a
 *   whole new manifest, built from the base plus the patches so far.
 */
export class ManifestWriter {
  private readonly fp: Fingerprinter;
  /** Digests waiting to be written: READ_CHUNK at most, no more than the manifest holds (one per big file of a tree). */
  private readonly buf: Buffer;
  private fill = 0;
  private written = 0;
  private fh?: FileHandle;
  /** The temp file's name in `sp.dir`, once there is one. */
  private tmp?: string;
  /** Blocks appended so far. */
  private blocks = 0;
  private patches?: { index: number[]; digests: Buffer };
  private constructor(
    readonly path: string,
    /** The manifest's folder, held by descriptor from creation to commit. */
    private readonly sp: StateParent,
    private readonly blockSize: number,
    private readonly targetSize: number,
    private readonly base?: Manifest,
  ) {
    this.fp = new Fingerprinter(blockSize, targetSize);
    const count = Math.max(1, manifestBlockCount({ blockSize, targetSize }));
    this.buf = Buffer.alloc(Math.min(READ_CHUNK / MANIFEST_DIGEST_LEN, count) * MANIFEST_DIGEST_LEN);
    if (base) this.patches = { index: [], digests: Buffer.alloc(Math.min(MAX_PATCHES, count) * MANIFEST_DIGEST_LEN) };
  }

  static async create(path: string, blockSize: number, targetSize: number, base?: Manifest): Promise<ManifestWriter> {
    const sp = await openStateParent(path, true);
    const patchable = base && base.path === path && base.header.blockSize === blockSize && base.header.targetSize === targetSize;
    const w = new ManifestWriter(path, sp, blockSize, targetSize, patchable ? base : undefined);
    try {
      if (!patchable) await w.openTemp();
    } catch (e) {
      await sp.release();
      throw e;
    }
    return w;
  }

  private async openTemp(): Promise<void> {
    const t = await createStateTemp(this.sp.dir, this.sp.name);
    this.fh = t.fh;
    this.tmp = t.name;
  }

  /**
   * Append the next blocks' digests, in block order. `changed` lists the
   * blocks (absolute indices, ascending) whose digest differs from the base.
   */
  async append(digests: Uint8Array, changed: readonly number[] = []): Promise<void> {
    this.fp.append(digests);
    const first = this.blocks;
    this.blocks += digests.length / MANIFEST_DIGEST_LEN;
    const p = this.patches;
    if (p && p.index.length + changed.length <= MAX_PATCHES) {
      for (const b of changed) {
        p.digests.set(digests.subarray((b - first) * MANIFEST_DIGEST_LEN, (b - first + 1) * MANIFEST_DIGEST_LEN), p.index.length * MANIFEST_DIGEST_LEN);
        p.index.push(b);
      }
      return;
    }
    if (p) await this.spill(first);
    await this.appendWhole(digests);
  }

  /** Switch from patching to a whole manifest: the base's digests up to `upTo`, with the patches applied. */
  private async spill(upTo: number): Promise<void> {
    const p = this.patches!;
    this.patches = undefined;
    await this.openTemp();
    const step = READ_CHUNK / MANIFEST_DIGEST_LEN;
    const part = Buffer.alloc(Math.min(step, upTo) * MANIFEST_DIGEST_LEN);
    let k = 0;
    for (let b = 0; b < upTo; b += step) {
      const n = Math.min(step, upTo - b);
      await this.base!.readDigests(b, n, part);
      for (; k < p.index.length && p.index[k] < b + n; k++) {
        part.set(p.digests.subarray(k * MANIFEST_DIGEST_LEN, (k + 1) * MANIFEST_DIGEST_LEN), (p.index[k] - b) * MANIFEST_DIGEST_LEN);
      }
      await this.appendWhole(part.subarray(0, n * MANIFEST_DIGEST_LEN));
    }
  }

  private async appendWhole(digests: Uint8Array): Promise<void> {
    let off = 0;
    while (off < digests.length) {
      const n = Math.min(digests.length - off, this.buf.length - this.fill);
      this.buf.set(digests.subarray(off, off + n), this.fill);
      this.fill += n;
      off += n;
      if (this.fill === this.buf.length) await this.flush();
    }
  }

  private async flush(): Promise<void> {
    if (!this.fill) return;
    await this.fh!.write(this.buf, 0, this.fill, MANIFEST_HEADER_LEN + this.written);
    this.written += this.fill;
    this.fill = 0;
  }

  /**
   * Make the new manifest durable: patched in place, or renamed over the old
   * one; then drop temp files that killed runs left in its folder. Returns its checksum.
   */
  async commit(h: Omit<ManifestHeader, 'blockSize' | 'targetSize'>): Promise<Buffer> {
    const header = encodeManifestHeader({ ...h, blockSize: this.blockSize, targetSize: this.targetSize });
    const count = manifestBlockCount({ blockSize: this.blockSize, targetSize: this.targetSize });
    if (this.blocks !== count) throw new Error(`internal: manifest got ${this.blocks} digests, expected ${count}`);
    const fingerprint = this.fp.digest();
    const checksum = checksumOf(header, fingerprint);
    const trailer = Buffer.concat([fingerprint, checksum]);
    const { dir, name } = this.sp;
    try {
      if (this.patches) {
        await this.patchInPlace(header, trailer, count);
      } else {
        await this.flush();
        await this.fh!.write(header, 0, header.length, 0);
        await this.fh!.write(trailer, 0, trailer.length, MANIFEST_HEADER_LEN + this.written);
        await this.fh!.sync();
        await this.fh!.close();
        this.fh = undefined;
        await unlinkState(dir, journalName(name));
        await renameState(dir, this.tmp!, name);
        doneWithTemp(this.tmp!);
        this.tmp = undefined;
        await dir.sync();
      }
      await removeStaleTemps(dir);
    } finally {
      await this.abort();
    }
    return checksum;
  }

  /**
   * Patch through a journal: the patch (new digests, header, trailer) is
   * made durable beside the manifest first, then applied, then dropped. A
   * crash mid-apply is finished by the next openManifest (finishJournal).
   */
  private async patchInPlace(header: Buffer, trailer: Buffer, count: number): Promise<void> {
    const { index, digests } = this.patches!;
    const { dir, name } = this.sp;
    const journal = encodeJournal(index, digests, header, trailer, MANIFEST_HEADER_LEN + count * MANIFEST_DIGEST_LEN);
    await writeStateFile(dir, journalName(name), journal);
    await applyJournal(this.sp, journal);
    await unlinkState(dir, journalName(name));
  }

  /** The fingerprint of the digests appended so far: the new manifest's, once all are in. */
  get fingerprint(): Buffer {
    return this.fp.digest();
  }

  /** Drop the temp file (if any) and let go of the folder; idempotent. */
  async abort(): Promise<void> {
    await this.fh?.close().catch(() => {});
    this.fh = undefined;
    if (this.tmp) {
      await this.sp.dir.unlink(this.tmp).catch(() => {});
      doneWithTemp(this.tmp);
      this.tmp = undefined;
    }
    await this.sp.release();
  }
}

/*
 * Manifest patch journal (docs/FORMATS.md): magic, version, count, trailer
 * offset, the new header and trailer, count × (u64 block, digest), and a
 * BLAKE3 of all that. Bounded by MAX_PATCHES, so it is read whole.
 */
const JOURNAL_MAGIC = 'QSYNCJNL';
const JOURNAL_HEAD = 8 + 4 + 4 + 8 + MANIFEST_HEADER_LEN + 64;
const JOURNAL_ENTRY = 8 + MANIFEST_DIGEST_LEN;
/** The longest journal the format allows: no longer file is read. */
const JOURNAL_MAX = JOURNAL_HEAD + MAX_PATCHES * JOURNAL_ENTRY + 32;
const journalName = (manifestName: string): string => `${manifestName}.journal`;
export const journalPathFor = (manifestPath: string): string => `${manifestPath}.journal`;

export function encodeJournal(index: readonly number[], digests: Buffer, header: Buffer, trailer: Buffer, trailerAt: number): Buffer {
  const b = Buffer.alloc(JOURNAL_HEAD + index.length * JOURNAL_ENTRY + 32);
  b.write(JOURNAL_MAGIC, 0, 'latin1');
  b.writeUInt32LE(1, 8);
  b.writeUInt32LE(index.length, 12);
  b.writeBigUInt64LE(BigInt(trailerAt), 16);
  header.copy(b, 24);
  trailer.copy(b, 24 + MANIFEST_HEADER_LEN);
  index.forEach((n, i) => {
    const at = JOURNAL_HEAD + i * JOURNAL_ENTRY;
    b.writeBigUInt64LE(BigInt(n), at);
    digests.copy(b, at + 8, i * MANIFEST_DIGEST_LEN, (i + 1) * MANIFEST_DIGEST_LEN);
  });
  digestOf(b.subarray(0, b.length - 32)).copy(b, b.length - 32);
  return b;
}

/** Whether a journal is whole (written completely: its BLAKE3 checks); a torn one was never applied. */
function journalWhole(j: Buffer): boolean {
  return (
    j.length >= JOURNAL_HEAD + 32 &&
    j.toString('latin1', 0, 8) === JOURNAL_MAGIC &&
    j.readUInt32LE(8) === 1 &&
    j.readUInt32LE(12) <= MAX_PATCHES &&
    j.length === JOURNAL_HEAD + j.readUInt32LE(12) * JOURNAL_ENTRY + 32 &&
    digestOf(j.subarray(0, j.length - 32)).equals(j.subarray(j.length - 32))
  );
}

/**
 * Why a whole journal cannot be a patch of a manifest of `manifestSize`
 * bytes (undefined: it fits). Every offset it would write is checked here,
 * before anything is written: a patch never changes the manifest's length.
 */
export function journalMisfit(j: Buffer, manifestSize: number): string | undefined {
  let header: ManifestHeader;
  try {
    header = decodeManifestHeader(j.subarray(24, 24 + MANIFEST_HEADER_LEN), manifestSize);
  } catch (e) {
    return `its new header: ${(e as Error).message}`;
  }
  const count = manifestBlockCount(header);
  const trailerAt = j.readBigUInt64LE(16);
  if (trailerAt !== BigInt(MANIFEST_HEADER_LEN + count * MANIFEST_DIGEST_LEN)) return `trailer offset ${trailerAt} is not the manifest's`;
  for (let i = 0; i < j.readUInt32LE(12); i++) {
    const block = j.readBigUInt64LE(JOURNAL_HEAD + i * JOURNAL_ENTRY);
    if (block >= BigInt(count)) return `block ${block} is past the manifest's ${count} blocks`;
  }
  return undefined;
}

/** A validated journal's patch, to apply in memory (qsync verify writes nothing). */
interface JournalPatch {
  header: Buffer;
  trailer: Buffer;
  /** Overwrite the digests of blocks [first, first + part.length/32) in `part` with the journal's. */
  patch(first: number, part: Buffer): void;
}

function journalPatch(j: Buffer): JournalPatch {
  const entries: [number, Buffer][] = [];
  for (let i = 0; i < j.readUInt32LE(12); i++) {
    const at = JOURNAL_HEAD + i * JOURNAL_ENTRY;
    entries.push([Number(j.readBigUInt64LE(at)), j.subarray(at + 8, at + JOURNAL_ENTRY)]);
  }
  // Sorted, stable: a block listed twice takes its later digest, as applyJournal's writes do.
  entries.sort((a, b) => a[0] - b[0]);
  return {
    header: j.subarray(24, 24 + MANIFEST_HEADER_LEN),
    trailer: j.subarray(24 + MANIFEST_HEADER_LEN, JOURNAL_HEAD),
    patch(first, part) {
      const end = first + part.length / MANIFEST_DIGEST_LEN;
      let lo = 0;
      let hi = entries.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (entries[mid][0] < first) lo = mid + 1;
        else hi = mid;
      }
      for (let k = lo; k < entries.length && entries[k][0] < end; k++) entries[k][1].copy(part, (entries[k][0] - first) * MANIFEST_DIGEST_LEN);
    },
  };
}

/** Write a journal's patch into the manifest `sp` names and fsync it; idempotent. Offsets were checked by journalMisfit. */
async function applyJournal(sp: StateParent, j: Buffer): Promise<void> {
  const fh = await openStateFile(sp.dir, sp.name, constants.O_RDWR);
  if (!fh) throw new QsyncError('IO', `manifest ${sp.path} vanished while qsync patched it`, { file: sp.path });
  try {
    const count = j.readUInt32LE(12);
    for (let i = 0; i < count; i++) {
      const at = JOURNAL_HEAD + i * JOURNAL_ENTRY;
      await fh.write(j, at + 8, MANIFEST_DIGEST_LEN, MANIFEST_HEADER_LEN + Number(j.readBigUInt64LE(at)) * MANIFEST_DIGEST_LEN);
    }
    await fh.write(j, 24, MANIFEST_HEADER_LEN, 0);
    await fh.write(j, 24 + MANIFEST_HEADER_LEN, 64, Number(j.readBigUInt64LE(16)));
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Finish a patch a crash interrupted. A journal that is not whole was never
 * applied (it is made durable first): it is dropped and the manifest is as
 * it was. One that is whole and fits the manifest is applied again, then
 * dropped (`readOnly`: returned, to apply in memory, and kept). One that is
 * whole but does not fit was not written by qsync for this manifest: it is
 * dropped and the manifest is not trusted (FORMAT).
 */
async function finishJournal(sp: StateParent, manifest: FileHandle | undefined, readOnly: boolean): Promise<JournalPatch | undefined> {
  const jname = journalName(sp.name);
  const drop = () => (readOnly ? Promise.resolve() : unlinkState(sp.dir, jname));
  const r = await readStateFile(sp.dir, jname, JOURNAL_MAX);
  if (r === undefined) return undefined;
  const j = r.data;
  if (!manifest || r.size > JOURNAL_MAX || !journalWhole(j)) {
    await drop(); // no manifest to finish, or a torn journal: never applied
    return undefined;
  }
  const misfit = journalMisfit(j, (await manifest.stat()).size);
  if (misfit) {
    await drop();
    throw new QsyncError('FORMAT', `manifest ${sp.path} has a patch journal that does not fit it (${misfit}); the journal was dropped`, { file: sp.path });
  }
  if (readOnly) return journalPatch(j);
  await applyJournal(sp, j);
  await drop();
  return undefined;
}
