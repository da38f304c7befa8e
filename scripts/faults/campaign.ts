/**
 * The campaign: run trials of each fault class, sum their outcomes, and
 * print one reproduction line per bad outcome. Used by scripts/faults.ts
 * (the npm script) and test/faults.test.ts (the CI tier).
 */
import { crashClass } from './crash.js';
import { concurrentClass } from './concurrent.js';
import { diskFullClass } from './disk-full.js';
import { imageClass } from './image.js';
import { mutateClass } from './mutate.js';
import { raceClass } from './race.js';
import {
  BAD_KEYS,
  emptyTally,
  newWorkspace,
  removeWorkspace,
  Rng,
  TrialReport,
  trialSeed,
  type FaultClass,
  type Failure,
  type Tally,
} from './runner.js';

export const CLASSES: readonly FaultClass[] = [crashClass, mutateClass, raceClass, diskFullClass, concurrentClass, imageClass];

/**
 * The CI tier (test/faults.test.ts, `--ci`): every class, every operation or variant of it at least once
 * (crash: its 5 operations; mutate: its 12 first trials meet every file kind and every mutation;
 * disk-full: first copy, update, history; concurrent: the 4 lock states), under 3 minutes on 2 cores.
 */
export const CI_TRIALS: Readonly<Record<string, number>> = { crash: 5, mutate: 12, race: 1, 'disk-full': 3, concurrent: 4, image: 1 };

export interface CampaignOptions {
  seed: number;
  /** Trials per class; undefined: each class's default (CI-bounded). */
  trials?: number;
  /** Per-class trial counts (override `trials`). */
  perClass?: Record<string, number>;
  classes?: string[];
  /** Run only this trial number (a reproduction). */
  only?: number;
  /** Run each trial this many times (timing-dependent outcomes: a kill instant lands on what the run is doing then). */
  repeat?: number;
  /** Per-run timeout (ms) for every class; undefined: each class's own. */
  timeoutMs?: number;
  keep: boolean;
  /** Under QSYNC_REQUIRE_QEMU=1 a class that cannot run is a failure, not a skip. */
  requireAll: boolean;
  log: (msg: string) => void;
}

export interface ClassResult {
  name: string;
  tally: Tally;
  skipped?: string;
  seconds: number;
}

export interface CampaignResult {
  seed: number;
  classes: ClassResult[];
  failures: Failure[];
  bad: number;
}

export const reproduction = (f: Failure): string =>
  `npm run faults -- --class ${f.cls} --seed ${f.seed} --trial ${f.trial}   # ${f.kind}: ${f.what}`;

export async function runCampaign(o: CampaignOptions): Promise<CampaignResult> {
  const classes = o.classes?.length ? CLASSES.filter((c) => o.classes!.includes(c.name)) : CLASSES;
  const unknown = (o.classes ?? []).filter((n) => !CLASSES.some((c) => c.name === n));
  if (unknown.length) throw new Error(`unknown class ${unknown.join(', ')}; classes: ${CLASSES.map((c) => c.name).join(', ')}`);
  const failures: Failure[] = [];
  const results: ClassResult[] = [];
  for (const cls of classes) {
    const t0 = performance.now();
    const tally = emptyTally();
    const why = cls.unavailable?.();
    if (why) {
      tally.skipped = 1;
      if (o.requireAll) {
        tally.crashes = 1;
        failures.push({ cls: cls.name, seed: o.seed, trial: 0, kind: 'crashes', what: `class cannot run and QSYNC_REQUIRE_QEMU=1: ${why}` });
      }
      o.log(`${cls.name}: skipped (${why})`);
      results.push({ name: cls.name, tally, skipped: why, seconds: 0 });
      continue;
    }
    const count = o.perClass?.[cls.name] ?? o.trials ?? cls.defaultTrials;
    const trials = (o.only !== undefined ? [o.only] : Array.from({ length: count }, (_, i) => i)).flatMap((t) => Array<number>(o.repeat ?? 1).fill(t));
    for (const trial of trials) {
      const ws = newWorkspace(cls.name, trial);
      const report = new TrialReport();
      const rng = new Rng(trialSeed(o.seed, cls.name, trial));
      const log = (m: string) => o.log(`${cls.name} #${trial}: ${m}`);
      try {
        await cls.trial({ rng, trial, seed: o.seed, ws, timeoutMs: o.timeoutMs ?? cls.timeoutMs, log }, report);
      } catch (e) {
        // A campaign bug or an environment failure, not a qsync outcome: say so loudly.
        report.note('crashes', `campaign error (not qsync): ${(e as Error)?.stack ?? e}`);
      } finally {
        if (!o.keep) removeWorkspace(ws);
        else log(`kept ${ws}`);
      }
      tally.trials++;
      if (report.skipped) {
        tally.skipped++;
        log(`skipped: ${report.skipped}`);
        continue;
      }
      if (report.converged) tally.converged++;
      if (report.refused) tally.refused++;
      const kinds = new Set(report.bad.map((b) => b.kind));
      for (const k of kinds) tally[k]++;
      for (const b of report.bad) {
        const f: Failure = { cls: cls.name, seed: o.seed, trial, kind: b.kind, what: b.what.split('\n')[0]!.slice(0, 300) };
        failures.push(f);
        log(`BAD ${reproduction(f)}`);
      }
    }
    results.push({ name: cls.name, tally, seconds: (performance.now() - t0) / 1000 });
    o.log(`${cls.name}: done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  }
  const bad = results.reduce((a, r) => a + BAD_KEYS.reduce((s, k) => s + r.tally[k], 0), 0);
  return { seed: o.seed, classes: results, failures, bad };
}

const COLUMNS = ['trials', 'converged', 'refused', 'unconverged', 'unrestorable', 'lies', 'hangs', 'crashes', 'outside', 'readable', 'overlaps', 'skipped'] as const;

/** The per-class table (Markdown, so it pastes into docs/RELIABILITY.md). */
export function formatTable(r: CampaignResult): string {
  const lines = [`| class | ${COLUMNS.join(' | ')} | s |`, `|---|${COLUMNS.map(() => '---:').join('|')}|---:|`];
  for (const c of r.classes) lines.push(`| ${c.name} | ${COLUMNS.map((k) => c.tally[k]).join(' | ')} | ${c.seconds.toFixed(0)} |`);
  return lines.join('\n');
}
