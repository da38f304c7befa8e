import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../src/io/nbd/client.js';
import { CONTEXT_ALLOCATION, dirtyBitmapContext } from '../src/io/nbd/constants.js';
import { needTools } from './helpers/env.js';
import { qemuImgCreate, qemuIo, run, startQemuNbd, tmpDir, useQsd, type QemuProcess } from './helpers/qemu.js';

type Row = [offset: number, length: number, flags: number];

/** `nbdinfo --map[=CTX]` as rows, neighbours with equal flags merged. */
function nbdinfoMap(uri: string, ctx?: string): Row[] {
  const out = run('nbdinfo', [ctx ? `--map=${ctx}` : '--map', uri]);
  return merge(out.trim().split('\n').map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number) as Row));
}

function merge(rows: Row[]): Row[] {
  const out: Row[] = [];
  for (const r of rows) {
    const last = out.at(-1);
    if (last && last[2] === r[2] && last[0] + last[1] === r[0]) last[1] += r[1];
    else out.push([...r]);
  }
  return out;
}

/** The whole export's descriptors for `ctx` through our client, following partial replies. */
async function ourMap(c: NbdClient, ctx: string): Promise<Row[]> {
  const rows: Row[] = [];
  for (let at = 0; at < c.size; ) {
    const d = (await c.blockStatus(at, Math.min(c.size - at, 2 ** 31)))!.get(ctx)!;
    for (const { length, flags } of d) {
      const len = Math.min(length, c.size - at);
      rows.push([at, len, flags]);
      at += len;
    }
  }
  return merge(rows);
}

describe.skipIf(!needTools('qemu-nbd', 'qemu-img', 'qemu-io', 'nbdinfo'))('NBD client against qemu-nbd', () => {
  let dir: string;
  let disk: string;
  let raw: Buffer;
  let nbd: QemuProcess & { uri: string };

  beforeAll(async () => {
    dir = tmpDir();
    disk = path.join(dir, 'disk.qcow2');
    qemuImgCreate(disk, '64M');
    qemuIo(disk, 'qcow2', 'write -P 0x11 1M 3M', 'write -z 8M 1M', 'write -P 0x22 20M 64k');
    run('qemu-img', ['bitmap', '--add', disk, 'bm0']);
    // Recorded by the persistent bitmap: a write inside old data, a new area, a zeroing.
    qemuIo(disk, 'qcow2', 'write -P 0x33 2M 128k', 'write -P 0x44 40M 4k', 'write -P 0x55 63M 1M', 'write -z 20M 64k');
    run('qemu-img', ['convert', '-O', 'raw', disk, path.join(dir, 'disk.raw')]);
    raw = fs.readFileSync(path.join(dir, 'disk.raw'));
    nbd = await startQemuNbd(dir, disk, ['--read-only', '--format=qcow2', '--bitmap=bm0']);
  });
  afterAll(async () => {
    await nbd?.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('negotiates size, flags, block sizes and contexts', async () => {
    const c = await NbdClient.connect(nbd.uri, { metaContexts: [CONTEXT_ALLOCATION, dirtyBitmapContext('bm0')] });
    expect(c.size).toBe(64 << 20);
    expect(c.readOnly).toBe(true);
    expect(c.structuredReplies).toBe(true);
    expect(c.blockSizes.minimum).toBeGreaterThanOrEqual(1);
    expect([...c.contexts.keys()].sort()).toEqual([CONTEXT_ALLOCATION, 'qemu:dirty-bitmap:bm0']);
    await expect(c.write(0, Buffer.alloc(512))).rejects.toMatchObject({ code: 'TARGET' });
    await c.close();
    await expect(NbdClient.connect(nbd.uri, { metaContexts: [dirtyBitmapContext('nope')] })).rejects.toMatchObject({ code: 'SOURCE' });
  });

  it('reads equal the image contents, split at the maximum request size, many in flight', async () => {
    const c = await NbdClient.connect(nbd.uri, { limits: { maxData: 1 << 20 }, maxInFlight: 8 });
    expect(c.blockSizes.maximum).toBe(1 << 20);
    const buf = Buffer.alloc(c.size, 0xff);
    await c.read(buf, 0);
    expect(buf.equals(raw)).toBe(true);
    const odd = Buffer.alloc(3 * 65536 + 512);
    expect(await c.readAt(odd, c.size - 65536)).toBe(65536);
    expect(odd.subarray(0, 65536).equals(raw.subarray(c.size - 65536))).toBe(true);
    await expect(c.read(Buffer.alloc(512), c.size)).rejects.toThrow(/outside the export/);
    await c.close();
  });

  it('matches nbdinfo --map for base:allocation and the dirty bitmap', async () => {
    const c = await NbdClient.connect(nbd.uri, { metaContexts: [CONTEXT_ALLOCATION, dirtyBitmapContext('bm0')] });
    expect(await ourMap(c, CONTEXT_ALLOCATION)).toEqual(nbdinfoMap(nbd.uri));
    const dirty = await ourMap(c, 'qemu:dirty-bitmap:bm0');
    expect(dirty).toEqual(nbdinfoMap(nbd.uri, 'qemu:dirty-bitmap:bm0'));
    expect(dirty.filter((r) => r[2] === 1).map((r) => [r[0], r[1]])).toEqual([
      [2 << 20, 128 << 10], [20 << 20, 64 << 10], [40 << 20, 64 << 10], [63 << 20, 1 << 20],
    ]);
    // extents() intersects the two contexts; its zero flags agree with the file.
    let covered = 0;
    for await (const e of c.extents(0, c.size)) {
      expect(e.offset).toBe(covered);
      covered += e.length;
      if (e.zero) expect(raw.subarray(e.offset, e.offset + e.length).every((b) => b === 0)).toBe(true);
    }
    expect(covered).toBe(c.size);
    await c.close();
  });
});

describe.skipIf(!needTools('qemu-storage-daemon', 'qemu-img', 'nbdinfo'))('NBD client writes through qemu-storage-daemon', () => {
  const fx = useQsd();
  let uri: string;

  beforeAll(async () => {
    const sock = path.join(fx.dir, 'nbd.sock');
    await fx.qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'bm0' });
    await fx.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await fx.qmp.execute('block-export-add', { type: 'nbd', id: 'exp0', 'node-name': 'disk0', writable: true, name: 'disk0', bitmaps: ['bm0'] });
    uri = `nbd+unix:///disk0?socket=${sock}`;
  });

  it('writes, zeroes, trims and flushes; the bitmap sees it as nbdinfo does', async () => {
    const c = await NbdClient.connect(uri, { metaContexts: [CONTEXT_ALLOCATION, dirtyBitmapContext('bm0')] });
    const data = Buffer.alloc(3 << 20);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE(i * 2654435761 >>> 0, i);
    await c.write(1 << 20, data);
    await c.writeZeroes(2 << 20, 64 << 10);
    await c.trim(3 << 20, 1 << 20);
    await c.write(50 << 20, Buffer.alloc(4096, 0x77));
    await c.flush();
    const back = Buffer.alloc(4 << 20);
    await c.read(back, 1 << 20);
    expect(back.subarray(0, 1 << 20).equals(data.subarray(0, 1 << 20))).toBe(true);
    expect(back.subarray(1 << 20, (1 << 20) + 65536).every((b) => b === 0)).toBe(true);
    expect(back.subarray((1 << 20) + 65536, 2 << 20).equals(data.subarray((1 << 20) + 65536, 2 << 20))).toBe(true);
    expect(await ourMap(c, 'qemu:dirty-bitmap:bm0')).toEqual(nbdinfoMap(uri, 'qemu:dirty-bitmap:bm0'));
    expect(await ourMap(c, CONTEXT_ALLOCATION)).toEqual(nbdinfoMap(uri));
    // extents() splits where either context changes: here the zeroed piece inside the dirty range.
    const dirty: Row[] = [];
    for await (const e of c.extents(0, c.size)) if (e.dirty) dirty.push([e.offset, e.length, 1]);
    expect(dirty).toHaveLength(4);
    expect(merge(dirty)).toEqual([[1 << 20, 3 << 20, 1], [50 << 20, 64 << 10, 1]]);
    await c.close();
  });
});
