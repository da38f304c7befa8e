/**
 * The ssh test harness against real parts: Debian's sshd, the ssh client,
 * rsync over it, and the byte-counting remote shell.
 */
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { needTools } from './helpers/env.js';
import { countingRsh, descendants, readCount, splitRsh, SSHD, startSshd, type Sshd } from './helpers/sshd.js';

const MiB = 1024 * 1024;

/** Runs an -e value plus arguments as rsync would: split into words, no shell. */
function rshRun(rsh: string, args: string[], input?: Buffer): Promise<{ code: number | null; stdout: Buffer; stderr: string }> {
  const [cmd, ...words] = splitRsh(rsh);
  const child = spawn(cmd!, [...words, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  const out: Buffer[] = [];
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => out.push(d));
  child.stderr.on('data', (d: Buffer) => (stderr += d));
  child.stdin.end(input ?? Buffer.alloc(0));
  return new Promise((resolve) => child.on('close', (code) => resolve({ code, stdout: Buffer.concat(out), stderr })));
}

const rsync = (...args: string[]): string => execFileSync('rsync', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const diffTrees = (a: string, b: string): string => execFileSync('diff', ['-r', a, b], { encoding: 'utf8' });

describe.skipIf(!needTools(SSHD, 'ssh', 'ssh-keygen', 'rsync', 'diff'))('sshd harness', () => {
  let sshd: Sshd;
  let work: string;
  beforeAll(async () => {
    sshd = await startSshd();
  });
  afterAll(() => sshd?.stop());
  beforeEach(() => {
    work = mkdtempSync(join(tmpdir(), 'qsync-sshd-test-'));
  });
  afterEach(() => rmSync(work, { recursive: true, force: true }));

  function smallTree(root: string): void {
    mkdirSync(join(root, 'a/b'), { recursive: true });
    writeFileSync(join(root, 'a/one.txt'), 'one\n');
    writeFileSync(join(root, 'a/b/two.bin'), randomBytes(100_000));
    writeFileSync(join(root, 'name with space'), '');
  }

  it('runs a command over ssh with the -e value', async () => {
    const r = await rshRun(sshd.rsh, [sshd.host, 'echo ok']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout.toString()).toBe('ok\n');
  });

  it("gives sessions its temp dir as HOME (root's dotfiles are not read)", async () => {
    const r = await rshRun(sshd.rsh, [sshd.host, 'echo "$HOME"']);
    expect(r.stdout.toString()).toBe(`${sshd.dir}\n`);
  });

  it('refuses a client without the key', async () => {
    const r = await rshRun(`ssh -F /dev/null -p ${sshd.port} -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o IdentityFile=/dev/null`, [sshd.host, 'echo ok']);
    expect(r.code).toBe(255);
    expect(r.stdout.toString()).toBe('');
  });

  it('rsync -a pushes and pulls a tree over it', () => {
    const src = join(work, 'src');
    smallTree(src);
    rsync('-a', '-e', sshd.rsh, `${src}/`, `${sshd.host}:${work}/pushed/`);
    expect(diffTrees(src, join(work, 'pushed'))).toBe('');
    rsync('-a', '-e', sshd.rsh, `${sshd.host}:${work}/pushed/`, join(work, 'pulled'));
    expect(diffTrees(src, join(work, 'pulled'))).toBe('');
  });

  it('counts what goes through ssh: a pushed 1 MiB file is sent, a pulled one received', () => {
    const file = join(work, 'random.bin');
    writeFileSync(file, randomBytes(MiB));
    const push = join(work, 'push.count');
    rsync('-a', '--whole-file', '-e', countingRsh(sshd.rsh, push), file, `${sshd.host}:${work}/pushed/`);
    expect(readFileSync(join(work, 'pushed/random.bin')).equals(readFileSync(file))).toBe(true);
    const p = readCount(push);
    expect(readFileSync(push, 'utf8').trim().split('\n')).toHaveLength(1); // one ssh session
    expect(p.sent).toBeGreaterThanOrEqual(MiB);
    expect(p.sent).toBeLessThan(1.1 * MiB); // random data does not shrink, and rsync adds little
    expect(p.received).toBeLessThan(64 * 1024);

    const pull = join(work, 'pull.count');
    rsync('-a', '--whole-file', '-e', countingRsh(sshd.rsh, pull), `${sshd.host}:${file}`, join(work, 'pulled/'));
    const q = readCount(pull);
    expect(q.received).toBeGreaterThanOrEqual(MiB);
    expect(q.received).toBeLessThan(1.1 * MiB);
    expect(q.sent).toBeLessThan(64 * 1024);
  });

  it('counts exact bytes both ways and keeps the exit status', async () => {
    const count = join(work, 'exact.count');
    const input = randomBytes(3 * MiB + 17);
    // The remote reads all 3 MiB + 17 and sends back its length and 5 more bytes; exit 7.
    const r = await rshRun(countingRsh(sshd.rsh, count), [sshd.host, 'wc -c; printf abcde; exit 7'], input);
    expect(r.code).toBe(7);
    expect(r.stdout.toString()).toBe(`${input.length}\nabcde`);
    expect(readCount(count)).toEqual({ sent: input.length, received: r.stdout.length });
    // A second session appends; readCount sums them.
    await rshRun(countingRsh(sshd.rsh, count), [sshd.host, 'printf xy'], Buffer.from('123'));
    expect(readCount(count)).toEqual({ sent: input.length + 3, received: r.stdout.length + 2 });
  });

  it('exits 128 + signal when ssh is killed, and still writes its count', async () => {
    const count = join(work, 'killed.count');
    const [cmd, ...words] = splitRsh(countingRsh(sshd.rsh, count));
    const child = spawn(cmd!, [...words, sshd.host, 'echo started; sleep 60'], { stdio: ['pipe', 'pipe', 'pipe'] });
    await new Promise<void>((resolve) => child.stdout.once('data', () => resolve()));
    const ssh = descendants(child.pid!).find((p) => readFileSync(`/proc/${p}/comm`, 'utf8').trim() === 'ssh');
    expect(ssh).toBeDefined();
    process.kill(ssh!, 'SIGKILL');
    const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
    expect(code).toBe(128 + 9);
    expect(readCount(count)).toEqual({ sent: 0, received: 'started\n'.length });
  });
});

describe.skipIf(!needTools(SSHD, 'ssh', 'ssh-keygen'))('sshd lifecycle', () => {
  it('authorizedKeyOptions command= forces that command', async () => {
    const s = await startSshd({ authorizedKeyOptions: 'command="echo forced:$SSH_ORIGINAL_COMMAND",restrict' });
    try {
      const r = await rshRun(s.rsh, [s.host, 'echo not this']);
      expect(r.code).toBe(0);
      expect(r.stdout.toString()).toBe('forced:echo not this\n');
    } finally {
      await s.stop();
    }
  });

  it('stop() leaves no sshd process and no temp dir, even with a session open', async () => {
    const s = await startSshd();
    const [cmd, ...words] = splitRsh(s.rsh);
    const session = spawn(cmd!, [...words, s.host, 'echo up; sleep 60'], { stdio: ['pipe', 'pipe', 'ignore'] });
    const closed = new Promise<number | null>((resolve) => session.on('close', resolve));
    await new Promise<void>((resolve) => session.stdout.once('data', () => resolve()));
    const sshdPid = Number(execFileSync('sh', ['-c', `ss -Hltnp 'sport = :${s.port}' | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2`], { encoding: 'utf8' }).trim());
    expect(sshdPid).toBeGreaterThan(0);
    const tree = [sshdPid, ...descendants(sshdPid)];
    expect(tree.length).toBeGreaterThan(1); // the session's processes
    expect(existsSync(s.dir)).toBe(true);
    await s.stop();
    for (const p of tree) expect(existsSync(`/proc/${p}`) && !readFileSync(`/proc/${p}/stat`, 'utf8').includes(') Z '), `pid ${p} left`).toBe(false);
    expect(existsSync(s.dir)).toBe(false);
    expect(await closed).toBe(255); // the client saw its server go
    await s.stop(); // twice is fine
  });

  it('names its log when sshd cannot start', async () => {
    await expect(startSshd({ listenAddress: '192.0.2.1' })).rejects.toThrow(/sshd (exited|did not accept).*log \(.*sshd\.log/s);
  });
});
