/**
 * apply, restore, prune and --backup-dir against hostile inputs and kill -9,
 * through the built CLI: nothing is written that qsync cannot vouch for,
 * nothing is reached through a symlink, nothing hangs or grows unbounded.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, chownSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DeltaFileWriter } from '../src/io/delta-file.js';
import { lockRecord } from '../src/sync/lock.js';
import { AS_NOBODY, QSYNC, runQsync, sha256, stateOf, stateSlot } from './helpers/cli.js';
import { fingerprintOf, writeDelta } from './helpers/delta.js';
import { mutateBlocks, randomFile } from './helpers/data.js';

const KiB = 1024;
const MiB = 1 << 20;
const bs = 64 * KiB;
let dir: string;
let n = 0;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'qsync-safety-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A fresh folder for one case. */
function fresh(name: string): string {
  const d = join(dir, `${name}-${n++}`);
  mkdirSync(d, { recursive: true });
  return d;
}

const ok = (r: { code: number | null; stderr: string }) => expect(r.code, r.stderr).toBe(0);

/** runQsync, killed after `ms` (a hang fails the test instead of stalling it). */
function runBounded(args: string[], ms = 20_000) {
  let timer: NodeJS.Timeout | undefined;
  return runQsync(args, { onSpawn: (pid) => (timer = setTimeout(() => process.kill(pid, 'SIGKILL'), ms)) }).finally(() => clearTimeout(timer));
}
const read = (p: string) => readFileSync(p);

/** Start the built CLI; SIGKILL it `ms` after `file` appears (polling every millisecond); resolves when it is gone. */
function killAfter(args: string[], file: string, ms: number, present = (p: string) => existsSync(p)): Promise<{ killed: boolean }> {
  return new Promise((resolve) => {
    const child: ChildProcess = spawn(process.execPath, [QSYNC, ...args], { stdio: 'ignore' });
    let killed = false;
    const poll = setInterval(() => {
      if (!present(file)) return;
      clearInterval(poll);
      setTimeout(() => {
        killed = child.kill('SIGKILL');
      }, ms);
    }, 1);
    const guard = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.on('exit', (_code, signal) => {
      clearInterval(poll);
      clearTimeout(guard);
      resolve({ killed: killed && signal === 'SIGKILL' });
    });
  });
}

/** A synced target: DEST/disk.img with its manifest, from SRC/disk.img of `size` random bytes. */
async function synced(d: string, size: number): Promise<{ src: string; dest: string; target: string; manifest: string; base: Buffer }> {
  const src = join(d, 'src');
  const dest = join(d, 'dest');
  mkdirSync(src);
  randomFile(join(src, 'disk.img'), size);
  ok(await runQsync(['-a', `${src}/`, `${dest}/`]));
  return { src, dest, target: join(dest, 'disk.img'), manifest: join(stateOf(dest), 'manifests', 'disk.img.qsm'), base: read(join(src, 'disk.img')) };
}

/** Write a one-member delta by hand: sizes, fingerprints and records as given (each record's payload is consistent with its digest). */
async function forge(path: string, o: { baseSize: number; resultSize: number; baseFp: Buffer; resultFp: Buffer; records: [number, Buffer][] }): Promise<void> {
  const w = await DeltaFileWriter.create(path);
  w.beginMember({ kind: 'forward', blockSize: bs, baseSize: o.baseSize, resultSize: o.resultSize });
  for (const [i, b] of o.records) await w.addBlock(i, b);
  await w.endMember({ baseFingerprint: o.baseFp, resultFingerprint: o.resultFp });
  await w.finish();
}

describe('apply refuses what it cannot vouch for', () => {
  it('forged deltas that pass verify: refused with exit 12 before the first write, target and manifest untouched', async () => {
    const d = fresh('forged');
    const { target, manifest, base } = await synced(d, 2 * MiB + 5000);
    const manifestBefore = read(manifest);
    const result = Buffer.from(base);
    randomBytes(bs).copy(result, 3 * bs);
    const baseFp = fingerprintOf(base, bs);
    const resultFp = fingerprintOf(result, bs);
    const grown = Buffer.concat([base, randomBytes(bs)]);
    const cases: [string, Parameters<typeof forge>[1]][] = [
      ['random result fingerprint', { baseSize: base.length, resultSize: base.length, baseFp, resultFp: randomBytes(32), records: [[3, result.subarray(3 * bs, 4 * bs)]] }],
      ['zero result fingerprint', { baseSize: base.length, resultSize: base.length, baseFp, resultFp: Buffer.alloc(32), records: [[3, result.subarray(3 * bs, 4 * bs)]] }],
      ['a payload that is not the result', { baseSize: base.length, resultSize: base.length, baseFp, resultFp, records: [[3, randomBytes(bs)]] }],
      ['a record missing', { baseSize: base.length, resultSize: base.length, baseFp, resultFp, records: [] }],
      ['the record at another block', { baseSize: base.length, resultSize: base.length, baseFp, resultFp, records: [[4, result.subarray(3 * bs, 4 * bs)]] }],
      ['a wrong result size', { baseSize: base.length, resultSize: base.length - 1000, baseFp, resultFp, records: [[3, result.subarray(3 * bs, 4 * bs)]] }],
      ['growth claimed, the grown block forged', { baseSize: base.length, resultSize: grown.length, baseFp, resultFp: fingerprintOf(grown, bs), records: [[Math.floor(base.length / bs) + 1, randomBytes(grown.length - (Math.floor(base.length / bs) + 1) * bs)]] }],
    ];
    for (const [what, spec] of cases) {
      const delta = join(d, 'forged.qdelta');
      rmSync(delta, { force: true });
      await forge(delta, spec);
      ok(await runQsync(['verify', delta]));
      const r = await runQsync(['apply', delta, target]);
      expect(r.code, `${what}: ${r.stderr}`).toBe(12);
      expect(r.stderr).not.toMatch(/\n\s+at /);
      expect(read(target).equals(base), what).toBe(true);
      expect(read(manifest).equals(manifestBefore), what).toBe(true);
      expect(readdirSync(join(stateOf(join(d, 'dest')), 'manifests')).filter((x) => x.includes('apply')), what).toEqual([]);
    }
    // A true delta still applies, and the target verifies against its new manifest.
    const good = join(d, 'good.qdelta');
    await forge(good, { baseSize: base.length, resultSize: base.length, baseFp, resultFp, records: [[3, result.subarray(3 * bs, 4 * bs)]] });
    ok(await runQsync(['apply', good, target]));
    expect(read(target).equals(result)).toBe(true);
    ok(await runQsync(['verify', target]));
  });

  it('a huge result size is refused at once: no sparse giant, no growing scratch file', async () => {
    const d = fresh('huge');
    // Above the small-file threshold (256 KiB), so the target has a manifest of its own.
    const { target, base } = await synced(d, 512 * KiB);
    const baseFp = fingerprintOf(base, bs);
    for (const size of [64 * 2 ** 30, 2 ** 40]) {
      const delta = join(d, `huge-${size}.qdelta`);
      await forge(delta, { baseSize: base.length, resultSize: size, baseFp, resultFp: randomBytes(32), records: [] });
      const t0 = Date.now();
      for (const args of [['verify', delta], ['apply', delta, target]]) {
        const r = await runBounded(args);
        expect(r.code, r.stderr).toBe(12);
        expect(r.stderr).toMatch(/result size \d+ is larger than the base/);
      }
      expect(Date.now() - t0).toBeLessThan(10_000);
      expect(statSync(target).size).toBe(base.length);
      expect(readdirSync(join(stateOf(join(d, 'dest')), 'manifests')).filter((x) => x.includes('apply'))).toEqual([]);
    }
  });

  it('a FIFO as the delta is refused, not waited on', async () => {
    const d = fresh('fifo');
    const { target } = await synced(d, 64 * KiB);
    const fifo = join(d, 'pipe.qdelta');
    execFileSync('mkfifo', [fifo]);
    for (const args of [['apply', fifo, target], ['verify', fifo], ['info', fifo]]) {
      const t0 = Date.now();
      const r = await runBounded(args);
      expect(r.signal, args.join(' ')).toBeNull();
      expect(r.code, args.join(' ')).not.toBe(0);
      expect(r.stderr).toMatch(/FIFO/);
      expect(Date.now() - t0).toBeLessThan(10_000);
    }
  });
});

describe('apply never follows a symlink out of its directory', () => {
  it('a member under a symlinked folder of DIR is refused; nothing is written outside DIR', async () => {
    const d = fresh('symlink');
    const into = join(d, 'into');
    const outside = join(d, 'outside');
    mkdirSync(into);
    mkdirSync(outside);
    symlinkSync(outside, join(into, 'link'));
    const delta = join(d, 'batch.qdelta');
    await writeDelta(delta, [{ name: 'link/escaped', base: Buffer.alloc(0), result: randomBytes(100 * KiB) }], bs);
    const r = await runQsync(['apply', delta, into]);
    expect(r.code, r.stderr).toBe(11);
    expect(r.stderr).toMatch(/symlink/);
    expect(readdirSync(outside)).toEqual([]);
  });

  it('a symlinked or foreign state folder is refused', async () => {
    const d = fresh('state');
    const into = join(d, 'into');
    const elsewhere = join(d, 'elsewhere');
    mkdirSync(into);
    mkdirSync(elsewhere);
    const delta = join(d, 'batch.qdelta');
    await writeDelta(delta, [{ name: 'f.img', base: Buffer.alloc(0), result: randomBytes(10 * KiB) }], bs);
    symlinkSync(elsewhere, stateSlot(into));
    let r = await runQsync(['apply', delta, into]);
    expect(r.code, r.stderr).toBe(11);
    expect(r.stderr).toMatch(/is a symlink or not a folder/);
    expect(readdirSync(elsewhere)).toEqual([]);
    expect(existsSync(join(into, 'f.img'))).toBe(false);
    rmSync(stateOf(into));
    mkdirSync(stateOf(into));
    chownSync(stateOf(into), 65534, 65534);
    r = await runQsync(['apply', delta, into]);
    expect(r.code, r.stderr).toBe(11);
    expect(r.stderr).toMatch(/belongs to uid 65534/);
    expect(existsSync(join(into, 'f.img'))).toBe(false);
  });
});

describe('an interrupted apply resumes only onto the file it was writing', () => {
  /** Kill an apply of a 24 MiB change while it writes; returns once its apply intent is left behind. */
  async function interrupted(d: string): Promise<{ delta: string; target: string; base: Buffer; result: Buffer; src: string; dest: string }> {
    const s = await synced(d, 24 * MiB);
    const result = Buffer.from(s.base);
    randomBytes(20 * MiB).copy(result, 2 * MiB);
    const delta = join(d, 'd.qdelta');
    await writeDelta(delta, [{ base: s.base, result }], bs);
    const intent = join(stateOf(s.dest), 'manifests', 'disk.img.qsm.apply');
    for (const ms of [0, 2, 5, 10, 20]) {
      await killAfter(['apply', delta, s.target], intent, ms);
      if (existsSync(intent)) break;
    }
    expect(existsSync(intent)).toBe(true);
    return { ...s, delta, result };
  }

  it('target replaced in between: refused with a clear message, the new file untouched', async () => {
    const d = fresh('resume-replaced');
    const { delta, target, base } = await interrupted(d);
    const other = join(d, 'other.img');
    writeFileSync(other, base);
    renameSync(other, target);
    const r = await runQsync(['apply', delta, target]);
    expect(r.code, r.stderr).toBe(11);
    expect(r.stderr).toMatch(/cannot be resumed: the target was replaced/);
    expect(read(target).equals(base)).toBe(true);
  });

  it('target synced in between: refused; the synced target and its manifest stay right', async () => {
    const d = fresh('resume-synced');
    const { delta, target, src, dest, base, result } = await interrupted(d);
    mutateBlocks(join(src, 'disk.img'), 24 * MiB, 0.02);
    ok(await runQsync(['-a', '-c', `${src}/`, `${dest}/`]));
    const synced = read(join(src, 'disk.img'));
    expect(read(target).equals(synced)).toBe(true);
    const r = await runQsync(['apply', delta, target]);
    expect(r.code, r.stderr).toBe(11);
    expect(r.stderr).toMatch(/cannot be resumed: the target was synced since/);
    expect(read(target).equals(synced)).toBe(true);
    ok(await runQsync(['verify', target]));
    // Synced back to the delta's base, it is the base again: the apply starts afresh and gives the result.
    writeFileSync(join(src, 'disk.img'), base);
    ok(await runQsync(['-a', '-c', `${src}/`, `${dest}/`]));
    ok(await runQsync(['apply', delta, target]));
    expect(read(target).equals(result)).toBe(true);
  });

  it('untouched in between: the rerun finishes it', async () => {
    const d = fresh('resume-ok');
    const { delta, target, result } = await interrupted(d);
    ok(await runQsync(['apply', delta, target]));
    expect(await sha256(target)).toBe(await sha256Buf(result));
    ok(await runQsync(['verify', target]));
  });
});

async function sha256Buf(b: Buffer): Promise<string> {
  const { createHash } = await import('node:crypto');
  return createHash('sha256').update(b).digest('hex');
}

const EMPTY_SHA = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';

/** The points `restore --list` shows for `target`: their numbers. */
async function listed(target: string, history: string): Promise<number[]> {
  const r = await runQsync(['restore', target, '--backup-dir', history, '--list']);
  ok(r);
  return r.stdout
    .split('\n')
    .slice(1)
    .filter((l) => l.trim())
    .map((l) => Number(l.trim().split(/\s+/)[0]));
}

/** Restore every listed point; returns the sha256 of each, point 1 first. */
async function restoreAll(d: string, target: string, history: string): Promise<string[]> {
  const shas: string[] = [];
  for (const n of await listed(target, history)) {
    const out = join(d, `restored-${n}-${Date.now()}.img`);
    const r = await runQsync(['restore', target, out, '--backup-dir', history, '--at', String(n)]);
    expect(r.code, `point ${n}: ${r.stderr}`).toBe(0);
    expect(statSync(out).mode & 0o077, 'restored image is owner-only').toBe(0);
    shas.push(await sha256(out));
    rmSync(out);
  }
  return shas;
}

/** Every restored point is a state the mirror held after a completed run, newest first, and none is lost. */
function expectHistory(restored: string[], committed: string[]): void {
  const idx = restored.map((s) => committed.lastIndexOf(s));
  expect(idx.every((i) => i >= 0), 'each point restores to a state the mirror held').toBe(true);
  for (let k = 1; k < idx.length; k++) expect(idx[k]).toBeLessThanOrEqual(idx[k - 1]);
  expect(new Set(restored)).toEqual(new Set(committed.slice(0, -1)));
}

describe('--backup-dir history survives kill -9', () => {
  it('killed at several instants mid-run, then finished: every listed point restores byte-exact, no older point lost', async () => {
    const d = fresh('hist-kill');
    const src = join(d, 'src');
    const dest = join(d, 'dest');
    const history = join(d, 'history');
    mkdirSync(src);
    const img = join(src, 'vm.img');
    randomFile(img, 16 * MiB + 12345);
    const committed: string[] = [EMPTY_SHA]; // the first run creates vm.img: its point is the empty file
    const sync = async () => {
      ok(await runQsync(['-a', `--backup-dir=${history}`, `${src}/`, `${dest}/`]));
      const sha = await sha256(join(dest, 'vm.img'));
      expect(sha).toBe(await sha256(img));
      if (committed.at(-1) !== sha) committed.push(sha);
    };
    await sync();
    let kills = 0;
    // The run is writing the target once its history temp file holds a few old blocks (each is recorded just before its write).
    // (A temp file may go between the listing and its stat: the lock's, or the history's at its rename.)
    const writing = (p: string) =>
      existsSync(p) && readdirSync(p).some((x) => x.endsWith('.tmp') && (statSync(join(p, x), { throwIfNoEntry: false })?.size ?? 0) > 4 * bs);
    for (const [k, ms] of [0, 2, 5, 10, 20, 40].entries()) {
      const size = statSync(img).size;
      mutateBlocks(img, size, 0.3);
      if (k === 1) writeFileSync(img, randomBytes(MiB + 5000), { flag: 'a' }); // grows
      if (k === 3) execFileSync('truncate', ['-s', String(size - 3 * MiB - 100), img]); // shrinks
      const r = await killAfter(['-a', `--backup-dir=${history}`, `${src}/`, `${dest}/`], history, ms, writing);
      if (r.killed) kills++;
      await sync(); // the run after the crash finishes the job
      ok(await runQsync(['verify', join(dest, 'vm.img')]));
    }
    expect(kills).toBeGreaterThan(2);
    // The kills left torn members behind (finished by the next run: no base named) and runs that could not vouch for their old state.
    let torn = 0;
    let unknown = 0;
    for (const f of readdirSync(history)) {
      const info = await runQsync(['info', join(history, f), '--json']);
      ok(info);
      for (const m of JSON.parse(info.stdout) as { baseFingerprint: string; resultFingerprint: string }[]) {
        if (m.baseFingerprint === '(unknown)') torn++;
        if (m.resultFingerprint === '(unknown)') unknown++;
      }
    }
    console.log(`history: ${readdirSync(history).length} files, ${torn} torn members salvaged, ${unknown} members with an unknown result`);
    expect(torn).toBeGreaterThan(0);
    const restored = await restoreAll(d, join(dest, 'vm.img'), history);
    expectHistory(restored, committed);
    for (const f of readdirSync(history)) expect(statSync(join(history, f)).mode & 0o077, f).toBe(0);
    expect(statSync(history).mode & 0o777).toBe(0o700);
  });
});

describe('restore checks what it applies', () => {
  /** A destination with four runs of history for vm.img (the first creates it); returns the states it held, oldest (empty) first. */
  async function threeRuns(d: string): Promise<{ dest: string; history: string; states: string[] }> {
    const src = join(d, 'src');
    const dest = join(d, 'dest');
    const history = join(d, 'history');
    mkdirSync(src);
    const img = join(src, 'vm.img');
    randomFile(img, 2 * MiB);
    const states: string[] = [EMPTY_SHA];
    for (let run = 0; run < 4; run++) {
      if (run) mutateBlocks(img, 2 * MiB, 0.2);
      states.push(await sha256(img));
      ok(await runQsync(['-a', `--backup-dir=${history}`, `${src}/`, `${dest}/`]));
      await new Promise((r) => setTimeout(r, 5)); // distinct run times
    }
    return { dest, history, states };
  }

  it('a member whose fingerprints are zero is not a point: never restored to wrong bytes', async () => {
    const d = fresh('zero-fp');
    const { dest, history, states } = await threeRuns(d);
    // Forge the newest run's member: same records, result fingerprint zeroed (re-sealed, so it passes verify).
    const newest = readdirSync(history).sort().at(-1)!;
    const path = join(history, newest);
    const { readDeltaFile, openDelta } = await import('../src/io/delta-file.js');
    const fh = await openDelta(path);
    const w = await DeltaFileWriter.create(join(d, 'forged.qdelta'));
    for await (const ev of readDeltaFile(fh, path)) {
      if (ev.type === 'header') w.beginMember(ev.header);
      else if (ev.type === 'record') await (ev.content ? w.addBlock(ev.record.index, ev.content) : w.addZero(ev.record.index));
      else await w.endMember({ baseFingerprint: ev.header.baseFingerprint, resultFingerprint: Buffer.alloc(32) });
    }
    await fh.close();
    await w.finish();
    renameSync(join(d, 'forged.qdelta'), path);
    ok(await runQsync(['verify', path]));
    const restored = await restoreAll(d, join(dest, 'vm.img'), history);
    // The state the forged member leads to is not a point; the older ones, reached through it, restore exactly (each is checked).
    expect(restored).toEqual([states[2], states[1], states[0]]);
  });

  it('a gap in the history (an interrupted prune of old) lists only the points before it, each restorable', async () => {
    const d = fresh('gap');
    const { dest, history, states } = await threeRuns(d);
    const files = readdirSync(history).sort();
    rmSync(join(history, files.at(-2)!)); // the middle of the chain
    const restored = await restoreAll(d, join(dest, 'vm.img'), history);
    expect(restored).toEqual([states[3]]);
  });

  it('prune killed at any instant leaves every listed point restorable', async () => {
    const d = fresh('prune-kill');
    const { dest, history, states } = await threeRuns(d);
    for (const ms of [0, 3, 8]) {
      const left = readdirSync(history).length;
      if (left <= 1) break;
      await killAfter(['prune', history, '--keep', String(left - 2 > 0 ? left - 2 : 1)], history, ms);
      const restored = await restoreAll(d, join(dest, 'vm.img'), history);
      expect(restored).toEqual([states[3], states[2], states[1], states[0]].slice(0, restored.length));
    }
  });

  it('points are matched by the whole name under the destination, not by a suffix', async () => {
    const d = fresh('names');
    const { dest, history } = await threeRuns(d);
    mkdirSync(join(dest, 'b'));
    writeFileSync(join(dest, 'b', 'vm.img'), randomBytes(1000));
    expect(await listed(join(dest, 'b', 'vm.img'), history)).toEqual([]);
    expect(await listed(join(dest, 'vm.img'), history)).toEqual([1, 2, 3, 4]);
  });

  it('a huge result size in a history member is refused at once', async () => {
    const d = fresh('hist-huge');
    const { dest, history } = await threeRuns(d);
    const w = await DeltaFileWriter.create(join(history, '2999-01-01T00-00-00.000Z.qdelta'));
    w.beginMember({ kind: 'reverse', blockSize: bs, baseSize: 2 * MiB, resultSize: 2 ** 40, name: 'vm.img' });
    await w.endMember({ baseFingerprint: randomBytes(32), resultFingerprint: randomBytes(32) });
    await w.finish();
    const t0 = Date.now();
    const out = join(d, 'out.img');
    const r = await runBounded(['restore', join(dest, 'vm.img'), out, '--backup-dir', history, '--at', '1']);
    expect(r.signal).toBeNull();
    expect(Date.now() - t0).toBeLessThan(10_000);
    expect(existsSync(out) ? statSync(out).size : 0).toBeLessThan(2 ** 30);
  });

  it('a symlinked --backup-dir is refused; batch deltas are owner-only', async () => {
    const d = fresh('hist-link');
    const src = join(d, 'src');
    mkdirSync(src);
    randomFile(join(src, 'vm.img'), 100 * KiB);
    mkdirSync(join(d, 'real'));
    symlinkSync(join(d, 'real'), join(d, 'history'));
    const r = await runQsync(['-a', `--backup-dir=${join(d, 'history')}`, `${src}/`, `${join(d, 'dest')}/`]);
    expect(r.code, r.stderr).not.toBe(0);
    expect(r.stderr).toMatch(/backup dir .* is a symlink/);
    expect(readdirSync(join(d, 'real'))).toEqual([]);
    ok(await runQsync(['-a', `--write-batch=${join(d, 'b.qdelta')}`, `${src}/`, `${join(d, 'dest2')}/`]));
    expect(statSync(join(d, 'b.qdelta')).mode & 0o077).toBe(0);
  });
});

describe('one writer per history folder', () => {
  it('a sync keeping history and a prune wait their turn while another qsync holds the folder (its temp file is never salvaged from under it)', async () => {
    const d = fresh('hist-lock');
    const src = join(d, 'src');
    const history = join(d, 'history');
    mkdirSync(src);
    randomFile(join(src, 'vm.img'), 100 * KiB);
    mkdirSync(history, { mode: 0o700 });
    // A live process (this one) holds it, and a temp file of its run lies there.
    writeFileSync(join(history, 'lock'), lockRecord());
    writeFileSync(join(history, '.2026-01-01T00-00-00.000Z.qdelta.abcd.tmp'), 'in progress');
    for (const args of [['-a', `--backup-dir=${history}`, `${src}/`, `${join(d, 'dest')}/`], ['prune', history, '--keep', '0']]) {
      const r = await runQsync(args);
      expect(r.code, r.stderr).toBe(3);
      expect(r.stderr).toMatch(/another qsync is writing the history/);
    }
    expect(readFileSync(join(history, '.2026-01-01T00-00-00.000Z.qdelta.abcd.tmp'), 'latin1')).toBe('in progress');
    rmSync(join(history, 'lock'));
    ok(await runQsync(['-a', `--backup-dir=${history}`, `${src}/`, `${join(d, 'dest')}/`]));
  });
});

describe('the history folder is held, not reached by path again', () => {
  it('a user owning a folder above --backup-dir swaps it for a symlink to a root folder mid-run: nothing lands in or leaves that folder, the history is kept in the folder qsync held', async () => {
    const d = fresh('hist-swap');
    chmodSync(dir, 0o711);
    chmodSync(d, 0o711);
    const src = join(d, 'src');
    const dest = join(d, 'dest');
    const user = join(d, 'user'); // nobody's folder: nobody may rename what lies in it
    const history = join(user, 'hist');
    const victim = join(d, 'victim'); // root's
    mkdirSync(src);
    mkdirSync(user);
    chownSync(user, 65534, 65534);
    mkdirSync(history, { mode: 0o755 }); // root's, listable: the user sees when the run's temp file appears
    mkdirSync(victim);
    writeFileSync(join(victim, '2000-01-01T00-00-00.000Z.qdelta'), 'root data');
    const size = 64 * MiB;
    randomFile(join(src, 'vm.img'), size);
    ok(await runQsync(['-a', `${src}/`, `${dest}/`]));
    mutateBlocks(join(src, 'vm.img'), size, 0.6);
    // As nobody: once the run's temp file is in the folder, rename the folder away and put a symlink to root's folder in its place.
    const attacker = spawn(
      'setpriv',
      [...AS_NOBODY, 'sh', '-c', 'i=0; until ls -a "$1" 2>/dev/null | grep -q "\\.tmp$"; do i=$((i+1)); [ $i -gt 20000 ] && exit 1; done; mv "$1" "$1.away" && ln -s "$2" "$1"', 'sh', history, victim],
      { stdio: 'ignore' },
    );
    const swapped = new Promise<number | null>((res) => attacker.on('close', res));
    try {
      const r = await runBounded(['-a', `--backup-dir=${history}`, `${src}/`, `${dest}/`], 60_000);
      attacker.kill('SIGKILL'); // a no-op once it is done
      expect(await swapped, `the swap happened during the run (qsync: ${r.code} ${r.stderr})`).toBe(0);
      expect(readdirSync(victim)).toEqual(['2000-01-01T00-00-00.000Z.qdelta']);
      expect(readFileSync(join(victim, '2000-01-01T00-00-00.000Z.qdelta'), 'latin1')).toBe('root data');
      // The run kept its history in the folder it held (now under the name the user gave it).
      ok(r);
      expect(readdirSync(`${history}.away`).filter((f) => f.endsWith('.qdelta'))).toHaveLength(1);
      expect(await sha256(join(dest, 'vm.img'))).toBe(await sha256(join(src, 'vm.img')));
    } finally {
      attacker.kill('SIGKILL');
    }
  }, 120_000);
});
