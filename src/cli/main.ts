#!/usr/bin/env node
/**
 * The qsync command. Sets process.exitCode and lets output drain (never
 * process.exit after writing to a pipe), except on a signal.
 */
import { readFileSync } from 'node:fs';
import { sizeHeap } from '../hash/heap.js';
import { decodeName } from '../io/safe-fs.js';
import { main, onSignal } from './app.js';

/**
 * The arguments as the kernel passed them: Node decodes argv as UTF-8 and
 * loses bytes that are not (a path or pattern naming such a file), so they
 * are read from /proc/self/cmdline and decoded as names are (decodeName).
 * process.argv is used where that is not readable or does not line up.
 */
function rawArgs(): string[] {
  const args = process.argv.slice(2);
  try {
    const all = readFileSync('/proc/self/cmdline').toString('latin1').split('\0').slice(0, -1);
    const raw = all.slice(all.length - args.length).map((a) => decodeName(Buffer.from(a, 'latin1')));
    return all.length === process.execArgv.length + 2 + args.length && raw.every((a, i) => a === args[i] || args[i]!.includes('\ufffd')) ? raw : args;
  } catch {
    return args;
  }
}

sizeHeap();
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, onSignal);
// Output piped into `head` and closed: the sync goes on (stopping it halfway would gain nothing), unheard.
for (const stream of [process.stdout, process.stderr]) {
  stream.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code !== 'EPIPE') throw e;
  });
}
const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };
process.exitCode = await main(rawArgs(), {
  stdout: process.stdout,
  stderr: process.stderr,
  isTTY: Boolean(process.stderr.isTTY),
  version: pkg.version,
});
