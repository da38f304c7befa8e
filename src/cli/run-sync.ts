/**
 * `qsync [OPTION]... SRC... DEST`: check the operands, take the destination
 * lock, run the tree sync, print, and turn the outcome into rsync's exit code.
 */
import { constants as fsConstants, type BigIntStats } from 'node:fs';
import { access, constants, mkdir, stat } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, relative, resolve } from 'node:path';
import type { Writable } from 'node:stream';
import { errnoOf, errnoText, isQsyncError, QsyncError, rsyncErrnoText } from '../core/errors.js';
import { compileFilters, expandFilterFiles, type FilterRule, type PatternRule } from '../core/filter.js';
import { HashPool } from '../hash/pool.js';
import { checkInside, historyPath } from '../remote/restrict.js';
import type { BatchRelay } from '../sync/run-deltas.js';
import { readUpTo } from '../io/local-file.js';
import { decodeName, Dir, fsPath, lstatOrUndefined, openBeneathMaking, resolveTrusted } from '../io/safe-fs.js';
import { listedName, relativeOperand, splitFilesFrom } from '../core/files-from.js';
import { lockDestination } from '../sync/lock.js';
import { planOperands, type Plan } from '../sync/operands.js';
import { TreeSync } from '../sync/tree.js';
import { noStats, type RunStats, type SyncHooks } from '../sync/events.js';
import type { DropIn, DropInOptions } from '../sync/dropin.js';
import { checkStateRoot, stateBaseIdentity, stateBaseWithin, stateFolderFor } from '../sync/state-dir.js';
import { checkAttrTools } from '../sync/ext-attrs.js';
import { LocalSources, type Sources } from '../sync/source.js';
import { openRunDeltas } from '../sync/run-deltas.js';
import type { SyncOptions } from './args.js';
import { EXIT, exitCodeFor } from './exit-codes.js';
import { armInterrupt, disarmInterrupt } from './interrupt.js';
import { createPrinter, type Printer } from './output.js';
import { withLogFile } from './log-file.js';
import { usesEscape } from './log-format.js';
import { parseRemote } from '../remote/ssh.js';

export interface CliIO {
  stdout: Writable;
  stderr: Writable;
  isTTY: boolean;
  version: string;
}

async function statOrUndefined(p: string): Promise<BigIntStats | undefined> {
  try {
    return await stat(fsPath(p), { bigint: true });
  } catch (e) {
    if (errnoOf(e) === 'ENOENT') return undefined;
    // DEST/ where DEST is a file: rsync's words and exit 3.
    if (errnoOf(e) === 'ENOTDIR') throw new QsyncError('USAGE', `cannot stat destination ${p}: not a directory`, { file: p, exit: EXIT.FILE_SELECT.code }, { cause: e });
    throw e;
  }
}

/** At most this much of an --exclude-from/--include-from file is read. */
const MAX_FILTER_FILE = 16 << 20;

/**
 * Read the filter files before anything else, each through resolveTrusted:
 * a symlink on the way that another user owns is refused, as rsync refuses
 * such files when it runs as root; the file itself is opened O_NOFOLLOW.
 */
async function readFilterFiles(rules: readonly FilterRule[]): Promise<Map<string, string>> {
  const texts = new Map<string, string>();
  for (const rule of rules) {
    if ('pattern' in rule || texts.has(rule.file)) continue;
    // "-" is stdin, as for rsync.
    texts.set(rule.file, (rule.file === '-' ? await readStdin(MAX_FILTER_FILE, `${rule.type} list`) : await readListFile(rule.file, `${rule.type.replace('-from', '')} file`, MAX_FILTER_FILE)).toString('utf8'));
  }
  return texts;
}

/** At most this much of a --files-from list is read. */
export const MAX_FILES_FROM = 256 << 20;

/**
 * A file of names or patterns the user gave (`what`: "exclude file", ...), read whole, at most `max` bytes.
 * One that cannot be opened is rsync's I/O error (exit 11), or with `usage` its usage error (exit 1, as a --files-from list).
 */
async function readListFile(path: string, what: string, max: number, usage = false): Promise<Buffer> {
  // (rsync reads these lists before it starts: no header before the message.)
  const failed = (e: unknown) => new QsyncError(usage ? 'USAGE' : 'IO', `failed to open ${what} ${path}: ${rsyncErrnoText(e, !usage)}`, { file: path, beforeStart: true }, { cause: e });
  const { dir, name } = await resolveTrusted(path, true).catch((e) => {
    throw isQsyncError(e) ? e : failed(e);
  });
  try {
    const fh = await dir.openFile(name, fsConstants.O_RDONLY);
    try {
      const { size } = await fh.stat();
      if (size > max) throw new QsyncError('USAGE', `${what} ${path} is ${size} bytes; at most ${max} are read`, { file: path });
      // At most the size stat gave, plus one byte to see a file that grows (or a /proc file that says 0 bytes).
      const buf = Buffer.alloc(size + 1);
      const n = await readUpTo(fh, buf, 0);
      if (n > size) {
        throw new QsyncError('USAGE', `${what} ${path} grew while qsync read it (or is not a plain file of a fixed size)`, {
          file: path,
          hint: 'give a file that does not change while qsync runs',
        });
      }
      return buf.subarray(0, n);
    } finally {
      await fh.close();
    }
  } catch (e) {
    if (e instanceof QsyncError) throw e;
    throw failed(e);
  } finally {
    await dir.close();
  }
}

/** All of stdin ("--files-from=-", as `find ... | qsync --files-from=- ...`), at most `max` bytes; `what` it is, for messages. */
async function readStdin(max: number, what: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of process.stdin as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > max) throw new QsyncError('USAGE', `the ${what} on stdin is over ${max} bytes`, { hint: 'split it, or give it as a file' });
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

/**
 * The lines of a --files-from list, as rsync reads them
 * (src/core/files-from.ts); names are bytes, decoded as names are.
 */
export async function readFilesFrom(path: string, from0: boolean): Promise<string[]> {
  const bytes = path === '-' ? await readStdin(MAX_FILES_FROM, 'files-from list') : await readListFile(path, 'files-from file', MAX_FILES_FROM, true);
  return splitFilesFrom(decodeName(bytes), from0);
}

export async function runSync(operands: string[], dest: string, o: SyncOptions, io: CliIO): Promise<number> {
  const shown = createPrinter(o, io, Date.now, true);
  const logged = o.logFile === undefined ? undefined : await withLogFile(shown, o.logFile, o);
  const printer = logged ?? shown;
  try {
    return await syncWith(printer, operands, dest, o);
  } catch (e) {
    logged?.failed(e, exitCodeFor(e));
    // rsync has printed its header by the time anything but a usage error stops it.
    if (exitCodeFor(e) !== EXIT.SYNTAX.code && !(isQsyncError(e) && e.context.beforeStart)) shown.header?.();
    // The error still reaches the user: on stderr, or inside the --json document.
    if (o.json) return printer.finish(undefined, exitCodeFor(e), e);
    throw e;
  }
}

async function syncWith(printer: Printer, operands: string[], dest: string, o: SyncOptions): Promise<number> {
  if ([...operands, dest].some((p) => parseRemote(p))) {
    if (!o.impliedDirs) throw new QsyncError('UNSUPPORTED', '--no-implied-dirs is supported by qsync for a local run only', { option: '--no-implied-dirs' });
    if (o.connect !== undefined) throw new QsyncError('USAGE', '--connect URI is for a local sync (its libvirt domains) or --domain NAME: a sync over ssh does not back up through libvirt');
    return (await import('./run-remote.js')).syncRemote(printer, operands, dest, o);
  }
  if (o.bwlimit) printer.warning?.('--bwlimit paces remote transfers only: this local run is not limited');
  // The hash workers boot with the first file that is not small (src/sync/small-file.ts): a tree of small files never needs them.
  const pool = new HashPool(o.blockSize);
  try {
    return await receive(printer, new LocalSources(pool), operands, dest, o);
  } finally {
    await pool.close();
  }
}

/**
 * Bring DEST up to date from the operands `from` holds: this host's files,
 * or a peer's over the wire (the receiving end of a remote sync runs this too).
 */
/** The filter rules with every --exclude-from/--include-from file read (here, where the user ran qsync). */
export async function filterRules(rules: readonly FilterRule[], from0 = false): Promise<PatternRule[]> {
  const texts = await readFilterFiles(rules);
  return expandFilterFiles(rules, (f) => texts.get(f)!, from0);
}

/**
 * What the receiving end of a push (qsync --server) adds: `within`, the --restrict DIR every path must lie in;
 * `relay`, the client's --write-batch/--only-write-batch, which it writes itself from what this side says;
 * `filesFrom`, the lines of a --files-from list read by the client (the server reads no list of its own), and
 * the list's name.
 */
export interface FarEnd {
  within?: string;
  relay?: BatchRelay;
  filesFrom?: { name: string; lines: string[] };
  /** A push from a libvirt host: the files its domains back up, left by the walk to the client (src/remote/domain-claims.ts). */
  claims?: DomainClaims;
}

/** Files of the tree a domain's backup takes instead of the walk (the drop-in line, src/sync/dropin.ts). */
export interface DomainClaims {
  claim(st: BigIntStats, rel: string): boolean;
  /** After the walk: back them up into `destRoot` (`held`: its folder the walk wrote, when it existed); true when some failed. */
  run(destRoot: string, o: DropInOptions, hooks: SyncHooks, stats: RunStats, held?: Dir): Promise<boolean>;
}

/** The drop-in on this host: its DEST's folders reached below the held root (-t: their times kept). */
async function localClaims(connect: string | undefined, times: boolean): Promise<DomainClaims | undefined> {
  // Loaded here: the far side of a push (whose sources are a peer's) starts without libvirt's modules.
  const { DropIn, localFolders } = await import('../sync/dropin.js');
  const d: DropIn | undefined = await DropIn.find(connect);
  return d && { claim: (st, rel) => d.claim(st, rel), run: (destRoot, o, hooks, stats, held) => d.run(localFolders(destRoot, times, held), o, hooks, stats) };
}

export async function receive(printer: Printer, from: Sources, operands: string[], dest: string, o: SyncOptions, far: FarEnd = {}): Promise<number> {
  const { within, filesFrom } = far;
  // -A/-X: the tools are here (the receiving end reads its targets' and writes them), before anything is written.
  if (o.acls || o.xattrs) await checkAttrTools();
  const sources: { operand: string; stat: BigIntStats }[] = [];
  let missing = false;
  for (const operand of operands) {
    try {
      // rsync follows a symlink given as an operand with a trailing slash only; lstat otherwise.
      sources.push({ operand, stat: await from.statOperand(operand) });
    } catch (e) {
      // A source that is missing is reported and skipped; a link to the sources that broke ends the run.
      if (e instanceof QsyncError && e.context.fatal) throw e;
      missing = true;
      // rsync's words: it lstats an operand, and changes into one ending in '/' to list its contents.
      const shown = from.remote ? operand.replace(/(.)\/+$/, '$1') : resolve(operand);
      printer.warning?.(errnoOf(e) ? `${operand.endsWith('/') ? 'change_dir' : 'link_stat'} "${shown}" failed: ${rsyncErrnoText(e)}` : `cannot read source ${operand}: ${(e as Error).message}`, operand);
    }
  }
  // Nothing to send: rsync still closes with its lines (sent, total size 0).
  if (!sources.length) {
    return printer.finish(noStats(), EXIT.PARTIAL.code);
  }

  if (o.mkpath) await makePath(printer, dest, sources, o);
  const destStat = await statOrUndefined(dest);
  const list = filesFrom ?? (o.filesFrom === undefined ? undefined : { name: o.filesFrom, lines: await readFilesFrom(o.filesFrom, o.from0) });
  const plan =
    list !== undefined
      ? await listPlan(list, sources, dest, destStat, from)
      : o.relative
        ? relativePlan(printer, sources, dest, destStat, o)
        : planOperands(sources, dest, destStat);
  // -n --mkpath: the folder a single file would land in is not made either.
  if (o.mkpath && o.dryRun && !plan.destIsDir && !(await statOrUndefined(plan.destRoot))) plan.destCreated = true;
  if (plan.destIsDir && destStat && !destStat.isDirectory()) {
    throw new QsyncError('USAGE', `destination ${dest} is a file, but must be a directory when copying a directory or more than one file`, { file: dest, exit: EXIT.FILE_SELECT.code });
  }
  // qsync's own state folder is checked (and made) before anything lands in DEST.
  await checkStateRoot(plan.destRoot, !leavesDest(o, far));
  const legacy = join(plan.destRoot, '.qsync');
  const sourceHasOne = async () =>
    from.remote || (await Promise.all(sources.map((s) => (s.operand.endsWith('/') ? lstatOrUndefined(fsPath(join(s.operand, '.qsync'))) : undefined)))).some(Boolean);
  if ((await lstatOrUndefined(fsPath(join(legacy, 'manifests'))))?.isDirectory() && !(await sourceHasOne())) {
    printer.warning?.(`${legacy} is the state of an older qsync, which now keeps it in ${stateFolderFor(plan.destRoot)}: it is not used (this run compares); remove it`, legacy);
  }
  if (plan.destIsDir) {
    if (!destStat) plan.destCreated = true;
    if (!destStat && !leavesDest(o, far)) {
      // When the contents of a folder land in it, it gets that folder's mode at the end: 0700 until then.
      const mode = plan.transfers.some((t) => t.destRel === '') ? 0o700 : 0o777;
      // With --restrict the folders above it are reached from DIR, none through a symlink (nothing is made outside DIR).
      const made = within === undefined ? mkdir(fsPath(plan.destRoot), mode) : mkdirBeneath(within, plan.destRoot, mode);
      await made.catch(async (e) => {
        // A --state-dir inside DEST: making the state folder made DEST.
        if (errnoOf(e) === 'EEXIST' && (await statOrUndefined(dest))?.isDirectory() && stateBaseWithin(plan.destRoot)) return;
        throw new QsyncError('TARGET', `mkdir "${resolve(dest)}" failed: ${rsyncErrnoText(e)}`, { file: dest }, { cause: e });
      });
    }
    // rsync's line for a destination folder it makes, with -v or -i (once made).
    if (!destStat && namesMade(o)) printer.info?.(`created directory ${dest.replace(/(.)\/+$/, '$1')}`, 'always');
  }
  if (!leavesDest(o, far)) {
    await access(fsPath(plan.destRoot), constants.W_OK).catch((e) => {
      // One file to a name in a folder that is not there: rsync's words and exit 3.
      if (errnoOf(e) === 'ENOENT' || errnoOf(e) === 'ENOTDIR') {
        throw new QsyncError('TARGET', `change_dir#3 "${resolve(plan.destRoot)}" failed: ${rsyncErrnoText(e)}`, { file: plan.destRoot, exit: EXIT.FILE_SELECT.code });
      }
      throw new QsyncError('TARGET', `destination ${plan.destRoot} is not writable: ${(e as Error).message}`, { file: plan.destRoot, hint: 'check its permissions or mount' });
    });
  }
  if (o.manifest && (plan.transfers.length !== 1 || sources[0].stat.isDirectory())) {
    throw new QsyncError('USAGE', '--manifest PATH needs exactly one source file', {});
  }

  const rules = await filterRules(o.filters, o.from0);
  // A batch file is created beside its name and renamed over it: its folder is resolved once, trusting no other user's symlink, and held.
  const batchPath = o.writeBatch ?? o.onlyWriteBatch;
  const batchAt = batchPath === undefined || far.relay ? undefined : await resolveTrusted(batchPath, false);
  try {
    return await syncAt(printer, from, plan, batchAt && batchAt.dir.at(batchAt.name), rules, missing, o, far);
  } finally {
    await batchAt?.dir.close();
  }
}

/**
 * --files-from: the names of the list below the one SRC, into the DEST
 * folder; a list of one file (no folder on its way) is copied as one file
 * operand would be, to DEST itself when DEST is no folder, as rsync does.
 */
async function listPlan(list: { name: string; lines: string[] }, sources: { operand: string; stat: BigIntStats }[], dest: string, destStat: BigIntStats | undefined, from: Sources): Promise<Plan> {
  if (sources.length !== 1 || !sources[0]!.stat.isDirectory()) {
    throw new QsyncError('USAGE', '--files-from takes one SRC, the folder the names in the list are relative to', { hint: 'qsync --files-from=LIST SRC/ DEST/' });
  }
  const base = sources[0]!.operand;
  const names = list.lines.map((line) => listedName(line, list.name));
  const only = names.length === 1 && !names[0]!.dotDir && names[0]!.rel && !names[0]!.rel.includes('/') ? join(base, names[0]!.rel) : undefined;
  const st = only === undefined ? undefined : await from.statOperand(only).catch(() => undefined);
  if (st && !st.isDirectory()) return planOperands([{ operand: only!, stat: st }], dest, destStat);
  return { destRoot: resolve(dest), destIsDir: true, transfers: [], lists: [{ base, names, dirs: true }] };
}

/**
 * -R: each SRC keeps its path below DEST (from its "/./" on, if it has
 * one), the folders on the way made with their attributes, as rsync does;
 * one file with no folder on its way is copied as a plain operand is.
 */
function relativePlan(printer: Printer, sources: { operand: string; stat: BigIntStats }[], dest: string, destStat: BigIntStats | undefined, o: SyncOptions): Plan {
  const named = sources.map((s) => ({ ...relativeOperand(s.operand), ...s }));
  if (named.length === 1 && !named[0]!.stat.isDirectory() && !named[0]!.name.dotDir && !named[0]!.name.rel.includes('/')) return planOperands(sources, dest, destStat);
  const sent = named.filter((l) => {
    // rsync skips a folder without -r before it sends the folders on its way.
    if (!l.stat.isDirectory() || o.recursive) return true;
    printer.info?.(`skipping directory ${l.name.rel || '.'}`, 'always');
    return false;
  });
  const lists = sent.map((l) => ({ base: l.base, names: [l.name], dirs: false, shownPrefix: l.base === '/' && !l.operand.includes('/./') ? '/' : '' }));
  return { destRoot: resolve(dest), destIsDir: true, transfers: [], lists };
}

/**
 * --mkpath, as rsync's manual describes it: the missing folders of DEST (of its
 * parent, when one file is copied to a DEST without a trailing slash) are
 * made, top down, 0777 less the umask; -v or -i says how many. With -n
 * nothing is made, and the count is what would be.
 */
async function makePath(printer: Printer, dest: string, sources: { stat: BigIntStats }[], o: SyncOptions): Promise<void> {
  if (await statOrUndefined(dest)) return;
  const single = sources.length === 1 && !sources[0]!.stat.isDirectory();
  const trimmed = dest.replace(/(.)\/+$/, '$1');
  const target = single && !dest.endsWith('/') ? dirname(dest) : trimmed;
  const missing: string[] = [];
  for (let p = target; p !== dirname(p) && p !== '.'; p = dirname(p)) {
    const st = await lstatOrUndefined(fsPath(p));
    if (st) break;
    missing.unshift(p);
  }
  if (!o.dryRun) {
    for (const p of missing) {
      await mkdir(fsPath(p), 0o777).catch((e) => {
        if (errnoOf(e) === 'EEXIST') return;
        throw new QsyncError('TARGET', `mkdir ${resolve(p)} failed: ${errnoText(e)}`, { file: p }, { cause: e });
      });
    }
  }
  if (missing.length && namesMade(o)) printer.info?.(`created ${missing.length} director${missing.length === 1 ? 'y' : 'ies'} for ${target}`, 'always');
}

/** rsync names the folders it makes for DEST with --info=name, -i or an --out-format with %i. */
const namesMade = (o: SyncOptions): boolean => (o.info?.name ?? o.verbose) >= 1 || o.itemize || usesEscape(o.outFormat, 'i');

/**
 * -n, and --only-write-batch (which records what a run would write), leave
 * DEST as it is, as rsync does: not made when missing, no state folder, no lock.
 */
const leavesDest = (o: SyncOptions, far: FarEnd = {}): boolean => o.dryRun || o.onlyWriteBatch !== undefined || far.relay?.recordOnly === true;

/** mkdir of `path`, which lies below `top`, reached from `top` without following a symlink. */
async function mkdirBeneath(top: string, path: string, mode: number): Promise<void> {
  const parent = await openBeneathMaking(top, relative(resolve(top), dirname(resolve(path))));
  try {
    await parent.mkdir(basename(resolve(path)), mode);
  } finally {
    await parent.close();
  }
}

/** `far.within` (qsync --server --restrict DIR): the destination root, once held, must lie in DIR. */
async function syncAt(printer: Printer, from: Sources, plan: Plan, batch: string | undefined, rules: PatternRule[], missing: boolean, o: SyncOptions, far: FarEnd): Promise<number> {
  const { within } = far;
  // The destination root (a symlink the user gave as DEST is followed, as rsync does); everything below it is reached through it.
  const destDir = plan.destCreated && leavesDest(o, far) ? undefined : await Dir.open(plan.destRoot).catch((e) => {
    throw new QsyncError('TARGET', `cannot open destination ${plan.destRoot}: ${(e as Error).message}`, { file: plan.destRoot }, { cause: e });
  });
  try {
    if (destDir && within !== undefined) await checkInside(destDir.self, within);
    return await syncInto(printer, from, plan, destDir, batch, rules, missing, o, far);
  } finally {
    await destDir?.close();
  }
}

/** `batch`: the --write-batch/--only-write-batch file, reached through its held folder. */
async function syncInto(printer: Printer, from: Sources, plan: Plan, destDir: Dir | undefined, batch: string | undefined, rules: PatternRule[], missing: boolean, o: SyncOptions, far: FarEnd): Promise<number> {
  const lock = leavesDest(o, far) ? undefined : await lockDestination(plan.destRoot);
  const backupDir = o.backupDir === undefined ? undefined : await historyPath(plan.destRoot, o.backupDir, far.within).catch(async (e) => {
    await lock?.release();
    throw e;
  });
  const rel = backupDir === undefined ? '' : relative(plan.destRoot, backupDir);
  // A history folder inside the destination is not user data: protect it from --delete (and --delete-excluded), as rsync does.
  const history: PatternRule[] = rel && !rel.startsWith('..') && !isAbsolute(rel) ? [{ type: 'exclude', pattern: `/${rel}/` }] : [];
  rules.unshift(...history);
  let deltas: Awaited<ReturnType<typeof openRunDeltas>>;
  try {
    // A dry run writes nothing: no history folder, no (empty) batch file.
    deltas = await openRunDeltas(
      o.dryRun ? { compress: o.compress } : { ...o, backupDir, writeBatch: o.writeBatch && batch, onlyWriteBatch: o.onlyWriteBatch && batch, relay: far.relay, within: far.within },
      Date.now(),
    );
  } catch (e) {
    await lock?.release();
    throw e;
  }
  try {
    // Images of libvirt domains go through their domain (src/sync/dropin.ts); without libvirt, nothing changes.
    // In a push, the client found them and this side leaves them to it (src/remote/domain-claims.ts).
    const dropIn = far.claims ?? (from.remote || o.manifest || deltas.recordOnly ? undefined : await localClaims(o.connect, o.times));
    const tree = new TreeSync(
      plan,
      { ...o, preserveTimes: o.times, countFirst: printer.wantsTotal === true && !from.remote, recordOnly: deltas.recordOnly, stateBase: await stateBaseIdentity(), protect: compileFilters(history), claim: dropIn && ((st, rel) => dropIn.claim(st, rel)) },
      compileFilters(rules),
      { sources: from, hooks: printer, wrapSink: deltas.wrapSink },
      destDir,
    );
    const outcome = await tree.run();
    if (dropIn) {
      const announce = o.verbose > 0 || o.itemize || o.json;
      const t0 = performance.now();
      // A signal now ends the domains' backup jobs and exports before qsync stops (src/cli/interrupt.ts).
      const signal = armInterrupt();
      try {
        const failed = await dropIn.run(plan.destRoot, { connect: o.connect, blockSize: o.blockSize, verifySample: o.verifySample, dryRun: o.dryRun, announce, signal, wrapSink: deltas.wrapSink }, printer, outcome.stats, destDir);
        if (failed) outcome.partial = true;
      } finally {
        disarmInterrupt();
      }
      outcome.stats.elapsedMs += performance.now() - t0;
    }
    // rsync's precedence: 23 over 24 over 25.
    const code = missing || outcome.partial ? EXIT.PARTIAL.code : outcome.vanished ? EXIT.VANISHED.code : outcome.skippedDeletes ? EXIT.DEL_LIMIT.code : EXIT.OK.code;
    await deltas.finish(!outcome.partial);
    return printer.finish(outcome.stats, code);
  } catch (e) {
    // The run's own error is the one to report; a history or batch that could not be closed after it is named beside it.
    await deltas.finish(false).catch((f: unknown) => printer.warning?.((f as Error).message));
    throw e;
  } finally {
    await lock?.release();
  }
}
