/**
 * One contract, every Sources (src/sync/source.ts): this host's files
 * (LocalSources) and a peer's over the wire (RemoteSources talking to a
 * SourceServer through an in-process channel pair) must answer the walk and
 * plan scans alike: same listings and stats, same "vanished" refusals, the
 * same blocks planned with the same bytes and digests.
 */
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { blockCount } from '../src/core/geometry.js';
import { DIGEST_LEN, hashBlocksInto, zeroDigest } from '../src/hash/blake3.js';
import { HashPool } from '../src/hash/pool.js';
import { Channel } from '../src/remote/channel.js';
import { RemoteSources } from '../src/remote/remote-sources.js';
import { SourceServer } from '../src/remote/serve-sources.js';
import { Fingerprinter } from '../src/sync/manifest-store.js';
import { LocalSources, type DigestReader, type PlannedChunk, type ScanPlan, type Sources } from '../src/sync/source.js';

const BS = 64 * 1024;
const SIZE = 40 * BS + 1234;
let dir: string;
let pool: HashPool;
let data: Buffer;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'qsync-sources-'));
  pool = new HashPool(BS);
  data = randomBytes(SIZE);
  // Blocks 10..14 zero, as an image's unwritten area.
  data.fill(0, 10 * BS, 15 * BS);
  mkdirSync(join(dir, 'tree', 'sub'), { recursive: true });
  writeFileSync(join(dir, 'tree', 'disk.raw'), data);
  writeFileSync(join(dir, 'tree', 'sub', 'small'), 'hello\n');
  symlinkSync('disk.raw', join(dir, 'tree', 'link'));
  writeFileSync(join(dir, 'tree', 'empty'), '');
});
afterAll(async () => {
  await pool.close();
  rmSync(dir, { recursive: true, force: true });
});

interface Opened {
  sources: Sources;
  done(): Promise<void>;
}

const local = async (): Promise<Opened> => ({ sources: new LocalSources(pool), done: async () => {} });

/** A SourceServer on one end of two pipes, RemoteSources on the other: the wire without a remote shell. */
async function overWire(): Promise<Opened> {
  const up = new PassThrough();
  const down = new PassThrough();
  const serverSide = new Channel(up, down, { peer: 'the receiving end' });
  const clientSide = new Channel(down, up, { peer: 'the sending end' });
  const serving = new SourceServer(serverSide, pool).serve();
  return {
    sources: new RemoteSources(clientSide),
    done: async () => {
      await clientSide.send({ op: 'bye' });
      expect((await serving).op).toBe('bye');
    },
  };
}

/** Old digests of `bytes` (what a target's manifest would hold). */
function digestsOf(bytes: Buffer): DigestReader {
  const d = Buffer.alloc(blockCount(bytes.length, BS) * DIGEST_LEN);
  hashBlocksInto(bytes, BS, d);
  const fp = new Fingerprinter(BS, bytes.length);
  fp.append(d);
  return { fingerprint: fp.digest(), readDigests: async (first, n, out) => void d.copy(out, 0, first * DIGEST_LEN, (first + n) * DIGEST_LEN) };
}

/** Scan `name` of the tree with `plan`; the chunks, the bytes they write (by block) and what the source vouched for. */
async function scan(s: Sources, name: string, plan: Omit<ScanPlan, 'size' | 'blockSize'> & { size?: number }) {
  const root = await s.openOperand(join(dir, 'tree') + '/');
  await root.readdir();
  const st = await root.lstat(name);
  const f = await s.openFile(root, name, st, name);
  const chunks: PlannedChunk[] = [];
  const written = new Map<number, string>();
  const digests: Buffer[] = [];
  const fp = await f.scan({ size: Number(st.size), blockSize: BS, ...plan }, async (c) => {
    chunks.push({ ...c, digests: Buffer.from(c.digests) });
    digests.push(Buffer.from(c.digests));
    for (const r of c.runs) {
      const b = c.bytes(r);
      for (let i = 0; i < r.count; i++) written.set(r.first + i, b.subarray(i * BS, (i + 1) * BS).toString('hex').slice(0, 16) + (r.zero ? 'z' : ''));
    }
  });
  await f.close();
  await root.close();
  return { chunks, written, digests: Buffer.concat(digests), fp, changed: chunks.flatMap((c) => c.changed) };
}

function contract(name: string, open: () => Promise<Opened>): void {
  describe(`Sources contract: ${name}`, () => {
    let o: Opened;
    beforeAll(async () => {
      o = await open();
    });
    afterAll(() => o.done());

    it('stats operands (a trailing slash follows), and a missing one is ENOENT', async () => {
      expect((await o.sources.statOperand(join(dir, 'tree', 'link'))).isSymbolicLink()).toBe(true);
      expect((await o.sources.statOperand(join(dir, 'tree') + '/')).isDirectory()).toBe(true);
      await expect(o.sources.statOperand(join(dir, 'nope'))).rejects.toMatchObject({ code: 'ENOENT' });
    });

    it('lists, stats, reads links and opens folders as the file system has them', async () => {
      const root = await o.sources.openOperand(join(dir, 'tree') + '/');
      expect((await root.readdir()).sort()).toEqual(['disk.raw', 'empty', 'link', 'sub']);
      expect(Number((await root.lstat('disk.raw')).size)).toBe(SIZE);
      expect(await root.readlink('link')).toBe('disk.raw');
      const sub = await root.openDir('sub');
      expect(await sub.readdir()).toEqual(['small']);
      expect((await sub.stat()).isDirectory()).toBe(true);
      await sub.close();
      const { dir: parent, name: n } = await o.sources.openParent(join(dir, 'tree', 'sub'));
      expect(n).toBe('sub');
      await parent.close();
      await root.close();
    });

    it('a file replaced since it was listed is "vanished", never read', async () => {
      const root = await o.sources.openOperand(join(dir, 'tree') + '/');
      await root.readdir();
      writeFileSync(join(dir, 'tree', 'swap.new'), 'other');
      writeFileSync(join(dir, 'tree', 'swap'), 'first');
      const listed = await (async () => (await root.readdir(), root.lstat('swap')))();
      renameSync(join(dir, 'tree', 'swap.new'), join(dir, 'tree', 'swap'));
      await expect(o.sources.openFile(root, 'swap', listed, 'swap')).rejects.toMatchObject({ context: { vanished: true } });
      rmSync(join(dir, 'tree', 'swap'));
      await root.close();
    });

    it('rewrite: every block planned, bytes as the file holds them, zero blocks past holeFrom skipped', async () => {
      const r = await scan(o.sources, 'disk.raw', { mode: 'rewrite', oldSize: 0, holeFrom: 0 });
      const n = blockCount(SIZE, BS);
      expect(r.changed).toEqual([...Array(n).keys()].filter((b) => b < 10 || b >= 15));
      expect(r.written.get(0)).toBe(data.subarray(0, 8).toString('hex'));
      const all = Buffer.alloc(n * DIGEST_LEN);
      hashBlocksInto(data, BS, all);
      expect(r.digests.equals(all)).toBe(true);
      expect(r.chunks.reduce((a, c) => a + c.scanned, 0)).toBe(SIZE);
      expect(zeroDigest(BS).equals(all.subarray(10 * DIGEST_LEN, 11 * DIGEST_LEN))).toBe(true);
    });

    it('manifest: only blocks that differ from the old digests, suspect ones too, and the same digests as a full read', async () => {
      const old = Buffer.from(data);
      for (const b of [3, 17, 39]) old[b * BS + 5] ^= 0xff;
      const r = await scan(o.sources, 'disk.raw', { mode: 'manifest', old: digestsOf(old), oldSize: SIZE, holeFrom: blockCount(SIZE, BS), suspect: { blocks: new Set([21]), from: Infinity } });
      expect(r.changed).toEqual([3, 17, 21, 39]);
      expect(r.written.get(17)).toBe(data.subarray(17 * BS, 17 * BS + 8).toString('hex'));
      const all = Buffer.alloc(blockCount(SIZE, BS) * DIGEST_LEN);
      hashBlocksInto(data, BS, all);
      expect(r.digests.equals(all)).toBe(true);
      if (r.fp) {
        const fp = new Fingerprinter(BS, SIZE);
        fp.append(all);
        expect(r.fp.equals(fp.digest())).toBe(true);
      }
    });

    it('manifest against a shorter old target: the grown blocks are planned, zero ones past the old end are not', async () => {
      const r = await scan(o.sources, 'disk.raw', { mode: 'manifest', old: digestsOf(data.subarray(0, 8 * BS)), oldSize: 8 * BS, holeFrom: 8 });
      expect(r.changed).toEqual([...Array(blockCount(SIZE, BS)).keys()].filter((b) => b >= 8 && (b < 10 || b >= 15)));
    });

    it('an empty file scans to nothing', async () => {
      const r = await scan(o.sources, 'empty', { mode: 'rewrite', oldSize: 0, holeFrom: 0 });
      expect(r.changed).toEqual([]);
    });
  });
}

contract('this host (LocalSources)', local);
contract('a peer over the wire (RemoteSources ↔ SourceServer)', overWire);

describe('RemoteSources against a hostile peer', () => {
  it('refuses data that does not hash to the digests sent with it', async () => {
    const up = new PassThrough();
    const down = new PassThrough();
    const client = new Channel(down, up, { peer: 'the sending end' });
    const server = new Channel(up, down, { peer: 'the receiving end' });
    const sources = new RemoteSources(client);
    // A fake sending end: opens anything, then sends one forged block.
    void (async () => {
      const { encodeData } = await import('../src/core/wire.js');
      await server.expect('open-operand');
      await server.send({ op: 'ok', h: 1, path: '/x' });
      await server.expect('open-file');
      await server.send({ op: 'ok', f: 1 });
      await server.expect('scan');
      await server.send(encodeData(0, Buffer.alloc(32, 1), Buffer.alloc(BS, 2)));
    })();
    const root = await sources.openOperand('/x/');
    const st = (await new LocalSources(pool).statOperand(join(dir, 'tree', 'disk.raw')));
    const f = await sources.openFile(root, 'disk.raw', st, 'disk.raw');
    await expect(f.scan({ size: SIZE, blockSize: BS, mode: 'rewrite', oldSize: 0, holeFrom: 0 }, async () => {})).rejects.toThrow(/does not hash to the digests/);
  });
});

