/**
 * Differential tests against real rsync: the same tree synced by `rsync`
 * and by `qsync` with the same flags gives the same result (types, content,
 * modes, mtimes, owners, link targets), after a first run and after changes.
 */
import { execFileSync } from 'node:child_process';
import { chmodSync, chownSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, symlinkSync, unlinkSync, utimesSync, writeFileSync, lutimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runQsync } from './helpers/cli.js';
import { needTools } from './helpers/env.js';
import { randomFile } from './helpers/data.js';

let root: string;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'qsync-rsync-'));
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

interface Entry {
  type: string;
  mode: number;
  mtimeUs?: number;
  uid: number;
  gid: number;
  content?: string;
  link?: string;
}

/** Everything a user compares after a sync, keyed by relative path; qsync's state folder left out. */
function snapshot(dir: string, rel = ''): Record<string, Entry> {
  const out: Record<string, Entry> = {};
  for (const name of readdirSync(join(dir, rel)).sort()) {
    if (rel === '' && name === '.qsync') continue;
    const r = rel ? `${rel}/${name}` : name;
    const p = join(dir, r);
    const st = lstatSync(p, { bigint: true });
    const e: Entry = { type: st.isDirectory() ? 'dir' : st.isSymbolicLink() ? 'link' : st.isFile() ? 'file' : 'other', mode: Number(st.mode), uid: Number(st.uid), gid: Number(st.gid) };
    // rsync leaves a fifo's time alone, and gives a link made in this second its own time
    // rather than the source's: compare times of files, and of links from the past.
    const recent = Date.now() * 1000 - Number(st.mtimeNs / 1000n) < 60e6;
    if (st.isFile() || (st.isSymbolicLink() && !recent)) e.mtimeUs = Number(st.mtimeNs / 1000n);
    if (st.isFile()) e.content = readFileSync(p).toString('base64');
    if (st.isSymbolicLink()) e.link = readlinkSync(p);
    out[r] = e;
    if (st.isDirectory()) Object.assign(out, snapshot(dir, r));
  }
  return out;
}

/** Directory mtimes, compared apart so that a failure says which kind of entry differs. */
function dirTimes(dir: string): Record<string, number> {
  const out: Record<string, number> = {};
  const walk = (rel: string) => {
    for (const name of readdirSync(join(dir, rel))) {
      if (rel === '' && name === '.qsync') continue;
      const r = rel ? `${rel}/${name}` : name;
      const st = lstatSync(join(dir, r), { bigint: true });
      if (st.isDirectory()) {
        out[r] = Number(st.mtimeNs / 1000n);
        walk(r);
      }
    }
  };
  walk('');
  return out;
}

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
