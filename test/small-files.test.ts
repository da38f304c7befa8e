/**
 * Small files (src/sync/small-file.ts): no manifest, rsync's quick check,
 * whole files through a temporary name, times given once the batch is durable.
 */
import { linkSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SMALL_FILE_MAX } from '../src/sync/small-file.js';
import { runQsync, stateOf } from './helpers/cli.js';

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'qsync-small-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const manifests = (dest: string): string[] => {
  try {
    return readdirSync(join(stateOf(dest), 'manifests'), { recursive: true }).map(String).filter((n) => n.endsWith('.qsm')).sort();
  } catch {
    return [];
  }
};

describe('small files', () => {
  it('a tree of small files is copied with its times and keeps no manifest; a big file beside them keeps one', async () => {
    const src = join(dir, 'tree-src');
    const dest = join(dir, 'tree-dest');
    for (let i = 0; i < 1500; i++) {
      const sub = join(src, `d${i % 7}`);
      mkdirSync(sub, { recursive: true });
      writeFileSync(join(sub, `f${i}`), Buffer.alloc(i * 37, i % 251));
    }
    writeFileSync(join(src, 'edge'), Buffer.alloc(SMALL_FILE_MAX, 1));
    writeFileSync(join(src, 'big.img'), Buffer.alloc(SMALL_FILE_MAX + 1, 2));
    const r = await runQsync(['-a', `${src}/`, `${dest}/`]);
    expect(r.code, r.stderr).toBe(0);
    expect(manifests(dest)).toEqual(['big.img.qsm']);
    for (const rel of ['d3/f1403', 'edge', 'big.img', 'd0/f0']) {
      expect(readFileSync(join(dest, rel)).equals(readFileSync(join(src, rel))), rel).toBe(true);
      // qsync sets times to the microsecond.
      const us = (p: string) => statSync(p, { bigint: true }).mtimeNs / 1000n;
      expect(us(join(dest, rel)), rel).toBe(us(join(src, rel)));
    }
    // Nothing left under a temporary name.
    expect(readdirSync(join(dest, 'd3')).filter((n) => n.startsWith('.'))).toEqual([]);
  });

  it('the quick check is size and mtime, as rsync; -c compares the bytes', async () => {
    const src = join(dir, 'quick-src');
    const dest = join(dir, 'quick-dest');
    mkdirSync(src);
    const t = new Date('2020-01-01T00:00:00Z');
    writeFileSync(join(src, 'f'), 'one\n');
    utimesSync(join(src, 'f'), t, t);
    expect((await runQsync(['-a', `${src}/`, `${dest}/`])).code).toBe(0);
    writeFileSync(join(src, 'f'), 'two\n');
    utimesSync(join(src, 'f'), t, t);
    expect((await runQsync(['-a', `${src}/`, `${dest}/`])).code).toBe(0);
    expect(readFileSync(join(dest, 'f'), 'utf8')).toBe('one\n');
    const c = await runQsync(['-a', '-c', '-i', `${src}/`, `${dest}/`]);
    expect(c.code, c.stderr).toBe(0);
    expect(c.stdout).toMatch(/^>fc\.+ f$/m); // as rsync -c says it
    expect(readFileSync(join(dest, 'f'), 'utf8')).toBe('two\n');
  });

  it('a target with another link is replaced: the other name keeps its data; an old manifest of the name goes', async () => {
    const src = join(dir, 'link-src');
    const dest = join(dir, 'link-dest');
    mkdirSync(src);
    writeFileSync(join(src, 'f'), Buffer.alloc(SMALL_FILE_MAX + 10, 3));
    expect((await runQsync(['-a', `${src}/`, `${dest}/`])).code).toBe(0);
    // The target was big: this run still goes through its manifest, and leaves one.
    writeFileSync(join(src, 'f'), 'small now\n');
    expect((await runQsync(['-a', `${src}/`, `${dest}/`])).code).toBe(0);
    expect(manifests(dest)).toEqual(['f.qsm']);
    writeFileSync(join(src, 'f'), 'and changed\n');
    linkSync(join(dest, 'f'), join(dir, 'other-name'));
    const r = await runQsync(['-a', `${src}/`, `${dest}/`]);
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(join(dest, 'f'), 'utf8')).toBe('and changed\n');
    expect(readFileSync(join(dir, 'other-name'), 'utf8')).toBe('small now\n');
    expect(manifests(dest)).toEqual([]);
  });
});
