/**
 * The CI tier of the fault campaign (docs/RELIABILITY.md): the built
 * campaign (`npm run faults -- --ci`) drives the built CLI through every
 * fault class at least once and must count no bad outcome. Each bad outcome
 * comes with a one-line reproduction (class, seed, trial, what was wrong).
 * QSYNC_FAULTS_SEED picks another seed.
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

const CAMPAIGN = join(import.meta.dirname, '../dist/scripts/faults.js');
const SEED = process.env.QSYNC_FAULTS_SEED ?? '20261201';

interface Result {
  classes: { name: string; tally: Record<string, number>; skipped?: string }[];
  failures: { cls: string; seed: number; trial: number; kind: string; what: string }[];
  bad: number;
}

function campaign(): Promise<{ code: number | null; result: Result; stderr: string }> {
  const child = spawn(process.execPath, [CAMPAIGN, '--ci', '--json', '--quiet', '--seed', SEED], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (err += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), 280_000);
  return new Promise((resolve) => {
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, result: JSON.parse(out || '{"classes":[],"failures":[],"bad":-1}') as Result, stderr: err });
    });
  });
}

describe.skipIf(process.getuid?.() !== 0)('fault campaign, CI tier', () => {
  it('runs every class and finds no bad outcome', { timeout: 300_000 }, async () => {
    const { code, result, stderr } = await campaign();
    const lines = result.failures.map((f) => `npm run faults -- --class ${f.cls} --seed ${f.seed} --trial ${f.trial}   # ${f.kind}: ${f.what}`);
    expect(stderr, 'the campaign itself failed').not.toMatch(/campaign error|^faults: /m);
    expect(result.classes.map((c) => c.name).sort()).toEqual(['concurrent', 'crash', 'disk-full', 'image', 'mutate', 'race']);
    for (const c of result.classes) expect(c.tally.trials + (c.skipped ? 1 : 0), `${c.name} ran no trial`).toBeGreaterThan(0);
    expect(lines.join('\n')).toBe('');
    expect(result.bad).toBe(0);
    expect(code).toBe(0);
  });
});
