/**
 * A hostile user against root running qsync: paths root is given (state,
 * history) that lead through folders the user controls, and names qsync
 * cannot represent. Each case was found by attacking the built CLI.
 */
import { chmodSync, chownSync, lchownSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { runQsync } from './helpers/cli.js';

const NOBODY = 65534;
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

describe('names qsync cannot represent', () => {
  it('a source name that is not UTF-8 is an error naming it (exit 23), not a file that "vanished" (exit 24)', async () => {
    const src = srcTree();
    writeFileSync(Buffer.concat([Buffer.from(`${src}/bad`), Buffer.from([0xff])]), 'data\n');
    const r = await runQsync(['-a', `${src}/`, join(base, 'dest') + '/']);
    expect(r.stderr).not.toMatch(/vanished/);
    expect(r.stderr).toMatch(/bad.*not valid UTF-8/);
    expect(r.code).toBe(23);
    expect(readFileSync(join(base, 'dest', 'f'), 'utf8')).toBe('one\n');
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
