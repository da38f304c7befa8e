// Per-64 KiB-block compression of a disk image with node:zlib codecs (the
// candidates for delta -z). Zero blocks are skipped: deltas never store them.
// Usage: node scripts/measure-delta-compression.mjs IMAGE
// (zstd/lz4 packages were measured the same way in a scratch folder; see docs/FORMATS.md.)
import { readFileSync } from 'node:fs';
import zlib from 'node:zlib';

const BS = 65536;
const data = readFileSync(process.argv[2]);
const blocks = [];
for (let o = 0; o < data.length; o += BS) {
  const b = data.subarray(o, o + BS);
  if (b.some((x) => x !== 0)) blocks.push(b);
}
const raw = blocks.reduce((a, b) => a + b.length, 0);
const Q = zlib.constants.BROTLI_PARAM_QUALITY;
const codecs = {
  'deflateRaw level 1': [(b) => zlib.deflateRawSync(b, { level: 1 }), (b) => zlib.inflateRawSync(b)],
  'deflateRaw level 6': [(b) => zlib.deflateRawSync(b, { level: 6 }), (b) => zlib.inflateRawSync(b)],
  'brotli quality 1': [(b) => zlib.brotliCompressSync(b, { params: { [Q]: 1 } }), (b) => zlib.brotliDecompressSync(b)],
  'brotli quality 3': [(b) => zlib.brotliCompressSync(b, { params: { [Q]: 3 } }), (b) => zlib.brotliDecompressSync(b)],
};
console.log(`${process.argv[2]}: ${blocks.length} non-zero blocks, ${(raw / 2 ** 20).toFixed(0)} MiB`);
for (const [name, [c, d]] of Object.entries(codecs)) {
  let out = 0;
  const packed = [];
  let t = process.hrtime.bigint();
  for (const b of blocks) {
    const x = c(b);
    out += Math.min(x.length, b.length); // a record stores the smaller
    packed.push(x);
  }
  const ct = Number(process.hrtime.bigint() - t) / 1e9;
  t = process.hrtime.bigint();
  for (const x of packed) d(x);
  const dt = Number(process.hrtime.bigint() - t) / 1e9;
  const mibs = (s) => (raw / 2 ** 20 / s).toFixed(0);
  console.log(`${name.padEnd(20)} ratio ${(raw / out).toFixed(2)}  compress ${mibs(ct)} MiB/s  decompress ${mibs(dt)} MiB/s`);
}
