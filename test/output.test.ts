import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import type { SyncOptions } from '../src/cli/args.js';
import { createPrinter, formatProgress, formatSize } from '../src/cli/output.js';
import { QsyncError } from '../src/core/errors.js';
import type { FileReport, RunStats } from '../src/sync/events.js';

class Capture extends Writable {
  text = '';
  isTTY = false;
  columns = 120;
  override _write(chunk: Buffer, _enc: BufferEncoding, done: () => void): void {
    this.text += chunk.toString();
    done();
  }
}

const OPTS = { verbose: 0, quiet: false, human: 1, progress: false, progress2: false, stats: false, itemize: false, dryRun: false, json: false };
type Opts = Partial<Pick<SyncOptions, keyof typeof OPTS>>;

function setup(o: Opts, isTTY = false) {
  const stdout = new Capture();
  const stderr = new Capture();
  stderr.isTTY = isTTY;
  let t = 0;
  const clock = { set: (ms: number) => (t = ms) };
  const printer = createPrinter({ ...OPTS, ...o }, { stdout, stderr, isTTY }, () => t);
  return { printer, stdout, stderr, clock };
}

const report = (r: Partial<FileReport> & Pick<FileReport, 'path'>): FileReport => ({
  itemize: '>f+++++++++', kind: 'file', size: 0, scanned: 0, literal: 0, matched: 0, unchanged: false, ...r,
});

const STATS: RunStats = {
  files: 5, regularFiles: 2, dirs: 2, created: 3, deleted: 1, transferred: 1, totalSize: 1_234_571,
  transferredSize: 1_234_567, literal: 65_536, matched: 1_169_031, scanned: 1_234_567, elapsedMs: 2000,
};

/** A run: root dir, a new dir, a transferred image, an unchanged file, a symlink; one deletion. */
function run(p: ReturnType<typeof setup>, stats: RunStats | undefined = STATS, code = 0, finish = true): void {
  const { printer, clock } = p;
  printer.fileEnd?.(report({ path: '.', kind: 'dir', itemize: '.d..t......' }));
  printer.fileEnd?.(report({ path: 'vm', kind: 'dir', itemize: 'cd+++++++++' }));
  clock.set(1000);
  printer.fileStart?.('vm/disk.qcow2', 1_234_567, 'manifest');
  printer.fileProgress?.('vm/disk.qcow2', 1_000_000, 65_536);
  clock.set(2000);
  printer.fileEnd?.(report({ path: 'vm/disk.qcow2', size: 1_234_567, itemize: '>f.st......', scanned: 1_234_567, literal: 65_536, matched: 1_169_031 }));
  printer.fileEnd?.(report({ path: 'notes', size: 4, itemize: '.f.........', unchanged: true }));
  printer.fileEnd?.(report({ path: 'link', kind: 'symlink', itemize: 'cL+++++++++' }));
  printer.deleted?.('old.raw');
  if (finish) printer.finish(stats, code);
}

describe('formatSize', () => {
  it('formats like rsync at each human-readable level', () => {
    expect(formatSize(1_234_567, 0)).toBe('1234567');
    expect(formatSize(1_234_567, 1)).toBe('1,234,567');
    expect(formatSize(1_234_567, 2)).toBe('1.23M');
    expect(formatSize(1_234_567, 3)).toBe('1.18M');
    expect(formatSize(999, 2)).toBe('999');
    expect(formatSize(1000, 3)).toBe('1,000');
    expect(formatSize(0, 1)).toBe('0');
    expect(formatSize(5 * 2 ** 40, 3)).toBe('5.00T');
  });

  it('formats progress lines in rsync columns', () => {
    expect(formatProgress(1_234_567, 1_234_567, 1000, 1)).toBe('      1,234,567 100%    1.18MB/s    0:00:01');
    expect(formatProgress(500, 1000, 1000, 1)).toBe('            500  50%    0.49kB/s    0:00:01');
    expect(formatProgress(0, 1000, 0, 0)).toBe('              0   0%    0.00kB/s    0:00:00');
    expect(formatProgress(3 * 2 ** 30, 3 * 2 ** 30, 1000, 2)).toBe('          3.22G 100%    3.00GB/s    0:00:01');
  });
});

describe('text printer', () => {
  it('prints nothing but errors without -v', () => {
    const p = setup({});
    run(p);
    expect(p.stdout.text).toBe('');
    expect(p.stderr.text).toBe('');
  });

  it('-v prints changed names, deletions and the closing lines', () => {
    const p = setup({ verbose: 1 });
    run(p);
    expect(p.stdout.text).toBe(
      [
        'sending incremental file list', './', 'vm/', 'vm/disk.qcow2', 'link', 'deleting old.raw', '',
        'sent 65,536 bytes  received 0 bytes  32,768.00 bytes/sec',
        'total size is 1,234,571  speedup is 18.84', '',
      ].join('\n'),
    );
  });

  it('-vv also names unchanged entries; -n marks the summary', () => {
    const p = setup({ verbose: 2, dryRun: true });
    run(p);
    expect(p.stdout.text).toContain('notes is uptodate\n');
    expect(p.stdout.text).toContain('speedup is 18.84 (DRY RUN)\n');
  });

  it('-i prints itemize strings', () => {
    const p = setup({ itemize: true });
    run(p);
    expect(p.stdout.text).toBe(
      ['.d..t...... ./', 'cd+++++++++ vm/', '>f.st...... vm/disk.qcow2', 'cL+++++++++ link', '*deleting   old.raw', ''].join('\n'),
    );
  });

  it('--progress prints names and a progress line per transferred file', () => {
    const p = setup({ progress: true });
    run(p);
    expect(p.stdout.text).toBe(
      [
        'sending incremental file list', './', 'vm/', 'vm/disk.qcow2',
        // rsync's first tick after 32 KiB (with the time left), then the file's last line (the time taken), each after a carriage return, also when piped.
        '\r         32,768   2%   32.00kB/s    0:00:36  \r      1,234,567 100%    1.18MB/s    0:00:01 (xfr#1, ir-chk=0/3)', 'link',
        // Names printed, deletions are too (rsync's stdout format is set).
        'deleting old.raw', '',
      ].join('\n'),
    );
  });

  it('--info=progress2 prints one total line', () => {
    const p = setup({ progress2: true, human: 2 });
    run(p);
    // One \r-updated line: after each transferred file, and the total at the end.
    expect(p.stdout.text).toBe('\r          1.23M 100%  602.82kB/s    0:00:02 (xfr#1, ir-chk=0/3)\r          1.23M  99%  602.82kB/s    0:00:02 (xfr#1, to-chk=0/5)\n');
  });

  it('--stats prints rsync-shaped statistics', () => {
    const p = setup({ stats: true });
    run(p);
    expect(p.stdout.text).toBe(
      [
        '',
        // The kinds come from the walk's counts (skipped entries included, as rsync lists them): this run's stats count no link.
        'Number of files: 5 (reg: 3, dir: 2)',
        'Number of created files: 3 (reg: 1, dir: 1, link: 1)',
        'Number of deleted files: 1 (reg: 1)',
        'Number of regular files transferred: 1',
        'Total file size: 1,234,571 bytes',
        'Total transferred file size: 1,234,567 bytes',
        'Literal data: 65,536 bytes',
        'Matched data: 1,169,031 bytes',
        'File list size: 0',
        'File list generation time: 0.001 seconds',
        'File list transfer time: 0.000 seconds',
        'Total bytes sent: 65,536',
        'Total bytes received: 0',
        '',
        'sent 65,536 bytes  received 0 bytes  32,768.00 bytes/sec',
        'total size is 1,234,571  speedup is 18.84',
        '',
      ].join('\n'),
    );
  });

  it('-h switches sizes to units', () => {
    const p = setup({ stats: true, human: 2 });
    run(p, { ...STATS, literal: 12_345_678, elapsedMs: 1000 });
    expect(p.stdout.text).toContain('Total file size: 1.23M bytes\n');
    expect(p.stdout.text).toContain('Literal data: 12.35M bytes\n');
    expect(p.stdout.text).toContain('sent 12.35M bytes  received 0 bytes  12.35M bytes/sec\n');
    expect(p.stdout.text).toContain('total size is 1.23M  speedup is 0.10\n');
  });

  it('-q silences all but warnings and the error line', () => {
    const p = setup({ quiet: true, verbose: 1, stats: true, progress: true });
    p.printer.warning?.('file has vanished: x', 'x');
    run(p, STATS, 23);
    expect(p.stdout.text).toBe('');
    expect(p.stderr.text).toBe(
      'qsync: file has vanished: x\nqsync error: some files/attrs were not transferred (see previous errors) (code 23)\n',
    );
  });

  it('prints notices in line, and finishes a run that synced nothing', () => {
    const p = setup({ verbose: 1 });
    p.printer.notice?.('manifest stale: comparing source and target', 'disk.raw');
    expect(p.printer.finish(undefined, 23)).toBe(23);
    expect(p.stdout.text).toBe('sending incremental file list\nmanifest stale: comparing source and target\n');
  });
});

describe('tty printer', () => {
  it('draws file and total bars on stderr and logs lines above them', () => {
    const p = setup({ progress: true, verbose: 1 }, true);
    run(p);
    const err = p.stderr.text;
    expect(err).toContain('vm/disk.qcow2');
    expect(err).toMatch(/total .* 100% 1\.23M\/1\.23M scanned, 65\.54K written/);
    expect(err).toContain('deleting old.raw\n');
    // The closing lines come after the bars, on stdout.
    expect(p.stdout.text).toBe('\nsent 65,536 bytes  received 0 bytes  32,768.00 bytes/sec\ntotal size is 1,234,571  speedup is 18.84\n');
  });
});

describe('json printer', () => {
  it('prints one document at the end and nothing before', () => {
    const p = setup({ json: true, verbose: 2, progress: true, stats: true });
    p.printer.warning?.('file has vanished: x', 'x');
    p.printer.notice?.('manifest stale', 'vm/disk.qcow2');
    run(p, STATS, 0, false);
    expect(p.stdout.text).toBe('');
    expect(p.printer.finish(STATS, 23, new QsyncError('TARGET', 'cannot write', { file: 'd/x' }))).toBe(23);
    const doc = JSON.parse(p.stdout.text);
    expect(p.stdout.text.endsWith('}\n')).toBe(true);
    expect(doc.files.map((f: FileReport) => f.path)).toEqual(['.', 'vm', 'vm/disk.qcow2', 'notes', 'link']);
    expect(doc.deleted).toEqual(['old.raw']);
    expect(doc.stats).toEqual(STATS);
    expect(doc.exitCode).toBe(23);
    expect(doc.errors).toEqual([
      { message: 'file has vanished: x', path: 'x' },
      { message: 'cannot write', path: 'd/x', code: 'TARGET' },
    ]);
    expect(doc.notices).toEqual([{ message: 'manifest stale', path: 'vm/disk.qcow2' }]);
    expect(p.stderr.text).toBe('');
  });
});
