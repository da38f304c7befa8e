/**
 * A hostile user against root running qsync: paths root is given (state,
 * history) that lead through folders the user controls, and names qsync
 * cannot represent. Each case was found by attacking the built CLI.
 */
import { chmodSync, chownSync, existsSync, lchownSync, linkSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { NOBODY, runQsync, sha256 } from './helpers/cli.js';
import { mutateBlocks, randomFile } from './helpers/data.js';

const asRoot = process.getuid?.() === 0;

let base: string;
let victim: string;

beforeEach(() => {
  base = mkdtempSync(join(tmpdir(), 'qsync-attack-'));
  chmodSync(base, 0o755);
  victim = join(base, 'victim');
  mkdirSync(victim, { mode: 0o700 });
  writeFileSync(join(victim, 'secret'), 'root secret\n', { mode: 0o600 });
});
afterEach(() => rmSync(base, { recursive: true, force: true }));

/** A folder owned by nobody holding `link`, a symlink (owned by nobody) to the victim folder. */
function userLink(): string {
  const u = join(base, 'u');
  mkdirSync(u);
  chownSync(u, NOBODY, NOBODY);
  symlinkSync(victim, join(u, 'link'));
  lchownSync(join(u, 'link'), NOBODY, NOBODY);
  return join(u, 'link');
}

function srcTree(): string {
  const src = join(base, 'src');
  mkdirSync(src);
  writeFileSync(join(src, 'f'), 'one\n');
  return src;
}

describe.skipIf(!asRoot)('paths root is given lead through a user\'s symlink', () => {
  it('--manifest PATH: a folder on the way that is another user\'s symlink is refused, nothing is written there', async () => {
    const link = userLink();
    const src = srcTree();
    const r = await runQsync(['-a', '--manifest', join(link, 'f.qsm'), join(src, 'f'), join(base, 'copy')]);
    expect(r.stderr).toMatch(/link is a symlink owned by uid 65534/);
    expect(r.stderr).not.toMatch(/internal error|\n\s+at /);
    expect(r.code).not.toBe(0);
    expect(readdirSync(victim)).toEqual(['secret']);
  });

  it('--backup-dir: a folder on the way that is another user\'s symlink is refused, no history is written there', async () => {
    const link = userLink();
    const src = srcTree();
    const dest = join(base, 'dest');
    expect((await runQsync(['-a', `${src}/`, `${dest}/`])).code).toBe(0);
    writeFileSync(join(src, 'f'), 'two\n');
    for (const hist of [join(link, 'hist'), link + '/']) {
      const r = await runQsync(['-a', '--backup-dir', hist, `${src}/`, `${dest}/`]);
      expect(r.stderr).toMatch(/link is a symlink owned by uid 65534/);
      expect(r.stderr).not.toMatch(/internal error|\n\s+at /);
      expect(r.code).not.toBe(0);
      expect(readdirSync(victim)).toEqual(['secret']);
      const l = await runQsync(['restore', join(dest, 'f'), '--backup-dir', hist, '--list']);
      expect(l.stderr).toMatch(/link is a symlink owned by uid 65534/);
      expect(l.code).not.toBe(0);
    }
    expect(readFileSync(join(victim, 'secret'), 'utf8')).toBe('root secret\n');
  });
});

describe('a dry run writes nothing', () => {
  it('-n with --backup-dir and --write-batch creates no history folder and no (empty) batch file', async () => {
    const src = srcTree();
    const dest = join(base, 'dest');
    expect((await runQsync(['-a', `${src}/`, `${dest}/`])).code).toBe(0);
    writeFileSync(join(src, 'f'), 'two\n');
    const before = readdirSync(base).sort();
    const r = await runQsync(['-a', '-n', '--backup-dir', join(base, 'hist'), '--write-batch', join(base, 'b.qd'), `${src}/`, `${dest}/`]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(readdirSync(base).sort()).toEqual(before);
    expect(readFileSync(join(dest, 'f'), 'utf8')).toBe('one\n');
  });
});

describe('restore writes OUT only when it is complete, and only where root was told', () => {
  /** DEST/big with one restore point in HIST; returns the point's sha256. */
  async function onePoint(size: number): Promise<{ dest: string; hist: string; old: string }> {
    const src = join(base, 'src');
    mkdirSync(src);
    randomFile(join(src, 'big'), size);
    const dest = join(base, 'dest');
    const hist = join(base, 'hist');
    expect((await runQsync(['-a', `${src}/`, `${dest}/`])).code).toBe(0);
    const old = await sha256(join(src, 'big'));
    mutateBlocks(join(src, 'big'), size, 0.9);
    expect((await runQsync(['-a', '--backup-dir', hist, `${src}/`, `${dest}/`])).code).toBe(0);
    return { dest, hist, old };
  }

  it('kill -9 while restoring leaves nothing under OUT; a rerun restores it', async () => {
    const { dest, hist, old } = await onePoint(96 << 20);
    const outDir = join(base, 'out');
    mkdirSync(outDir);
    const out = join(outDir, 'big.img');
    let pid = 0;
    const run = runQsync(['restore', join(dest, 'big'), out, '--backup-dir', hist, '--at', '1'], { onSpawn: (p) => (pid = p) });
    // Kill as soon as anything is written in OUT's folder (under any name).
    const deadline = Date.now() + 20_000;
    while (readdirSync(outDir).length === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 2));
    process.kill(pid, 'SIGKILL');
    expect((await run).signal).toBe('SIGKILL');
    expect(existsSync(out)).toBe(false);
    const r = await runQsync(['restore', join(dest, 'big'), out, '--backup-dir', hist, '--at', '1']);
    expect(r.code, r.stderr).toBe(0);
    expect(await sha256(out)).toBe(old);
  });

  it.skipIf(!asRoot)('OUT in a folder reached through another user\'s symlink is refused', async () => {
    const { dest, hist } = await onePoint(1 << 20);
    const link = userLink();
    const r = await runQsync(['restore', join(dest, 'big'), join(link, 'out.img'), '--backup-dir', hist, '--at', '1']);
    expect(r.stderr).toMatch(/link is a symlink owned by uid 65534/);
    expect(r.code).not.toBe(0);
    expect(readdirSync(victim)).toEqual(['secret']);
  });
});

describe('apply never writes through a hard link', () => {
  it('a target with another name (a cp -al snapshot) is refused before anything is written; the snapshot keeps its bytes', async () => {
    const src = join(base, 'src');
    mkdirSync(src);
    randomFile(join(src, 'f'), 1 << 20);
    const dest = join(base, 'dest');
    expect((await runQsync(['-a', `${src}/`, `${dest}/`])).code).toBe(0);
    mutateBlocks(join(src, 'f'), 1 << 20, 0.5);
    const batch = join(base, 'b.qdelta');
    expect((await runQsync(['-a', '--only-write-batch', batch, `${src}/`, `${dest}/`])).code).toBe(0);
    // The snapshot pattern of rsync --link-dest / cp -al: another name for the same inode.
    const snap = join(base, 'snap');
    mkdirSync(snap);
    linkSync(join(dest, 'f'), join(snap, 'f'));
    const old = await sha256(join(snap, 'f'));
    const r = await runQsync(['apply', batch, dest]);
    expect(r.stderr).toMatch(/hard links?/);
    expect(r.stderr).not.toMatch(/internal error|\n\s+at /);
    expect(r.code).not.toBe(0);
    expect(await sha256(join(snap, 'f'))).toBe(old);
    expect(await sha256(join(dest, 'f'))).toBe(old);
  });
});

describe('restore --list tells of history it cannot use', () => {
  it('a damaged history file, or a gap, is named on stderr: points are never dropped without a word', async () => {
    const src = join(base, 'src');
    mkdirSync(src);
    randomFile(join(src, 'big'), 1 << 20);
    const dest = join(base, 'dest');
    const hist = join(base, 'hist');
    expect((await runQsync(['-a', `${src}/`, `${dest}/`])).code).toBe(0);
    for (let i = 0; i < 2; i++) {
      mutateBlocks(join(src, 'big'), 1 << 20, 0.3);
      expect((await runQsync(['-a', '--backup-dir', hist, `${src}/`, `${dest}/`])).code).toBe(0);
      await new Promise((r) => setTimeout(r, 5)); // distinct run names
    }
    const [older, newer] = readdirSync(hist).filter((n) => n.endsWith('.qdelta')).sort();
    const list = () => runQsync(['restore', join(dest, 'big'), '--backup-dir', hist, '--list']);
    let r = await list();
    expect(r.stderr).toBe('');
    expect(r.stdout.trim().split('\n')).toHaveLength(3);
    // The newest file torn (a disk error, a copy cut short): neither point can be listed.
    const whole = readFileSync(join(hist, newer));
    writeFileSync(join(hist, newer), whole.subarray(0, whole.length - 100));
    r = await list();
    expect(r.stdout.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toContain(newer);
    expect(r.stderr).toMatch(/cannot be read/);
    expect(r.stderr).toMatch(/breaks at .*older points cannot be restored/);
    expect(r.stderr).toContain(older);
    expect(r.stderr).not.toMatch(/internal error|\n\s+at /);
  });
});

describe('apply of batches that name folders', () => {
  it('a batch made by a sync that created a folder applies to a copy of the old destination', async () => {
    const src = join(base, 'src');
    mkdirSync(src);
    writeFileSync(join(src, 'a'), 'a\n');
    const dest = join(base, 'dest');
    expect((await runQsync(['-a', `${src}/`, `${dest}/`])).code).toBe(0);
    const copy = join(base, 'copy');
    expect((await runQsync(['-a', `${dest}/`, `${copy}/`])).code).toBe(0);
    mkdirSync(join(src, 'sub', 'deeper'), { recursive: true });
    writeFileSync(join(src, 'sub', 'deeper', 'f'), 'new\n');
    const batch = join(base, 'b.qdelta');
    expect((await runQsync(['-a', '--write-batch', batch, `${src}/`, `${dest}/`])).code).toBe(0);
    const r = await runQsync(['apply', batch, copy]);
    expect(r.stderr).not.toMatch(/proc\/self/);
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(join(copy, 'sub', 'deeper', 'f'), 'utf8')).toBe('new\n');
  });

  it('a member named "." or "a/.." is refused as not a path inside the directory, never an internal error', async () => {
    const { writeDelta } = await import('./helpers/delta.js');
    for (const name of ['.', 'a/..', './']) {
      const d = join(base, `t${name.length}`);
      mkdirSync(d);
      const delta = join(base, 'bad.qdelta');
      rmSync(delta, { force: true });
      await writeDelta(delta, [{ name, base: Buffer.alloc(0), result: Buffer.from('x') }], 64 * 1024);
      const r = await runQsync(['apply', delta, d]);
      expect(r.stderr).not.toMatch(/internal/);
      expect(r.stderr).toMatch(/not a path inside the target directory/);
      expect(r.code).toBe(12);
    }
  });
});

describe('bounded reads of files root is given', () => {
  it('--exclude-from a file that says 0 bytes but has more (/proc) is refused after one byte; one that never ends is not read whole', async () => {
    const src = srcTree();
    let r = await runQsync(['-a', '--exclude-from', '/proc/self/status', `${src}/`, join(base, 'dest') + '/']);
    expect(r.stderr).toMatch(/exclude file \/proc\/self\/status grew while qsync read it/);
    expect(r.code).not.toBe(0);
    // 256 GiB of page map behind a size of 0: the old code read it until V8's string limit.
    r = await runQsync(['-a', '--exclude-from', '/proc/self/pagemap', `${src}/`, join(base, 'dest') + '/']);
    expect(r.stderr).not.toMatch(/Invalid string length|internal error|\n\s+at /);
    expect(r.code).not.toBe(0);
  });
});

describe('names cannot forge the output', () => {
  it('-v, -i and --delete print a newline or an escape in a name as rsync does (\\#012), never raw', async () => {
    const src = srcTree();
    const evil = 'a\nqsync error: forged\x1b[31mred';
    writeFileSync(join(src, evil), 'x');
    const dest = join(base, 'dest');
    mkdirSync(dest);
    writeFileSync(join(dest, `old\n${evil}`), 'stale');
    for (const flag of ['-v', '-i']) {
      const r = await runQsync(['-a', '--delete', flag, `${src}/`, `${dest}/`]);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout).not.toMatch(/^qsync error: forged/m);
      expect(r.stdout).not.toContain('\x1b');
      expect(r.stdout).toContain('a\\#012qsync error: forged\\#033[31mred');
      rmSync(dest, { recursive: true });
      mkdirSync(dest);
      writeFileSync(join(dest, `old\n${evil}`), 'stale');
    }
  });
});

describe('delta member names cannot forge the output', () => {
  it('apply prints a crafted member name with a newline or escape as rsync does, never raw', async () => {
    const { writeDelta } = await import('./helpers/delta.js');
    const delta = join(base, 'evil.qdelta');
    const name = 'x\nqsync error: forged\x1b[2J';
    await writeDelta(delta, [{ name, base: Buffer.alloc(0), result: Buffer.from('data') }], 64 * 1024);
    const dir = join(base, 'into');
    mkdirSync(dir);
    const r = await runQsync(['apply', delta, dir]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout + r.stderr).not.toMatch(/^qsync error: forged/m);
    expect(r.stdout + r.stderr).not.toContain('\x1b');
    expect(r.stdout).toContain('x\\#012qsync error: forged\\#033[2J: applied');
  });
});
