import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { NbdClient, NbdError } from '../src/io/nbd/client.js';
import * as K from '../src/io/nbd/constants.js';
import { NbdParser, type NbdParserHandler } from '../src/io/nbd/parser.js';
import { parseNbdUri } from '../src/io/nbd/uri.js';

/** Records every handler call as a line; data pieces are joined per handle. */
function recorder(readLen = 0) {
  const log: string[] = [];
  const data = new Map<number, Buffer[]>();
  const h: NbdParserHandler = {
    greeting: (f) => log.push(`greeting ${f}`),
    optionReply: (o, t, d) => log.push(`opt ${o} ${t} ${d.toString('hex')}`),
    simpleReply: (handle, err) => (readLen && !err ? { offset: 100, length: readLen } : undefined),
    simpleDone: (handle, err) => log.push(`simple ${handle} ${err} ${Buffer.concat(data.get(handle) ?? []).toString('hex')}`),
    data: (handle, off, piece) => {
      if (!data.has(handle)) log.push(`data ${handle} @${off}`);
      data.set(handle, [...(data.get(handle) ?? []), Buffer.from(piece)]);
    },
    chunk: (handle, flags, type, p) =>
      log.push(`chunk ${handle} ${flags} ${type} ${p.toString('hex')} ${Buffer.concat(data.get(handle) ?? []).toString('hex')}`),
  };
  return { h, log };
}

const greeting = (): Buffer => {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(K.NBDMAGIC, 0);
  b.writeBigUInt64BE(K.IHAVEOPT, 8);
  b.writeUInt16BE(3, 16);
  return b;
};
const optReply = (opt: number, type: number, data: Buffer): Buffer => {
  const b = Buffer.alloc(20);
  b.writeBigUInt64BE(K.OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(opt, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(data.length, 16);
  return Buffer.concat([b, data]);
};
const chunk = (handle: number, flags: number, type: number, payload: Buffer, len = payload.length): Buffer => {
  const b = Buffer.alloc(20);
  b.writeUInt32BE(K.STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(handle, 12);
  b.writeUInt32BE(len, 16);
  return Buffer.concat([b, payload]);
};
const simple = (handle: number, err: number, data = Buffer.alloc(0)): Buffer => {
  const b = Buffer.alloc(16);
  b.writeUInt32BE(K.SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(err, 4);
  b.writeUInt32BE(handle, 12);
  return Buffer.concat([b, data]);
};
const offsetData = (off: number, data: Buffer): Buffer => {
  const o = Buffer.alloc(8);
  o.writeBigUInt64BE(BigInt(off));
  return Buffer.concat([o, data]);
};

/** Handshake then transmission: the parser must be switched in between, as the client does after NBD_OPT_GO. */
function feed(parts: Buffer[], split: number[], readLen = 0) {
  const { h, log } = recorder(readLen);
  const p = new NbdParser(h, { maxData: 1024, maxChunk: 256, maxOptionReply: 64 });
  const origOpt = h.optionReply;
  h.optionReply = (o, t, d) => {
    origOpt(o, t, d);
    if (o === K.OPT_GO && t === K.REP_ACK) p.enterTransmission();
  };
  const all = Buffer.concat(parts);
  let at = 0;
  for (const s of [...split, all.length]) {
    p.write(all.subarray(at, s));
    at = s;
  }
  return log;
}

describe('NBD parser', () => {
  const stream = [
    greeting(),
    optReply(K.OPT_STRUCTURED_REPLY, K.REP_ACK, Buffer.alloc(0)),
    optReply(K.OPT_GO, K.REP_INFO, Buffer.from('0003000000010000100000100000', 'hex')),
    optReply(K.OPT_GO, K.REP_ACK, Buffer.alloc(0)),
    chunk(1, 0, K.REPLY_TYPE_OFFSET_DATA, offsetData(4096, Buffer.from('abcdef'))),
    chunk(2, 0, K.REPLY_TYPE_BLOCK_STATUS, Buffer.from('00000001000010000000000300001000', 'hex')),
    chunk(1, 0, K.REPLY_TYPE_OFFSET_HOLE, Buffer.from('0000000000001006000000fa', 'hex')),
    chunk(2, K.REPLY_FLAG_DONE, K.REPLY_TYPE_NONE, Buffer.alloc(0)),
    chunk(1, K.REPLY_FLAG_DONE, K.REPLY_TYPE_ERROR, Buffer.from('000000050002686d', 'hex')),
    simple(3, 0),
  ];
  const whole = feed(stream, []);

  it('parses a whole stream', () => {
    expect(whole).toEqual([
      'greeting 3',
      `opt ${K.OPT_STRUCTURED_REPLY} 1 `,
      `opt ${K.OPT_GO} 3 0003000000010000100000100000`,
      `opt ${K.OPT_GO} 1 `,
      'data 1 @4096',
      'chunk 1 0 1  616263646566',
      'chunk 2 0 5 00000001000010000000000300001000 ',
      'chunk 1 0 2 0000000000001006000000fa 616263646566',
      'chunk 2 1 0  ',
      'chunk 1 1 32769 000000050002686d 616263646566',
      'simple 3 0 ',
    ]);
  });

  it('gives the same result split at every byte, and byte by byte', () => {
    const len = Buffer.concat(stream).length;
    for (let i = 1; i < len; i++) expect(feed(stream, [i])).toEqual(whole);
    expect(feed(stream, Array.from({ length: len }, (_, i) => i))).toEqual(whole);
  });

  it('tells the transport where READ data begins: a reply header is read no further', () => {
    const p = new NbdParser(recorder().h);
    p.write(Buffer.concat([greeting(), optReply(K.OPT_GO, K.REP_ACK, Buffer.alloc(0))]));
    expect(p.headerRemaining()).toBeUndefined(); // negotiating: read freely
    p.enterTransmission();
    const reply = chunk(1, K.REPLY_FLAG_DONE, K.REPLY_TYPE_OFFSET_DATA, offsetData(4096, Buffer.from('abcdef')));
    // Byte by byte through the 28 header bytes, the rest of them each time; then the data is streamed.
    for (let i = 0; i < 28; i++) {
      expect(p.headerRemaining()).toBe(28 - i);
      p.write(reply.subarray(i, i + 1));
    }
    expect(p.headerRemaining()).toBeUndefined();
    expect(p.streaming()).toEqual({ handle: 1, offset: 4096, remaining: 6 });
    p.write(reply.subarray(28));
    expect(p.headerRemaining()).toBe(28);
    // Another kind of chunk: its payload is no READ data, read freely once its type is known.
    p.write(chunk(2, 0, K.REPLY_TYPE_BLOCK_STATUS, Buffer.alloc(12)).subarray(0, 16));
    expect(p.headerRemaining()).toBeUndefined();
  });

  it('streams simple-reply READ data of the length the handler names', () => {
    const s = [greeting(), optReply(K.OPT_GO, K.REP_ACK, Buffer.alloc(0)), simple(7, 0, Buffer.from('0102030405', 'hex')), simple(8, 5)];
    const want = ['data 7 @100', 'simple 7 0 0102030405', 'simple 8 5 '];
    expect(feed(s, [], 5).slice(2)).toEqual(want);
    expect(feed(s, [40, 55, 57], 5).slice(2)).toEqual(want);
  });

  it('refuses wrong magics', () => {
    const g = greeting();
    g[0] = 0;
    expect(() => feed([g], [])).toThrow(/NBDMAGIC/);
    const o = optReply(1, 1, Buffer.alloc(0));
    o[3] ^= 1;
    expect(() => feed([greeting(), o], [])).toThrow(/option reply magic/);
    const go = optReply(K.OPT_GO, K.REP_ACK, Buffer.alloc(0));
    expect(() => feed([greeting(), go, Buffer.from('deadbeef000000000000000000000000', 'hex')], [])).toThrow(/reply magic 0xdeadbeef/);
  });

  it('checks lengths before buffering anything', () => {
    const go = [greeting(), optReply(K.OPT_GO, K.REP_ACK, Buffer.alloc(0))];
    // Header only: the huge length is refused without its payload being waited for.
    expect(() => feed([greeting(), optReply(1, 1, Buffer.alloc(0)).subarray(0, 16), Buffer.from('ffffffff', 'hex')], [])).toThrow(/exceeds/);
    expect(() => feed([...go, chunk(1, 0, K.REPLY_TYPE_BLOCK_STATUS, Buffer.alloc(0), 0xffffffff)], [])).toThrow(/exceeds 256/);
    expect(() => feed([...go, chunk(1, 0, K.REPLY_TYPE_OFFSET_DATA, Buffer.alloc(0), 2000)], [])).toThrow(/exceeds 1024/);
    expect(() => feed([...go, chunk(1, 0, K.REPLY_TYPE_OFFSET_DATA, Buffer.alloc(8), 8)], [])).toThrow(/no data/);
    const hugeOff = Buffer.alloc(9, 0xff);
    expect(() => feed([...go, chunk(1, 0, K.REPLY_TYPE_OFFSET_DATA, hugeOff)], [])).toThrow(/out of range/);
    expect(() => feed([...go, simple(1, 0, Buffer.alloc(2000))], [], 2000)).toThrow(/exceeds/);
  });

  it('reports nothing for a truncated message and refuses input after an error', () => {
    const { h, log } = recorder();
    const p = new NbdParser(h);
    p.write(greeting().subarray(0, 17));
    expect(log).toEqual([]);
    const bad = Buffer.alloc(18);
    const p2 = new NbdParser(h);
    expect(() => p2.write(bad)).toThrow();
    expect(() => p2.write(greeting())).toThrow(/after an error/);
  });
});

describe('NBD URIs', () => {
  it('parses qemu/libnbd forms', () => {
    expect(parseNbdUri('nbd://example.org/disk0')).toEqual({ connect: { host: 'example.org', port: 10809 }, exportName: 'disk0' });
    expect(parseNbdUri('nbd://[::1]:10810/a%20b')).toEqual({ connect: { host: '::1', port: 10810 }, exportName: 'a b' });
    expect(parseNbdUri('nbd+unix:///snap?socket=/run/n.sock')).toEqual({ connect: { path: '/run/n.sock' }, exportName: 'snap' });
    expect(parseNbdUri('nbd+unix://?socket=/s')).toEqual({ connect: { path: '/s' }, exportName: '' });
    expect(() => parseNbdUri('nbd+unix:///x')).toThrow(/socket/);
    expect(() => parseNbdUri('nbds://h/x')).toThrow(/not supported/);
  });
});

/**
 * A scripted server: enough handshake for the client, then block status
 * replies that describe only 64 KiB at a time, and an error chunk for READ at 0.
 */
async function withFakeServer(fn: (uri: string) => Promise<void>): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsync-nbd-'));
  const sock = path.join(dir, 'fake.sock');
  const server = net.createServer((c) => {
    // The client may hang up while a split reply is still being written (a test that got its answer).
    c.on('error', () => {});
    c.write(greeting());
    let buf = Buffer.alloc(0);
    let flagsRead = false;
    let inTransmission = false;
    c.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      if (!flagsRead && buf.length >= 4) {
        expect(buf.readUInt32BE(0)).toBe(K.FLAG_FIXED_NEWSTYLE | K.FLAG_NO_ZEROES);
        buf = buf.subarray(4);
        flagsRead = true;
      }
      while (!inTransmission && buf.length >= 16) {
        const opt = buf.readUInt32BE(8);
        const len = buf.readUInt32BE(12);
        if (buf.length < 16 + len) return;
        buf = buf.subarray(16 + len);
        if (opt === K.OPT_SET_META_CONTEXT) c.write(optReply(opt, K.REP_META_CONTEXT, Buffer.concat([Buffer.from('00000007', 'hex'), Buffer.from('base:allocation')])));
        if (opt === K.OPT_GO) {
          c.write(optReply(opt, K.REP_INFO, Buffer.from('0000' + '0000000000100000' + '0003', 'hex')));
          inTransmission = true;
        }
        c.write(optReply(opt, K.REP_ACK, Buffer.alloc(0)));
      }
      while (inTransmission && buf.length >= 28) {
        const type = buf.readUInt16BE(6);
        const handle = buf.readUInt32BE(12);
        const offset = Number(buf.readBigUInt64BE(16));
        const length = buf.readUInt32BE(24);
        buf = buf.subarray(28);
        if (type === K.CMD_BLOCK_STATUS) {
          const desc = Buffer.alloc(12);
          desc.writeUInt32BE(7, 0);
          desc.writeUInt32BE(Math.min(length, 65536), 4);
          desc.writeUInt32BE(offset % (4 * 65536) === 0 ? 0 : K.STATE_HOLE | K.STATE_ZERO, 8);
          c.write(chunk(handle, K.REPLY_FLAG_DONE, K.REPLY_TYPE_BLOCK_STATUS, desc));
        } else if (type === K.CMD_READ && offset === 0) {
          c.write(chunk(handle, K.REPLY_FLAG_DONE, K.REPLY_TYPE_ERROR, Buffer.concat([Buffer.from('000000050004', 'hex'), Buffer.from('oops')])));
        } else if (type === K.CMD_READ && offset === 4096) {
          c.write(chunk(handle + 1000, K.REPLY_FLAG_DONE, K.REPLY_TYPE_NONE, Buffer.alloc(0)));
        } else if (type === K.CMD_READ) {
          // Data in two chunks, the second split over two writes.
          const half = length / 2;
          c.write(chunk(handle, 0, K.REPLY_TYPE_OFFSET_HOLE, Buffer.from(`${offset.toString(16).padStart(16, '0')}${half.toString(16).padStart(8, '0')}`, 'hex')));
          const d2 = chunk(handle, K.REPLY_FLAG_DONE, K.REPLY_TYPE_OFFSET_DATA, offsetData(offset + half, Buffer.alloc(half, 0x5a)));
          c.write(d2.subarray(0, 25));
          setTimeout(() => c.write(d2.subarray(25)), 5);
        }
      }
    });
  });
  await new Promise<void>((r) => server.listen(sock, r));
  try {
    await fn(`nbd+unix:///?socket=${sock}`);
  } finally {
    server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

describe('NBD client against a scripted server', () => {
  it('continues block status after partial replies and merges equal extents', async () => {
    await withFakeServer(async (uri) => {
      const c = await NbdClient.connect(uri, { metaContexts: ['base:allocation'] });
      expect(c.size).toBe(1 << 20);
      const ext = [];
      for await (const e of c.extents(0, c.size)) ext.push(e);
      expect(ext).toEqual([0, 1, 2, 3].flatMap((i) => [
        { offset: i * 262144, length: 65536, zero: false, dirty: true },
        { offset: i * 262144 + 65536, length: 196608, zero: true, dirty: true },
      ]));
      const b = Buffer.alloc(8192, 1);
      await c.read(b, 65536);
      expect(b.subarray(0, 4096).every((x) => x === 0) && b.subarray(4096).every((x) => x === 0x5a)).toBe(true);
      const err = await c.read(Buffer.alloc(512), 0).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(NbdError);
      expect(String(err)).toMatch(/READ at 0\+512: EIO: oops/);
      // The connection survives a server error reply...
      await c.read(b, 65536);
      // ...but not a reply for a handle never sent: every waiter fails.
      const inflight = c.read(Buffer.alloc(8192), 131072);
      await expect(c.read(Buffer.alloc(512), 4096)).rejects.toMatchObject({ code: 'PROTOCOL' });
      await expect(inflight).rejects.toThrow();
      await c.close();
    });
  });
});
