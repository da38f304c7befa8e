/**
 * Hostile users against code added late: -A/-X applied by root into a folder
 * another user owns, a hostile client's options and --files-from lines on a
 * `qsync --server --restrict DIR`, and a hostile server's batch members and
 * events on a push. Each case is an attack that once worked, or one that
 * must keep failing.
 */
import { execFileSync, spawn } from 'node:child_process';
import { chownSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { encodeControl, type ControlMessage } from '../src/core/wire.js';
import { HashPool } from '../src/hash/pool.js';
import { Channel } from '../src/remote/channel.js';
import { SourceServer } from '../src/remote/serve-sources.js';
import { TargetServer } from '../src/remote/serve-target.js';
import { receiveFilesFrom } from '../src/remote/session.js';
import { NOBODY, QSYNC } from './helpers/cli.js';
import { needTools } from './helpers/env.js';

const asRoot = process.getuid?.() === 0;
const FAKE = join(import.meta.dirname, 'helpers', 'fake-sender.mjs');

let dir: string;
let n = 0;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'qsync-hostile2-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

const attrsOf = (path: string): string => execFileSync('getfattr', ['--absolute-names', '-d', '-m', '-', path], { encoding: 'utf8' });

describe.skipIf(!needTools('getfattr', 'setfattr') || !asRoot)('-X as root into a folder another user owns, without -o', () => {
  it('a target swapped for the user\'s own file after qsync wrote it gets none of the source\'s attributes', async () => {
    const { ExtAttrs } = await import('../src/sync/ext-attrs.js');
    const { Dir } = await import('../src/io/safe-fs.js');
    const d = join(dir, 'dest');
    mkdirSync(d);
    chownSync(d, NOBODY, NOBODY);
    // The source carries a root-only attribute (as a binary's security.capability would be).
    writeFileSync(join(dir, 'src'), 'tool');
    execFileSync('setfattr', ['-n', 'trusted.qsync-test', '-v', 'root-granted', join(dir, 'src')]);
    // What qsync wrote (a new target), and the user's own file, which the user renames over it.
    writeFileSync(join(d, 'tool'), 'tool');
    writeFileSync(join(d, 'mine'), 'evil');
    chownSync(join(d, 'mine'), NOBODY, NOBODY);
    const ext = new ExtAttrs({ acls: false, xattrs: true, noWrite: false, owners: false });
    const srcDir = await Dir.open(dir);
    const dst = await Dir.open(d);
    try {
      const st = lstatSync(join(dir, 'src'), { bigint: true });
      const pair = await ext.read({ dir: srcDir, name: 'src', expect: st }, undefined, 'other');
      const wrote = lstatSync(join(d, 'tool'), { bigint: true });
      renameSync(join(d, 'mine'), join(d, 'tool')); // the swap, after the write and before the attributes
      await expect(pair.apply({ dir: dst, name: 'tool', expect: st, inode: wrote })).rejects.toThrow(/changed while qsync worked on it/);
      await ext.flush();
      expect(attrsOf(join(d, 'tool'))).not.toMatch(/trusted\.qsync-test/);
    } finally {
      await srcDir.close();
      await dst.close();
    }
  });
});

function scenarioFile(s: Record<string, unknown>): string {
  const p = join(dir, `scenario-${++n}.json`);
  writeFileSync(p, JSON.stringify(s));
  return p;
}

/** A hostile client (test/helpers/fake-sender.mjs) pushing `scenario` into `qsync --server --restrict root`. */
function pushInto(root: string, scenario: Record<string, unknown>): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [FAKE, scenarioFile(scenario), '--push', process.execPath, QSYNC, '--server', '--restrict', root], {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, QSYNC_STATE_DIR: join(dir, 'state') },
    });
    let stderr = '';
    p.stderr.on('data', (d) => (stderr += d));
    p.on('close', (code) => resolve({ code, stderr }));
  });
}

const oneFile = { type: 'dir', entries: { f: { type: 'file', text: 'fine\n' } } };

describe('a hostile client\'s options on a push into --restrict DIR', () => {
  it.each([
    ['usermap', 5],
    ['groupmap', {}],
    ['chmod', [7]],
    ['chmod', 'u+s'],
    ['outFormat', { x: 1 }],
    ['info', { name: 'all' }],
    ['info', [1]],
  ])('option %s = %j is refused as a protocol error naming it: nothing is written', async (k, v) => {
    const root = join(dir, 'jail');
    mkdirSync(root);
    const r = await pushInto(root, { dest: 'd/', options: { recursive: true, [k]: v }, tree: oneFile });
    expect(r.code, r.stderr).toBe(12);
    expect(r.stderr).toMatch(new RegExp(`protocol error: option ${k} `));
    expect(readdirSync(root)).toEqual([]);
  });
});

describe('a hostile server\'s events on a push', () => {
  const report = { path: 'f', itemize: '>f+++++++++', kind: 'file', size: 1, scanned: 1, literal: 1, matched: 0, unchanged: false };
  it.each([
    ['fileEnd', [{ ...report, path: 5 }]],
    ['fileEnd', [null]],
    ['fileEnd', ['x']],
    ['fileEnd', [{ ...report, kind: 'pipe' }]],
    ['deleted', [{}]],
    ['notice', [{}, null]],
    ['info', ['text', 'loud']],
    ['warning', ['text', 5]],
    ['fileProgress', ['f', '1', 1]],
  ])('%s with arguments %j is a protocol error, not an internal one', async (hook, args) => {
    const { eventsTo } = await import('../src/remote/session.js');
    const { createPrinter } = await import('../src/cli/output.js');
    const { parseArgv } = await import('../src/cli/args.js');
    const parsed = parseArgv(['-avi', '--progress', 'a', 'b']);
    if (parsed.kind !== 'sync') throw new Error('not a sync');
    let out = '';
    const sink = { write: (s: string) => ((out += s), true) } as unknown as NodeJS.WriteStream;
    const handle = eventsTo(createPrinter(parsed.options, { stdout: sink, stderr: sink, isTTY: false }, Date.now, true));
    expect(() => handle({ op: 'event', hook, args })).toThrow(/protocol error: a malformed event/);
    expect(out).toBe('');
  });

  it('the events a server sends are printed', async () => {
    const { eventsTo } = await import('../src/remote/session.js');
    const { createPrinter } = await import('../src/cli/output.js');
    const { parseArgv } = await import('../src/cli/args.js');
    const parsed = parseArgv(['-avi', 'a', 'b']);
    if (parsed.kind !== 'sync') throw new Error('not a sync');
    let out = '';
    const sink = { write: (s: string) => ((out += s), true) } as unknown as NodeJS.WriteStream;
    const handle = eventsTo(createPrinter(parsed.options, { stdout: sink, stderr: sink, isTTY: false }, Date.now, true));
    handle({ op: 'event', hook: 'fileStart', args: ['f', 1, 'new'] });
    handle({ op: 'event', hook: 'fileEnd', args: [report] });
    handle({ op: 'event', hook: 'deleted', args: ['gone'] });
    handle({ op: 'event', hook: 'notice', args: ['a notice', null] });
    handle({ op: 'event', hook: 'warning', args: ['a warning', 'f', null] });
    expect(out).toMatch(/>f\+{9} f\n/);
    expect(out).toMatch(/\*deleting +gone/);
    expect(out).toMatch(/a notice/);
    expect(out).toMatch(/a warning/);
  });
});

describe('a hostile server\'s "done" on a push', () => {
  it.each([
    [{ code: 0, stats: { files: 'many' } }],
    [{ code: 0, stats: [1] }],
    [{ code: 1.5 }],
    [{ code: -1 }],
    [{ code: 1e9 }],
  ])('%j is a protocol error', async (body) => {
    const { readDone } = await import('../src/remote/session.js');
    expect(() => readDone({ op: 'done', ...body })).toThrow(/protocol error/);
  });

  it('an honest one is read', async () => {
    const { readDone } = await import('../src/remote/session.js');
    expect(readDone({ op: 'done', code: 23, stats: { files: 2, literal: 5 } })).toMatchObject({ code: 23, stats: { files: 2, literal: 5 } });
  });
});

describe('a hostile server\'s error codes on a pull', () => {
  it.each(['FOO', 'toString', '__proto__'])('an error of code %j ends the run with a failure exit and the server\'s message, never exit 0 or a stack trace', async (code) => {
    const { runQsync } = await import('./helpers/cli.js');
    const r = await runQsync(['-a', '-e', `${process.execPath} ${FAKE} ${scenarioFile({ helloError: code, tree: { type: 'dir', entries: {} } })}`, 'fake:src/', `${join(dir, 'dest')}/`], {
      env: { ...process.env, QSYNC_STATE_DIR: join(dir, 'state') },
    });
    expect(r.code, r.stderr).toBe(11);
    expect(r.stderr).toMatch(/^qsync: refused by the server$/m);
    expect(r.stderr).not.toMatch(/TypeError|    at /);
  });
});

describe('a hostile server\'s batch members on a push with --write-batch', () => {
  it.each(['', 'a//b', 'a/', '/etc/passwd', 'a/../../b', './a'])('a member named %j is a protocol error; the batch is dropped', async (name) => {
    const { BatchRecorder } = await import('../src/remote/batch-relay.js');
    const { DeltaFileWriter } = await import('../src/io/delta-file.js');
    const path = join(dir, 'batch.qdelta');
    const w = await DeltaFileWriter.create(path);
    const rec = new BatchRecorder(w, 65536);
    await expect(rec.take({ op: 'b-begin', name, blockSize: 65536, baseSize: 0, resultSize: 1 })).rejects.toThrow(/protocol error: a member named/);
    expect(await rec.close(true)).toBe(false);
    expect(readdirSync(dir)).toEqual([]);
  });
});

describe('--files-from names with a NUL byte', () => {
  it('a local list: the run says which name and what to do, not an internal error', async () => {
    const { runQsync } = await import('./helpers/cli.js');
    mkdirSync(join(dir, 'src'));
    writeFileSync(join(dir, 'src', 'a'), 'a');
    writeFileSync(join(dir, 'list'), 'a\0b\na\n');
    const r = await runQsync(['-a', `--files-from=${join(dir, 'list')}`, `${join(dir, 'src')}/`, `${join(dir, 'dest')}/`], { env: { ...process.env, QSYNC_STATE_DIR: join(dir, 'state') } });
    expect(r.stderr).not.toMatch(/internal/);
    expect(r.stderr).toMatch(/--files-from .*list: the name "a\\u0000b" holds a NUL byte/);
    expect(r.code).toBe(1);
  });

  it('lines a hostile client sends to --restrict DIR: refused the same way, nothing written', async () => {
    const root = join(dir, 'jail');
    mkdirSync(root);
    const r = await pushInto(root, { dest: 'd/', options: { relative: true, dirs: true }, hello: { filesFrom: 'list' }, filesFrom: ['f\0x', 'f'], tree: oneFile });
    expect(r.stderr).toMatch(/holds a NUL byte/);
    expect(r.code).toBe(1);
    expect(readdirSync(root)).toEqual([]);
  });
});

/** A channel as the serving end sees it, and what a hostile peer writes into it. */
function fromPeer(): { ch: Channel; send(m: ControlMessage): void } {
  const toServer = new PassThrough();
  return { ch: new Channel(toServer, new PassThrough()), send: (m) => void toServer.write(encodeControl(m)) };
}

describe('a hostile client\'s requests on a pull', () => {
  it.each(['toString', 'constructor', '__proto__', 'hasOwnProperty'])('a request named %j is no request: serve() ends on it as on any message it does not serve', async (op) => {
    const peer = fromPeer();
    const pool = new HashPool(65536);
    try {
      const served = new SourceServer(peer.ch, pool).serve();
      peer.send({ op });
      await expect(served).resolves.toMatchObject({ op });
    } finally {
      await pool.close();
    }
  });
});

describe('a hostile client\'s --files-from lines', () => {
  it('many one-character names are bounded by their count, not only their characters', async () => {
    const many = fromPeer();
    const got = receiveFilesFrom(many.ch, 1024);
    many.send({ op: 'files-from', names: Array.from({ length: 40 }, () => 'a') });
    many.send({ op: 'files-from-end' });
    await expect(got).rejects.toThrow(/more than 32 names/);
    const fine = fromPeer();
    const ok = receiveFilesFrom(fine.ch, 1024);
    fine.send({ op: 'files-from', names: Array.from({ length: 32 }, () => 'a') });
    fine.send({ op: 'files-from-end' });
    await expect(ok).resolves.toHaveLength(32);
  });
});

describe('a hostile client\'s requests to a target server', () => {
  it.each(['toString', 'constructor', '__proto__', 'hasOwnProperty'])('a request named %j is no request: serve() ends on it', async (op) => {
    const peer = fromPeer();
    const served = new TargetServer(peer.ch, new Map()).serve();
    peer.send({ op });
    await expect(served).resolves.toMatchObject({ op });
  });
});

describe('a hostile client\'s "__proto__" option on a push into --restrict DIR', () => {
  it.each(['writeBatch', 'onlyWriteBatch', 'manifest'])('options {"__proto__": {"%s": PATH}} make no file at PATH, outside DIR', async (k) => {
    const root = join(dir, 'jail');
    mkdirSync(root);
    const pwned = join(dir, 'pwned');
    const options = JSON.parse(`{"recursive": true, "__proto__": {${JSON.stringify(k)}: ${JSON.stringify(pwned)}}}`) as Record<string, unknown>;
    const r = await pushInto(root, { dest: 'd/', options, tree: oneFile });
    expect(r.code, r.stderr).toBe(0);
    expect(readdirSync(dir).filter((x) => !x.startsWith('scenario-') && x !== 'state' && x !== 'jail')).toEqual([]);
    expect(readdirSync(join(root, 'd'))).toEqual(['f']);
  });
});

describe('filter patterns with many stars', () => {
  it('a pattern of many "**" and "*" against a long name is answered (no backtracking blow-up), as the same pattern as a regular expression answers short ones', async () => {
    const { compileFilters, wildmatch } = await import('../src/core/filter.js');
    const evil = compileFilters([{ type: 'exclude', pattern: '**a**a**a**a**a**a**a**a**b' }, { type: 'exclude', pattern: '*a*a*a*a*a*a*a*a*a*a*c' }]);
    expect(evil.excluded('a'.repeat(250), false)).toBe(false);
    expect(evil.excluded(`${'a/'.repeat(120)}b`, false)).toBe(true);
    expect(wildmatch('*a*a*a*a*a*a*a*a*a*b', 'a'.repeat(250))).toBe(false);
    // The same answers as the backtracking expression on names short enough for it, for patterns of every token.
    const reOf = (p: string) => {
      let re = '';
      for (let i = 0; i < p.length; ) {
        if (p.startsWith('**', i)) (re += '.*'), (i += 2);
        else if (p[i] === '*') (re += '[^/]*'), i++;
        else if (p[i] === '?') (re += '[^/]'), i++;
        else if (p.startsWith('[ab]', i)) (re += '(?!/)[ab]'), (i += 4);
        else (re += p[i] === '/' ? '\\/' : p[i]), i++;
      }
      return new RegExp(`^${re}$`, 's');
    };
    let seed = 7;
    const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff), seed % n);
    const pieces = ['a', 'b', '/', '*', '**', '?', '[ab]'];
    for (let k = 0; k < 3000; k++) {
      const p = Array.from({ length: 1 + rand(6) }, () => pieces[rand(pieces.length)]).join('');
      const text = Array.from({ length: rand(8) }, () => 'ab/'[rand(3)]).join('');
      expect(wildmatch(p, text), `${p} ${text}`).toBe(reOf(p).test(text));
    }
  });
});

describe('a hostile server\'s symlink targets on a pull', () => {
  it.each([['a\0b'], [''], ['x'.repeat(5000)]])('a target %# (NUL, empty, longer than PATH_MAX) ends the run as a protocol error (exit 12)', async (target) => {
    const { runQsync } = await import('./helpers/cli.js');
    const tree = { type: 'dir', entries: { l: { type: 'link', target }, f: { type: 'file', text: 'x' } } };
    const r = await runQsync(['-a', '-e', `${process.execPath} ${FAKE} ${scenarioFile({ tree })}`, 'fake:src/', `${join(dir, 'dest')}/`], {
      env: { ...process.env, QSYNC_STATE_DIR: join(dir, 'state') },
    });
    expect(r.stderr).toMatch(/protocol error: a symlink target that is not one/);
    expect(r.code).toBe(12);
  });
});

describe.skipIf(!asRoot)('--log-file as root through a folder another user owns', () => {
  it('a folder on the way swapped for the user\'s symlink to a root-only folder: no log is made there, the run says why', async () => {
    const { runQsync } = await import('./helpers/cli.js');
    const { symlinkSync, existsSync, lchownSync } = await import('node:fs');
    const victim = join(dir, 'victim');
    mkdirSync(victim, { mode: 0o700 });
    const home = join(dir, 'home');
    mkdirSync(home);
    chownSync(home, NOBODY, NOBODY);
    // The user's folder, where root was asked to log, is now the user's symlink to the root-only folder.
    symlinkSync(victim, join(home, 'logs'));
    lchownSync(join(home, 'logs'), NOBODY, NOBODY);
    mkdirSync(join(dir, 'src'));
    writeFileSync(join(dir, 'src', 'f'), 'x');
    const r = await runQsync(['-a', `--log-file=${join(home, 'logs', 'q.log')}`, `${join(dir, 'src')}/`, `${join(dir, 'dest')}/`], { env: { ...process.env, QSYNC_STATE_DIR: join(dir, 'state') } });
    expect(readdirSync(victim)).toEqual([]);
    expect(r.stderr).toMatch(/is a symlink owned by uid 65534/);
    expect(r.code).toBe(11);
    expect(existsSync(join(dir, 'dest'))).toBe(false);
  });

  it('a FIFO in the log\'s place is refused, not waited on', async () => {
    const { runQsync } = await import('./helpers/cli.js');
    execFileSync('mkfifo', [join(dir, 'q.log')]);
    mkdirSync(join(dir, 'src'));
    const r = await runQsync(['-a', `--log-file=${join(dir, 'q.log')}`, `${join(dir, 'src')}/`, `${join(dir, 'dest')}/`], { env: { ...process.env, QSYNC_STATE_DIR: join(dir, 'state') } });
    expect(r.stderr).toMatch(/failed to open log-file .*q\.log: no such device or address \(ENXIO\)/);
    expect(r.code).toBe(11);
  });
});

describe('a hostile client\'s operands on a pull from --restrict DIR', () => {
  it.each(['', '.', './', 'a/..', '..', '/'])('"open-parent" of %j holds no folder outside DIR', async (operand) => {
    const { PassThrough } = await import('node:stream');
    const { Channel } = await import('../src/remote/channel.js');
    const { SourceServer } = await import('../src/remote/serve-sources.js');
    const { HashPool } = await import('../src/hash/pool.js');
    const { encodeControl, WireDecoder } = await import('../src/core/wire.js');
    const root = join(dir, 'jail');
    mkdirSync(join(root, 'a'), { recursive: true });
    const toServer = new PassThrough();
    const fromServer = new PassThrough();
    const answers: Record<string, unknown>[] = [];
    const decoder = new WireDecoder((f) => f.type === 'control' && answers.push(f.msg));
    fromServer.on('data', (c: Buffer) => decoder.push(c));
    const pool = new HashPool(65536);
    try {
      const served = new SourceServer(new Channel(toServer, fromServer), pool, root).serve();
      toServer.write(encodeControl({ op: 'open-parent', operand }));
      toServer.write(encodeControl({ op: 'bye' }));
      await served;
      expect(answers).toHaveLength(1);
      expect(answers[0]!.op, JSON.stringify(answers[0])).toBe('error');
    } finally {
      await pool.close();
    }
  });
});
