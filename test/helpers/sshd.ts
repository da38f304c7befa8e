/**
 * A real OpenSSH server for tests and the benchmark: Debian's /usr/sbin/sshd
 * in the foreground (-D -e), in a temp dir of its own (config, host key, a
 * client key, authorized_keys, log), on 127.0.0.1 or an address inside a
 * network namespace. Sessions run as root with HOME set to that temp dir (so
 * root's own dotfiles are not read; the working directory is still /root). Only root may log in, with the client key. stop() kills
 * it and every process it started (sessions included) by pid, and removes the
 * temp dir; so does the exit of the process that started it.
 *
 * countingRsh() wraps an -e value in count-rsh.mjs, which counts the bytes a
 * client sends into ssh and gets out of it; readCount() adds them up.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, openSync, closeSync, readFileSync, readdirSync, rmSync, writeFileSync, chmodSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { procStat } from '../../src/io/proc-stat.js';
import { splitCommand } from '../../src/remote/ssh.js';

export const SSHD = '/usr/sbin/sshd';
const READY_MS = 15_000;

export interface Sshd {
  /** The address to give ssh (127.0.0.1, or listenAddress in a namespace). */
  host: string;
  port: number;
  /** The temp dir: sshd_config, keys, authorized_keys, sshd.log. */
  dir: string;
  /** The client's private key. */
  key: string;
  /** A complete -e value for rsync or qsync: `ssh -p PORT -i KEY -o ...`. */
  rsh: string;
  stop(): Promise<void>;
}

export interface SshdOptions {
  /** Run sshd inside this network namespace (`ip netns exec NS`). */
  netns?: string;
  /** Address to listen on (default 127.0.0.1; with netns, an address of the namespace). */
  listenAddress?: string;
  /** Prefixed to the key's line in authorized_keys, e.g. `command="...",restrict`. */
  authorizedKeyOptions?: string;
}

/** Words of an -e value, split the way rsync (and qsync, src/remote/ssh.ts) does. */
export const splitRsh = (value: string): string[] => splitCommand(value);

/** An -e value (or a remote command) from words: a word with anything but plain characters is single-quoted. */
export function joinRsh(words: readonly string[]): string {
  return words
    .map((w) => {
      if (/^[\w./=:@,+%-]+$/.test(w)) return w;
      if (w.includes("'")) throw new Error(`cannot quote ${w} for an -e value`);
      return `'${w}'`;
    })
    .join(' ');
}

/** Every live process below `pid` (children first found, grandchildren after). */
export function descendants(pid: number): number[] {
  const children = new Map<number, number[]>();
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const st = procStat(Number(name));
    if (!st) continue;
    const list = children.get(st.ppid) ?? [];
    list.push(Number(name));
    children.set(st.ppid, list);
  }
  const out: number[] = [];
  const queue = [pid];
  while (queue.length) {
    for (const c of children.get(queue.shift()!) ?? []) {
      out.push(c);
      queue.push(c);
    }
  }
  return out;
}

const alive = (pid: number): boolean => {
  const st = procStat(pid);
  return st !== undefined && st.state !== 'Z';
};

function killAll(pids: number[], signal: NodeJS.Signals): void {
  for (const p of pids) {
    try {
      process.kill(p, signal);
    } catch {
      // gone already
    }
  }
}

/** Started and not stopped yet: killed and removed when this process exits. */
const live = new Map<ChildProcess, string>();
process.on('exit', () => {
  for (const [child, dir] of live) {
    if (child.pid) killAll([child.pid, ...descendants(child.pid)], 'SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
});

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

/** True once something on host:port answers with an SSH banner. */
function answersSsh(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host, port });
    let got = '';
    const done = (ok: boolean): void => {
      clearTimeout(t);
      s.destroy();
      resolve(ok);
    };
    const t = setTimeout(() => done(false), 2000);
    s.setEncoding('latin1');
    s.on('data', (d: string) => {
      got += d;
      if (got.length >= 4) done(got.startsWith('SSH-'));
    });
    s.on('error', () => done(false));
    s.on('close', () => done(false));
  });
}

function keygen(file: string, comment: string): void {
  execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', comment, '-f', file], { stdio: ['ignore', 'ignore', 'pipe'] });
}

const logTail = (log: string): string => {
  try {
    return readFileSync(log, 'utf8').trim().split('\n').slice(-20).join('\n');
  } catch {
    return '';
  }
};

export function startSshd(opts: SshdOptions = {}): Promise<Sshd> {
  return start(opts, 1);
}

async function start(opts: SshdOptions, attempt: number): Promise<Sshd> {
  if (!existsSync(SSHD)) throw new Error(`${SSHD} is missing: install the Debian package openssh-server`);
  const host = opts.listenAddress ?? '127.0.0.1';
  // Privilege separation: Debian's sshd chroots its unprivileged child into /run/sshd and will not start without it.
  mkdirSync('/run/sshd', { recursive: true, mode: 0o755 });
  chmodSync('/run/sshd', 0o755);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'qsync-sshd-'));
  try {
    const hostKey = path.join(dir, 'host_ed25519');
    const key = path.join(dir, 'id_ed25519');
    keygen(hostKey, 'qsync-test-host');
    keygen(key, 'qsync-test-client');
    const pub = readFileSync(`${key}.pub`, 'utf8').trim();
    const authorized = path.join(dir, 'authorized_keys');
    writeFileSync(authorized, `${opts.authorizedKeyOptions ? `${opts.authorizedKeyOptions} ` : ''}${pub}\n`, { mode: 0o600 });
    const log = path.join(dir, 'sshd.log');
    const config = path.join(dir, 'sshd_config');
    {
      const port = await freePort();
      writeFileSync(
        config,
        [
          `Port ${port}`,
          `ListenAddress ${host}`,
          `HostKey ${hostKey}`,
          `AuthorizedKeysFile ${authorized}`,
          'AllowUsers root',
          'PermitRootLogin prohibit-password',
          'PubkeyAuthentication yes',
          'PasswordAuthentication no',
          'KbdInteractiveAuthentication no',
          // The temp dir is below the world-writable /tmp, which StrictModes refuses.
          'StrictModes no',
          'UsePAM no',
          'PidFile none',
          'PrintMotd no',
          'PrintLastLog no',
          'UseDNS no',
          'LogLevel ERROR',
          // Sessions get this temp dir as HOME: bash, run by sshd, reads ~/.bashrc even for a
          // command, and root's may do anything (pyenv init waits 60 s on a stale lock).
          `SetEnv HOME=${dir}`,
          '',
        ].join('\n'),
      );
      const out = openSync(log, 'a');
      const argv = [SSHD, '-D', '-e', '-f', config];
      const child = opts.netns
        ? spawn('ip', ['netns', 'exec', opts.netns, ...argv], { stdio: ['ignore', out, out] }) // ip execs sshd: same pid
        : spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', out, out] });
      closeSync(out);
      live.set(child, dir);
      const exited = new Promise<void>((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) resolve();
        else child.once('exit', () => resolve());
      });
      child.on('error', () => {}); // reported through the exit below
      let stopped: Promise<void> | undefined;
      const stop = (): Promise<void> =>
        (stopped ??= (async () => {
          const pid = child.pid;
          if (pid !== undefined) {
            // Sessions outlive the listener: kill the whole tree, found before the parents go.
            const tree = [pid, ...descendants(pid)];
            killAll(tree, 'SIGTERM');
            const deadline = Date.now() + 3000;
            while (tree.some(alive) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
            killAll(tree.filter(alive), 'SIGKILL');
          }
          await exited;
          live.delete(child);
          rmSync(dir, { recursive: true, force: true });
        })());

      const deadline = Date.now() + READY_MS;
      let ready = false;
      while (Date.now() < deadline) {
        if (child.exitCode !== null || child.signalCode !== null) break;
        if (await answersSsh(host, port)) {
          ready = true;
          break;
        }
        await new Promise((r) => setTimeout(r, 50));
      }
      if (ready) {
        const rsh = joinRsh([
          'ssh', '-F', '/dev/null', '-p', String(port), '-i', key,
          '-o', 'IdentitiesOnly=yes', '-o', 'BatchMode=yes', '-o', 'StrictHostKeyChecking=no',
          '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR',
        ]);
        return { host, port, dir, key, rsh, stop };
      }
      const tail = logTail(log);
      const why = child.exitCode !== null || child.signalCode !== null ? `exited (${child.exitCode ?? child.signalCode})` : `did not accept connections on ${host}:${port} within ${READY_MS / 1000} s`;
      await stop().catch(() => {});
      // A port that was free a moment ago can be taken before sshd binds it: start again, on another.
      if (attempt < 3 && /Address already in use/.test(tail)) return start(opts, attempt + 1);
      throw new Error(`sshd ${why}; its log (${log}, removed now):\n${tail || '(empty)'}`);
    }
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}

const COUNT_RSH = ['count-rsh.mjs', '../../../test/helpers/count-rsh.mjs'].map((p) => path.join(import.meta.dirname, p)).find((p) => existsSync(p));

/**
 * An -e value that runs `rsh` through count-rsh.mjs: ssh with the same
 * arguments, its stdin and stdout counted, `SENT RECEIVED` appended to
 * countFile when it exits.
 */
export function countingRsh(rsh: string, countFile: string): string {
  if (!COUNT_RSH) throw new Error('count-rsh.mjs not found next to sshd.ts (nor in test/helpers)');
  return joinRsh([process.execPath, COUNT_RSH, countFile, ...splitRsh(rsh)]);
}

/** Bytes sent into ssh and received from it, over every session that appended to countFile (0 if none did). */
export function readCount(countFile: string): { sent: number; received: number } {
  let text = '';
  try {
    text = readFileSync(countFile, 'utf8');
  } catch {
    return { sent: 0, received: 0 };
  }
  let sent = 0;
  let received = 0;
  for (const line of text.split('\n')) {
    if (!line.trim()) continue;
    const m = /^(\d+) (\d+)$/.exec(line.trim());
    if (!m) throw new Error(`${countFile}: unexpected line ${JSON.stringify(line)}`);
    sent += Number(m[1]);
    received += Number(m[2]);
  }
  return { sent, received };
}
