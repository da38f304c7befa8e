/**
 * A hostile or broken peer of a remote Target (docs/FORMATS.md "Target"):
 * the far side (src/remote/serve-target.ts) must never commit a manifest
 * that describes a written block otherwise than as it was written, nor
 * launder a manifest it does not trust, nor grow without bound; the near
 * side (src/remote/remote-target.ts) must refuse a malformed answer with a
 * protocol error, not a crash. Each peer here is a raw channel that sends
 * exactly the frames under test. Last, a real `qsync --server` killed with
 * SIGKILL at points of a write: what it leaves never vouches for a block
 * that does not hold what it says, and the next run converges.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { execFileSync, spawn } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { QsyncError } from '../src/core/errors.js';
import { encodeData, encodeDigests, encodeZero, type ControlMessage } from '../src/core/wire.js';
import { DIGEST_LEN, digestOf } from '../src/hash/blake3.js';
import { Channel } from '../src/remote/channel.js';
import { RemoteDestination } from '../src/remote/remote-target.js';
import { checkHello, hello } from '../src/remote/session.js';
import { TargetServer } from '../src/remote/serve-target.js';
import { IntentWriter, MAX_INTENT_BLOCKS } from '../src/sync/intent.js';
import { LocalDestination } from '../src/sync/local-target.js';
import { commitTarget, LocalTargetState } from '../src/sync/target.js';
import { parseArgv } from '../src/cli/args.js';
import { receive, runSync, type CliIO } from '../src/cli/run-sync.js';
import { createPrinter } from '../src/cli/output.js';
import { HashPool } from '../src/hash/pool.js';
import { LocalSources } from '../src/sync/source.js';
import type { FileSyncContext } from '../src/sync/file-sync.js';
import { Fingerprinter } from '../src/sync/manifest-store.js';
import { openRunDeltas } from '../src/sync/run-deltas.js';
import { openDelta, readDeltaFile, verifyDeltaFile } from '../src/io/delta-file.js';
import { QSYNC, runQsync } from './helpers/cli.js';

const BS = 4096;
const NAME = 'disk.raw';

let root: string;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'qsync-target-hostile-'));
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

let n = 0;

function digestsOf(data: Buffer): Buffer {
  const out = Buffer.alloc(Math.ceil(data.length / BS) * DIGEST_LEN);
  for (let b = 0; b * BS < data.length; b++) digestOf(data.subarray(b * BS, (b + 1) * BS)).copy(out, b * DIGEST_LEN);
  return out;
}

/** A TargetServer on a fresh DEST (keeping a history with `history`), and the raw channel a hostile client speaks on. */
async function session(dest = join(root, `d${n++}`), history?: FileSyncContext['wrapSink']) {
  const far = await LocalDestination.open(dest);
  const up = new PassThrough();
  const down = new PassThrough();
  const serving = new TargetServer(new Channel(up, down, { peer: 'the client' }), far, history).serve().finally(() => far.close());
  serving.catch(() => {});
  const ch = new Channel(down, up, { peer: 'the server' });
  const ask = async (m: ControlMessage, reply: string) => {
    await ch.send({ name: NAME, ...m });
    return ch.expect(reply);
  };
  return { dest, ch, serving, ask };
}

/** What the destination's state vouches for now (a fresh local look, after the session let go of the lock). */
async function onRecord(dest: string) {
  const d = await LocalDestination.open(dest);
  try {
    const t = d.target(NAME);
    const { manifest, trust } = await t.state.assess(await t.identity(), { blockSize: BS });
    const digests = manifest && Buffer.alloc(Math.ceil(manifest.header.targetSize / BS) * DIGEST_LEN);
    if (manifest) await manifest.readDigests(0, digests!.length / DIGEST_LEN, digests!);
    await manifest?.close();
    return { manifest: manifest && { checksum: manifest.checksum.toString('hex'), digests }, trust };
  } finally {
    await d.close();
  }
}

/** A DEST whose target holds `data` with a trusted manifest of it (a local run's commit). */
async function committed(data: Buffer): Promise<string> {
  const dest = join(root, `d${n++}`);
  const d = await LocalDestination.open(dest);
  try {
    const t = d.target(NAME);
    const o = await t.open(true);
    const w = await t.state.begin({ blockSize: BS, oldSize: 0, newSize: data.length });
    await o.sink.truncate(data.length);
    await w.record([]);
    await o.sink.write(0, data);
    await w.append(digestsOf(data));
    await commitTarget(o, o.sink, w, { size: data.length, mtimeNs: 1n });
    await o.close();
  } finally {
    await d.close();
  }
  return dest;
}

/** A client that opens the target of `dest` and begins a write of `size` bytes (on the assessed manifest when `base`). */
async function begun(dest: string, size: number, base: boolean) {
  const s = await session(dest);
  const a = await s.ask({ op: 't-assess', blockSize: BS }, 't-assessed');
  await s.ask({ op: 't-open', create: !existsSync(join(dest, NAME)) }, 't-opened');
  await s.ask({ op: 't-begin', blockSize: BS, oldSize: size, newSize: size, base: base ? (a.manifest as { checksum: string }).checksum : null }, 't-begun');
  return s;
}

describe('the far side of a remote target refuses what a hostile client sends', () => {
  it('names that are not one component of the destination end the session; nothing is made', async () => {
    for (const name of ['../escape', 'a/b', '..', '.', '']) {
      const { dest, ch, serving } = await session();
      await ch.send({ op: 't-open', name, create: true });
      await expect(serving).rejects.toThrow(/not a name in the destination/);
      expect(readdirSync(dest)).toEqual([]);
    }
    expect(existsSync(join(root, 'escape'))).toBe(false);
  });

  it('a symlink or a FIFO as the target in DEST is neither followed nor opened: the client hears why, nothing outside changes', async () => {
    const outside = join(root, `victim${n++}`);
    writeFileSync(outside, 'precious');
    for (const make of [(p: string) => symlinkSync(outside, p), (p: string) => execFileSync('mkfifo', [p])]) {
      const dest = join(root, `d${n++}`);
      mkdirSync(dest);
      make(join(dest, NAME));
      const s = await session(dest);
      await s.ch.send({ op: 't-stat', name: NAME });
      await expect(s.ch.expect('t-id')).rejects.toThrow(/not a regular file/);
      await s.ch.send({ op: 't-open', name: NAME, create: false });
      await expect(s.ch.expect('t-opened')).rejects.toThrow(/symlink|not a regular file/);
      await s.ch.send({ op: 't-open', name: NAME, create: true });
      await expect(s.ch.expect('t-opened')).rejects.toThrow(/exists|symlink|EEXIST/i);
      await s.ch.send({ op: 'bye' });
      await s.serving;
    }
    expect(readFileSync(outside, 'utf8')).toBe('precious');
  });

  it('a block that does not match its digest ends the session before it is written; a base that is not on record is refused', async () => {
    const { dest, ch, serving } = await session();
    await ch.send({ op: 't-open', name: 'disk.raw', create: true });
    await ch.expect('t-opened');
    await ch.send({ op: 't-begin', name: 'disk.raw', blockSize: BS, oldSize: 0, newSize: 2 * BS, base: 'ab'.repeat(32) });
    await expect(serving).rejects.toThrow(/not the manifest on record/);
    const s2 = await session();
    await s2.ch.send({ op: 't-open', name: 'disk.raw', create: true });
    await s2.ch.expect('t-opened');
    await s2.ch.send({ op: 't-begin', name: 'disk.raw', blockSize: BS, oldSize: 0, newSize: 2 * BS, base: null });
    await s2.ch.expect('t-begun');
    await s2.ch.send({ op: 't-truncate', size: 2 * BS });
    const block = randomBytes(BS);
    await s2.ch.send(encodeData(0, digestOf(randomBytes(BS)), block));
    await expect(s2.serving).rejects.toThrow(/do not match their digests/);
    expect(readFileSync(join(s2.dest, 'disk.raw')).equals(Buffer.alloc(2 * BS))).toBe(true);
    expect(readdirSync(dest)).toEqual(['disk.raw']);
  });
});

describe('t-hash, and a history kept by the far side (--backup-dir to host:DEST)', () => {
  const fingerprintOf = (data: Buffer) => {
    const fp = new Fingerprinter(BS, data.length);
    fp.append(digestsOf(data));
    return fp.digest().toString('hex');
  };

  it('t-hash answers the data as it was; once a block reached it, t-hash ends the session', async () => {
    const dest = join(root, `d${n++}`);
    mkdirSync(dest);
    const old = randomBytes(3 * BS);
    writeFileSync(join(dest, NAME), old);
    const s = await session(dest);
    await s.ask({ op: 't-open', create: false }, 't-opened');
    expect((await s.ask({ op: 't-hash', blockSize: BS }, 't-hashed')).fp).toBe(fingerprintOf(old));
    await s.ask({ op: 't-begin', blockSize: BS, oldSize: 3 * BS, newSize: 3 * BS, base: null }, 't-begun');
    const block = randomBytes(BS);
    await s.ch.send(encodeData(0, digestsOf(block), block));
    await s.ch.send({ op: 't-hash', name: NAME, blockSize: BS });
    await expect(s.serving).rejects.toThrow(/after its data was written/);
  });

  it('t-sync before every manifest digest came is refused; the history still holds the old content of what was written', async () => {
    const dest = join(root, `d${n++}`);
    const hist = join(root, `h${n++}`);
    mkdirSync(dest);
    const old = randomBytes(3 * BS);
    writeFileSync(join(dest, NAME), old);
    const deltas = await openRunDeltas({ backupDir: hist, compress: false }, Date.now());
    const s = await session(dest, deltas.wrapSink);
    await s.ask({ op: 't-open', create: false }, 't-opened');
    await s.ask({ op: 't-begin', blockSize: BS, oldSize: 3 * BS, newSize: 3 * BS, base: null }, 't-begun');
    const block = randomBytes(BS);
    await s.ch.send(encodeData(BS, digestsOf(block), block));
    await s.ch.send({ op: 't-sync' });
    await expect(s.serving).rejects.toThrow(/before every manifest digest came/);
    await deltas.finish(false);
    const files = readdirSync(hist).filter((f) => f.endsWith('.qdelta'));
    expect(files.length).toBe(1);
    const [member] = await verifyDeltaFile(join(hist, files[0]!));
    // Ended as a crash's member is salvaged: no base (the data was left half-written), one record (block 1's old
    // content), and no result (no manifest vouched for the state before, so the member names none).
    expect(member!.records).toBe(1);
    expect(member!.header.baseFingerprint.equals(Buffer.alloc(DIGEST_LEN))).toBe(true);
    expect(member!.header.resultFingerprint.equals(Buffer.alloc(DIGEST_LEN))).toBe(true);
    expect(member!.header.baseSize).toBe(3 * BS);
    const fh = await openDelta(join(hist, files[0]!));
    try {
      const records = [];
      for await (const ev of readDeltaFile(fh, files[0]!)) if (ev.type === 'record') records.push(ev);
      expect(records.map((r) => r.record.index)).toEqual([1]);
      expect(records[0]!.content?.equals(old.subarray(BS, 2 * BS))).toBe(true);
    } finally {
      await fh.close();
    }
    expect(readFileSync(join(dest, NAME)).subarray(BS, 2 * BS).equals(block)).toBe(true);
  });
});

describe('the far side never commits a manifest that describes written blocks otherwise than as written', () => {
  it('blocks whose digests are right, then a t-append that claims other digests for them: refused, nothing committed', async () => {
    const s = await begun(join(root, `d${n++}`), 2 * BS, false);
    const data = randomBytes(2 * BS);
    await s.ch.send({ op: 't-truncate', size: 2 * BS });
    await s.ch.send(encodeData(0, digestsOf(data), data));
    await s.ch.send({ op: 't-append', changed: [] });
    await s.ch.send(encodeDigests(0, digestsOf(randomBytes(2 * BS))));
    await s.ch.send({ op: 't-sync' });
    await expect(s.serving).rejects.toThrow(/block 0 is described by another digest than the one written/);
    expect((await onRecord(s.dest)).manifest).toBeUndefined();
  });

  it('a block written but left out of a patch\'s changed blocks: refused, the old manifest stays', async () => {
    const old = randomBytes(4 * BS);
    const dest = await committed(old);
    const before = await onRecord(dest);
    const s = await begun(dest, 4 * BS, true);
    const block = randomBytes(BS);
    await s.ch.send({ op: 't-record', blocks: [2] });
    await s.ch.send(encodeData(2 * BS, digestOf(block), block));
    await s.ch.send({ op: 't-patch', count: 4, changed: [] });
    await s.ch.send({ op: 't-sync' });
    await expect(s.serving).rejects.toThrow(/block 2 is described by another digest/);
    const after = await onRecord(dest);
    expect(after.manifest).toEqual(before.manifest);
    // The intent names the block written: the old manifest is trusted everywhere else.
    expect([...(after.trust.unknown ?? [])]).toEqual([2]);
  });

  it('a t-append within the base whose changed list leaves out a block that differs: the manifest still holds the digest sent', async () => {
    const old = randomBytes(3 * BS);
    const dest = await committed(old);
    const s = await begun(dest, 3 * BS, true);
    const next = Buffer.from(old);
    randomBytes(BS).copy(next, BS);
    await s.ch.send({ op: 't-record', blocks: [1] });
    await s.ch.send(encodeData(BS, digestOf(next.subarray(BS, 2 * BS)), next.subarray(BS, 2 * BS)));
    // The client says nothing changed; the far side works out itself which digests differ from the base.
    await s.ch.send({ op: 't-append', changed: [] });
    await s.ch.send(encodeDigests(0, digestsOf(next)));
    await s.ask({ op: 't-sync' }, 't-synced');
    await s.ask({ op: 't-finish' }, 't-finished');
    await s.ask({ op: 't-commit', source: { size: next.length, mtimeNs: '1' } }, 't-committed');
    await s.ch.send({ op: 'bye' });
    await s.serving;
    const after = await onRecord(dest);
    expect(after.trust.trusted).toBe(true);
    expect(after.manifest!.digests).toEqual(digestsOf(next));
  });

  it('a block written after its digest, written twice, or after t-sync; zeros off block boundaries: each refused', async () => {
    const cases: { what: RegExp; send: (ch: Channel, data: Buffer) => Promise<void> }[] = [
      {
        what: /block 0 written after its manifest digest/,
        async send(ch, data) {
          await ch.send({ op: 't-append', changed: [] });
          await ch.send(encodeDigests(0, digestsOf(data)));
          await ch.send(encodeData(0, digestsOf(data.subarray(0, BS)), data.subarray(0, BS)));
        },
      },
      {
        // Zeros are punched at t-sync: a write after them in the same run would be undone.
        what: /block 1 written twice/,
        async send(ch, data) {
          await ch.send(encodeZero(BS, BS));
          await ch.send(encodeData(BS, digestsOf(data.subarray(BS, 2 * BS)), data.subarray(BS, 2 * BS)));
        },
      },
      {
        what: /sent after "t-sync"/,
        async send(ch, data) {
          await ch.send(encodeData(0, digestsOf(data), data));
          await ch.send({ op: 't-append', changed: [] });
          await ch.send(encodeDigests(0, digestsOf(data)));
          await ch.send({ op: 't-sync' });
          await ch.expect('t-synced');
          await ch.send(encodeData(0, digestsOf(data.subarray(0, BS)), data.subarray(0, BS)));
        },
      },
      {
        what: /zeros outside the target/,
        async send(ch) {
          await ch.send(encodeZero(100, BS));
        },
      },
    ];
    for (const c of cases) {
      const s = await begun(join(root, `d${n++}`), 2 * BS, false);
      await s.ch.send({ op: 't-truncate', size: 2 * BS });
      await c.send(s.ch, randomBytes(2 * BS)).catch(() => {});
      await expect(s.serving).rejects.toThrow(c.what);
      expect((await onRecord(s.dest)).manifest).toBeUndefined();
    }
  });

  it('more digests than the target has blocks, or a commit with too few: refused before anything grows or is committed', async () => {
    const s = await begun(join(root, `d${n++}`), 2 * BS, false);
    await s.ch.send({ op: 't-append', changed: [] });
    await s.ch.send(encodeDigests(0, Buffer.alloc(3 * DIGEST_LEN)));
    await expect(s.serving).rejects.toThrow(/past the target's 2 blocks/);
    const s2 = await begun(join(root, `d${n++}`), 2 * BS, false);
    await s2.ch.send({ op: 't-truncate', size: 2 * BS });
    await s2.ask({ op: 't-sync' }, 't-synced');
    await s2.ask({ op: 't-finish' }, 't-finished');
    await s2.ch.send({ op: 't-commit', source: { size: 2 * BS, mtimeNs: '1' } });
    await expect(s2.serving).rejects.toThrow(/"t-commit" with 0 of the manifest's 2 digests/);
    expect((await onRecord(s2.dest)).manifest).toBeUndefined();
  });

  it('a manifest the far side does not trust cannot be named as a base, and blocks an interrupted run left must be written again', async () => {
    // The data changed behind qsync's back: the manifest is on record but not trusted.
    const dest = await committed(randomBytes(2 * BS));
    const fh = await open(join(dest, NAME), 'r+');
    await fh.write(randomBytes(10), 0, 10, 5);
    await fh.close();
    const later = Date.now() / 1000 + 5;
    utimesSync(join(dest, NAME), later, later);
    const s = await session(dest);
    const a = await s.ask({ op: 't-assess', blockSize: BS }, 't-assessed');
    expect((a.trust as { trusted: boolean }).trusted).toBe(false);
    await s.ask({ op: 't-open', create: false }, 't-opened');
    await s.ch.send({ name: NAME, op: 't-begin', blockSize: BS, oldSize: 2 * BS, newSize: 2 * BS, base: (a.manifest as { checksum: string }).checksum });
    await expect(s.serving).rejects.toThrow(/a base this side does not trust/);

    // A run that recorded block 1 and stopped: trusted but for block 1, which must be rewritten.
    const dest2 = await committed(randomBytes(3 * BS));
    const d = await LocalDestination.open(dest2);
    const t = d.target(NAME);
    const { manifest } = await t.state.assess(await t.identity(), { blockSize: BS });
    const w = await t.state.begin({ blockSize: BS, oldSize: 3 * BS, newSize: 3 * BS, base: manifest });
    await w.record([1]);
    await w.abort();
    await manifest!.close();
    await d.close();
    const s2 = await begun(dest2, 3 * BS, true);
    await s2.ch.send({ op: 't-patch', count: 3, changed: [] });
    await s2.ch.send({ op: 't-sync' });
    await expect(s2.serving).rejects.toThrow(/block 1, which an interrupted run may have written, is described without being written again/);
    expect([...((await onRecord(dest2)).trust.unknown ?? [])]).toEqual([1]);
  });

  it('t-assess of the target being written (its base would be closed under the write): refused', async () => {
    const dest = await committed(randomBytes(2 * BS));
    const s = await begun(dest, 2 * BS, true);
    await s.ch.send({ name: NAME, op: 't-assess', blockSize: BS });
    await expect(s.serving).rejects.toThrow(/while it is written/);
  });
});

describe('the near side of a remote target', () => {
  it('a target opened again after a committed write, then closed unwritten, is let go there (the next open is not refused)', async () => {
    const dest = join(root, `d${n++}`);
    const far = await LocalDestination.open(dest);
    const up = new PassThrough();
    const down = new PassThrough();
    const serving = new TargetServer(new Channel(up, down, { peer: 'the client' }), far).serve().finally(() => far.close());
    const d = new RemoteDestination(new Channel(down, up, { peer: 'the server' }), `peer:${dest}`);
    const t = d.target(NAME);
    const data = await t.open(true);
    const w = await t.state.begin({ blockSize: BS, oldSize: 0, newSize: BS });
    const block = randomBytes(BS);
    await data.sink.truncate(BS);
    await w.record([0]);
    await data.sink.write(0, block);
    await w.append(digestOf(block));
    await commitTarget(data, data.sink, w, { size: BS, mtimeNs: 1n });
    await data.close();
    // A later run that gives up before it begins.
    await (await t.open(false)).close();
    const again = await t.open(false);
    await again.close();
    await d.close();
    await serving;
  });
});

describe('the far side stays bounded', () => {
  it('t-assess of many names without a manifest keeps nothing for them', async () => {
    const far = await LocalDestination.open(join(root, `d${n++}`));
    const up = new PassThrough();
    const down = new PassThrough();
    const server = new TargetServer(new Channel(up, down, { peer: 'the client' }), far);
    const serving = server.serve().finally(() => far.close());
    const ch = new Channel(down, up, { peer: 'the server' });
    for (let i = 0; i < 200; i++) {
      await ch.send({ op: 't-assess', name: `n${i}-${'x'.repeat(200)}`, blockSize: BS });
      await ch.expect('t-assessed');
    }
    expect((server as unknown as { verdicts: Map<string, unknown> }).verdicts.size).toBe(0);
    await ch.send({ op: 'bye' });
    await serving;
  });

  it('an intent flooded with t-record grows no further than "too many to list"', async () => {
    const dir = join(root, `intent${n++}`);
    mkdirSync(dir);
    const path = join(dir, 'x.intent');
    const w = await IntentWriter.create(path, Buffer.alloc(32), 0, 1 << 30);
    const batch = Array.from({ length: 1 << 16 }, (_, i) => i);
    for (let i = 0; i * batch.length <= MAX_INTENT_BLOCKS; i++) await w.add(batch);
    const full = statSync(path).size;
    for (let i = 0; i < 8; i++) await w.add(batch);
    await w.close();
    expect(statSync(path).size).toBe(full);
  });
});

describe('qsync --server --restrict: DEST is reached below DIR without following a symlink', () => {
  it('a folder on the way swapped for a symlink after the path was checked leads nowhere else', async () => {
    const top = join(root, `restrict${n++}`);
    const outside = join(root, `outside${n++}`);
    mkdirSync(top);
    mkdirSync(outside);
    // What the race leaves: restrictedPath saw a folder, then `a` became a symlink out of DIR.
    symlinkSync(outside, join(top, 'a'));
    await expect(LocalDestination.open(join(top, 'a', 'dest'), { within: top })).rejects.toThrow(/symlink on the way is refused/);
    expect(readdirSync(outside)).toEqual([]);
    // A plain path below DIR is made and used.
    const d = await LocalDestination.open(join(top, 'b', 'c'), { within: top });
    await d.close();
    expect(statSync(join(top, 'b', 'c')).isDirectory()).toBe(true);
    await expect(LocalDestination.open(join(root, 'elsewhere'), { within: top })).rejects.toThrow(/is not inside/);
  });

  it('a push (role receiver) into DEST whose folder was swapped for a symlink: nothing is made or written outside DIR', async () => {
    const top = join(root, `restrict${n++}`);
    const outside = join(root, `outside${n++}`);
    const src = join(root, `psrc${n++}`);
    for (const d of [top, outside, src]) mkdirSync(d);
    writeFileSync(join(src, 'f'), randomBytes(3 * BS));
    symlinkSync(outside, join(top, 'a'));
    const parsed = parseArgv(['-a', `${src}/`, 'x/']);
    if (parsed.kind !== 'sync') throw new Error('not a sync');
    const io = { stdout: { write: () => true }, stderr: { write: () => true }, isTTY: false, version: 'test' } as unknown as CliIO;
    const pool = new HashPool(parsed.options.blockSize);
    try {
      // DEST missing: it would be made through the symlink. DEST there: it would be opened through it.
      for (const existing of [false, true]) {
        if (existing) mkdirSync(join(outside, 'dest'));
        const got = await receive(createPrinter(parsed.options, io), new LocalSources(pool), [`${src}/`], `${join(top, 'a', 'dest')}/`, parsed.options, { within: top }).catch((e: unknown) => e);
        expect(got, existing ? 'opened through the symlink' : 'made through the symlink').toBeInstanceOf(QsyncError);
        expect(readdirSync(outside)).toEqual(existing ? ['dest'] : []);
        if (existing) expect(readdirSync(join(outside, 'dest'))).toEqual([]);
      }
    } finally {
      await pool.close();
    }
  });
});

describe('the near side refuses a broken server\'s answers with a protocol error', () => {
  /** A server that answers each request with the next of `answers` (a message, or frames as they are). */
  function scripted(answers: (ControlMessage | Buffer)[]) {
    const up = new PassThrough();
    const down = new PassThrough();
    const server = new Channel(up, down, { peer: 'the client' });
    void (async () => {
      for (const a of answers) {
        if (Buffer.isBuffer(a)) down.write(a);
        else {
          await server.next();
          await server.send(a);
        }
      }
    })().catch(() => {});
    return new RemoteDestination(new Channel(down, up, { peer: 'the server' }), 'peer:/x');
  }

  it('an identity that is not numbers, reads of the wrong length or with a wrong digest: refused, nothing is taken', async () => {
    const isProtocol = (e: unknown) => {
      expect(e).toBeInstanceOf(QsyncError);
      expect((e as QsyncError).code).toBe('PROTOCOL');
    };
    isProtocol(await scripted([{ op: 't-id', id: { size: '1e9', mtimeNs: '1', ino: '1', dev: '1' } }]).target(NAME).identity().catch((e: unknown) => e));
    isProtocol(await scripted([{ op: 't-id', id: 7 }]).target(NAME).identity().catch((e: unknown) => e));
    const bytes = randomBytes(100);
    const reads: [string, (ControlMessage | Buffer)[]][] = [
      ['longer than asked', [{ op: 't-read', n: 200 }]],
      ['shorter data than said', [{ op: 't-read', n: 100 }, Buffer.concat([encodeData(0, digestOf(bytes.subarray(0, 50)), bytes.subarray(0, 50))])]],
      ['a wrong digest', [{ op: 't-read', n: 100 }, Buffer.concat([encodeData(0, digestOf(randomBytes(100)), bytes)])]],
      ['another offset', [{ op: 't-read', n: 100 }, Buffer.concat([encodeData(4096, digestOf(bytes), bytes)])]],
    ];
    for (const [what, answers] of reads) {
      const t = scripted([{ op: 't-opened' }, ...answers]).target(NAME);
      const data = await t.open(false);
      const buf = Buffer.alloc(100);
      const e = await data.reader.readAt(buf, 0).catch((x: unknown) => x);
      isProtocol(e);
      expect(buf.equals(Buffer.alloc(100)), what).toBe(true);
    }
  });

  const cases: [string, ControlMessage][] = [
    ['a verdict whose unknown blocks are not a list', { op: 't-assessed', trust: { trusted: true, unknown: 'all' } }],
    ['a manifest without a header', { op: 't-assessed', trust: { trusted: true }, manifest: { fingerprint: 'ab'.repeat(32), checksum: 'ab'.repeat(32) } }],
    ['a manifest of block size 0', { op: 't-assessed', trust: { trusted: true }, manifest: { header: { blockSize: 0, targetSize: 1, sourceSize: 1, sourceMtimeNs: '1', targetMtimeNs: '1', targetIno: '1', targetDev: '1' }, fingerprint: 'ab'.repeat(32), checksum: 'ab'.repeat(32) } }],
    ['a manifest that is a number', { op: 't-assessed', trust: { trusted: true }, manifest: 5 }],
  ];
  it('digests past the manifest\'s blocks: refused before the cache grows', async () => {
    const up = new PassThrough();
    const down = new PassThrough();
    const server = new Channel(up, down, { peer: 'the client' });
    const d = new RemoteDestination(new Channel(down, up, { peer: 'the server' }), 'peer:/x');
    const header = { blockSize: BS, targetSize: 2 * BS, sourceSize: 1, sourceMtimeNs: '1', targetMtimeNs: '1', targetIno: '1', targetDev: '1' };
    void (async () => {
      await server.control();
      await server.send({ op: 't-assessed', trust: { trusted: true }, manifest: { header, fingerprint: 'ab'.repeat(32), checksum: 'ab'.repeat(32) } });
      await server.control();
      // A stream that never ends: far more than the two digests asked for.
      for (let i = 0; i < 64; i++) await server.send(encodeDigests(i * 1024, Buffer.alloc(1024 * DIGEST_LEN)));
    })().catch(() => {});
    const { manifest } = await d.target(NAME).state.assess(undefined, { blockSize: BS });
    const e = await manifest!.readDigests(0, 2, Buffer.alloc(2 * DIGEST_LEN)).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(QsyncError);
    expect((e as Error).message).toMatch(/more digests than the manifest's 2/);
    await manifest!.close();
    await d.close();
  });

  for (const [what, answer] of cases) {
    it(what, async () => {
      const d = scripted([answer]);
      const e = await d.target(NAME).state.assess(undefined, { blockSize: BS }).catch((x: unknown) => x);
      expect(e).toBeInstanceOf(QsyncError);
      expect((e as QsyncError).code).toBe('PROTOCOL');
    });
  }
});

describe('kill -9 of a real qsync --server at points of a write: the next run converges and verify passes', () => {
  const SIZE = 40 * BS + 123;

  /** `qsync --server` (the built CLI) holding `dest`, driven from here through a RemoteDestination. */
  async function server(dest: string) {
    const child = spawn(process.execPath, [QSYNC, '--server'], { stdio: ['pipe', 'pipe', 'inherit'] });
    const ch = new Channel(child.stdout, child.stdin, { peer: 'the server' });
    await ch.send(hello('target', { dest }));
    checkHello(await ch.control(), 'the server');
    const gone = new Promise<void>((resolve) => child.on('exit', () => resolve()));
    return { d: new RemoteDestination(ch, `peer:${dest}`), child, gone };
  }

  /**
   * One image-mode-like run to `next` on what the far side vouches for:
   * the doubtful and changed blocks recorded and written, then the digests
   * (patched within the base), then the one commit sequence. At `stop`
   * the server is killed, once it has taken every frame sent (a t-stat is
   * answered after them), and the run goes no further.
   */
  async function run(dest: string, next: Buffer, stop?: 'written' | 'synced' | 'finished') {
    const { d, child, gone } = await server(dest);
    try {
      const t = d.target(NAME);
      const id = await t.identity();
      const { manifest, trust } = await t.state.assess(id, { blockSize: BS });
      const base = trust.trusted ? manifest : undefined;
      const old = id ? readFileSync(join(dest, NAME)) : Buffer.alloc(0);
      const data = await t.open(!id);
      const w = await t.state.begin({ blockSize: BS, oldSize: old.length, newSize: next.length, base });
      if (old.length !== next.length) await data.sink.truncate(next.length);
      const nb = Math.ceil(next.length / BS);
      const doubt = (b: number) => !base || trust.unknown?.has(b) || b >= (trust.unknownFrom ?? Infinity);
      const digests = digestsOf(next);
      const was = base ? Buffer.alloc(nb * DIGEST_LEN) : undefined;
      if (was) await base!.readDigests(0, nb, was);
      const differs = (b: number) => !was || !was.subarray(b * DIGEST_LEN, (b + 1) * DIGEST_LEN).equals(digests.subarray(b * DIGEST_LEN, (b + 1) * DIGEST_LEN));
      const blocks = [...Array(nb).keys()].filter((b) => doubt(b) || differs(b));
      await w.record(blocks);
      for (const b of blocks) await data.sink.write(b * BS, next.subarray(b * BS, (b + 1) * BS));
      const kill = async () => {
        await t.identity();
        child.kill('SIGKILL');
        await gone;
      };
      if (stop === 'written') return await kill();
      await w.append(digests, [...Array(nb).keys()].filter((b) => was && differs(b)));
      await data.sink.commit();
      if (stop === 'synced') return await kill();
      const placed = await data.finish();
      if (stop === 'finished') return await kill();
      await w.commit(placed, { size: next.length, mtimeNs: 1n });
      await manifest?.close();
      await d.close();
      child.stdin.end();
      await gone;
    } finally {
      child.kill('SIGKILL');
      await gone;
    }
  }

  it('killed with blocks written, after t-sync, after t-finish: the manifest never lies, and the next run converges', async () => {
    for (const at of ['written', 'synced', 'finished'] as const) {
      const dest = join(root, `kill${n++}`);
      const first = randomBytes(SIZE);
      await run(dest, first);
      const next = Buffer.from(first);
      for (const b of [1, 17, 40]) randomBytes(BS).copy(next, b * BS);
      await run(dest, next, at);
      // What is on record vouches only for blocks that hold what it says.
      const { manifest, trust } = await onRecord(dest);
      if (trust.trusted) {
        const data = readFileSync(join(dest, NAME));
        for (let b = 0; b < Math.ceil(data.length / BS); b++) {
          if (trust.unknown?.has(b) || b >= (trust.unknownFrom ?? Infinity)) continue;
          expect(digestOf(data.subarray(b * BS, (b + 1) * BS)).equals(manifest!.digests!.subarray(b * DIGEST_LEN, (b + 1) * DIGEST_LEN)), `${at}: block ${b}`).toBe(true);
        }
      }
      await run(dest, next);
      expect(readFileSync(join(dest, NAME)).equals(next)).toBe(true);
      expect((await onRecord(dest)).trust).toEqual({ trusted: true });
      const v = await runQsync(['verify', join(dest, NAME)]);
      expect(v.code, v.stderr).toBe(0);
    }
  });
});

describe('file sync: a state that cannot begin leaves nothing behind', () => {
  /** What this process holds open below `dir` (qsync's state folders, cached, lie elsewhere). */
  const openBelow = (dir: string): string[] =>
    readdirSync('/proc/self/fd').flatMap((f) => {
      try {
        const to = readlinkSync(`/proc/self/fd/${f}`);
        return to.startsWith(`${dir}/`) ? [to] : [];
      } catch {
        return [];
      }
    });

  it('no temp file in DEST and no descriptor left open when the manifest writer cannot start', async () => {
    const src = join(root, `fsrc${n++}`);
    const dest = join(root, `fdest${n++}`);
    mkdirSync(src);
    mkdirSync(dest);
    // Above the small-file threshold (256 KiB): a file with a manifest of its own.
    writeFileSync(join(src, 'f'), randomBytes(300 * 1024));
    const spy = vi.spyOn(LocalTargetState.prototype, 'begin').mockRejectedValue(new QsyncError('IO', 'injected: the state folder is gone'));
    try {
      const parsed = parseArgv(['-a', `${src}/`, `${dest}/`]);
      if (parsed.kind !== 'sync') throw new Error('not a sync');
      const err: string[] = [];
      const io = { stdout: { write: () => true }, stderr: { write: (s: string) => err.push(s) } } as unknown as CliIO;
      expect(await runSync(parsed.sources, parsed.dest, parsed.options, io)).not.toBe(0);
      expect(err.join('')).toMatch(/injected/);
    } finally {
      spy.mockRestore();
    }
    expect(readdirSync(dest)).toEqual([]);
    expect([...openBelow(src), ...openBelow(dest)]).toEqual([]);
  });
});
