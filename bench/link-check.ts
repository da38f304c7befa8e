/**
 * `node dist/bench/link-check.js [RTT_MS MBIT]`: sets up the benchmark's
 * shaped link (bench/link.ts) and the same through an unshaped one (sshd on
 * 127.0.0.1), measures both through ssh and prints the figures. Root.
 */
import { measureLink, startShapedLink, type LinkFigures } from './link.js';
import { startSshd } from '../test/helpers/sshd.js';

const show = (what: string, f: LinkFigures): string =>
  `${what}: ssh true ${f.sshTrueMs.toFixed(1)} ms, round trip ${f.rttMs.toFixed(1)} ms, push ${f.pushMbit.toFixed(0)} Mbit/s, pull ${f.pullMbit.toFixed(0)} Mbit/s`;

async function main(): Promise<void> {
  const rttMs = Number(process.argv[2] ?? 50);
  const mbit = Number(process.argv[3] ?? 200);
  const plain = await startSshd();
  try {
    process.stdout.write(`${show('loopback, unshaped', await measureLink(plain.rsh, plain.host))}\n`);
  } finally {
    await plain.stop();
  }
  const link = await startShapedLink({ rttMs, mbit });
  try {
    process.stdout.write(`${link.describe}\n${show(`shaped, target RTT ${rttMs} ms and ${mbit} Mbit/s`, await measureLink(link.rsh, link.host))}\n`);
  } finally {
    await link.stop();
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`link-check: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exitCode = 1;
});
