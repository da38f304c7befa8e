/**
 * A target with other hard links (a `cp -al` snapshot) is copied before it
 * is updated; on a file system that shares extents (XFS with reflink, a real
 * loop-mounted one here) the copy is a reflink, so the snapshot and the new
 * target share every block the run did not write.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, linkSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, statfsSync, statSync, utimesSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runQsync } from './helpers/cli.js';
import { mountForTest, needTools } from './helpers/env.js';

const MiB = 1 << 20;
const ready = needTools('mkfs.xfs');
let dir: string;
let mnt: string;
let mounted = false;

beforeAll(() => {
  if (!ready) return;
  dir = mkdtempSync(join(tmpdir(), 'qsync-reflink-'));
  mnt = join(dir, 'mnt');
  mkdirSync(mnt);
  const img = join(dir, 'xfs.img');
  execFileSync('truncate', ['-s', '512M', img]);
  execFileSync('mkfs.xfs', ['-q', '-m', 'reflink=1', img]);
  mounted = mountForTest(['-o', 'loop', img, mnt]);
});
afterAll(() => {
  if (mounted) execFileSync('umount', [mnt]);
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const used = (p: string) => {
  const s = statfsSync(p);
  return (s.blocks - s.bfree) * s.bsize;
};

describe.skipIf(!ready)('a hard-linked target on a reflink file system', () => {
  it('is copied as a reflink: the snapshot keeps the old data, and only the changed blocks take new space', async (ctx) => {
    if (!mounted) return ctx.skip();
    const src = join(mnt, 'src');
    const dst = join(mnt, 'dst');
    const snap = join(mnt, 'snap');
    mkdirSync(src);
    writeFileSync(join(src, 'disk.raw'), randomBytes(96 * MiB));
    expect((await runQsync(['-a', `${src}/`, `${dst}/`])).code).toBe(0);
    mkdirSync(snap);
    linkSync(join(dst, 'disk.raw'), join(snap, 'disk.raw'));
    const old = readFileSync(join(snap, 'disk.raw'));
    const fd = openSync(join(src, 'disk.raw'), 'r+');
    writeSync(fd, randomBytes(64 * 1024), 0, 64 * 1024, 10 * MiB);
    closeSync(fd);
    utimesSync(join(src, 'disk.raw'), new Date(), new Date(Date.now() + 5000));
    const before = used(mnt);
    const r = await runQsync(['-a', `${src}/`, `${dst}/`]);
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(join(dst, 'disk.raw')).equals(readFileSync(join(src, 'disk.raw')))).toBe(true);
    expect(readFileSync(join(snap, 'disk.raw')).equals(old)).toBe(true);
    expect(statSync(join(dst, 'disk.raw')).ino).not.toBe(statSync(join(snap, 'disk.raw')).ino);
    // A byte copy would take 96 MiB more; a reflink takes the changed block and metadata.
    expect(used(mnt) - before).toBeLessThan(16 * MiB);
  });
});
