/**
 * The Target seam (docs/ARCHITECTURE.md "The Target"): what every driver
 * (file sync, image backup, delta apply) writes through, so that there is
 * one commit sequence and one trust rule, whatever holds the bytes.
 *
 * A target has two halves:
 * - its data: a BlockSink the engine writes changed blocks to, and a
 *   `finish` that makes them durable and in place and says which inode they
 *   are (the identity the manifest records);
 * - its state (`TargetState`): the manifest of what the data holds, the
 *   intent record that bounds an interrupted run, and the trust rule that
 *   judges both against the data as it is now.
 *
 * The one commit sequence (`commitTarget`): data durable → data in place →
 * manifest committed with the data's identity → intent removed. A kill at
 * any point leaves a manifest that is either the old one (and the intent
 * naming every block that may differ from it) or the new one; never one that
 * claims blocks the data does not hold.
 *
 * `LocalTargetState` keeps the state in qsync's state folder
 * (src/sync/state-dir.ts); `MemoryTargetState` and `MemoryTarget` keep
 * everything in memory, for the engine's tests. test/target-contract.test.ts
 * holds both to the same answers.
 */
import type { BigIntStats } from 'node:fs';
import { QsyncError } from '../core/errors.js';
import { manifestBlockCount, MANIFEST_DIGEST_LEN, type ManifestHeader } from '../core/manifest.js';
import { blockCount, blockLength } from '../core/geometry.js';
import { digestOf } from '../hash/blake3.js';
import type { LocalFileSink } from '../io/local-file.js';
import type { BlockSink, BlockSource } from '../io/types.js';
import { IntentWriter, intentPathFor, readIntent, removeIntent, type Intent } from './intent.js';
import { Fingerprinter, ManifestWriter, openManifest, type Manifest } from './manifest-store.js';
import { removeStatePath } from './state-dir.js';
import { assessManifest, type Trust } from './trust.js';

/** Which data a manifest describes: its size, mtime and inode. */
export type TargetIdentity = Pick<BigIntStats, 'size' | 'mtimeNs' | 'ino' | 'dev'>;

/** The state as judged at the start of a run. */
export interface Assessment {
  /** The manifest on record, when there is one that passes its own checks. */
  manifest: Manifest | undefined;
  trust: Trust;
}

export interface AssessOptions {
  blockSize: number;
  /** -c: take nothing on trust that an interrupted run left (trust.ts). */
  strict?: boolean;
  /** -n: write nothing, not even a pending journal. */
  readOnly?: boolean;
}

export interface BeginOptions {
  blockSize: number;
  /** Size of the data before this run (0: new). */
  oldSize: number;
  newSize: number;
  /**
   * The trusted manifest the data matches now: the intent names it, and the
   * new manifest patches it. Without one, the manifest on record is removed
   * before a byte is written: it would describe the old data.
   */
  base?: Manifest;
}

/** One run's writing: the intent before the blocks, the new manifest as they are hashed. */
export interface StateWriter {
  /** Record blocks about to be written; call before their writes are issued. */
  record(blocks: readonly number[]): Promise<void>;
  /** The new manifest's next digests, in block order; `changed`: those that differ from the base. */
  append(digests: Uint8Array, changed?: readonly number[]): Promise<void>;
  /** The fingerprint of the digests appended so far (the new manifest's, once complete). */
  readonly fingerprint: Buffer;
  /** The manifest committed for data of `id`, then the intent removed. Returns the manifest's checksum. */
  commit(id: TargetIdentity, source: { size: number; mtimeNs: bigint }): Promise<Buffer>;
  /** Give up: the new manifest is dropped, the intent stays (it bounds what was written). Idempotent. */
  abort(): Promise<void>;
}

/** A target's manifest and intent, wherever they are kept. */
export interface TargetState {
  /** Read the manifest and the intent and judge them against the data as it is (`undefined`: no data). */
  assess(data: TargetIdentity | undefined, o: AssessOptions): Promise<Assessment>;
  begin(o: BeginOptions): Promise<StateWriter>;
  /** Drop the manifest (a run that will not describe the data it leaves). */
  forget(): Promise<void>;
}

/** A target's data as the engine writes it. */
export interface TargetData {
  /** Where changed blocks go. */
  readonly sink: BlockSink;
  /**
   * After `sink.commit()`: put the data in place (metadata, rename of a
   * temporary copy) and say which data the manifest is about to describe.
   */
  finish(): Promise<TargetIdentity>;
}

/** A target's data opened for one run: the sink and `finish` of TargetData, and a reader of the old data. */
export interface OpenData extends TargetData {
  /** The data as it is (compare mode reads it when no manifest can be trusted); short only at its end. */
  readonly reader: Pick<BlockSource, 'readAt'>;
  /** The data as a file on this host, when it is one (batch deltas and history read and hash it). */
  readonly file?: LocalFileSink;
  /** Without `file`: the fingerprint of the first `size` bytes of the data as it is, hashed where it lies (a delta's base). */
  hash?(size: number, blockSize: number): Promise<Buffer>;
  close(): Promise<void>;
}

/** What a driver keeps of its own beside a target's manifest between runs (image mode: the bitmap tied to it). */
export interface TargetNote {
  node: string;
  bitmap: string;
  /** Checksum (hex) of the manifest the note is tied to. */
  baseChecksum: string;
  size: number;
}

/** One target of a destination, as a driver reaches it, wherever it is. */
export interface Target {
  /** For messages: the target's path (`host:path` when remote). */
  readonly shown: string;
  readonly state: TargetState;
  /** The data's identity now; undefined when there is no data. */
  identity(): Promise<TargetIdentity | undefined>;
  /** Open the data for this run; `create`: there is none yet, make it (owner-only). */
  open(create: boolean): Promise<OpenData>;
  readNote(): Promise<TargetNote | undefined>;
  writeNote(n: TargetNote): Promise<void>;
  dropNote(): Promise<void>;
}

/** A destination folder: locked while a run holds it; its targets are reached by name. */
export interface Destination {
  readonly shown: string;
  /** `name`: one file name below the destination (image mode's `<disk>.raw`). */
  target(name: string): Target;
  /** `name` as a qcow2 copy written through QEMU where the destination is (the drop-in's, src/sync/qcow2-target.ts qcow2In). */
  qcow2?(name: string): Target;
  close(): Promise<void>;
}

/**
 * The one commit sequence: data durable, in place, then the manifest that
 * describes it, then the intent gone. `sink` is the data's sink, or a
 * wrapper around it (deltas): its commit must reach the data's.
 */
export async function commitTarget(
  data: TargetData,
  sink: BlockSink,
  writer: StateWriter,
  source: { size: number; mtimeNs: bigint },
): Promise<Buffer> {
  await sink.commit();
  const id = await data.finish();
  return writer.commit(id, source);
}

/**
 * A local file as a target's data: `place` (metadata through the
 * descriptor, the rename of a temporary copy) runs once the blocks are
 * durable, and the identity recorded is the descriptor's inode.
 */
export function fileData(file: LocalFileSink, place?: () => Promise<void>): TargetData {
  return {
    sink: file,
    async finish() {
      await place?.();
      return file.fh.stat({ bigint: true });
    },
  };
}

/** Judge a manifest read (or not) and an intent against the data as it is now. */
async function judge(read: () => Promise<Manifest | undefined>, intent: () => Promise<Intent | undefined>, data: TargetIdentity | undefined, o: AssessOptions): Promise<Assessment> {
  if (!data) return { manifest: undefined, trust: { trusted: false } };
  let manifest: Manifest | undefined;
  try {
    manifest = await read();
    return { manifest, trust: assessManifest(manifest, await intent(), data, o.blockSize, o.strict) };
  } catch (e) {
    if (!(e instanceof QsyncError) || e.code !== 'FORMAT') {
      await manifest?.close();
      throw e;
    }
    // A manifest that fails its own checks is no manifest: compare, and write a good one.
    return { manifest, trust: { trusted: false, reason: e.message } };
  }
}

/**
 * What a new run's intent must keep of an interrupted run's on the same
 * base (one resumed, then stopped again): the blocks it may have written,
 * and its smallest size (blocks from there on are unknown), or the next run
 * would trust them although neither run rewrote them.
 */
function carriedIntent(prior: Intent | undefined, o: BeginOptions): { blocks: number[]; oldSize: number } | undefined {
  if (!prior?.blocks || !prior.sameBoot || !o.base || !prior.baseChecksum.equals(o.base.checksum)) return undefined;
  return { blocks: [...prior.blocks], oldSize: Math.min(o.oldSize, prior.oldSize, prior.newSize) };
}

/** The state in qsync's state folder: `PATH` (the manifest), `PATH.intent`, `PATH.journal`. */
export class LocalTargetState implements TargetState {
  constructor(readonly manifestPath: string) {}

  assess(data: TargetIdentity | undefined, o: AssessOptions): Promise<Assessment> {
    return judge(
      () => openManifest(this.manifestPath, { readOnly: o.readOnly }),
      () => readIntent(intentPathFor(this.manifestPath)),
      data,
      o,
    );
  }

  async begin(o: BeginOptions): Promise<StateWriter> {
    const intentPath = intentPathFor(this.manifestPath);
    if (!o.base) await removeStatePath(this.manifestPath);
    const carried = o.base && carriedIntent(await readIntent(intentPath), o);
    const intent = o.base ? await IntentWriter.create(intentPath, o.base.checksum, carried?.oldSize ?? o.oldSize, o.newSize) : undefined;
    let writer: ManifestWriter;
    try {
      if (carried?.blocks.length) await intent!.add(carried.blocks);
      writer = await ManifestWriter.create(this.manifestPath, o.blockSize, o.newSize, o.base);
    } catch (e) {
      await intent?.close();
      throw e;
    }
    let closed = false;
    const closeIntent = async (): Promise<void> => {
      if (!closed) await intent?.close();
      closed = true;
    };
    return {
      record: (blocks) => intent?.add([...blocks]) ?? Promise.resolve(),
      append: (digests, changed) => writer.append(digests, changed),
      get fingerprint() {
        return writer.fingerprint;
      },
      async commit(id, source) {
        await closeIntent();
        const checksum = await writer.commit({ sourceSize: source.size, sourceMtimeNs: source.mtimeNs, targetMtimeNs: id.mtimeNs, targetIno: id.ino, targetDev: id.dev });
        // No intent was written when the old manifest was removed first; an old one may be there (an earlier run's): it is stale now.
        await removeIntent(intentPath);
        return checksum;
      },
      async abort() {
        await writer.abort();
        await closeIntent();
      },
    };
  }

  forget(): Promise<void> {
    return removeStatePath(this.manifestPath);
  }
}

/** A manifest held in memory, with the on-disk one's answers. */
class MemoryManifest implements Manifest {
  readonly path = '(memory)';
  constructor(
    readonly header: ManifestHeader,
    readonly digests: Buffer,
    readonly fingerprint: Buffer,
    readonly checksum: Buffer,
  ) {}

  /** As the on-disk manifest reads: blocks past its end are left as they are in `out`. */
  async readDigests(first: number, count: number, out: Uint8Array): Promise<void> {
    const n = manifestBlockCount(this.header);
    if (first < 0) throw new Error(`internal: digests from ${first}`);
    out.set(this.digests.subarray(first * MANIFEST_DIGEST_LEN, Math.min(n, first + count) * MANIFEST_DIGEST_LEN));
  }

  async close(): Promise<void> {}
}

/**
 * The state kept in memory: what the local state keeps, with the same
 * rules. `journal` lists what happened, in order, for tests of the
 * sequence ('intent', 'manifest', 'intent-removed', 'forget').
 */
export class MemoryTargetState implements TargetState {
  manifest: MemoryManifest | undefined;
  intent: Intent | undefined;
  readonly journal: string[] = [];

  async assess(data: TargetIdentity | undefined, o: AssessOptions): Promise<Assessment> {
    return judge(async () => this.manifest, async () => this.intent && { ...this.intent, blocks: this.intent.blocks && new Set(this.intent.blocks) }, data, o);
  }

  async begin(o: BeginOptions): Promise<StateWriter> {
    if (!o.base) await this.forget();
    if (o.base) {
      const carried = carriedIntent(this.intent, o);
      this.intent = { baseChecksum: o.base.checksum, oldSize: carried?.oldSize ?? o.oldSize, newSize: o.newSize, sameBoot: true, blocks: new Set(carried?.blocks) };
      this.journal.push('intent');
    }
    const intent = this.intent;
    const fp = new Fingerprinter(o.blockSize, o.newSize);
    const parts: Buffer[] = [];
    let done = false;
    return {
      record: async (blocks) => {
        if (done) throw new Error('internal: record after the end of a write');
        if (o.base) for (const b of blocks) intent!.blocks!.add(b);
      },
      append: async (digests) => {
        fp.append(digests);
        parts.push(Buffer.from(digests));
      },
      get fingerprint() {
        return fp.digest();
      },
      commit: async (id, source) => {
        const digests = Buffer.concat(parts);
        const header: ManifestHeader = {
          blockSize: o.blockSize, targetSize: o.newSize, sourceSize: source.size, sourceMtimeNs: source.mtimeNs,
          targetMtimeNs: id.mtimeNs, targetIno: id.ino, targetDev: id.dev,
        };
        if (digests.length !== manifestBlockCount(header) * MANIFEST_DIGEST_LEN) throw new Error(`internal: manifest got ${digests.length / MANIFEST_DIGEST_LEN} digests`);
        const fingerprint = fp.digest();
        const checksum = digestOf(Buffer.concat([Buffer.from(JSON.stringify(header, (_k, v) => (typeof v === 'bigint' ? String(v) : v))), fingerprint]));
        this.manifest = new MemoryManifest(header, digests, fingerprint, checksum);
        this.journal.push('manifest');
        this.intent = undefined;
        this.journal.push('intent-removed');
        done = true;
        return checksum;
      },
      abort: async () => {
        done = true;
      },
    };
  }

  async forget(): Promise<void> {
    this.manifest = undefined;
    this.journal.push('forget');
  }
}

/**
 * A target held in memory: the bytes as written (what a kill leaves: the
 * page cache survives it), the bytes made durable by the last commit (what a
 * power cut leaves), and an identity whose mtime moves with every write.
 */
export class MemoryTarget implements TargetData {
  data: Buffer;
  durable: Buffer;
  readonly state = new MemoryTargetState();
  readonly ino: bigint;
  mtimeNs = 1n;
  static #next = 1n;

  constructor(initial?: Buffer) {
    this.data = Buffer.from(initial ?? Buffer.alloc(0));
    this.durable = Buffer.from(this.data);
    this.ino = MemoryTarget.#next++;
  }

  get identity(): TargetIdentity {
    return { size: BigInt(this.data.length), mtimeNs: this.mtimeNs, ino: this.ino, dev: 0n };
  }

  /** Someone else's write, behind qsync's back. */
  tamper(offset: number, bytes: Buffer): void {
    this.#write(offset, bytes);
  }

  #write(offset: number, bytes: Buffer): void {
    if (offset + bytes.length > this.data.length) {
      const grown = Buffer.alloc(offset + bytes.length);
      this.data.copy(grown);
      this.data = grown;
    }
    bytes.copy(this.data, offset);
    this.mtimeNs++;
  }

  readonly sink: BlockSink = {
    write: async (offset, data) => this.#write(offset, data),
    writeZeroes: async (offset, length) => this.#write(offset, Buffer.alloc(length)),
    truncate: async (size) => {
      const t = Buffer.alloc(size);
      this.data.copy(t, 0, 0, Math.min(size, this.data.length));
      this.data = t;
      this.mtimeNs++;
    },
    commit: async () => {
      this.durable = Buffer.from(this.data);
      this.state.journal.push('data-durable');
    },
    close: async () => {},
  };

  get reader(): Pick<BlockSource, 'readAt'> {
    return {
      readAt: async (buf, offset) => this.data.copy(buf, 0, offset, Math.min(this.data.length, offset + buf.length)),
    };
  }

  async finish(): Promise<TargetIdentity> {
    return this.identity;
  }

  /** The digests of the data as it is, block by block (what a correct manifest holds). */
  digests(blockSize: number): Buffer {
    const n = blockCount(this.data.length, blockSize);
    const out = Buffer.alloc(n * MANIFEST_DIGEST_LEN);
    for (let b = 0; b < n; b++) digestOf(this.data.subarray(b * blockSize, b * blockSize + blockLength(b, this.data.length, blockSize))).copy(out, b * MANIFEST_DIGEST_LEN);
    return out;
  }
}
