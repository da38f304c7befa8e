#!/usr/bin/env node
/**
 * The qsync command. Sets process.exitCode and lets output drain (never
 * process.exit after writing to a pipe), except on a signal.
 */
import { readFileSync } from 'node:fs';
import { main, onSignal } from './app.js';

for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, onSignal);
// Output piped into `head` and closed: the sync goes on (stopping it halfway would gain nothing), unheard.
for (const stream of [process.stdout, process.stderr]) {
  stream.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code !== 'EPIPE') throw e;
  });
}
const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };
process.exitCode = await main(process.argv.slice(2), {
  stdout: process.stdout,
  stderr: process.stderr,
  isTTY: Boolean(process.stderr.isTTY),
  version: pkg.version,
});
