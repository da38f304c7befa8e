/** The benchmark's command line, parsed without side effects. */
import { parseArgs, type ParseArgsConfig } from 'node:util';

export const SCENARIO_NAMES = ['first', 'touch', 'scattered', 'clustered', 'grow', 'qcow2', 'memory', 'image', 'remote', 'domain', 'cold'] as const;
export type ScenarioName = (typeof SCENARIO_NAMES)[number];

/**
 * Scenarios run when --scenarios is not given (and by --quick, the CI smoke
 * test): memory writes a 16 GiB sparse file, image needs QEMU, remote needs
 * root for a network namespace, domain libvirt and virtnbdbackup, cold root
 * to drop the page cache: opt in.
 */
const OPT_IN: readonly ScenarioName[] = ['memory', 'image', 'remote', 'domain', 'cold'];
const DEFAULT_SCENARIOS: readonly ScenarioName[] = SCENARIO_NAMES.filter((s) => !OPT_IN.includes(s));

export interface BenchOptions {
  /** Source image size in bytes (multiple of the 64 KiB block). */
  size: number;
  /** Fraction of 64 KiB blocks changed by the scattered and qcow2 scenarios. */
  change: number;
  runs: number;
  scenarios: ScenarioName[];
  /** Drop the page cache before every timed run (root only); alone, it picks the cold scenario. */
  cold: boolean;
  /** Where latest.json and latest.svg go. */
  out: string;
  /** Parent of the temporary work directory (deleted at the end unless keep). */
  tmp: string;
  keep: boolean;
  quick: boolean;
  /** The qsync CLI to run (default: this tree's dist/src/cli/main.js). */
  qsync: string;
}

export const BLOCK = 64 * 1024;
const QUICK_SIZE = 64 * 1024 * 1024;

export const USAGE = `usage: npm run bench -- [options]
  --size N        source image size, e.g. 2G, 512M (default 2G; --quick: 64M)
  --change P      scattered change, e.g. 1% or 0.01 (default 1%)
  --runs N        timed runs per tool and scenario (default 5; --quick: 1)
  --scenarios L   comma list of ${SCENARIO_NAMES.join(',')}
                  (default: all but memory, image, remote, domain and cold)
  --quick         64 MiB, 1 run, the default scenarios: the CI smoke test
  --cold          drop the page cache before each timed run (root); without
                  --scenarios: the cold scenario (forced read against cat and b3sum)
  --out DIR       where latest.json and latest.svg are written (default bench/results)
  --tmp DIR       parent of the work directory (default: the OS temp dir)
  --keep          keep the work directory
  --qsync FILE    the qsync main.js to run (default dist/src/cli/main.js): e.g. a
                  snapshot of dist, so a rebuild during the run does not change it`;

/** "2G", "512M", "64k", "1048576" → bytes (binary units). */
export function parseSize(text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$/i.exec(text.trim());
  if (!m) throw new Error(`bad size: ${text}`);
  const exp = ' kmgt'.indexOf((m[2] || ' ').toLowerCase());
  return Math.round(Number(m[1]) * 1024 ** exp);
}

/** "1%" or "0.01" → 0.01. */
export function parseFraction(text: string): number {
  const pct = text.trim().endsWith('%');
  const v = Number(pct ? text.trim().slice(0, -1) : text) / (pct ? 100 : 1);
  if (!(v > 0 && v <= 1)) throw new Error(`bad change fraction: ${text}`);
  return v;
}

export function parseBenchArgs(argv: string[], defaults: { out: string; tmp: string; qsync: string }): BenchOptions {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      size: { type: 'string' },
      change: { type: 'string' },
      runs: { type: 'string' },
      scenarios: { type: 'string' },
      quick: { type: 'boolean', default: false },
      cold: { type: 'boolean', default: false },
      out: { type: 'string' },
      tmp: { type: 'string' },
      keep: { type: 'boolean', default: false },
      qsync: { type: 'string' },
    },
  });
  const quick = values.quick ?? false;
  const size = values.size ? parseSize(values.size) : quick ? QUICK_SIZE : 2 * 1024 ** 3;
  if (size < 16 * BLOCK || size % BLOCK) throw new Error(`--size must be a multiple of 64 KiB and at least 1 MiB`);
  const runs = values.runs ? Number(values.runs) : quick ? 1 : 5;
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`bad --runs: ${values.runs}`);
  const cold = values.cold ?? false;
  const scenarios = values.scenarios ? values.scenarios.split(',').map((s) => s.trim()) : cold ? ['cold'] : [...DEFAULT_SCENARIOS];
  for (const s of scenarios) {
    if (!(SCENARIO_NAMES as readonly string[]).includes(s)) throw new Error(`unknown scenario: ${s}`);
  }
  return {
    size,
    change: values.change ? parseFraction(values.change) : 0.01,
    runs,
    scenarios: scenarios as ScenarioName[],
    cold,
    out: values.out ?? defaults.out,
    tmp: values.tmp ?? defaults.tmp,
    keep: values.keep ?? false,
    quick,
    qsync: values.qsync ?? defaults.qsync,
  };
}

/** A bench script's own options (node:util parseArgs): a wrong one is a one-line message and the script's usage (exit 2), not a stack trace. */
export function parseScriptArgs<T extends ParseArgsConfig>(config: T, usage: string): ReturnType<typeof parseArgs<T>> {
  try {
    return parseArgs(config);
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n${usage}\n`);
    process.exit(2);
  }
}
