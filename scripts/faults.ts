/**
 * `npm run faults`: the fault campaign against the built CLI
 * (docs/RELIABILITY.md). Bounded for CI by default; longer by hand:
 *
 *   npm run faults -- [--ci] [--trials N] [--seed S] [--class NAME]... [--trial T [--repeat N]] [--json] [--keep] [--timeout SEC]
 *
 * --ci: the CI tier's small budget (every class and variant once). --trial T:
 * only trial T (a reproduction line names class, seed and trial).
 * Exits 1 when any bad outcome was counted, 2 on bad usage.
 */
import { CI_TRIALS, CLASSES, formatTable, reproduction, runCampaign } from './faults/campaign.js';

function usage(msg: string): never {
  process.stderr.write(
    `faults: ${msg}\nusage: npm run faults -- [--ci] [--trials N] [--seed S] [--class NAME]... [--trial T [--repeat N]] [--json] [--keep] [--timeout SEC] [--quiet]\n` +
      `classes: ${CLASSES.map((c) => `${c.name} (${c.summary})`).join('\n         ')}\n`,
  );
  process.exit(2);
}

const argv = process.argv.slice(2);
let seed = Math.floor(Date.now() / 1000) % 1_000_000;
let trials: number | undefined;
let only: number | undefined;
let repeat = 1;
let json = false;
let ci = false;
let keep = false;
let quiet = false;
let timeoutMs: number | undefined;
const classes: string[] = [];
const num = (i: number): number => {
  const v = Number(argv[i]);
  if (argv[i] === undefined || !Number.isSafeInteger(v) || v < 0) usage(`${argv[i - 1]} needs a whole number`);
  return v;
};
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  if (a === '--trials') trials = num(++i);
  else if (a === '--seed') seed = num(++i);
  else if (a === '--trial') only = num(++i);
  else if (a === '--repeat') repeat = Math.max(1, num(++i));
  else if (a === '--timeout') timeoutMs = num(++i) * 1000;
  else if (a === '--class') classes.push(argv[++i] ?? usage('--class needs a name'));
  else if (a === '--json') json = true;
  else if (a === '--ci') ci = true;
  else if (a === '--keep') keep = true;
  else if (a === '--quiet') quiet = true;
  else if (a === '--help' || a === '-h') usage('help');
  else usage(`unknown argument ${a}`);
}
if (process.getuid?.() !== 0) usage('the campaign runs as root (privilege and disk-full classes need it)');

const log = (m: string) => {
  if (!quiet) process.stderr.write(`${m}\n`);
};
log(`faults: seed ${seed}${trials !== undefined ? `, ${trials} trials per class` : ''}`);
try {
  const r = await runCampaign({ seed, trials, perClass: ci && trials === undefined ? CI_TRIALS : undefined, classes, only, repeat, timeoutMs, keep, requireAll: process.env.QSYNC_REQUIRE_QEMU === '1', log });
  if (json) process.stdout.write(`${JSON.stringify(r, null, 2)}\n`);
  else {
    process.stdout.write(`\nseed ${r.seed}\n${formatTable(r)}\n`);
    if (r.failures.length) process.stdout.write(`\n${r.failures.length} bad outcomes:\n${r.failures.map(reproduction).join('\n')}\n`);
    else process.stdout.write('\nno bad outcome\n');
  }
  process.exitCode = r.bad > 0 ? 1 : 0;
} catch (e) {
  usage((e as Error).message);
}
