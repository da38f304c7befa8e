/**
 * The wire codec (src/core/wire.ts, docs/FORMATS.md "Wire protocol"): frames
 * round-trip whole and split at every byte; malformed or oversized input is
 * a PROTOCOL error raised before anything is buffered.
 */
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { QsyncError } from '../src/core/errors.js';
import { attrPairsProblem, encodeControl, encodeData, encodeDigests, encodeZero, FRAME, MAX_ATTR_VALUE, MAX_ENTRY_ATTRS, WireDecoder, type WireFrame } from '../src/core/wire.js';

const D = 32;

function decodeAll(bytes: Buffer, splits: number[] = [], limit?: number): WireFrame[] {
  const out: WireFrame[] = [];
  // Bodies may share memory with the input: copy what the test keeps.
  const d = new WireDecoder((f) => out.push(structuredClone(f)), limit);
  let at = 0;
  for (const s of [...splits, bytes.length]) {
    d.push(bytes.subarray(at, s));
    at = s;
  }
  d.end();
  return out;
}

const sample = (): { bytes: Buffer; frames: WireFrame[] } => {
  const digests = randomBytes(3 * D);
  const data = randomBytes(3 * 4096 - 100);
  const name = 'bad\udcffname \u{1F600}\n';
  const parts = [
    encodeControl({ op: 'hello', magic: 'qsync-wire', version: 1, name }),
    encodeData(8 * 4096, digests, data),
    encodeZero(2 ** 40, 12345),
    encodeDigests(7, digests),
    encodeDigests(0, Buffer.alloc(0)),
    encodeControl({ op: 'scan-end', fp: 'ab'.repeat(32) }),
  ];
  return {
    bytes: Buffer.concat(parts),
    frames: [
      { type: 'control', msg: { op: 'hello', magic: 'qsync-wire', version: 1, name } },
      { type: 'data', offset: 8 * 4096, digests, data },
      { type: 'zero', offset: 2 ** 40, length: 12345 },
      { type: 'digests', first: 7, digests },
      { type: 'digests', first: 0, digests: Buffer.alloc(0) },
      { type: 'control', msg: { op: 'scan-end', fp: 'ab'.repeat(32) } },
    ],
  };
};

const norm = (fs: WireFrame[]) =>
  fs.map((f) => JSON.parse(JSON.stringify(f, (_k, v) => (v?.type === 'Buffer' || v instanceof Uint8Array ? Buffer.from(v.data ?? v).toString('hex') : v))));

describe('wire codec', () => {
  it('round-trips every frame type, names that are not UTF-8 included', () => {
    const { bytes, frames } = sample();
    expect(norm(decodeAll(bytes))).toEqual(norm(frames));
  });

  it('gives the same frames split at every byte, and fed one byte at a time', () => {
    const { bytes, frames } = sample();
    const want = norm(frames);
    for (let i = 1; i < bytes.length; i++) expect(norm(decodeAll(bytes, [i]))).toEqual(want);
    expect(norm(decodeAll(bytes, Array.from({ length: bytes.length - 1 }, (_, i) => i + 1)))).toEqual(want);
  });

  it('refuses an oversized frame from its length word, before buffering its body', () => {
    const h = Buffer.alloc(5);
    h.writeUInt32LE(64 << 20);
    h[4] = FRAME.DATA;
    const d = new WireDecoder(() => {}, 1 << 20);
    expect(() => d.push(h)).toThrow(/over the limit/);
  });

  it.each([
    ['an empty frame', Buffer.from([0, 0, 0, 0])],
    ['an unknown type', Buffer.from([1, 0, 0, 0, 9])],
    ['control that is not JSON', Buffer.concat([Buffer.from([4, 0, 0, 0, 1]), Buffer.from('{no')])],
    ['control that is not an object with op', Buffer.concat([Buffer.from([3, 0, 0, 0, 1]), Buffer.from('[]')])],
    ['control that is not UTF-8', Buffer.concat([Buffer.from([5, 0, 0, 0, 1]), Buffer.from([0x7b, 0xff, 0xfe, 0x7d])])],
    ['DATA without data', Buffer.concat([Buffer.from([13 + D, 0, 0, 0, 2]), Buffer.alloc(8), Buffer.from([1, 0, 0, 0]), Buffer.alloc(D)])],
    ['DATA claiming more digests than it holds', Buffer.concat([Buffer.from([13 + 10, 0, 0, 0, 2]), Buffer.alloc(8), Buffer.from([0xff, 0xff, 0xff, 0xff]), Buffer.alloc(10)])],
    ['ZERO of the wrong size', Buffer.concat([Buffer.from([9, 0, 0, 0, 3]), Buffer.alloc(8)])],
    ['a u64 past 2^53', Buffer.concat([Buffer.from([17, 0, 0, 0, 3]), Buffer.alloc(8, 0xff), Buffer.alloc(8)])],
    ['DIGESTS of a partial digest', Buffer.concat([Buffer.from([1 + 8 + 5, 0, 0, 0, 4]), Buffer.alloc(13)])],
  ])('refuses %s with a PROTOCOL error', (_what, bytes) => {
    const d = new WireDecoder(() => {});
    let err: unknown;
    try {
      d.push(bytes);
      d.end();
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(QsyncError);
    expect((err as QsyncError).code).toBe('PROTOCOL');
  });

  it('a stream that ends inside a frame is an error; at a boundary it is not', () => {
    const { bytes } = sample();
    for (const cut of [1, 4, 5, 20, bytes.length - 1]) {
      const d = new WireDecoder(() => {});
      d.push(bytes.subarray(0, cut));
      expect(() => d.end()).toThrow(/ended inside a frame/);
    }
  });

  it('random garbage never throws anything but a PROTOCOL error, and never hangs', () => {
    for (let i = 0; i < 2000; i++) {
      const d = new WireDecoder(() => {}, 1 << 16);
      try {
        const junk = randomBytes(1 + (i % 200));
        // Half of them start like a plausible frame.
        if (i % 2 && junk.length >= 5) junk.writeUInt32LE(junk.length - 4, 0), (junk[4] = 1 + (i % 4));
        d.push(junk);
        d.end();
      } catch (e) {
        expect(e).toBeInstanceOf(QsyncError);
        expect((e as QsyncError).code).toBe('PROTOCOL');
      }
    }
  });
});

describe('-A/-X attribute pairs on the wire', () => {
  const b64 = (n: number) => `0s${Buffer.alloc(n, 7).toString('base64')}`;
  it('takes what getfattr prints: quoted names, base64 values up to 64 KiB, empty values', () => {
    expect(attrPairsProblem([['user.odd\\075name with space', b64(10)], ['user.\\377x\tz', '""'], ['system.posix_acl_access', b64(28)], ['trusted.big', b64(MAX_ATTR_VALUE)]])).toBeUndefined();
  });
  it.each([
    ['a value one byte over 64 KiB', [['user.a', b64(MAX_ATTR_VALUE + 1)]], /at most 65536 bytes/],
    ['a value that is not base64', [['user.a', 'plain text']], /not base64/],
    ['a name with a newline (another line of setfattr\'s input)', [['user.a\n# file: /proc/self/fd/4', '""']], /that is not one/],
    ['a name with "=" unquoted', [['user.a=b', '""']], /that is not one/],
    ['a name outside the kernel\'s namespaces', [['# file: x', '""']], /that is not one/],
    ['a name twice', [['user.a', '""'], ['user.a', '""']], /twice/],
    ['more than 1 MiB for one entry', Array.from({ length: 17 }, (_, i) => [`user.n${i}`, b64(MAX_ATTR_VALUE)]), new RegExp(`more than ${MAX_ENTRY_ATTRS} bytes`)],
    ['not pairs', [['user.a']], /not a \[name, value\] pair/],
  ])('refuses %s', (_what, pairs, why) => {
    expect(attrPairsProblem(pairs)).toMatch(why);
  });
});
