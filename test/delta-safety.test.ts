/**
 * apply, restore, prune and --backup-dir against hostile inputs and kill -9,
 * through the built CLI: nothing is written that qsync cannot vouch for,
 * nothing is reached through a symlink, nothing hangs or grows unbounded.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chownSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DeltaFileWriter } from '../src/io/delta-file.js';
import { QSYNC, runQsync, sha256 } from './helpers/cli.js';
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
  return { src, dest, target: join(dest, 'disk.img'), manifest: join(dest, '.qsync', 'manifests', 'disk.img.qsm'), base: read(join(src, 'disk.img')) };
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
      expect(readdirSync(join(d, 'dest', '.qsync', 'manifests')).filter((x) => x.includes('apply')), what).toEqual([]);
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
    const { target, base } = await synced(d, 256 * KiB);
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
      expect(readdirSync(join(d, 'dest', '.qsync', 'manifests')).filter((x) => x.includes('apply'))).toEqual([]);
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

  it('a symlinked or foreign .qsync state folder is refused', async () => {
    const d = fresh('state');
    const into = join(d, 'into');
    const elsewhere = join(d, 'elsewhere');
    mkdirSync(into);
    mkdirSync(elsewhere);
    const delta = join(d, 'batch.qdelta');
    await writeDelta(delta, [{ name: 'f.img', base: Buffer.alloc(0), result: randomBytes(10 * KiB) }], bs);
    symlinkSync(elsewhere, join(into, '.qsync'));
    let r = await runQsync(['apply', delta, into]);
    expect(r.code, r.stderr).toBe(11);
    expect(r.stderr).toMatch(/state folder .* is a symlink/);
    expect(readdirSync(elsewhere)).toEqual([]);
    expect(existsSync(join(into, 'f.img'))).toBe(false);
    rmSync(join(into, '.qsync'));
    mkdirSync(join(into, '.qsync'));
    chownSync(join(into, '.qsync'), 65534, 65534);
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
    const intent = join(s.dest, '.qsync', 'manifests', 'disk.img.qsm.apply');
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
