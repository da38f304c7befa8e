/**
 * What qsync prints, as printers implementing the engine's SyncHooks:
 *
 * - text: rsync's output. -v names, -i itemize lines, --progress lines at
 *   the end of each transferred file, --info=progress2 one total line,
 *   --stats and the closing "sent ... received ..." lines, on stdout;
 *   warnings on stderr. When the caller says the terminal is a TTY and
 *   progress was asked for, cli-progress bars (file and total: scanned,
 *   written, rate, ETA) on stderr replace the progress lines, and the other
 *   lines are logged above the bars so they do not tear the display.
 * - json (--json): nothing while the run goes, then one JSON object on stdout.
 */
import type { Writable } from 'node:stream';
import type cliProgress from 'cli-progress';
import { createRequire } from 'node:module';
import { isQsyncError } from '../core/errors.js';
import type { FileReport, InfoCategory, RunStats, SyncHooks } from '../sync/events.js';
import { infoLevels, type InfoLevels, type SyncOptions } from './args.js';
import { deletionItem, formatItem, itemOf, usesEscape } from './log-format.js';
import { describeExit } from './exit-codes.js';

export interface OutputIO {
  stdout: Writable;
  stderr: Writable;
  /** The terminal is interactive: progress is drawn as bars on stderr. */
  isTTY: boolean;
}

export interface Printer extends SyncHooks {
  /**
   * Ends the run's output: the progress2 line, --stats, the closing lines,
   * rsync's "qsync error: ... (code N)" for a non-zero code, or the --json
   * document (`error`, if the run died of one, goes into its "errors").
   * `stats` is undefined when the run ended before syncing anything.
   * Returns `exitCode`.
   */
  /** The printer numbers progress with the whole file list: count it first (TreeOptions.countFirst). */
  readonly wantsTotal?: boolean;
  finish(stats: RunStats | undefined, exitCode: number, error?: unknown): number;
  /** rsync's header line(s), if not printed yet (TextPrinter.header). */
  header?(): void;
}

type Options = Pick<SyncOptions, 'verbose' | 'quiet' | 'human' | 'progress' | 'progress2' | 'stats' | 'itemize' | 'dryRun' | 'json'> &
  Partial<Pick<SyncOptions, 'outFormat' | 'info' | 'recursive' | 'dirs' | 'filesFrom' | 'pruneEmptyDirs' | 'noIncRecursive'>>;

/**
 * rsync's first line at --info=flist1, as a tree sync prints it: "sending
 * incremental file list" when the list goes out as it is built (-r, and not
 * -m, which needs it whole), "building file list ... done" when it is built
 * first (-d, --files-from, -m or --no-inc-recursive), nothing without folders to send (neither
 * -r nor -d). With --progress the built list is counted as it grows: the
 * count follows (TextPrinter.listTotal).
 */
function flistHeader(o: Options): { incremental: boolean } | undefined {
  if (!o.recursive && !o.dirs && o.filesFrom === undefined) return undefined;
  return { incremental: Boolean(o.recursive) && !o.pruneEmptyDirs && !o.noIncRecursive };
}

/** `noticesToStderr`: qsync's own notices on stderr, keeping stdout rsync's (a tree sync, whose header is printed at once, as rsync's, before any error). */
export function createPrinter(o: Options, io: OutputIO, now: () => number = Date.now, noticesToStderr = false): Printer {
  return o.json ? new JsonPrinter(io) : new TextPrinter(o, io, now, noticesToStderr);
}

const UNITS = 'KMGTP';

/**
 * rsync's number format at human-readable level `human` (SyncOptions.human):
 * 0 plain digits, 1 digits grouped with commas (rsync's default),
 * 2 units of 1000 (1.23M), 3 or more units of 1024.
 */
export function formatSize(n: number, human: number): string {
  if (human >= 2) {
    const mult = human === 2 ? 1000 : 1024;
    if (Math.abs(n) >= mult) {
      let v = Math.abs(n) / mult;
      let u = 0;
      while (v >= mult && u < UNITS.length - 1) {
        v /= mult;
        u++;
      }
      return `${n < 0 ? '-' : ''}${v.toFixed(2)}${UNITS[u]}`;
    }
  }
  const digits = String(Math.trunc(n));
  return human ? digits.replace(/\B(?=(\d{3})+$)/g, ',') : digits;
}

/** A number as rsync prints it in --stats: a decimal with `places` digits, grouped or in units like formatSize. */
function formatDecimal(x: number, human: number, places = 2): string {
  if (!human || Math.abs(x) < 1000) return x.toFixed(places);
  if (human >= 2) return formatSize(x, human);
  return formatSize(x, human) + x.toFixed(places).replace(/^-?\d+/, '');
}

/**
 * rsync's progress line: "     1,234,567 100%   12.34MB/s    0:00:01". The
 * time is the elapsed one, or with `eta` (a tick while the file goes) the
 * time left at this rate, as rsync shows them.
 */
export function formatProgress(done: number, size: number, elapsedMs: number, human: number, eta = false): string {
  let rate = (done * 1000) / Math.max(elapsedMs, 1) / 1024;
  let units = 'kB/s';
  if (rate > 1024 * 1024) {
    rate /= 1024 * 1024;
    units = 'GB/s';
  } else if (rate > 1024) {
    rate /= 1024;
    units = 'MB/s';
  }
  const perMs = done / Math.max(elapsedMs, 1);
  const secs = Math.floor(eta ? (perMs ? (size - done) / perMs / 1000 : 0) : elapsedMs / 1000);
  const time = `${String(Math.floor(secs / 3600)).padStart(4)}:${pad2(Math.floor(secs / 60) % 60)}:${pad2(secs % 60)}`;
  const pct = done === size ? 100 : Math.floor((100 * done) / size);
  return `${formatSize(done, human).padStart(15)} ${String(pct).padStart(3)}% ${rate.toFixed(2).padStart(7)}${units} ${time}`;
}

const pad2 = (n: number): string => String(n).padStart(2, '0');

/** rsync's two closing lines of -v and --stats: "sent N bytes  received N bytes  R bytes/sec", "total size is N  speedup is S". */
/**
 * rsync's "sent" and "received": a remote run's bytes through the remote
 * shell; a local run has no wire: what it sends is the data written to the
 * target and about what rsync's file list would take (RunStats.flistSize),
 * so that the speedup compares with rsync's and never divides by nothing.
 */
export function wireBytes(stats: RunStats): { sent: number; received: number } {
  return { sent: stats.wireSent ?? stats.literal + (stats.flistSize ?? 0), received: stats.wireReceived ?? 0 };
}

export function summaryLines(stats: RunStats, o: Pick<SyncOptions, 'human' | 'dryRun'>): string[] {
  const h = o.human;
  const { sent, received } = wireBytes(stats);
  const rate = ((sent + received) * 1000) / Math.max(stats.elapsedMs, 1);
  const speedup = stats.totalSize / Math.max(sent + received, 1);
  return [
    `sent ${formatSize(sent, h)} bytes  received ${formatSize(received, h)} bytes  ${formatDecimal(rate, h)} bytes/sec`,
    `total size is ${formatSize(stats.totalSize, h)}  speedup is ${formatDecimal(speedup, Math.min(h, 1))}${o.dryRun ? ' (DRY RUN)' : ''}`,
  ];
}

type Tally = Record<'dir' | 'link' | 'dev' | 'special', number>;
const emptyTally = (): Tally => ({ dir: 0, link: 0, dev: 0, special: 0 });
const TALLY_KEY: Partial<Record<FileReport['kind'], keyof Tally>> = { dir: 'dir', symlink: 'link', device: 'dev', special: 'special' };

/** What --stats counts by kind that RunStats does not: the entries made and the folders deleted, as the run reports them. */
export class KindTally {
  readonly created = emptyTally();
  deletedDirs = 0;

  fileEnd(r: FileReport): void {
    const key = TALLY_KEY[r.kind];
    if (key && r.itemize.slice(2).startsWith('+')) this.created[key]++;
  }

  deleted(path: string): void {
    if (path.endsWith('/')) this.deletedDirs++;
  }
}

/**
 * rsync's closing lines at --info=stats`level`: the --stats block (2), then
 * "sent ... received ..." and "total size ... speedup" (1); none at 0. The
 * terminal and the log file print the same.
 */
export function closingLines(stats: RunStats, level: number, tally: KindTally, o: Pick<SyncOptions, 'human' | 'dryRun'>): string[] {
  const h = o.human;
  const lines: string[] = [];
  if (level >= 2) {
    const kinds: Tally = { dir: stats.dirs, link: stats.symlinks ?? 0, dev: stats.devices ?? 0, special: stats.specials ?? 0 };
    const { sent, received } = wireBytes(stats);
    lines.push(
      '',
      itemizedCount('Number of files', stats.files, kinds),
      itemizedCount('Number of created files', stats.created, tally.created),
      itemizedCount('Number of deleted files', stats.deleted, { ...emptyTally(), dir: tally.deletedDirs }),
      `Number of regular files transferred: ${formatSize(stats.transferred, 1)}`,
      `Total file size: ${formatSize(stats.totalSize, h)} bytes`,
      `Total transferred file size: ${formatSize(stats.transferredSize, h)} bytes`,
      `Literal data: ${formatSize(stats.literal, h)} bytes`,
      `Matched data: ${formatSize(stats.matched, h)} bytes`,
      `File list size: ${formatSize(0, h)}`, // rsync's, locally: its incremental list is not counted
      // rsync prints the list's times once building it took a millisecond.
      `File list generation time: ${formatDecimal(Math.max(stats.flistMs ?? 0, 1) / 1000, 1, 3)} seconds`,
      `File list transfer time: ${formatDecimal(0, 1, 3)} seconds`,
      `Total bytes sent: ${formatSize(sent, h)}`,
      `Total bytes received: ${formatSize(received, h)}`,
    );
  }
  if (level >= 1) lines.push('', ...summaryLines(stats, o));
  return lines;
}

/** rsync's "Number of files: 5 (reg: 3, dir: 2)": regular files are what the other kinds leave of the total. */
function itemizedCount(label: string, total: number, t: Tally): string {
  const reg = total - t.dir - t.link - t.dev - t.special;
  const parts = Object.entries({ reg, ...t })
    .filter(([, n]) => n > 0)
    .map(([k, n]) => `${k}: ${formatSize(n, 1)}`);
  return `${label}: ${formatSize(total, 1)}${total && parts.length ? ` (${parts.join(', ')})` : ''}`;
}

/** The locale's character set is UTF-8 (else, as in the C locale, only ASCII prints as itself). */
const UTF8_LOCALE = /utf-?8/i.test(process.env.LC_ALL || process.env.LC_CTYPE || process.env.LANG || '');

/**
 * A line as rsync writes names to a terminal: a control character (but
 * tab), a byte that is not valid UTF-8 (carried as an escaped byte, see
 * decodeName in src/io/safe-fs.ts) or, outside a UTF-8 locale, any non-ASCII
 * byte, becomes `\#ooo` (its octal value); a backslash that would read as
 * such an escape becomes `\#134`.
 */
export function escapeForTerminal(line: string, utf8 = UTF8_LOCALE): string {
  if (!/[\x00-\x08\x0a-\x1f\\\u0080-\uffff]/.test(line)) return line;
  let out = '';
  for (let i = 0; i < line.length; ) {
    const cp = line.codePointAt(i)!;
    const ch = String.fromCodePoint(cp);
    i += ch.length;
    const octal = (b: number) => `\\#${b.toString(8).padStart(3, '0')}`;
    if (cp >= 0xdc80 && cp <= 0xdcff) out += octal(cp - 0xdc00);
    else if ((cp < 0x20 && cp !== 9) || (cp === 0x5c && /^#[0-9]{3}/.test(line.slice(i, i + 4)))) out += octal(cp);
    else if (cp >= 0x80 && !utf8) for (const b of Buffer.from(ch, 'utf8')) out += octal(b);
    else out += ch;
  }
  return out;
}

/** rsync's whole-file transfer shows its first progress after this many bytes (or the whole, smaller file). */
const FIRST_TICK = 32 * 1024;

class TextPrinter implements Printer {
  /** Set while bars are drawn; the closing lines go to stdout after them. */
  private bars?: Bars;
  private headerDone = false;
  private transferred = 0;
  private transferredBytes = 0;
  private seen = 0;
  private readonly tally = new KindTally();
  private readonly started = new Map<string, { at: number; tick: number; named: boolean; size: number }>();
  /** The counted file list (TreeOptions.countFirst): "to-chk" then counts down from it. */
  private list?: { entries: number; size: number };
  private lastIndex = -1;
  /** A progress line without its newline is on stdout (progress2, or a tick): the next line starts with one. */
  private openLine = false;
  /** rsync's stdout format: --out-format, -i's "%i %n%L", or -v's "%n%L" (undefined: no names). */
  private readonly format: string | undefined;
  private readonly hasI: boolean;
  private readonly hasOI: boolean;
  readonly wantsTotal: boolean;
  private readonly t0: number;

  constructor(
    private readonly o: Options,
    private readonly io: OutputIO,
    private readonly now: () => number,
    /** qsync's own notices go to stderr (a tree sync, whose stdout is rsync's), else stdout (image mode's lines). */
    private readonly noticesToStderr = false,
  ) {
    // -q: rsync keeps its levels (the log file follows them) and prints nothing of them on stdout.
    const info = o.quiet ? SILENT : (o.info ?? defaultInfo(o));
    this.levels = info;
    if (io.isTTY && info.progress) this.bars = new Bars(io.stderr, o.human, now);
    this.format = o.quiet ? undefined : (o.outFormat ?? (o.itemize ? '%i %n%L' : info.name >= 1 ? '%n%L' : undefined));
    this.hasI = usesEscape(this.format, 'i');
    this.hasOI = usesEscape(this.format, 'oi');
    this.wantsTotal = !this.bars && info.progress > 0;
    this.t0 = now();
  }

  /**
   * rsync's header (--info=flist), once: before the first line, at the end
   * of a run that printed none, and before a failure that is no usage error
   * (rsync prints it as it starts; "incremental" is its word for a list sent
   * while it is built). A tree sync's follows flistHeader; image mode's is the incremental one.
   */
  header(): void {
    if (this.headerDone) return;
    this.headerDone = true;
    if (this.levels.flist < 1) return;
    const header = this.noticesToStderr ? flistHeader(this.o) : { incremental: true };
    if (header?.incremental) this.emit('sending incremental file list');
    else if (header && this.levels.flist >= 2 && this.levels.progress) {
      this.raw('building file list ... \n 0 files...\r');
      this.counting = true;
    } else if (header) this.emit('building file list ... done');
  }

  /** "building file list ... " is out, its count to come: " 100 files...\r" each hundred, then "N files to consider". */
  private counting = false;

  private countDone(entries: number): void {
    if (!this.counting) return;
    this.counting = false;
    let ticks = '';
    for (let n = 100; n <= entries; n += 100) ticks += ` ${n} files...\r`;
    this.raw(`${ticks}${entries} file${entries === 1 ? ' ' : 's '}to consider\n`);
  }

  private readonly levels: InfoLevels;

  private out(line: string): void {
    this.header();
    this.emit(line);
  }

  private emit(line: string): void {
    if (this.bars) return this.bars.log(escapeForTerminal(line));
    this.raw(`${escapeForTerminal(line)}\n`);
  }

  /** Text to stdout as it is, after the newline an open progress line needs. */
  private raw(text: string, open = false): void {
    if (this.openLine && !text.startsWith('\r')) this.io.stdout.write('\n');
    this.io.stdout.write(text);
    this.openLine = open;
  }

  listTotal(entries: number, size: number): void {
    this.list = { entries, size };
    this.header();
    this.countDone(entries);
  }

  /** rsync's count after a progress line: "to-chk=R/T" with the counted list, else what is known so far ("ir-chk"). */
  private chk(index: number | undefined): string {
    if (index !== undefined) this.lastIndex = Math.max(this.lastIndex, index);
    if (this.list && index !== undefined) return `to-chk=${this.list.entries - index - 1}/${this.list.entries}`;
    if (this.list) return `to-chk=${Math.max(this.list.entries - this.lastIndex - 1, 0)}/${this.list.entries}`;
    return `ir-chk=0/${this.seen}`;
  }

  fileStart(path: string, size: number): void {
    this.started.set(path, { at: this.now(), tick: this.now(), named: false, size });
    this.bars?.start(path, size);
  }

  fileProgress(path: string, scanned: number, written: number): void {
    this.bars?.progress(scanned, written);
    // A long file: rsync's line shows the bytes done once a second, after its name (with -v; -i's line comes
    // only at the end, once its letters are known) and a first tick after 32 KiB.
    const f = this.started.get(path);
    if (this.bars || !f || this.levels.progress !== 1 || this.o.itemize || this.o.outFormat) return;
    const t = this.now();
    if (t - f.tick < 1000) return;
    if (!f.named) {
      if (this.format) this.out(path);
      this.raw(`\r${formatProgress(Math.min(f.size, FIRST_TICK), f.size, t - f.at, this.o.human, true)}  `, true);
    }
    f.named = true;
    f.tick = t;
    this.raw(`\r${formatProgress(scanned, f.size, t - f.at, this.o.human, true)}  `, true);
  }

  /** The line of --out-format/-i/-v for an entry, as rsync decides to log it. */
  private logLine(r: FileReport, transfer: boolean): string | undefined {
    if (!this.format) return undefined;
    // rsync's -ii, or --info=name2 with %i in the line: unchanged entries too.
    if (r.unchanged) return this.hasI && this.levels.name >= 2 ? this.formatted(r) : undefined;
    // rsync logs what it sends, and else a change only with %i, a folder, or what was made here.
    if (transfer || this.hasI || r.kind === 'dir' || r.itemize.startsWith('c')) return this.formatted(r);
    return undefined;
  }

  private formatted(r: FileReport): string {
    return formatItem(this.format!, itemOf(r), new Date(this.now()));
  }

  fileEnd(r: FileReport): void {
    this.seen++;
    this.tally.fileEnd(r);
    const transfer = r.kind === 'file' && r.itemize.startsWith('>');
    const f = this.started.get(r.path);
    this.started.delete(r.path);
    const line = this.logLine(r, transfer);
    if (line !== undefined && !f?.named) this.out(line);
    // rsync's --info=name2 without %i: each entry but a folder, with its attributes updated or not (the name alone, no "-> target").
    else if (line === undefined && r.kind !== 'dir' && this.levels.name >= 2 && !this.hasI) this.out(`${itemOf(r).name}${r.unchanged ? ' is uptodate' : ''}`);
    if (!transfer) {
      if (r.index !== undefined) this.chk(r.index);
      return;
    }
    this.transferred++;
    this.transferredBytes += r.size;
    if (this.bars) return this.bars.end(r);
    // -n sends nothing: rsync shows no progress for it.
    if (this.o.dryRun) return;
    const h = this.o.human;
    const elapsed = this.now() - (f?.at ?? this.now());
    if (this.levels.progress === 1) {
      if (!f?.named) this.raw(`\r${formatProgress(Math.min(r.size, FIRST_TICK), r.size, elapsed, h, true)}  `, true);
      this.raw(`\r${formatProgress(r.size, r.size, elapsed, h)} (xfr#${this.transferred}, ${this.chk(r.index)})\n`);
    } else if (this.levels.progress >= 2) {
      const total = this.list?.size ?? this.transferredBytes;
      this.raw(`\r${formatProgress(this.transferredBytes, total, this.now() - this.t0, h)} (xfr#${this.transferred}, ${this.chk(r.index)})`, true);
    }
  }

  deleted(path: string): void {
    this.tally.deleted(path);
    // rsync names deletions with --info=del, or whenever it names files (-v, -i, --out-format).
    if (this.levels.del < 1 && !this.format) return;
    const fmt = this.hasOI ? this.format! : 'deleting %n';
    this.out(formatItem(fmt, deletionItem(path), new Date(this.now())));
  }

  info(message: string, category: InfoCategory): void {
    // -q drops rsync's informational lines, these too.
    if (this.o.quiet) return;
    if (category === 'always' || this.levels[category] >= 1) this.out(message);
  }

  notice(message: string): void {
    if (this.o.quiet) return;
    if (!this.noticesToStderr) return this.out(message);
    const line = `qsync: ${escapeForTerminal(message)}`;
    if (this.bars) this.bars.log(line);
    else this.io.stderr.write(`${line}\n`);
  }

  warning(message: string, _path?: string, bare?: boolean): void {
    const line = `${bare ? '' : 'qsync: '}${escapeForTerminal(message)}`;
    if (this.bars) this.bars.log(line);
    else this.io.stderr.write(`${line}\n`);
  }

  finish(stats: RunStats | undefined, exitCode: number): number {
    this.bars?.stop();
    this.bars = undefined;
    const o = this.o;
    this.header();
    if (stats) this.countDone(stats.files);
    if (stats && !o.quiet) {
      const h = o.human;
      if (this.levels.progress >= 2) {
        this.raw(`\r${formatProgress(stats.transferredSize, stats.totalSize, stats.elapsedMs, h)} (xfr#${stats.transferred}, to-chk=0/${stats.files})\n`);
      }
      for (const line of closingLines(stats, this.levels.stats, this.tally, o)) this.out(line);
    }
    if (this.openLine) this.raw('');
    if (exitCode !== 0) this.io.stderr.write(`${describeExit(exitCode)}\n`);
    return exitCode;
  }
}

/** The levels a caller without parsed --info gets (image mode, tests): rsync's for its -v, --progress or --info=progress2, --stats, -i. */
function defaultInfo(o: Options): InfoLevels {
  const levels = infoLevels(o.verbose, o.progress, o.stats, o.itemize || o.outFormat !== undefined);
  if (o.progress2) levels.progress = 2;
  return levels;
}

const SILENT: InfoLevels = { nonreg: 0, copy: 0, misc: 0, skip: 0, del: 0, flist: 0, name: 0, stats: 0, progress: 0 };

/** A file bar and a total bar on stderr. The total grows as files start: the walk is streamed. */
class Bars {
  private readonly multi: cliProgress.MultiBar;
  private readonly total: cliProgress.SingleBar;
  private readonly startedAt: number;
  private totalSize = 0;
  /** Scanned and written bytes of the files already finished. */
  private doneScanned = 0;
  private doneWritten = 0;
  private file?: { bar: cliProgress.SingleBar; path: string; size: number; startedAt: number };

  constructor(
    stream: Writable,
    private readonly human: number,
    private readonly now: () => number,
  ) {
    // Loaded only when bars are drawn: it costs megabytes of RSS that a piped run need not pay.
    const bars = createRequire(import.meta.url)('cli-progress') as typeof cliProgress;
    this.multi = new bars.MultiBar(
      {
        stream,
        format: '{label} {bar} {percentage}% {scanned}/{size} scanned, {written} written, {rate} ETA {eta_formatted}',
        hideCursor: true,
        barsize: 24,
        gracefulExit: false,
      },
      bars.Presets.shades_classic,
    );
    this.startedAt = now();
    this.total = this.multi.create(0, 0, this.payload('total', 0, 0, 0, this.startedAt));
  }

  private payload(label: string, scanned: number, written: number, size: number, since: number): object {
    const h = Math.max(this.human, 2);
    const rate = (scanned * 1000) / Math.max(this.now() - since, 1);
    return {
      label: label.length > 24 ? `…${label.slice(-23)}` : label.padEnd(24),
      scanned: formatSize(scanned, h),
      written: formatSize(written, h),
      size: formatSize(size, h),
      rate: `${formatSize(rate, h)}B/s`,
    };
  }

  log(line: string): void {
    this.multi.log(`${line}\n`);
  }

  start(path: string, size: number): void {
    if (this.file) this.multi.remove(this.file.bar);
    const startedAt = this.now();
    this.file = { bar: this.multi.create(size, 0, this.payload(path, 0, 0, size, startedAt)), path, size, startedAt };
    this.totalSize += size;
    this.total.setTotal(this.totalSize);
  }

  progress(scanned: number, written: number): void {
    const f = this.file;
    f?.bar.update(scanned, this.payload(f.path, scanned, written, f.size, f.startedAt));
    const s = this.doneScanned + scanned;
    const w = this.doneWritten + written;
    this.total.update(s, this.payload('total', s, w, this.totalSize, this.startedAt));
  }

  end(r: FileReport): void {
    this.progress(r.scanned, r.literal);
    this.doneScanned += r.scanned;
    this.doneWritten += r.literal;
  }

  stop(): void {
    this.multi.update(); // flushes lines logged since the last redraw, which stop() would drop
    this.multi.stop();
  }
}

interface JsonDocument {
  files: FileReport[];
  deleted: string[];
  stats: RunStats | null;
  exitCode: number;
  errors: { message: string; path?: string; code?: string }[];
  notices: { message: string; path?: string }[];
}

class JsonPrinter implements Printer {
  private readonly doc: JsonDocument = { files: [], deleted: [], stats: null, exitCode: 0, errors: [], notices: [] };

  constructor(private readonly io: OutputIO) {}

  fileEnd(r: FileReport): void {
    this.doc.files.push(r);
  }

  deleted(path: string): void {
    this.doc.deleted.push(path);
  }

  notice(message: string, path?: string): void {
    this.doc.notices.push({ message, path });
  }

  info(message: string): void {
    this.doc.notices.push({ message });
  }

  warning(message: string, path?: string): void {
    this.doc.errors.push({ message, path });
  }

  finish(stats: RunStats | undefined, exitCode: number, error?: unknown): number {
    if (error !== undefined) {
      this.doc.errors.push(
        isQsyncError(error)
          ? { message: error.message, path: error.context.file, code: error.code }
          : { message: error instanceof Error ? error.message : String(error) },
      );
    }
    this.doc.stats = stats ?? null;
    this.doc.exitCode = exitCode;
    this.io.stdout.write(`${JSON.stringify(this.doc)}\n`);
    return exitCode;
  }
}
