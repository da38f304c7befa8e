/**
 * `qsync --qmp SOCKET [--drive NAME]... DEST`, `qsync --image FILE DEST` and `qsync --domain NAME [--connect URI] DEST`:
 * image mode, and a summary per disk of what was dirty, read, written,
 * unchanged and zero (the figures a vzdump user reads in the log); and
 * `qsync forget DEST --qmp SOCKET|--image FILE`.
 */
import { resolve } from 'node:path';
import { QsyncError } from '../core/errors.js';
import { runDomainBackup } from '../sync/domain-backup.js';
import { runImageBackup, type DiskSummary } from '../sync/image-backup.js';
import { openRunDeltas, type RunDeltas } from '../sync/run-deltas.js';
import type { Feature } from '../remote/session.js';
import type { Destination } from '../sync/target.js';
import { parseRemote } from '../remote/ssh.js';
import { forgetDomain, forgetImage } from '../sync/image-forget.js';
import { setStateBase } from '../sync/state-dir.js';
import { parseArgv, type SyncOptions } from './args.js';
import { EXIT, exitCodeFor } from './exit-codes.js';
import { createPrinter, formatSize, type Printer } from './output.js';
import type { CliIO } from './run-sync.js';

function summaryLine(d: DiskSummary, human: number): string {
  const size = (n: number) => formatSize(n, Math.max(human, 3));
  const how = d.mode === 'bitmap' ? 'incremental (dirty bitmap)' : `full${d.reason ? ` (${d.reason})` : ''}`;
  return (
    `${d.name}: ${how} -> ${d.target}\n` +
    `  disk ${size(d.size)}, dirty ${size(d.dirty)}, read ${size(d.read)} (sample ${size(d.sampled)}), written ${size(d.written)}, ` +
    `unchanged ${size(d.unchanged)}, zero ${size(d.zero)}; setup ${d.setupMs.toFixed(0)} ms, map ${d.mapMs.toFixed(0)} ms, copy ${(d.copyMs / 1000).toFixed(2)} s, ` +
    `total ${(d.elapsedMs / 1000).toFixed(2)} s`
  );
}

export async function runImage(dest: string, o: SyncOptions, io: CliIO, signal: AbortSignal): Promise<number> {
  const printer = createPrinter(o, io);
  try {
    if (o.onlyWriteBatch !== undefined) {
      // Recording without writing would still rotate QEMU's bitmap: the next run would miss these changes.
      throw new QsyncError('USAGE', '--only-write-batch does not work with --qmp/--image/--domain: use --write-batch (the target is updated too)');
    }
    const remote = parseRemote(dest);
    if (remote) {
      // Loaded only here: a local run starts without the remote half (a third of the modules).
      const [{ RemoteDestination }, { checkFeatures, checkHello, hello }, { withSession }] = await Promise.all([
        import('../remote/remote-target.js'), import('../remote/session.js'), import('./run-remote.js'),
      ]);
      // The far side holds the destination (src/remote/serve-target.ts); the driver runs here, where QEMU is.
      // --backup-dir is a path there (relative to DEST, as rsync's) and the history is kept there, from the blocks each write
      // replaces; --write-batch is written here, from the blocks sent.
      return await withSession(remote, o, {}, async (ch) => {
        await ch.send(hello('target', { dest: remote.path, backupDir: o.backupDir, compress: o.compress }));
        const h = await ch.control();
        checkHello(h, remote.host);
        const wanted: [Feature, string][] = [];
        if (o.backupDir !== undefined) wanted.push(['backup-dir', '--backup-dir']);
        if (o.writeBatch !== undefined) wanted.push(['t-hash', '--write-batch']);
        checkFeatures(h, wanted, remote.host);
        const destination = new RemoteDestination(ch, dest);
        let deltas: RunDeltas | undefined;
        try {
          deltas = o.writeBatch === undefined ? undefined : await openRunDeltas({ writeBatch: o.writeBatch, compress: o.compress }, Date.now());
          return await backUp(dest, destination, o, io, printer, signal, deltas);
        } finally {
          await destination.close();
        }
      });
    }
    const backupDir = o.backupDir === undefined ? undefined : resolve(dest, o.backupDir);
    const deltas = await openRunDeltas({ ...o, backupDir }, Date.now());
    return await backUp(dest, undefined, o, io, printer, signal, deltas);
  } catch (e) {
    if (!o.json) throw e;
    const code = exitCodeFor(e);
    io.stdout.write(`${JSON.stringify({ disks: [], exitCode: code, errors: [{ message: (e as Error).message, code: (e as { code?: string }).code }] }, null, 2)}\n`);
    return code;
  }
}

/** Every disk into `destination` (DEST on this host when undefined), the deltas closed as the run ends, and a summary per disk. */
async function backUp(dest: string, destination: Destination | undefined, o: SyncOptions, io: CliIO, printer: Printer, signal: AbortSignal, deltas: RunDeltas | undefined): Promise<number> {
  let disks: DiskSummary[];
  try {
    const common = { dest, destination, blockSize: o.blockSize, verifySamplePct: o.verifySample, signal, wrapSink: deltas?.wrapSink };
    if (o.domain !== undefined) {
      if (o.drives.length) throw new QsyncError('USAGE', '--drive does not work with --domain: every disk of the domain is backed up at one instant');
      disks = await runDomainBackup({ ...common, domain: o.domain, connect: o.connect }, printer);
    } else {
      disks = await runImageBackup({ ...common, qmp: o.qmp, image: o.image, drives: o.drives }, printer);
    }
  } catch (e) {
    // The run's own error is the one to report; a history or batch that could not be closed after it is named beside it.
    await deltas?.finish(false).catch((f: unknown) => printer.warning?.((f as Error).message));
    throw e;
  }
  await deltas?.finish(true);
  if (o.json) io.stdout.write(`${JSON.stringify({ disks, exitCode: 0, errors: [] }, null, 2)}\n`);
  else if (!o.quiet) for (const d of disks) io.stdout.write(`${summaryLine(d, o.human)}\n`);
  return EXIT.OK.code;
}

/** `qsync forget DEST --qmp SOCKET|--image FILE [--drive NAME]...` or `--domain NAME [--connect URI]`: a line per disk, or per domain. */
export async function runForget(argv: string[], io: CliIO): Promise<number> {
  const usage = new QsyncError('USAGE', 'usage: qsync forget DEST --qmp SOCKET|--image FILE [--drive NAME]... | --domain NAME [--connect URI]');
  if (!argv.some((a) => /^--(?:qmp|image|domain)(?:=|$)/.test(a))) throw usage;
  const parsed = parseArgv(argv);
  if (parsed.kind !== 'sync' || parsed.sources.length) throw usage;
  const o = parsed.options;
  if (o.stateDir !== undefined) setStateBase(o.stateDir);
  if (o.domain !== undefined) {
    const cps = await forgetDomain({ domain: o.domain, connect: o.connect, dest: parsed.dest }, { notice: (m) => !o.quiet && io.stderr.write(`qsync: ${m}\n`) });
    if (!o.quiet) io.stdout.write(`${o.domain}: dropped ${cps.length} checkpoint${cps.length === 1 ? '' : 's'} and the image state of ${resolve(parsed.dest)}\n`);
    return EXIT.OK.code;
  }
  for (const d of await forgetImage({ qmp: o.qmp, image: o.image, drives: o.drives, dest: parsed.dest })) {
    if (!o.quiet) io.stdout.write(`${d.name}: dropped ${d.bitmaps} bitmap${d.bitmaps === 1 ? '' : 's'} and the image state of ${resolve(parsed.dest)}\n`);
  }
  return EXIT.OK.code;
}
