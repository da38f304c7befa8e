/**
 * How fast image mode reads dirty data, against libnbd reading the same
 * extents of the same kind of export in the same run (docs/IMAGE-MODE.md
 * "Read rate"). A 2 GiB qcow2 of random data served by qemu-storage-daemon,
 * a first (full) `qsync --qmp` run, then per round and pattern: the guest
 * rewrites 10% of the disk (scattered 64 KiB clusters, or one contiguous
 * stretch) through NBD, and, in alternating order,
 *   - `qsync --qmp --verify-sample 0` (incremental): its dirty data rate is
 *     the bytes it read over its copyMs (reading, hashing, writing; not the
 *     QMP setup, map, commit or teardown);
 *   - the reference on a fleece made as qsync makes it (overlay +
 *     `blockdev-backup sync=none`, exported with a bitmap that recorded the
 *     same writes): the dirty extents read by libnbd with nbdcopy's defaults
 *     (bench/extent-read.py), `nbdcopy` of the whole export to null:, and
 *     qsync's NbdClient alone on the same extents: reading only, and reading,
 *     hashing and writing them to a file beside DEST (the floor of any
 *     pipeline that must do all three, on this machine, at this moment).
 *
 *   npm run bench:image-read -- [--size 2G] [--change 10%] [--rounds 3] [--dest DIR]
 *       [--fleece overlay|snapshot-access|both] [--compare OTHER/main.js] [--prof DIR]
 *
 * --fleece both reads the references from a snapshot-access node too
 * (`blockdev-backup` with a named copy-before-write filter under it);
 * --compare runs a second qsync build in the same rounds (a build without
 * copyMs is timed by its run less setup and map); --prof writes a V8 CPU
 * profile of each incremental run. DEST defaults to a folder on /dev/shm, so
 * the figure is reading and hashing rather than the storage under the target.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { randomFillSync, randomInt } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { open, type FileHandle } from 'node:fs/promises';
import { NbdClient } from '../src/io/nbd/client.js';
import { DIGEST_LEN, hashBlocksInto } from '../src/hash/blake3.js';
import { BLOCK, parseFraction, parseScriptArgs, parseSize } from './args.js';
import { pickScattered, writeRandomFile } from './data.js';
import { Daemon } from './image.js';

const here = dirname(fileURLToPath(import.meta.url));
const repo = join(here, '..', '..');
const log = (msg: string): void => void process.stderr.write(`[image-read] ${msg}\n`);
const gbs = (bytes: number, s: number): number => bytes / s / 1e9;
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[xs.length >> 1]!;

const { values } = parseScriptArgs({
  options: {
    size: { type: 'string', default: '2G' },
    change: { type: 'string', default: '10%' },
    rounds: { type: 'string', default: '3' },
    dest: { type: 'string' },
    fleece: { type: 'string', default: 'overlay' },
    qsync: { type: 'string', default: join(repo, 'dist', 'src', 'cli', 'main.js') },
    /** Folder for a V8 CPU profile of each incremental run. */
    prof: { type: 'string' },
    /** Another qsync main.js (e.g. a build of an older commit) run in the same rounds, for a before/after. */
    compare: { type: 'string' },
  },
}, 'usage: npm run bench:image-read -- [--size SIZE] [--change PCT] [--rounds R] [--dest DIR] [--fleece overlay|snapshot-access|both] [--qsync MAIN.JS] [--prof DIR] [--compare MAIN.JS]');
const size = parseSize(values.size!);
const change = parseFraction(values.change!);
const rounds = Number(values.rounds);
const nblocks = size / BLOCK;
const count = Math.round(nblocks * change);

type Pattern = 'scattered' | 'contiguous';
const pick = (p: Pattern): number[] => {
  if (p === 'scattered') return pickScattered(nblocks, count);
  const start = randomInt(nblocks - count + 1);
  return Array.from({ length: count }, (_, i) => start + i);
};

/** Guest writes of fresh random data to the given clusters, adjacent ones in one write. */
async function dirty(d: Daemon, blocks: number[]): Promise<void> {
  await d.withExport(true, async (uri) => {
    const c = await NbdClient.connect(uri);
    const runs: [number, number][] = [];
    for (const b of blocks) {
      const last = runs[runs.length - 1];
      if (last && last[0] + last[1] === b && last[1] < 64) last[1]++;
      else runs.push([b, 1]);
    }
    for (let i = 0; i < runs.length; i += 32) {
      await Promise.all(runs.slice(i, i + 32).map(([b, n]) => c.write(b * BLOCK, randomFillSync(Buffer.allocUnsafe(n * BLOCK)))));
    }
    await c.flush();
    await c.close();
  });
}

interface Figures {
  dirty: number;
  read: number;
  setupMs: number;
  mapMs: number;
  copyMs?: number;
  elapsedMs: number;
}

function qsync(d: Daemon, dest: string, json: string, extra: string[] = [], bin = values.qsync!): { fig: Figures; wallS: number; rssMiB: number } {
  const t0 = performance.now();
  const prof = values.prof && extra.length ? ['--cpu-prof', '--cpu-prof-dir', values.prof] : [];
  const rss = join(dirname(json), 'rss');
  const r = spawnSync('/usr/bin/time', ['-f', '%M', '-o', rss, 'node', ...prof, bin, '--json', ...extra, '--qmp', d.qmp, `${dest}/`], { encoding: 'utf8', maxBuffer: 1 << 26 });
  const wallS = (performance.now() - t0) / 1000;
  if (r.status !== 0) throw new Error(`qsync exit ${r.status}: ${r.stderr}`);
  writeFileSync(json, r.stdout);
  return { fig: (JSON.parse(r.stdout) as { disks: Figures[] }).disks[0]!, wallS, rssMiB: Number(readFileSync(rss, 'utf8').trim()) / 1024 };
}

/**
 * The reference: a fleece of disk0 as qsync makes one, exported with bitmap
 * `ref` (frozen in the same transaction), read by `fn`; then torn down and
 * `ref` recording again (the caller clears it).
 */
async function withFleece<T>(d: Daemon, dir: string, fn: (uri: string) => Promise<T>, access = values.fleece === 'snapshot-access'): Promise<T> {
  const qmp = await d.monitor();
  const overlay = join(dir, 'ref-fleece.qcow2');
  const sock = join(dir, 'ref-nbd.sock');
  try {
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', overlay, String(size)]);
    await qmp.execute('blockdev-add', {
      driver: 'qcow2', 'node-name': 'ref-fleece', file: { driver: 'file', filename: overlay }, ...(access ? {} : { backing: 'disk0' }),
    });
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await qmp.transaction([
      { type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: 'ref' } },
      { type: 'blockdev-backup', data: { 'job-id': 'ref-job', device: 'disk0', target: 'ref-fleece', sync: 'none', ...(access ? { 'filter-node-name': 'ref-cbw' } : {}) } },
    ]);
    if (access) await qmp.execute('blockdev-add', { driver: 'snapshot-access', 'node-name': 'ref-access', file: 'ref-cbw' });
    await qmp.execute('block-export-add', {
      type: 'nbd', id: 'ref', 'node-name': access ? 'ref-access' : 'ref-fleece', writable: false, name: 'ref', bitmaps: [{ node: 'disk0', name: 'ref' }],
    });
    return await fn(`nbd+unix:///ref?socket=${sock}`);
  } finally {
    const gone = qmp.waitEvent('BLOCK_EXPORT_DELETED', (e) => e.data.id === 'ref', 30_000);
    await qmp.execute('block-export-del', { id: 'ref', mode: 'hard' }).then(() => gone, () => gone.cancel());
    await qmp.execute('nbd-server-stop').catch(() => {});
    if (access) await qmp.execute('blockdev-del', { 'node-name': 'ref-access' }).catch(() => {});
    const cancelled = qmp.waitEvent('JOB_STATUS_CHANGE', (e) => e.data.id === 'ref-job' && e.data.status === 'null', 30_000);
    await qmp.execute('block-job-cancel', { device: 'ref-job', force: true }).then(() => cancelled, () => cancelled.cancel());
    await qmp.execute('blockdev-del', { 'node-name': 'ref-fleece' }).catch(() => {});
    await qmp.execute('block-dirty-bitmap-enable', { node: 'disk0', name: 'ref' });
    rmSync(overlay, { force: true });
    await qmp.close();
  }
}

interface Reference {
  /** Dirty extents read by libnbd (bench/extent-read.py). */
  extents: { bytes: number; s: number };
  /** nbdcopy of the whole export to null:. */
  full: { bytes: number; s: number };
  /** qsync's NbdClient alone on the same extents; and reading, hashing and writing them to DEST's file system. */
  client: { bytes: number; s: number };
  floor: { bytes: number; s: number };
}

/**
 * qsync's NBD client alone reading the extents (4 connections, `inFlight`
 * requests of at most `req` bytes each); with `work`, each piece is also
 * hashed per 64 KiB block, and written to `sink` at its offset: the floor
 * of a pipeline that must do both, on this machine, now.
 */
async function clientRead(uri: string, extents: [number, number][], req: number, inFlight: number, work?: { sink: FileHandle }): Promise<{ bytes: number; s: number }> {
  const first = await NbdClient.connect(uri, { maxInFlight: inFlight });
  const conns = [first];
  if (first.canMultiConn) for (let i = 1; i < 4; i++) conns.push(await NbdClient.connect(uri, { maxInFlight: inFlight }));
  const jobs: [number, number][] = [];
  for (const [o, l] of extents) for (let at = o; at < o + l; at += req) jobs.push([at, Math.min(req, o + l - at)]);
  const digests = Buffer.alloc((req / BLOCK) * DIGEST_LEN);
  const t0 = performance.now();
  await Promise.all(conns.map(async (c, i) => {
    const bufs = Array.from({ length: inFlight }, () => Buffer.allocUnsafe(req));
    let n = i;
    await Promise.all(bufs.map(async (b) => {
      for (; n < jobs.length; ) {
        const [o, l] = jobs[n]!;
        n += conns.length;
        await c.read(b.subarray(0, l), o);
        if (work) {
          hashBlocksInto(b.subarray(0, l), BLOCK, digests);
          await work.sink.write(b, 0, l, o);
        }
      }
    }));
  }));
  const s = (performance.now() - t0) / 1000;
  await Promise.all(conns.map((c) => c.close()));
  return { bytes: jobs.reduce((a, [, l]) => a + l, 0), s };
}

async function reference(uri: string, dir: string): Promise<Reference> {
  const map = JSON.parse(execFileSync('nbdinfo', ['--json', '--map=qemu:dirty-bitmap:ref', uri], { encoding: 'utf8' })) as { offset: number; length: number; type: number }[];
  const list = join(dir, 'extents.txt');
  writeFileSync(list, map.filter((e) => e.type & 1).map((e) => `${e.offset} ${e.length}\n`).join(''));
  const [bytes, s] = execFileSync('/usr/bin/python3', [join(repo, 'bench', 'extent-read.py'), uri, list], { encoding: 'utf8' }).trim().split(' ').map(Number) as [number, number];
  const t0 = performance.now();
  execFileSync('nbdcopy', [uri, 'null:']);
  const full = { bytes: size, s: (performance.now() - t0) / 1000 };
  const ext = map.filter((e) => e.type & 1).map((e) => [e.offset, e.length] as [number, number]);
  const c = await clientRead(uri, ext, 256 << 10, 64);
  const sink = await open(join(dest, 'floor.raw'), 'w');
  const w = await clientRead(uri, ext, 256 << 10, 64, { sink }).finally(() => sink.close());
  rmSync(join(dest, 'floor.raw'));
  log(`  qsync's NbdClient alone, same extents (4 x 64 x 256 KiB): read ${gbs(c.bytes, c.s).toFixed(2)} GB/s, read + hash + write ${gbs(w.bytes, w.s).toFixed(2)} GB/s`);
  return { extents: { bytes, s }, full, client: c, floor: w };
}

const dir = mkdtempSync(join(tmpdir(), 'qsync-image-read-'));
const dest = values.dest ?? mkdtempSync('/dev/shm/qsync-image-read-dst-');
const image = join(dir, 'disk0.qcow2');
const d = new Daemon(image, join(dir, 'qsd'));
const builds = [{ label: 'qsync', bin: values.qsync! }, ...(values.compare ? [{ label: `qsync (${values.compare})`, bin: values.compare }] : [])];
type Row = { qsync: number[]; run: number[]; ref: number[]; full: number[]; client: number[]; floor: number[]; rss: number[] };
const rows = new Map<string, Row>();
const row = (p: Pattern, v: string): Row => {
  const k = `${p} ${v}`;
  if (!rows.has(k)) rows.set(k, { qsync: [], run: [], ref: [], full: [], client: [], floor: [], rss: [] });
  return rows.get(k)!;
};
try {
  log(`${values.size} qcow2 of random data, ${(change * 100).toFixed(1)}% rewritten per round, ${rounds} rounds, fleece ${values.fleece}, DEST ${dest}`);
  const raw = join(dir, 'disk0.raw');
  writeRandomFile(raw, size);
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, image]);
  rmSync(raw);
  mkdirSync(dest, { recursive: true });
  await d.start();
  const first = qsync(d, dest, join(dir, 'first.json'));
  log(`first (full) run: ${first.wallS.toFixed(2)} s`);
  await d.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'ref' });
  for (let r = 0; r < rounds; r++) {
    for (const p of ['scattered', 'contiguous'] as Pattern[]) {
      for (const v of builds) {
        await dirty(d, pick(p));
        const x = row(p, v.label);
        const runQsync = (): void => {
          const { fig, wallS, rssMiB } = qsync(d, dest, join(dir, 'inc.json'), ['--verify-sample', '0'], v.bin);
          x.rss.push(rssMiB);
          // A build without copyMs: its time less setup and map (the commit and teardown in it).
          const runS = (fig.elapsedMs - fig.setupMs - fig.mapMs) / 1000;
          const dataS = fig.copyMs === undefined ? runS : fig.copyMs / 1000;
          x.qsync.push(gbs(fig.read, dataS));
          x.run.push(gbs(fig.read, runS));
          log(`${p} ${r + 1} ${v.label}: qsync read ${(fig.read / 2 ** 20).toFixed(0)} MiB (dirty ${(fig.dirty / 2 ** 20).toFixed(0)}) in ${dataS.toFixed(3)} s = ${gbs(fig.read, dataS).toFixed(2)} GB/s (setup ${fig.setupMs.toFixed(0)} ms, map ${fig.mapMs.toFixed(0)} ms, process ${wallS.toFixed(2)} s, peak RSS ${rssMiB.toFixed(0)} MiB)`);
        };
        const runRef = async (): Promise<void> => {
          if (values.fleece === 'both') {
            // The same extents from a snapshot-access node: only libnbd's rate, for the comparison of the two.
            const acc = await withFleece(d, dir, async (uri) => reference(uri, dir), true);
            row(p, 'snapshot-access').ref.push(gbs(acc.extents.bytes, acc.extents.s));
            row(p, 'snapshot-access').full.push(gbs(acc.full.bytes, acc.full.s));
            row(p, 'snapshot-access').client.push(gbs(acc.client.bytes, acc.client.s));
            row(p, 'snapshot-access').floor.push(gbs(acc.floor.bytes, acc.floor.s));
            log(`${p} ${r + 1}: snapshot-access: libnbd ${gbs(acc.extents.bytes, acc.extents.s).toFixed(2)} GB/s, nbdcopy ${gbs(acc.full.bytes, acc.full.s).toFixed(2)} GB/s`);
          }
          const ref = await withFleece(d, dir, async (uri) => reference(uri, dir), values.fleece === 'snapshot-access');
          await d.execute('block-dirty-bitmap-clear', { node: 'disk0', name: 'ref' });
          x.ref.push(gbs(ref.extents.bytes, ref.extents.s));
          x.full.push(gbs(ref.full.bytes, ref.full.s));
          x.client.push(gbs(ref.client.bytes, ref.client.s));
          x.floor.push(gbs(ref.floor.bytes, ref.floor.s));
          log(`${p} ${r + 1}: libnbd read ${(ref.extents.bytes / 2 ** 20).toFixed(0)} MiB of dirty extents in ${ref.extents.s.toFixed(3)} s = ${gbs(ref.extents.bytes, ref.extents.s).toFixed(2)} GB/s; nbdcopy of the export ${gbs(ref.full.bytes, ref.full.s).toFixed(2)} GB/s`);
        };
        // Alternate which goes first: the other helpers' load then falls on both.
        if (r % 2) {
          await runRef();
          runQsync();
        } else {
          runQsync();
          await runRef();
        }
      }
    }
  }
  execFileSync('qemu-img', ['compare', '-q', '-U', '-f', 'raw', '-F', 'qcow2', join(dest, 'disk0.raw'), image]);
  log('target equals the guest view (qemu-img compare)');
  console.log('| pattern | qsync --qmp: dirty data | qsync: run less setup, map | libnbd: same extents | qsync ÷ libnbd | nbdcopy: whole export | NbdClient alone: read | NbdClient: read + hash + write | qsync peak RSS |');
  console.log('|---|---|---|---|---|---|---|---|---|');
  for (const [k, x] of rows) {
    const m = (xs: number[]): string => (xs.length ? `${median(xs).toFixed(2)} GB/s` : '–');
    const ratio = x.qsync.length ? (median(x.qsync) / median(x.ref)).toFixed(2) : '–';
    console.log(`| ${k} | ${m(x.qsync)} | ${m(x.run)} | ${m(x.ref)} | ${ratio} | ${m(x.full)} | ${m(x.client)} | ${m(x.floor)} | ${x.rss.length ? `${Math.max(...x.rss).toFixed(0)} MiB` : '–'} |`);
  }
} finally {
  await d.stop();
  rmSync(dir, { recursive: true, force: true });
  if (!values.dest) rmSync(dest, { recursive: true, force: true });
}
