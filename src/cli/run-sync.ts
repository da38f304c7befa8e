/**
 * `qsync [OPTION]... SRC... DEST`: check the operands, take the destination
 * lock, run the tree sync, print, and turn the outcome into rsync's exit code.
 */
import { constants as fsConstants, type BigIntStats } from 'node:fs';
import { access, constants, mkdir, stat } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, relative, resolve } from 'node:path';
import type { Writable } from 'node:stream';
import { errnoOf, QsyncError } from '../core/errors.js';
import { compileFilters, expandFilterFiles, type FilterRule, type PatternRule } from '../core/filter.js';
import { HashPool } from '../hash/pool.js';
import { checkInside } from '../remote/restrict.js';
import { readUpTo } from '../io/local-file.js';
import { Dir, fsPath, lstatOrUndefined, openBeneathMaking, resolveTrusted } from '../io/safe-fs.js';
import { lockDestination } from '../sync/lock.js';
import { planOperands, type Plan } from '../sync/operands.js';
import { TreeSync } from '../sync/tree.js';
import { checkStateRoot, stateBaseIdentity, stateBaseWithin, stateFolderFor } from '../sync/state-dir.js';
import { checkAttrTools } from '../sync/ext-attrs.js';
import { LocalSources, type Sources } from '../sync/source.js';
import { openRunDeltas } from '../sync/run-deltas.js';
import type { SyncOptions } from './args.js';
import { EXIT, exitCodeFor } from './exit-codes.js';
import { createPrinter, type Printer } from './output.js';
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
    const { dir, name } = await resolveTrusted(rule.file, true);
    try {
      const fh = await dir.openFile(name, fsConstants.O_RDONLY);
      try {
        const { size } = await fh.stat();
        if (size > MAX_FILTER_FILE) throw new QsyncError('USAGE', `${rule.type} file ${rule.file} is ${size} bytes; at most ${MAX_FILTER_FILE} are read`, { file: rule.file });
        // At most the size stat gave, plus one byte to see a file that grows (or a /proc file that says 0 bytes).
        const buf = Buffer.alloc(size + 1);
        const n = await readUpTo(fh, buf, 0);
        if (n > size) {
          throw new QsyncError('USAGE', `${rule.type} file ${rule.file} grew while qsync read it (or is not a plain file of a fixed size)`, {
            file: rule.file,
            hint: 'give a file that does not change while qsync runs',
          });
        }
        texts.set(rule.file, buf.subarray(0, n).toString('utf8'));
      } finally {
        await fh.close();
      }
    } catch (e) {
      if (e instanceof QsyncError) throw e;
      throw new QsyncError('IO', `failed to open ${rule.type} file ${rule.file}: ${(e as Error).message}`, { file: rule.file }, { cause: e });
    } finally {
      await dir.close();
    }
  }
  return texts;
}

export async function runSync(operands: string[], dest: string, o: SyncOptions, io: CliIO): Promise<number> {
  const printer = createPrinter(o, io);
  try {
    return await syncWith(printer, operands, dest, o);
  } catch (e) {
    // The error still reaches the user: on stderr, or inside the --json document.
    if (o.json) return printer.finish(undefined, exitCodeFor(e), e);
    throw e;
  }
}

async function syncWith(printer: Printer, operands: string[], dest: string, o: SyncOptions): Promise<number> {
  if ([...operands, dest].some((p) => parseRemote(p))) return (await import('./run-remote.js')).syncRemote(printer, operands, dest, o);
  if (o.bwlimit) printer.warning?.('--bwlimit paces remote transfers only: this local run is not limited');
  if (o.acls || o.xattrs) await checkAttrTools();
  // The hash workers boot while the operands are checked and the tree is walked.
  const pool = new HashPool(o.blockSize);
  if (!o.dryRun) pool.warm();
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
export async function filterRules(rules: readonly FilterRule[]): Promise<PatternRule[]> {
  const texts = await readFilterFiles(rules);
  return expandFilterFiles(rules, (f) => texts.get(f)!);
}

export async function receive(printer: Printer, from: Sources, operands: string[], dest: string, o: SyncOptions, within?: string): Promise<number> {
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
      printer.warning?.(`cannot read source ${operand}: ${errnoOf(e) === 'ENOENT' ? 'no such file or directory' : (e as Error).message}`, operand);
    }
  }
  if (!sources.length) return printer.finish(undefined, EXIT.PARTIAL.code);

  const destStat = await statOrUndefined(dest);
  const plan = planOperands(sources, dest, destStat);
  if (plan.destIsDir && destStat && !destStat.isDirectory()) {
    throw new QsyncError('USAGE', `destination ${dest} is a file, but must be a directory when copying a directory or more than one file`, { file: dest, exit: EXIT.FILE_SELECT.code });
  }
  // qsync's own state folder is checked (and made) before anything lands in DEST.
  await checkStateRoot(plan.destRoot, !leavesDest(o));
  const legacy = join(plan.destRoot, '.qsync');
  const sourceHasOne = async () =>
    from.remote || (await Promise.all(sources.map((s) => (s.operand.endsWith('/') ? lstatOrUndefined(fsPath(join(s.operand, '.qsync'))) : undefined)))).some(Boolean);
  if ((await lstatOrUndefined(fsPath(join(legacy, 'manifests'))))?.isDirectory() && !(await sourceHasOne())) {
    printer.warning?.(`${legacy} is the state of an older qsync, which now keeps it in ${stateFolderFor(plan.destRoot)}: it is not used (this run compares); remove it`, legacy);
  }
  if (plan.destIsDir) {
    if (!destStat) plan.destCreated = true;
    // rsync's line for a destination folder it makes, with -v or -i.
    if (!destStat && (o.verbose || o.itemize)) printer.notice?.(`created directory ${dest.replace(/(.)\/+$/, '$1')}`);
    if (!destStat && !leavesDest(o)) {
      // When the contents of a folder land in it, it gets that folder's mode at the end: 0700 until then.
      const mode = plan.transfers.some((t) => t.destRel === '') ? 0o700 : 0o777;
      // With --restrict the folders above it are reached from DIR, none through a symlink (nothing is made outside DIR).
      const made = within === undefined ? mkdir(fsPath(plan.destRoot), mode) : mkdirBeneath(within, plan.destRoot, mode);
      await made.catch(async (e) => {
        // A --state-dir inside DEST: making the state folder made DEST.
        if (errnoOf(e) === 'EEXIST' && (await statOrUndefined(dest))?.isDirectory() && stateBaseWithin(plan.destRoot)) return;
        throw new QsyncError('TARGET', `cannot create destination directory ${dest}: ${(e as Error).message}`, { file: dest }, { cause: e });
      });
    }
  }
  if (!leavesDest(o)) {
    await access(fsPath(plan.destRoot), constants.W_OK).catch((e) => {
      throw new QsyncError('TARGET', `destination ${plan.destRoot} is not writable: ${(e as Error).message}`, { file: plan.destRoot, hint: 'check its permissions or mount' });
    });
  }
  if (o.manifest && (plan.transfers.length !== 1 || sources[0].stat.isDirectory())) {
    throw new QsyncError('USAGE', '--manifest PATH needs exactly one source file', {});
  }

  const rules = await filterRules(o.filters);
  // A batch file is created beside its name and renamed over it: its folder is resolved once, trusting no other user's symlink, and held.
  const batchPath = o.writeBatch ?? o.onlyWriteBatch;
  const batchAt = batchPath === undefined ? undefined : await resolveTrusted(batchPath, false);
  try {
    return await syncAt(printer, from, plan, batchAt && batchAt.dir.at(batchAt.name), rules, missing, o, within);
  } finally {
    await batchAt?.dir.close();
  }
}

/**
 * -n, and --only-write-batch (which records what a run would write), leave
 * DEST as it is, as rsync does: not made when missing, no state folder, no lock.
 */
const leavesDest = (o: SyncOptions): boolean => o.dryRun || o.onlyWriteBatch !== undefined;

/** mkdir of `path`, which lies below `top`, reached from `top` without following a symlink. */
async function mkdirBeneath(top: string, path: string, mode: number): Promise<void> {
  const parent = await openBeneathMaking(top, relative(resolve(top), dirname(resolve(path))));
  try {
    await parent.mkdir(basename(resolve(path)), mode);
  } finally {
    await parent.close();
  }
}

/** `within` (qsync --server --restrict DIR): the destination root, once held, must lie in DIR. */
async function syncAt(printer: Printer, from: Sources, plan: Plan, batch: string | undefined, rules: PatternRule[], missing: boolean, o: SyncOptions, within?: string): Promise<number> {
  // The destination root (a symlink the user gave as DEST is followed, as rsync does); everything below it is reached through it.
  const destDir = plan.destCreated && leavesDest(o) ? undefined : await Dir.open(plan.destRoot).catch((e) => {
    throw new QsyncError('TARGET', `cannot open destination ${plan.destRoot}: ${(e as Error).message}`, { file: plan.destRoot }, { cause: e });
  });
  try {
    if (destDir && within !== undefined) await checkInside(destDir.self, within);
    return await syncInto(printer, from, plan, destDir, batch, rules, missing, o);
  } finally {
    await destDir?.close();
  }
}

/** `batch`: the --write-batch/--only-write-batch file, reached through its held folder. */
async function syncInto(printer: Printer, from: Sources, plan: Plan, destDir: Dir | undefined, batch: string | undefined, rules: PatternRule[], missing: boolean, o: SyncOptions): Promise<number> {
  const lock = leavesDest(o) ? undefined : await lockDestination(plan.destRoot);
  const backupDir = o.backupDir === undefined ? undefined : resolve(plan.destRoot, o.backupDir);
  const rel = backupDir === undefined ? '' : relative(plan.destRoot, backupDir);
  // A history folder inside the destination is not user data: protect it from --delete, as rsync does.
  if (rel && !rel.startsWith('..') && !isAbsolute(rel)) rules.unshift({ type: 'exclude', pattern: `/${rel}/` });
  let deltas: Awaited<ReturnType<typeof openRunDeltas>>;
  try {
    // A dry run writes nothing: no history folder, no (empty) batch file.
    deltas = await openRunDeltas(
      o.dryRun ? { compress: o.compress } : { ...o, backupDir, writeBatch: o.writeBatch && batch, onlyWriteBatch: o.onlyWriteBatch && batch },
      Date.now(),
    );
  } catch (e) {
    await lock?.release();
    throw e;
  }
  try {
    const tree = new TreeSync(
      plan,
      { ...o, preserveTimes: o.times, recordOnly: deltas.recordOnly, stateBase: await stateBaseIdentity() },
      compileFilters(rules),
      { sources: from, hooks: printer, wrapSink: deltas.wrapSink },
      destDir,
    );
    const outcome = await tree.run();
    const code = missing || outcome.partial ? EXIT.PARTIAL.code : outcome.vanished ? EXIT.VANISHED.code : EXIT.OK.code;
    await deltas.finish(!outcome.partial);
    return printer.finish(outcome.stats, code);
  } catch (e) {
    await deltas.finish(false);
    throw e;
  } finally {
    await lock?.release();
  }
}
