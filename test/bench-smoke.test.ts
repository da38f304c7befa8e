/**
 * The benchmark's quick mode as a smoke test: every tool ran in every
 * scenario and every target is byte-identical. No timing is asserted.
 * Two runs, so restoring the targets between runs is exercised too.
 * Runs the compiled harness (npm test compiles first).
 */
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import type { BenchResult } from '../bench/report.js';
import { needTools } from './helpers/env.js';

const run = promisify(execFile);
const root = join(import.meta.dirname, '..');
const harness = join(root, 'dist', 'bench', 'run.js');
const TOOLS = ['qsync', 'qsync-c', 'rsync', 'rsync-inplace', 'cat', 'b3sum'];
const SCENARIOS = ['first', 'touch', 'scattered', 'clustered', 'grow', 'qcow2'];

describe.skipIf(!needTools('rsync', 'b3sum', 'qemu-img', 'qemu-io', 'cmp', '/usr/bin/time'))('bench --quick', () => {
  const out = mkdtempSync(join(tmpdir(), 'qsync-bench-smoke-'));
  afterAll(() => rmSync(out, { recursive: true, force: true }));

  it('runs every tool in every scenario and leaves identical targets', { timeout: 180_000 }, async () => {
    expect(existsSync(harness), `${harness} missing: compile with tsc -p . first`).toBe(true);
    // The exit status says whether a tool failed; the JSON below says which, so read it either way.
    await run(process.execPath, [harness, '--quick', '--runs', '2', '--out', out], { cwd: root, maxBuffer: 16 << 20 }).catch(() => {});
    const result = JSON.parse(readFileSync(join(out, 'latest.json'), 'utf8')) as BenchResult;
    expect(result.scenarios.map((s) => s.name)).toEqual(SCENARIOS);
    for (const s of result.scenarios) {
      expect(s.tools.map((t) => t.id)).toEqual(TOOLS);
      for (const t of s.tools) {
        const where = `${s.name} / ${t.label}: ${t.reason ?? ''}`;
        expect(t.status, where).toBe('ok');
        expect(t.runs, where).toHaveLength(2);
        for (const r of t.runs) {
          expect(r.exitCode, where).toBe(0);
          expect(r.correct, where).toBe(t.kind === 'sync' ? true : null);
          // A restored target keeps what made qsync trust it: the source is read once, the target not at all.
          if (t.id.startsWith('qsync') && s.name !== 'first') expect(r.rchar, `${where} read both sides`).toBeLessThan(1.5 * s.sourceBytes);
        }
      }
    }
    expect(existsSync(join(out, 'latest.svg'))).toBe(true);
  });
});
