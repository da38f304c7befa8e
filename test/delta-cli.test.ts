/**
 * Deltas through the real command line, on the real engine: --backup-dir
 * history restored point by point, batches shipped and applied elsewhere.
 */
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runQsync, sha256 } from './helpers/cli.js';
import { mutateBlocks, randomFile } from './helpers/data.js';

const MiB = 1 << 20;
let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'qsync-delta-cli-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const ok = (r: { code: number | null; stderr: string }) => expect(r.code, r.stderr).toBe(0);

describe('--backup-dir history', () => {
  it('five syncs: every point restores byte-identical to the source as it was, the mirror is the latest', async () => {
    const src = join(dir, 'hist-src');
    const mirror = join(dir, 'hist-mirror');
    const history = join(dir, 'hist-history');
    mkdirSync(src);
    const img = join(src, 'disk.img');
    randomFile(img, 16 * MiB);
    const shas: string[] = [];
    for (let run = 0; run < 5; run++) {
      if (run === 2) randomFile(join(src, 'notes.bin'), 3000); // an unrelated file appears
      if (run > 0) mutateBlocks(img, statSync(img).size, 0.05);
      if (run === 3) writeFileSync(img, Buffer.alloc(1 * MiB, 7), { flag: 'a' }); // grows
      shas.push(await sha256(img));
      ok(await runQsync(['-a', `--backup-dir=${history}`, `${src}/`, `${mirror}/`]));
    }
    expect(await sha256(join(mirror, 'disk.img'))).toBe(shas[4]);
    // Runs 2..5 each overwrote blocks: four points in time.
    const list = await runQsync(['restore', join(mirror, 'disk.img'), '--backup-dir', history, '--list']);
    ok(list);
    for (let point = 1; point <= 4; point++) {
      const out = join(dir, `restored-${point}.img`);
      ok(await runQsync(['restore', join(mirror, 'disk.img'), out, '--backup-dir', history, '--at', String(point)]));
      // Point 1 is the state before the newest run.
      expect(await sha256(out)).toBe(shas[4 - point]);
    }
    expect(await sha256(join(mirror, 'disk.img'))).toBe(shas[4]);
  });
});

describe('batches shipped to another site', () => {
  it('--only-write-batch into a DEST that does not exist, or one that does, writes nothing there (as rsync); the batch still applies', async () => {
    const src = join(dir, 'o-src');
    mkdirSync(src);
    randomFile(join(src, 'vm.img'), 1 * MiB);
    const missing = join(dir, 'o-missing');
    const batch = join(dir, 'o.qdelta');
    ok(await runQsync(['-a', `--only-write-batch=${batch}`, `${src}/`, `${missing}/`]));
    expect(existsSync(missing)).toBe(false);
    const empty = join(dir, 'o-empty');
    mkdirSync(empty);
    ok(await runQsync(['-a', `--only-write-batch=${join(dir, 'o2.qdelta')}`, `${src}/`, `${empty}/`]));
    expect(readdirSync(empty)).toEqual([]);
    const there = join(dir, 'o-there');
    mkdirSync(there);
    ok(await runQsync([`--read-batch=${batch}`, `${there}/`]));
    expect(await sha256(join(there, 'vm.img'))).toBe(await sha256(join(src, 'vm.img')));
  });

  it('--only-write-batch leaves the target alone; the batch applied elsewhere gives the source, twice; a wrong base is refused', async () => {
    const src = join(dir, 'b-src');
    const here = join(dir, 'b-here');
    const there = join(dir, 'b-there');
    mkdirSync(src);
    randomFile(join(src, 'vm.img'), 8 * MiB);
    ok(await runQsync(['-a', `${src}/`, `${here}/`]));
    ok(await runQsync(['-a', `${src}/`, `${there}/`]));
    const before = await sha256(join(here, 'vm.img'));
    mutateBlocks(join(src, 'vm.img'), 8 * MiB, 0.03);
    const batch = join(dir, 'ship.qdelta');
    ok(await runQsync(['-a', `--only-write-batch=${batch}`, `${src}/`, `${here}/`]));
    expect(await sha256(join(here, 'vm.img'))).toBe(before);
    expect(statSync(batch).size).toBeLessThan(MiB);

    for (let i = 0; i < 2; i++) {
      ok(await runQsync(['-a', `--read-batch=${batch}`, `${there}/`]));
      expect(await sha256(join(there, 'vm.img'))).toBe(await sha256(join(src, 'vm.img')));
    }
    // A file that is not the batch's base: refused, and left as it was.
    const wrong = join(dir, 'b-wrong');
    mkdirSync(wrong);
    randomFile(join(wrong, 'vm.img'), 8 * MiB);
    const wrongSha = await sha256(join(wrong, 'vm.img'));
    const r = await runQsync(['apply', batch, join(wrong, 'vm.img')]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/base/i);
    expect(await sha256(join(wrong, 'vm.img'))).toBe(wrongSha);
  });

  it('--write-batch on a first run over an old copy (no manifest) records its base, and applies elsewhere', async () => {
    const src = join(dir, 'w-src');
    const mirror = join(dir, 'w-mirror');
    const copy = join(dir, 'w-copy');
    mkdirSync(src);
    mkdirSync(mirror);
    mkdirSync(copy);
    randomFile(join(src, 'a.img'), 4 * MiB + 1000);
    copyFileSync(join(src, 'a.img'), join(mirror, 'a.img'));
    copyFileSync(join(src, 'a.img'), join(copy, 'a.img'));
    mutateBlocks(join(src, 'a.img'), 4 * MiB + 1000, 0.1);
    const batch = join(dir, 'w.qdelta');
    ok(await runQsync(['-a', '-c', `--write-batch=${batch}`, `${src}/`, `${mirror}/`]));
    expect(await sha256(join(mirror, 'a.img'))).toBe(await sha256(join(src, 'a.img')));
    ok(await runQsync(['apply', batch, copy]));
    expect(await sha256(join(copy, 'a.img'))).toBe(await sha256(join(src, 'a.img')));
    expect(readdirSync(dir).filter((n) => n.endsWith('.tmp'))).toEqual([]);
  });
});
