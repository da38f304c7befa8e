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
import type { FileReport, RunStats, SyncHooks } from '../sync/events.js';
import type { SyncOptions } from './args.js';
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
  finish(stats: RunStats | undefined, exitCode: number, error?: unknown): number;
}

type Options = Pick<SyncOptions, 'verbose' | 'quiet' | 'human' | 'progress' | 'progress2' | 'stats' | 'itemize' | 'dryRun' | 'json'>;

export function createPrinter(o: Options, io: OutputIO, now: () => number = Date.now): Printer {
  return o.json ? new JsonPrinter(io) : new TextPrinter(o, io, now);
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

/** rsync's progress line: "     1,234,567 100%   12.34MB/s    0:00:01". */
export function formatProgress(done: number, size: number, elapsedMs: number, human: number): string {
  let rate = (done * 1000) / Math.max(elapsedMs, 1) / 1024;
  let units = 'kB/s';
  if (rate > 1024 * 1024) {
    rate /= 1024 * 1024;
    units = 'GB/s';
  } else if (rate > 1024) {
    rate /= 1024;
    units = 'MB/s';
  }
  const secs = Math.floor(elapsedMs / 1000);
  const time = `${String(Math.floor(secs / 3600)).padStart(4)}:${pad2(Math.floor(secs / 60) % 60)}:${pad2(secs % 60)}`;
  const pct = done === size ? 100 : Math.floor((100 * done) / size);
  return `${formatSize(done, human).padStart(15)} ${String(pct).padStart(3)}% ${rate.toFixed(2).padStart(7)}${units} ${time}`;
}

const pad2 = (n: number): string => String(n).padStart(2, '0');

/** rsync's two closing lines of -v and --stats: "sent N bytes  received N bytes  R bytes/sec", "total size is N  speedup is S". */
export function summaryLines(stats: RunStats, o: Pick<SyncOptions, 'human' | 'dryRun'>): string[] {
  const h = o.human;
  // Local runs have no wire: what is "sent" is the data written to the target, and the target is never read back.
  const sent = stats.wireSent ?? stats.literal;
  const received = stats.wireReceived ?? 0;
  const rate = ((sent + received) * 1000) / Math.max(stats.elapsedMs, 1);
  const speedup = stats.totalSize / Math.max(sent + received, 1);
  return [
    `sent ${formatSize(sent, h)} bytes  received ${formatSize(received, h)} bytes  ${formatDecimal(rate, h)} bytes/sec`,
    `total size is ${formatSize(stats.totalSize, h)}  speedup is ${formatDecimal(speedup, Math.min(h, 1))}${o.dryRun ? ' (DRY RUN)' : ''}`,
  ];
}

/** A name as rsync prints it: directories end in '/', the root is "./". */
function shownName(r: Pick<FileReport, 'path' | 'kind'>): string {
  if (r.kind !== 'dir') return r.path;
  if (r.path === '' || r.path === '.') return './';
  return r.path.endsWith('/') ? r.path : `${r.path}/`;
}

type Tally = Record<'dir' | 'link' | 'dev' | 'special', number>;
const emptyTally = (): Tally => ({ dir: 0, link: 0, dev: 0, special: 0 });
const TALLY_KEY: Partial<Record<FileReport['kind'], keyof Tally>> = { dir: 'dir', symlink: 'link', device: 'dev', special: 'special' };

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

class TextPrinter implements Printer {
  /** Set while bars are drawn; the closing lines go to stdout after them. */
  private bars?: Bars;
  private headerDone = false;
  private transferred = 0;
  private seen = 0;
  private readonly kinds = emptyTally();
  private readonly createdKinds = emptyTally();
  private deletedDirs = 0;
  private readonly started = new Map<string, number>();

  constructor(
    private readonly o: Options,
    private readonly io: OutputIO,
    private readonly now: () => number,
  ) {
    if (io.isTTY && !o.quiet && (o.progress || o.progress2)) this.bars = new Bars(io.stderr, o.human, now);
  }

  private out(line: string): void {
    if (this.o.quiet) return;
    // rsync's -v/--progress header; "incremental" is rsync's word for a list sent while it is built.
    if (!this.headerDone && (this.o.verbose || this.o.progress)) this.emit('sending incremental file list');
    this.headerDone = true;
    this.emit(line);
  }

  private emit(line: string): void {
    if (this.bars) this.bars.log(escapeForTerminal(line));
    else this.io.stdout.write(`${escapeForTerminal(line)}\n`);
  }

  fileStart(path: string, size: number): void {
    this.started.set(path, this.now());
    this.bars?.start(path, size);
  }

  fileProgress(_path: string, scanned: number, written: number): void {
    this.bars?.progress(scanned, written);
  }

  fileEnd(r: FileReport): void {
    this.seen++;
    const key = TALLY_KEY[r.kind];
    if (key) {
      this.kinds[key]++;
      if (r.itemize.slice(2).startsWith('+')) this.createdKinds[key]++;
    }
    const name = shownName(r);
    const shows = this.o.verbose || (this.o.progress && !this.o.progress2);
    if (!r.unchanged) {
      if (this.o.itemize) this.out(`${r.itemize} ${name}`);
      // rsync -v names a folder whatever changed in it, anything else only when made or sent (not for its attributes alone).
      else if (shows && (r.kind === 'dir' || /^[>c]/.test(r.itemize))) this.out(name);
    } else if (this.o.verbose >= 2) this.out(`${name} is uptodate`);

    if (r.kind !== 'file' || !r.itemize.startsWith('>')) return;
    this.transferred++;
    const startedAt = this.started.get(r.path) ?? this.now();
    this.started.delete(r.path);
    if (this.bars) this.bars.end(r);
    else if (this.o.progress && !this.o.progress2) {
      // The walk is streamed: like rsync's incremental recursion, count what is known so far.
      this.out(
        `${formatProgress(r.size, r.size, this.now() - startedAt, this.o.human)} (xfr#${this.transferred}, ir-chk=0/${this.seen})`,
      );
    }
  }

  deleted(path: string): void {
    if (path.endsWith('/')) this.deletedDirs++;
    if (this.o.itemize) this.out(`*deleting   ${path}`);
    else if (this.o.verbose) this.out(`deleting ${path}`);
  }

  notice(message: string): void {
    this.out(message);
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
    if (stats && !o.quiet) {
      const h = o.human;
      if (o.progress2) {
        this.out(
          `${formatProgress(stats.transferredSize, stats.totalSize, stats.elapsedMs, h)} (xfr#${stats.transferred}, to-chk=0/${stats.files})`,
        );
      }
      // Local runs have no wire: what is "sent" is the data written to the target, and the target is never read back.
      const sent = stats.wireSent ?? stats.literal;
      const received = stats.wireReceived ?? 0;
      if (o.stats) {
        this.out('');
        this.out(itemizedCount('Number of files', stats.files, this.kinds));
        this.out(itemizedCount('Number of created files', stats.created, this.createdKinds));
        this.out(itemizedCount('Number of deleted files', stats.deleted, { ...emptyTally(), dir: this.deletedDirs }));
        this.out(`Number of regular files transferred: ${formatSize(stats.transferred, 1)}`);
        this.out(`Total file size: ${formatSize(stats.totalSize, h)} bytes`);
        this.out(`Total transferred file size: ${formatSize(stats.transferredSize, h)} bytes`);
        this.out(`Literal data: ${formatSize(stats.literal, h)} bytes`);
        this.out(`Matched data: ${formatSize(stats.matched, h)} bytes`);
        this.out(`File list size: ${formatSize(0, h)}`);
        this.out(`Total bytes sent: ${formatSize(sent, h)}`);
        this.out(`Total bytes received: ${formatSize(received, h)}`);
      }
      if (o.stats || o.verbose) {
        this.out('');
        for (const line of summaryLines(stats, o)) this.out(line);
      }
    }
    if (exitCode !== 0) this.io.stderr.write(`${describeExit(exitCode)}\n`);
    return exitCode;
  }
}

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
