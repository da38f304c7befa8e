/** The benchmark's command line and table for the cold scenario (bench/args.ts, bench/report.ts); no timing. */
import { describe, expect, it } from 'vitest';
import { parseBenchArgs } from '../bench/args.js';
import { table, type BenchResult, type ToolResult } from '../bench/report.js';

const defaults = { out: '/o', tmp: '/t', qsync: '/q/main.js' };

describe('bench --cold', () => {
  it('alone runs the cold scenario; with --scenarios it drops the cache for those; the default set leaves cold out', () => {
    expect(parseBenchArgs(['--cold'], defaults)).toMatchObject({ cold: true, scenarios: ['cold'] });
    expect(parseBenchArgs(['--cold', '--scenarios', 'scattered,touch'], defaults)).toMatchObject({ cold: true, scenarios: ['scattered', 'touch'] });
    const plain = parseBenchArgs([], defaults);
    expect(plain.cold).toBe(false);
    expect(plain.scenarios).not.toContain('cold');
  });

  it('the table says the cache was dropped and sets the forced read against the faster of cat and b3sum', () => {
    const tool = (id: ToolResult['id'], label: string, wall: number): ToolResult => ({
      id, label, kind: id.startsWith('qsync') ? 'sync' : 'floor', status: 'ok', runs: [],
      summary: { wallMedianS: wall, wallMinS: wall, wallMaxS: wall, cpuMedianS: 0, maxRssMiB: 1, rcharMedian: 0, writtenMedian: 0 } as ToolResult['summary'],
    });
    const r = {
      scenarios: [{
        name: 'cold', description: 'd', sourceBytes: 1 << 30, changedBytes: 0, loadBefore: [0], loadAfter: [0], cold: true,
        tools: [tool('qsync-c', 'qsync -a -c', 1.5), tool('cat', 'cat', 1.2), tool('b3sum', 'b3sum --num-threads 2', 1.0)],
      }],
    } as unknown as BenchResult;
    const text = table(r);
    expect(text).toContain('page cache dropped before every command');
    expect(text).toContain('forced read: qsync -a -c ÷ cat 1.25×, ÷ b3sum 1.50×, ÷ the faster of the two 1.50×');
  });
});
