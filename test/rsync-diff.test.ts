/**
 * Differential tests against real rsync: the same tree synced by `rsync`
 * and by `qsync` with the same flags gives the same result (types, content,
 * modes, mtimes, owners, link targets), after a first run and after changes.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { chmodSync, chownSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, symlinkSync, unlinkSync, utimesSync, writeFileSync, lutimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QSYNC, runQsync } from './helpers/cli.js';
import { ageAll, dirTimes, joinB, runRsync, sh, snapshot, sortedLines, T_DEST, T_SRC } from './helpers/rsync-compare.js';
import { needTools } from './helpers/env.js';
import { randomFile } from './helpers/data.js';

let root: string;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'qsync-rsync-'));
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

function makeTree(src: string): void {
  mkdirSync(join(src, 'vms/old'), { recursive: true });
  mkdirSync(join(src, 'cache/tmp'), { recursive: true });
  mkdirSync(join(src, 'empty'));
  randomFile(join(src, 'vms/a.img'), 3 * 1024 * 1024 + 17);
  randomFile(join(src, 'vms/old/b.img'), 200 * 1024);
  writeFileSync(join(src, 'README'), 'images\n');
  writeFileSync(join(src, 'zero-length'), '');
  writeFileSync(join(src, 'cache/tmp/scratch.tmp'), 'scratch');
  writeFileSync(join(src, 'cache/keep.dat'), 'keep');
  writeFileSync(join(src, 'secret.key'), 'k');
  chmodSync(join(src, 'secret.key'), 0o600);
  chmodSync(join(src, 'vms/old'), 0o750);
  writeFileSync(join(src, 'run.sh'), '#!/bin/sh\n');
  chmodSync(join(src, 'run.sh'), 0o755);
  chownSync(join(src, 'README'), 1234, 4321);
  symlinkSync('vms/a.img', join(src, 'current'));
  symlinkSync('/nonexistent/target', join(src, 'dangling'));
  execFileSync('mkfifo', [join(src, 'fifo')]);
  const old = new Date('2024-03-01T12:00:00.123456Z');
  utimesSync(join(src, 'vms/old/b.img'), old, old);
  lutimesSync(join(src, 'dangling'), old, old);
  utimesSync(join(src, 'fifo'), old, old);
  ageDirs(src);
}

function mutateTree(src: string): void {
  const fd = execFileSync('sh', ['-c', `printf 'XXXX' | dd of=${join(src, 'vms/a.img')} bs=1 seek=70000 conv=notrunc status=none`]);
  void fd;
  unlinkSync(join(src, 'README'));
  writeFileSync(join(src, 'vms/new.img'), 'new image');
  rmSync(join(src, 'vms/old'), { recursive: true });
  chmodSync(join(src, 'run.sh'), 0o700);
  unlinkSync(join(src, 'current'));
  symlinkSync('vms/new.img', join(src, 'current'));
  const t = new Date(Date.now() + 5000);
  utimesSync(join(src, 'vms/a.img'), t, t);
  ageDirs(src);
}

/**
 * Give every source directory a time in the past: rsync leaves a directory's
 * time alone when it falls in the same second as the copy's, which would
 * make the comparison depend on the clock.
 */
function ageDirs(dir: string, when = new Date('2025-01-02T03:04:05.678901Z')): void {
  for (const e of readdirSync(dir, { withFileTypes: true })) if (e.isDirectory()) ageDirs(join(dir, e.name), when);
  utimesSync(dir, when, when);
}

const cases: { name: string; flags: string[]; slash: boolean }[] = [
  { name: '-a', flags: ['-a'], slash: true },
  { name: '-a --delete', flags: ['-a', '--delete'], slash: true },
  { name: '-a --delete --exclude', flags: ['-a', '--delete', '--exclude=*.tmp', '--exclude', '/cache/keep.dat'], slash: true },
  { name: '-a without trailing slash (copies the folder itself)', flags: ['-a', '--delete'], slash: false },
  { name: '-rlt (no perms, owners or devices)', flags: ['-rlt'], slash: true },
  { name: '-a --include/--exclude ordering', flags: ['-a', '--include=vms/', '--include=vms/***', '--exclude=*'], slash: true },
];

describe.skipIf(!needTools('rsync'))('same results as rsync', () => {
  it.each(cases)('$name: first run and a run after changes', async ({ name, flags, slash }) => {
    const base = join(root, name.replace(/\W+/g, '_'));
    const src = join(base, 'src');
    mkdirSync(src, { recursive: true });
    makeTree(src);
    const rs = join(base, 'by-rsync');
    const qs = join(base, 'by-qsync');
    const operand = slash ? `${src}/` : src;
    for (let round = 0; round < 2; round++) {
      if (round === 1) mutateTree(src);
      execFileSync('rsync', [...flags, operand, `${rs}/`]);
      const r = await runQsync([...flags, operand, `${qs}/`]);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      expect(snapshot(qs)).toEqual(snapshot(rs));
      expect(dirTimes(qs)).toEqual(dirTimes(rs));
    }
  });
});

describe.skipIf(!needTools('rsync'))('an operand that is a symlink to a folder', () => {
  it('with a trailing slash, its folder is followed and copied, as rsync does', async () => {
    const base = join(root, 'link-operand');
    mkdirSync(join(base, 'real'), { recursive: true });
    randomFile(join(base, 'real', 'disk.img'), 100_000);
    symlinkSync('real', join(base, 'link'));
    execFileSync('rsync', ['-a', `${join(base, 'link')}/`, `${join(base, 'by-rsync')}/`]);
    const r = await runQsync(['-a', `${join(base, 'link')}/`, `${join(base, 'by-qsync')}/`]);
    expect(r.code, r.stderr).toBe(0);
    expect(snapshot(join(base, 'by-qsync'))).toEqual(snapshot(join(base, 'by-rsync')));
    expect(Object.keys(snapshot(join(base, 'by-qsync')))).toEqual(['disk.img']);
  });
});

/**
 * One differential case: `setup` builds the source and the destination's
 * starting state; rsync and qsync each get an identical copy of that
 * destination (cp -a) and run with the same flags, `rounds` times. After
 * each run: same tree (types, content, modes, owners, µs mtimes, link
 * targets, device numbers), same exit code, same stdout lines (sorted:
 * rsync prints a file's line when its data is sent, after the folders and
 * links around it), and stderr empty for both or for neither. Times are
 * set whole seconds apart: rsync compares times to the second, qsync to
 * the microsecond (it never takes a same-size change in the same second
 * for no change), so a sub-second difference is not one of these cases.
 */
interface DiffCase {
  name: string;
  flags: string[];
  setup(src: string, dest: string): void;
  /** Run both as nobody (uid 65534), over trees nobody owns. */
  nobody?: boolean;
  rounds?: number;
  /** With `nobody`: paths in DEST's starting state that stay root's. */
  rootOwned?: string[];
  /** DEST is this path inside the destination copy (a symlink to a folder, say), not the copy itself. */
  destSub?: string;
  /** DEST does not exist before the first run. */
  fresh?: boolean;
  /** Anything else to compare, given the two destinations. */
  check?(byRsync: string, byQsync: string): void;
}

/** A tree with names that are not UTF-8 (bytes 0xff, 0xfe, a lone 0xc3), a newline and a `\#` in names. */
function oddNames(src: string): void {
  const s = Buffer.from(src);
  writeFileSync(joinB(s, Buffer.from('bad\xffname', 'latin1')), 'one');
  mkdirSync(joinB(s, Buffer.from('dir\xfe', 'latin1')));
  writeFileSync(joinB(s, Buffer.from('dir\xfe', 'latin1'), Buffer.from('in\xc3', 'latin1')), 'two');
  writeFileSync(join(src, 'nl\nx'), 'three');
  writeFileSync(join(src, 'back\\#123'), 'four');
  writeFileSync(join(src, 'caf\u00e9'), 'five');
  symlinkSync(Buffer.from('to\xff', 'latin1'), joinB(s, Buffer.from('link\xfd', 'latin1')));
}

const diffCases: DiffCase[] = [
  {
    name: '--delete --exclude=*.tmp: an extraneous folder holding excluded files stays',
    flags: ['-a', '--delete', '-i', '--exclude=*.tmp'],
    setup: (src, dest) => sh('touch f; cd "$D"; mkdir -p extra/deep gone/x mixed a/b/c a/b2 a/e; touch extra/x.tmp extra/deep/z.tmp gone/x/y mixed/m.img mixed/n.txt a/b/c/x.tmp a/b2/y.tmp a/b/w a/e/ok top.tmp', src, dest),
  },
  {
    name: '--delete --exclude=/old/sub/: an excluded folder keeps its extraneous parent',
    flags: ['-a', '--delete', '-i', '--exclude=/old/sub/'],
    setup: (src, dest) => sh('touch f; cd "$D"; mkdir -p old/sub other; touch old/sub/y old/z other/w', src, dest),
  },
  {
    name: "--delete --include='*.img' --include='*/' --exclude='*': only the images and empty folders go",
    flags: ['-a', '--delete', '-i', '--include=*.img', '--include=*/', '--exclude=*'],
    setup: (src, dest) => sh('mkdir vms; touch vms/a.img; cd "$D"; mkdir -p old/sub imgs mixed empty; touch old/sub/y imgs/q.img mixed/m.img mixed/n.txt notes.txt', src, dest),
  },
  {
    name: '-rt (no -p): new entries lose setuid, setgid and sticky and get the umask; existing ones keep their mode',
    flags: ['-rt', '-i'],
    setup: (src, dest) =>
      sh('touch su sg st keep; chmod 4755 su; chmod 2775 sg; chmod 1757 st; chmod 4777 keep; mkdir dsg dst; chmod 2777 dsg; chmod 1777 dst; touch dsg/x; chmod 6711 dsg/x; cd "$D"; touch keep; chmod 640 keep; mkdir -p sgparent', src, dest),
  },
  {
    name: '-a with setuid, setgid and sticky entries of another owner: kept',
    flags: ['-a', '-i'],
    setup: (src, dest) =>
      sh('touch su sg; chown 1234:4321 su sg; chmod 4755 su; chmod 2750 sg; mkdir dst; chmod 1777 dst; chown 1234 dst; cd "$D"; touch su; chmod 755 su', src, dest),
  },
  {
    name: 'names that are not UTF-8: copied, deleted and printed escaped',
    flags: ['-a', '--delete', '-i'],
    setup: (src, dest) => {
      oddNames(src);
      writeFileSync(joinB(dest, Buffer.from('old\xff', 'latin1')), 'x');
      mkdirSync(joinB(dest, Buffer.from('olddir\xff', 'latin1')));
      writeFileSync(joinB(dest, Buffer.from('olddir\xff', 'latin1'), Buffer.from('in\xfe', 'latin1')), 'y');
    },
  },
  {
    name: 'names that differ only in bytes that are not UTF-8 (and a %): a second run finds nothing to do',
    flags: ['-a', '-i'],
    rounds: 2,
    setup: (src) => {
      for (const n of ['a\xff', 'a\xfe', 'a%FF', 'a%25']) writeFileSync(joinB(src, Buffer.from(n, 'latin1')), n);
    },
  },
  {
    name: '255-byte names (folder, link, deleted file)',
    flags: ['-a', '--delete', '-i'],
    setup: (src, dest) => {
      mkdirSync(join(src, 'd'.repeat(255)));
      writeFileSync(join(src, 'd'.repeat(255), 'f'), 'data');
      symlinkSync('t'.repeat(255), join(src, 'l'.repeat(255)));
      writeFileSync(join(dest, 'x'.repeat(255)), 'old');
    },
  },
  {
    name: '255-byte file names (their manifests are named by hash), also on the next run',
    flags: ['-a', '-i'],
    rounds: 2,
    setup: (src) => writeFileSync(join(src, 'f'.repeat(255)), 'data'),
  },
  {
    name: '--size-only with a differing mtime: the time is set, once',
    flags: ['-a', '--size-only', '-i'],
    rounds: 2,
    setup: (src, dest) => sh('echo abc > f; echo xyz > "$D/f"', src, dest),
  },
  {
    name: '-D: devices, fifos and sockets recreated with their times',
    flags: ['-a', '-i'],
    rounds: 2,
    setup: (src, dest) => {
      sh('mkfifo fifo; mknod null c 1 3; mknod loop b 7 200; chmod 600 loop; chown 1234:4321 null', src, dest);
      execFileSync('python3', ['-c', 'import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])', join(src, 'sock')]);
      chmodSync(join(src, 'sock'), 0o640);
      sh('mkfifo "$D/null"; mknod "$D/loop" b 7 201', src, dest);
    },
  },
  {
    name: '--delete: type changes in both directions (dir ↔ file ↔ link)',
    flags: ['-a', '--delete', '-i'],
    rounds: 2,
    setup: (src, dest) =>
      sh(
        'touch wasdir; ln -s x wasdir2; mkdir wasfile waslink; touch wasfile/in; ln -s y wasfile2; echo data > waslink2;' +
          'cd "$D"; mkdir -p wasdir/sub wasdir2/q; touch wasdir/sub/a wasdir/b wasdir2/q/r wasfile wasfile2; ln -s z waslink; ln -s w waslink2',
        src,
        dest,
      ),
  },
  {
    name: 'without --delete: a folder in the way of a file stays (exit 23), a file or link in the way of a folder goes',
    flags: ['-a', '-i'],
    rounds: 2,
    setup: (src, dest) => sh('touch wasdir wasemptydir; mkdir wasfile waslink; cd "$D"; mkdir -p wasdir/sub wasemptydir; touch wasdir/sub/a wasfile; ln -s x waslink', src, dest),
  },
  {
    name: '--delete: a folder in the way holding an excluded file stays (exit 23)',
    flags: ['-a', '--delete', '-i', '--exclude=*.tmp'],
    setup: (src, dest) => sh('touch wasdir; cd "$D"; mkdir -p wasdir/in; touch wasdir/in/k.tmp wasdir/b', src, dest),
  },
  {
    name: 'a symlink to a folder deep in DEST, where the source has a folder: replaced by a folder, its target untouched',
    flags: ['-a', '--delete', '-i'],
    setup: (src, dest) =>
      sh('mkdir -p a/b/c; echo x > a/b/c/f; cd "$D"; mkdir -p a/b elsewhere; echo keep > elsewhere/f; echo keep2 > elsewhere/g; ln -s ../../elsewhere a/b/c; ln -s elsewhere gone', src, dest),
  },
  {
    name: 'modes of existing entries under -a, and a dry run with deletions changing nothing',
    flags: ['-a', '--delete', '-n', '-i'],
    setup: (src, dest) => sh('echo a > f; chmod 600 f; mkdir d; chmod 700 d; cd "$D"; echo a > f; mkdir -p d x/y; touch x/y/z', src, dest),
  },
  {
    name: '-S: blocks of an existing target that became zero are holes, not written zeros',
    flags: ['-aS', '-i'],
    setup: (src, dest) => {
      randomFile(join(src, 'disk.img'), 2 << 20);
      execFileSync('cp', [join(src, 'disk.img'), join(dest, 'disk.img')]);
      sh('dd if=/dev/zero of=disk.img bs=64K seek=4 count=16 conv=notrunc status=none', src, dest);
    },
    check: (rs, qs) => {
      const used = (d: string) => lstatSync(join(d, 'disk.img')).blocks * 512;
      expect(used(rs)).toBeLessThanOrEqual(1 << 20);
      expect(used(qs)).toBeLessThanOrEqual(used(rs));
    },
  },
  {
    name: 'a DEST that does not exist yet, with -v',
    flags: ['-a', '-v', '--exclude=*.tmp'],
    fresh: true,
    setup: (src, dest) => sh('mkdir d; touch d/f x.tmp', src, dest),
  },
  {
    name: 'without --delete: a file and a link trade places with each other and with a folder',
    flags: ['-a', '-i'],
    rounds: 2,
    setup: (src, dest) => sh('ln -s t wasfile; echo data > waslink; mkdir wasempty; cd "$D"; touch wasfile; ln -s u waslink; touch wasempty', src, dest),
  },
  {
    name: '-rlt: devices, fifos and sockets skipped as rsync skips them',
    flags: ['-rlt', '-v'],
    setup: (src, dest) => {
      sh('mkfifo fifo; mknod null c 1 3; touch f', src, dest);
      execFileSync('python3', ['-c', 'import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])', join(src, 'sock')]);
    },
  },
  {
    name: 'nobody: an unreadable file and folder in the source: the rest copied, exit 23',
    flags: ['-a', '-i'],
    nobody: true,
    setup: (src, dest) => sh('echo a > f; mkdir d; echo b > d/g; touch ok; chmod 000 f d', src, dest),
  },
  {
    name: '--existing: nothing new is made (files, folders, links, nothing below a new folder); a type change still fails',
    flags: ['-a', '-i', '--existing'],
    setup: (src, dest) => sh('touch wasdir new; mkdir -p newdir d/e; touch newdir/x d/e/f; ln -s a l; ln -s x nl; cd "$D"; mkdir -p wasdir/s d; touch wasdir/s/a; ln -s b l', src, dest),
  },
  {
    // Not here: a source folder over a DEST file. Both leave the file and exit 23, but rsync then gives
    // the file the folder's time, which --ignore-existing should not do; qsync leaves it alone.
    name: '--ignore-existing --delete: entries of another type are left alone',
    flags: ['-a', '-i', '--ignore-existing', '--delete'],
    setup: (src, dest) =>
      sh('touch wasdir; mkdir newdir; touch newdir/x new; echo x > same; ln -s a l; mkfifo p; cd "$D"; mkdir -p wasdir/s; touch wasdir/s/a; echo yy > same; ln -s b l; touch p', src, dest),
  },
  {
    name: 'nobody: updates inside read-only folders and of read-only files nobody owns (-a, then -rt)',
    flags: ['-a', '-i', '--delete'],
    nobody: true,
    setup: (src, dest) =>
      sh('mkdir -p ro/sub; echo x > ro/sub/f; echo y2 > ro/g; chmod 555 ro/sub ro; chmod 444 ro/g; cd "$D"; mkdir -p ro/sub; echo x > ro/g; touch ro/sub/old; chmod 555 ro/sub ro; chmod 444 ro/g', src, dest),
  },
  {
    name: 'nobody: -rt into read-only folders nobody owns: their modes stay',
    flags: ['-rt', '-i', '--delete'],
    nobody: true,
    setup: (src, dest) => sh('mkdir -p ro/sub; echo x > ro/sub/f; echo y2 > ro/g; cd "$D"; mkdir -p ro/sub; echo x > ro/g; chmod 555 ro/sub ro; chmod 444 ro/g', src, dest),
  },
  {
    name: 'DEST a symlink to a folder: written through it, the link kept',
    flags: ['-a', '-i', '--delete'],
    destSub: 'backup',
    setup: (src, dest) => sh('mkdir -p vm; echo disk > vm/a.img; cd "$D"; mkdir -p mnt/real/old; touch mnt/real/old/x; ln -s mnt/real backup', src, dest),
  },
  {
    name: '-v: deletions, type changes, excluded names kept, a link to a name that is not UTF-8 (and its length in the total size)',
    flags: ['-a', '-v', '--delete', '--exclude=*.tmp'],
    setup: (src, dest) => {
      sh('touch wasdir; mkdir wasfile keep; touch wasfile/in; cd "$D"; mkdir -p wasdir/s gone/g keep; touch wasdir/s/a wasfile gone/g/h keep/x.tmp', src, dest);
      symlinkSync(Buffer.from('t\xfe', 'latin1'), join(src, 'l'));
    },
  },
  {
    name: '-rt: a new folder in a setgid folder keeps the setgid bit the kernel gives it; new files do not get one',
    flags: ['-rt', '-i'],
    setup: (src, dest) => sh('mkdir -p a/b; touch a/b/f; chmod 2755 a; cd "$D"; mkdir a; chmod 2775 a', src, dest),
  },
  {
    name: '-n without --delete: a folder in the way of a file is reported as it would be (exit 23), nothing changes',
    flags: ['-a', '-n', '-i'],
    setup: (src, dest) => sh('touch wasdir wasempty; mkdir wasfile; cd "$D"; mkdir -p wasdir/s wasempty; touch wasdir/s/a wasfile', src, dest),
  },
  {
    name: 'nobody: --delete of extraneous folders holding files of root: kept, exit 23',
    flags: ['-a', '-i', '--delete'],
    nobody: true,
    rootOwned: ['rdir', 'ndir/rsub'],
    setup: (src, dest) => sh('touch f; cd "$D"; mkdir -p rdir ndir/rsub; touch rdir/x ndir/y ndir/rsub/z', src, dest),
  },
  {
    name: '-c: same data with another mtime is not sent, only its time set',
    flags: ['-a', '-i', '-c'],
    setup: (src, dest) => sh('echo abc > f; echo same > g; echo x > h; cd "$D"; echo xyz > f; echo same > g; echo xy > h', src, dest),
  },
  {
    name: '-v names folders that changed, but files, links and devices only when made or sent',
    flags: ['-a', '-v', '--size-only'],
    setup: (src, dest) =>
      sh('echo abc > f; echo s > g; chmod 600 g; ln -s a l; ln -s x l2; mkdir d; mknod n c 1 3; cd "$D"; echo xyz > f; echo s > g; ln -s a l; mkdir d; chmod 700 d; ln -s y l2; mknod n c 1 3; chmod 600 n', src, dest),
  },
  {
    name: 'nobody: -a over a tree nobody owns (files, links, fifo, socket, special bits)',
    flags: ['-a', '--delete', '-i'],
    nobody: true,
    rounds: 2,
    setup: (src, dest) => {
      sh('echo a > f; touch su; chmod 4755 su; mkdir d; chmod 2755 d; ln -s f l; mkfifo p; cd "$D"; mkdir -p gone/x; touch gone/x/y', src, dest);
      execFileSync('python3', ['-c', 'import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])', join(src, 'sock')]);
    },
  },
  {
    name: 'nobody: -rt with special bits, and names that are not UTF-8',
    flags: ['-rt', '-i'],
    nobody: true,
    setup: (src, dest) => {
      sh('touch sg; chmod 2775 sg; mkdir dst; chmod 1777 dst', src, dest);
      oddNames(src);
    },
  },
  {
    name: 'a source with a .qsync folder of its own (a copy of a backup): copied and deleted like any folder',
    flags: ['-a', '--delete', '-i'],
    setup: (src, dest) =>
      sh('mkdir -p .qsync/manifests/sub .qsync/image; echo m > .qsync/manifests/sub/f.qsm; echo l > .qsync/lock; echo i > .qsync/image/vda.json; chmod 700 .qsync; cd "$D"; mkdir -p .qsync/manifests/gone; touch .qsync/manifests/gone/x.qsm .qsync/old', src, dest),
  },
  {
    name: '`diff -r SRC DEST` finds nothing after a first and a second sync, as after rsync',
    flags: ['-a', '-i'],
    rounds: 2,
    fresh: true,
    setup: (src) => sh('mkdir -p a/b; echo 1 > a/b/f; echo 2 > top; ln -s a/b/f link', src, src),
    check: (rs, qs) => {
      const src = join(qs, '..', 'src');
      for (const d of [rs, qs]) expect(spawnSync('diff', ['-r', '--no-dereference', src, d], { encoding: 'utf8' }).stdout).toBe('');
    },
  },
  {
    name: 'nobody: --delete with excludes and type changes',
    flags: ['-a', '--delete', '-i', '--exclude=*.tmp'],
    nobody: true,
    setup: (src, dest) => sh('touch wasdir; mkdir wasfile; cd "$D"; mkdir -p wasdir/s extra; touch wasdir/s/a extra/x.tmp wasfile', src, dest),
  },
  {
    name: 'nobody: --delete of an extraneous read-only folder nobody owns',
    flags: ['-a', '--delete', '-i'],
    nobody: true,
    setup: (src, dest) => sh('touch f; cd "$D"; mkdir -p ro/sub; touch ro/sub/a ro/b; chmod 555 ro/sub ro', src, dest),
  },
];

describe.skipIf(!needTools('rsync', 'setpriv', 'python3'))('same results as rsync, case by case', () => {
  beforeAll(() => chmodSync(root, 0o755));

  const run = async ({ name, flags, setup, nobody = false, rounds = 1, fresh = false, destSub, rootOwned = [], check }: DiffCase) => {
    const base = join(root, name.replace(/\W+/g, '_').slice(0, 80));
    const src = join(base, 'src');
    const init = join(base, 'init');
    mkdirSync(src, { recursive: true });
    mkdirSync(init);
    setup(src, init);
    ageAll(src, T_SRC);
    ageAll(init, T_DEST);
    if (nobody) execFileSync('chown', ['-R', '65534:65534', base]);
    for (const p of rootOwned) execFileSync('chown', ['-R', '0:0', join(init, p)]);
    const rs = join(base, 'by-rsync');
    const qs = join(base, 'by-qsync');
    if (!fresh) execFileSync('cp', ['-a', init, rs]);
    if (!fresh) execFileSync('cp', ['-a', init, qs]);
    for (let round = 0; round < rounds; round++) {
      const r = runRsync([...flags, `${src}/`, destSub ? `${rs}/${destSub}/` : `${rs}/`], nobody);
      const q = await runQsync([...flags, `${src}/`, destSub ? `${qs}/${destSub}/` : `${qs}/`], { asNobody: nobody });
      const qOut = Buffer.from(q.stdout).toString('latin1').replaceAll(qs, 'DEST');
      expect({ round, code: q.code, stdout: sortedLines(qOut) }, q.stderr).toEqual({ round, code: r.code, stdout: sortedLines(r.stdout.replaceAll(rs, 'DEST')) });
      expect(q.stderr === '', `rsync: ${r.stderr}\nqsync: ${q.stderr}`).toBe(r.stderr === '');
      expect(snapshot(qs)).toEqual(snapshot(rs));
      expect(dirTimes(qs)).toEqual(dirTimes(rs));
      check?.(rs, qs);
    }
  };
  // One `it` per case (not it.each, whose titles are cut at 40 characters).
  for (const c of diffCases) it(c.name, () => run(c));
});

describe.skipIf(!needTools('rsync'))('a source file that vanishes between the listing and its read', () => {
  /**
   * `disk.img` (sparse, large enough to take a while) comes first; once the
   * tool has it open, `later` and the folder `sub` are removed: both were
   * listed, neither can be read.
   */
  async function runWithVanish(src: string, start: () => { pid: number; done: Promise<{ code: number | null; stdout: string; stderr: string }> }) {
    writeFileSync(join(src, 'later'), 'x');
    mkdirSync(join(src, 'sub'), { recursive: true });
    writeFileSync(join(src, 'sub', 'x'), 'y');
    const { pid, done } = start();
    const img = join(src, 'disk.img');
    let seen = false;
    for (let i = 0; i < 5000 && !seen; i++) {
      try {
        seen = readdirSync(`/proc/${pid}/fd`).some((fd) => {
          try {
            return readlinkSync(`/proc/${pid}/fd/${fd}`) === img;
          } catch {
            return false;
          }
        });
      } catch {
        break; // the process is gone
      }
      if (!seen) await new Promise((r) => setTimeout(r, 2));
    }
    rmSync(join(src, 'later'));
    rmSync(join(src, 'sub'), { recursive: true });
    const r = await done;
    expect(seen, 'the tool had disk.img open before the removal').toBe(true);
    return r;
  }

  it('is skipped with "file has vanished", exit 24, the rest copied', async () => {
    const base = join(root, 'vanish');
    const src = join(base, 'src');
    mkdirSync(src, { recursive: true });
    execFileSync('truncate', ['-s', '768M', join(src, 'disk.img')]);
    const rs = join(base, 'by-rsync');
    const qs = join(base, 'by-qsync');
    const r = await runWithVanish(src, () => {
      const p = spawn('rsync', ['-aS', `${src}/`, `${rs}/`], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      p.stdout.on('data', (d) => (stdout += d));
      p.stderr.on('data', (d) => (stderr += d));
      return { pid: p.pid!, done: new Promise((ok) => p.on('close', (code) => ok({ code, stdout, stderr }))) };
    });
    let qpid = 0;
    let qdone!: Promise<{ code: number | null; stdout: string; stderr: string }>;
    const q = await runWithVanish(src, () => {
      qdone = runQsync(['-aS', `${src}/`, `${qs}/`], { onSpawn: (pid) => (qpid = pid) });
      return { pid: qpid, done: qdone };
    });
    expect(r.code).toBe(24);
    expect(q.code, q.stderr).toBe(24);
    expect(r.stderr).toMatch(/file has vanished: .*later/);
    expect(q.stderr).toMatch(/file has vanished: .*later/);
    expect(q.stdout).toBe(r.stdout);
    // The image (all zeros) is compared by size; the rest entry by entry.
    for (const d of [rs, qs]) {
      expect(lstatSync(join(d, 'disk.img')).size).toBe(768 << 20);
      rmSync(join(d, 'disk.img'));
    }
    expect(snapshot(qs)).toEqual(snapshot(rs));
    expect(dirTimes(qs)).toEqual(dirTimes(rs));
  }, 120_000);
});

describe.skipIf(!needTools('rsync'))('operands and patterns that are not UTF-8', () => {
  it('a source folder named with byte 0xff, an --exclude naming byte 0xfe: as rsync', () => {
    const base = join(root, 'raw-args');
    const src = joinB(base, Buffer.from('src\xff', 'latin1'));
    mkdirSync(joinB(src, 'in'), { recursive: true });
    writeFileSync(joinB(src, 'in', 'kept'), 'k');
    writeFileSync(joinB(src, Buffer.from('skip\xfe', 'latin1')), 's');
    ageAll(base, T_SRC);
    // Node passes arguments as UTF-8: bash makes the raw bytes from $'\xff'.
    const run = (tool: string, dest: string) => {
      const r = spawnSync('bash', ['-c', `${tool} -ai --exclude=$'skip\\xfe' $'src\\xff' ${dest}/`], { cwd: base, encoding: 'latin1', env: { ...process.env, QSYNC } });
      return { code: r.status, stdout: sortedLines(r.stdout), stderr: r.stderr };
    };
    const r = run('rsync', 'by-rsync');
    const q = run('node "$QSYNC"', 'by-qsync');
    expect(q.stderr).toBe('');
    expect({ code: q.code, stdout: q.stdout.map((l) => l.replace('by-qsync', 'DEST')) }).toEqual({ code: r.code, stdout: r.stdout.map((l) => l.replace('by-rsync', 'DEST')) });
    expect(snapshot(join(base, 'by-qsync'))).toEqual(snapshot(join(base, 'by-rsync')));
    expect(Object.keys(snapshot(join(base, 'by-qsync')))).toEqual(['src\xff', 'src\xff/in', 'src\xff/in/kept']);
  });
});

describe.skipIf(!needTools('rsync'))('DEST holds the mirror and nothing else', () => {
  it('one file copied to a file DEST leaves nothing beside it, first run and update, as rsync', async () => {
    const base = join(root, 'single-file');
    mkdirSync(join(base, 'by-rsync'), { recursive: true });
    mkdirSync(join(base, 'by-qsync'));
    const img = join(base, 'disk.img');
    randomFile(img, 3 << 16);
    for (let round = 0; round < 2; round++) {
      expect(runRsync(['-a', img, join(base, 'by-rsync', 'copy.img')], false).code).toBe(0);
      const q = await runQsync(['-a', img, join(base, 'by-qsync', 'copy.img')]);
      expect(q.code, q.stderr).toBe(0);
      expect(readdirSync(join(base, 'by-qsync'))).toEqual(readdirSync(join(base, 'by-rsync')));
      expect(readFileSync(join(base, 'by-qsync', 'copy.img')).equals(readFileSync(img))).toBe(true);
      writeFileSync(img, 'changed', { flag: 'r+' });
    }
  });
});
