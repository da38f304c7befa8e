/**
 * qsync as a function: parse, dispatch, map errors to rsync's exit codes.
 * Output goes to the injected streams; no exit here.
 */
import { armInterrupt, disarmInterrupt, interruptArmed } from './interrupt.js';
import { isQsyncError, QsyncError } from '../core/errors.js';
import { escapeForTerminal } from './output.js';
import { parseArgv } from './args.js';
import { versionText } from './version.js';
import { describeExit, EXIT, exitCodeFor } from './exit-codes.js';
import { DELTA_COMMANDS } from './commands.js';
import type { CliIO } from './run-sync.js';
import { releaseHeldLocksSync } from '../sync/lock.js';
import { setStateBase } from '../sync/state-dir.js';

/** Loaded on use: each mode's modules cost start-up time the others should not pay. */
const runDeltaCommand = async (argv: string[], io: CliIO) => (await import('./cmd-delta.js')).runDeltaCommand(argv, io);

export function onSignal(sig: NodeJS.Signals): void {
  // An image-mode run (or the drop-in's domain backups) cleans up QEMU (exports, jobs, bitmaps) before it ends.
  if (interruptArmed()) {
    process.stderr.write(`\nqsync: received ${sig}, cleaning up in QEMU; send it again to stop at once\n`);
    return;
  }
  // The intent records keep the targets recoverable; only the locks must go.
  releaseHeldLocksSync();
  process.stderr.write(`\nqsync: received ${sig}, stopping; run again to finish\n${describeExit(EXIT.SIGNAL.code)}\n`);
  process.exit(EXIT.SIGNAL.code);
}

export async function main(argv: string[], io: CliIO): Promise<number> {
  // A first word naming a subcommand is one (a source folder so named is written ./apply).
  if ((DELTA_COMMANDS as readonly string[]).includes(argv[0])) return runDeltaCommand(argv, io);
  // The far end of a remote sync: stdin/stdout are the channel (src/remote/server.ts).
  if (argv[0] === '--server') return (await import('../remote/server.js')).runServer(argv.slice(1), io);
  try {
    if (argv[0] === 'forget') {
      const { runForget } = await import('./run-image.js');
      return await runForget(argv.slice(1), io);
    }
    const parsed = parseArgv(argv);
    if (parsed.kind === 'help') {
      io.stdout.write(parsed.text);
      return 0;
    }
    if (parsed.kind === 'version') {
      io.stdout.write(versionText(io.version, parsed.level));
      return 0;
    }
    const o = parsed.options;
    if (o.stateDir !== undefined) setStateBase(o.stateDir);
    if (o.readBatch !== undefined) {
      if (parsed.sources.length) throw new QsyncError('USAGE', '--read-batch=FILE takes only the destination operand: the sources are in FILE');
      return await runDeltaCommand(['apply', o.readBatch, parsed.dest], io);
    }
    // --connect: the libvirt of --domain, or of a local sync's domains (the drop-in line, src/sync/dropin.ts).
    if (o.connect !== undefined && (o.qmp !== undefined || o.image !== undefined)) throw new QsyncError('USAGE', '--connect URI goes with --domain NAME or a local sync, not with --qmp or --image');
    if (o.qmp !== undefined || o.image !== undefined || o.domain !== undefined) {
      const modes = (['qmp', 'image', 'domain'] as const).filter((m) => o[m] !== undefined);
      if (modes.length > 1) throw new QsyncError('USAGE', `--${modes[0]} and --${modes[1]} are two sources: give one`);
      if (parsed.sources.length) throw new QsyncError('USAGE', `--${modes[0]} takes only the destination operand (a folder for the disk images)`);
      const signal = armInterrupt();
      try {
        const { runImage } = await import('./run-image.js');
        return await runImage(parsed.dest, o, io, signal);
      } finally {
        disarmInterrupt();
      }
    }
    const { runSync } = await import('./run-sync.js');
    return await runSync(parsed.sources, parsed.dest, o, io);
  } catch (e) {
    const code = exitCodeFor(e);
    if (isQsyncError(e)) {
      const hint = e.context.hint ? `\n  hint: ${escapeForTerminal(e.context.hint)}` : '';
      io.stderr.write(`qsync: ${escapeForTerminal(e.message)}${hint}\n`);
    } else {
      io.stderr.write(`qsync: internal error: ${escapeForTerminal(`${(e as Error)?.message ?? e}`)}\n`);
      if (process.env.QSYNC_DEBUG) io.stderr.write(`${(e as Error)?.stack}\n`);
    }
    // rsync's closing line, a usage error's too ("syntax or usage error (code 1)").
    io.stderr.write(`${describeExit(code)}\n`);
    return code;
  }
}

