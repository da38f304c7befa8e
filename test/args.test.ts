import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseArgv, parseBlockSize, parseSizeArg, type ParsedArgs, type SyncOptions } from '../src/cli/args.js';
import { QsyncError } from '../src/core/errors.js';
import { needTools } from './helpers/env.js';

function sync(argv: string[]): { sources: string[]; dest: string; options: SyncOptions } {
  const r: ParsedArgs = parseArgv(argv);
  if (r.kind !== 'sync') throw new Error(`expected sync, got ${r.kind}`);
  return r;
}

function failure(argv: string[]): QsyncError {
  try {
    parseArgv(argv);
  } catch (e) {
    if (e instanceof QsyncError) return e;
    throw e;
  }
  throw new Error(`parseArgv(${JSON.stringify(argv)}) did not throw`);
}

const ARCHIVE = { recursive: true, links: true, perms: true, times: true, group: true, owner: true, devices: true, specials: true };

describe('parseArgv', () => {
  it('reads -hav --progress a/ b/ with -h as human-readable and operands as typed', () => {
    const r = sync(['-hav', '--progress', 'a/', 'b/']);
    expect(r.sources).toEqual(['a/']);
    expect(r.dest).toBe('b/');
    expect(r.options).toMatchObject({ ...ARCHIVE, verbose: 1, human: 2, progress: true, progress2: false });
  });

  it('sets --info levels as rsync does: -v, --progress, --stats, -q, then --info=FLAGS', () => {
    expect(sync(['-v', 'a', 'b']).options.info).toMatchObject({ name: 1, del: 1, flist: 1, stats: 1, skip: 0 });
    expect(sync(['-vv', 'a', 'b']).options.info).toMatchObject({ name: 2, skip: 1 });
    expect(sync(['--progress', 'a', 'b']).options.info).toMatchObject({ name: 1, flist: 2, progress: 1, stats: 0 });
    expect(sync(['-i', '--progress', 'a', 'b']).options.info).toMatchObject({ name: 0, progress: 1 });
    expect(sync(['--stats', 'a', 'b']).options.info).toMatchObject({ stats: 2 });
    // -q keeps the levels (the log file follows them, test/rsync-options.test.ts); the printer then prints nothing on stdout.
    expect(sync(['-vq', '--stats', 'a', 'b']).options).toMatchObject({ quiet: true, info: { name: 1, nonreg: 1, stats: 2 } });
    // -ii: unchanged entries too, as --info=name2.
    expect(sync(['-ii', 'a', 'b']).options).toMatchObject({ itemize: true, info: { name: 2 } });
    expect(sync(['-ii', '--out-format=%n', 'a', 'b']).options.info).toMatchObject({ name: 0 });
    expect(sync(['-v', '--info=name0,stats3,del0', 'a', 'b']).options.info).toMatchObject({ name: 0, stats: 3, del: 0, flist: 1 });
    expect(sync(['--out-format=%n %b', 'a', 'b']).options.outFormat).toBe('%n %b');
    expect(sync(['--log-format=%n', 'a', 'b']).options.outFormat).toBe('%n');
    expect(failure(['--out-format=%n %C', 'a', 'b']).message).toMatch(/--out-format: %C is not supported/);
  });

  it('has rsync defaults', () => {
    expect(sync(['a', 'b']).options).toEqual({
      recursive: false, links: false, perms: false, times: false, group: false, owner: false, devices: false,
      specials: false, verbose: 0, quiet: false, human: 1, dryRun: false, progress: false, progress2: false,
      stats: false, itemize: false, inplace: false, wholeFile: false, delete: false, filters: [], sparse: false,
      checksum: false, sizeOnly: false, update: false, existing: false, ignoreExisting: false, numericIds: false,
      oneFileSystem: false, blockSize: 65536, manifest: undefined, json: false, rsh: undefined, bwlimit: 0, timeout: 0,
      writeBatch: undefined, onlyWriteBatch: undefined, readBatch: undefined, backupDir: undefined,
      compress: false, qmp: undefined, drives: [], image: undefined, verifySample: 0.5,
      hardLinks: false, acls: false, xattrs: false, deleteExcluded: false, maxDelete: -1, mkpath: false,
      minSize: -1, maxSize: -1, ignoreTimes: false, modifyWindow: 0, pruneEmptyDirs: false, omitDirTimes: false, noIncRecursive: false, force: false, safeLinks: false, filesFrom: undefined, from0: false, chmod: [], usermap: undefined, groupmap: undefined, relative: false, impliedDirs: true, logFile: undefined, logFileFormat: undefined, dirs: false,
      outFormat: undefined, info: { nonreg: 1, copy: 0, del: 0, flist: 0, misc: 0, name: 0, stats: 0, skip: 0, progress: 0 },
    } satisfies SyncOptions);
  });

  it('-avP is archive, verbose, progress; -vvh counts', () => {
    expect(sync(['-avP', 'a', 'b']).options).toMatchObject({ ...ARCHIVE, verbose: 1, progress: true });
    expect(sync(['-avvh', 'a', 'b']).options).toMatchObject({ verbose: 2, human: 2 });
    expect(sync(['-hh', '-v', '--verbose', 'a', 'b']).options).toMatchObject({ verbose: 2, human: 3 });
    expect(sync(['-hh', '--no-h', 'a', 'b']).options.human).toBe(0);
    expect(sync(['-vv', '--no-v', '-v', 'a', 'b']).options.verbose).toBe(1);
  });

  it('applies -a and --no-OPTION in command-line order, as rsync', () => {
    expect(sync(['-a', '--no-perms', 'a', 'b']).options).toMatchObject({ ...ARCHIVE, perms: false });
    expect(sync(['--no-perms', '-a', 'a', 'b']).options.perms).toBe(true);
    expect(sync(['-a', '--no-D', '--no-o', '--no-g', 'a', 'b']).options).toMatchObject({
      devices: false, specials: false, owner: false, group: false, times: true,
    });
    expect(sync(['-W', '--no-W', 'a', 'b']).options.wholeFile).toBe(false);
    expect(sync(['--no-whole-file', '-W', 'a', 'b']).options.wholeFile).toBe(true);
  });

  it('reads --info=progress2 and other info words', () => {
    expect(sync(['--info=progress2', 'a', 'b']).options).toMatchObject({ progress: false, progress2: true });
    expect(sync(['-aP', '--info=progress2', 'a', 'b']).options).toMatchObject({ progress: false, progress2: true });
    expect(sync(['--info=progress2', '-P', 'a', 'b']).options).toMatchObject({ progress: false, progress2: true });
    expect(sync(['--info', 'name0,STATS2', 'a', 'b']).options.stats).toBe(true);
    expect(sync(['--stats', '--info=none', 'a', 'b']).options.stats).toBe(false);
    expect(parseArgv(['--info=help'])).toMatchObject({ kind: 'help' });
    const e = failure(['--info=progres2', 'a', 'b']);
    expect([e.code, e.message]).toEqual(['USAGE', 'Unknown --info item: "progres"']);
  });

  it('reads block sizes with rsync suffixes', () => {
    expect(sync(['-B', '64K', 'a', 'b']).options.blockSize).toBe(65536);
    expect(sync(['-B64k', 'a', 'b']).options.blockSize).toBe(65536);
    expect(sync(['-aB=4096', 'a', 'b']).options.blockSize).toBe(4096);
    expect(sync(['--block-size=1M', 'a', 'b']).options.blockSize).toBe(1 << 20);
    expect(sync(['--block-size', '65536', 'a', 'b']).options.blockSize).toBe(65536);
    expect(parseBlockSize('16MiB')).toBe(16 << 20);
    for (const bad of ['3000', '64KB', '2K', '32M', 'big', '', '0x1000', '-64K']) {
      expect(() => parseBlockSize(bad), bad).toThrow(QsyncError);
    }
    const e = failure(['-B', '3000', 'a', 'b']);
    expect(e.code).toBe('USAGE');
    expect(e.message).toContain('3000');
    expect(e.message).toContain('power of two');
  });

  it('refuses unknown options with USAGE and rsync options qsync lacks with UNSUPPORTED, as typed', () => {
    // rsync's words: the option as typed, a short one's whole cluster.
    expect(failure(['--foo', 'a', 'b'])).toMatchObject({ code: 'USAGE', message: '--foo: unknown option' });
    expect(failure(['-aj', 'a', 'b'])).toMatchObject({ code: 'USAGE', message: '-aj: unknown option', context: { option: '-j' } });
    expect(failure(['--verb', 'a', 'b']).message).toBe('--verb: unknown option'); // no abbreviations, as popt
    const long = failure(['-a', '--link-dest=x', 'a', 'b']);
    expect(long.code).toBe('UNSUPPORTED');
    expect(long.message).toBe('option --link-dest is not supported by qsync; remove it or use rsync');
    expect(failure(['--suffix=.old', 'a', 'b']).message).toMatch(/^option --suffix is not supported by qsync: .*--backup-dir.*README\.md/);
    expect(failure(['-avL', 'a', 'b'])).toMatchObject({ code: 'UNSUPPORTED', context: { option: '-L' } });
    for (const opt of ['--link-dest=x', '--suffix=x', '-b', '--append', '-L', '-C', '--old-dirs', '--filter=: .rules', '-F', '--daemon']) {
      expect(failure([opt, 'a', 'b']).code, opt).toBe('UNSUPPORTED');
    }
    expect(failure(['--perms=yes', 'a', 'b']).code).toBe('USAGE');
    expect(failure(['a', 'b', '--exclude'])).toMatchObject({ code: 'USAGE', message: '--exclude: missing argument' });
  });

  it('reads -H, -A, -X (-aHAX, the long forms and their --no- forms); -A implies -p, as in rsync', () => {
    expect(sync(['-aHAX', 'a/', 'b/']).options).toMatchObject({ ...ARCHIVE, hardLinks: true, acls: true, xattrs: true });
    expect(sync(['--hard-links', '--acls', '--xattrs', 'a', 'b']).options).toMatchObject({ hardLinks: true, acls: true, xattrs: true, perms: true });
    expect(sync(['-rA', 'a', 'b']).options).toMatchObject({ acls: true, perms: true });
    expect(sync(['--no-perms', '-rA', 'a', 'b']).options.perms).toBe(true);
    expect(sync(['-rA', '--no-perms', 'a', 'b']).options).toMatchObject({ acls: true, perms: false }); // in order, as rsync's popt
    expect(sync(['-aHAX', '--no-H', '--no-acls', '--no-X', 'a', 'b']).options).toMatchObject({ hardLinks: false, acls: false, xattrs: false });
    expect(sync(['-rX', 'a', 'b']).options).toMatchObject({ xattrs: true, perms: false, hardLinks: false });
  });

  it('accepts -e/--rsh and the qsync, batch and image options', () => {
    expect(sync(['-e', 'ssh -p 2222', 'a', 'h:b']).options.rsh).toBe('ssh -p 2222');
    expect(sync(['--rsh=ssh', 'a', 'b']).options.rsh).toBe('ssh');
    const o = sync([
      '--manifest', '/m', '--json', '--write-batch=w', '--backup-dir', 'bk', '-z', '--verify-sample', '2.5',
      '--fsync', '--partial', 'a', 'b',
    ]).options;
    expect(o).toMatchObject({ manifest: '/m', json: true, writeBatch: 'w', backupDir: 'bk', compress: true, verifySample: 2.5 });
    expect(failure(['--verify-sample=101', 'a', 'b']).code).toBe('USAGE');
    expect(failure(['--verify-sample=x', 'a', 'b']).code).toBe('USAGE');
    expect(sync(['--manifest=a', '--manifest=b', 'x', 'y']).options.manifest).toBe('b');
  });

  it('needs a source and a destination, except in image and read-batch modes', () => {
    expect(failure([])).toMatchObject({ code: 'USAGE', message: 'qsync needs a source and a destination' });
    expect(failure(['-av', 'only/']).message).toContain('qsync needs a source and a destination');
    expect(parseArgv(['--qmp', '/run/vm.sock', '--drive', 'vda', '--drive=vdb', 'out/'])).toMatchObject({
      kind: 'sync', sources: [], dest: 'out/', options: { qmp: '/run/vm.sock', drives: ['vda', 'vdb'] },
    });
    expect(sync(['--image', 'd.qcow2', 'out.raw'])).toMatchObject({ sources: [], dest: 'out.raw' });
    expect(sync(['--read-batch=delta', 'dst'])).toMatchObject({ sources: [], dest: 'dst', options: { readBatch: 'delta' } });
    expect(sync(['--domain', 'vm1', '--connect=qemu:///session', 'out/'])).toMatchObject({ sources: [], dest: 'out/', options: { domain: 'vm1', connect: 'qemu:///session' } });
    expect(failure(['--qmp', 's']).code).toBe('USAGE');
  });

  it('keeps several sources and interleaved operands in order', () => {
    expect(sync(['a', '-a', 'b/', '--delete', 'c', 'dst/'])).toMatchObject({ sources: ['a', 'b/', 'c'], dest: 'dst/' });
  });

  it('keeps include/exclude rules in command-line order, in both value forms', () => {
    const o = sync([
      '--include=*.qcow2', '--exclude', '*.tmp', '--exclude-from=ex.txt', '--include', '-odd', '--exclude=*', 'a', 'b',
    ]).options;
    expect(o.filters).toEqual([
      { type: 'include', pattern: '*.qcow2' },
      { type: 'exclude', pattern: '*.tmp' },
      { type: 'exclude-from', file: 'ex.txt' },
      { type: 'include', pattern: '-odd' }, // a value may start with '-', as with rsync
      { type: 'exclude', pattern: '*' },
    ]);
  });

  it('treats everything after -- as operands', () => {
    expect(sync(['-a', '--', '-weird-name', '--also', 'dst'])).toMatchObject({ sources: ['-weird-name', '--also'], dest: 'dst' });
    expect(sync(['-', 'dst']).sources).toEqual(['-']);
  });

  it('maps delete aliases and --ignore-non-existing', () => {
    for (const d of ['--delete', '--del', '--delete-after', '--delete-before', '--delete-during', '--delete-delay']) {
      expect(sync([d, 'a', 'b']).options.delete, d).toBe(true);
    }
    expect(sync(['--ignore-non-existing', 'a', 'b']).options.existing).toBe(true);
  });

  it("reads rsync's deletion, size, time and folder options", () => {
    expect(sync(['--delete-excluded', 'a', 'b']).options).toMatchObject({ delete: true, deleteExcluded: true });
    expect(sync(['--max-delete=3', '--mkpath', '-Im', 'a', 'b']).options).toMatchObject({ maxDelete: 3, mkpath: true, ignoreTimes: true, pruneEmptyDirs: true });
    expect(sync(['-m', '--no-m', '--mkpath', '--no-mkpath', 'a', 'b']).options).toMatchObject({ pruneEmptyDirs: false, mkpath: false });
    expect(sync(['-d', 'a', 'b']).options.dirs).toBe(true);
    expect(sync(['--dirs', '--no-d', 'a', 'b']).options.dirs).toBe(false);
    // rsync: a negative limit is no deletions; popt reads C integers (hex, octal, empty = 0).
    expect(sync(['--max-delete=-5', 'a', 'b']).options.maxDelete).toBe(0);
    expect(sync(['--max-delete', '0x10', 'a', 'b']).options.maxDelete).toBe(16);
    expect(sync(['--max-delete=', 'a', 'b']).options.maxDelete).toBe(0);
    expect(failure(['--max-delete=abc', 'a', 'b'])).toMatchObject({ code: 'USAGE', message: '--max-delete=abc: invalid numeric value' });
    expect(sync(['-@2', 'a', 'b']).options.modifyWindow).toBe(2);
    expect(sync(['-@', '-1', 'a', 'b']).options.modifyWindow).toBe(-1);
    expect(failure(['--modify-window=1.5', 'a', 'b']).message).toBe('--modify-window=1.5: invalid numeric value');
    expect(sync(['--min-size=1.5k', '--max-size', '2M-1', 'a', 'b']).options).toMatchObject({ minSize: 1536, maxSize: 2 * 1024 * 1024 - 1 });
  });

  it("reads SIZE as rsync's manual describes it", () => {
    const cases: [string, number][] = [
      ['0', 0], ['', 0], ['100', 100], ['10b', 10], ['1k', 1024], ['1K', 1024], ['1KB', 1000], ['1kib', 1024], ['1.5m', 1572864],
      ['1mb+1', 1_000_001], ['1g-1', 2 ** 30 - 1], ['2t', 2 * 2 ** 40], ['1P', 2 ** 50], ['.5k', 512],
    ];
    for (const [text, bytes] of cases) expect(parseSizeArg('max-size', text), text).toBe(bytes);
    for (const [text, why] of [['abc', 'invalid'], ['5x', 'invalid'], ['1Ki', 'invalid'], ['1.5.2', 'invalid'], ['+1', 'invalid'], ['-1', 'too large'], ['9999999P', 'too large']]) {
      expect(() => parseSizeArg('max-size', text!), text).toThrow(`--max-size=${text} is ${why}`);
    }
  });

  it('--files-from turns off the -r of -a, not a -r given itself (as rsync)', () => {
    expect(sync(['-a', '--files-from=l', 'a', 'b']).options).toMatchObject({ recursive: false, filesFrom: 'l', times: true });
    expect(sync(['-ar', '--files-from', 'l', 'a', 'b']).options.recursive).toBe(true);
    expect(sync(['-r', '-a', '--files-from=l', 'a', 'b']).options.recursive).toBe(true);
    expect(sync(['-r', '--no-r', '-a', '--files-from=l', 'a', 'b']).options.recursive).toBe(false);
    expect(sync(['-a0', 'a', 'b']).options).toMatchObject({ recursive: true, from0: true, relative: false });
    expect(sync(['--files-from=l', 'a', 'b']).options.relative).toBe(true);
    expect(sync(['-aR', 'a', 'b']).options.relative).toBe(true);
    expect(failure(['--files-from=l', '--no-R', 'a', 'b']).code).toBe('UNSUPPORTED');
  });

  it('keeps every --chmod in order and refuses one rsync would not parse, in its words', () => {
    expect(sync(['--chmod=D755,F644', '--chmod', 'u+x', 'a', 'b']).options.chmod).toEqual(['D755,F644', 'u+x']);
    expect(failure(['--chmod=u+q', 'a', 'b'])).toMatchObject({ code: 'USAGE', message: 'Invalid argument passed to --chmod (u+q)' });
    expect(failure(['--chmod=', 'a', 'b']).code).toBe('USAGE');
  });

  it('--chown is --usermap=*:USER --groupmap=*:GROUP and turns on -o/-g where it stands; each map once, as rsync', () => {
    expect(sync(['--chown=a:b', 'x', 'y']).options).toMatchObject({ usermap: '*:a', groupmap: '*:b', owner: true, group: true });
    expect(sync(['--chown=a', 'x', 'y']).options).toMatchObject({ usermap: '*:a', groupmap: undefined, owner: true, group: false });
    expect(sync(['--chown=:b', 'x', 'y']).options).toMatchObject({ usermap: undefined, groupmap: '*:b', owner: false, group: true });
    expect(sync(['--usermap=0:1', '--no-o', 'x', 'y']).options).toMatchObject({ usermap: '0:1', owner: false });
    expect(failure(['--chown=a', '--usermap=*:b', 'x', 'y']).message).toBe('--usermap conflicts with prior --chown.');
    expect(failure(['--groupmap=*:b', '--chown=:c', 'x', 'y']).message).toBe('--chown conflicts with prior --groupmap.');
    expect(failure(['--usermap=1:2', '--usermap=3:4', 'x', 'y']).message).toBe('You can only specify --usermap once.');
    expect(failure(['--chown=a', '--chown=b', 'x', 'y']).message).toBe('You can only specify a user-affecting --chown once.');
    expect(failure(['--usermap=1-:2', 'x', 'y']).message).toBe('Invalid number in --usermap: 1-');
    expect(failure(['--groupmap=abc', 'x', 'y']).message).toBe('No colon found in --groupmap: abc');
  });

  it('--log-file and --log-file-format; a format escape qsync cannot fill is refused, named', () => {
    expect(sync(['--log-file=l', '--log-file-format=%o %n', 'a', 'b']).options).toMatchObject({ logFile: 'l', logFileFormat: '%o %n' });
    expect(sync(['--log-file=l', 'a', 'b']).options.logFileFormat).toBeUndefined();
    expect(failure(['--log-file-format=%i %-10c', 'a', 'b'])).toMatchObject({ code: 'UNSUPPORTED', message: '--log-file-format: %c is not supported (qsync computes no rsync checksums)' });
  });

  it('refuses -b without --backup-dir, pointing to it; accepts it with one', () => {
    expect(failure(['-ab', 'a', 'b'])).toMatchObject({ code: 'UNSUPPORTED', context: { hint: expect.stringContaining('--backup-dir=DIR') } });
    expect(sync(['-b', '--backup-dir=h', 'a', 'b']).options.backupDir).toBe('h');
  });

  it('returns help and version', () => {
    const help = parseArgv(['--help']);
    expect(help.kind).toBe('help');
    if (help.kind === 'help') {
      expect(help.text).toContain('--block-size=SIZE, -B');
      expect(help.text).toContain('-P ');
    }
    expect(parseArgv(['-h']).kind).toBe('help');
    expect(parseArgv(['-a', '--help', '--bogus']).kind).toBe('help');
    expect(parseArgv(['--version'])).toEqual({ kind: 'version', level: 1 });
    expect(parseArgv(['-V'])).toEqual({ kind: 'version', level: 1 });
    expect(parseArgv(['-VV'])).toEqual({ kind: 'version', level: 2 });
    expect(parseArgv(['-V', '--version', 'a'])).toEqual({ kind: 'version', level: 2 });
  });
});

/**
 * What the manual leaves open, against the rsync on this machine: the
 * value it reads (the one it would pass to a remote rsync, shown by -vv
 * before the remote shell, here `false`, fails) or the first line of its
 * complaint, for the same words from parseArgv.
 */
describe.skipIf(!needTools('rsync'))('option values read as the real rsync reads them', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'qsync-args-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  /** rsync's first line for a run with `flags`, or '' when the options pass. */
  const rsyncSays = (flags: string[], remote = false): string => {
    const r = spawnSync('rsync', [...flags, ...(remote ? ['-vv', '-e', 'false', `${dir}/`, 'host:d/'] : ['-n', '-r', `${dir}/`, `${dir}/d/`])], { encoding: 'utf8' });
    const said = `${r.stdout}${r.stderr}`.split('\n')[0]!;
    return said.startsWith('opening connection') ? said : r.status === 0 ? '' : said.replace(/^rsync: /, '');
  };
  const qsyncSays = (flags: string[]): string => {
    try {
      parseArgv([...flags, 'a', 'b']);
      return '';
    } catch (e) {
      if (e instanceof QsyncError) return e.message;
      throw e;
    }
  };

  it('SIZE: fractions rounded down, units, offsets, a leading minus, the 2^63 bound', () => {
    const sizes = [
      '1.9999999k', '0.3333k', '2.05mb', '1.07gb', '1.1P', '1.1PB', '8191P', '8191.999999999P', '9223372036854775295', '9007199254740993',
      '', '.', 'k', '.+1', 'k+1', '1bb', '1bib', '1KIB', '1.5+1', '1.5-1', '1.000001-1', '00012',
      '+1', '+5', '1+0', '1k+', '1iB', '1e3', ' 1', '1kbb', '-0', '-.', '-k', '-0.0',
      '-1', '-.5', '-1x', '0-1', '0.5-1', '0.999999-1', '8192P', '8192P-1', '9223372036854775296', '99999999999999999999',
    ];
    for (const size of sizes) {
      const said = rsyncSays([`--max-size=${size}`], true);
      const value = said.startsWith('opening connection') ? /--max-size=(\d+) /.exec(said)![1] : undefined;
      if (value === undefined) expect(qsyncSays([`--max-size=${size}`]), size).toBe(said);
      else expect(parseSizeArg('max-size', size), size).toBe(Number(value));
    }
  });

  it('--chmod: which items it accepts', () => {
    const items = ['DDu+x', 'FFo=u', 'D0', '00000000000000007777', 'uu+x', 'u+XX', '+', '=', 'u+', 'D+', 'o=st', 'ug=o', 'a=u',
      'DF+x', 'DDF+x', '17777', '010000', '8', 'u', 'D', 'u+r-w', 'u+x+w', 'g=uo', 'g=ur', 'u=gg', '=755', ' u+x', 'u+x,', ',', 'd755'];
    for (const item of items) expect(qsyncSays([`--chmod=${item}`]), item).toBe(rsyncSays([`--chmod=${item}`]));
  });

  it('--usermap/--groupmap: the checks and their order (the last pair is checked first)', () => {
    const maps = ['abc,1x:2', '1x:2,abc', '1:2,1x:3,abc', '1x:99999999999', '99999999999:x', '5-99999999999:4294967296', '2:4294967296',
      '4294967295-1:4294967295', '1-2-3:4', '1--2:3', '1 :2', ' 1:2', '-1:2', '[a-z]*:1', ':', '1:', '1:2,', ''];
    for (const map of maps) expect(qsyncSays([`--usermap=${map}`]), map).toBe(rsyncSays([`--usermap=${map}`]));
  });
});
