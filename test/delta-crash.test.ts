import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { stateOf } from './helpers/cli.js';
import { writeDelta } from './helpers/delta.js';

const ENTRY = 'dist/test/helpers/delta-cli.js';

/**
 * Run the built delta CLI and SIGKILL it `ms` after its apply intent appears
 * (so the kill lands while it writes the target); resolves when it is gone.
 */
function killedWhileWriting(ms: number, intent: string, args: string[]): Promise<void> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [ENTRY, ...args], { stdio: 'ignore' });
    const poll = setInterval(() => {
      if (!existsSync(intent)) return;
      clearInterval(poll);
      setTimeout(() => child.kill('SIGKILL'), ms);
    }, 1);
    child.on('exit', () => {
      clearInterval(poll);
      resolve();
    });
  });
}

describe('crash during apply', () => {
  beforeAll(() => {
    if (!existsSync(ENTRY)) execFileSync('npx', ['tsc', '-p', '.'], { stdio: 'inherit' });
  });

  it('kill -9 at several points, then apply again: identical to the result', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'qsync-crash-'));
    const bs = 65536;
    const base = randomBytes(24 << 20);
    const result = randomBytes(28 << 20);
    const delta = join(dir, 'd.qdelta');
    await writeDelta(delta, [{ base, result }], bs);
    const target = join(dir, 'disk.img');
    await writeFile(target, base);
    const intent = join(stateOf(dir), 'manifests', 'disk.img.qsm.apply');
    let interrupted = 0;
    for (const ms of [0, 5, 20, 60]) {
      await killedWhileWriting(ms, intent, ['apply', delta, target]);
      if (existsSync(intent)) interrupted++;
    }
    expect(interrupted).toBeGreaterThan(0);
    const done = spawnSync(process.execPath, [ENTRY, 'apply', delta, target], { encoding: 'utf8' });
    expect(done.status, done.stderr).toBe(0);
    expect((await readFile(target)).equals(result)).toBe(true);
    // And once more: nothing to do, still identical; the target checks against its new manifest.
    const again = spawnSync(process.execPath, [ENTRY, 'apply', delta, target], { encoding: 'utf8' });
    expect(again.stdout).toMatch(/already/);
    const verify = spawnSync(process.execPath, [ENTRY, 'verify', target], { encoding: 'utf8' });
    expect(verify.status, verify.stderr).toBe(0);
    expect((await readFile(target)).equals(result)).toBe(true);
  });

  it('a corrupt delta exits non-zero with where, and no stack trace', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'qsync-crash-'));
    const base = randomBytes(1 << 20);
    const delta = join(dir, 'd.qdelta');
    await writeDelta(delta, [{ base, result: randomBytes(1 << 20) }], 65536);
    const bytes = await readFile(delta);
    await writeFile(delta, bytes.subarray(0, bytes.length - 1000));
    const target = join(dir, 'disk.img');
    await writeFile(target, base);
    const r = spawnSync(process.execPath, [ENTRY, 'apply', delta, target], { encoding: 'utf8' });
    expect(r.status).toBe(12);
    expect(r.stderr).toMatch(/invalid delta \(.*offset \d+, record #\d+\): truncated/);
    expect(r.stderr).not.toMatch(/\n\s+at /);
    expect((await readFile(target)).equals(base)).toBe(true);
  });
});
