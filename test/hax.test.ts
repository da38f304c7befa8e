/**
 * `qsync -aHAX`, the most common backup line, against real `rsync -aHAX`
 * on the same tree: content, modes, owners, mtimes, hard-link structure
 * (which names share an inode), ACLs (getfacl), extended attributes
 * (getfattr) and the -i lines, after a first run, after changes (xattrs
 * removed and changed, ACLs changed and dropped, a link group split and
 * grown, a target linked into another group) and on a run with nothing to do.
 */
import { chmodSync, chownSync, linkSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AS_NOBODY, nobodyStateBase, runQsync } from './helpers/cli.js';
import { needTools } from './helpers/env.js';
import { ageDirs, entries, lines, makeTree, mutateTree, relinkTargets, sh, snapshot } from './helpers/hax-tree.js';

let root: string;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'qsync-hax-'));
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

const asRoot = process.getuid?.() === 0;

describe.skipIf(!needTools('rsync', 'getfattr', 'setfattr', 'getfacl', 'setfacl') || !asRoot)('qsync gives what rsync gives, with -H, -A, -X', () => {
  it.each(['-aHAX', '-aH', '-aA', '-aX'])('%s: first run, a run after changes, a run with nothing to do', async (flags) => {
    const base = join(root, `tree${flags}`);
    const src = join(base, 'src');
    mkdirSync(src, { recursive: true });
    makeTree(src);
    const rs = join(base, 'by-rsync');
    const qs = join(base, 'by-qsync');
    const expected: string[][] = [];
    // The target of `plain` is replaced behind qsync's back (round 1): it says so (and compares) rather than trust its manifest.
    const notice = 'qsync: target was replaced since the last run; comparing source and target';
    for (let round = 0; round < 3; round++) {
      if (round === 1) {
        mutateTree(src);
        for (const d of [rs, qs]) relinkTargets(d);
      }
      {
        // -n says the same and changes nothing (for a member whose old target is to be replaced by a link,
        // rsync -n also shows that old target's ACL and xattr differences, which its real run never does).
        const before = round === 0 ? undefined : snapshot(qs, { dirTimes: true });
        const dry = await runQsync([flags, '-n', '-i', `${src}/`, `${qs}/`]);
        expect(dry.code).toBe(0);
        expect(lines(dry.stdout), `round ${round} -n`).toEqual(lines(sh('rsync', flags, '-n', '-i', `${src}/`, `${rs}/`)));
        if (before) expect(snapshot(qs, { dirTimes: true })).toEqual(before);
        else expect(() => lstatSync(qs)).toThrow();
      }
      const r = sh('rsync', flags, '-i', `${src}/`, `${rs}/`);
      const q = await runQsync([flags, '-i', `${src}/`, `${qs}/`]);
      // qsync's own notice is on stderr (rsync's lines on stdout), and only where the target was replaced.
      expect(lines(q.stderr).filter((l) => !l.startsWith(notice)), `round ${round}`).toEqual([]);
      expect(lines(q.stderr).some((l) => l.startsWith(notice)), `round ${round}`).toBe(round === 1);
      expect(q.code).toBe(0);
      expect(lines(q.stdout), `round ${round}`).toEqual(lines(r));
      expected.push(lines(r));
      expect(snapshot(qs, { dirTimes: false }), `round ${round}`).toEqual(snapshot(rs, { dirTimes: false }));
      // Folder times: rsync may finish a hard link after it set its folder's time; qsync sets them again.
      const dirTimes = (d: string) => Object.fromEntries(entries(d).filter((e) => lstatSync(join(d, e)).isDirectory()).map((e) => [e, lstatSync(join(d, e), { bigint: true }).mtimeNs / 1000n]));
      expect(dirTimes(qs)).toEqual(dirTimes(src));
    }
    // What the rounds exercised, so that a silent rsync cannot make this test pass empty.
    if (flags.includes('H')) expect(expected[0]).toEqual(expect.arrayContaining(['hf+++++++++ a => sub/deep/x', 'hf+++++++++ z => sub/deep/x', 'hf+++++++++ b => c', 'hL+++++++++ sub/sl2 => sub/sl1']));
    if (flags.includes('A')) expect(expected[1]).toEqual(expect.arrayContaining(['.f.......a. shared/doc', '.d.......a. shared/']));
    if (flags.includes('X')) expect(expected[1]).toEqual(expect.arrayContaining(['.d........x sub/', '.L........x link -> plain']));
    expect(expected[2]).toEqual([]);
  });
});

describe.skipIf(!needTools('rsync', 'getfattr', 'setfattr', 'getfacl', 'setfacl', 'setpriv') || !asRoot)('-aHAX as an unprivileged user', () => {
  it('copies user.* attributes and ACLs, leaves security.* alone and fails on nothing, as rsync does', async () => {
    chmodSync(root, 0o711); // nobody passes through to its own folder
    const base = join(root, 'nobody');
    const src = join(base, 'src');
    mkdirSync(join(src, 'dir'), { recursive: true });
    writeFileSync(join(src, 'f'), 'f\n');
    linkSync(join(src, 'f'), join(src, 'dir/g'));
    sh('setfattr', '-n', 'user.mine', '-v', 'yes', join(src, 'f'));
    sh('setfattr', '-n', 'security.theirs', '-v', 'no', join(src, 'f'));
    sh('setfattr', '-n', 'trusted.theirs', '-v', 'no', join(src, 'f'));
    sh('setfacl', '-m', 'u:1234:r', join(src, 'f'));
    sh('setfacl', '-d', '-m', 'g:4321:rx', join(src, 'dir'));
    // A read-only folder whose files are links of each other: its target is made writable for a while.
    mkdirSync(join(src, 'ro'));
    writeFileSync(join(src, 'ro/x'), 'x\n');
    linkSync(join(src, 'ro/x'), join(src, 'ro/y'));
    // A read-only file and an (empty) read-only folder with user attributes: setting those needs write
    // permission, lent for the time of it. (With an attribute on `ro` too, rsync itself fails: exit 23.)
    sh('setfattr', '-n', 'user.on-ro', '-v', '1', join(src, 'ro/x'));
    chmodSync(join(src, 'ro/x'), 0o444);
    chmodSync(join(src, 'ro'), 0o555);
    mkdirSync(join(src, 'ro-empty'));
    sh('setfattr', '-n', 'user.on-ro-dir', '-v', '1', join(src, 'ro-empty'));
    chmodSync(join(src, 'ro-empty'), 0o555);
    ageDirs(src);
    sh('chown', '-R', '65534:65534', base);
    const rs = join(base, 'by-rsync');
    const qs = join(base, 'by-qsync');
    const nobody = (...cmd: string[]) => sh('setpriv', ...AS_NOBODY, 'env', `QSYNC_STATE_DIR=${nobodyStateBase()}`, ...cmd);
    const r = nobody('rsync', '-aHAX', '-i', `${src}/`, `${rs}/`);
    const q = nobody(process.execPath, join(import.meta.dirname, '../dist/src/cli/main.js'), '-aHAX', '-i', `${src}/`, `${qs}/`);
    expect(lines(q)).toEqual(lines(r));
    expect(snapshot(qs, { dirTimes: false })).toEqual(snapshot(rs, { dirTimes: false }));
    // rsync may finish a link after it set its folder's time; qsync sets it again.
    expect(lstatSync(join(qs, 'ro'), { bigint: true }).mtimeNs / 1000n).toBe(lstatSync(join(src, 'ro'), { bigint: true }).mtimeNs / 1000n);
    expect(sh('getfattr', '-d', '-m', '-', '--absolute-names', join(qs, 'f'))).not.toMatch(/theirs/);
    expect(lstatSync(join(qs, 'dir/g')).ino).toBe(lstatSync(join(qs, 'f')).ino);
  });
});

describe('-A/-X without the attr tools', () => {
  it('exit 1 with one message naming the package, before DEST is created', async () => {
    const bin = join(root, 'only-node');
    mkdirSync(bin);
    symlinkSync(process.execPath, join(bin, 'node'));
    const src = join(root, 'no-tools-src');
    mkdirSync(src);
    writeFileSync(join(src, 'f'), 'f');
    const dest = join(root, 'no-tools-dest');
    const r = await runQsync(['-aX', `${src}/`, `${dest}/`], { env: { ...process.env, PATH: bin } });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/getfattr is not installed: -A and -X need it \(package attr\)/);
    expect(() => lstatSync(dest)).toThrow();
  });
});

describe.skipIf(!needTools('getfattr', 'setfattr', 'getfacl', 'setfacl') || !asRoot)('attributes reach only the inode qsync checked', () => {
  it('a target swapped for another user\'s file after the check is refused, not given the source\'s ACL', async () => {
    const { ExtAttrs } = await import('../src/sync/ext-attrs.js');
    const { Dir } = await import('../src/io/safe-fs.js');
    const d = join(root, 'swap');
    mkdirSync(d);
    writeFileSync(join(d, 'src'), 's');
    chownSync(join(d, 'src'), 1234, 1234);
    sh('setfacl', '-m', 'u:1234:rw', join(d, 'src'));
    writeFileSync(join(d, 'dst'), 's');
    chownSync(join(d, 'dst'), 1234, 1234);
    writeFileSync(join(d, 'victim'), 'root only');
    chmodSync(join(d, 'victim'), 0o600);
    const ext = new ExtAttrs({ acls: true, xattrs: true, noWrite: false, owners: true });
    const dir = await Dir.open(d);
    try {
      const st = lstatSync(join(d, 'src'), { bigint: true });
      const pair = await ext.read({ dir, name: 'src', expect: st }, { dir, name: 'dst', expect: lstatSync(join(d, 'dst'), { bigint: true }) }, 'other');
      renameSync(join(d, 'victim'), join(d, 'dst')); // the swap, between qsync's check and its write
      await expect(pair.apply({ dir, name: 'dst', expect: st })).rejects.toThrow(/changed while qsync worked on it/);
      expect(sh('getfacl', '-p', '-n', join(d, 'dst'))).not.toMatch(/user:1234/);
    } finally {
      await dir.close();
    }
  });
});

describe.skipIf(!needTools('rsync'))('-H with --existing, --ignore-existing, --update', () => {
  it.each(['--existing', '--ignore-existing', '--update'])('%s: the members it leaves alone are out of the group, as in rsync', async (opt) => {
    const base = join(root, `skip${opt}`);
    const src = join(base, 'src');
    mkdirSync(src, { recursive: true });
    writeFileSync(join(src, 'a'), 'new\n');
    linkSync(join(src, 'a'), join(src, 'b'));
    linkSync(join(src, 'a'), join(src, 'c'));
    utimesSync(join(src, 'a'), new Date('2024-01-01T00:00:00Z'), new Date('2024-01-01T00:00:00Z'));
    ageDirs(src);
    const outs: string[][] = [];
    for (const d of ['by-rsync', 'by-qsync']) {
      mkdirSync(join(base, d));
      writeFileSync(join(base, d, 'b'), 'old, and newer than the source\n');
      utimesSync(join(base, d, 'b'), new Date('2025-06-01T00:00:00Z'), new Date('2025-06-01T00:00:00Z'));
      ageDirs(join(base, d));
    }
    outs.push(lines(sh('rsync', '-aH', '-i', opt, `${src}/`, `${join(base, 'by-rsync')}/`)));
    const q = await runQsync(['-aH', '-i', opt, `${src}/`, `${join(base, 'by-qsync')}/`]);
    expect(q.code).toBe(0);
    outs.push(lines(q.stdout));
    expect(outs[1]).toEqual(outs[0]);
    const opts = { dirTimes: false };
    expect(snapshot(join(base, 'by-qsync'), opts)).toEqual(snapshot(join(base, 'by-rsync'), opts));
  });
});

describe.skipIf(!needTools('rsync'))('-H next to a cp -al snapshot of the destination', () => {
  it('a changed group gets new data in DEST; the snapshot keeps the old, as with rsync', async () => {
    const base = join(root, 'snapshot');
    const src = join(base, 'src');
    mkdirSync(join(src, 'd'), { recursive: true });
    writeFileSync(join(src, 'a'), 'version 1\n');
    linkSync(join(src, 'a'), join(src, 'd/b'));
    ageDirs(src);
    const outs: string[][] = [];
    for (const who of ['rsync', 'qsync']) {
      const dest = join(base, `by-${who}`);
      const run = async () =>
        who === 'rsync' ? sh('rsync', '-aH', '-i', `${src}/`, `${dest}/`) : (await runQsync(['-aH', '-i', `${src}/`, `${dest}/`])).stdout;
      await run();
      sh('cp', '-al', dest, join(base, `snap-${who}`));
      writeFileSync(join(src, 'a'), 'version 2, longer\n');
      utimesSync(join(src, 'a'), new Date('2025-05-05T00:00:00Z'), new Date('2025-05-05T00:00:00Z'));
      ageDirs(src);
      outs.push(lines(await run()));
      expect(readFileSync(join(base, `snap-${who}`, 'a'), 'utf8')).toBe('version 1\n');
      expect(readFileSync(join(base, `snap-${who}`, 'd/b'), 'utf8')).toBe('version 1\n');
      expect(readFileSync(join(dest, 'd/b'), 'utf8')).toBe('version 2, longer\n');
      expect(lstatSync(join(dest, 'd/b')).ino).toBe(lstatSync(join(dest, 'a')).ino);
      writeFileSync(join(src, 'a'), 'version 1\n'); // back, for the next tool
    }
    expect(outs[1]).toEqual(outs[0]);
  });
});
