/**
 * What scripts read from rsync's output, compared with real rsync's: the
 * same tree synced by `rsync` and by `qsync` with the same flags prints the
 * same stdout and stderr and exits the same, once times and rates are made
 * constant (normaliseOutput in test/helpers/rsync-compare.ts). Small trees,
 * files under 32 KiB: rsync's progress then shows one tick per file, whatever the clock.
 */
import { chmodSync, chownSync, mkdirSync, mkdtempSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NOBODY, QSYNC, runQsync } from './helpers/cli.js';
import { ageAll, runBoth, T_DEST, T_SRC } from './helpers/rsync-compare.js';
import { needTools } from './helpers/env.js';
import { randomFile } from './helpers/data.js';

let root: string;
let src: string;
/** A copy of src as both tools leave it, and one with extra names for --delete. */
let full: string;
let extra: string;
/** full, with one file's mode changed (a changed time would send it: rsync names a sent file when it sends it, behind the generator's lines). */
let touched: string;

beforeAll(async () => {
  root = mkdtempSync(join(tmpdir(), 'qsync-rsync-out-'));
  src = join(root, 'src');
  mkdirSync(join(src, 'b/sub'), { recursive: true });
  mkdirSync(join(src, 'a'));
  writeFileSync(join(src, 'z.txt'), 'zz\n');
  writeFileSync(join(src, 'c.txt'), 'top\n');
  writeFileSync(join(src, 'a/q'), 'q\n');
  writeFileSync(join(src, 'b/f1'), 'f1\n');
  randomFile(join(src, 'b/sub/f2'), 20_000);
  writeFileSync(join(src, 'new\nline'), 'n');
  writeFileSync(join(src, 'back\\#012slash'), 'b');
  ageAll(src, T_SRC);
  full = join(root, 'full');
  await runBoth(join(root, 'make-full'), src, ['-a']);
  rmSync(full, { recursive: true, force: true });
  rmSync(join(root, 'make-full/qsync'), { recursive: true });
  // cp -a of rsync's copy: the tools' re-runs then start from the same tree.
  const { execFileSync } = await import('node:child_process');
  execFileSync('cp', ['-a', join(root, 'make-full/rsync/D'), full]);
  extra = join(root, 'extra');
  execFileSync('cp', ['-a', full, extra]);
  mkdirSync(join(extra, 'old/deep'), { recursive: true });
  writeFileSync(join(extra, 'old/deep/x'), 'x');
  writeFileSync(join(extra, 'zz'), 'gone');
  ageAll(extra, T_DEST);
  touched = join(root, 'touched');
  execFileSync('cp', ['-a', full, touched]);
  chmodSync(join(touched, 'c.txt'), 0o600);
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** A folder `name` holding one disk.img of `size` random bytes, copied once by qsync -a into `name`-dest. */
async function syncedImage(name: string, size: number): Promise<{ src: string; dest: string }> {
  const src = join(root, name);
  mkdirSync(src);
  randomFile(join(src, 'disk.img'), size);
  ageAll(src, T_SRC);
  const dest = join(root, `${name}-dest`);
  expect((await runQsync(['-a', `${src}/`, `${dest}/`])).code).toBe(0);
  return { src, dest };
}

/** The last state of each line a script reads: the text after the line's last carriage return. */
const lastOfEachLine = (s: string): string => s.split('\n').map((l) => l.slice(l.lastIndexOf('\r') + 1)).join('\n');

const cases: { name: string; args: string[]; seed?: () => string; last?: boolean }[] = [
  { name: 'first run, -hav --progress: created directory, list order, \\r ticks and to-chk=R/T', args: ['-hav', '--progress'] },
  { name: 're-run, -hav --progress: nothing to list', args: ['-hav', '--progress'], seed: () => full },
  { name: 'first run, -ai --progress', args: ['-ai', '--progress'] },
  { name: 're-run with -c, nothing changed: lists nothing', args: ['-avc'], seed: () => full },
  { name: '--stats: every line of rsync', args: ['-a', '--stats'] },
  { name: '-v --stats -h on a re-run', args: ['-hav', '--stats'], seed: () => full },
  { name: '--info=progress2 (the line as a script sees it last)', args: ['-a', '--info=progress2'], last: true },
  { name: '-n --delete lists what would go (deletions in the top folder)', args: ['-n', '-av', '--delete'], seed: () => extra },
  { name: '-n -i --delete', args: ['-n', '-ai', '--delete'], seed: () => extra },
  { name: '--delete -v', args: ['-av', '--delete'], seed: () => extra },
  { name: '--out-format with rsync\'s escapes', args: ['-a', '--out-format=%o|%n|%L|%i|%l|%f|%M|%U|%G|%B|%%|%-6l|%6l|%u|%h'] },
  { name: '--out-format on deletions', args: ['-a', '--delete', '--out-format=%o %n %i'], seed: () => extra },
  { name: '--info=name0 -v: no names, the summary', args: ['-v', '--info=name0', '-a'] },
  { name: '--info=stats0 -v: names, no summary', args: ['-av', '--info=stats0'] },
  { name: '--info=del0 -v --delete: no deletion lines', args: ['-av', '--delete', '--info=del0'], seed: () => extra },
  { name: '--info=name2: unchanged files say so', args: ['-a', '--info=name2'], seed: () => full },
  { name: '--info=stats2,flist0 -v', args: ['-av', '--info=stats2,flist0'] },
  // -q silences stdout whatever else asks for lines: -v, -i, --out-format, --info, --progress, --stats.
  { name: '-q with -v, -i, --info=name2,del,progress2 and --stats: nothing on stdout', args: ['-avq', '-i', '--info=name2,del,progress2', '--stats', '--delete'], seed: () => extra },
  { name: '-q with --out-format and --progress: nothing on stdout', args: ['-aq', '--out-format=%o %n', '--progress', '--delete'], seed: () => extra },
  { name: '-vv --debug=none: "is uptodate" names without their link target; an entry with only its attributes changed by its name', args: ['-avv', '--debug=none'], seed: () => touched },
  { name: '-ii: unchanged entries too, with spaces for their dots', args: ['-aii'], seed: () => touched },
  { name: '--out-format with %i and --info=name2: unchanged entries too', args: ['-a', '--out-format=%i|%n', '--info=name2'], seed: () => touched },
  { name: '-ii with an --out-format without %i: as -i', args: ['-aii', '--out-format=%n'], seed: () => touched },
];

describe.skipIf(!needTools('rsync'))('output as rsync prints it', () => {
  it.each(cases)('$name', async ({ name, args, seed, last }) => {
    const r = await runBoth(join(root, name.replace(/\W+/g, '_')), src, args, { seed: seed?.() });
    const shown = (o: { stdout: string }) => (last ? lastOfEachLine(o.stdout) : o.stdout);
    expect({ code: r.qsync.code, stdout: shown(r.qsync), stderr: r.qsync.stderr }).toEqual({ code: r.rsync.code, stdout: shown(r.rsync), stderr: r.rsync.stderr });
  });

  it('several operands: listed files first, then folders, each by name, as rsync sorts them', async () => {
    const r = await runBoth(join(root, 'operands'), src, ['-av', '--progress'], { operands: ['b', 'z.txt', 'a'].map((n) => join(src, n)) });
    expect({ code: r.qsync.code, stdout: r.qsync.stdout, stderr: r.qsync.stderr }).toEqual({ code: r.rsync.code, stdout: r.rsync.stdout, stderr: r.rsync.stderr });
  });

  it('--info=help: rsync\'s text, exit 0, whatever else is on the line', () => {
    for (const args of [['--info=help'], ['-av', '--info=name,help', 'x', 'y']]) {
      const r = spawnSync('rsync', args, { encoding: 'utf8' });
      const q = spawnSync('node', [QSYNC, ...args], { encoding: 'utf8' });
      expect({ code: q.status, stdout: q.stdout, stderr: q.stderr }).toEqual({ code: r.status, stdout: r.stdout, stderr: r.stderr });
    }
  });

  it('a progress line is \\r-updated when piped, and counts the whole list', async () => {
    const r = await runBoth(join(root, 'piped'), src, ['-a', '--progress']);
    expect(r.qsync.stdout).toMatch(/^b\/sub\/f2\n\r +20,000 100% RATE TIME {2}\r +20,000 100% RATE TIME \(xfr#7, to-chk=0\/11\)$/m);
    expect(r.qsync.stdout).toBe(r.rsync.stdout);
  });

  it('as a user who is not root, a re-run of -a over files of other owners says nothing of them', async () => {
    chmodSync(root, 0o755);
    const owned = join(root, 'owned');
    const { execFileSync } = await import('node:child_process');
    execFileSync('cp', ['-a', src, owned]);
    chownSync(join(owned, 'c.txt'), 1234, 4321);
    chownSync(join(owned, 'b'), 1234, 4321);
    execFileSync('chmod', ['-R', 'a+rX', owned]);
    const copy = join(root, 'owned-copy');
    await runBoth(join(root, 'owned-first'), owned, ['-a'], { nobody: true });
    execFileSync('cp', ['-a', join(root, 'owned-first/rsync/D'), copy]);
    chownSync(copy, NOBODY, NOBODY);
    const r = await runBoth(join(root, 'owned-again'), owned, ['-av'], { seed: copy, nobody: true });
    expect({ code: r.qsync.code, stdout: r.qsync.stdout, stderr: r.qsync.stderr }).toEqual({ code: r.rsync.code, stdout: r.rsync.stdout, stderr: r.rsync.stderr });
    expect(r.qsync.stdout).not.toMatch(/c\.txt|b\//);
  });

  it("the speedup of a run that changes nothing is of rsync's order, not the total size over one byte", async () => {
    const { src: one, dest } = await syncedImage('one-image', 1_000_000);
    const q = await runQsync(['-av', `${one}/`, `${dest}/`]);
    const r = spawnSync('rsync', ['-av', `${one}/`, `${dest}/`], { encoding: 'utf8' });
    const speedup = (out: string) => Number(/speedup is ([\d,.]+)/.exec(out)![1]!.replaceAll(',', ''));
    expect(speedup(q.stdout)).toBeGreaterThan(speedup(r.stdout) / 10);
    expect(speedup(q.stdout)).toBeLessThan(speedup(r.stdout) * 10);
  });

  it("qsync's own notices go to stderr, never to stdout", async () => {
    // A target changed behind qsync's back: qsync says it compares; rsync, which has no manifest, says nothing.
    const { src: big, dest } = await syncedImage('big', 300_000);
    utimesSync(join(dest, 'disk.img'), T_DEST, T_DEST);
    const q = await runQsync(['-a', `${big}/`, `${dest}/`]);
    expect(q.stdout).toBe('');
    expect(q.stderr).toMatch(/^qsync: .*comparing source and target\n$/);
    expect(q.code).toBe(0);
  });
});
