/**
 * Where qsync keeps its state: outside DEST, in a folder keyed by the
 * destination's real path (docs/FORMATS.md "State folder").
 */
import { chmodSync, chownSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { setStateBase, stateBase, stateFolderFor, stateFolderIn } from '../src/sync/state-dir.js';
import { NOBODY, runQsync } from './helpers/cli.js';
import { SMALL_FILE_MAX } from '../src/sync/small-file.js';

/** A file that gets a manifest (a small one has none: src/sync/small-file.ts). */
const BIG = SMALL_FILE_MAX + 4096;

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'qsync-statedir-'));
  chmodSync(dir, 0o711); // nobody passes through to a home of its own
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('the state base', () => {
  const saved = { ...process.env };
  afterEach(() => {
    process.env = { ...saved };
    setStateBase(undefined);
  });

  it('--state-dir, else $QSYNC_STATE_DIR, else /var/lib/qsync for root or $XDG_STATE_HOME/qsync', () => {
    setStateBase('/srv/st');
    expect(stateBase()).toBe('/srv/st');
    setStateBase(undefined);
    process.env.QSYNC_STATE_DIR = '/a/b';
    expect(stateBase()).toBe('/a/b');
    delete process.env.QSYNC_STATE_DIR;
    if (process.geteuid?.() === 0) expect(stateBase()).toBe('/var/lib/qsync');
    else {
      process.env.XDG_STATE_HOME = '/x/state';
      expect(stateBase()).toBe('/x/state/qsync');
      process.env.XDG_STATE_HOME = 'relative/ignored';
      process.env.HOME = '/home/u';
      expect(stateBase()).toBe('/home/u/.local/state/qsync');
    }
  });

  it('keys a destination by its real path: through a symlink, or not yet made, the same folder', () => {
    const real = join(dir, 'real');
    mkdirSync(real);
    symlinkSync(real, join(dir, 'via'));
    expect(stateFolderIn('/B', join(dir, 'via'))).toBe(stateFolderIn('/B', real));
    const later = stateFolderIn('/B', join(dir, 'later', 'x'));
    mkdirSync(join(dir, 'later', 'x'), { recursive: true });
    expect(stateFolderIn('/B', join(dir, 'later', 'x'))).toBe(later);
    expect(stateFolderIn('/B', join(dir, 'other'))).not.toBe(stateFolderIn('/B', real));
    expect(stateFolderIn('/B', real)).toMatch(/^\/B\/dest\/real-[0-9a-f]{24}$/);
    // A name of any bytes gives a plain folder name.
    expect(stateFolderIn('/B', join(dir, 'we ird\u{dcff}\n'))).toMatch(/^\/B\/dest\/we_ird__-[0-9a-f]{24}$/);
    expect(stateFolderIn('/B', '/')).toMatch(/^\/B\/dest\/root-[0-9a-f]{24}$/);
  });
});

describe('end to end', () => {
  it('a user without --state-dir gets $XDG_STATE_HOME/qsync, made 0700; DEST holds the mirror only', async () => {
    const home = join(dir, 'home');
    mkdirSync(join(home, 'src'), { recursive: true });
    writeFileSync(join(home, 'src', 'f'), Buffer.alloc(BIG, 1));
    chownSync(home, NOBODY, NOBODY);
    chownSync(join(home, 'src'), NOBODY, NOBODY);
    const { QSYNC_STATE_DIR: _unused, ...rest } = process.env;
    const env = { ...rest, XDG_STATE_HOME: join(home, 'xdg') };
    // runQsync sets nobody's test base; run setpriv directly so the user's default applies.
    const { spawnSync } = await import('node:child_process');
    const { AS_NOBODY, QSYNC } = await import('./helpers/cli.js');
    const r = spawnSync('setpriv', [...AS_NOBODY, 'node', QSYNC, '-a', `${home}/src/`, `${home}/dest/`], { env, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(readdirSync(join(home, 'dest'))).toEqual(['f']);
    const base = join(home, 'xdg', 'qsync');
    expect(statSync(base).mode & 0o777).toBe(0o700);
    expect(statSync(base).uid).toBe(NOBODY);
    const folder = stateFolderIn(base, join(home, 'dest'));
    expect(readFileSync(join(folder, 'dest'), 'utf8')).toBe(`${join(home, 'dest')}\n`);
    expect(readdirSync(join(folder, 'manifests'))).toEqual(['f.qsm']);
  });

  it('--state-dir puts the state there; the same DEST with another --state-dir compares (nothing is lost)', async () => {
    const src = join(dir, 'e2e-src');
    const dest = join(dir, 'e2e-dest');
    mkdirSync(src);
    writeFileSync(join(src, 'f.img'), Buffer.alloc(BIG, 7));
    const a = join(dir, 'state-a');
    expect((await runQsync(['-a', '--state-dir', a, `${src}/`, `${dest}/`])).code).toBe(0);
    expect(readdirSync(join(stateFolderIn(a, dest), 'manifests'))).toEqual(['f.img.qsm']);
    writeFileSync(join(src, 'f.img'), Buffer.alloc(BIG, 8));
    const b = join(dir, 'state-b');
    const r = await runQsync(['-a', '--json', '--state-dir', b, `${src}/`, `${dest}/`]);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout).files.find((f: { path: string }) => f.path === 'f.img').method).toBe('compare');
    expect(readFileSync(join(dest, 'f.img')).equals(readFileSync(join(src, 'f.img')))).toBe(true);
    expect(stateFolderFor(dest)).not.toBe(stateFolderIn(b, dest));
  });
});

describe('a state base inside SRC or DEST', () => {
  const tree = (root: string): string[] => {
    const out: string[] = [];
    const walk = (rel: string) => {
      for (const n of readdirSync(join(root, rel)).sort()) {
        const r = rel ? `${rel}/${n}` : n;
        out.push(r);
        if (statSync(join(root, r)).isDirectory()) walk(r);
      }
    };
    walk('');
    return out;
  };

  it('--state-dir inside a DEST not made yet, with --delete: the run works, the state stays and is used again', async () => {
    const src = join(dir, 'in-dest-src');
    const dest = join(dir, 'in-dest-dest');
    mkdirSync(src);
    writeFileSync(join(src, 'f.img'), Buffer.alloc(BIG, 7));
    const st = join(dest, '.st');
    const first = await runQsync(['-a', '--delete', '--state-dir', st, `${src}/`, `${dest}/`]);
    expect(first.stderr).toBe('');
    expect(first.code).toBe(0);
    const folder = stateFolderIn(st, dest);
    expect(readdirSync(join(folder, 'manifests'))).toEqual(['f.img.qsm']);
    writeFileSync(join(src, 'g'), Buffer.alloc(BIG, 2));
    const second = await runQsync(['-a', '--delete', '--json', '--state-dir', st, `${src}/`, `${dest}/`]);
    expect(second.code, second.stderr).toBe(0);
    const doc = JSON.parse(second.stdout);
    expect(doc.files.some((f: { path: string }) => f.path.startsWith('.st'))).toBe(false);
    // --delete left qsync's own state alone: its record of DEST, its manifests.
    expect(readFileSync(join(folder, 'dest'), 'utf8')).toBe(`${dest}\n`);
    expect(readdirSync(join(folder, 'manifests')).sort()).toEqual(['f.img.qsm', 'g.qsm']);
    expect(readFileSync(join(dest, 'g')).equals(Buffer.alloc(BIG, 2))).toBe(true);
  });

  it('--state-dir inside SRC: qsync\'s state is not copied into the mirror', async () => {
    const src = join(dir, 'in-src-src');
    const dest = join(dir, 'in-src-dest');
    mkdirSync(src);
    writeFileSync(join(src, 'a'), Buffer.alloc(BIG, 1));
    const st = join(src, 'state');
    for (let i = 0; i < 2; i++) {
      const r = await runQsync(['-a', '--delete', '--state-dir', st, `${src}/`, `${dest}/`]);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toMatch(/^qsync: skipping state\/: it is qsync's state folder\n$/);
    }
    expect(tree(dest)).toEqual(['a']);
    expect(readdirSync(join(stateFolderIn(st, dest), 'manifests'))).toEqual(['a.qsm']);
  });

  it('a DEST inside the state base is refused before anything is written', async () => {
    const src = join(dir, 'under-src');
    mkdirSync(src);
    writeFileSync(join(src, 'a'), 'a');
    const st = join(dir, 'under-base');
    mkdirSync(st, { mode: 0o700 });
    for (const dest of [join(st, 'dest'), st]) {
      const r = await runQsync(['-a', '--state-dir', st, `${src}/`, `${dest}/`]);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/inside qsync's state folder/);
      expect(r.stderr).not.toMatch(/internal error|\n\s+at /);
    }
    expect(readdirSync(st)).toEqual([]);
  });
});

describe('qsync restore and another state base', () => {
  it('finds the history of a mirror file whatever --state-dir says: none there, or one holding an outer folder\'s state', async () => {
    const src = join(dir, 'hist-src');
    const outer = join(dir, 'hist-outer');
    const dest = join(outer, 'dest');
    const hist = join(dir, 'hist-dir');
    mkdirSync(src);
    mkdirSync(outer);
    const a = join(dir, 'hist-base-a');
    for (const fill of [1, 2, 3]) {
      writeFileSync(join(src, 'f.img'), Buffer.alloc(BIG, fill));
      const r = await runQsync(['-a', '--state-dir', a, '--backup-dir', hist, `${src}/`, `${dest}/`]);
      expect(r.code, r.stderr).toBe(0);
    }
    const points = (out: string) => out.split('\n').filter((l) => /^\s+\d+\s/.test(l)).length;
    const withA = await runQsync(['restore', '--state-dir', a, '--backup-dir', hist, '--list', join(dest, 'f.img')]);
    expect(withA.code, withA.stderr).toBe(0);
    expect(points(withA.stdout)).toBe(3);
    // A base with no state for DEST; then one that has state for the folder above DEST.
    const b = join(dir, 'hist-base-b');
    const none = await runQsync(['restore', '--state-dir', b, '--backup-dir', hist, '--list', join(dest, 'f.img')]);
    expect(none.stderr).toBe('');
    expect(none.code).toBe(0);
    expect(points(none.stdout)).toBe(3);
    mkdirSync(join(dir, 'hist-other'));
    expect((await runQsync(['-a', '--state-dir', b, `${join(dir, 'hist-other')}/`, `${outer}/`])).code).toBe(0);
    const outerState = await runQsync(['restore', '--state-dir', b, '--backup-dir', hist, '--list', join(dest, 'f.img')]);
    expect(outerState.stderr).toBe('');
    expect(outerState.code).toBe(0);
    expect(points(outerState.stdout)).toBe(3);
    const out = join(dir, 'hist-restored.img');
    const r = await runQsync(['restore', '--state-dir', b, '--backup-dir', hist, '--at', '2', join(dest, 'f.img'), out]);
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(out).equals(Buffer.alloc(BIG, 1))).toBe(true);
  });

  it('a target the history does not name, in no synced destination: a clear error, nothing on stdout', async () => {
    const hist = join(dir, 'hist-empty');
    mkdirSync(hist, { mode: 0o700 });
    const f = join(dir, 'lonely.img');
    writeFileSync(f, 'x');
    const r = await runQsync(['restore', '--state-dir', join(dir, 'hist-base-c'), '--backup-dir', hist, '--list', f]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/not in a destination qsync synced/);
  });
});

describe('an empty --state-dir', () => {
  it('is refused (an unset variable in a script), not taken as the current folder', async () => {
    const cwd = join(dir, 'empty-cwd');
    mkdirSync(cwd);
    const src = join(dir, 'empty-src');
    mkdirSync(src);
    writeFileSync(join(src, 'f'), 'x');
    const { spawnSync } = await import('node:child_process');
    const { QSYNC } = await import('./helpers/cli.js');
    for (const args of [['-a', '--state-dir', '', `${src}/`, `${join(dir, 'empty-dest')}/`], ['verify', '--state-dir', '', join(src, 'f')]]) {
      const r = spawnSync('node', [QSYNC, ...args], { cwd, encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(1);
      expect(r.stderr).toMatch(/--state-dir/);
      expect(readdirSync(cwd)).toEqual([]);
    }
  });
});
