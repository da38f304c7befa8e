/**
 * --backup-dir and --write-batch/--only-write-batch over ssh (real sshd on
 * 127.0.0.1, test/helpers/sshd.ts): the history lives on the receiving
 * side (a push's far host, a pull's own), the batch where qsync was run.
 * Bytes are counted at the ssh command, as in test/remote.test.ts.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, cpSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, utimesSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BatchRecorder } from '../src/remote/batch-relay.js';
import { openBatch } from '../src/sync/delta-sinks.js';
import { verifyDeltaFile } from '../src/io/delta-file.js';
import { QSYNC, runQsync, type RunResult } from './helpers/cli.js';
import { mutateBlocks, randomFile } from './helpers/data.js';
import { needTools } from './helpers/env.js';
import { useQsyncOverSsh } from './helpers/qsync-ssh.js';
import { qemuImgCreate, qemuIo } from './helpers/qemu.js';
import { startSshd, type Sshd } from './helpers/sshd.js';

const KiB = 1024;
const MiB = 1 << 20;
const BLOCK = 64 * KiB;

const ready = needTools('sshd', 'ssh');
const qemuReady = needTools('qemu-img', 'qemu-io');

const ssh = useQsyncOverSsh('qsync-rdelta-', ready);
const { at, overSsh, onFarSide } = ssh;
/** For names of this file's scratch files. */
let counter = 0;

function ok(r: RunResult, what = ''): void {
  expect(r.code, `${what} ${r.stdout}${r.stderr}`).toBe(0);
}

/** Overwrite `blocks` distinct 64 KiB blocks; a later mtime. Returns the bytes changed. */
function changeBlocks(path: string, blocks: number, bump = 5): number {
  const size = statSync(path).size;
  mutateBlocks(path, size, blocks / Math.ceil(size / BLOCK), BLOCK);
  const t = Date.now() / 1000 + bump;
  utimesSync(path, t, t);
  return blocks * BLOCK;
}

/** Two images: the versions a history must give back. */
function tree(root: string): void {
  mkdirSync(join(root, 'sub'), { recursive: true });
  randomFile(join(root, 'vm1.raw'), 8 * MiB);
  randomFile(join(root, 'sub', 'vm2.raw'), 4 * MiB);
}

const same = (a: string, b: string) => readFileSync(a).equals(readFileSync(b));

describe.skipIf(!ready)('history over ssh', () => {
  it('push --backup-dir (relative to DEST, on the far side): two runs with changes, then restore there gives each version byte for byte; the history costs nothing on the wire', async () => {
    const src = join(ssh.dir, 'bk-src');
    const dst = join(ssh.dir, 'bk', 'images');
    const hist = join(ssh.dir, 'bk', 'history');
    tree(src);
    mkdirSync(join(ssh.dir, 'bk'));
    const v0 = join(ssh.dir, 'bk-v0');
    const v1 = join(ssh.dir, 'bk-v1');
    ok(await overSsh(['-a', '--backup-dir=../history', `${src}/`, at(`${dst}/`)]), 'first push');
    cpSync(src, v0, { recursive: true });
    changeBlocks(join(src, 'vm1.raw'), 3);
    changeBlocks(join(src, 'sub', 'vm2.raw'), 2);
    ok(await overSsh(['-a', '--backup-dir=../history', `${src}/`, at(`${dst}/`)]), 'second push');
    cpSync(src, v1, { recursive: true });
    const changed = changeBlocks(join(src, 'vm1.raw'), 4, 10);
    const third = await overSsh(['-a', '--stats', '--backup-dir=../history', `${src}/`, at(`${dst}/`)]);
    ok(third, 'third push');
    // The old blocks stay on the far side: the wire carries the changed blocks only, as without history.
    expect(third.wire).toBeLessThanOrEqual(1.1 * changed + 64 * KiB);
    expect(readdirSync(hist).filter((n) => n.endsWith('.qdelta')).length).toBe(3);
    expect(statSync(hist).mode & 0o777).toBe(0o700);

    const list = await onFarSide(['restore', join(dst, 'vm1.raw'), '--backup-dir', hist, '--list']);
    ok(list, 'list');
    for (const [n, version] of [['1', v1], ['2', v0]] as const) {
      const out = join(ssh.dir, `bk-restored-${n}.raw`);
      ok(await onFarSide(['restore', join(dst, 'vm1.raw'), out, '--backup-dir', hist, '--at', n]), `restore vm1 at ${n}`);
      expect(same(out, join(version, 'vm1.raw')), `vm1 at ${n}`).toBe(true);
    }
    const out2 = join(ssh.dir, 'bk-restored-vm2.raw');
    // vm2 changed in the second run only: its newest point is the first version.
    ok(await onFarSide(['restore', join(dst, 'sub', 'vm2.raw'), out2, '--backup-dir', hist, '--at', '1']), 'restore vm2');
    expect(same(out2, join(v0, 'sub', 'vm2.raw'))).toBe(true);
    // The mirror is the source as it is now.
    expect(same(join(dst, 'vm1.raw'), join(src, 'vm1.raw'))).toBe(true);
  });

  it('pull --backup-dir and --write-batch: history and batch on this side; the batch turns a copy of the old DEST into the new one', async () => {
    const src = join(ssh.dir, 'pl-src');
    const dst = join(ssh.dir, 'pl-dst');
    const hist = join(ssh.dir, 'pl-hist');
    tree(src);
    ok(await overSsh(['-a', `--backup-dir=${hist}`, at(`${src}/`), `${dst}/`]), 'first pull');
    const old = join(ssh.dir, 'pl-old');
    cpSync(dst, old, { recursive: true });
    changeBlocks(join(src, 'vm1.raw'), 3);
    const batch = join(ssh.dir, 'pl.qdelta');
    ok(await overSsh(['-a', `--backup-dir=${hist}`, `--write-batch=${batch}`, at(`${src}/`), `${dst}/`]), 'second pull');
    expect(same(join(dst, 'vm1.raw'), join(src, 'vm1.raw'))).toBe(true);
    const out = join(ssh.dir, 'pl-restored.raw');
    ok(await runQsync(['restore', join(dst, 'vm1.raw'), out, '--backup-dir', hist, '--at', '1']), 'restore');
    expect(same(out, join(old, 'vm1.raw'))).toBe(true);
    ok(await runQsync([`--read-batch=${batch}`, `${old}/`]), 'apply');
    expect(same(join(old, 'vm1.raw'), join(src, 'vm1.raw'))).toBe(true);
    expect(same(join(old, 'sub', 'vm2.raw'), join(src, 'sub', 'vm2.raw'))).toBe(true);
  });
});

describe.skipIf(!ready)('batches over a push', () => {
  it('--write-batch is written here from the blocks sent (no more on the wire); applied to a copy of the old far target it gives the new one', async () => {
    const src = join(ssh.dir, 'wb-src');
    const dst = join(ssh.dir, 'wb-dst');
    tree(src);
    ok(await overSsh(['-a', `${src}/`, at(`${dst}/`)]), 'first push');
    const old = join(ssh.dir, 'wb-old');
    cpSync(dst, old, { recursive: true });
    // A new file and a grown one go into the batch too.
    randomFile(join(src, 'new.raw'), 1 * MiB);
    const fd = openSync(join(src, 'sub', 'vm2.raw'), 'a');
    writeSync(fd, randomBytes(3 * BLOCK + 100));
    closeSync(fd);
    const changed = changeBlocks(join(src, 'vm1.raw'), 4) + 1 * MiB + 3 * BLOCK + 100;
    const batch = join(ssh.dir, 'wb.qdelta');
    const r = await overSsh(['-a', '--stats', `--write-batch=${batch}`, `${src}/`, at(`${dst}/`)]);
    ok(r, 'push with a batch');
    expect(r.wire).toBeLessThanOrEqual(1.1 * changed + 64 * KiB);
    expect(statSync(batch).mode & 0o777).toBe(0o600);
    ok(await runQsync(['verify', batch]), 'verify the batch');
    const info = await runQsync(['info', batch, '--json']);
    ok(info);
    expect(info.stdout).toMatch(/new\.raw/);
    ok(await runQsync([`--read-batch=${batch}`, `${old}/`]), 'apply');
    for (const f of ['vm1.raw', join('sub', 'vm2.raw'), 'new.raw']) expect(same(join(old, f), join(dst, f)), f).toBe(true);
    // Applied again: nothing to do, the same bytes.
    ok(await runQsync([`--read-batch=${batch}`, `${old}/`]), 'apply again');
    expect(same(join(old, 'vm1.raw'), join(src, 'vm1.raw'))).toBe(true);
  });

  it('--only-write-batch leaves the far DEST alone; the batch brings a copy up to date; a batch for another base is refused', async () => {
    const src = join(ssh.dir, 'ob-src');
    const dst = join(ssh.dir, 'ob-dst');
    tree(src);
    ok(await overSsh(['-a', `${src}/`, at(`${dst}/`)]), 'first push');
    const before = readFileSync(join(dst, 'vm1.raw'));
    const copy = join(ssh.dir, 'ob-copy');
    cpSync(dst, copy, { recursive: true });
    changeBlocks(join(src, 'vm1.raw'), 2);
    const batch = join(ssh.dir, 'ob.qdelta');
    ok(await overSsh(['-a', `--only-write-batch=${batch}`, `${src}/`, at(`${dst}/`)]), 'record only');
    expect(readFileSync(join(dst, 'vm1.raw')).equals(before)).toBe(true);
    ok(await runQsync([`--read-batch=${batch}`, `${copy}/`]), 'apply');
    expect(same(join(copy, 'vm1.raw'), join(src, 'vm1.raw'))).toBe(true);
    // The far DEST was not changed: the same batch applies to it, and to nothing else.
    const other = join(ssh.dir, 'ob-other');
    mkdirSync(other);
    randomFile(join(other, 'vm1.raw'), 8 * MiB);
    const wrong = await runQsync(['apply', batch, join(other, 'vm1.raw')]);
    expect(wrong.code).not.toBe(0);
    expect(wrong.stderr).not.toMatch(/internal error|\n\s+at /);
  });

  it('-n --write-batch writes no batch, as a local run', async () => {
    const src = join(ssh.dir, 'nb-src');
    tree(src);
    const batch = join(ssh.dir, 'nb.qdelta');
    ok(await overSsh(['-an', `--write-batch=${batch}`, `${src}/`, at(`${join(ssh.dir, 'nb-dst')}/`)]));
    expect(existsSync(batch)).toBe(false);
  });
});

describe.skipIf(!ready)('the link killed mid-push with --backup-dir', () => {
  it('the next run converges, the history restores the version before, and every listed point restores', async () => {
    const src = join(ssh.dir, 'kh-src');
    const dst = join(ssh.dir, 'kh-dst');
    const hist = join(ssh.dir, 'kh-hist');
    mkdirSync(src);
    randomFile(join(src, 'big.raw'), 24 * MiB);
    ok(await overSsh(['-a', `--backup-dir=${hist}`, `${src}/`, at(`${dst}/`)]), 'first push');
    const v0 = join(ssh.dir, 'kh-v0.raw');
    cpSync(join(src, 'big.raw'), v0);
    changeBlocks(join(src, 'big.raw'), 120);
    // Cut the link half way through the changed blocks.
    const cut = await runQsync(['-a', `--backup-dir=${hist}`, '-e', `${process.execPath} ${join(import.meta.dirname, 'helpers', 'cut-rsh.mjs')} ${60 * BLOCK} ${ssh.sshd.rsh}`, '--qsync-path', ssh.serverCmd, `${src}/`, at(`${dst}/`)]);
    expect(cut.code).not.toBe(0);
    expect(cut.stderr).not.toMatch(/internal error/);
    ok(await overSsh(['-a', `--backup-dir=${hist}`, `${src}/`, at(`${dst}/`)]), 'the run after');
    expect(same(join(dst, 'big.raw'), join(src, 'big.raw'))).toBe(true);
    ok(await onFarSide(['verify', join(dst, 'big.raw')]), 'verify the far target');
    for (const f of readdirSync(hist).filter((n) => n.endsWith('.qdelta'))) ok(await onFarSide(['verify', join(hist, f)]), f);
    const list = await onFarSide(['restore', join(dst, 'big.raw'), '--backup-dir', hist, '--list']);
    ok(list, 'list');
    const points = list.stdout.split('\n').filter((l) => /^\s*\d+\s/.test(l)).length;
    expect(points).toBeGreaterThanOrEqual(1);
    let found = false;
    for (let n = 1; n <= points; n++) {
      const out = join(ssh.dir, `kh-restored-${n}.raw`);
      ok(await onFarSide(['restore', join(dst, 'big.raw'), out, '--backup-dir', hist, '--at', String(n)]), `restore ${n}`);
      found ||= same(out, v0);
    }
    expect(found, 'the version before the cut run is a point').toBe(true);
  });
});

describe.skipIf(!ready)('--backup-dir under qsync --server --restrict DIR', () => {
  let restricted: Sshd;
  let root: string;
  let outside: string;
  beforeAll(async () => {
    root = join(ssh.dir, 'jail');
    outside = join(ssh.dir, 'jail-outside');
    mkdirSync(join(root, 'vm1'), { recursive: true });
    mkdirSync(outside);
    symlinkSync(outside, join(root, 'esc'));
    restricted = await startSshd({ authorizedKeyOptions: `command="QSYNC_STATE_DIR=${join(ssh.dir, 'jail-state')} ${process.execPath} ${QSYNC} --server --restrict ${root}",restrict` });
  });
  afterAll(() => restricted?.stop());

  it('a history inside DIR is kept; one outside it, absolute, or through a symlink is refused and nothing is written', async () => {
    const src = join(ssh.dir, 'j-src');
    mkdirSync(src);
    randomFile(join(src, 'disk.raw'), 1 * MiB);
    const via = (extra: string[]) => runQsync(['-a', '-e', restricted.rsh, ...extra, `${src}/`, `${restricted.host}:vm1/`]);
    ok(await via(['--backup-dir=../hist']), 'inside');
    changeBlocks(join(src, 'disk.raw'), 2);
    ok(await via(['--backup-dir=../hist']), 'inside again');
    expect(readdirSync(join(root, 'hist')).filter((n) => n.endsWith('.qdelta')).length).toBe(2);
    for (const bad of ['../../jail-outside/h', join(outside, 'h'), '../esc/h', '/h']) {
      changeBlocks(join(src, 'disk.raw'), 1, 20 + counter++);
      const r = await via([`--backup-dir=${bad}`]);
      expect(r.code, `${bad}: ${r.stderr}`).toBe(1);
      expect(r.stderr).toMatch(/outside|symlink/);
      expect(r.stderr).not.toMatch(/internal error/);
      expect(readdirSync(outside)).toEqual([]);
      expect(existsSync('/h')).toBe(false);
    }
  });
});

describe.skipIf(!ready || !qemuReady)('image mode to a remote DEST', () => {
  const guestView = (img: string, out: string): Buffer => {
    execFileSync('qemu-img', ['convert', '-O', 'raw', img, out]);
    return readFileSync(out);
  };

  it('--image with --backup-dir (far side) and --write-batch (here): restore there gives the guest view before; the batch turns a copy of the old target into the new one', async () => {
    const img = join(ssh.dir, 'web.qcow2');
    qemuImgCreate(img, '64M');
    qemuIo(img, 'qcow2', 'write -P 0x11 0 8M', 'write -P 0x12 40M 1M');
    mkdirSync(join(ssh.dir, 'ib'));
    const dest = join(ssh.dir, 'ib', 'vm');
    const hist = join(ssh.dir, 'ib', 'hist');
    ok(await overSsh(['--image', img, '--backup-dir=../hist', at(`${dest}/`)]), 'first run');
    const v0 = guestView(img, join(ssh.dir, 'ib-v0.raw'));
    expect(readFileSync(join(dest, 'web.raw')).equals(v0)).toBe(true);
    const old = join(ssh.dir, 'ib-old');
    mkdirSync(old);
    cpSync(join(dest, 'web.raw'), join(old, 'web.raw'));

    qemuIo(img, 'qcow2', 'write -P 0x33 1M 192K', 'write -P 0x44 50M 128K', 'write -z 40M 64K');
    const changed = 192 * KiB + 128 * KiB + 64 * KiB;
    const batch = join(ssh.dir, 'ib.qdelta');
    const second = await overSsh(['--image', img, '--backup-dir=../hist', `--write-batch=${batch}`, at(`${dest}/`)]);
    ok(second, 'second run');
    expect(second.stdout).toMatch(/web: incremental/);
    const v1 = guestView(img, join(ssh.dir, 'ib-v1.raw'));
    expect(readFileSync(join(dest, 'web.raw')).equals(v1)).toBe(true);
    // The old blocks stay on the far side, the batch is written from the blocks sent: only the changed blocks cross.
    expect(second.wire).toBeLessThan(1.1 * changed + 64 * KiB);

    qemuIo(img, 'qcow2', 'write -P 0x55 2M 64K');
    ok(await overSsh(['--image', img, '--backup-dir=../hist', at(`${dest}/`)]), 'third run');
    expect(readdirSync(hist).filter((n) => n.endsWith('.qdelta')).length).toBe(3);
    for (const [n, version] of [['1', v1], ['2', v0]] as const) {
      const out = join(ssh.dir, `ib-restored-${n}.raw`);
      ok(await onFarSide(['restore', join(dest, 'web.raw'), out, '--backup-dir', hist, '--at', n]), `restore ${n}`);
      expect(readFileSync(out).equals(version), `point ${n}`).toBe(true);
    }
    ok(await runQsync(['verify', batch]), 'verify the batch');
    ok(await runQsync([`--read-batch=${batch}`, `${old}/`]), 'apply');
    expect(readFileSync(join(old, 'web.raw')).equals(v1)).toBe(true);
    await expect(onFarSide(['verify', join(dest, 'web.raw')])).resolves.toMatchObject({ code: 0 });
  });
});

describe.skipIf(!ready)('a far qsync that does not name the feature (an older one) is refused, not silently left without history or batch', () => {
  const batch = () => join(ssh.dir, 'old.qdelta');
  /** Each run against a far side that answers an older hello: exit 1 naming the option, no batch file left. */
  async function refused(runs: [string[], RegExp][]): Promise<void> {
    const rsh = `${process.execPath} ${join(import.meta.dirname, 'helpers', 'old-server.mjs')}`;
    for (const [args, message] of runs) {
      const r = await runQsync(['-e', rsh, ...args, 'far:/nowhere/']);
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toMatch(message);
      expect(r.stderr).toMatch(/install the same qsync version on both hosts/);
      expect(existsSync(batch())).toBe(false);
      expect(readdirSync(ssh.dir).filter((n) => n.startsWith('.old.qdelta'))).toEqual([]);
    }
  }

  it('a push with --backup-dir or --write-batch', async () => {
    const src = join(ssh.dir, 'old-src');
    mkdirSync(src);
    randomFile(join(src, 'f.raw'), 1 * MiB);
    await refused([
      [['-a', '--backup-dir=../h', `${src}/`], /does not support --backup-dir over ssh/],
      [['-a', `--write-batch=${batch()}`, `${src}/`], /does not support --write-batch over ssh/],
    ]);
  });

  it.skipIf(!qemuReady)('image mode with --backup-dir or --write-batch', async () => {
    const img = join(ssh.dir, 'old.qcow2');
    qemuImgCreate(img, '8M');
    await refused([
      [['--image', img, '--backup-dir=../h'], /does not support --backup-dir over ssh/],
      [['--image', img, `--write-batch=${batch()}`], /does not support --write-batch over ssh/],
    ]);
  });
});

describe('the client of a push refuses a broken server\'s batch messages', () => {
  let here: string;
  beforeAll(() => {
    here = mkdtempSync(join(tmpdir(), 'qsync-batch-recorder-'));
  });
  afterAll(() => rmSync(here, { recursive: true, force: true }));
  const fp = (c: string) => c.repeat(64);
  const recorder = async (name: string) => {
    const path = join(here, name);
    return { path, r: new BatchRecorder(await openBatch(path, 'none', Date.now()), BLOCK) };
  };
  const begin = (name = 'vm.raw', more: Record<string, unknown> = {}) => ({ op: 'b-begin', name, blockSize: BLOCK, baseSize: 2 * BLOCK, resultSize: 2 * BLOCK, ...more });

  it.each([
    ['a name that climbs out', begin('../etc/x')],
    ['an absolute name', begin('/etc/x')],
    ['a "." component', begin('a/./b')],
    ['a name longer than a delta holds', begin('x'.repeat(5000))],
    ['another block size', begin('vm.raw', { blockSize: 4096 })],
    ['a size past 2^53', begin('vm.raw', { resultSize: 2 ** 60 })],
    ['an end outside a member', { op: 'b-end', base: fp('a'), result: fp('b') }],
    ['a drop outside a member', { op: 'b-drop' }],
  ])('%s: a protocol error, and no batch is kept', async (_what, m) => {
    const { path, r } = await recorder(`bad-${++counter}.qdelta`);
    await expect(r.take(m)).rejects.toThrow(/protocol error/);
    expect(await r.close(true)).toBe(false);
    expect(existsSync(path)).toBe(false);
  });

  it('a member begun twice, or an end without fingerprints, is refused; a dropped member leaves nothing of itself', async () => {
    const twice = await recorder(`twice-${++counter}.qdelta`);
    await twice.r.take(begin());
    await expect(twice.r.take(begin())).rejects.toThrow(/before the last member ended/);
    await twice.r.close(false);
    const nofp = await recorder(`nofp-${++counter}.qdelta`);
    await nofp.r.take(begin());
    await expect(nofp.r.take({ op: 'b-end', base: 'zz', result: fp('b') })).rejects.toThrow(/fingerprint/);
    await nofp.r.close(false);

    const { path, r } = await recorder(`ok-${++counter}.qdelta`);
    await r.take(begin('dropped.raw'));
    await r.data(0, randomBytes(BLOCK));
    await r.take({ op: 'b-drop' });
    await r.take(begin('kept.raw'));
    await r.data(BLOCK, randomBytes(BLOCK));
    await r.take({ op: 'b-end', base: fp('a'), result: fp('b') });
    await r.take({ op: 'b-finish', keep: true });
    expect(await r.close(true)).toBe(true);
    const members = await verifyDeltaFile(path);
    expect(members.map((m) => [m.header.name, m.records])).toEqual([['kept.raw', 1]]);
  });

  it('b-finish without keep (a file failed there): the batch is dropped', async () => {
    const { path, r } = await recorder(`nokeep-${++counter}.qdelta`);
    await r.take(begin());
    await r.take({ op: 'b-end', base: fp('a'), result: fp('b') });
    await r.take({ op: 'b-finish', keep: false });
    expect(await r.close(true)).toBe(false);
    expect(existsSync(path)).toBe(false);
  });
});
