/**
 * `npm run bench [-- options]`: generates images, changes them per scenario,
 * and times every tool on the same files in the same run, interleaved, each
 * run starting from the same target. Writes latest.json and latest.svg and
 * prints the table. See bench/README.md.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, renameSync, rmSync, statfsSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseBenchArgs, USAGE, type BenchOptions } from './args.js';
import { runDomainScenario } from './domain.js';
import { runImageScenario } from './image.js';
import { measureLink, startShapedLink, type ShapedLink } from './link.js';
import { measure, TIME_BIN } from './measure.js';
import { addRatios, fail, load, machine, remoteGoalS, summarize, table, type BenchResult, type RunRecord, type ScenarioResult, type ToolResult } from './report.js';
import { makeScenarios, type Scenario } from './scenarios.js';
import { chart } from './svg.js';
import { makeTools, REFERENCE, type Tool } from './tools.js';
import { stateFolderFor } from '../src/sync/state-dir.js';
import { countingRsh, readCount } from '../test/helpers/sshd.js';
import { diffBlocks, fsyncTree, identical, restoreTree, saveTree, stateBytes, treeBytes } from './tree.js';

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const log = (msg: string): void => void process.stderr.write(`${msg}\n`);

/** The tree's commit, "-dirty" when it has uncommitted changes (what dist was probably built from). */
function commit(): string {
  try {
    return execFileSync('git', ['-C', repoRoot, 'describe', '--always', '--dirty'], { encoding: 'utf8' }).trim();
  } catch {
    return 'unknown';
  }
}

function dropCaches(): void {
  execFileSync('sync');
  writeFileSync('/proc/sys/vm/drop_caches', '3');
}

/** Per tool: where its target lives, the saved starting state, and whether the target moved since. */
interface Lane {
  tool: Tool;
  result: ToolResult;
  dst: string;
  saved: string;
  /** qsync's state folder for `dst` (outside it), and its saved copy: restored with the target. */
  state: string;
  savedState: string;
  /** A push's wire cache of the far target's digests, and its saved copy: restored with the target. */
  wireCache?: string;
  savedCache: string;
  dirty: boolean;
}

/**
 * How a lane's command runs: locally, or (remote scenario) pushing to
 * HOST:DST through the shaped link, with the -e value wrapped in the counter
 * (a count file per run) and the link's bytes read around it.
 */
interface Runner {
  run(tool: Tool, src: string, dst: string, tag: string): Promise<RunRecord>;
}

const localRunner: Runner = {
  run: async (tool, src, dst) => ({ ...(await measure(tool.argv(src, dst))), correct: null }),
};

function remoteRunner(link: ShapedLink, dir: string): Runner {
  return {
    async run(tool, src, dst, tag) {
      const count = join(dir, `wire-${tool.id}-${tag}`);
      const before = link.linkBytes();
      const m = await measure(tool.argv(src, `${link.host}:${dst}`, countingRsh(link.rsh, count)));
      return { ...m, correct: null, wire: readCount(count), linkBytes: link.linkBytes() - before };
    },
  };
}

async function runScenario(sc: Scenario, o: BenchOptions, tools: ReturnType<typeof makeTools>, work: string): Promise<ScenarioResult> {
  if (!sc.link) return runLanes(sc, o, tools, work, localRunner);
  const dir = join(work, sc.name);
  mkdirSync(dir, { recursive: true });
  log(`[${sc.name}] setting up the link: ${sc.link.rttMs} ms RTT, ${sc.link.mbit} Mbit/s`);
  let link: ShapedLink;
  try {
    link = await startShapedLink(sc.link);
  } catch (e) {
    // No link (not root, no iproute2): this scenario's tools fail with the reason; the others still run.
    const why = (e as Error).message;
    log(`[${sc.name}] ${why}`);
    const results = sc.tools.map((id): ToolResult => ({ id, label: tools[id].label, kind: tools[id].kind, status: 'failed', reason: why, runs: [] }));
    return { name: sc.name, description: sc.description, sourceBytes: o.size, changedBytes: -1, loadBefore: load(), loadAfter: load(), tools: results };
  }
  try {
    log(`[${sc.name}] ${link.describe}; measuring it through ssh`);
    const measured = await measureLink(link.rsh, link.host).catch((e: unknown) => (e as Error).message);
    const s = await runLanes(sc, o, tools, work, remoteRunner(link, dir));
    s.link = { describe: link.describe, ...sc.link, measured, goalS: remoteGoalS(s.changedBytes, sc.link.mbit) };
    return s;
  } finally {
    await link.stop();
  }
}

async function runLanes(sc: Scenario, o: BenchOptions, tools: ReturnType<typeof makeTools>, work: string, runner: Runner): Promise<ScenarioResult> {
  const dir = join(work, sc.name);
  const src = join(dir, 'src', sc.file);
  mkdirSync(dirname(src), { recursive: true });
  log(`[${sc.name}] ${sc.description}: creating ${sc.file}`);
  await sc.create(src);

  const lanes: Lane[] = [];
  const results: ToolResult[] = [];
  for (const id of sc.tools) {
    const tool = tools[id];
    const result: ToolResult = { id, label: tool.label, kind: tool.kind, status: 'ok', runs: [] };
    results.push(result);
    const why = tool.unavailable();
    if (why) {
      result.status = why;
      log(`[${sc.name}] ${tool.label}: ${why}`);
      continue;
    }
    const dst = join(dir, `dst-${id}`);
    // A push keeps the far target's digests in its own wire cache (src/remote/digest-cache.ts): restored with the
    // target, so every timed run finds them as a second run in real use does, not the ones of the run before.
    const wireCache = id === 'qsync-ssh' ? join(process.env.QSYNC_STATE_DIR!, 'wire-cache') : undefined;
    const lane = { tool, result, dst, saved: join(dir, `saved-${id}`), state: stateFolderFor(dst), savedState: join(dir, `saved-${id}.state`), wireCache, savedCache: join(dir, `saved-${id}.cache`), dirty: false };
    lanes.push(lane);
    if (tool.kind === 'floor') continue;
    mkdirSync(lane.dst);
    if (sc.firstCopy) {
      mkdirSync(lane.saved); // empty: restoring it deletes the copy
      mkdirSync(lane.savedState); // and the state of it
      continue;
    }
    log(`[${sc.name}] ${tool.label}: making its target from the unchanged image`);
    result.baseline = await runner.run(tool, src, lane.dst, 'baseline');
    if (result.baseline.exitCode !== 0) fail(result, result.baseline.stderr);
    else if (!(await identical(src, join(lane.dst, sc.file)))) fail(result, 'first copy differs from the source');
    fsyncTree(lane.dst);
    if (sc.runs > 1) {
      await saveTree(lane.dst, lane.saved);
      if (existsSync(lane.state)) await saveTree(lane.state, lane.savedState);
      if (lane.wireCache && existsSync(lane.wireCache)) await saveTree(lane.wireCache, lane.savedCache);
    }
  }

  const loadBefore = load();
  const known = await sc.mutate(src);
  const reference = lanes.find((l) => l.tool.kind === 'sync' && l.result.status === 'ok');
  const changedBytes = known ?? (reference ? diffBlocks(src, join(reference.dst, sc.file)) : -1);
  const cold = o.cold || sc.cold === true;
  if (!cold) execFileSync('cat', [src], { stdio: ['ignore', 'ignore', 'inherit'] }); // warm the page cache

  const timed = lanes.filter((l) => l.result.status === 'ok');
  for (let r = 0; r < sc.runs; r++) {
    // Interleaved, and rotated each run so no tool always follows the same one.
    const order = timed.map((_, i) => timed[(i + r) % timed.length]!);
    for (const lane of order) {
      const { tool, result } = lane;
      if (lane.dirty) {
        restoreTree(lane.saved, lane.dst);
        if (existsSync(lane.savedState)) restoreTree(lane.savedState, lane.state);
        if (lane.wireCache && existsSync(lane.savedCache)) restoreTree(lane.savedCache, lane.wireCache);
      }
      if (cold) dropCaches();
      const m = await runner.run(tool, src, lane.dst, String(r));
      let correct: boolean | null = null;
      if (tool.kind === 'sync') {
        lane.dirty = true;
        correct = m.exitCode === 0 && (await identical(src, join(lane.dst, sc.file)));
        fsyncTree(lane.dst); // its writeback must not land in the next tool's timing
      }
      result.runs.push({ ...m, correct });
      if (m.exitCode !== 0) fail(result, `exit ${m.exitCode}: ${m.stderr}`);
      else if (correct === false) fail(result, 'target differs from the source');
      log(`[${sc.name}] run ${r + 1}/${sc.runs} ${tool.label}: ${m.wallS.toFixed(2)} s${correct === false ? ' TARGET DIFFERS' : m.exitCode ? ` exit ${m.exitCode}` : ''}`);
    }
  }
  for (const { tool, result, dst } of timed) {
    if (result.runs.length) result.summary = summarize(result.runs, changedBytes, tool.kind);
    if (tool.kind === 'sync') result.manifestBytes = stateBytes(dst);
  }
  const s: ScenarioResult = {
    name: sc.name,
    description: sc.description,
    sourceBytes: treeBytes(src),
    changedBytes,
    loadBefore,
    loadAfter: load(),
    cold,
    tools: results,
  };
  addRatios(s, REFERENCE);
  if (!o.keep) rmSync(dir, { recursive: true, force: true });
  return s;
}

/** Each scenario holds the image, and per sync tool a target and a saved target. */
function checkSpace(o: BenchOptions, scenarios: readonly Scenario[]): void {
  // memory's file is sparse; domain makes its own 1.5 GiB of images (bench/domain.ts), whatever --size says.
  const images = Math.max(...scenarios.map((s) => (s.name === 'memory' || s.name === 'domain' ? 0 : 1 + 2 * s.tools.length)));
  const need = images * o.size * 1.15;
  const st = statfsSync(o.tmp);
  const free = st.bavail * st.bsize;
  if (free < need) throw new Error(`${o.tmp} has ${(free / 1024 ** 3).toFixed(1)} GiB free; ${(need / 1024 ** 3).toFixed(1)} GiB needed (use --tmp)`);
}

function writeAtomic(path: string, text: string): void {
  writeFileSync(`${path}.tmp`, text);
  renameSync(`${path}.tmp`, path);
}

async function main(): Promise<void> {
  let o: BenchOptions;
  try {
    o = parseBenchArgs(process.argv.slice(2), {
      out: join(repoRoot, 'bench', 'results'),
      tmp: tmpdir(),
      qsync: join(repoRoot, 'dist', 'src', 'cli', 'main.js'),
    });
  } catch (e) {
    log(`${(e as Error).message}\n${USAGE}`);
    process.exitCode = 1;
    return;
  }
  if (!existsSync(TIME_BIN)) throw new Error(`${TIME_BIN} is missing: install the Debian package "time"`);
  const tools = makeTools(resolve(o.qsync));
  const all = makeScenarios(o);
  const scenarios = o.scenarios.map((n) => all[n]);
  if ((o.cold || scenarios.some((s) => s.cold)) && process.getuid?.() !== 0) {
    throw new Error(`${o.cold ? '--cold' : 'the cold scenario'} drops the page cache before every timed command (writes /proc/sys/vm/drop_caches): run as root, or leave it out`);
  }
  checkSpace(o, scenarios);

  const work = mkdtempSync(join(o.tmp, 'qsync-bench-'));
  // qsync's state for the targets of this run lives with them, and goes with them.
  process.env.QSYNC_STATE_DIR = join(work, 'state');
  const cleanup = (): void => {
    if (!o.keep) rmSync(work, { recursive: true, force: true });
  };
  process.once('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  const result: BenchResult = {
    version: 1,
    date: new Date().toISOString(),
    commit: commit(),
    machine: machine(),
    options: { size: o.size, change: o.change, runs: o.runs, scenarios: o.scenarios, cold: o.cold, quick: o.quick, qsync: o.qsync, cache: o.cold ? 'cold' : 'warm' },
    scenarios: [],
  };
  try {
    const runners: Partial<Record<Scenario['name'], typeof runScenario>> = { image: runImageScenario, domain: runDomainScenario };
    for (const sc of scenarios) result.scenarios.push(await (runners[sc.name] ?? runScenario)(sc, o, tools, work));
  } finally {
    cleanup();
  }

  mkdirSync(o.out, { recursive: true });
  writeAtomic(join(o.out, 'latest.json'), `${JSON.stringify(result, null, 2)}\n`);
  writeAtomic(join(o.out, 'latest.svg'), chart(result, tools[REFERENCE].label));
  process.stdout.write(`${table(result)}\nwrote ${join(o.out, 'latest.json')} and latest.svg\n`);
  if (result.scenarios.some((s) => s.tools.some((t) => t.status === 'failed'))) process.exitCode = 1;
}

main().catch((e: unknown) => {
  log(`bench: ${e instanceof Error ? e.message : String(e)}`);
  process.exitCode = 1;
});
