/**
 * rsync options that backup scripts pass, each against the real rsync: the
 * same source and starting DEST, rsync and qsync run with the same flags,
 * then the same tree (test/helpers/rsync-compare.ts), the same exit code,
 * the same stdout lines (sorted: rsync prints a file's line when its data
 * is sent) and the same stderr, rsync's "at main.c(N) [role=version]" and
 * its name aside.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, mkdtempSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { listedName, splitFilesFrom } from '../src/core/files-from.js';
import { QSYNC, runQsync } from './helpers/cli.js';
import { needTools } from './helpers/env.js';
import { ageAll, dirTimes, normaliseOutput, runRsync, sh, snapshot, sortedLines, T_DEST, T_SRC } from './helpers/rsync-compare.js';

let root: string;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'qsync-options-'));
  // nobody's cases reach their trees through it.
  chmodSync(root, 0o755);
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

interface OptCase {
  name: string;
  flags: string[];
  /** Builds the source (cwd) and DEST's starting state ($D). */
  setup: string;
  /** After every entry got its time (T_SRC, T_DEST): set what the case is about. */
  after?(src: string, dest: string): void;
  rounds?: number;
  /** DEST does not exist before the first run. */
  fresh?: boolean;
  /** The DEST operand below the destination copy (default: the copy, with a trailing slash). */
  destArg?: string;
  /** Source operands, relative to the source (default: "./", its contents); "SRC" in one stands for the source's path, as is. */
  sources?: string[];
  /** Only the stdout lines that match are compared (-vv prints rsync's protocol chatter). */
  only?: RegExp;
  /** A usage error: the exit code, the message and rsync's "syntax or usage error (code 1)" (what rsync 3.5 may add, "received SIGUSR1 (code 19)", aside). */
  usage?: boolean;
  /** Written to a file LIST beside the source; "LIST" in the flags names it. */
  list?: string;
  /** "LOG" in the flags names a log file of each tool's own, compared after the run. */
  log?: boolean;
  /** Both run as nobody, over trees nobody owns. */
  nobody?: boolean;
  /** rsync's flags, where they are not qsync's. */
  rsyncFlags?: string[];
}

/**
 * A --log-file's lines without their time and pid, rsync's protocol byte
 * counts and source location, times as normaliseOutput makes them; sorted, as the output is.
 */
const logLines = (path: string, dest: string) =>
  (existsSync(path) ? readFileSync(path, 'latin1') : '')
    .replaceAll(dest, 'DEST')
    .split('\n')
    .filter(Boolean)
    .map((l) =>
      l
        .replace(/^\d{4}\/\d\d\/\d\d \d\d:\d\d:\d\d \[\d+\] /, '')
        .replace(/^sent [\d,]+ bytes {2}received [\d,]+ bytes( {2}[\d.,]+ bytes\/sec)?/, (_m, rate?: string) => `sent N bytes  received N bytes${rate ? '  R bytes/sec' : ''}`)
        .replace(/ {2}speedup is .*/, '')
        .replace(/^[rq]sync error:/, 'error:')
        .replace(/^[rq]sync: (\[\w+\] )?/, '')
        .replace(/ at \S+\(\d+\) \[[^\]]+\]$/, ''),
    )
    .map(normaliseOutput)
    .sort();

/**
 * stderr lines without the program's name ("rsync: [generator] ", "qsync: ")
 * or rsync's source location; qsync's line may go on with a hint where rsync's ends.
 */
const stderrLines = (s: string, dest: string) =>
  s
    .replaceAll(dest, 'DEST')
    .split('\n')
    .filter(Boolean)
    .map((l) => l.replace(/^[rq]sync error:/, 'error:').replace(/^[rq]sync: (\[\w+\] )?/, '').replace(/ at \S+\(\d+\) \[[^\]]+\]$/, ''));
const withoutHints = (q: string[], r: string[]) => q.map((l, i) => (r[i] !== undefined && l.startsWith(`${r[i]} (`) ? r[i]! : l));

async function compare(c: OptCase): Promise<void> {
  const base = join(root, c.name.replace(/\W+/g, '_').slice(0, 80));
  const src = join(base, 'src');
  const init = join(base, 'init');
  mkdirSync(src, { recursive: true });
  mkdirSync(init);
  sh(c.setup, src, init);
  ageAll(src, T_SRC);
  ageAll(init, T_DEST);
  c.after?.(src, init);
  if (c.list !== undefined) writeFileSync(join(base, 'list'), c.list);
  const flags = c.flags.map((f) => f.replace('LIST', join(base, 'list')));
  if (c.nobody) execFileSync('chown', ['-R', '65534:65534', base]);
  const rs = join(base, 'by-rsync');
  const qs = join(base, 'by-qsync');
  if (!c.fresh) for (const d of [rs, qs]) execFileSync('cp', ['-a', init, d]);
  const operands = (c.sources ?? ['./']).map((s) => (s.includes('SRC') ? s.replace('SRC', src) : join(src, s)));
  for (let round = 0; round < (c.rounds ?? 1); round++) {
    const logOf = (d: string) => `${d}.log`;
    const r = runRsync([...(c.rsyncFlags ?? flags).map((f) => f.replace('LOG', logOf(rs))), ...operands, `${rs}/${c.destArg ?? ''}`], c.nobody === true);
    const q = await runQsync([...flags.map((f) => f.replace('LOG', logOf(qs))), ...operands, `${qs}/${c.destArg ?? ''}`], { asNobody: c.nobody });
    if (c.log) expect(logLines(logOf(qs), qs)).toEqual(logLines(logOf(rs), rs));
    const out = (s: string, d: string) => sortedLines(normaliseOutput(s.replaceAll(d, 'DEST'))).filter((l) => !c.only || c.only.test(l));
    // (rsync 3.5 may add "received SIGUSR1 (code 19)" to a usage error, before or after its own line.)
    const rErr = stderrLines(r.stderr, rs).filter((l) => !c.usage || !/received SIGUSR1/.test(l));
    expect({ round, code: q.code, stdout: out(q.stdout, qs), stderr: withoutHints(stderrLines(q.stderr, qs), rErr) }).toEqual({
      round,
      code: r.code,
      stdout: out(r.stdout, rs),
      stderr: rErr,
    });
    expect(existsSync(qs)).toBe(existsSync(rs));
    if (!existsSync(rs)) continue;
    expect(snapshot(qs)).toEqual(snapshot(rs));
    expect(dirTimes(qs)).toEqual(dirTimes(rs));
  }
}

/** Set the mtime of `path` to T_SRC plus `seconds`. */
const shifted = (path: string, seconds: number) => {
  const t = new Date(T_SRC.getTime() + seconds * 1000);
  utimesSync(path, t, t);
};

const TREE = 'mkdir -p d/sub; echo a > f; echo b > d/g; echo c > d/sub/h; ln -s f l';
const RTREE = 'mkdir -p a/b/c; echo 1 > a/b/f; echo 2 > top; echo 3 > a/b/c/g; chmod 750 a; chmod 711 a/b';
/** A DEST with seven names the source lacks: a, b, x/k, x/y/1, x/y/2, z/q, and the folders x, x/y, z. */
const EXTRA = 'touch f; cd "$D"; mkdir -p x/y z; touch a b x/y/1 x/y/2 x/k z/q';

const cases: OptCase[] = [
  // --mkpath
  { name: '--mkpath: the contents of a folder into a DEST/ three levels deep', flags: ['-a', '-i', '--mkpath'], setup: TREE, fresh: true, destArg: 'a/b/c/' },
  { name: '--mkpath: into a DEST without a trailing slash, -v', flags: ['-a', '-v', '--mkpath'], setup: TREE, fresh: true, destArg: 'a/b/c' },
  { name: '--mkpath: a folder itself (no trailing slash on SRC)', flags: ['-a', '-i', '--mkpath'], setup: TREE, fresh: true, destArg: 'x/y/', sources: ['d'] },
  // (To the same name: given another, rsync's line names the source, qsync's the target.)
  { name: '--mkpath: one file two folders down (the folders made, not the name)', flags: ['-a', '-i', '--mkpath'], setup: TREE, fresh: true, destArg: 'x/y/f', sources: ['f'] },
  { name: '--mkpath: one file into a DEST/ that does not exist', flags: ['-a', '-i', '--mkpath'], setup: TREE, fresh: true, destArg: 'p/q/', sources: ['f'] },
  { name: '--mkpath: two files to a DEST without a slash', flags: ['-a', '-i', '--mkpath'], setup: TREE, fresh: true, destArg: 'p/q', sources: ['f', 'd/g'] },
  { name: '--mkpath -n: says what it would make, makes nothing', flags: ['-a', '-i', '-n', '--mkpath'], setup: TREE, fresh: true, destArg: 'a/b/' },
  { name: '--mkpath -n: one file', flags: ['-a', '-i', '-n', '--mkpath'], setup: TREE, fresh: true, destArg: 'a/b/f', sources: ['f'] },
  { name: '--modify-window=abc: a usage error', flags: ['-a', '--modify-window=abc'], setup: 'touch f', usage: true },
  { name: '--max-delete=1x: a usage error', flags: ['-a', '--max-delete=1x'], setup: 'touch f', usage: true },
  { name: '--mkpath with an existing DEST: nothing to say', flags: ['-a', '-i', '--mkpath'], setup: TREE },
  { name: '--mkpath without -v or -i: silent', flags: ['-a', '--mkpath'], setup: TREE, fresh: true, destArg: 'a/b/' },

  // --max-delete
  { name: '--max-delete=3: three deleted, the rest skipped, exit 25', flags: ['-a', '-i', '--delete', '--max-delete=3'], setup: EXTRA },
  { name: '--max-delete=0: none deleted', flags: ['-a', '-i', '--delete', '--max-delete=0'], setup: EXTRA },
  { name: '--max-delete=-1 is 0, as in rsync', flags: ['-a', '-i', '--delete', '--max-delete=-1'], setup: EXTRA },
  { name: '--max-delete=1 -v: rsync -v lines', flags: ['-a', '-v', '--delete', '--max-delete=1'], setup: EXTRA },
  { name: '--max-delete=2 -n: counted as in a real run', flags: ['-a', '-i', '-n', '--delete', '--max-delete=2'], setup: EXTRA },
  { name: '--max-delete=7: just enough, exit 0', flags: ['-a', '-i', '--delete', '--max-delete=7'], setup: EXTRA },
  { name: '--max-delete=6: one short', flags: ['-a', '-i', '--delete', '--max-delete=6'], setup: EXTRA },
  { name: '--max-delete without --delete: nothing deleted, exit 0', flags: ['-a', '-i', '--max-delete=1'], setup: EXTRA },
  {
    name: '--max-delete=1 with excluded names kept in nested folders',
    flags: ['-a', '-i', '--delete', '--max-delete=1', '--exclude=*.tmp'],
    setup: 'touch f; cd "$D"; mkdir -p x/y/w v; touch x/y/keep.tmp x/y/w/n x/o v/p',
  },
  {
    name: '--max-delete=2: a type change makes way without counting',
    flags: ['-a', '-i', '--delete', '--max-delete=2'],
    setup: 'touch wasdir; mkdir wasfile; touch wasfile/in; cd "$D"; mkdir -p wasdir/s; touch wasdir/s/a wasfile a b c',
  },

  // --delete-excluded
  {
    name: '--delete-excluded: excluded names in DEST go, at every depth; excluded sources are not sent',
    flags: ['-a', '-i', '--delete-excluded', '--exclude=*.tmp', '--exclude=/cache/'],
    setup: 'mkdir -p cache d; touch f x.tmp d/y.tmp cache/c; cd "$D"; mkdir -p cache/old d/e; touch x.tmp d/y.tmp d/e/z.tmp cache/old/c keep',
  },
  {
    name: '--delete-excluded with include/exclude ordering',
    flags: ['-a', '-i', '--delete-excluded', '--include=*.img', '--include=*/', '--exclude=*'],
    setup: 'mkdir vms; touch vms/a.img vms/notes; cd "$D"; mkdir -p vms old; touch vms/notes vms/b.img old/x.txt top.txt',
  },
  {
    name: '--delete-excluded -n --max-delete=2',
    flags: ['-a', '-i', '-n', '--delete-excluded', '--exclude=*.tmp', '--max-delete=2'],
    setup: 'touch f; cd "$D"; touch a.tmp b.tmp c.tmp',
  },

  // --min-size, --max-size
  {
    name: '--min-size/--max-size: files outside are not sent, new or existing',
    flags: ['-a', '-i', '--min-size=10', '--max-size=1k'],
    setup:
      'mkdir d; : > zero; head -c 5 /dev/urandom > small; head -c 10 /dev/urandom > ten; head -c 1024 /dev/urandom > d/kib; head -c 1025 /dev/urandom > big;' +
      'cd "$D"; echo old > small; echo old > big; mkdir d',
  },
  {
    name: '-H --max-size: linked files over the size are all left alone, the others linked',
    flags: ['-aH', '-i', '--max-size=10'],
    setup: 'head -c 100 /dev/zero > big; ln big big2; echo s > small; ln small small2; cd "$D"; echo old > big2',
  },
  { name: '--max-size=0: only empty files', flags: ['-a', '-i', '--max-size=0', '--delete'], setup: 'touch empty; echo x > full; cd "$D"; echo old > full' },
  { name: '--max-size=1.5k with units of 1000 and +1 (1501 bytes is over)', flags: ['-a', '-i', '--max-size=1.5kb+1'], setup: 'head -c 1501 /dev/zero > a; head -c 1502 /dev/zero > b' },
  {
    name: '--max-size -vv: "is over max-size" and "is under min-size"',
    flags: ['-a', '-vv', '--max-size=2', '--min-size=2'],
    setup: 'mkdir d; echo -n a > d/one; echo -n ab > two; echo abc > d/three',
    only: /is (over|under)/,
  },
  { name: '--max-size=abc: rsync\'s message, exit 1', flags: ['-a', '--max-size=abc'], setup: 'touch f', usage: true },
  { name: '--min-size=-1: too large', flags: ['-a', '--min-size=-1'], setup: 'touch f', usage: true },

  // -I
  { name: '-I: files with the same size and time are sent anyway', flags: ['-a', '-i', '-I'], setup: 'echo same > f; echo other > g; cp -a f g "$D"/; echo OTHER > "$D"/g' },
  { name: '-I -n', flags: ['-a', '-i', '-I', '-n'], setup: 'echo same > f; cp f "$D"/' },

  // --modify-window
  {
    name: '--modify-window=1: a time a second off is the same (nothing sent, the time left)',
    flags: ['-a', '-i', '--modify-window=1'],
    setup: 'echo same > a; echo same > b; echo xxxx > c; cd "$D"; echo same > a; echo same > b; echo yyyy > c',
    after: (src, dest) => {
      shifted(join(dest, 'a'), 1);
      shifted(join(dest, 'b'), -1);
      shifted(join(dest, 'c'), 2);
    },
  },
  {
    name: '-@2: two seconds off is the same, three is not',
    flags: ['-a', '-i', '-@2'],
    setup: 'echo s > a; echo t > b; cd "$D"; echo s > a; echo t > b',
    after: (src, dest) => {
      shifted(join(dest, 'a'), 2);
      shifted(join(dest, 'b'), 3);
    },
  },
  {
    name: '-u --modify-window=2: a source less than two seconds newer is skipped',
    flags: ['-a', '-i', '-u', '--modify-window=2'],
    setup: 'echo new > a; echo new > b; echo new > c; cd "$D"; echo old > a; echo old > b; echo old > c',
    after: (src, dest) => {
      shifted(join(dest, 'a'), -1);
      shifted(join(dest, 'b'), -2);
      shifted(join(dest, 'c'), 1);
    },
  },
  {
    name: '--modify-window=-1: to the nanosecond',
    flags: ['-a', '-i', '--modify-window=-1'],
    setup: 'echo s > a; cd "$D"; echo s > a',
    after: (src, dest) => shifted(join(dest, 'a'), 0.25),
  },

  // -m
  {
    name: '-m: folders with nothing but folders below them are not made',
    flags: ['-a', '-i', '-m'],
    setup: 'mkdir -p a/b/c e/f g; touch e/f/x; ln -s x g/l',
  },
  {
    name: '-m with excludes: a folder that holds only excluded names is pruned',
    flags: ['-a', '-i', '-m', '--exclude=*.tmp'],
    setup: 'mkdir -p a/b c; touch a/b/x.tmp c/y',
  },
  {
    name: '-m --delete: pruned folders in DEST are deleted',
    flags: ['-a', '-i', '-m', '--delete', '--exclude=*.tmp'],
    setup: 'mkdir -p a/b c e; touch c/y e/z.tmp; cd "$D"; mkdir -p a/b e c; touch a/b/old',
  },

  // -d: the rsync 3.5.0 here walks folders whole with -d (against its manual); its --old-d (-r with the
  // filter "- /*/*") does what the manual says -d does, so qsync -d is compared with rsync --old-d.
  ...[
    { name: 'the contents of SRC/, one level', sources: ['./'] },
    { name: 'a folder without a slash: made, not walked', sources: ['d'] },
    { name: 'a file and a folder', sources: ['f', 'd'] },
    { name: '"d/.": its contents, one level', sources: ['d/.'] },
  ].map(({ name, sources }): OptCase => ({ name: `-d: ${name}`, flags: ['-lptgoD', '-i', '-d'], rsyncFlags: ['-lptgoD', '-i', '--old-d'], setup: TREE, sources, rounds: 2 })),
  {
    name: '-d --delete: deletions in the folder whose contents are sent, not in the folders below',
    flags: ['-lptgoD', '-i', '-d', '--delete'],
    rsyncFlags: ['-lptgoD', '-i', '--old-d', '--delete'],
    // (Not an extraneous folder with something in it: --old-d's filter keeps what is in it, -d deletes it.)
    setup: `${TREE}; cd "$D"; mkdir -p d/old gone; touch d/old/x d/y extra`,
  },
  { name: '-d with -r: -r wins', flags: ['-a', '-i', '-d'], setup: TREE },

  // -R
  { name: '-R: folders on the way made with their attributes, from a "/./" on', flags: ['-a', '-i', '-R'], setup: RTREE, sources: ['SRC/./a/b', 'SRC/./top'], rounds: 2 },
  { name: '-R: a file deep down', flags: ['-a', '-i', '-R'], setup: RTREE, sources: ['SRC/./a/b/f'] },
  { name: '-R: "./a/b" sends the base folder too', flags: ['-a', '-i', '-R'], setup: RTREE, sources: ['SRC/././a/b'] },
  { name: '-R without -r: a folder is skipped, and the folders on its way are not made', flags: ['-lt', '-i', '-R'], setup: RTREE, sources: ['SRC/./a/b', 'SRC/./top'] },
  {
    name: '-R --delete: deletions inside the folders sent, not beside them',
    flags: ['-a', '-i', '-R', '--delete'],
    setup: `${RTREE}; cd "$D"; mkdir -p a/b/old; touch a/b/old/x a/y z`,
    sources: ['SRC/./a/b'],
  },
  { name: '-R with one file and no folder on its way: to DEST, named as DEST', flags: ['-a', '-i', '-R'], setup: RTREE, sources: ['SRC/./top'], destArg: 'top' },
  { name: '-R: ".." refused', flags: ['-a', '-R'], setup: RTREE, sources: ['SRC/./a/../top'], usage: true },
  { name: '-R: ".." in an operand without "/./" refused, named whole', flags: ['-a', '-R'], setup: RTREE, sources: ['SRC/a/../top'], usage: true },
  { name: '-R: a second "/./" and a trailing "/." are dropped', flags: ['-a', '-i', '-R'], setup: RTREE, sources: ['SRC/./a/./b/.'] },

  // --no-implied-dirs
  { name: '-R --no-implied-dirs: the folders on the way made plain (0777 less the umask), not sent, not named', flags: ['-a', '-i', '-R', '--no-implied-dirs'], setup: RTREE, sources: ['SRC/./a/b/f', 'SRC/./top', 'SRC/./a/b/c'], fresh: true },
  { name: '-R --no-implied-dirs: a folder on the way that exists keeps its mode and time', flags: ['-a', '-i', '-R', '--no-i-d'], setup: `${RTREE}; mkdir -p "$D"/a; chmod 700 "$D"/a`, sources: ['SRC/./a/b/f'] },
  { name: '-R --no-implied-dirs -n: nothing made', flags: ['-a', '-i', '-n', '-R', '--no-implied-dirs'], setup: RTREE, sources: ['SRC/./a/b/f'], fresh: true },
  { name: '--files-from --no-implied-dirs', flags: ['-a', '-i', '--no-implied-dirs', '--files-from=LIST'], setup: RTREE, list: 'a/b/c/g\ntop\n' },

  // --log-file
  { name: '--log-file: changes, links and the closing line', flags: ['-a', '--log-file=LOG'], setup: `${TREE}; cd "$D"; echo old > f`, log: true, rounds: 2 },
  {
    name: '--log-file with --delete: deletions and what cannot be deleted',
    flags: ['-a', '--delete', '--exclude=*.tmp', '--log-file=LOG'],
    setup: `${TREE}; cd "$D"; mkdir -p x/y gone; touch x/y/k.tmp gone/z extra`,
    log: true,
  },
  {
    name: '--log-file-format without %i or %o: "deleting NAME"; widths',
    flags: ['-a', '--delete', '--log-file=LOG', '--log-file-format=%n %l|%-6l|%6n|%%|%u'],
    setup: `${TREE}; cd "$D"; touch extra`,
    log: true,
  },
  { name: '--log-file-format=%o %i %n%L', flags: ['-a', '--delete', '--log-file=LOG', '--log-file-format=%o %i %n%L'], setup: `${TREE}; cd "$D"; touch extra`, log: true },
  { name: '--log-file with a failure: the error and exit lines', flags: ['-a', '--log-file=LOG'], setup: 'touch f', sources: ['./', 'missing'], log: true },
  { name: '--log-file with --max-delete: exit 25', flags: ['-a', '--delete', '--max-delete=1', '--log-file=LOG'], setup: EXTRA, log: true },
  { name: '--log-file -v: the closing summary instead of the byte line', flags: ['-a', '-v', '--log-file=LOG'], setup: TREE, log: true },
  { name: '--log-file -n', flags: ['-a', '-n', '--delete', '--log-file=LOG'], setup: `${TREE}; cd "$D"; touch extra`, log: true },

  // As nobody, over trees nobody owns
  { name: 'nobody: --chmod=Du+w,go-rwx,F400', flags: ['-a', '-i', '--chmod=Du+w,go-rwx,F400'], setup: `${TREE}; cd "$D"; echo a > f; chmod 644 f`, nobody: true, rounds: 2 },
  { name: 'nobody: --max-delete=2 --delete-excluded -m', flags: ['-a', '-i', '--delete-excluded', '--exclude=*.tmp', '--max-delete=2', '-m'], setup: EXTRA + '; touch k.tmp; mkdir -p e/f', nobody: true },
  { name: 'nobody: -R and --mkpath', flags: ['-a', '-i', '-R', '--mkpath'], setup: RTREE, sources: ['SRC/./a/b'], destArg: 'x/y/', fresh: true, nobody: true },
  {
    name: 'nobody: an unreadable source folder: rsync\'s opendir line, its mode given to DEST\'s, no deletion after it, exit 23',
    flags: ['-a', '-i', '--delete'],
    setup: 'mkdir -p d; echo b > d/g; mkdir a; echo x > a/x; chmod 000 a; cd "$D"; mkdir -p a d; echo old > a/keep; echo e > d/extra2',
    nobody: true,
  },
  { name: 'nobody: an unreadable source file: rsync\'s send_files line, the rest copied, exit 23', flags: ['-a', '-v'], setup: 'echo a > f; echo s > secret; chmod 000 secret', nobody: true, fresh: true },
  { name: 'nobody: --files-from with --chown (not root: owners stay)', flags: ['-a', '-i', '--files-from=LIST', '--chown=1234:4321'], setup: RTREE, list: 'a/b/f\ntop\n', nobody: true },

  // --files-from, -0
  {
    name: '--files-from: implied folders with their attributes, "dir/" one level, comments, a leading / and a missing name (exit 23)',
    flags: ['-a', '-i', '--files-from=LIST'],
    setup: 'mkdir -p a/b c/d e; echo 1 > a/b/f; echo 2 > a/g; echo 3 > c/h; echo 4 > c/d/i; echo 5 > top; chmod 750 a; chmod 700 c/d',
    list: 'c/\n/top\n#comment\n\n;x\na/b/f\nnothere\n',
    rounds: 2,
  },
  {
    name: '--files-from -r --delete: folders listed are walked whole, deletions only inside them',
    flags: ['-a', '-r', '-i', '--delete', '--files-from=LIST'],
    setup: 'mkdir -p a c/d; echo 2 > a/g; echo 3 > c/h; echo 4 > c/d/i; cd "$D"; mkdir -p c/old a; touch c/old/x c/y a/z w',
    list: 'c\na/g\n',
  },
  {
    name: '--files-from with -a alone: a folder listed without a slash is made, not walked (no -r from -a)',
    flags: ['-a', '-i', '--files-from=LIST'],
    setup: 'mkdir -p c/d; echo 3 > c/h; touch top',
    list: 'c\ntop\n',
  },
  {
    name: '--files-from: "./NAME" sends SRC\'s folder too; ".." is dropped; "e/" of an empty folder',
    flags: ['-a', '-i', '--files-from=LIST'],
    setup: 'mkdir -p c/d e; echo 4 > c/d/i; echo 5 > top; chmod 711 .',
    list: './c/d/i\ne/\na/../top\n',
  },
  {
    name: '--files-from: ".." at the top is SRC (one level), "c/d/.." is c with its contents, "/./NAME" is "./NAME"',
    flags: ['-a', '-i', '--files-from=LIST'],
    setup: 'mkdir -p c/d e/f; echo 4 > c/d/i; echo 5 > top; echo 6 > e/f/j; chmod 711 .',
    list: '..\nc/d/..\n/./e/f\n',
  },
  {
    name: '--files-from -0: names with newlines and spaces',
    flags: ['-a', '-i', '-0', '--files-from=LIST'],
    setup: 'mkdir "d 1"; printf x > "d 1/new\nline"; printf y > "sp ace"; touch other',
    list: 'd 1/new\nline\0sp ace\0',
  },
  {
    name: '--files-from: excluded names are not sent; -n',
    flags: ['-a', '-i', '-n', '--exclude=*.tmp', '--files-from=LIST'],
    setup: 'mkdir d; touch d/x.tmp d/y top.tmp',
    list: 'd/x.tmp\nd/y\ntop.tmp\n',
  },
  {
    name: '--files-from -H: listed names that are links of one another are linked, as rsync links them',
    flags: ['-aH', '-i', '--files-from=LIST'],
    setup: 'mkdir d e; echo x > a; ln a d/b; ln a e/c; echo y > f; ln f g',
    list: 'a\nd/b\ne/\nf\n',
    rounds: 2,
  },
  { name: '-R -H: operands that are links of one another are linked', flags: ['-aH', '-i', '-R'], setup: 'mkdir -p d/e; echo x > a; ln a d/e/b', sources: ['SRC/./a', 'SRC/./d/e/b'] },
  {
    name: '--files-from with one file and a DEST that is no folder: DEST is that file',
    flags: ['-a', '-i', '--files-from=LIST'],
    setup: 'echo 5 > top; mkdir d; touch d/x',
    list: 'top\n',
    // (To the same name: given another, rsync's line names the source, qsync's the target.)
    destArg: 'top',
  },
  {
    name: '--files-from with one file in a folder: DEST is a folder',
    flags: ['-a', '-i', '--files-from=LIST'],
    setup: 'mkdir d; touch d/x',
    list: 'd/x\n',
    destArg: 'copy',
  },
  {
    name: '-0 --exclude-from: NUL-ended patterns',
    flags: ['-a', '-i', '-0', '--exclude-from=LIST'],
    setup: 'touch a.tmp b.log c',
    list: '*.tmp\0*.log\0',
  },

  // --chmod
  ...[
    ['D755,F644'],
    ['u+x,go-w'],
    ['Fg+X,Do-rx'],
    ['ug=rwX,o='],
    ['g=u', 'o=g'],
    ['a+s,Dg-s,+t'],
    ['-w', '+r'],
    ['F0600', 'D2750'],
  ].map((chmod): OptCase => ({
    name: `--chmod=${chmod.join(' --chmod=')}`,
    flags: ['-a', '-i', ...chmod.map((c) => `--chmod=${c}`)],
    setup: 'mkdir -p d/e; echo a > f; echo b > d/x; chmod 755 d/x; chmod 640 f; chmod 701 d/e; ln -s f l; cd "$D"; echo a > f; chmod 600 f',
  })),
  // What chmod(1) and rsync's manual leave open, over modes with set-user-ID, set-group-ID and sticky bits.
  ...[
    ['u+x,+X'], // X looks at the source's mode before any item
    ['o+s', '+t'], // s without u or g is set-user-ID; t is sticky whoever is named
    ['u=t,g=rs', 'o=s'], // '=' with s or t clears set-user-ID for u, set-group-ID for g, nothing for o
    ['o=u', 'g=o'], // a copy '=' clears the destination class's special bit
    ['=u', '-w'], // no class named: the umask's bits are left alone
    ['D00755,F0'], // an octal mode sets all twelve bits, a folder's too
  ].map((chmod): OptCase => ({
    name: `--chmod=${chmod.join(' --chmod=')} over special bits`,
    flags: ['-a', '-i', ...chmod.map((c) => `--chmod=${c}`)],
    setup: 'mkdir sg tmp; touch sg/x su plain gx; chmod 2755 sg; chmod 1777 tmp; chmod 4755 su; chmod 644 plain; chmod 010 gx; cd "$D"; touch plain; chmod 600 plain',
  })),
  { name: '-rt --chmod=F600,D700: new entries get the changed mode less the umask, existing ones keep theirs', flags: ['-rt', '-i', '--chmod=F606,D707'], setup: 'mkdir d; touch d/x f; cd "$D"; touch f; chmod 644 f' },

  // --chown, --usermap, --groupmap
  ...[
    ['--chown=1234:4321'],
    ['--chown=nobody'],
    ['--chown=:nogroup'],
    ['--usermap=daemon:bin,1000-2000:nobody,r*:1', '--groupmap=0:4321'],
    ['--usermap=50:2,*:3', '--numeric-ids'],
    ['--usermap=0:nosuchuser', '--groupmap=*:nosuchgroup'],
    // A FROM with no wildcard is a name compared whole (a backslash escapes nothing there); an empty one matches the IDs without a name.
    ['--usermap=d\\aemon:2,d?emon:3,:4', '--groupmap=[!r]*:5,2-1:6'],
  ].map((map): OptCase => ({
    name: `-a ${map.join(' ')}`,
    flags: ['-a', '-i', ...map],
    setup: 'mkdir d; touch f g h d/x; ln -s f l; chown 1:1 f; chown 1234:1234 g; chown -h 50:50 l; chown 0:0 h; cd "$D"; touch f; chown 1234:4321 f',
  })),
  { name: '-rt --groupmap=*:4321: implies -g', flags: ['-rt', '-i', '--groupmap=*:4321'], setup: 'touch f; chown 1:1 f' },
  { name: '--usermap=abc: a usage error', flags: ['-a', '--usermap=abc'], setup: 'touch f', usage: true },
  { name: '--groupmap=1x:2: a usage error', flags: ['-a', '--groupmap=1x:2'], setup: 'touch f', usage: true },
  { name: '--usermap=0: a usage error', flags: ['-a', '--usermap=0:'], setup: 'touch f', usage: true },
  { name: '--chown then --usermap: a usage error', flags: ['-a', '--chown=a', '--usermap=*:b'], setup: 'touch f', usage: true },
  { name: '--usermap=abc,1x:2: the last pair is checked first', flags: ['-a', '--usermap=abc,1x:2'], setup: 'touch f', usage: true },
  { name: '--groupmap=1:4294967296: a usage error', flags: ['-a', '--groupmap=1:4294967296'], setup: 'touch f', usage: true },
  { name: '--chown twice: a usage error', flags: ['-a', '--chown=a', '--chown=b:c'], setup: 'touch f', usage: true },
  { name: '--chmod=u+q: a usage error', flags: ['-a', '--chmod=u+q'], setup: 'touch f', usage: true },
  { name: '--chmod=DF+x: a usage error', flags: ['-a', '--chmod=DF+x'], setup: 'touch f', usage: true },
  // Usage errors in rsync's words
  { name: 'an unknown long option', flags: ['-a', '--bogus'], setup: 'touch f', usage: true },
  { name: 'an unknown short option: named with its cluster', flags: ['-avY'], setup: 'touch f', usage: true },
  { name: 'a value to an option that takes none', flags: ['-a', '--verbose=2'], setup: 'touch f', usage: true },
  { name: 'an unknown --info word', flags: ['-a', '--info=name,foo'], setup: 'touch f', usage: true },
  { name: 'an unknown --debug word', flags: ['-a', '--debug=foo'], setup: 'touch f', usage: true },
  { name: '--debug=none: accepted, no debug output', flags: ['-a', '-i', '--debug=none'], setup: TREE },

  // --existing, --ignore-existing: what they leave alone is listed all the same (the totals of -v and --stats)
  { name: '--existing -v --stats: the names left alone in the totals', flags: ['-a', '-v', '--stats', '--existing'], setup: `${TREE}; mkdir -p e/f; echo x > e/f/y; cd "$D"; echo old > f; mkdir d` },
  { name: '--ignore-existing -v --stats: the names left alone in the totals', flags: ['-a', '-v', '--stats', '--ignore-existing'], setup: `${TREE}; mkdir -p e/f; echo x > e/f/y; cd "$D"; echo old > f; mkdir -p d/sub` },

  // Operands: missing ones, a DEST whose folder is missing, "dir/..", no -r
  { name: 'every source missing: rsync\'s link_stat and change_dir lines, the closing lines, exit 23', flags: ['-av'], setup: TREE, sources: ['missing', 'gone/'] },
  { name: 'a folder copied into a DEST whose parent is missing: mkdir failed, exit 11, nothing said made', flags: ['-av'], setup: TREE, destArg: 'nope/deeper/' },
  { name: 'one file copied to a name in a folder that is missing: exit 3', flags: ['-av'], setup: TREE, sources: ['f'], destArg: 'nope/deeper' },
  { name: '"d/.." sends the contents of d\'s parent', flags: ['-ai'], setup: TREE, sources: ['d/..'] },
  { name: 'neither -r nor -d: "skipping directory ." and nothing sent', flags: ['-lptv', '--stats'], setup: TREE },
  { name: 'neither -r nor -d: a folder operand skipped, a file sent, no header', flags: ['-lptv'], setup: TREE, sources: ['d', 'f'] },
  { name: '-m: the list is built first ("building file list ... done")', flags: ['-av', '-m'], setup: TREE },
  { name: '--files-from without -r: the list is built first', flags: ['-av', '--files-from=LIST'], setup: TREE, list: 'd/g\nf\n' },
  { name: 'a --files-from list that is not there: rsync\'s usage error', flags: ['-av', '--files-from=/nonexistent/list'], setup: TREE, usage: true },
  { name: 'an --exclude-from file that is not there: exit 11, no header', flags: ['-av', '--exclude-from=/nonexistent/list'], setup: TREE },

  // -O: folders left out of -t
  { name: '-O: files keep their times, folders do not get theirs (new and existing)', flags: ['-aO', '-i'], setup: 'mkdir -p d/sub e; echo a > d/f; echo b > d/sub/g; cd "$D"; mkdir -p e' },
  { name: '-a --no-O: as -a', flags: ['-aO', '--no-O', '-i'], setup: 'mkdir -p d/sub; echo a > d/f' },

  // --no-inc-recursive: the list built first
  { name: '--no-inc-recursive -v: "building file list ... done"', flags: ['-av', '--no-inc-recursive'], setup: TREE },
  { name: '--no-i-r --i-r -v: incremental again', flags: ['-av', '--no-i-r', '--i-r'], setup: TREE },

  // --force: a non-empty folder in the way of a file
  { name: 'a file where DEST has a non-empty folder, without --force: exit 23, the folder kept', flags: ['-a', '-i'], setup: 'echo f > x; cd "$D"; mkdir -p x/y; touch x/y/z' },
  { name: '--force: the folder and its contents go, the file takes its place', flags: ['-a', '-i', '--force'], setup: 'echo f > x; mkdir e; echo g > e/w; cd "$D"; mkdir -p x/y e/w/v; touch x/y/z e/w/v/u' },
  { name: '--force -n: listed, nothing removed', flags: ['-a', '-i', '-n', '--force'], setup: 'echo f > x; cd "$D"; mkdir -p x/y; touch x/y/z' },

  // --safe-links
  {
    name: '--safe-links -v: absolute links, links climbing out and any ".." after a name are ignored, with rsync\'s line',
    flags: ['-av', '--safe-links'],
    setup: 'mkdir d; echo hi > f; ln -s /etc abs; ln -s ../../x d/up; ln -s ../f d/ok; ln -s d/../../y sneaky; ln -s ./d/./../f embedded; ln -s d/../f back; ln -s ./f dot; ln -s . self; ln -s d/ sub',
  },
  { name: '--safe-links without the trailing slash: the source folder is a name inside the transfer', flags: ['-av', '--safe-links'], setup: 'mkdir d; echo hi > f; ln -s ../f d/ok; ln -s ../../x d/up', sources: ['SRC'] },
  { name: '--safe-links --delete: what DEST has under an unsafe link\'s name is kept', flags: ['-a', '-i', '--delete', '--safe-links'], setup: 'echo hi > f; ln -s /etc abs; cd "$D"; ln -s /etc abs; touch old' },

  // --preallocate: accepted; the data is the same
  { name: '--preallocate: new and changed files as rsync makes them', flags: ['-a', '-i', '--preallocate'], setup: 'head -c 300000 /dev/urandom > big; echo a > f; cd "$D"; echo old > f' },

  // --filter / -f: rsync's rule words, merge files, clear (no per-directory merge)
  { name: '--filter=- PATTERN and exclude PATTERN', flags: ['-a', '-i', '--filter=- *.o', '--filter=exclude /notes'], setup: 'mkdir -p d keep; touch a.o b.c d/x.o keep/y.o notes d/notes' },
  { name: '-f, include before exclude, first match wins', flags: ['-a', '-i', '-f+ keep/***', '-f- *.o'], setup: 'mkdir -p d keep; touch a.o b.c d/x.o keep/y.o' },
  { name: '--filter=merge FILE: its lines are rules, comments skipped', flags: ['-a', '-i', '--filter=merge LIST'], setup: 'mkdir -p d keep; touch a.o b.c d/x.o keep/y.o', list: '# keep what is kept\n+ keep/***\n; objects out\n- *.o\n' },
  { name: '--filter=. FILE with clear (!) in it', flags: ['-a', '-i', '--filter=. LIST'], setup: 'touch a.o b.c', list: '- *.o\n!\n- *.c\n' },
  { name: '--filter rules with --delete: excluded names in DEST are kept', flags: ['-a', '-i', '--delete', '--filter=+ keep.c', '--filter=- *.c'], setup: 'touch a.c keep.c f; cd "$D"; touch a.c old' },
  { name: 'an unknown filter rule: usage error', flags: ['-a', '--filter=frobnicate x'], setup: 'touch f', usage: true },
  { name: 'a filter rule with nothing after it: usage error', flags: ['-a', '--filter=-'], setup: 'touch f', usage: true },

  // --log-file follows the --info levels (-q quiets stdout only); a deletion's %f is its name without the slash
  { name: '--log-file -q --stats: the statistics block and the closing lines are logged', flags: ['-a', '-q', '--stats', '--delete', '--log-file=LOG'], setup: EXTRA, log: true },
  { name: '--log-file --info=stats1: the closing lines', flags: ['-a', '--info=stats1', '--log-file=LOG'], setup: TREE, log: true },
  { name: '--log-file -v --info=stats0: the byte line', flags: ['-a', '-v', '--info=stats0', '--log-file=LOG'], setup: TREE, log: true },
  { name: '--log-file-format=%o %f %n over deleted folders', flags: ['-a', '--delete', '--log-file=LOG', '--log-file-format=%o %f %n'], setup: EXTRA, log: true },
  { name: '--out-format=%o %f %n over deleted folders', flags: ['-a', '--delete', '--out-format=%o %f %n'], setup: EXTRA },
];

describe.skipIf(!needTools('rsync'))('rsync options, against rsync', () => {
  for (const c of cases) it(c.name, () => compare(c));
});

describe('DEST inside SRC', () => {
  it('"qsync -a ./ D/" makes D/D and does not walk the copy it is making', async () => {
    const src = join(root, 'dest-inside');
    mkdirSync(join(src, 'x'), { recursive: true });
    writeFileSync(join(src, 'x/f'), 'f');
    const r = await runQsync(['-a', `${src}/`, `${src}/D/`]);
    expect(r.code, r.stderr).toBe(0);
    expect(Object.keys(snapshot(join(src, 'D'))).sort()).toEqual(['D', 'x', 'x/f']);
  });
});

describe.skipIf(!needTools('rsync'))('--delete-excluded and --backup-dir', () => {
  it('a --backup-dir inside DEST is never deleted, even when excluded', async () => {
    const base = join(root, 'backup-dir-protected');
    const src = join(base, 'src');
    const dest = join(base, 'dest');
    mkdirSync(src, { recursive: true });
    writeFileSync(join(src, 'disk.img'), 'one');
    expect((await runQsync(['-a', '--backup-dir=hist', `${src}/`, `${dest}/`])).code).toBe(0);
    writeFileSync(join(src, 'disk.img'), 'two');
    const r = await runQsync(['-a', '--delete-excluded', '--exclude=h*', '--backup-dir=hist', `${src}/`, `${dest}/`]);
    expect(r.code, r.stderr).toBe(0);
    expect(Object.keys(snapshot(dest))).toContain('hist');
  });
});

describe.skipIf(!needTools('rsync'))('--files-from=- and --exclude-from=- read stdin', () => {
  it('--exclude-from=- too', () => {
    const base = join(root, 'exclude-from-stdin');
    const src = join(base, 'src');
    mkdirSync(src, { recursive: true });
    sh('touch a.tmp b c.log', src, base);
    const run = (cmd: string[], dest: string) => spawnSync(cmd[0]!, [...cmd.slice(1), '-a', '-i', '--exclude-from=-', `${src}/`, `${dest}/`], { input: '*.tmp\n*.log\n', encoding: 'utf8' });
    const r = run(['rsync'], join(base, 'by-rsync'));
    const q = run(['node', QSYNC], join(base, 'by-qsync'));
    expect({ code: q.status, stdout: sortedLines(q.stdout.replaceAll('by-qsync', 'DEST')) }).toEqual({ code: r.status, stdout: sortedLines(r.stdout.replaceAll('by-rsync', 'DEST')) });
    expect(Object.keys(snapshot(join(base, 'by-qsync')))).toEqual(['b']);
  });

  it('as `find | rsync --files-from=- -0`', () => {
    const base = join(root, 'files-from-stdin');
    const src = join(base, 'src');
    mkdirSync(join(src, 'd'), { recursive: true });
    sh('echo 1 > d/a; echo 2 > b; echo 3 > c', src, base);
    ageAll(src, T_SRC);
    const list = 'd/a\0c\0';
    const run = (cmd: string[], dest: string) => spawnSync(cmd[0]!, [...cmd.slice(1), '-a', '-i', '-0', '--files-from=-', `${src}/`, `${dest}/`], { input: list, encoding: 'utf8' });
    const r = run(['rsync'], join(base, 'by-rsync'));
    const q = run(['node', QSYNC], join(base, 'by-qsync'));
    expect({ code: q.status, stdout: sortedLines(q.stdout.replaceAll('by-qsync', 'DEST')), stderr: q.stderr }).toEqual({
      code: r.status,
      stdout: sortedLines(r.stdout.replaceAll('by-rsync', 'DEST')),
      stderr: r.stderr,
    });
    expect(snapshot(join(base, 'by-qsync'))).toEqual(snapshot(join(base, 'by-rsync')));
    expect(Object.keys(snapshot(join(base, 'by-qsync')))).toEqual(['c', 'd', 'd/a']);
  });
});

describe('--files-from names, as rsync sanitizes them', () => {
  it('drops a leading / and .. components, keeps a trailing slash as "its contents", "./" as the dot dir', () => {
    expect(listedName('/top', 'L')).toEqual({ rel: 'top', contents: false, dotDir: false });
    expect(listedName('a//b/', 'L')).toEqual({ rel: 'a/b', contents: true, dotDir: false });
    expect(listedName('a/b/.', 'L')).toEqual({ rel: 'a/b', contents: true, dotDir: false });
    expect(listedName('a/x/..', 'L')).toEqual({ rel: 'a', contents: true, dotDir: false });
    expect(listedName('../../etc/passwd', 'L')).toEqual({ rel: 'etc/passwd', contents: false, dotDir: false });
    expect(listedName('.', 'L')).toEqual({ rel: '', contents: true, dotDir: false });
    expect(listedName('./c/d', 'L')).toEqual({ rel: 'c/d', contents: false, dotDir: true });
    expect(() => listedName('a/./b', 'L')).toThrow('"/./"');
  });

  it('skips empty lines and comments; -0 splits at NUL only', () => {
    expect(splitFilesFrom('a\r\n\n#c\n;d\nb c\r', false)).toEqual(['a', 'b c']);
    expect(splitFilesFrom('a\nb\0#c\0\0d', true)).toEqual(['a\nb', 'd']);
    expect(listedName('..', 'L')).toEqual({ rel: '', contents: true, dotDir: false });
    expect(listedName('/./a', 'L')).toEqual({ rel: 'a', contents: false, dotDir: true });
    expect(() => listedName('a/b/./', 'L')).toThrow('"/./"');
  });
});

describe('--version and -VV in the shape of rsync\'s', () => {
  it('names the program, version and protocol on the first line, and lists ACLs and xattrs', async () => {
    const r = await runQsync(['--version']);
    expect(r.code).toBe(0);
    expect(r.stdout.split('\n')[0]).toMatch(/^qsync {2}version \d+\.\d+\.\d+ {2}protocol version \d+$/);
    const caps = r.stdout.slice(r.stdout.indexOf('Capabilities:')).split('\n\n')[0]!;
    expect(caps).toMatch(/ ACLs,/);
    expect(caps).toMatch(/ xattrs,/);
    expect(caps).toMatch(/ no crtimes$/);
  });

  it('-VV is JSON with the keys rsync -VV has', async () => {
    const r = await runQsync(['-VV']);
    const doc = JSON.parse(r.stdout) as Record<string, unknown>;
    const capabilities = doc.capabilities as Record<string, unknown>;
    expect(doc).toMatchObject({ program: 'qsync' });
    expect(capabilities).toMatchObject({ ACLs: true, xattrs: true, hardlinks: true, crtimes: false });
    if (needTools('rsync')) {
      const theirs = JSON.parse(execFileSync('rsync', ['-VV'], { encoding: 'utf8' })) as Record<string, Record<string, unknown>>;
      // Every capability qsync names, rsync names too (and the top-level keys scripts read).
      for (const k of Object.keys(capabilities)) expect(theirs.capabilities, k).toHaveProperty(k);
      for (const k of ['program', 'version', 'protocol', 'capabilities']) expect(theirs).toHaveProperty(k);
    }
  });
});
