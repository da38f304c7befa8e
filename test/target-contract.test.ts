/**
 * One contract, every Target (src/sync/target.ts): a local file with its
 * state in qsync's state folder, and the in-memory target the engine's
 * tests use, must answer alike: what is trusted after a commit, what an
 * interrupted run leaves (the old manifest and exactly the blocks it
 * recorded), that no manifest outlives a run that does not describe the
 * data, and that a manifest is never committed before the data it names.
 * Then the engine itself (src/sync/engine.ts) in process: a real source
 * file scanned and planned on the hash pool, written into an in-memory
 * target.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { open, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { blockCount } from '../src/core/geometry.js';
import { DIGEST_LEN, digestOf } from '../src/hash/blake3.js';
import { HashPool } from '../src/hash/pool.js';
import { PassThrough } from 'node:stream';
import { Channel } from '../src/remote/channel.js';
import { RemoteDestination } from '../src/remote/remote-target.js';
import { TargetServer } from '../src/remote/serve-target.js';
import { LocalDestination } from '../src/sync/local-target.js';
import { qcow2Target } from '../src/sync/qcow2-target.js';
import { needTools } from './helpers/env.js';
import { qemuImgCreate, qemuIo } from './helpers/qemu.js';
import type { BlockSink } from '../src/io/types.js';
import { takeChunk } from '../src/sync/engine.js';
import { Fingerprinter, type Manifest } from '../src/sync/manifest-store.js';
import { scanAndPlan } from '../src/sync/source.js';
import type { Trust } from '../src/sync/trust.js';
import { commitTarget, MemoryTarget, type Destination, type OpenData, type Target, type TargetData, type TargetIdentity, type TargetState } from '../src/sync/target.js';

const BS = 4096;
const SIZE = 12 * BS + 100;
const SOURCE = { size: SIZE, mtimeNs: 1_700_000_000_123_456_789n };

/** What one implementation gives the contract. */
interface Subject {
  state: TargetState;
  /** The data, opened for this run. */
  open(): Promise<TargetData>;
  identity(): Promise<TargetIdentity | undefined>;
  bytes(): Promise<Buffer>;
  /** Someone else's write behind qsync's back (the data's mtime moves). */
  tamper(offset: number, bytes: Buffer): Promise<void>;
  close(): Promise<void>;
}

let root: string;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'qsync-target-'));
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

let n = 0;
/** `align`: the data's size is a multiple of it (a qcow2's virtual size is whole 512-byte sectors). */
const implementations: { name: string; align?: number; make(): Promise<Subject> }[] = [
  {
    name: 'local destination (a file reached by descriptor, its state in the state folder)',
    async make() {
      const dest = join(root, `dest${n++}`);
      const d = await LocalDestination.open(dest);
      await writeFile(join(dest, 'disk.raw'), '');
      return overTarget(d, d.target('disk.raw'), join(dest, 'disk.raw'), async () => {});
    },
  },
  {
    name: 'remote destination (a TargetServer over an in-process channel)',
    async make() {
      const dest = join(root, `dest${n++}`);
      const far = await LocalDestination.open(dest);
      await writeFile(join(dest, 'disk.raw'), '');
      const up = new PassThrough();
      const down = new PassThrough();
      const serving = new TargetServer(new Channel(up, down, { peer: 'the client' }), far).serve();
      const near = new RemoteDestination(new Channel(down, up, { peer: 'the server' }), `peer:${dest}`);
      return overTarget(near, near.target('disk.raw'), join(dest, 'disk.raw'), async () => {
        await serving;
        await far.close();
      });
    },
  },
  ...(needTools('qemu-img', 'qemu-io', 'qemu-storage-daemon') ? [{
    name: 'qcow2 image (written through QEMU\'s qcow2 driver over NBD, its state in the state folder)',
    align: 512,
    async make(): Promise<Subject> {
      const dest = join(root, `dest${n++}`);
      const d = await LocalDestination.open(dest);
      const path = join(dest, 'disk.qcow2');
      qemuImgCreate(path, '0');
      const t = qcow2Target(d, 'disk.qcow2', root);
      const over = overTarget(d, t, path, async () => {});
      let last: OpenData | undefined;
      return {
        ...over,
        // A run that stopped took its daemon with it (as a killed qsync's dies with it): the next one can open the image.
        async open() {
          await last?.close();
          last = await t.open(false);
          return last;
        },
        // The guest view, read by QEMU; -U: a stopped run's daemon may still hold the image.
        bytes: async () => {
          const raw = join(dest, 'view.raw');
          execFileSync('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', path, raw]);
          return readFile(raw);
        },
        // Someone else's guest write, through QEMU: the file's mtime moves.
        async tamper(offset, bytes) {
          await last?.close();
          writeFileSync(join(dest, 'tamper.bin'), bytes);
          qemuIo(path, 'qcow2', `write -s ${join(dest, 'tamper.bin')} ${offset} ${bytes.length}`);
          const later = Date.now() / 1000 + 5;
          utimesSync(path, later, later);
        },
        async close() {
          await last?.close();
          await over.close();
        },
      };
    },
  }] : []),
  {
    name: 'in memory',
    async make() {
      const t = new MemoryTarget();
      return {
        state: t.state,
        open: async () => t,
        identity: async () => t.identity,
        bytes: async () => Buffer.from(t.data),
        tamper: async (offset, bytes) => t.tamper(offset, bytes),
        close: async () => {},
      };
    },
  },
];

/** A production Target (local or remote) as the contract reaches it; the bytes are read and tampered with where they lie. */
function overTarget(d: Destination, t: Target, path: string, after: () => Promise<void>): Subject {
  const opened: OpenData[] = [];
  return {
    state: t.state,
    async open() {
      const data = await t.open(false);
      opened.push(data);
      return data;
    },
    identity: () => t.identity(),
    bytes: () => readFile(path),
    async tamper(offset, bytes) {
      const fh = await open(path, 'r+');
      await fh.write(bytes, 0, bytes.length, offset);
      await fh.close();
      const later = Date.now() / 1000 + 5;
      utimesSync(path, later, later);
    },
    async close() {
      for (const o of opened) await o.close();
      await d.close();
      await after();
    },
  };
}

function digestsOf(data: Buffer): Buffer {
  const out = Buffer.alloc(blockCount(data.length, BS) * DIGEST_LEN);
  for (let b = 0; b * BS < data.length; b++) digestOf(data.subarray(b * BS, (b + 1) * BS)).copy(out, b * DIGEST_LEN);
  return out;
}

function fingerprintOf(data: Buffer): Buffer {
  const fp = new Fingerprinter(BS, data.length);
  fp.append(digestsOf(data));
  return fp.digest();
}

async function manifestDigests(m: Manifest): Promise<Buffer> {
  const out = Buffer.alloc(blockCount(m.header.targetSize, BS) * DIGEST_LEN);
  await m.readDigests(0, out.length / DIGEST_LEN, out);
  return out;
}

/** Blocks of `next` that differ from `old`. */
function changedBlocks(old: Buffer, next: Buffer): number[] {
  const out: number[] = [];
  for (let b = 0; b * BS < next.length; b++) if (!old.subarray(b * BS, (b + 1) * BS).equals(next.subarray(b * BS, (b + 1) * BS))) out.push(b);
  return out;
}

interface Run {
  /** Stop after writing this many of the changed blocks: no commit (a failed or killed run). */
  stopAfter?: number;
  /** The data's own commit fails (an fsync error). */
  failDataCommit?: boolean;
  /** Blocks an interrupted run may have written (the trust verdict's `unknown`): rewritten whatever they hold, as drivers do. */
  rewrite?: Iterable<number>;
}

/** One run of a driver: record, write the changed blocks, append every digest, commit. */
async function write(s: Subject, next: Buffer, base: Manifest | undefined, run: Run = {}): Promise<void> {
  const old = await s.bytes();
  const data = await s.open();
  const w = await s.state.begin({ blockSize: BS, oldSize: old.length, newSize: next.length, base });
  const changed = base ? [...new Set([...changedBlocks(old, next), ...(run.rewrite ?? [])])].sort((a, b) => a - b) : [...Array(blockCount(next.length, BS)).keys()];
  try {
    if (next.length !== old.length) await data.sink.truncate(next.length);
    await w.record(changed);
    for (const [i, b] of changed.entries()) {
      if (run.stopAfter !== undefined && i >= run.stopAfter) throw new Error('stopped');
      await data.sink.write(b * BS, next.subarray(b * BS, (b + 1) * BS));
    }
    // The manifest's patch lists the digests that differ from the base's (an interrupted run's blocks among them).
    const digests = digestsOf(next);
    const was = base ? await manifestDigests(base) : Buffer.alloc(0);
    const differ = [...Array(blockCount(next.length, BS)).keys()].filter((b) => !digests.subarray(b * DIGEST_LEN, (b + 1) * DIGEST_LEN).equals(was.subarray(b * DIGEST_LEN, (b + 1) * DIGEST_LEN)));
    await w.append(digests, base ? differ : []);
    const sink: BlockSink = run.failDataCommit ? { ...data.sink, commit: () => Promise.reject(new Error('EIO')) } : data.sink;
    await commitTarget(data, sink, w, SOURCE);
  } catch (e) {
    await w.abort();
    throw e;
  }
}

/** Blocks a verdict leaves in doubt: those an interrupted run recorded, and all from `unknownFrom` (what drivers rewrite). */
function suspects(t: Trust): number[] {
  const from = t.unknownFrom ?? Infinity;
  return [...(t.unknown ?? []), ...[...Array(blockCount(SIZE, BS)).keys()].filter((b) => b >= from)];
}

async function assess(s: Subject, o: { strict?: boolean; blockSize?: number } = {}) {
  return s.state.assess(await s.identity(), { blockSize: o.blockSize ?? BS, strict: o.strict });
}

describe.each(implementations)('Target contract: $name', (impl) => {
  let s: Subject;
  const sized = (n: number): number => Math.ceil(n / (impl.align ?? 1)) * (impl.align ?? 1);
  const fresh = randomBytes(sized(SIZE));

  async function committed(): Promise<Manifest> {
    s = await impl.make();
    await write(s, fresh, undefined);
    const a = await assess(s);
    expect(a.trust.trusted).toBe(true);
    return a.manifest!;
  }

  /** A run to `next` on the manifest as judged now, rewriting what it leaves in doubt: trusted after, the data is `next`. */
  async function converges(next: Buffer): Promise<void> {
    const { manifest, trust } = await assess(s);
    await write(s, next, manifest, { rewrite: suspects(trust) });
    await manifest!.close();
    const after = await assess(s);
    expect(after.trust).toEqual({ trusted: true });
    expect(await s.bytes()).toEqual(next);
    await after.manifest!.close();
    await s.close();
  }

  it('nothing on record for a target that does not exist; a committed write is trusted and its manifest holds the data\'s digests', async () => {
    s = await impl.make();
    const none = await s.state.assess(undefined, { blockSize: BS });
    expect(none.trust).toEqual({ trusted: false });
    expect(none.manifest).toBeUndefined();
    await write(s, fresh, undefined);
    const { manifest, trust } = await assess(s);
    expect(trust).toEqual({ trusted: true });
    expect(await s.bytes()).toEqual(fresh);
    expect(manifest!.fingerprint).toEqual(fingerprintOf(fresh));
    expect(await manifestDigests(manifest!)).toEqual(digestsOf(fresh));
    // The quick check's facts are the source's, the identity the data's.
    expect(manifest!.header.sourceSize).toBe(SOURCE.size);
    expect(manifest!.header.sourceMtimeNs).toBe(SOURCE.mtimeNs);
    expect(manifest!.header.targetIno).toBe((await s.identity())!.ino);
    await manifest!.close();
    await s.close();
  });

  it('an update against a trusted base writes only the changed blocks and leaves a manifest of the new data', async () => {
    const base = await committed();
    const next = Buffer.from(fresh);
    randomBytes(BS).copy(next, 3 * BS);
    next.fill(7, 9 * BS, 9 * BS + 10);
    await write(s, next, base);
    await base.close();
    const { manifest, trust } = await assess(s);
    expect(trust).toEqual({ trusted: true });
    expect(await s.bytes()).toEqual(next);
    expect(await manifestDigests(manifest!)).toEqual(digestsOf(next));
    expect(manifest!.fingerprint).toEqual(fingerprintOf(next));
    await manifest!.close();
    await s.close();
  });

  it('a run stopped mid-write: the old manifest stays, distrusted exactly where the run recorded blocks', async () => {
    const base = await committed();
    const next = Buffer.from(fresh);
    for (const b of [2, 5, 11]) randomBytes(BS).copy(next, b * BS);
    await expect(write(s, next, base, { stopAfter: 1 })).rejects.toThrow('stopped');
    await base.close();
    const { manifest, trust } = await assess(s);
    expect(trust.trusted).toBe(true);
    expect([...trust.unknown!].sort((a, b) => a - b)).toEqual([2, 5, 11]);
    expect(trust.reason).toMatch(/interrupted/);
    expect(manifest!.fingerprint).toEqual(fingerprintOf(fresh));
    // -c takes nothing an interrupted run left on trust.
    const strict = await assess(s, { strict: true });
    expect(strict.trust.trusted).toBe(false);
    await strict.manifest?.close();
    await manifest!.close();
    // The next run, against that base as judged last, converges.
    await converges(next);
  });

  it('a resumed run stopped again: what both runs may have written stays distrusted, and the rest matches the data', async () => {
    const base = await committed();
    const next = Buffer.from(fresh);
    for (const b of [2, 5, 11]) randomBytes(BS).copy(next, b * BS);
    await expect(write(s, next, base, { stopAfter: 1 })).rejects.toThrow('stopped');
    await base.close();
    const first = await assess(s);
    // The second run changes block 7 and would rewrite 2, 5 and 11 after it, but stops before writing any.
    const other = await s.bytes();
    randomBytes(BS).copy(other, 7 * BS);
    await expect(write(s, other, first.manifest, { stopAfter: 0 })).rejects.toThrow('stopped');
    await first.manifest!.close();
    const { manifest, trust } = await assess(s);
    expect(trust.trusted).toBe(true);
    expect([...trust.unknown!].sort((a, b) => a - b)).toEqual([2, 5, 7, 11]);
    // Every block the manifest still vouches for holds what it says (block 2 holds the first run's write).
    const data = await s.bytes();
    const digests = await manifestDigests(manifest!);
    for (let b = 0; b < blockCount(data.length, BS); b++) {
      if (trust.unknown!.has(b)) continue;
      expect(digestOf(data.subarray(b * BS, (b + 1) * BS)).equals(digests.subarray(b * DIGEST_LEN, (b + 1) * DIGEST_LEN))).toBe(true);
    }
    await manifest!.close();
    await converges(next);
  });

  it('a run without a trusted base forgets the old manifest before it writes: stopped, nothing is on record', async () => {
    const base = await committed();
    await base.close();
    const next = randomBytes(sized(SIZE));
    await expect(write(s, next, undefined, { stopAfter: 4 })).rejects.toThrow('stopped');
    const { manifest, trust } = await assess(s);
    expect(manifest).toBeUndefined();
    expect(trust.trusted).toBe(false);
    await s.close();
  });

  it('no manifest is committed when the data cannot be made durable', async () => {
    const base = await committed();
    const next = Buffer.from(fresh);
    randomBytes(BS).copy(next, 6 * BS);
    await expect(write(s, next, base, { failDataCommit: true })).rejects.toThrow('EIO');
    await base.close();
    const { manifest, trust } = await assess(s);
    // The old manifest, vouching for nothing the run recorded.
    expect(manifest!.fingerprint).toEqual(fingerprintOf(fresh));
    expect(trust.unknown?.has(6)).toBe(true);
    await manifest!.close();
    await s.close();
  });

  it('data changed behind qsync\'s back, or another block size: the manifest is not trusted, and says why', async () => {
    const base = await committed();
    await base.close();
    const other = await assess(s, { blockSize: BS * 2 });
    expect(other.trust.trusted).toBe(false);
    expect(other.trust.reason).toMatch(/block size/);
    await other.manifest?.close();
    await s.tamper(BS, Buffer.from('someone else'));
    const { manifest, trust } = await assess(s);
    expect(trust.trusted).toBe(false);
    expect(trust.reason).toMatch(/changed since the last run/);
    await manifest?.close();
    await s.close();
  });

  it('digests read past the manifest\'s end are left as they were (a grown disk\'s run reads its last piece whole)', async () => {
    const base = await committed();
    const n = blockCount(SIZE, BS);
    const out = Buffer.alloc(4 * DIGEST_LEN, 0xee);
    await base.readDigests(n - 2, 4, out);
    expect(out.subarray(0, 2 * DIGEST_LEN)).toEqual(digestsOf(fresh).subarray((n - 2) * DIGEST_LEN));
    expect(out.subarray(2 * DIGEST_LEN)).toEqual(Buffer.alloc(2 * DIGEST_LEN, 0xee));
    await base.readDigests(n + 5, 2, out);
    await base.close();
    await s.close();
  });

  it('a resize: grown and shrunk targets are described to their new length', async () => {
    const base = await committed();
    const grown = Buffer.concat([fresh, randomBytes(3 * BS)]);
    await write(s, grown, base);
    await base.close();
    let a = await assess(s);
    expect(a.trust).toEqual({ trusted: true });
    expect(a.manifest!.fingerprint).toEqual(fingerprintOf(grown));
    const shrunk = grown.subarray(0, sized(5 * BS + 1));
    await write(s, shrunk, a.manifest);
    await a.manifest!.close();
    a = await assess(s);
    expect(a.trust).toEqual({ trusted: true });
    expect(await s.bytes()).toEqual(shrunk);
    expect(a.manifest!.fingerprint).toEqual(fingerprintOf(shrunk));
    await a.manifest!.close();
    await s.close();
  });
});

describe('the engine in process: a real source file into an in-memory target', () => {
  let pool: HashPool;
  let srcPath: string;
  beforeAll(() => {
    pool = new HashPool(BS);
    srcPath = join(root, 'engine-source');
  });
  afterAll(() => pool.close());

  /** One file-mode run: scan and plan the source against what the target's state vouches for, take the chunks, commit. */
  async function sync(t: MemoryTarget, src: Buffer): Promise<number> {
    writeFileSync(srcPath, src);
    const { manifest, trust } = await t.state.assess(t.data.length || t.state.manifest ? t.identity : undefined, { blockSize: BS });
    const base = trust.trusted ? manifest : undefined;
    const w = await t.state.begin({ blockSize: BS, oldSize: t.data.length, newSize: src.length, base });
    let literal = 0;
    const fh = await open(srcPath, 'r');
    try {
      if (src.length !== t.data.length) await t.sink.truncate(src.length);
      await scanAndPlan(pool, fh.fd, srcPath, { size: src.length, blockSize: BS, mode: base ? 'manifest' : 'rewrite', old: base, oldSize: t.data.length, holeFrom: Infinity }, async (c) => {
        literal += await takeChunk(c, { sink: t.sink, writer: w, blockSize: BS, size: src.length, sparse: false });
      });
      await commitTarget(t, t.sink, w, { size: src.length, mtimeNs: 1n });
    } finally {
      await fh.close();
    }
    return literal;
  }

  it('a first copy, then an update that writes only the changed blocks, each committed data first, then manifest, then intent', async () => {
    const t = new MemoryTarget();
    const src = randomBytes(40 * BS + 17);
    expect(await sync(t, src)).toBe(src.length);
    expect(t.durable).toEqual(src);
    const next = Buffer.from(src);
    for (const b of [0, 13, 40]) next[b * BS] ^= 0xff;
    const literal = await sync(t, next);
    expect(literal).toBe(2 * BS + 17);
    expect(t.durable).toEqual(next);
    expect(t.state.manifest!.fingerprint).toEqual(fingerprintOf(next));
    expect(t.state.journal).toEqual(['forget', 'data-durable', 'manifest', 'intent-removed', 'intent', 'data-durable', 'manifest', 'intent-removed']);
    // Unchanged: nothing written.
    expect(await sync(t, next)).toBe(0);
  });
});
