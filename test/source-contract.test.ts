/**
 * One contract, every BlockSource: a local file and an NBD export (qemu-nbd)
 * of the same bytes must answer reads alike, at the edges too.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../src/io/nbd/client.js';
import { LocalFileSource } from '../src/io/local-file.js';
import type { BlockSource } from '../src/io/types.js';
import { needTools } from './helpers/env.js';
import { startQemuNbd, tmpDir, type QemuProcess } from './helpers/qemu.js';

const MiB = 1 << 20;
// Past qemu-nbd's 32 MiB request limit, not 64 KiB-aligned; 512-aligned, as QEMU rounds a raw image's size up to sectors.
const SIZE = 40 * MiB + 25 * 512;
const data = randomBytes(SIZE);

interface Opened {
  source: BlockSource;
  done(): Promise<void>;
}

function contract(name: string, open: (file: string) => Promise<Opened>, skip = false): void {
  describe.skipIf(skip)(`BlockSource contract: ${name}`, () => {
    let dir: string;
    let o: Opened;
    beforeAll(async () => {
      dir = tmpDir('qsync-contract-');
      const file = path.join(dir, 'data.raw');
      fs.writeFileSync(file, data);
      o = await open(file);
    });
    afterAll(async () => {
      await o?.done();
      fs.rmSync(dir, { recursive: true, force: true });
    });

    it('reports the size', () => {
      expect(o.source.size).toBe(SIZE);
    });

    it('fills a buffer from the middle, larger than one NBD request', async () => {
      const buf = Buffer.alloc(36 * MiB);
      expect(await o.source.readAt(buf, 3 * MiB + 7)).toBe(buf.length);
      expect(buf.equals(data.subarray(3 * MiB + 7, 3 * MiB + 7 + buf.length))).toBe(true);
    });

    it('returns fewer bytes only at the end, and 0 at or past it', async () => {
      const buf = Buffer.alloc(64 * 1024);
      const from = SIZE - 1000;
      expect(await o.source.readAt(buf, from)).toBe(1000);
      expect(buf.subarray(0, 1000).equals(data.subarray(from))).toBe(true);
      expect(await o.source.readAt(buf, SIZE)).toBe(0);
    });

    it('answers many reads in flight, each with its own bytes', async () => {
      const offsets = Array.from({ length: 64 }, (_, i) => (i * 619 * 1024 + i) % (SIZE - 65536));
      const bufs = offsets.map(() => Buffer.alloc(65536));
      await Promise.all(offsets.map((off, i) => o.source.readAt(bufs[i], off)));
      offsets.forEach((off, i) => expect(bufs[i].equals(data.subarray(off, off + 65536))).toBe(true));
    });
  });
}

contract('local file', async (file) => {
  const source = await LocalFileSource.open(file);
  return { source, done: () => source.close() };
});

let nbd: QemuProcess | undefined;
contract(
  'NBD export (qemu-nbd, raw, read-only)',
  async (file) => {
    const p = await startQemuNbd(path.dirname(file), file, ['--format=raw', '--read-only']);
    nbd = p;
    const source = await NbdClient.connect(p.uri);
    return {
      source,
      async done() {
        await source.close();
        await nbd?.kill();
      },
    };
  },
  !needTools('qemu-nbd'),
);
