/**
 * qsync over ssh, end to end: Debian's real sshd on 127.0.0.1 (keys made in a
 * temp dir, test/helpers/sshd.ts), the real ssh client, the built CLI on both
 * ends. Bytes through the channel are counted at the ssh command (an -e
 * wrapper), the way a user would measure them.
 */
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, linkSync, lstatSync, mkdirSync, openSync, readdirSync, readFileSync, readlinkSync, statSync, symlinkSync, truncateSync, utimesSync, writeFileSync, writeSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodeControl, encodeData, encodeDigests, encodeZero } from '../src/core/wire.js';
import { QSYNC, runQsync } from './helpers/cli.js';
import { needTools } from './helpers/env.js';
import { useQsyncOverSsh } from './helpers/qsync-ssh.js';
import { startSshd, type Sshd } from './helpers/sshd.js';

const KiB = 1024;
const MiB = 1 << 20;
const BLOCK = 64 * KiB;

const ready = needTools('sshd', 'ssh');

const ssh = useQsyncOverSsh('qsync-remote-', ready);
const { at, overSsh } = ssh;
/** For names of this file's scratch files. */
let counter = 0;

function randomFile(path: string, size: number): void {
  const fd = openSync(path, 'w');
  for (let off = 0; off < size; off += 4 * MiB) writeSync(fd, randomBytes(Math.min(4 * MiB, size - off)));
  closeSync(fd);
}

/** Overwrite `blocks` 64 KiB blocks at random (distinct) places; returns the bytes changed. */
function changeBlocks(path: string, blocks: number): number {
  const n = Math.floor(statSync(path).size / BLOCK);
  const picked = new Set<number>();
  while (picked.size < blocks) picked.add(Math.floor(Math.random() * n));
  const fd = openSync(path, 'r+');
  for (const b of picked) writeSync(fd, randomBytes(BLOCK), 0, BLOCK, b * BLOCK);
  closeSync(fd);
  const t = Date.now() / 1000 + 5;
  utimesSync(path, t, t);
  return blocks * BLOCK;
}

/** Every entry of `a` is in `b` with the same type, content, mode and mtime (µs), and nothing else is. */
function expectSameTree(a: string, b: string): void {
  const names = readdirSync(a).sort();
  expect(readdirSync(b).sort(), b).toEqual(names);
  for (const n of names) {
    const sa = lstatSync(join(a, n));
    const sb = lstatSync(join(b, n));
    expect(sb.mode, join(b, n)).toBe(sa.mode);
    if (sa.isSymbolicLink()) expect(readlinkSync(join(b, n))).toBe(readlinkSync(join(a, n)));
    else expect(lstatSync(join(b, n), { bigint: true }).mtimeNs / 1000n, join(b, n)).toBe(lstatSync(join(a, n), { bigint: true }).mtimeNs / 1000n);
    if (sa.isDirectory()) expectSameTree(join(a, n), join(b, n));
    else if (sa.isFile()) expect(readFileSync(join(b, n)).equals(readFileSync(join(a, n))), join(b, n)).toBe(true);
  }
}

function imageTree(root: string): void {
  mkdirSync(join(root, 'sub'), { recursive: true });
  randomFile(join(root, 'vm1.raw'), 24 * MiB);
  randomFile(join(root, 'vm2.qcow2'), 8 * MiB);
  // A sparse image: 16 MiB with 2 MiB of data.
  const fd = openSync(join(root, 'sub', 'vm3.raw'), 'w');
  writeSync(fd, randomBytes(2 * MiB), 0, 2 * MiB, 5 * MiB);
  closeSync(fd);
  truncateSync(join(root, 'sub', 'vm3.raw'), 16 * MiB);
  writeFileSync(join(root, 'vm1.xml'), '<domain/>\n');
  symlinkSync('vm1.raw', join(root, 'current'));
}

describe.skipIf(!ready)('over ssh (real sshd on 127.0.0.1)', () => {
  it('push: a tree of images arrives whole; the next run moves ≤ 1.1 × the changed bytes + 64 KiB; an unchanged one ≤ 4 KiB', async () => {
    const src = join(ssh.dir, 'push-src');
    const dst = join(ssh.dir, 'push-dst');
    imageTree(src);
    const first = await overSsh(['-av', `${src}/`, at(`${dst}/`)]);
    expect(first.code, first.stderr).toBe(0);
    expectSameTree(src, dst);
    expect(first.stdout).toMatch(/sent [\d,]+ bytes {2}received [\d,]+ bytes/);

    const changed = changeBlocks(join(src, 'vm1.raw'), 4) + changeBlocks(join(src, 'sub', 'vm3.raw'), 2);
    const second = await overSsh(['-a', '--stats', `${src}/`, at(`${dst}/`)]);
    expect(second.code, second.stderr).toBe(0);
    expectSameTree(src, dst);
    expect(second.stdout).toMatch(new RegExp(`Literal data: ${changed.toLocaleString('en-US')} bytes`));
    expect(second.wire).toBeLessThanOrEqual(1.1 * changed + 64 * KiB);

    const third = await overSsh(['-a', `${src}/`, at(`${dst}/`)]);
    expect(third.code, third.stderr).toBe(0);
    expect(third.wire).toBeLessThanOrEqual(4 * KiB);

    // -c reads every source block; with the digest cache only the changed ones (none) travel.
    const forced = await overSsh(['-a', '-c', `${src}/`, at(`${dst}/`)]);
    expect(forced.code, forced.stderr).toBe(0);
    expect(forced.wire).toBeLessThanOrEqual(8 * KiB);
  });

  it('pull: the same from the far side, into a local DEST', async () => {
    const src = join(ssh.dir, 'pull-src');
    const dst = join(ssh.dir, 'pull-dst');
    imageTree(src);
    const first = await overSsh(['-a', at(`${src}/`), `${dst}/`]);
    expect(first.code, first.stderr).toBe(0);
    expectSameTree(src, dst);
    const changed = changeBlocks(join(src, 'vm2.qcow2'), 3);
    const second = await overSsh(['-a', at(`${src}/`), `${dst}/`]);
    expect(second.code, second.stderr).toBe(0);
    expectSameTree(src, dst);
    expect(second.wire).toBeLessThanOrEqual(1.1 * changed + 64 * KiB);
    const third = await overSsh(['-a', at(`${src}/`), `${dst}/`]);
    expect(third.code, third.stderr).toBe(0);
    expect(third.wire).toBeLessThanOrEqual(4 * KiB);
  });

  it('-z sends compressible blocks deflated, both ways; --bwlimit paces the sending side', async () => {
    const src = join(ssh.dir, 'z-src');
    mkdirSync(src);
    writeFileSync(join(src, 'text.img'), Buffer.alloc(6 * MiB, 'a log line that repeats itself\n'));
    const push = await overSsh(['-az', `${src}/`, at(join(ssh.dir, 'z-dst') + '/')]);
    expect(push.code, push.stderr).toBe(0);
    expectSameTree(src, join(ssh.dir, 'z-dst'));
    expect(push.wire).toBeLessThan(MiB);
    const pull = await overSsh(['-az', at(`${src}/`), join(ssh.dir, 'z-pull') + '/']);
    expect(pull.code, pull.stderr).toBe(0);
    expectSameTree(src, join(ssh.dir, 'z-pull'));
    expect(pull.wire).toBeLessThan(MiB);
    // A lower bound only: 2 MiB at 1 MiB/s cannot take less than about 1.5 s (50 ms of burst aside).
    const bw = join(ssh.dir, 'bw-src');
    mkdirSync(bw);
    randomFile(join(bw, 'rand.img'), 2 * MiB);
    for (const args of [[`${bw}/`, at(join(ssh.dir, 'bw-dst') + '/')], [at(`${bw}/`), join(ssh.dir, 'bw-pull') + '/']]) {
      const t0 = performance.now();
      const r = await overSsh(['-a', '--bwlimit=1M', ...args]);
      expect(r.code, r.stderr).toBe(0);
      expect(performance.now() - t0).toBeGreaterThan(1500);
    }
    expectSameTree(bw, join(ssh.dir, 'bw-pull'));
  });

  it('names with spaces, quotes and shell characters reach no shell: copied as they are, nothing run', async () => {
    const src = join(ssh.dir, 'names-src');
    mkdirSync(src);
    // A name may not hold '/': the command it would run makes a file in the current folder (the far side's home).
    const evil = `a b'c"$(touch qsync-pwned);\`touch qsync-pwned\`;|&`;
    writeFileSync(join(src, evil), 'x\n');
    const dst = join(ssh.dir, `dest with 'quotes' and $HOME`);
    const r = await overSsh(['-a', `${src}/`, at(`${dst}/`)]);
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(join(dst, evil), 'utf8')).toBe('x\n');
    for (const home of [process.cwd(), process.env.HOME ?? '/root', '/root']) expect(existsSync(join(home, 'qsync-pwned'))).toBe(false);
  });

  it('connection failures exit as rsync does: 255 from ssh, 12 for a far side that does not speak qsync; remote-only limits are clear', async () => {
    const src = join(ssh.dir, 'fail-src');
    mkdirSync(src);
    writeFileSync(join(src, 'f'), 'x');
    const closed = await runQsync(['-a', '-e', 'ssh -p 1 -o BatchMode=yes -o StrictHostKeyChecking=no', `${src}/`, '127.0.0.1:/tmp/nowhere/']);
    expect(closed.code).toBe(255);
    expect(closed.stderr).toMatch(/connection unexpectedly closed/);
    const notQsync = await runQsync(['-a', '-e', ssh.sshd.rsh, '--qsync-path', 'cat', `${src}/`, at('/tmp/nowhere/')]);
    expect(notQsync.code).toBe(12);
    expect(notQsync.stderr).not.toMatch(/internal error/);
    const m = await runQsync(['-a', '--manifest', join(ssh.dir, 'm.qsm'), '-e', ssh.sshd.rsh, `${src}/f`, at('/tmp/nowhere/f')]);
    expect(m.code).toBe(1);
    expect(m.stderr).toMatch(/--manifest is not supported with a remote destination/);
    const both = await runQsync(['-a', 'a:x', 'b:y']);
    expect(both.code).toBe(1);
    expect(existsSync('/tmp/nowhere')).toBe(false);
  });

  it('a file hashed while ssh connects (src/remote/prehash.ts): its changed blocks arrive, and a write made meanwhile is not lost to the digests hashed before it', async () => {
    const src = join(ssh.dir, 'ahead.raw');
    const dst = join(ssh.dir, 'ahead-dst');
    mkdirSync(dst);
    randomFile(src, 16 * MiB);
    const first = await overSsh(['-a', src, at(`${dst}/`)]);
    expect(first.code, first.stderr).toBe(0);
    // Only a file left alone for a second is hashed ahead.
    const poke = (block: number) => {
      const fd = openSync(src, 'r+');
      writeSync(fd, randomBytes(BLOCK), 0, BLOCK, block * BLOCK);
      closeSync(fd);
    };
    poke(3);
    poke(200);
    await new Promise((ok) => setTimeout(ok, 1100));
    const second = await overSsh(['-a', '--stats', src, at(`${dst}/`)]);
    expect(second.code, second.stderr).toBe(0);
    expect(readFileSync(join(dst, 'ahead.raw')).equals(readFileSync(src))).toBe(true);
    expect(second.stdout).toMatch(new RegExp(`Literal data: ${(2 * BLOCK).toLocaleString('en-US')} bytes`));
    // The remote shell writes a block while the session starts, after this side began hashing: that block must travel.
    await new Promise((ok) => setTimeout(ok, 1100));
    const script = `sleep 0.3; head -c ${BLOCK} /dev/urandom | dd of=${src} bs=${BLOCK} seek=100 conv=notrunc status=none; exec "$@"`;
    // -c: the stat answered ahead predates the write, and the quick check would skip the file (as rsync's would, until the next run).
    const third = await overSsh(['-a', '-c', src, at(`${dst}/`)], `sh -c ${JSON.stringify(script)} sh ${ssh.sshd.rsh}`);
    expect(third.code, third.stderr).toBe(0);
    expect(readFileSync(join(dst, 'ahead.raw')).equals(readFileSync(src))).toBe(true);
  });
});

describe.skipIf(!ready)('odd operands, as rsync takes them', () => {
  it('a remote DEST that is a file: exit 3, as rsync, with or without a trailing slash; nothing changes', async () => {
    const src = join(ssh.dir, 'odd-src');
    mkdirSync(src);
    writeFileSync(join(src, 'f'), 'x');
    const file = join(ssh.dir, 'odd-file');
    writeFileSync(file, 'keep\n');
    for (const dest of [file, `${file}/`]) {
      const r = await overSsh(['-a', `${src}/`, at(dest)]);
      expect(r.code, r.stderr).toBe(3);
      expect(r.stderr).not.toMatch(/internal error/);
      const ref = await runQsync(['-a', `${src}/`, dest]);
      expect(ref.code, ref.stderr).toBe(3);
    }
    expect(readFileSync(file, 'utf8')).toBe('keep\n');
  });

  it('`host:` is the remote home folder (the far side\'s working folder), as with rsync', async () => {
    const home = join(ssh.dir, 'odd-home');
    mkdirSync(home);
    writeFileSync(join(home, 'h'), 'home\n');
    // The far side runs in `home`: its command line starts with a cd there.
    const cmd = `cd ${home} && ${ssh.serverCmd}`;
    const pulled = join(ssh.dir, 'odd-pulled');
    const r = await runQsync(['-a', '-e', ssh.sshd.rsh, '--qsync-path', cmd, `${ssh.sshd.host}:`, `${pulled}/`]);
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(join(pulled, 'h'), 'utf8')).toBe('home\n');
    const src = join(ssh.dir, 'odd-src2');
    mkdirSync(src);
    writeFileSync(join(src, 'pushed'), 'p\n');
    const p = await runQsync(['-a', '-e', ssh.sshd.rsh, '--qsync-path', cmd, `${src}/`, `${ssh.sshd.host}:`]);
    expect(p.code, p.stderr).toBe(0);
    expect(readFileSync(join(home, 'pushed'), 'utf8')).toBe('p\n');
  });
});

describe.skipIf(!ready)('the link killed mid-transfer', () => {
  it('at several points of a first copy and of an update: the next run converges, and the far manifest never lies', async () => {
    const src = join(ssh.dir, 'kill-src');
    const dst = join(ssh.dir, 'kill-dst');
    mkdirSync(src);
    randomFile(join(src, 'big.raw'), 48 * MiB);
    for (const phase of ['first', 'update']) {
      if (phase === 'update') changeBlocks(join(src, 'big.raw'), 200);
      for (const after of [0.1, 0.5, 0.9]) {
        // Kill ssh (the link) once this much of the file went through it.
        const limit = Math.floor(after * (phase === 'first' ? 48 * MiB : 200 * BLOCK));
        const r = await runQsync(['-a', '-e', `${process.execPath} ${join(import.meta.dirname, 'helpers', 'cut-rsh.mjs')} ${limit} ${ssh.sshd.rsh}`, '--qsync-path', ssh.serverCmd, `${src}/`, at(`${dst}/`)]);
        expect(r.code, `${phase} ${after}: ${r.stderr}`).not.toBe(0);
        expect(r.stderr).not.toMatch(/internal error/);
        // A first copy never leaves a partial file under the real name.
        if (phase === 'first' && existsSync(join(dst, 'big.raw'))) expect(statSync(join(dst, 'big.raw')).size).toBe(48 * MiB);
      }
      const done = await overSsh(['-a', `${src}/`, at(`${dst}/`)]);
      expect(done.code, done.stderr).toBe(0);
      expectSameTree(src, dst);
      // What the far side's manifest says is what its target holds.
      const v = await runQsync(['verify', join(dst, 'big.raw')], { env: { ...process.env, QSYNC_STATE_DIR: join(ssh.dir, 'server-state') } });
      expect(v.code, v.stdout + v.stderr).toBe(0);
    }
  });
});

describe.skipIf(!ready)('qsync --server --restrict DIR (a command= key)', () => {
  let restricted: Sshd;
  let root: string;
  let outside: string;
  beforeAll(async () => {
    root = join(ssh.dir, 'jail');
    outside = join(ssh.dir, 'outside');
    mkdirSync(join(root, 'vm1'), { recursive: true });
    mkdirSync(outside);
    writeFileSync(join(outside, 'secret'), 'outside\n');
    symlinkSync(outside, join(root, 'esc'));
    restricted = await startSshd({ authorizedKeyOptions: `command="QSYNC_STATE_DIR=${join(ssh.dir, 'jail-state')} ${process.execPath} ${QSYNC} --server --restrict ${root}",restrict` });
  });
  afterAll(() => restricted?.stop());

  const via = (args: string[]) => runQsync(['-a', '-e', restricted.rsh, ...args]);

  it('pushes and pulls below DIR', async () => {
    const src = join(ssh.dir, 'r-src');
    mkdirSync(src);
    writeFileSync(join(src, 'disk.raw'), randomBytes(300 * KiB));
    const r = await via([`${src}/`, `${restricted.host}:vm1/`]);
    expect(r.code, r.stderr).toBe(0);
    expectSameTree(src, join(root, 'vm1'));
    const back = join(ssh.dir, 'r-back');
    const p = await via([`${restricted.host}:vm1/`, `${back}/`]);
    expect(p.code, p.stderr).toBe(0);
    expectSameTree(src, back);
  });

  it.skipIf(!needTools('getfattr', 'setfattr', 'getfacl', 'setfacl') || process.getuid?.() !== 0)('-aHAX and --files-from push below DIR and pull back: links, ACLs and xattrs arrive, nothing lands outside', async () => {
    const src = join(ssh.dir, 'r-hax');
    mkdirSync(join(src, 'd'), { recursive: true });
    writeFileSync(join(src, 'a'), 'linked\n');
    linkSync(join(src, 'a'), join(src, 'd/b'));
    execFileSync('setfattr', ['-n', 'user.note', '-v', 'kept', join(src, 'a')]);
    execFileSync('setfacl', ['-m', 'u:1234:r', join(src, 'd/b')]);
    execFileSync('setfacl', ['-d', '-m', 'g:4321:rx', join(src, 'd')]);
    const list = join(ssh.dir, 'r-hax-list');
    writeFileSync(list, 'a\nd/b\n');
    const attrsOf = (p: string) => execFileSync('getfattr', ['--absolute-names', '-d', '-m', '-', '-e', 'base64', p], { encoding: 'utf8' }).replace(/^# file: .*\n/m, '');
    const check = (d: string) => {
      expect(lstatSync(join(d, 'd/b')).ino).toBe(lstatSync(join(d, 'a')).ino);
      expect(attrsOf(join(d, 'a'))).toBe(attrsOf(join(src, 'a')));
      expect(attrsOf(join(d, 'd'))).toBe(attrsOf(join(src, 'd')));
      expect(attrsOf(join(d, 'a'))).toMatch(/user\.note=0sa2VwdA==/);
    };
    for (const extra of [[], [`--files-from=${list}`]]) {
      const at = extra.length ? 'vm3' : 'vm2';
      const r = await via(['-HAX', ...extra, `${src}/`, `${restricted.host}:${at}/`]);
      expect(r.code, r.stderr).toBe(0);
      check(join(root, at));
      const back = join(ssh.dir, `r-hax-back-${at}`);
      const p = await via(['-HAX', ...extra, `${restricted.host}:${at}/`, `${back}/`]);
      expect(p.code, p.stderr).toBe(0);
      check(back);
    }
    expect(readdirSync(outside)).toEqual(['secret']);
  });

  it.each([
    ['an absolute path', '/etc/'],
    ['..', '../outside/'],
    ['.. further down', 'vm1/../../outside/'],
    ['a symlink out of DIR', 'esc/'],
    ['a path through a symlink out of DIR', 'esc/sub/'],
  ])('refuses %s, as DEST and as SRC, and touches nothing', async (_what, path) => {
    const src = join(ssh.dir, `r-src2-${++counter}`);
    mkdirSync(src);
    writeFileSync(join(src, 'secret'), 'pushed\n');
    const push = await via([`${src}/`, `${restricted.host}:${path}`]);
    expect(push.code, push.stderr).toBe(1);
    expect(push.stderr).toMatch(/refused/);
    const pull = await via([`${restricted.host}:${path}`, join(ssh.dir, `r-pulled-${counter}/`)]);
    expect(pull.code, pull.stderr).not.toBe(0);
    expect(pull.stderr).toMatch(/refused/);
    expect(existsSync(join(ssh.dir, `r-pulled-${counter}`, 'secret'))).toBe(false);
    expect(readFileSync(join(outside, 'secret'), 'utf8')).toBe('outside\n');
    expect(readdirSync(outside)).toEqual(['secret']);
  });

  it('a symlink pushed into DIR is a symlink there, never a way out on the next run', async () => {
    const src = join(ssh.dir, 'r-src3');
    mkdirSync(src);
    symlinkSync(outside, join(src, 'evil'));
    const first = await via([`${src}/`, `${restricted.host}:vm2/`]);
    expect(first.code, first.stderr).toBe(0);
    expect(lstatSync(join(root, 'vm2', 'evil')).isSymbolicLink()).toBe(true);
    const next = join(ssh.dir, 'r-src4');
    mkdirSync(next);
    writeFileSync(join(next, 'secret'), 'pushed\n');
    const r = await via([`${next}/`, `${restricted.host}:vm2/evil/`]);
    expect(r.code).toBe(1);
    expect(readdirSync(outside)).toEqual(['secret']);
    // Pulling the link without a trailing slash copies the link, not what it names.
    const pulled = join(ssh.dir, 'r-pulled-link');
    const back = await via([`${restricted.host}:vm2/evil`, `${pulled}/`]);
    expect(back.code, back.stderr).toBe(0);
    expect(lstatSync(join(pulled, 'evil')).isSymbolicLink()).toBe(true);
  });

  it('1,000 fuzzed frames cannot crash the server or write outside its root', async () => {
    const fuzzRoot = join(ssh.dir, 'fuzz-root');
    mkdirSync(fuzzRoot);
    const before = readdirSync(ssh.dir).sort();
    const frames = fuzzFrames(1000);
    const sessions = 40;
    const per = Math.ceil(frames.length / sessions);
    for (let s = 0; s < sessions; s++) {
      const role = s % 2 ? 'sender' : 'receiver';
      const helloMsg = encodeControl({ op: 'hello', magic: 'qsync-wire', version: 2, role, dest: 'd/', operands: ['x/'], options: {}, blockSize: 65536 });
      const input = Buffer.concat([helloMsg, ...frames.slice(s * per, (s + 1) * per)]);
      const r = await serverWith(input, fuzzRoot);
      expect(r.signal, r.stderr).toBeNull();
      expect([0, 1, 2, 3, 11, 12, 23, 24], `session ${s}: exit ${r.code}: ${r.stderr}`).toContain(r.code);
      expect(r.stderr).not.toMatch(/internal error|at .*\.js:\d+/);
    }
    // Nothing appeared beside the root; inside it, at most the receiving folder.
    expect(readdirSync(ssh.dir).sort()).toEqual(before);
    for (const n of readdirSync(fuzzRoot)) expect(n).toBe('d');
    expect(readdirSync(outside)).toEqual(['secret']);
  });
});

/** Frames a hostile client could send: valid ones with bad fields, mutated bytes, bad lengths. */
function fuzzFrames(n: number): Buffer[] {
  const ops = ['stat', 'open-operand', 'open-parent', 'dir-stat', 'list', 'lstat', 'open-dir', 'readlink', 'open-file', 'scan', 'close', 'close-file', 'bye', 'done', 'event', 'ok', 'error', 'entries', 'need-digests', 'scan-end', 'progress'];
  const values = ['../../etc/passwd', '/etc/shadow', '', 'x', -1, 0, 1, 2 ** 53, 1e308, null, [], {}, ['1', '2'], 'a'.repeat(5000), '\u0000', 1.5];
  const pick = <T>(a: T[]): T => a[Math.floor(Math.random() * a.length)]!;
  const out: Buffer[] = [];
  for (let i = 0; i < n; i++) {
    const kind = i % 6;
    let f: Buffer;
    if (kind === 0) f = encodeControl({ op: pick(ops), h: pick(values), f: pick(values), name: pick(values), operand: pick(values), st: pick(values), plan: { size: pick(values), blockSize: pick(values), mode: pick(['manifest', 'rewrite', 'x']), oldSize: pick(values), fp: 'ab'.repeat(32) } });
    else if (kind === 1) f = encodeData(Math.floor(Math.random() * 1e9), randomBytes(32 * (1 + (i % 3))), randomBytes(1 + (i % 5000)));
    else if (kind === 2) f = encodeZero(Math.floor(Math.random() * 2 ** 40), Math.floor(Math.random() * 2 ** 40));
    else if (kind === 3) f = encodeDigests(i, randomBytes(32 * (i % 4)));
    else if (kind === 4) {
      f = encodeControl({ op: pick(ops), operand: pick(values) });
      f[5 + Math.floor(Math.random() * (f.length - 5))] ^= 1 << i % 8;
    } else {
      f = randomBytes(5 + (i % 64));
      if (i % 12 === 5) f.writeUInt32LE(0xffffffff, 0);
    }
    out.push(f);
  }
  return out;
}

/** `qsync --server --restrict ROOT` fed `input` on stdin; its exit and stderr. */
function serverWith(input: Buffer, root: string): Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [QSYNC, '--server', '--restrict', root], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, QSYNC_STATE_DIR: join(ssh.dir, 'fuzz-state') } });
    let stderr = '';
    p.stderr.on('data', (d) => (stderr += d));
    p.stdout.resume();
    p.stdin.on('error', () => {});
    p.stdin.end(input);
    const t = setTimeout(() => p.kill('SIGKILL'), 20_000);
    p.on('close', (code, signal) => {
      clearTimeout(t);
      resolve({ code, signal, stderr });
    });
  });
}

describe.skipIf(!ready)('many hosts, one backup server', () => {
  it('four pushes at once into their own DESTs, and a pull, do not interfere', async () => {
    const srcs = [1, 2, 3, 4].map((i) => join(ssh.dir, `many-src${i}`));
    for (const s of srcs) {
      mkdirSync(s);
      randomFile(join(s, 'disk.raw'), 12 * MiB);
    }
    const pullSrc = join(ssh.dir, 'many-pull-src');
    mkdirSync(pullSrc);
    randomFile(join(pullSrc, 'disk.raw'), 12 * MiB);
    const runs = [
      ...srcs.map((s, i) => overSsh(['-a', `${s}/`, at(join(ssh.dir, `many-dst${i + 1}`) + '/')])),
      overSsh(['-a', at(`${pullSrc}/`), join(ssh.dir, 'many-pulled') + '/']),
    ];
    const results = await Promise.all(runs);
    for (const r of results) expect(r.code, r.stderr).toBe(0);
    srcs.forEach((s, i) => expectSameTree(s, join(ssh.dir, `many-dst${i + 1}`)));
    expectSameTree(pullSrc, join(ssh.dir, 'many-pulled'));
  });
});

