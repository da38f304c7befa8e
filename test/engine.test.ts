/**
 * The file-mode engine end to end, through the built CLI, on real files of
 * real size: what is read and written is measured from outside the process.
 */
import { execFileSync, spawn } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync, openSync, writeSync, closeSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { differingBytes, mutateBlocks, qcow2File, randomFile } from './helpers/data.js';
import { mountForTest, needTools } from './helpers/env.js';
import { manifestOf, QSYNC, runQsync, sha256, stateOf } from './helpers/cli.js';

/** The intent record's fixed header (docs/FORMATS.md "Intent"); block indices follow it. */
const INTENT_HEADER_LEN = 96;

const MiB = 1 << 20;
const SIZE = 256 * MiB;
let dir: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'qsync-engine-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const bumpMtime = (p: string) => {
  const t = Date.now() / 1000 + Math.random();
  utimesSync(p, t, t);
};

async function expectIdentical(a: string, b: string) {
  expect(statSync(b).size).toBe(statSync(a).size);
  expect(await sha256(b)).toBe(await sha256(a));
}

describe('one file', () => {
  it('copies a new file byte for byte, keeps its mtime, and writes a manifest beside the target', async () => {
    const src = join(dir, 'one.img');
    randomFile(src, 3 * MiB + 123);
    const r = await runQsync(['-a', src, join(dir, 'one-copy.img')]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    await expectIdentical(src, join(dir, 'one-copy.img'));
    expect(Math.abs(statSync(join(dir, 'one-copy.img')).mtimeMs - statSync(src).mtimeMs)).toBeLessThan(0.01);
    expect(existsSync(manifestOf(dir, 'one-copy.img'))).toBe(true);
  });

  it('skips an unchanged file without reading it (quick check), and reads it with -c', async () => {
    const src = join(dir, 'one.img');
    const quick = await runQsync(['-a', '--json', src, join(dir, 'one-copy.img')], { measureIo: true });
    expect(quick.code).toBe(0);
    // Node's own start reads about 1.3-1.6 MB (its modules): the file's 3 MiB would show on top of that.
    expect(quick.io!.rchar).toBeLessThan(statSync(src).size);
    const forced = await runQsync(['-a', '-c', src, join(dir, 'one-copy.img')], { measureIo: true });
    expect(forced.code).toBe(0);
    expect(forced.io!.rchar).toBeGreaterThan(statSync(src).size);
    expect(forced.io!.rchar - quick.io!.rchar).toBeGreaterThan(statSync(src).size * 0.9);
    expect(forced.io!.wchar).toBeLessThan(MiB);
  });
});

describe('options that change how a file is written', () => {
  it('-S: zero blocks of a new copy become holes; the copy is identical', async () => {
    const s = join(dir, 'sparse-src.img');
    execFileSync('truncate', ['-s', '64M', s]);
    const fd = openSync(s, 'r+');
    writeSync(fd, Buffer.alloc(1 * MiB, 0x33), 0, 1 * MiB, 10 * MiB);
    closeSync(fd);
    const r = await runQsync(['-a', '-S', s, join(dir, 'sparse-dst.img')]);
    expect(r.code, r.stderr).toBe(0);
    await expectIdentical(s, join(dir, 'sparse-dst.img'));
    expect(statSync(join(dir, 'sparse-dst.img')).blocks * 512).toBeLessThan(4 * MiB);
  });

  it('--manifest PATH keeps the manifest where it says, and the next run trusts it', async () => {
    const s = join(dir, 'm-src.img');
    randomFile(s, 4 * MiB);
    const m = join(dir, 'elsewhere', 'm.qsm');
    mkdirSync(join(dir, 'elsewhere'));
    expect((await runQsync(['-a', '--manifest', m, s, join(dir, 'm-dst.img')])).code).toBe(0);
    expect(existsSync(m)).toBe(true);
    expect(existsSync(join(stateOf(dir), 'manifests', 'm-dst.img.qsm'))).toBe(false);
    mutateBlocks(s, 4 * MiB, 0.05);
    bumpMtime(s);
    const again = await runQsync(['-a', '--manifest', m, s, join(dir, 'm-dst.img')], { measureIo: true });
    expect(again.code, again.stderr).toBe(0);
    // Trusted: the target is not read (one pass over the 4 MiB source, plus node's own files).
    expect(again.io!.rchar).toBeLessThan(4 * MiB + 3 * MiB);
    await expectIdentical(s, join(dir, 'm-dst.img'));
  });
});

describe.each([
  ['raw random file', 'raw'],
  ['real qcow2 image', 'qcow2'],
] as const)('second run on a 256 MiB %s with 1%% of blocks changed', (_name, kind) => {
  const run = kind === 'qcow2' && !needTools('qemu-img', 'qemu-io') ? it.skip : it;
  run('reads the source once, never the target, writes about the changed bytes, and the target is identical', async () => {
    const src = join(dir, `big.${kind}`);
    const dst = join(dir, `big-dst-${kind}`);
    if (kind === 'raw') randomFile(src, SIZE);
    else qcow2File(src, SIZE);
    const first = await runQsync(['-a', src, `${dst}/`]);
    expect(first.code, first.stderr).toBe(0);
    const target = join(dst, `big.${kind}`);
    await expectIdentical(src, target);

    const before = join(dir, `before.${kind}`);
    copyFileSync(src, before);
    if (kind === 'raw') mutateBlocks(src, SIZE, 0.01);
    else {
      const cmds: string[] = [];
      for (let i = 0; i < 40; i++) cmds.push('-c', `write -P ${i + 7} ${Math.floor((i * 6.1 + 1) * MiB)} 64k`);
      execFileSync('qemu-io', ['-f', 'qcow2', ...cmds, src], { stdio: 'ignore' });
    }
    bumpMtime(src);
    const changed = differingBytes(before, src);
    rmSync(before);
    expect(changed).toBeGreaterThan(0);

    const second = await runQsync(['-a', '--stats', src, `${dst}/`], { measureIo: true });
    expect(second.code, second.stderr).toBe(0);
    const size = statSync(src).size;
    // Once through the source, plus the old manifest and node's own files; reading the target would double it.
    expect(second.io!.rchar).toBeGreaterThanOrEqual(size);
    expect(second.io!.rchar).toBeLessThan(size * 1.1);
    // The changed blocks, their digests patched into the manifest, and the printed stats.
    expect(second.io!.wchar).toBeLessThanOrEqual(changed * 1.02 + 16 * 1024);
    await expectIdentical(src, target);
  });
});

describe('without a trustworthy manifest', () => {
  it('first run over an existing older copy (made by cp) writes only the differences', async () => {
    const s = join(dir, 'old.img');
    randomFile(s, 64 * MiB);
    const d = join(dir, 'old-dst');
    mkdirSync(d);
    copyFileSync(s, join(d, 'old.img'));
    mutateBlocks(s, 64 * MiB, 0.02);
    bumpMtime(s);
    const changed = differingBytes(s, join(d, 'old.img'));
    const r = await runQsync(['-a', `${s}`, `${d}/`], { measureIo: true });
    expect(r.code, r.stderr).toBe(0);
    expect(r.io!.wchar).toBeLessThanOrEqual(changed * 1.05 + statSync(manifestOf(d, 'old.img')).size + 64 * 1024);
    await expectIdentical(s, join(d, 'old.img'));
  });

  it('a bit-flipped manifest is detected: notice, compare, identical', async () => {
    const s = join(dir, 'old.img');
    const d = join(dir, 'old-dst');
    const m = manifestOf(d, 'old.img');
    const buf = readFileSync(m);
    buf[200] ^= 0x10;
    writeFileSync(m, buf);
    mutateBlocks(s, 64 * MiB, 0.01);
    bumpMtime(s);
    const r = await runQsync(['-a', s, `${d}/`]);
    expect(r.code).toBe(0);
    expect(r.stdout + r.stderr).toMatch(/manifest .* (checksum|invalid).*comparing/);
    await expectIdentical(s, join(d, 'old.img'));
  });

  it('a target changed behind qsync is detected (stale manifest): notice, compare, identical', async () => {
    const s = join(dir, 'old.img');
    const d = join(dir, 'old-dst');
    const t = join(d, 'old.img');
    // Someone writes into the target; the source is unchanged but forced with -c.
    const fd = openSync(t, 'r+');
    writeSync(fd, Buffer.alloc(4096, 0x5a), 0, 4096, 10 * MiB);
    closeSync(fd);
    const r = await runQsync(['-a', '-c', s, `${d}/`]);
    expect(r.code).toBe(0);
    expect(r.stdout + r.stderr).toMatch(/target changed since the last run/);
    await expectIdentical(s, t);
  });
});

describe('kill -9 during a run', () => {
  // Fixed delays land anywhere; 'writing' waits until the intent lists blocks (the run is writing), whatever the machine's speed.
  it.each([30, 120, 250, 400, 700, 'writing'] as const)('killed at %s (ms, or once writing), the next run converges to an identical target', async (ms) => {
    const s = join(dir, `kill.img`);
    const d = join(dir, `kill-dst`);
    if (!existsSync(s)) {
      randomFile(s, 192 * MiB);
      const r = await runQsync(['-a', s, `${d}/`]);
      expect(r.code).toBe(0);
    }
    mutateBlocks(s, 192 * MiB, 0.3);
    bumpMtime(s);
    const manifest = join(stateOf(d), 'manifests', 'kill.img.qsm');
    const manifestBefore = statSync(manifest, { bigint: true });
    let pid = 0;
    const running = runQsync(['-a', s, `${d}/`], { onSpawn: (p) => (pid = p) });
    if (ms === 'writing') {
      const intent = join(stateOf(d), 'manifests', 'kill.img.qsm.intent');
      const until = Date.now() + 30_000;
      while (Date.now() < until && !((statSync(intent, { throwIfNoEntry: false })?.size ?? 0) > INTENT_HEADER_LEN)) {
        await new Promise((r) => setTimeout(r, 2));
      }
    } else await new Promise((r) => setTimeout(r, ms));
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* it may have finished already */
    }
    await running;
    const interrupted = existsSync(join(stateOf(d), 'manifests', 'kill.img.qsm.intent'));
    // The kill may still land after the new manifest was committed (renamed, or patched through its journal) on a loaded machine.
    const after = statSync(manifest, { bigint: true, throwIfNoEntry: false });
    const committed = existsSync(`${manifest}.journal`) || !after || after.ino !== manifestBefore.ino || after.mtimeNs !== manifestBefore.mtimeNs;
    const again = await runQsync(['-a', s, `${d}/`], { measureIo: true });
    expect(again.code, again.stderr).toBe(0);
    // Killed once the intent lists blocks, the run was writing: the next one must resume from the intent.
    if (ms === 'writing') expect(interrupted, 'the kill landed while blocks were written').toBe(true);
    if (interrupted) {
      // The intent (and the manifest's patch journal) bound the damage: the next run never falls back to
      // comparing, so the target is not read; either it resumes from the intent or the commit had finished.
      expect(again.stderr).not.toMatch(/comparing/);
      expect(again.io!.rchar).toBeLessThan(192 * MiB * 1.1);
      if (ms === 'writing' && !committed) expect(again.stdout + again.stderr).toMatch(/resuming an interrupted run \(\d+ blocks to re-check\)/);
    }
    await expectIdentical(s, join(d, 'kill.img'));
  });
});

describe('two runs on one target', () => {
  it('the second refuses with a clear message while the first holds the lock', async () => {
    // A first copy of 2 GiB of (sparse) zeros without -S writes them all: it holds the lock for seconds.
    const s = join(dir, 'lock.img');
    execFileSync('truncate', ['-s', '2G', s]);
    const d = join(dir, 'lock-dst');
    let pid = 0;
    const first = runQsync(['-a', s, `${d}/`], { onSpawn: (p) => (pid = p) });
    // Wait for the first run's lock to appear.
    for (let i = 0; i < 200 && !existsSync(join(stateOf(d), 'lock')); i++) await new Promise((r) => setTimeout(r, 10));
    const second = await runQsync(['-a', s, `${d}/`]);
    expect(second.code).toBe(3);
    expect(second.stderr).toMatch(new RegExp(`another qsync \\(pid ${pid}\\) is syncing into`));
    expect((await first).code).toBe(0);
    await expectIdentical(s, join(d, 'lock.img'));
    rmSync(d, { recursive: true });
  });
});

describe('Ctrl-C', () => {
  it('SIGINT stops the run with exit 20 and drops the lock; the next run finishes', async () => {
    const s = join(dir, 'int.img');
    execFileSync('truncate', ['-s', '2G', s]);
    const d = join(dir, 'int-dst');
    let pid = 0;
    const running = runQsync(['-a', s, `${d}/`], { onSpawn: (p) => (pid = p) });
    for (let i = 0; i < 200 && !existsSync(join(stateOf(d), 'lock')); i++) await new Promise((r) => setTimeout(r, 10));
    await new Promise((r) => setTimeout(r, 100));
    process.kill(pid, 'SIGINT');
    const r = await running;
    expect(r.code).toBe(20);
    expect(r.stderr).toMatch(/received SIGINT/);
    expect(existsSync(join(stateOf(d), 'lock'))).toBe(false);
    const again = await runQsync(['-a', s, `${d}/`]);
    expect(again.code, again.stderr).toBe(0);
    await expectIdentical(s, join(d, 'int.img'));
    rmSync(d, { recursive: true });
  });
});

describe('bad input', () => {
  it('a missing source: message names it, exit 23, nothing written', async () => {
    const d = join(dir, 'bad-missing');
    const r = await runQsync(['-a', join(dir, 'no-such-file'), `${d}/`]);
    expect(r.code).toBe(23);
    expect(r.stderr).toMatch(/no-such-file.*no such file/i);
    expect(existsSync(d)).toBe(false);
  });

  it('an unknown flag: exit 1, names the flag', async () => {
    const r = await runQsync(['-a', '--frobnicate', dir, join(dir, 'x')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/--frobnicate/);
    expect(existsSync(join(dir, 'x'))).toBe(false);
  });

  it('an rsync option qsync does not support: exit 1, names it', async () => {
    const r = await runQsync(['-aL', dir, join(dir, 'x')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/-L/);
  });

  it('host:PATH goes to the remote shell, never to a local folder named "host:"; ./host:x is local', async () => {
    // A remote shell that cannot connect (here: one that fails at once) is a failed connection, as with rsync.
    const r = await runQsync(['-a', '-e', 'false', join(dir, 'one.img'), 'backuphost:/srv/images/']);
    expect(r.code).toBe(12);
    expect(r.stderr).toMatch(/connection unexpectedly closed \(0 bytes received so far\) \[backuphost\]/);
    expect(existsSync('backuphost:')).toBe(false);
    // A "host" the remote shell would take for an option never reaches it.
    const pwned = 'qsync-pwned-by-proxycommand';
    for (const op of [`-oProxyCommand=touch\t${pwned}:x`, '-lroot@h:x']) {
      const inj = await runQsync(['-a', '-e', 'ssh', join(dir, 'one.img'), '--', op]);
      expect(inj.code, inj.stderr).toBe(1);
      expect(inj.stderr).toMatch(/starting with "-" is refused/);
    }
    expect(existsSync(pwned)).toBe(false);
    writeFileSync(join(dir, 'colon-src'), 'x');
    // A far side that never answers: --timeout ends the run with rsync's 30.
    const silent = await runQsync(['-a', '--timeout', '1', '-e', "sh -c 'sleep 60'", join(dir, 'colon-src'), 'quiethost:/x/']);
    expect(silent.code, silent.stderr).toBe(30);
    expect(silent.stderr).toMatch(/timeout: quiethost sent nothing for 1 s/);
    const local = await runQsync(['-a', join(dir, 'colon-src'), `${dir}/./host:x`]);
    expect(local.code, local.stderr).toBe(0);
    expect(existsSync(join(dir, 'host:x'))).toBe(true);
  });

  it('a block size that is not a power of two: exit 1, nothing written', async () => {
    const r = await runQsync(['-a', '-B', '3000', join(dir, 'one.img'), join(dir, 'bs-dst/')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/3000/);
    expect(existsSync(join(dir, 'bs-dst'))).toBe(false);
  });

  it('an unwritable destination (read-only mount): exit 11, says which', async (ctx) => {
    const ro = join(dir, 'ro');
    mkdirSync(ro);
    if (!mountForTest(['-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs', ro])) return ctx.skip('cannot mount a tmpfs here (needs root)');
    try {
      const src = join(dir, 'ro-src.img');
      randomFile(src, 64 * 1024);
      const r = await runQsync(['-a', src, `${ro}/`]);
      expect(r.code).toBe(11);
      expect(r.stderr).toContain(ro);
    } finally {
      execFileSync('umount', [ro]);
    }
  });
});

describe('output piped into a reader that stops early (| head -1)', () => {
  it('no stack trace; the sync still completes', async () => {
    const s = join(dir, 'pipe-src');
    mkdirSync(s);
    for (let i = 0; i < 30; i++) writeFileSync(join(s, `f${i}`), `file ${i}\n`);
    const d = join(dir, 'pipe-dst');
    const child = spawn('node', [QSYNC, '-av', `${s}/`, `${d}/`], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (c) => (stderr += c));
    child.stdout.once('data', () => child.stdout.destroy());
    const code = await new Promise((r) => child.on('close', r));
    expect(stderr).toBe('');
    expect(code).toBe(0);
    for (let i = 0; i < 30; i++) expect(readFileSync(join(d, `f${i}`), 'utf8')).toBe(`file ${i}\n`);
  });
});

describe('a destination that fills up', () => {
  it('stops at once with exit 11 and a message saying so; after space is freed the next run finishes', async (ctx) => {
    const small = join(dir, 'small');
    mkdirSync(small);
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', small]);
    } catch {
      if (process.env.QSYNC_REQUIRE_QEMU === '1') throw new Error('cannot mount a small tmpfs for this test (needs root)');
      return ctx.skip('cannot mount a tmpfs here (needs root)');
    }
    const s = join(dir, 'twelve');
    mkdirSync(s);
    randomFile(join(s, 'a.img'), 12 * MiB);
    randomFile(join(s, 'b.img'), 1 * MiB);
    try {
      const r = await runQsync(['-a', `${s}/`, `${small}/`]);
      expect(r.code).toBe(11);
      expect(r.stderr).toMatch(/no space left on the destination while writing a\.img/);
      execFileSync('mount', ['-o', 'remount,size=32m', small]);
      const again = await runQsync(['-a', `${s}/`, `${small}/`]);
      expect(again.code, again.stderr).toBe(0);
      await expectIdentical(join(s, 'a.img'), join(small, 'a.img'));
      await expectIdentical(join(s, 'b.img'), join(small, 'b.img'));
    } finally {
      execFileSync('umount', [small]);
    }
  });
});

describe.skipIf(!needTools('qemu-img', 'qemu-storage-daemon'))('an image a running QEMU holds open', () => {
  it('is refused in file mode with a pointer to image mode; other files still sync (exit 23)', async () => {
    const src = join(dir, 'held');
    mkdirSync(src);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(src, 'vm.qcow2'), '64M']);
    writeFileSync(join(src, 'notes.txt'), 'hello\n');
    const pidfile = join(dir, 'qsd.pid');
    execFileSync('qemu-storage-daemon', [
      '--blockdev', `driver=file,node-name=file0,filename=${join(src, 'vm.qcow2')}`,
      '--blockdev', 'driver=qcow2,node-name=disk0,file=file0',
      '--pidfile', pidfile, '--daemonize',
    ]);
    try {
      const r = await runQsync(['-a', `${src}/`, join(dir, 'held-dst/')]);
      expect(r.code).toBe(23);
      expect(r.stderr).toMatch(/vm\.qcow2 is open in a running QEMU.*--qmp/s);
      expect(readFileSync(join(dir, 'held-dst', 'notes.txt'), 'utf8')).toBe('hello\n');
      expect(existsSync(join(dir, 'held-dst', 'vm.qcow2'))).toBe(false);
    } finally {
      process.kill(Number(readFileSync(pidfile, 'utf8')), 'SIGTERM');
    }
  });
});
