/** A process entry for the delta subcommands, for tests that kill it (built to dist/test/helpers/delta-cli.js). */
import { runDeltaCommand } from '../../src/cli/cmd-delta.js';

process.exitCode = await runDeltaCommand(process.argv.slice(2), { stdout: process.stdout, stderr: process.stderr });
