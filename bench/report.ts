/** Results: their JSON shape, the summary statistics and the terminal table. */
import { cpus, loadavg, release, totalmem } from 'node:os';
import type { BenchOptions } from './args.js';
import type { LinkFigures } from './link.js';
import type { Measurement } from './measure.js';
import type { Tool, ToolId } from './tools.js';

export interface RunRecord extends Measurement {
  /** Target byte-identical to the source after the run (null for floors). */
  correct: boolean | null;
  /** Remote tools: bytes the tool sent into ssh and got out of it (count-rsh.mjs), all its ssh sessions. */
  wire?: { sent: number; received: number };
  /** Remote tools: bytes the veth carried during the run (IP packets: ssh, TCP and IP overhead included). */
  linkBytes?: number;
}

export interface Summary {
  wallMedianS: number;
  wallMinS: number;
  wallMaxS: number;
  cpuMedianS: number;
  maxRssMiB: number;
  rcharMedian: number;
  /** Median of min(wchar, write_bytes): see writtenBytes. */
  writtenMedian: number;
  /** Remote tools: median of sent + received through ssh. */
  wireMedian?: number;
  /** Remote tools: median bytes on the veth. */
  linkMedian?: number;
  /** Median wall time over the reference's (cat) in the same scenario. */
  ratioToRef?: number;
  /** Median bytes written over the bytes that changed in the source. */
  writtenPerChanged?: number;
}

/** Tools that cannot run here (`why`, by position) get the reason as their status; returns the reasons when any (the scenario is then skipped). */
export function markUnavailable(s: ScenarioResult, why: (ToolResult['status'] | undefined)[]): string | undefined {
  if (!why.some(Boolean)) return undefined;
  s.tools.forEach((r, i) => (r.status = why[i] ?? 'ok'));
  s.loadAfter = load();
  return why.filter(Boolean).join(', ');
}

/** Marks a tool failed; the first reason (its tail) is the one kept. */
export function fail(r: ToolResult, why: string): void {
  r.status = 'failed';
  r.reason ??= why.trim().slice(-2000);
}

export interface ToolResult {
  id: ToolId;
  label: string;
  kind: Tool['kind'];
  status: 'ok' | 'failed' | 'not built' | 'missing';
  reason?: string;
  /** The untimed run that made this tool's target from the unchanged image. */
  baseline?: Measurement;
  runs: RunRecord[];
  /** Bytes of qsync's state for DST after the last run (its manifests), 0 for others. */
  manifestBytes?: number;
  summary?: Summary;
}

export interface ScenarioResult {
  name: string;
  description: string;
  sourceBytes: number;
  /** Bytes of the 64 KiB blocks of the changed image that differ from the unchanged one. */
  changedBytes: number;
  loadBefore: number[];
  loadAfter: number[];
  /** The page cache was dropped before every timed command. */
  cold?: boolean;
  tools: ToolResult[];
  /** Remote scenario: the link, as set up and as measured through ssh, and the goal. */
  link?: {
    describe: string;
    mbit: number;
    rttMs: number;
    /** measureLink's figures, or why they could not be taken. */
    measured: LinkFigures | string;
    /** 1.3 × (changed bytes ÷ link rate) + 1 s. */
    goalS: number;
  };
}

export interface Machine {
  nproc: number;
  cpu: string;
  memGiB: number;
  kernel: string;
  node: string;
}

export interface BenchResult {
  version: 1;
  date: string;
  commit: string;
  machine: Machine;
  options: Omit<BenchOptions, 'out' | 'tmp' | 'keep'> & { cache: 'warm' | 'cold' };
  scenarios: ScenarioResult[];
}

export function machine(): Machine {
  const c = cpus();
  return {
    nproc: c.length,
    cpu: c[0]?.model.trim() ?? 'unknown',
    memGiB: Math.round((totalmem() / 1024 ** 3) * 10) / 10,
    kernel: release(),
    node: process.version,
  };
}

export const load = (): number[] => loadavg().map((l) => Math.round(l * 100) / 100);

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/**
 * Bytes a run wrote to files, bounded from above by two counters that
 * over-count in different ways: wchar counts pipes too (rsync's processes
 * talk through them), write_bytes counts whole page-cache folios dirtied
 * (a 64 KiB write into a file written with large writes dirties a 2 MiB
 * folio on this kernel). The smaller is the tighter bound.
 */
export const writtenBytes = (m: Measurement): number => Math.min(m.wchar, m.writeBytes);

/** The remote scenario's goal for a sync over a link of `mbit`: 1.3 × the changed bytes' transfer time + 1 s. */
export const remoteGoalS = (changedBytes: number, mbit: number): number => (1.3 * changedBytes * 8) / (mbit * 1e6) + 1;

export function summarize(runs: readonly RunRecord[], changedBytes: number, kind: Tool['kind']): Summary {
  const wall = runs.map((r) => r.wallS);
  const written = median(runs.map(writtenBytes));
  const wire = runs.flatMap((r) => (r.wire ? [r.wire.sent + r.wire.received] : []));
  const link = runs.flatMap((r) => (r.linkBytes === undefined ? [] : [r.linkBytes]));
  return {
    ...(wire.length ? { wireMedian: median(wire) } : {}),
    ...(link.length ? { linkMedian: median(link) } : {}),
    wallMedianS: median(wall),
    wallMinS: Math.min(...wall),
    wallMaxS: Math.max(...wall),
    cpuMedianS: median(runs.map((r) => r.userS + r.sysS)),
    maxRssMiB: Math.max(...runs.map((r) => r.maxRssKiB)) / 1024,
    rcharMedian: median(runs.map((r) => r.rchar)),
    writtenMedian: written,
    ...(kind === 'sync' && changedBytes > 0 ? { writtenPerChanged: written / changedBytes } : {}),
  };
}

/** Fills in each tool's ratio to the reference tool of its scenario. */
export function addRatios(s: ScenarioResult, ref: ToolId): void {
  const refWall = s.tools.find((t) => t.id === ref)?.summary?.wallMedianS;
  if (!refWall) return;
  for (const t of s.tools) if (t.summary) t.summary.ratioToRef = t.summary.wallMedianS / refWall;
}

const MiB = 1024 * 1024;
const f = (x: number, d = 2): string => x.toFixed(d);

const HEADER = ['tool', 'wall s', 'min–max', '×cat', 'CPU s', 'RSS MiB', 'read MiB', 'written MiB', '×changed', 'ok'];
/** The remote scenario's extra columns: through ssh (sent + received), and on the link. */
const WIRE = ['ssh MiB', 'link MiB'];

function row(t: ToolResult, wire: boolean): string[] {
  const s = t.summary;
  const width = HEADER.length + (wire ? WIRE.length : 0);
  if (!s) return [t.label, t.status, ...Array(width - 2).fill('')];
  // A sync tool whose output is not compared (virtnbdbackup's, in the domain scenario) only ran.
  const ok = t.status === 'ok' ? (t.kind === 'sync' && t.runs.every((r) => r.correct !== null) ? 'identical' : 'ran') : t.status;
  const mib = (x: number | undefined): string => (x === undefined ? '' : f(x / MiB, 1));
  return [
    t.label,
    f(s.wallMedianS),
    `${f(s.wallMinS)}–${f(s.wallMaxS)}`,
    s.ratioToRef === undefined ? '' : f(s.ratioToRef),
    f(s.cpuMedianS),
    f(s.maxRssMiB, 0),
    f(s.rcharMedian / MiB, 1),
    // Over ssh the far side writes, under sshd, outside the measured process tree: no figure rather than a wrong one.
    wire ? '' : f(s.writtenMedian / MiB, 1),
    wire || s.writtenPerChanged === undefined ? '' : f(s.writtenPerChanged),
    ...(wire ? [mib(s.wireMedian), mib(s.linkMedian)] : []),
    ok,
  ];
}

/** One line per tool that failed: the first line of its reason (the JSON has the whole of it). */
function failures(s: ScenarioResult): string[] {
  return s.tools
    .filter((t) => t.status === 'failed')
    .map((t) => `- ${t.label} failed: ${(t.reason ?? '').split('\n').map((l) => l.trim()).filter(Boolean).slice(0, 3).join(' / ').slice(0, 400)}`);
}

function linkLines(s: ScenarioResult): string[] {
  const l = s.link;
  if (!l) return [];
  const m = l.measured;
  const measured =
    typeof m === 'string'
      ? `not measured: ${m}`
      : `measured through ssh: round trip ${f(m.rttMs, 1)} ms, push ${f(m.pushMbit, 0)} Mbit/s, pull ${f(m.pullMbit, 0)} Mbit/s of payload, \`ssh HOST true\` ${f(m.sshTrueMs, 0)} ms`;
  const vs = s.tools.map((t) => `${t.label} ${t.summary && t.status === 'ok' ? `${f(t.summary.wallMedianS / l.goalS)}×` : t.status}`);
  return [
    `link: ${l.describe}; ${measured}`,
    'CPU, RSS and read are of the sending side (tool and counting wrapper); the far side runs under sshd, unmeasured',
    `goal: 1.3 × (changed ${f(s.changedBytes / MiB, 1)} MiB ÷ ${l.mbit} Mbit/s) + 1 s = ${f(l.goalS)} s; median wall ÷ goal: ${vs.join(', ')}`,
    '',
  ];
}

/**
 * qsync's forced read against the floors of the same run: each floor's
 * median wall time, and the faster of them (the read goals are set against it).
 */
function floorLine(s: ScenarioResult): string[] {
  const wall = (id: ToolId): number | undefined => {
    const t = s.tools.find((x) => x.id === id);
    return t?.status === 'ok' ? t.summary?.wallMedianS : undefined;
  };
  const [q, cat, b3] = [wall('qsync-c'), wall('cat'), wall('b3sum')];
  if (q === undefined || cat === undefined || b3 === undefined) return [];
  return [`forced read: qsync -a -c ÷ cat ${f(q / cat)}×, ÷ b3sum ${f(q / b3)}×, ÷ the faster of the two ${f(q / Math.min(cat, b3))}×`];
}

/** Markdown table: readable on a terminal and pasteable into the README. */
export function table(r: BenchResult): string {
  const out: string[] = [];
  for (const s of r.scenarios) {
    out.push(
      `### ${s.name}: ${s.description}`,
      `source ${f(s.sourceBytes / MiB, 0)} MiB, changed ${f(s.changedBytes / MiB, 1)} MiB, load ${s.loadBefore[0]} → ${s.loadAfter[0]}, page cache ${s.cold ? 'dropped before every command' : 'warm'}`,
      '',
    );
    const wire = s.link !== undefined;
    out.push(...linkLines(s));
    const rows = [[...HEADER.slice(0, -1), ...(wire ? WIRE : []), HEADER.at(-1)!], ...s.tools.map((t) => row(t, wire))];
    const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
    const line = (cells: string[]): string => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(' | ')} |`;
    out.push(line(rows[0]!), `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`, ...rows.slice(1).map(line));
    const floors = floorLine(s);
    if (floors.length) out.push('', ...floors);
    const failed = failures(s);
    if (failed.length) out.push('', ...failed);
    // The memory check cares about the first copy too; elsewhere it is only set-up.
    for (const t of s.name === 'memory' ? s.tools : []) {
      if (t.baseline) out.push(`first copy by ${t.label}: ${f(t.baseline.wallS)} s, peak RSS ${f(t.baseline.maxRssKiB / 1024, 0)} MiB`);
    }
    out.push('');
  }
  return out.join('\n');
}
