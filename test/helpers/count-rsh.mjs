#!/usr/bin/env node
/**
 * A remote shell that counts: `node count-rsh.mjs COUNTFILE ssh ARGS...`
 * runs `ssh ARGS...`, pipes its own stdin into ssh and ssh's stdout to its
 * own stdout (stream pipes: nothing is buffered beyond their backpressure),
 * passes stderr through, and when ssh has exited and its output is written,
 * appends `SENT RECEIVED\n` (bytes into ssh, bytes out of it) to COUNTFILE
 * and exits with ssh's exit status (128 + signal number if it was killed).
 * SIGINT, SIGTERM and SIGHUP are passed on to ssh.
 */
import { spawn } from 'node:child_process';
import { appendFileSync } from 'node:fs';
import { constants } from 'node:os';

const [countFile, cmd, ...args] = process.argv.slice(2);
if (!countFile || !cmd) {
  process.stderr.write('usage: count-rsh.mjs COUNTFILE COMMAND [ARGS...]\n');
  process.exit(2);
}

let sent = 0;
let received = 0;
let finished = false;

const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'inherit'] });

function finish(code) {
  if (finished) return;
  finished = true;
  process.stdin.unpipe(child.stdin);
  process.stdin.destroy(); // the client may keep its end open: do not wait for its EOF
  try {
    appendFileSync(countFile, `${sent} ${received}\n`);
  } catch (e) {
    process.stderr.write(`count-rsh: cannot write ${countFile}: ${e.message}\n`);
  }
  // Everything ssh printed is queued on stdout: exit once it is written.
  process.stdout.write('', () => process.exit(code));
}

child.on('error', (e) => {
  process.stderr.write(`count-rsh: cannot run ${cmd}: ${e.message}\n`);
  finish(127);
});
// 'close': ssh has exited and its stdout is at its end (all of it piped on).
child.on('close', (code, signal) => finish(signal ? 128 + (constants.signals[signal] ?? 0) : (code ?? 1)));

process.stdin.on('data', (chunk) => (sent += chunk.length));
child.stdout.on('data', (chunk) => (received += chunk.length));
process.stdin.pipe(child.stdin);
child.stdout.pipe(process.stdout);

// ssh gone while data is still coming in: that data is dropped, as ssh would have.
child.stdin.on('error', () => {});
// Whoever reads our stdout went away: stop reading ssh, which then sees its pipe closed.
process.stdout.on('error', () => child.stdout.destroy());

for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    if (child.exitCode === null && child.signalCode === null) child.kill(sig);
  });
}
