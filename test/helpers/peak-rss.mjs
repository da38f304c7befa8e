/**
 * Preloaded into a qsync run (`node --import peak-rss.mjs main.js ...`, see
 * runQsync's peakRss in test/helpers/cli.ts): as the process exits, its peak
 * resident set (VmHWM of /proc/self/status, KiB: the node process alone, not
 * the QEMU daemons it starts) is written to the file named by
 * QSYNC_TEST_PEAK_RSS.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { isMainThread } from 'node:worker_threads';

const out = process.env.QSYNC_TEST_PEAK_RSS;
if (isMainThread && out) {
  process.on('exit', () => {
    const kib = /^VmHWM:\s+(\d+) kB$/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1];
    writeFileSync(out, kib ?? '');
  });
}
