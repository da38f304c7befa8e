/**
 * Ends a test run with one plain line, "N passed, N failed, N skipped", that
 * tools reading a run's last lines understand whatever the test runner.
 */
import type { Reporter, TestModule } from 'vitest/node';

export default class SummaryReporter implements Reporter {
  onTestRunEnd(modules: ReadonlyArray<TestModule>): void {
    const count = { passed: 0, failed: 0, skipped: 0, pending: 0 };
    for (const m of modules) for (const t of m.children.allTests()) count[t.result().state]++;
    // A module that failed to load has no tests to count, but the run failed.
    const broken = modules.filter((m) => m.state() === 'failed' && ![...m.children.allTests()].length).length;
    process.stdout.write(`\n${count.passed} passed, ${count.failed + broken} failed, ${count.skipped + count.pending} skipped\n`);
  }
}
