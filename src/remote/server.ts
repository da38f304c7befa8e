/**
 * `qsync --server [--restrict DIR] [--state-dir DIR]`: the far end of a
 * remote sync, started by the client over the remote shell with the
 * channel on stdin/stdout (nothing else may be written to stdout). Its role
 * and paths come in the client's hello, never on the command line
 * (src/remote/session.ts). For an authorized_keys `command=` line,
 * `--restrict DIR` serves and receives only below DIR: absolute paths and
 * `..` are refused, and no path may pass through a symlink (rsync's rrsync).
 */
import { resolve } from 'node:path';
import { QsyncError } from '../core/errors.js';
import { protocolError } from '../core/wire.js';
import { isValidBlockSize } from '../core/geometry.js';
import { HashPool } from '../hash/pool.js';
import { setStateBase } from '../sync/state-dir.js';
import { parseArgv } from '../cli/args.js';
import { exitCodeFor } from '../cli/exit-codes.js';
import { MAX_FILES_FROM, receive, type CliIO } from '../cli/run-sync.js';
import { Channel, errorMessage } from './channel.js';
import { RelayToClient } from './batch-relay.js';
import { aheadFromWire, RemoteSources } from './remote-sources.js';
import { historyPath, restrictedPath } from './restrict.js';
import { openRunDeltas, type RunDeltas } from '../sync/run-deltas.js';
import { SourceServer } from './serve-sources.js';
import type * as DomainClaims from './domain-claims.js';
import type * as ServeTarget from './serve-target.js';
import { LocalDestination } from '../sync/local-target.js';
import { attrChoice } from '../sync/ext-attrs.js';
import { checkHello, FEATURES, ForwardingPrinter, hello, optionsFromWire, receiveFilesFrom } from './session.js';

/**
 * Loaded only by the roles that use them: a plain push or pull starts
 * without image mode's target, QEMU's and libvirt's modules (the far side's
 * start-up is part of every remote run's wall time).
 */
const loadServeTarget = (): Promise<typeof ServeTarget> => import('./serve-target.js');
const loadClaims = async (): Promise<typeof DomainClaims & { DropIn: typeof import('../sync/dropin.js').DropIn }> => {
  const [c, d] = await Promise.all([import('./domain-claims.js'), import('../sync/dropin.js')]);
  return { ...c, DropIn: d.DropIn };
};

function parseServerArgs(argv: string[]): { restrict?: string } {
  let restrict: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const value = (name: string) => (a === name ? argv[++i] : a.slice(name.length + 1));
    if (a === '--restrict' || a.startsWith('--restrict=')) restrict = value('--restrict');
    else if (a === '--state-dir' || a.startsWith('--state-dir=')) setStateBase(value('--state-dir'));
    else throw new QsyncError('USAGE', `qsync --server takes only --restrict DIR and --state-dir DIR, not ${a}`);
    if (restrict === '' || restrict === undefined && a.startsWith('--restrict')) throw new QsyncError('USAGE', '--restrict needs a folder');
  }
  return { restrict: restrict === undefined ? undefined : resolve(restrict) };
}

function strings(v: unknown, what: string): string[] {
  if (!Array.isArray(v) || !v.every((s) => typeof s === 'string')) throw protocolError(`${what}`);
  return v as string[];
}

export async function runServer(argv: string[], io: CliIO): Promise<number> {
  const ch = new Channel(process.stdin, process.stdout, { peer: 'the client' });
  try {
    const { restrict } = parseServerArgs(argv);
    const h = await ch.control();
    checkHello(h, 'the client');
    if (h.role === 'sender') {
      const blockSize = h.blockSize;
      if (typeof blockSize !== 'number' || !isValidBlockSize(blockSize)) throw new QsyncError('PROTOCOL', 'protocol error: a bad block size');
      // The drop-in line in a pull: images of this host's libvirt domains go through their domain (src/remote/domain-claims.ts).
      const claims = h.domains === undefined ? undefined : await loadClaims();
      const domains = claims?.domainsFromWire(h.domains);
      const dropIn = domains && (await claims!.DropIn.find(domains.connect));
      await ch.send(hello('sender', { claims: dropIn?.keys(restrict) }));
      if (typeof h.bwlimit === 'number' && Number.isFinite(h.bwlimit) && h.bwlimit > 0) ch.limit(h.bwlimit);
      const pool = new HashPool(blockSize);
      try {
        const sources = new SourceServer(ch, pool, restrict, h.compress === true);
        if (dropIn) {
          // Only files this session listed may be claimed: a domain's disk outside the tree served is never backed up for the client.
          sources.watch(new Set(dropIn.keys()));
          sources.answer('claimed', (m) => claims!.backUpForPeer(ch, m, dropIn, (k) => sources.shown(k), { ...domains!, blockSize }));
        }
        const last = await sources.serve();
        if (last.op !== 'bye') throw protocolError(`unexpected "${last.op}"`);
      } finally {
        await pool.close();
      }
      await ch.end();
      return 0;
    }
    if (h.role === 'target') {
      if (typeof h.dest !== 'string') throw new QsyncError('PROTOCOL', 'protocol error: no destination');
      const dest = await LocalDestination.open(await restrictedPath(h.dest, restrict), { within: restrict });
      let deltas: RunDeltas | undefined;
      try {
        // --backup-dir: a path on this side, relative to DEST as rsync's; the history is kept here, from the blocks each write replaces.
        if (h.backupDir !== undefined) {
          if (typeof h.backupDir !== 'string' || h.backupDir === '') throw protocolError('a bad backup dir');
          deltas = await openRunDeltas({ backupDir: await historyPath(dest.shown, h.backupDir, restrict), compress: h.compress === true, within: restrict }, Date.now());
        }
        await ch.send(hello('target', { features: FEATURES }));
        const { TargetServer } = await loadServeTarget();
        const last = await new TargetServer(ch, dest, deltas?.wrapSink).serve();
        if (last.op !== 'bye') throw protocolError(`unexpected "${last.op}"`);
      } finally {
        try {
          await deltas?.finish(true);
        } finally {
          await dest.close();
        }
      }
      await ch.end();
      return 0;
    }
    if (h.role !== 'receiver') throw protocolError(`unknown role ${String(h.role)}`);
    const defaults = parseArgv(['.', '.']);
    if (defaults.kind !== 'sync') throw new Error('no default options');
    const o = optionsFromWire(h.options, defaults.options);
    const operands = strings(h.operands, 'operands');
    if (typeof h.dest !== 'string') throw new QsyncError('PROTOCOL', 'protocol error: no destination');
    const dest = await restrictedPath(h.dest, restrict);
    // The client writes the batch (--write-batch, --only-write-batch) from what it sends; this side says what each member is.
    if (h.batch !== undefined && h.batch !== 'write' && h.batch !== 'only') throw protocolError('a bad batch mode');
    const relay = h.batch === undefined ? undefined : new RelayToClient(ch, h.batch === 'only');
    const ahead = aheadFromWire(h.ahead);
    await ch.send(hello('receiver', { features: FEATURES }));
    // --files-from: the client read its list and sends the lines (this end reads no list of its own).
    const filesFrom = typeof h.filesFrom === 'string' ? { name: h.filesFrom, lines: await receiveFilesFrom(ch, MAX_FILES_FROM) } : undefined;
    const printer = new ForwardingPrinter(ch, [o.outFormat, o.logFileFormat]);
    let code: number;
    try {
      // The drop-in line from a libvirt host: the files its domains back up are left to it (src/remote/domain-claims.ts).
      const c = h.claims === undefined ? undefined : await loadClaims();
      const keys = c?.claimsFromWire(h.claims);
      const claims = keys && new c!.ClaimsForPeer(ch, keys, o.times);
      code = await receive(printer, new RemoteSources(ch, attrChoice(o), ahead), operands, dest, o, { within: restrict, relay, filesFrom, claims });
    } catch (e) {
      code = printer.finish(undefined, exitCodeFor(e), e);
    }
    await ch.end();
    return code;
  } catch (e) {
    // The client hears why (garbage, a refused path, a version mismatch); nothing was written.
    try {
      ch.write(errorMessage(e));
      await ch.end();
    } catch {
      io.stderr.write(`qsync --server: ${(e as Error).message}\n`);
    }
    return exitCodeFor(e);
  }
}
