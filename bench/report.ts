/** Results: their JSON shape, the summary statistics and the terminal table. */
import { cpus, loadavg, release, totalmem } from 'node:os';
import type { BenchOptions } from './args.js';
import type { Measurement } from './measure.js';
import type { Tool, ToolId } from './tools.js';

export interface RunRecord extends Measurement {
  /** Target byte-identical to the source after the run (null for floors). */
  correct: boolean | null;
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
  /** Median wall time over the reference's (cat) in the same scenario. */
  ratioToRef?: number;
  /** Median bytes written over the bytes that changed in the source. */
  writtenPerChanged?: number;
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
  tools: ToolResult[];
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

export function summarize(runs: readonly Measurement[], changedBytes: number, kind: Tool['kind']): Summary {
  const wall = runs.map((r) => r.wallS);
  const written = median(runs.map(writtenBytes));
  return {
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

function row(t: ToolResult): string[] {
  const s = t.summary;
  if (!s) return [t.label, t.status, ...Array(HEADER.length - 2).fill('')];
  const ok = t.status === 'ok' ? (t.kind === 'sync' ? 'identical' : 'ran') : t.status;
  return [
    t.label,
    f(s.wallMedianS),
    `${f(s.wallMinS)}–${f(s.wallMaxS)}`,
    s.ratioToRef === undefined ? '' : f(s.ratioToRef),
    f(s.cpuMedianS),
    f(s.maxRssMiB, 0),
    f(s.rcharMedian / MiB, 1),
    f(s.writtenMedian / MiB, 1),
    s.writtenPerChanged === undefined ? '' : f(s.writtenPerChanged),
    ok,
  ];
}

/** Markdown table: readable on a terminal and pasteable into the README. */
export function table(r: BenchResult): string {
  const out: string[] = [];
  for (const s of r.scenarios) {
    out.push(
      `### ${s.name}: ${s.description}`,
      `source ${f(s.sourceBytes / MiB, 0)} MiB, changed ${f(s.changedBytes / MiB, 1)} MiB, load ${s.loadBefore[0]} → ${s.loadAfter[0]}`,
      '',
    );
    const rows = [HEADER, ...s.tools.map(row)];
    const widths = HEADER.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
    const line = (cells: string[]): string => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(' | ')} |`;
    out.push(line(rows[0]!), `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`, ...rows.slice(1).map(line));
    // The memory check cares about the first copy too; elsewhere it is only set-up.
    for (const t of s.name === 'memory' ? s.tools : []) {
      if (t.baseline) out.push(`first copy by ${t.label}: ${f(t.baseline.wallS)} s, peak RSS ${f(t.baseline.maxRssKiB / 1024, 0)} MiB`);
    }
    out.push('');
  }
  return out.join('\n');
}
