/**
 * qsync as a function: parse, dispatch, map errors to rsync's exit codes.
 * Output goes to the injected streams; no exit here.
 */
import { rmSync } from 'node:fs';
import { isQsyncError, QsyncError } from '../core/errors.js';
import { parseArgv } from './args.js';
import { DELTA_COMMANDS, runDeltaCommand } from './cmd-delta.js';
import { describeExit, EXIT, exitCodeFor } from './exit-codes.js';
import { runSync, type CliIO } from './run-sync.js';

/** Lock files to drop if a signal ends the run; the intent records keep the targets recoverable. */
export const cleanupOnSignal = new Set<string>();

export function onSignal(sig: NodeJS.Signals): void {
  for (const p of cleanupOnSignal) rmSync(p, { force: true });
  process.stderr.write(`\nqsync: received ${sig}, stopping; run again to finish\n${describeExit(EXIT.SIGNAL.code)}\n`);
  process.exit(EXIT.SIGNAL.code);
}

export async function main(argv: string[], io: CliIO): Promise<number> {
  // A first word naming a subcommand is one (a source folder so named is written ./apply).
  if ((DELTA_COMMANDS as readonly string[]).includes(argv[0])) return runDeltaCommand(argv, io);
  try {
    const parsed = parseArgv(argv);
    if (parsed.kind === 'help') {
      io.stdout.write(parsed.text);
      return 0;
    }
    if (parsed.kind === 'version') {
      io.stdout.write(`qsync ${io.version}\n`);
      return 0;
    }
    const o = parsed.options;
    if (o.readBatch !== undefined) {
      if (parsed.sources.length) throw new QsyncError('USAGE', '--read-batch=FILE takes only the destination operand: the sources are in FILE');
      return await runDeltaCommand(['apply', o.readBatch, parsed.dest], io);
    }
    return await runSync(parsed.sources, parsed.dest, o, io);
  } catch (e) {
    const code = exitCodeFor(e);
    if (isQsyncError(e)) {
      const hint = e.context.hint ? `\n  hint: ${e.context.hint}` : '';
      io.stderr.write(`qsync: ${e.message}${hint}\n`);
    } else {
      io.stderr.write(`qsync: internal error: ${(e as Error)?.message ?? e}\n`);
      if (process.env.QSYNC_DEBUG) io.stderr.write(`${(e as Error)?.stack}\n`);
    }
    if (code !== EXIT.SYNTAX.code || !isQsyncError(e)) io.stderr.write(`${describeExit(code)}\n`);
    return code;
  }
}

