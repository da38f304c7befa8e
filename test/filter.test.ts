import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QsyncError } from '../src/core/errors.js';
import { compileFilters, expandFilterFiles, type Filter, type PatternRule } from '../src/core/filter.js';
import { needTools } from './helpers/env.js';

const ex = (pattern: string): PatternRule => ({ type: 'exclude', pattern });
const inc = (pattern: string): PatternRule => ({ type: 'include', pattern });
const excluded = (rules: PatternRule[], path: string, isDir = false): boolean =>
  compileFilters(rules).excluded(path, isDir);

describe('compileFilters', () => {
  it('matches a pattern without a slash against the last component at any depth', () => {
    expect(excluded([ex('*.tmp')], 'a.tmp')).toBe(true);
    expect(excluded([ex('*.tmp')], 'x/y/a.tmp')).toBe(true);
    expect(excluded([ex('*.tmp')], 'a.tmp/b')).toBe(false);
    expect(excluded([ex('cache')], 'var/cache', true)).toBe(true);
    expect(excluded([ex('cache')], 'var/cachex')).toBe(false);
  });

  it('anchors a leading slash at the transfer root', () => {
    expect(excluded([ex('/cache')], 'cache', true)).toBe(true);
    expect(excluded([ex('/cache')], 'var/cache', true)).toBe(false);
    expect(excluded([ex('/v*/c*')], 'var/cache')).toBe(true);
    expect(excluded([ex('/v*/c*')], 'x/var/cache')).toBe(false);
  });

  it('matches a trailing slash only on directories', () => {
    expect(excluded([ex('logs/')], 'a/logs', true)).toBe(true);
    expect(excluded([ex('logs/')], 'a/logs', false)).toBe(false);
  });

  it('matches an inner slash against the tail of the path', () => {
    expect(excluded([ex('b/c')], 'a/b/c')).toBe(true);
    expect(excluded([ex('b/c')], 'a/xb/c')).toBe(false);
    expect(excluded([ex('b/*.img')], 'a/b/d.img')).toBe(true);
    expect(excluded([ex('b/*.img')], 'b/x/d.img')).toBe(false);
  });

  it('distinguishes *, ** and ***', () => {
    expect(excluded([ex('/a/*')], 'a/b/c')).toBe(false);
    expect(excluded([ex('/a/**')], 'a/b/c')).toBe(true);
    expect(excluded([ex('/a/**')], 'a', true)).toBe(false);
    expect(excluded([ex('/a/***')], 'a', true)).toBe(true);
    expect(excluded([ex('/a/***')], 'a/b/c')).toBe(true);
    expect(excluded([ex('**/c')], 'c')).toBe(true);
    expect(excluded([ex('a**z')], 'x/ab/cz')).toBe(true);
  });

  it('supports ?, classes and escapes', () => {
    expect(excluded([ex('disk?.raw')], 'disk1.raw')).toBe(true);
    expect(excluded([ex('disk?.raw')], 'disk10.raw')).toBe(false);
    expect(excluded([ex('disk[0-4].raw')], 'disk3.raw')).toBe(true);
    expect(excluded([ex('disk[!0-4].raw')], 'disk3.raw')).toBe(false);
    expect(excluded([ex('disk[^0-4].raw')], 'disk7.raw')).toBe(true);
    expect(excluded([ex('[[:upper:]]*')], 'Readme')).toBe(true);
    expect(excluded([ex('[[:upper:]]*')], 'readme')).toBe(false);
    expect(excluded([ex('\\*')], '*')).toBe(true);
    expect(excluded([ex('\\*')], 'a')).toBe(false);
    expect(excluded([ex('a?b')], 'a/b')).toBe(false);
  });

  it('lets the first matching rule win, with +/- prefixes and ! clearing', () => {
    const rules = [inc('*.qcow2'), ex('*')];
    expect(excluded(rules, 'vm.qcow2')).toBe(false);
    expect(excluded(rules, 'vm.raw')).toBe(true);
    expect(excluded([ex('+ keep'), ex('*')], 'keep')).toBe(false);
    expect(excluded([inc('- drop'), inc('*')], 'drop')).toBe(true);
    expect(excluded([ex('*'), ex('!'), ex('b')], 'a')).toBe(false);
    expect(excluded([ex('')], 'a')).toBe(false);
    // rsync: "- " or "+ " with no pattern after it is a usage error.
    expect(() => compileFilters([ex('- ')])).toThrow('unexpected end of filter rule: - ');
  });
});

describe('expandFilterFiles', () => {
  it('reads -from files in place, skipping blanks and comments', () => {
    const files: Record<string, string> = { 'ex.txt': '# comment\n+ keep.tmp\r\n\n; other\n*.tmp\rcache/\n' };
    const rules = expandFilterFiles(
      [{ type: 'include', pattern: 'a' }, { type: 'exclude-from', file: 'ex.txt' }, { type: 'exclude', pattern: 'z' }],
      (f) => files[f]!,
    );
    expect(rules).toEqual([inc('a'), ex('+ keep.tmp'), ex('*.tmp'), ex('cache/'), ex('z')]);
    expect(excluded(rules, 'keep.tmp')).toBe(false);
    expect(excluded(rules, 'other.tmp')).toBe(true);
  });

  it('reports an unreadable file as an I/O error naming it', () => {
    const err = (() => {
      try {
        expandFilterFiles([{ type: 'include-from', file: 'nope' }], () => {
          throw new Error('ENOENT');
        });
      } catch (e) {
        return e;
      }
    })();
    expect(err).toBeInstanceOf(QsyncError);
    expect(err).toMatchObject({ code: 'IO', message: 'failed to open include file nope', context: { file: 'nope' } });
  });
});

/** Entries a filter lets through, as rsync's --out-format=%n prints them (dirs with '/'). */
function walk(root: string, filter: Filter, rel = ''): string[] {
  const out: string[] = [];
  for (const d of readdirSync(join(root, rel), { withFileTypes: true })) {
    const path = rel ? `${rel}/${d.name}` : d.name;
    if (filter.excluded(path, d.isDirectory())) continue;
    if (d.isDirectory()) out.push(`${path}/`, ...walk(root, filter, path));
    else out.push(path);
  }
  return out;
}

describe.skipIf(!needTools('rsync'))('filters against real rsync', () => {
  let tmp: string;
  const src = (): string => join(tmp, 'src');

  beforeAll(() => {
    tmp = mkdtempSync(join(tmpdir(), 'qsync-filter-'));
    const files = [
      'disk.qcow2', 'disk.raw', 'disk1.raw', 'disk10.raw', 'a.tmp', 'Readme', 'notes.txt',
      'vm/disk.qcow2', 'vm/disk.qcow2.tmp', 'vm/cache/x.bin', 'vm/cache/sub/y.bin', 'vm/logs/l1.log',
      'cache/root.bin', 'logs', 'deep/a/b/c/d.img', 'deep/a/b/e.img', 'deep/b/c/f.img', 'x/cache', 'sp ace/f [1].txt',
      'c', 'k/z', 'm/k/z', 'q]x', 'we\\ird', 'é.txt',
    ];
    for (const f of files) {
      mkdirSync(join(src(), f, '..'), { recursive: true });
      writeFileSync(join(src(), f), f);
    }
    mkdirSync(join(src(), 'empty'));
    symlinkSync('disk.raw', join(src(), 'link.raw'));
  });
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  const cases: PatternRule[][] = [
    [ex('*.tmp')],
    [ex('cache')],
    [ex('cache/')],
    [ex('/cache')],
    [ex('vm/cache')],
    [ex('/vm/cache/***')],
    [ex('deep/**/*.img')],
    [ex('**/c')],
    [ex('b/c')],
    [ex('a/**')],
    [inc('*/'), inc('*.qcow2'), ex('*')],
    [inc('/vm/'), inc('/vm/***'), ex('*')],
    [ex('disk?.raw'), ex('[R]*'), ex('*[0-9][0-9]*')],
    [ex('[!d]*.raw'), ex('sp ace/*\\[1\\]*')],
    [inc('+ vm/'), ex('- *.qcow2'), ex('*.log')],
    [ex('*/'), inc('disk.raw')],
    [ex('deep/*/b'), ex('l*.raw')],
    [ex('**.img'), ex('*s')],
    [inc('d*/'), inc('deep/a/***'), ex('*')],
    [ex('/*/*/'), ex('*[[:digit:]].raw')],
    [ex('vm/**/'), ex('/*.t?t')],
    [inc('**/b/'), ex('deep/**')],
    // What the manual leaves open, as rsync 3.5 does it (src/core/filter.ts).
    [ex('**/?')], // a leading "**/" of an unanchored pattern may match nothing
    [ex('/**/c'), ex('*/**/z')], // anchored, or between slashes, it may not
    [ex('k/***'), ex('x/cache/***')], // "***" after a folder: the folder (not a file so named) and its contents
    [ex('we\\ird'), ex('[c-a]*'), ex('q[]]x')], // no wildcard: a backslash is itself; a reversed range is its first byte; ']' first in a class
    [ex('we\\ird*'), ex('?.txt')], // a wildcard: a backslash quotes; '?' is one byte of a UTF-8 name
    [ex('a[/]b'), ex('deep/a[!x]b'), ex('[a')], // a class never matches '/'; an unclosed '[' matches nothing
  ];

  it.each(cases.map((rules) => [rules.map((r) => `--${r.type}=${r.pattern}`).join(' '), rules] as const))(
    '%s',
    (_, rules) => {
      const args = rules.map((r) => `--${r.type}=${r.pattern}`);
      const out = execFileSync('rsync', ['-a', '--dry-run', '--out-format=%n', ...args, `${src()}/`, join(tmp, 'dst/')], {
        encoding: 'utf8',
      });
      const viaRsync = out.split('\n').filter((l) => l && l !== './');
      expect(walk(src(), compileFilters(rules)).sort()).toEqual(viaRsync.sort());
    },
  );
});
