/**
 * The `image` scenario (docs/IMAGE-MODE.md): a qcow2 served by qemu-storage-daemon, the
 * guest rewrites `--change` of its 64 KiB clusters (scattered, through NBD)
 * before each run, then: `qsync --qmp` incremental, `nbdcopy` of the disk to
 * null: (the read reference), and a forced file-mode `qsync -a -c` of the
 * image file (QEMU stopped for it: file mode refuses an image QEMU holds).
 * Per run, the target of `qsync --qmp` must equal the guest view
 * (`qemu-img compare`) and the file-mode copy the image file.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { NbdClient } from '../src/io/nbd/client.js';
import { QmpClient } from '../src/qemu/qmp.js';
import { BLOCK, type BenchOptions } from './args.js';
import { measure, type Measurement } from './measure.js';
import { fail, load, markUnavailable, summarize, type ScenarioResult, type ToolResult } from './report.js';
import type { Scenario } from './scenarios.js';
import { pickScattered } from './data.js';
import type { makeTools } from './tools.js';
import { fsyncTree, identical, stateBytes } from './tree.js';

const log = (msg: string): void => void process.stderr.write(`[image] ${msg}\n`);

/** What `qsync --qmp --json` reports for the disk. */
interface DiskFigures {
  dirty: number;
  read: number;
  sampled: number;
  setupMs: number;
  mapMs: number;
  elapsedMs: number;
}

export class Daemon {
  #child: ChildProcess | undefined;
  constructor(
    private readonly image: string,
    readonly dir: string,
  ) {
    mkdirSync(dir, { recursive: true });
  }

  /** QMP socket for qsync; the harness uses its own monitor. */
  get qmp(): string {
    return join(this.dir, 'qmp.sock');
  }

  async start(): Promise<void> {
    const sock = (id: string, path: string) => ['--chardev', `socket,id=${id},path=${path},server=on,wait=off`, '--monitor', `chardev=${id}`];
    this.#child = spawn(
      'qemu-storage-daemon',
      [
        '--blockdev', `driver=file,node-name=disk0-file,filename=${this.image}`,
        '--blockdev', 'driver=qcow2,node-name=disk0,file=disk0-file',
        ...sock('m0', this.qmp),
        ...sock('m1', join(this.dir, 'bench.sock')),
      ],
      { stdio: 'ignore' },
    );
    for (let i = 0; i < 200; i++) {
      try {
        await (await QmpClient.connect(join(this.dir, 'bench.sock'))).close();
        return;
      } catch {
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    throw new Error('qemu-storage-daemon did not start');
  }

  /** SIGTERM: QEMU stores the persistent bitmaps in the qcow2 and lets go of it. */
  async stop(): Promise<void> {
    const c = this.#child;
    if (!c || c.exitCode !== null) return;
    const gone = new Promise((r) => c.once('exit', r));
    c.kill('SIGTERM');
    await gone;
  }

  monitor(): Promise<QmpClient> {
    return QmpClient.connect(join(this.dir, 'bench.sock'));
  }

  /** One QMP command (QEMU serves one client per monitor: none is kept open). */
  async execute(command: string, args: Record<string, unknown>): Promise<void> {
    const qmp = await this.monitor();
    try {
      await qmp.execute(command, args);
    } finally {
      await qmp.close();
    }
  }

  /** Run `fn` against a temporary NBD export of the disk (with `bitmaps`, read-only). */
  async withExport<T>(writable: boolean, fn: (uri: string) => Promise<T>, bitmaps: string[] = []): Promise<T> {
    const qmp = await this.monitor();
    const sock = join(this.dir, 'bench-nbd.sock');
    try {
      await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
      await qmp.execute('block-export-add', { type: 'nbd', id: 'bench', 'node-name': 'disk0', writable, name: 'disk0', bitmaps });
      const out = await fn(`nbd+unix:///disk0?socket=${sock}`);
      const gone = qmp.waitEvent('BLOCK_EXPORT_DELETED', (e) => e.data.id === 'bench');
      await qmp.execute('block-export-del', { id: 'bench' });
      await gone;
      return out;
    } finally {
      await qmp.execute('nbd-server-stop').catch(() => {});
      await qmp.close();
    }
  }
}

/** Guest writes: `count` scattered 64 KiB clusters of fresh random data. */
async function dirty(d: Daemon, size: number, count: number): Promise<void> {
  await d.withExport(true, async (uri) => {
    const c = await NbdClient.connect(uri);
    const blocks = pickScattered(Math.floor(size / BLOCK), count);
    for (let i = 0; i < blocks.length; i += 64) {
      await Promise.all(blocks.slice(i, i + 64).map((b) => c.write(b * BLOCK, randomFillSync(Buffer.allocUnsafe(BLOCK)))));
    }
    await c.flush();
    await c.close();
  });
}

const TiB = 1024 ** 4;
const MAP_EXTENTS = 200;

/**
 * The dirty map of a 1 TiB sparse disk with 200 scattered dirty clusters:
 * qsync's NBD client (block status) against `nbdinfo --map`, medians of 5.
 */
async function mapFigure(dir: string): Promise<string> {
  const image = join(dir, 'sparse.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(TiB)]);
  const d = new Daemon(image, join(dir, 'map'));
  await d.start();
  try {
    await d.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'bm0' });
    await dirty(d, TiB, MAP_EXTENTS);
    await d.execute('block-dirty-bitmap-disable', { node: 'disk0', name: 'bm0' });
    const ours: number[] = [];
    const theirs: number[] = [];
    await d.withExport(
      false,
      async (uri) => {
        for (let i = 0; i < 5; i++) {
          let t0 = performance.now();
          const c = await NbdClient.connect(uri, { metaContexts: ['qemu:dirty-bitmap:bm0'] });
          for await (const _ of c.extents(0, c.size));
          await c.close();
          ours.push(performance.now() - t0);
          t0 = performance.now();
          execFileSync('nbdinfo', ['--map=qemu:dirty-bitmap:bm0', uri], { stdio: 'ignore' });
          theirs.push(performance.now() - t0);
        }
      },
      ['bm0'],
    );
    return `; dirty map of a 1 TiB disk (${MAP_EXTENTS} dirty clusters): ${median(ours).toFixed(0)} ms, nbdinfo --map ${median(theirs).toFixed(0)} ms`;
  } finally {
    await d.stop();
  }
}

const rate = (bytes: number, ms: number): string => `${(bytes / ms / 1e6).toFixed(2)} GB/s`;
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[xs.length >> 1]!;

export async function runImageScenario(sc: Scenario, o: BenchOptions, tools: ReturnType<typeof makeTools>, work: string): Promise<ScenarioResult> {
  const [qmpTool, copyTool, fileTool] = [tools['qsync-qmp'], tools.nbdcopy, tools['qsync-c']];
  const result = (t: typeof qmpTool): ToolResult => ({ id: t.id, label: t.label, kind: t.kind, status: 'ok', runs: [] });
  const results = [result(qmpTool), result(copyTool), result(fileTool)];
  const [qmpR, copyR, fileR] = results as [ToolResult, ToolResult, ToolResult];
  const s: ScenarioResult = { name: sc.name, description: sc.description, sourceBytes: o.size, changedBytes: 0, loadBefore: load(), loadAfter: [], tools: results };
  const why = [qmpTool, copyTool, fileTool].map((t) => t.unavailable());
  try {
    execFileSync('qemu-storage-daemon', ['--version'], { stdio: 'ignore' });
  } catch {
    why[0] ??= 'missing'; // no QEMU to back up from
  }
  const skipped = markUnavailable(s, why);
  if (skipped) {
    log(`skipped: ${skipped}`);
    return s;
  }
  const dir = join(work, sc.name);
  const image = join(dir, 'src', sc.file);
  const dst = join(dir, 'dst-qmp');
  const fileDst = join(dir, 'dst-file');
  for (const p of [dirname(image), dst, fileDst]) mkdirSync(p, { recursive: true });
  log(`${sc.description}: creating ${sc.file}`);
  await sc.create(image);
  const d = new Daemon(image, dir);
  const figures: DiskFigures[] = [];
  const changed = Math.max(1, Math.round((o.size / BLOCK) * o.change)) * BLOCK;
  s.changedBytes = changed;
  try {
    log('baselines: file-mode copy, then the first (full) image-mode run');
    fileR.baseline = await measure(fileTool.argv(image, fileDst));
    await d.start();
    const json = join(dir, 'qmp.json');
    // qsync's --json report goes to a file: measure() discards stdout.
    const qmpRun = (): Promise<Measurement> => measure(['sh', '-c', 'exec "$@" > "$0"', json, ...qmpTool.argv(d.qmp, dst)]);
    qmpR.baseline = await qmpRun();
    for (let r = 0; r < sc.runs; r++) {
      await dirty(d, o.size, changed / BLOCK);
      const m = await qmpRun();
      let correct = m.exitCode === 0;
      if (correct) {
        figures.push((JSON.parse(readFileSync(json, 'utf8')) as { disks: DiskFigures[] }).disks[0]!);
        try {
          execFileSync('qemu-img', ['compare', '-q', '-U', '-f', 'raw', '-F', 'qcow2', join(dst, 'disk0.raw'), image]);
        } catch {
          correct = false;
        }
      }
      fsyncTree(dst);
      qmpR.runs.push({ ...m, correct });
      if (!correct) fail(qmpR, m.exitCode ? `exit ${m.exitCode}: ${m.stderr}` : 'target differs from the guest view');

      const c = await d.withExport(false, (uri) => measure(copyTool.argv(uri, '')));
      copyR.runs.push({ ...c, correct: null });
      if (c.exitCode) fail(copyR, `exit ${c.exitCode}: ${c.stderr}`);

      await d.stop();
      const f = await measure(fileTool.argv(image, fileDst));
      const same = f.exitCode === 0 && (await identical(image, join(fileDst, sc.file)));
      fsyncTree(fileDst);
      fileR.runs.push({ ...f, correct: same });
      if (!same) fail(fileR, f.exitCode ? `exit ${f.exitCode}: ${f.stderr}` : 'target differs from the source');
      await d.start();
      log(`run ${r + 1}/${sc.runs}: qsync --qmp ${m.wallS.toFixed(2)} s, nbdcopy ${c.wallS.toFixed(2)} s, qsync -a -c ${f.wallS.toFixed(2)} s`);
    }
  } finally {
    await d.stop();
  }
  for (const r of results) if (r.runs.length) r.summary = summarize(r.runs, r.kind === 'sync' ? changed : 0, r.kind);
  qmpR.manifestBytes = stateBytes(dst);
  fileR.manifestBytes = stateBytes(fileDst);
  if (figures.length && copyR.summary) {
    const f = (k: keyof DiskFigures): number => median(figures.map((x) => x[k] ?? 0)); // a --qsync snapshot may predate a field
    // In-process time less QMP setup and map: the dirty data's share.
    const dataMs = f('elapsedMs') - f('setupMs') - f('mapMs');
    s.description +=
      `; qsync --qmp (medians): read ${((f('read') - f('sampled')) / f('dirty')).toFixed(2)}× the dirty bytes ` +
      `+ ${(f('sampled') / f('dirty')).toFixed(2)}× in the verify sample, setup ${f('setupMs').toFixed(0)} ms, ` +
      `map ${f('mapMs').toFixed(0)} ms, in-process ${(f('elapsedMs') / 1000).toFixed(2)} s, dirty data at ${rate(f('dirty'), dataMs)}; ` +
      `nbdcopy of the disk ${rate(o.size, copyR.summary.wallMedianS * 1000)}`;
  }
  if (qmpR.status === 'ok') s.description += await mapFigure(dir).catch((e: unknown) => `; dirty map not measured: ${(e as Error).message}`);
  s.loadAfter = load();
  if (!o.keep) rmSync(dir, { recursive: true, force: true });
  return s;
}
