/**
 * `node dist/bench/trees.js [options]` (npm run bench:tree): the `tree`
 * scenario, qsync -a against rsync -a over a tree of many files.
 *
 * Trees: `small`: N files of 100 B–50 KiB (log-uniform, like /etc), 50 to a
 * folder, and one random image of --image bytes; `--copy DIR`: a copy of DIR
 * (e.g. /usr/share, 50,000 files). Per round, rsync and qsync alternate:
 * each makes its target from nothing (first run), then runs again with
 * nothing changed (unchanged re-run). Reported: median wall time of each,
 * peak RSS (GNU time), qsync's state folder for the target as % of the data.
 * Every target is compared with the source (rsync -ainc prints nothing).
 *
 * Options: --files N (2000; 0: no small tree), --image SIZE (1G; 0: none),
 * --copy DIR, --rounds R (3), --tmp DIR (default $TMPDIR), --qsync MAIN.JS.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseScriptArgs, parseSize } from './args.js';
import { writeRandomFile } from './data.js';
import { measure, type Measurement } from './measure.js';
import { stateBytes, treeBytes } from './tree.js';

const { values } = parseScriptArgs({
  options: {
    files: { type: 'string', default: '2000' },
    image: { type: 'string', default: '1G' },
    copy: { type: 'string' },
    rounds: { type: 'string', default: '3' },
    tmp: { type: 'string' },
    qsync: { type: 'string' },
  },
}, 'usage: npm run bench:tree -- [--files N] [--image SIZE] [--copy DIR] [--rounds R] [--tmp DIR] [--qsync MAIN.JS]');
const here = dirname(fileURLToPath(import.meta.url));
const main = resolve(values.qsync ?? join(here, '../src/cli/main.js'));
const rounds = Number(values.rounds);
const work = mkdtempSync(join(values.tmp ?? tmpdir(), 'qsync-tree-'));
process.env.QSYNC_STATE_DIR = join(work, 'state');
const log = (s: string) => process.stderr.write(`${s}\n`);

/** A deterministic PRNG (mulberry32): the same tree every run. */
function prng(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function smallTree(dir: string, files: number, image: number): void {
  const rnd = prng(2000);
  for (let i = 0; i < files; i++) {
    const sub = join(dir, `d${Math.floor(i / 50)}`);
    if (i % 50 === 0) mkdirSync(sub, { recursive: true });
    const size = Math.round(100 * (50 * 1024 / 100) ** rnd());
    writeFileSync(join(sub, `f${i}.conf`), Buffer.alloc(size, i % 251));
  }
  if (image) writeRandomFile(join(dir, 'disk.raw'), image);
}

interface Row {
  tree: string;
  files: number;
  bytes: number;
  tool: string;
  first: number[];
  again: number[];
  rss: number[];
  state: number;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;
const tools: Record<string, (src: string, dst: string) => string[]> = {
  'rsync -a': (s, d) => ['rsync', '-a', `${s}/`, `${d}/`],
  'qsync -a': (s, d) => [process.execPath, main, '-a', `${s}/`, `${d}/`],
};

async function run(argv: string[]): Promise<Measurement> {
  const m = await measure(argv);
  if (m.exitCode !== 0) throw new Error(`${argv.join(' ')}: exit ${m.exitCode}: ${m.stderr}`);
  return m;
}

async function bench(name: string, src: string): Promise<Row[]> {
  const files = Number(execFileSync('sh', ['-c', 'find "$1" -type f | wc -l', 'sh', src], { encoding: 'utf8' }));
  const bytes = treeBytes(src);
  const rows = Object.keys(tools).map((tool): Row => ({ tree: name, files, bytes, tool, first: [], again: [], rss: [], state: 0 }));
  for (let r = 0; r < rounds; r++) {
    for (const row of rows) {
      const dst = join(work, `dst-${row.tool.split(' ')[0]}`);
      rmSync(dst, { recursive: true, force: true });
      rmSync(process.env.QSYNC_STATE_DIR!, { recursive: true, force: true });
      execFileSync('sync');
      const a = await run(tools[row.tool]!(src, dst));
      const b = await run(tools[row.tool]!(src, dst));
      row.first.push(a.wallS);
      row.again.push(b.wallS);
      row.rss.push(Math.max(a.maxRssKiB, b.maxRssKiB));
      row.state = stateBytes(dst);
      const diff = execFileSync('rsync', ['-ainc', '--dry-run', `${src}/`, `${dst}/`], { encoding: 'utf8' });
      if (diff.trim()) throw new Error(`${row.tool}: the target differs from the source:\n${diff.slice(0, 2000)}`);
      log(`[${name}] round ${r + 1} ${row.tool}: first ${a.wallS.toFixed(2)} s, again ${b.wallS.toFixed(2)} s, RSS ${(Math.max(a.maxRssKiB, b.maxRssKiB) / 1024).toFixed(1)} MiB`);
    }
  }
  return rows;
}

const all: Row[] = [];
try {
  const n = Number(values.files);
  const image = parseSize(values.image ?? '0');
  if (n > 0) {
    const src = join(work, 'small');
    log(`making ${n} small files${image ? ` and a ${values.image} image` : ''} in ${src}`);
    smallTree(src, n, image);
    all.push(...(await bench(`${n} small files${image ? ` + ${values.image} image` : ''}`, src)));
  }
  if (values.copy) {
    const src = join(work, 'copy');
    log(`copying ${values.copy} to ${src}`);
    execFileSync('cp', ['-a', values.copy, src]);
    all.push(...(await bench(`copy of ${values.copy}`, src)));
  }
} finally {
  rmSync(work, { recursive: true, force: true });
}

const fmt = (s: number) => `${s.toFixed(2)} s`;
console.log(`| tree | files | data | tool | first run | unchanged re-run | peak RSS | state |`);
console.log(`|---|---|---|---|---|---|---|---|`);
for (const row of all) {
  const rs = all.find((x) => x.tree === row.tree && x.tool === 'rsync -a')!;
  const ratio = (a: number[], b: number[]) => (row === rs ? '' : ` (${(median(a) / median(b)).toFixed(2)}×)`);
  console.log(
    `| ${row.tree} | ${row.files} | ${(row.bytes / 2 ** 20).toFixed(1)} MiB | ${row.tool} | ${fmt(median(row.first))}${ratio(row.first, rs.first)} | ${fmt(median(row.again))}${ratio(row.again, rs.again)} | ${(median(row.rss) / 1024).toFixed(1)} MiB | ${row === rs ? '–' : `${row.state} B (${((100 * row.state) / row.bytes).toFixed(3)}%)`} |`,
  );
}
console.log(`\nMedians of ${rounds} rounds, rsync and qsync alternating; ${rounds} × (first run, unchanged re-run) each.`);
