/**
 * `qsync ... SRC... [user@]host:DEST` (push) and `qsync ... [user@]host:SRC... DEST`
 * (pull): start `qsync --server` over the remote shell and play the other
 * end (src/remote/session.ts). A push serves this host's files to the
 * receiving server and prints what it reports; a pull runs the receiving
 * end here, as a local sync does, with the server's files as sources.
 */
import { once } from 'node:events';
import { QsyncError } from '../core/errors.js';
import { protocolError } from '../core/wire.js';
import { DropIn } from '../sync/dropin.js';
import { backUpClaimed, ClaimsForPeer, claimsFromWire } from '../remote/domain-claims.js';
import { armInterrupt, disarmInterrupt } from './interrupt.js';
import { HashPool } from '../hash/pool.js';
import { Channel } from '../remote/channel.js';
import { BatchRecorder } from '../remote/batch-relay.js';
import { RemoteSources } from '../remote/remote-sources.js';
import { resolveTrusted } from '../io/safe-fs.js';
import { openBatch } from '../sync/delta-sinks.js';
import { SourceServer } from '../remote/serve-sources.js';
import { checkFeatures, checkHello, eventsTo, hasFeature, hello, readDone, sendFilesFrom, type Feature } from '../remote/session.js';
import { parseRemote, spawnServer, type RemotePath } from '../remote/ssh.js';
import type { ControlMessage } from '../core/wire.js';
import { parseArgv, type SyncOptions } from './args.js';
import { EXIT } from './exit-codes.js';
import type { Printer } from './output.js';
import { filterRules, readFilesFrom, receive } from './run-sync.js';
import { attrChoice, checkAttrTools } from '../sync/ext-attrs.js';

/** What the receiving end cannot do yet with a peer's files, or on a peer's DEST. */
const LOCAL_ONLY: [keyof SyncOptions, string][] = [
  ['manifest', '--manifest'],
];

export async function syncRemote(shown: Printer, operands: string[], dest: string, o: SyncOptions): Promise<number> {
  let printer = shown;
  const to = parseRemote(dest);
  const from = operands.map(parseRemote);
  if (to && from.some(Boolean)) throw new QsyncError('USAGE', 'The source and destination cannot both be remote.');
  if (!to && from.some((r) => !r)) throw new QsyncError('USAGE', 'a pull takes remote sources only: every SRC as host:PATH, DEST a local path');
  const remote = to ?? from[0]!;
  if (!to && from.some((r) => r!.host !== remote.host || r!.user !== remote.user)) throw new QsyncError('USAGE', 'the remote sources must all be on one host (and user)');
  for (const [k, flag] of LOCAL_ONLY) {
    if (o[k]) throw new QsyncError('UNSUPPORTED', `${flag} is not supported with a remote ${to ? 'destination' : 'source'} yet`, { hint: 'run it on the host that holds both sides, or without the option' });
  }
  // A push reads the ACLs and xattrs here (a pull's receiving end checks in receive()).
  if (to && (o.acls || o.xattrs)) await checkAttrTools();
  // Filter files are read here, where they were named.
  const rules = await filterRules(o.filters, o.from0);
  // So is a --files-from list: a pull's receiving end is here and reads it in receive(); a push sends its lines.
  const listed = to && o.filesFrom !== undefined ? await readFilesFrom(o.filesFrom, o.from0) : undefined;
  // --bwlimit paces what this side sends; in a pull the server sends the data and paces itself.
  // The far end's lines reach this printer as events: a push's receiving server, and a pull's sender backing up its domains' files.
  return withSession(remote, o, { onControl: eventsTo(shown), rate: to ? o.bwlimit : 0 }, async (ch) => {
    printer = countingWire(printer, ch);
    if (to) {
      // --write-batch/--only-write-batch: written here, as rsync does, from the blocks this side sends (src/remote/batch-relay.ts).
      const batch = await openPushBatch(o);
      let done: ReturnType<typeof readDone> | undefined;
      try {
        // The drop-in line: images of this host's libvirt domains go through their domain (src/remote/domain-claims.ts).
        const dropIn = o.onlyWriteBatch !== undefined ? undefined : await DropIn.find(o.connect);
        const pool = new HashPool(o.blockSize);
        // Its workers start while ssh connects: the first request may be the scan.
        pool.warm();
        const server = new SourceServer(ch, pool, undefined, o.compress, batch?.recorder);
        // Only a file this session shows the far side may be claimed by it.
        if (dropIn) server.watch(new Set(dropIn.keys()));
        let last;
        try {
          // The walk's first requests, answered with the hello: the far side's walk starts without a round trip each.
          const ahead = await server.answerAhead(operands, attrChoice(o));
          await ch.send(hello('receiver', {
            dest: to.path, operands, options: changedOptions({ ...o, filters: rules }), batch: batch && (o.onlyWriteBatch !== undefined ? 'only' : 'write'), filesFrom: listed && o.filesFrom,
            ahead: ahead.length ? ahead : undefined, claims: dropIn?.keys(),
          }));
          const h = await ch.control();
          checkHello(h, remote.host);
          if (dropIn && !hasFeature(h, 'domains')) {
            printer.warning?.(`the qsync on ${remote.host} cannot take images of libvirt domains: those held by a running domain are refused, and the others copied as files (install the same qsync version on both hosts)`);
          }
          const wanted: [Feature, string][] = [];
          if (o.backupDir !== undefined && !o.dryRun) wanted.push(['backup-dir', '--backup-dir']);
          if (batch) wanted.push(['batch', o.onlyWriteBatch !== undefined ? '--only-write-batch' : '--write-batch']);
          checkFeatures(h, wanted, remote.host);
          if (listed) await sendFilesFrom(ch, listed);
          last = await server.serve();
        } finally {
          await server.release();
          await pool.close();
        }
        if (last.op === 'claimed') {
          if (!dropIn) throw protocolError('"claimed" without claims');
          // A signal now ends the domains' backup jobs and exports before qsync stops (src/cli/interrupt.ts).
          const signal = armInterrupt();
          try {
            const announce = o.verbose > 0 || o.itemize || o.json;
            await backUpClaimed(ch, last, dropIn, (k) => server.shown(k), `${remote.user ? `${remote.user}@` : ''}${remote.host}:${to.path.replace(/\/+$/, '')}`, {
              connect: o.connect, blockSize: o.blockSize, verifySample: o.verifySample, dryRun: o.dryRun, announce, signal,
            }, printer);
          } finally {
            disarmInterrupt();
          }
          last = await ch.control();
        }
        done = readDone(last);
      } finally {
        await batch?.close(done !== undefined && !done.error);
      }
      if (done.error) throw done.error instanceof QsyncError ? new QsyncError(done.error.code, done.error.message, { ...done.error.context, exit: done.code }) : done.error;
      let code = done.code;
      if (batch?.recorder.failed) {
        printer.warning?.(`the batch ${batch.path} was not written: ${batch.recorder.failed.message}`, batch.path);
        code = Math.max(code, EXIT.PARTIAL.code);
      }
      return printer.finish(done.stats, code);
    }
    // The drop-in line in a pull: the far host's libvirt domains back up their own files into DEST (src/remote/domain-claims.ts).
    const domains = o.manifest || o.onlyWriteBatch !== undefined ? undefined : { connect: o.connect, verifySample: o.verifySample };
    await ch.send(hello('sender', { blockSize: o.blockSize, compress: o.compress, bwlimit: o.bwlimit, domains }));
    const h = await ch.control();
    checkHello(h, remote.host);
    const keys = claimsFromWire(h.claims);
    const claims = keys && new ClaimsForPeer(ch, keys, o.times);
    const code = await receive(printer, new RemoteSources(ch, attrChoice(o)), from.map((r) => r!.path), dest, { ...o, filters: rules }, { claims });
    await ch.send({ op: 'bye' });
    return code;
  });
}

/** A push's batch file, reached as a local run reaches it (its folder held, no other user's symlink followed); none with -n. */
async function openPushBatch(o: SyncOptions): Promise<{ recorder: BatchRecorder; path: string; close(ok: boolean): Promise<void> } | undefined> {
  const path = o.writeBatch ?? o.onlyWriteBatch;
  if (path === undefined || o.dryRun) return undefined;
  const at = await resolveTrusted(path, false);
  try {
    const recorder = new BatchRecorder(await openBatch(at.dir.at(at.name), o.compress ? 'brotli' : 'none', Date.now()), o.blockSize);
    return {
      recorder,
      path,
      async close(ok) {
        try {
          await recorder.close(ok);
        } finally {
          await at.dir.close();
        }
      },
    };
  } catch (e) {
    await at.dir.close();
    throw e;
  }
}

/**
 * Start `qsync --server` over the remote shell and run `fn` over the
 * channel; a channel that closes under it is reported in rsync's words (and
 * ssh's 255), and a failed run stops the remote shell at once.
 */
export async function withSession<T>(
  remote: RemotePath,
  o: Pick<SyncOptions, 'rsh' | 'qsyncPath' | 'timeout'>,
  opts: { onControl?: (m: ControlMessage) => boolean; rate?: number },
  fn: (ch: Channel) => Promise<T>,
): Promise<T> {
  const child = spawnServer(remote, o.rsh, o.qsyncPath);
  const spawned = new Promise<void>((ok, fail) => {
    child.once('spawn', ok);
    child.once('error', fail);
  }).catch((e: NodeJS.ErrnoException) => {
    throw new QsyncError('USAGE', `failed to exec the remote shell: ${e.message}`, { hint: 'give a working command with -e', exit: EXIT.IPC.code }, { cause: e });
  });
  // 'exit', not 'close': a grandchild of the remote shell may hold its pipes open after it is gone.
  const exited = once(child, 'exit').then(([code]) => (typeof code === 'number' ? code : EXIT.SIGNAL.code), () => EXIT.REMOTE_SHELL.code);
  const ch = new Channel(child.stdout!, child.stdin!, { peer: remote.host, onControl: opts.onControl, rate: opts.rate, timeoutS: o.timeout });
  let failed = false;
  try {
    await spawned;
    return await fn(ch);
  } catch (e) {
    failed = true;
    throw await connectionError(e, ch, remote, exited);
  } finally {
    await ch.end().catch(() => {});
    // A run that failed does not wait on the remote shell: it is stopped (a silent peer would never end).
    if (failed) child.kill('SIGTERM');
    const t = setTimeout(() => child.kill('SIGKILL'), failed ? 2000 : 10_000);
    await exited;
    clearTimeout(t);
    child.stdout?.destroy();
  }
}

/** The options that differ from the defaults: the receiving end starts from its own (a small hello). */
function changedOptions(o: SyncOptions): Partial<SyncOptions> {
  const d = parseArgv(['.', '.']);
  const base = (d.kind === 'sync' ? d.options : {}) as Record<string, unknown>;
  const local = new Set(['rsh', 'qsyncPath', 'stateDir', 'json']);
  return Object.fromEntries(Object.entries(o).filter(([k, v]) => !local.has(k) && JSON.stringify(v) !== JSON.stringify(base[k])));
}

/** rsync's "sent"/"received" of a remote run: the bytes through the remote shell, as this side counted them. */
function countingWire(p: Printer, ch: Channel): Printer {
  return {
    fileStart: (...a) => p.fileStart?.(...a),
    fileProgress: (...a) => p.fileProgress?.(...a),
    fileEnd: (...a) => p.fileEnd?.(...a),
    deleted: (...a) => p.deleted?.(...a),
    notice: (...a) => p.notice?.(...a),
    info: (...a) => p.info?.(...a),
    wantsTotal: p.wantsTotal,
    listTotal: (...a) => p.listTotal?.(...a),
    warning: (...a) => p.warning?.(...a),
    finish: (stats, code, error) => p.finish(stats && { ...stats, wireSent: ch.sent, wireReceived: ch.received }, code, error),
  };
}

/** The channel closed under the run: rsync's words, and ssh's 255 when the remote shell failed. */
async function connectionError(e: unknown, ch: Channel, remote: RemotePath, exited: Promise<number>): Promise<unknown> {
  if (!(e instanceof QsyncError && e.context.closed) && !['EPIPE', 'ECONNRESET'].includes(String((e as { code?: unknown })?.code))) return e;
  let timer: NodeJS.Timeout | undefined;
  const code = await Promise.race([exited, new Promise<number>((ok) => (timer = setTimeout(() => ok(-1), 5000)))]);
  // A timer left running would hold the process for its 5 s after the run has ended.
  clearTimeout(timer);
  return new QsyncError('PROTOCOL', `connection unexpectedly closed (${ch.received} bytes received so far) [${remote.host}]`, {
    hint: code === 255 && ch.received === 0 ? `the remote shell failed (exit 255): check that "${remote.host}" is reachable and qsync runs there` : undefined,
    exit: code === 255 ? EXIT.REMOTE_SHELL.code : EXIT.STREAM_IO.code,
  }, { cause: e });
}
