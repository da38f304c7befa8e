/**
 * A hostile far side, end to end through the built CLI: a pull whose
 * server lies (test/helpers/fake-sender.mjs, given as -e), and a push into
 * `qsync --server --restrict DIR` from a client that lies. Whatever the
 * peer says, nothing may be written or removed outside the receiving end's
 * DEST and state folder, and the run must end with a protocol error.
 */
import { spawn } from 'node:child_process';
import { PassThrough } from 'node:stream';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { encodeControl, encodeZero, WireDecoder, type ControlMessage } from '../src/core/wire.js';
import { Channel } from '../src/remote/channel.js';
import { RemoteSources } from '../src/remote/remote-sources.js';
import { statsFromWire } from '../src/remote/wire-stats.js';
import { QSYNC, runQsync, type RunResult } from './helpers/cli.js';

const FAKE = join(import.meta.dirname, 'helpers', 'fake-sender.mjs');

let dir: string;
let state: string;
let n = 0;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'qsync-hostile-'));
  state = join(dir, 'state');
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

type Node = { type: 'dir'; entries: Record<string, Node> } | { type: 'file'; text: string } | { type: 'link'; target: string };
const tree = (entries: Record<string, Node>): Node => ({ type: 'dir', entries });
const file = (text: string): Node => ({ type: 'file', text });

function scenarioFile(s: Record<string, unknown>): string {
  const p = join(dir, `scenario-${++n}.json`);
  writeFileSync(p, JSON.stringify(s));
  return p;
}

/** `qsync ARGS fake:src/ DEST` against the fake sender playing `scenario`. */
function pull(scenario: Record<string, unknown>, dest: string, args: string[] = []): Promise<RunResult> {
  return runQsync(['-a', ...args, '-e', `${process.execPath} ${FAKE} ${scenarioFile(scenario)}`, 'fake:src/', `${dest}/`], { env: { ...process.env, QSYNC_STATE_DIR: state } });
}

/** A hostile client pushing `scenario.tree` into `qsync --server --restrict root`. */
function pushInto(root: string, scenario: Record<string, unknown>): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [FAKE, scenarioFile(scenario), '--push', process.execPath, QSYNC, '--server', '--restrict', root], {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, QSYNC_STATE_DIR: state },
    });
    let stderr = '';
    p.stderr.on('data', (d) => (stderr += d));
    p.on('close', (code) => resolve({ code, stderr }));
  });
}

/** What is in the test's folder besides the scenarios, DEST or DIR, the state base and the folder a test plants. */
const stray = (): string[] => readdirSync(dir).filter((x) => !x.startsWith('scenario-') && !['dest', 'jail', 'state', 'victim'].includes(x));

/** Every path below `root`, relative, sorted. */
function walk(root: string, rel = ''): string[] {
  const out: string[] = [];
  for (const e of readdirSync(join(root, rel), { withFileTypes: true })) {
    const r = rel ? `${rel}/${e.name}` : e.name;
    out.push(r);
    if (e.isDirectory()) out.push(...walk(root, r));
  }
  return out.sort();
}

// Names a listing may not hold: each would reach another place once joined to a path on the receiving end.
const ESCAPES = ['../../../../../../../../../../PWN', 'x/../../../../../../../../../../PWN', 'a/b', '..', '.', ''];

describe('a pull from a hostile server', () => {
  it.each(ESCAPES)('a listing naming %j is refused: exit 12, nothing written outside DEST and its state', async (evil) => {
    const target = evil.replace('PWN', join(dir, 'pwn').slice(1));
    const dest = join(dir, 'dest');
    const r = await pull({ tree: tree({ ok: file('fine\n'), [target]: file('evil\n') }) }, dest);
    expect(r.code, r.stderr).toBe(12);
    expect(r.stderr).toMatch(/protocol error: .*not a name in a folder/);
    expect(r.stderr).not.toMatch(/internal error|at .*\.js:\d+/);
    expect(stray()).toEqual([]);
    if (existsSync(dest)) expect(walk(dest).filter((p) => p !== 'ok')).toEqual([]);
  });

  it('--delete with a name that climbs out cannot remove a tree outside DEST', async () => {
    const dest = join(dir, 'dest');
    const victim = join(dir, 'victim');
    mkdirSync(join(victim, 'important'), { recursive: true });
    writeFileSync(join(victim, 'important', 'file'), 'precious\n');
    const inner = tree({ important: tree({ f: file('x') }) });
    const first = await pull({ tree: tree({ victim: inner }) }, dest);
    expect(first.code, first.stderr).toBe(0);
    // The same folder again under a name that climbs to `victim`, now listed empty: --delete clears it below that name.
    const climb = `x/${'../'.repeat(20)}${victim.slice(1)}`;
    const r = await pull({ tree: tree({ victim: inner, [climb]: tree({}) }) }, dest, ['--delete']);
    expect(r.code, r.stderr).toBe(12);
    expect(readFileSync(join(victim, 'important', 'file'), 'utf8')).toBe('precious\n');
  });

  it('a listing naming one entry twice is refused', async () => {
    const dest = join(dir, 'dest');
    const r = await pull({ tree: tree({ a: file('a') }), dupes: true }, dest);
    expect(r.code, r.stderr).toBe(12);
    expect(r.stderr).toMatch(/twice/);
  });

  it('a name in another spelling of the same bytes is refused', async () => {
    // U+DCC3 U+DCA9 stand for the bytes C3 A9, which decode as "é": a second name for the same file.
    const dest = join(dir, 'dest');
    const r = await pull({ tree: tree({ 'caf\udcc3\udca9': file('a'), 'café': file('b') }) }, dest);
    expect(r.code, r.stderr).toBe(12);
  });

  it.each(['outside', 'badhash'])('a scan whose data lies (%s) ends the run with exit 12: no later request is answered by its leftovers', async (lie) => {
    const dest = join(dir, 'dest');
    const r = await pull({ tree: tree({ a: { type: 'file', text: 'aaaa', lie } as Node, b: file('bbbb'), c: file('cccc'), d: tree({ e: file('e') }) }) }, dest);
    expect(r.code, r.stderr).toBe(12);
    expect(r.stderr).toMatch(lie === 'outside' ? /protocol error: data for blocks 1000\.\.1001/ : /does not hash to the digests sent with it/);
    // One protocol error, not a cascade of answers taken for other requests.
    expect(r.stderr.match(/protocol error/g)).toHaveLength(1);
    expect(walk(dest)).toEqual([]);
  });

  it('a scan-end with a wrong fingerprint: the target gets no manifest, the next honest run converges and verifies', async () => {
    const dest = join(dir, 'dest');
    const liar = await pull({ tree: tree({ a: file('aaaa') }), scanEnd: 'wrong' }, dest);
    expect(liar.code, liar.stderr).toBe(23);
    expect(liar.stderr).toMatch(/do not add up to the source's digests/);
    expect(existsSync(join(dest, 'a'))).toBe(false);
    const honest = await pull({ tree: tree({ a: file('aaaa') }) }, dest);
    expect(honest.code, honest.stderr).toBe(0);
    const v = await runQsync(['verify', join(dest, 'a')], { env: { ...process.env, QSYNC_STATE_DIR: state } });
    expect(v.code, v.stdout + v.stderr).toBe(0);
  });

  it('a server that closes the channel after its hello: one error, exit 12, as rsync\'s "connection unexpectedly closed", at once', async () => {
    const t0 = Date.now();
    const r = await pull({ tree: tree({ a: file('a') }), closeAfterHello: true, lingerMs: 200 }, join(dir, 'dest'));
    expect(Date.now() - t0).toBeLessThan(3000);
    expect(r.code, r.stderr).toBe(12);
    expect(r.stderr).toMatch(/connection unexpectedly closed/);
    expect(r.stderr.match(/^qsync error:/gm), r.stderr).toHaveLength(1);
    expect(existsSync(join(dir, 'dest'))).toBe(false);
  });
});

describe('a push from a hostile client into --restrict DIR', () => {
  it.each(ESCAPES)('a listing naming %j is refused: nothing written outside DIR and the state base', async (evil) => {
    const root = join(dir, 'jail');
    mkdirSync(root);
    const target = evil.replace('PWN', join(dir, 'pwn').slice(1));
    const r = await pushInto(root, { dest: 'd/', options: { recursive: true, delete: true }, tree: tree({ ok: file('fine\n'), [target]: file('evil\n') }) });
    expect(r.code, r.stderr).toBe(12);
    expect(r.stderr).toMatch(/not a name in a folder/);
    expect(stray()).toEqual([]);
    expect(walk(root).filter((p) => p !== 'd' && p !== 'd/ok')).toEqual([]);
  });
});

/** The receiving end's view of a peer that answers each request with `answer`, in process. */
function scriptedPeer(answer: (m: ControlMessage, send: (frame: Buffer) => void) => void): RemoteSources {
  const toPeer = new PassThrough();
  const fromPeer = new PassThrough();
  const decoder = new WireDecoder((f) => {
    if (f.type === 'control') answer(f.msg, (b) => fromPeer.write(b));
  });
  toPeer.on('data', (c: Buffer) => decoder.push(c));
  return new RemoteSources(new Channel(fromPeer, toPeer));
}

const T = '1700000000000000000';
const wireStat = (mode: number, size: number) => ['1', '7', String(mode), '1', '0', '0', '0', String(size), T, T, T];

describe('the receiving end, in process', () => {
  it('a ZERO frame spanning 8 GiB is handed to the engine in pieces of at most 16 MiB', async () => {
    const size = 8 * 2 ** 30;
    const peer = scriptedPeer((m, send) => {
      if (m.op === 'open-operand') send(encodeControl({ op: 'ok', h: 1, path: 'src', st: wireStat(0o40755, 4096) }));
      else if (m.op === 'open-file') send(encodeControl({ op: 'ok', f: 2 }));
      else if (m.op === 'scan') send(Buffer.concat([encodeZero(0, size), encodeControl({ op: 'scan-end', fp: '00'.repeat(32) })]));
    });
    const d = await peer.openOperand('src/');
    const f = await peer.openFile(d, 'big', statsFromWire(wireStat(0o100644, size)));
    let most = 0;
    let covered = 0;
    await f.scan({ size, blockSize: 65536, mode: 'rewrite', oldSize: 0, holeFrom: Infinity }, async (c) => {
      most = Math.max(most, c.scanned, c.changed.length * 65536);
      covered += c.scanned;
    });
    expect(covered).toBe(size);
    expect(most).toBeLessThanOrEqual(16 << 20);
  });

  it('a failure writing one file reads the rest of its scan: the next answer is the next request\'s', async () => {
    const peer = scriptedPeer((m, send) => {
      if (m.op === 'open-operand') send(encodeControl({ op: 'ok', h: 1, path: 'src', st: wireStat(0o40755, 4096) }));
      else if (m.op === 'open-file') send(encodeControl({ op: 'ok', f: 2 }));
      else if (m.op === 'scan') send(Buffer.concat([encodeZero(0, 65536), encodeZero(65536, 65536), encodeControl({ op: 'scan-end', fp: '00'.repeat(32) })]));
      else if (m.op === 'stat') send(encodeControl({ op: 'ok', st: wireStat(0o100644, 5) }));
    });
    const d = await peer.openOperand('src/');
    const f = await peer.openFile(d, 'x', statsFromWire(wireStat(0o100644, 2 * 65536)));
    const plan = { size: 2 * 65536, blockSize: 65536, mode: 'rewrite' as const, oldSize: 0, holeFrom: Infinity };
    await expect(f.scan(plan, async () => { throw new Error('EFBIG on this side'); })).rejects.toThrow(/EFBIG on this side/);
    expect((await peer.statOperand('src/y')).size).toBe(5n);
  });
});
