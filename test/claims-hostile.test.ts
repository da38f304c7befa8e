/**
 * The drop-in line's protocol against a hostile peer (docs/FORMATS.md
 * "Domains' files in a push (and a pull)"), in-process over a raw Channel:
 * the receiving end (ClaimsForPeer: a `--server` in a push, the client in a
 * pull) against a client that lies in `claims-done` or names folders and
 * formats it was not given, or far copies that are qcow2 images qsync must
 * not hand to QEMU; the sending end (backUpForPeer, a pull's server) against
 * a client that names another DEST's checkpoints. The end-to-end cases
 * (real libvirtd, sshd, domains) are in test/dropin-remote.test.ts.
 */
import type { BigIntStats } from 'node:fs';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, describe, expect, it } from 'vitest';
import type { ControlMessage } from '../src/core/wire.js';
import { Channel } from '../src/remote/channel.js';
import { backUpClaimed, backUpForPeer, ClaimsForPeer, claimsFromWire, MAX_CLAIMS } from '../src/remote/domain-claims.js';
import { DropIn } from '../src/sync/dropin.js';
import { noStats } from '../src/sync/events.js';
import { Dir } from '../src/io/safe-fs.js';
import { needTools } from './helpers/env.js';

const root = mkdtempSync(join(tmpdir(), 'qsync-claims-hostile-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let n = 0;

const st = (dev: number, ino: number, size = 1 << 20): BigIntStats => ({ dev: BigInt(dev), ino: BigInt(ino), size: BigInt(size) }) as BigIntStats;

/** A receiving end whose walk left `rels` (one disk each) in a fresh DEST, and the raw channel its hostile client speaks on. */
async function receiving(rels: string[], between?: (dest: string) => void) {
  const dest = join(root, `d${n++}`);
  mkdirSync(dest);
  for (const rel of rels) mkdirSync(join(dest, rel, '..'), { recursive: true });
  // The walk's DEST, held by the run (src/cli/run-sync.ts): what the domains' copies are written below.
  const held = await Dir.open(dest);
  const up = new PassThrough();
  const down = new PassThrough();
  const peer = new ClaimsForPeer(new Channel(up, down, { peer: 'the client' }), new Set(rels.map((_, i) => `1:${i + 10}`)), false);
  rels.forEach((rel, i) => expect(peer.claim(st(1, i + 10), rel)).toBe(true));
  const stats = noStats();
  stats.transferred = 3; // the rest of the run's
  between?.(dest);
  const running = peer.run(dest, { blockSize: 65536, dryRun: false, announce: false }, {}, stats, held).finally(() => held.close());
  running.catch(() => {});
  const ch = new Channel(down, up, { peer: 'the server' });
  const claimed = await ch.expect('claimed');
  return { dest, ch, running, stats, claimed };
}

const counts = (o: Record<string, unknown> = {}): Record<string, unknown> => ({ transferred: 0, transferredSize: 0, created: 0, literal: 0, matched: 0, scanned: 0, ...o });

describe('a hostile client of the receiving end', () => {
  it('a hello\'s claims that are too many or no dev:ino: refused (exit 12) before the walk', () => {
    for (const bad of [Array.from({ length: MAX_CLAIMS + 1 }, (_, i) => `1:${i}`), ['1:2', '../x'], ['1:2:3'], [`1:${'9'.repeat(21)}`], [12], '1:2', { 0: '1:2' }, null]) {
      expect(() => claimsFromWire(bad), JSON.stringify(bad).slice(0, 40)).toThrow(/bad claims/);
    }
    expect(claimsFromWire(Array.from({ length: MAX_CLAIMS }, (_, i) => `1:${i % 7}`))?.size).toBe(7);
  });

  it('claims-done with counts that are no counts, or more files than were claimed: refused (exit 12), the run\'s statistics unchanged', async () => {
    for (const stats of [
      counts({ transferred: -1 }), counts({ literal: null }), counts({ scanned: '5' }), counts({ matched: 1.5 }), counts({ literal: 1e300 }),
      // One file was claimed: it cannot have written two, nor created one it did not write.
      counts({ transferred: 2 }), counts({ created: 1 }),
      // Past what a number counts exactly once added to the run's own.
      counts({ transferred: 1, literal: Number.MAX_SAFE_INTEGER }), counts({ transferred: Number.MAX_SAFE_INTEGER }),
      undefined,
    ]) {
      const s = await receiving(['a.img']);
      s.stats.literal = 100;
      await s.ch.send({ op: 'claims-done', failed: false, stats });
      await expect(s.running, JSON.stringify(stats)).rejects.toMatchObject({ code: 'PROTOCOL' });
      expect(s.stats.transferred).toBe(3);
      expect(s.stats.literal).toBe(100);
    }
  });

  it('claims-done with honest counts is added to the run\'s', async () => {
    const s = await receiving(['a.img', 'b/c.img']);
    await s.ch.send({ op: 'claims-done', failed: false, stats: counts({ transferred: 2, created: 1, transferredSize: 5, literal: 7, matched: 1, scanned: 8 }) });
    await expect(s.running).resolves.toBe(false);
    expect(s.stats).toMatchObject({ transferred: 5, created: 1, transferredSize: 5, literal: 7, matched: 1, scanned: 8 });
  });

  it('target requests before claims-targets, or folders and formats it was not given: the session ends (exit 12), nothing is made', async () => {
    {
      const s = await receiving(['a.img']);
      await s.ch.send({ op: 't-stat', folder: '', name: 'a.img' });
      await expect(s.running).rejects.toMatchObject({ code: 'PROTOCOL' });
    }
    for (const bad of [{ folder: '..' }, { folder: '/etc' }, { folder: 'b/../..' }, { folder: 'b/' }, { folder: 'c' }, { folder: 1 }, { folder: 'toString' }, {}, { folder: '', format: 'raw' }, { folder: '', format: ['qcow2'] }]) {
      const s = await receiving(['a.img', 'b/c.img']);
      expect(s.claimed.files).toHaveLength(2);
      await s.ch.send({ op: 'claims-targets' });
      expect((await s.ch.expect('claims-targets-ok')).missing).toEqual([]);
      await s.ch.send({ op: 't-open', name: 'x.img', create: true, ...bad });
      await expect(s.running, JSON.stringify(bad)).rejects.toMatchObject({ code: 'PROTOCOL' });
      expect(readdirSync(s.dest), JSON.stringify(bad)).toEqual(['b']);
      expect(existsSync(join(root, 'x.img')) || existsSync('/etc/x.img')).toBe(false);
    }
  });

  it('DEST (or a folder in it) swapped for a symlink after the walk: the copies are written below the DEST the walk held, never where the link points', async () => {
    for (const swapped of ['', 'b']) {
      const outside = join(root, `outside${n++}`);
      mkdirSync(join(outside, 'b'), { recursive: true }); // what the link leads to has the folder too
      const s = await receiving(['b/c.img'], (dest) => {
        renameSync(join(dest, swapped), join(root, `moved${n++}`));
        symlinkSync(outside, join(dest, swapped));
      });
      await s.ch.send({ op: 'claims-targets' });
      const r = await s.ch.control().then((m) => m.op, (e: Error) => e.message);
      if (r === 'claims-targets-ok') {
        await s.ch.send({ op: 't-open', folder: 'b', name: 'c.img', create: true });
        await s.ch.control().catch(() => {});
        await s.ch.send({ op: 'bye' });
      }
      await s.ch.send({ op: 'claims-done', failed: true, stats: counts() });
      await s.running.catch(() => {});
      expect(readdirSync(join(outside, 'b')), `${swapped || 'DEST'} swapped: ${r}`).toEqual([]);
    }
  });
});

const qemu = needTools('qemu-img', 'qemu-storage-daemon');

describe.skipIf(!qemu)('a far copy qsync must not hand to QEMU', () => {
  /** Ask for `name` in DEST's root as a qcow2 target; what each request was answered. */
  async function askQcow2(prepare: (dest: string) => void): Promise<string[]> {
    const s = await receiving(['a.img']);
    prepare(s.dest);
    await s.ch.send({ op: 'claims-targets' });
    await s.ch.expect('claims-targets-ok');
    const said: string[] = [];
    for (const m of [{ op: 't-stat' }, { op: 't-open', create: false }] as ControlMessage[]) {
      await s.ch.send({ ...m, folder: '', name: 'a.img', format: 'qcow2' });
      said.push(await s.ch.control().then((r) => JSON.stringify(r), (e: Error) => e.message));
    }
    await s.ch.send({ op: 'bye' });
    await s.ch.send({ op: 'claims-done', failed: true, stats: counts() });
    await expect(s.running).resolves.toBe(true);
    return said;
  }
  const img = (file: string, ...opts: string[]): void => void execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ...opts, file, '1M']);
  const daemons = (): string[] => readdirSync(tmpdir()).filter((f) => f.startsWith('qsync-qsd-'));

  it('a qcow2 whose backing file is /etc/shadow, one with an external data file, a symlink: refused, no daemon started', async () => {
    const before = daemons();
    const backed = await askQcow2((dest) => img(join(dest, 'a.img'), '-b', '/etc/shadow', '-F', 'raw'));
    for (const s of backed) expect(s).toMatch(/has a backing file; left alone/);
    const data = await askQcow2((dest) => img(join(dest, 'a.img'), '-o', `data_file=${join(dest, 'data.raw')}`));
    for (const s of data) expect(s).toMatch(/keeps its data in an external file; left alone/);
    const link = await askQcow2((dest) => {
      writeFileSync(join(dest, 'real.qcow2'), '');
      symlinkSync('/etc/shadow', join(dest, 'a.img'));
    });
    for (const s of link) expect(s).toMatch(/is not a regular file; left alone|is a symlink/);
    expect(daemons()).toEqual(before);
  });
});

describe('a hostile client of a pull\'s sending end', () => {
  it('a DEST that is no host:/path (the key of another run\'s checkpoints on this host): refused before any backup', async () => {
    const up = new PassThrough();
    const down = new PassThrough();
    const ch = new Channel(down, up, { peer: 'the client' });
    const far = new Channel(up, down, { peer: 'the server' });
    const claimed: string[] = [];
    const dropIn = { claim: (_: unknown, rel: string) => (claimed.push(rel), true), run: async () => false } as unknown as DropIn;
    for (const dest of ['/var/lib/qsync/backup', 'relative', ':/x', 'a/b:/x', 1, undefined, `h:/${'x'.repeat(70_000)}`]) {
      claimed.length = 0;
      const m: ControlMessage = { op: 'claimed', files: [{ rel: 'a.img', key: '1:2', size: 1 }], dest, options: {} };
      const asked = far.control().then((r) => `asked ${r.op}`, () => 'nothing asked');
      const backing = backUpForPeer(ch, m, dropIn, () => true, { blockSize: 65536 });
      backing.catch(() => {});
      const first = await Promise.race([asked, backing.then(() => 'done', (e: { code?: string }) => `refused ${e.code}`)]);
      expect(first, String(dest).slice(0, 40)).toBe('refused PROTOCOL');
      expect(claimed).toEqual([]);
      await ch.send({ op: 'error', message: 'end' }); // ends the wait of `asked`
      expect(await asked).toBe('nothing asked');
    }
  });
});

describe('a hostile server answering a push\'s claims', () => {
  /** A DropIn whose domain `web` holds two disks, 1:2 (vda) and 1:3 (vdb); nothing here reaches a libvirt. */
  const dropIn = (): DropIn => {
    const owned = new Map([['1:2', 'vda'], ['1:3', 'vdb']].map(([k, t]) => [k!, { domain: 'web', disk: { target: t!, type: 'file', format: 'qcow2', source: `/images/${t}.qcow2` } }]));
    return new (DropIn as unknown as new (uri: string, owned: unknown) => DropIn)('test:///none', owned);
  };
  /** The client backing up what `claimed` names, the hostile server's channel, and what it was first asked. */
  function pushing(files: unknown[], o: { dryRun?: boolean; shown?: (k: string) => boolean } = {}) {
    const up = new PassThrough();
    const down = new PassThrough();
    const ch = new Channel(down, up, { peer: 'the server' });
    const far = new Channel(up, down, { peer: 'the client' });
    const warnings: string[] = [];
    const backing = backUpClaimed(ch, { op: 'claimed', files }, dropIn(), o.shown ?? (() => true), 'far:/dest', { blockSize: 65536, dryRun: o.dryRun ?? false, announce: false }, { warning: (m) => warnings.push(m) });
    backing.catch(() => {});
    return { far, backing, warnings };
  }
  const file = (rel: unknown, key: unknown = '1:2', size: unknown = 1) => ({ rel, key, size });

  it('a claimed list naming what was never listed, a path out of DEST, a disk twice, a size that is none: refused (exit 12) before anything is asked', async () => {
    for (const files of [
      [file('a.img', '1:2')].map((f) => ({ ...f })).concat([]), // (the one honest list, run with `shown` saying no)
      [file('../a.img')], [file('a/../../b.img')], [file('/etc/a.img')], [file('a//b.img')], [file('./a.img')], [file('')], [file(7)],
      [file('a.img', '1:2'), file('b.img', '1:2')], [file('a.img', '1:4')], [file('a.img', 'x:y')],
      [file('a.img', '1:2', -1)], [file('a.img', '1:2', 0.5)], [file('a.img', '1:2', '1')],
      Array.from({ length: 65_537 }, (_, i) => file(`f${i}`)),
    ]) {
      const s = pushing(files, { shown: files.length === 1 && files[0]!.rel === 'a.img' && files[0]!.size === 1 ? () => false : undefined });
      const asked = s.far.control().then((r) => `asked ${r.op}`, () => 'nothing asked');
      const first = await Promise.race([asked, s.backing.then(() => 'done', (e: { code?: string }) => `refused ${e.code}`)]);
      expect(first, JSON.stringify(files).slice(0, 80)).toBe('refused PROTOCOL');
    }
  });

  it('claims-targets-ok naming as missing a folder of a run that is no dry run, or a folder nothing is in: refused (exit 12), no crash', async () => {
    for (const [missing, files] of [[[''], [file('a.img')]], [['b'], [file('a.img'), file('b/c.img', '1:3')]], [['elsewhere'], [file('a.img')]], [[1], [file('a.img')]], ['', [file('a.img')]]] as const) {
      const s = pushing([...files]);
      expect((await s.far.control()).op).toBe('claims-targets');
      await s.far.send({ op: 'claims-targets-ok', missing });
      const asked = s.far.control().then((r) => `asked ${r.op}`, () => 'nothing asked');
      const first = await Promise.race([asked, s.backing.then(() => 'done', (e: { code?: string; message?: string }) => `refused ${e.code ?? e.message}`)]);
      expect(first, JSON.stringify(missing)).toBe('refused PROTOCOL');
    }
  });

  it('with -n, a missing folder of a claimed file is listed as new and nothing is asked of it', async () => {
    const s = pushing([file('b/c.img', '1:3')], { dryRun: true });
    expect((await s.far.control()).op).toBe('claims-targets');
    await s.far.send({ op: 'claims-targets-ok', missing: ['b'] });
    expect((await s.far.control()).op).toBe('bye');
    expect(await s.far.control()).toMatchObject({ op: 'claims-done', failed: false, stats: { transferred: 0 } });
    await s.backing;
  });
});
