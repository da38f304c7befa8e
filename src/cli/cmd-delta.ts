/**
 * The delta subcommands: apply, verify, info, restore, prune. src/cli/app.ts
 * dispatches here when argv[0] is one of DELTA_COMMANDS.
 */
import type { Writable } from 'node:stream';
import { basename, dirname } from 'node:path';
import yargs, { type Argv } from 'yargs';
import { DELTA_MAGIC, type DeltaHeader } from '../core/delta-codec.js';
import { isQsyncError, QsyncError } from '../core/errors.js';
import { escapeForTerminal } from './output.js';
import { DIGEST_LEN } from '../hash/blake3.js';
import { openDelta, verifyDeltaFile, type DeltaMemberSummary } from '../io/delta-file.js';
import { applyDelta } from '../sync/delta-apply.js';
import { listPoints, prune, restorePoint } from '../sync/delta-history.js';
import { manifestPathFor, openManifest } from '../sync/manifest-store.js';
import { setStateBase } from '../sync/state-dir.js';
import { hashFile } from '../sync/target-digests.js';
import { describeExit, EXIT, exitCodeFor } from './exit-codes.js';

export { DELTA_COMMANDS } from './commands.js';

export interface DeltaCliIO {
  stdout: Writable;
  stderr: Writable;
}

const hex = (b: Buffer) => (b.some((x) => x !== 0) ? b.toString('hex') : '(unknown)');

function describeMember(m: DeltaMemberSummary): Record<string, unknown> {
  const h: DeltaHeader = m.header;
  return {
    name: h.name,
    kind: h.kind,
    blockSize: h.blockSize,
    baseSize: h.baseSize,
    resultSize: h.resultSize,
    created: new Date(h.createdMs).toISOString(),
    compression: h.compression,
    records: m.records,
    dataRecords: m.dataRecords,
    zeroRecords: m.zeroRecords,
    payloadBytes: m.payloadBytes,
    baseFingerprint: hex(h.baseFingerprint),
    resultFingerprint: hex(h.resultFingerprint),
  };
}

async function isDelta(path: string): Promise<boolean> {
  const fh = await openDelta(path);
  try {
    const b = Buffer.alloc(DELTA_MAGIC.length);
    await fh.read(b, 0, b.length, 0);
    return b.toString('latin1') === DELTA_MAGIC;
  } finally {
    await fh.close();
  }
}

/** Hash TARGET and compare with its manifest. */
async function verifyTarget(target: string, manifestPath: string, out: Writable): Promise<void> {
  // Read-only: a pending patch journal is applied in memory, nothing in the state folder is written.
  const m = await openManifest(manifestPath, { readOnly: true });
  if (!m) throw new QsyncError('USAGE', `${target} has no manifest (${manifestPath}); give a delta or a synced target`, { file: target });
  try {
    const fh = await openDelta(target);
    try {
      const { size } = await fh.stat();
      if (size !== m.header.targetSize) throw new QsyncError('FORMAT', `${target} is ${size} bytes, its manifest says ${m.header.targetSize}`, { file: target });
      let bad = -1;
      await hashFile(fh, size, m.header.blockSize, async (first, digests) => {
        if (bad >= 0) return;
        const want = Buffer.alloc(digests.length);
        await m.readDigests(first, digests.length / DIGEST_LEN, want);
        for (let i = 0; bad < 0 && i < digests.length / DIGEST_LEN; i++) {
          if (!want.subarray(i * DIGEST_LEN, (i + 1) * DIGEST_LEN).equals(digests.subarray(i * DIGEST_LEN, (i + 1) * DIGEST_LEN))) bad = first + i;
        }
      });
      if (bad >= 0) {
        throw new QsyncError('FORMAT', `${target} differs from its manifest at block ${bad} (offset ${bad * m.header.blockSize})`, { file: target, block: bad });
      }
      out.write(`${target}: OK (${size} bytes, matches its manifest)\n`);
    } finally {
      await fh.close();
    }
  } finally {
    await m.close();
  }
}

function parser(argv: string[]): Argv {
  return yargs(argv)
    .scriptName('qsync')
    .exitProcess(false)
    .strict()
    .help()
    .version(false)
    .fail((msg, err) => {
      throw err ?? new QsyncError('USAGE', msg);
    })
    .command('apply <delta> <target>', 'apply DELTA to TARGET (a directory for a delta of several files)')
    .command('verify <path>', 'check a delta (structure, every record, hashes) or a target against its manifest', (y) =>
      y.option('manifest', { type: 'string', describe: 'manifest of TARGET (default: in the state folder)' }),
    )
    .command('info <delta>', 'describe a delta', (y) => y.option('json', { type: 'boolean' }))
    .command('restore <target> [out]', 'list the points in time of TARGET, or write one to OUT (a new file)', (y) =>
      y
        .option('backup-dir', { type: 'string', demandOption: true, describe: 'the --backup-dir the syncs kept history in' })
        .option('list', { type: 'boolean', describe: 'list the points in time' })
        .option('at', { type: 'string', describe: 'point number (1 = before the newest run) or a time' }),
    )
    .command('prune <dir>', 'keep the newest N runs of history in DIR', (y) => y.option('keep', { type: 'number', demandOption: true }))
    .option('state-dir', { type: 'string', describe: "where qsync keeps its state (manifests, intents, locks)" })
    .demandCommand(1)
    .wrap(null);
}

/** Run one delta subcommand; returns the exit code (rsync's table). */
export async function runDeltaCommand(argv: string[], io: DeltaCliIO): Promise<number> {
  try {
    let helpText = '';
    const args = (await parser(argv).parseAsync(argv, {}, (_err, _argv, output) => void (helpText = output))) as Record<string, unknown>;
    if (helpText) {
      io.stdout.write(`${helpText}\n`);
      return EXIT.OK.code;
    }
    const str = (k: string) => args[k] as string;
    if (args['state-dir'] !== undefined) setStateBase(str('state-dir'));
    switch ((args._ as string[])[0]) {
      case 'apply': {
        for (const m of await applyDelta(str('delta'), str('target'), { notice: (msg, t) => io.stderr.write(`qsync: ${escapeForTerminal(`${t ?? ''}: ${msg}`)}\n`) })) {
          io.stdout.write(`${escapeForTerminal(m.target)}: ${m.status}${m.status === 'already' ? '' : ` (${m.records} records)`}\n`);
        }
        return EXIT.OK.code;
      }
      case 'verify': {
        const path = str('path');
        if (await isDelta(path)) {
          const members = await verifyDeltaFile(path);
          io.stdout.write(`${path}: OK (${members.length} file${members.length === 1 ? '' : 's'}, ${members.reduce((a, m) => a + m.records, 0)} records)\n`);
        } else await verifyTarget(path, str('manifest') ?? manifestPathFor(dirname(path), basename(path)), io.stdout);
        return EXIT.OK.code;
      }
      case 'info': {
        const members = (await verifyDeltaFile(str('delta'))).map(describeMember);
        if (args.json) io.stdout.write(`${JSON.stringify(members, null, 2)}\n`);
        else for (const m of members) io.stdout.write(`${Object.entries(m).map(([k, v]) => `${k}: ${escapeForTerminal(String(v))}`).join('\n')}\n\n`);
        return EXIT.OK.code;
      }
      case 'restore': {
        const dir = str('backup-dir');
        const warn = (m: string) => void io.stderr.write(`qsync: warning: ${escapeForTerminal(m)}\n`);
        if (args.list || args.at === undefined) {
          const points = await listPoints(dir, str('target'), warn);
          io.stdout.write('  N  until                     size  records\n');
          for (const p of points) {
            io.stdout.write(`${String(p.n).padStart(3)}  ${p.until.toISOString()}  ${String(p.size).padStart(12)}  ${p.records}\n`);
          }
          return EXIT.OK.code;
        }
        if (!args.out) throw new QsyncError('USAGE', 'restore --at needs OUT, a new file to write the image to');
        const r = await restorePoint(dir, str('target'), str('at'), str('out'), warn);
        io.stdout.write(`${str('out')}: restored (${r.size} bytes, ${r.applied} reverse deltas applied)\n`);
        return EXIT.OK.code;
      }
      case 'prune': {
        const keep = args.keep as number;
        if (!Number.isInteger(keep) || keep < 0) throw new QsyncError('USAGE', `--keep ${keep}: a whole number of runs`);
        const dropped = await prune(str('dir'), keep);
        io.stdout.write(`pruned ${dropped.length} run${dropped.length === 1 ? '' : 's'} of history\n`);
        return EXIT.OK.code;
      }
    }
    throw new QsyncError('USAGE', `unknown command ${argv[0]}`);
  } catch (e) {
    // yargs reports bad usage as a YError.
    const code = (e as Error)?.name === 'YError' ? EXIT.SYNTAX.code : exitCodeFor(e);
    const msg = escapeForTerminal(isQsyncError(e) ? e.message : `${(e as Error)?.message ?? e}`);
    const hint = isQsyncError(e) && e.context.hint ? `\n  hint: ${escapeForTerminal(e.context.hint)}` : '';
    io.stderr.write(`qsync: ${msg}${hint}\n${describeExit(code)}\n`);
    return code;
  }
}
