/**
 * Target directories: saving a tool's target, putting it back before each
 * timed run, and counting changed bytes.
 *
 * Restoring rewrites only the 64 KiB blocks that differ, in place, and puts
 * back mtime and mode: the file keeps its inode, so a manifest that records
 * the target's identity (size, mtime, inode) still trusts it, as it would on
 * the user's second run, and the disk sees few writes between timed runs.
 */
import { execFile, execFileSync } from 'node:child_process';
import {
  chmodSync,
  closeSync,
  copyFileSync,
  constants,
  fstatSync,
  fsyncSync,
  ftruncateSync,
  lstatSync,
  mkdirSync,
  openSync,
  readSync,
  readdirSync,
  rmSync,
  statSync,
  writeSync,
  type Stats,
} from 'node:fs';
import { join } from 'node:path';
import { stateFolderFor } from '../src/sync/state-dir.js';
import { promisify } from 'node:util';
import { BLOCK } from './args.js';

const run = promisify(execFile);
const CHUNK = 16 * BLOCK;

function readFull(fd: number, buf: Buffer, offset: number): number {
  let got = 0;
  while (got < buf.length) {
    const n = readSync(fd, buf, got, buf.length - got, offset + got);
    if (n === 0) break;
    got += n;
  }
  return got;
}

/**
 * Calls `visit` for each 64 KiB block of `from` that differs from the same
 * range of `to` (or lies past its end) and returns the bytes of those blocks.
 */
export function diffBlocks(from: string, to: string, visit?: (offset: number, data: Buffer) => void): number {
  const a = openSync(from, 'r');
  const b = openSync(to, 'r');
  try {
    const size = fstatSync(a).size;
    const bufA = Buffer.allocUnsafe(CHUNK);
    const bufB = Buffer.allocUnsafe(CHUNK);
    let changed = 0;
    for (let off = 0; off < size; off += CHUNK) {
      const n = readFull(a, bufA, off);
      const m = readFull(b, bufB, off);
      if (n === m && bufA.subarray(0, n).equals(bufB.subarray(0, m))) continue;
      for (let i = 0; i < n; i += BLOCK) {
        const end = Math.min(i + BLOCK, n);
        if (end <= m && bufA.subarray(i, end).equals(bufB.subarray(i, end))) continue;
        changed += end - i;
        visit?.(off + i, bufA.subarray(i, end));
      }
    }
    return changed;
  } finally {
    closeSync(a);
    closeSync(b);
  }
}

function restoreFile(saved: string, target: string): void {
  const st = statSync(saved);
  let exists = false;
  try {
    exists = lstatSync(target).isFile();
  } catch {
    // absent: copied below
  }
  if (!exists) {
    rmSync(target, { recursive: true, force: true });
    copyFileSync(saved, target, constants.COPYFILE_FICLONE);
  } else {
    const fd = openSync(target, 'r+');
    try {
      let wrote = diffBlocks(saved, target, (off, data) => writeSync(fd, data, 0, data.length, off)) > 0;
      if (fstatSync(fd).size !== st.size) {
        ftruncateSync(fd, st.size);
        wrote = true;
      }
      if (wrote) fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  }
  chmodSync(target, st.mode & 0o7777);
  copyTimes(saved, target);
}

/**
 * Node's utimes takes seconds as a double, which cannot hold every
 * nanosecond mtime; `touch -r` copies them exactly (utimensat). A manifest
 * that records the target's mtime in ns would otherwise distrust the target.
 */
function copyTimes(from: string, to: string): void {
  execFileSync('touch', ['-h', '-r', from, to]);
  const a = lstatSync(from, { bigint: true });
  const b = lstatSync(to, { bigint: true });
  if (a.mtimeNs !== b.mtimeNs) throw new Error(`restoreTree: mtime of ${to} not restored (${b.mtimeNs} != ${a.mtimeNs})`);
}

/** Makes `target` hold what `saved` holds: same files, content, modes and mtimes. */
export function restoreTree(saved: string, target: string): void {
  mkdirSync(target, { recursive: true });
  const keep = new Set(readdirSync(saved));
  for (const name of readdirSync(target)) {
    if (!keep.has(name)) rmSync(join(target, name), { recursive: true, force: true });
  }
  for (const name of keep) {
    const from = join(saved, name);
    const to = join(target, name);
    const st = lstatSync(from);
    if (st.isDirectory()) {
      if (!lstatSafe(to)?.isDirectory()) rmSync(to, { recursive: true, force: true });
      restoreTree(from, to);
    } else if (st.isFile()) {
      restoreFile(from, to);
    } else {
      throw new Error(`restoreTree: unexpected entry ${from}`);
    }
  }
  copyTimes(saved, target);
}

function lstatSafe(path: string): Stats | undefined {
  try {
    return lstatSync(path);
  } catch {
    return undefined;
  }
}

/** fsyncs every regular file below `dir`: a tool's writes are on disk before the next tool is timed. */
export function fsyncTree(dir: string): void {
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    const st = lstatSync(path);
    if (st.isDirectory()) fsyncTree(path);
    else if (st.isFile()) {
      const fd = openSync(path, 'r');
      fsyncSync(fd);
      closeSync(fd);
    }
  }
}

/** Total bytes of the regular files below `dir` (e.g. a manifest folder). */
export function treeBytes(dir: string): number {
  const st = lstatSafe(dir);
  if (!st) return 0;
  if (st.isFile()) return st.size;
  if (!st.isDirectory()) return 0;
  return readdirSync(dir).reduce((sum, name) => sum + treeBytes(join(dir, name)), 0);
}

/** Bytes of qsync's state for destination `dst`: its state folder, or the `.qsync` in it that a --qsync snapshot from before the state folder moved keeps. */
export const stateBytes = (dst: string): number => treeBytes(stateFolderFor(dst)) + treeBytes(join(dst, '.qsync'));

/** A copy of a target directory, holes kept. */
export async function saveTree(from: string, to: string): Promise<void> {
  rmSync(to, { recursive: true, force: true });
  await run('cp', ['-a', '--sparse=always', from, to]);
}

/** `cmp -s`: the target is byte-identical to the source. */
export async function identical(a: string, b: string): Promise<boolean> {
  try {
    await run('cmp', ['-s', a, b]);
    return true;
  } catch {
    return false;
  }
}
