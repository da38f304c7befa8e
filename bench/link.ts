/**
 * A shaped network link for the benchmark: sshd in a network namespace of
 * its own behind a veth pair, both veth ends rate-limited by a tbf qdisc,
 * and the delay added by a userspace TCP proxy in the root namespace (this
 * kernel has no netem). ssh connects to the proxy on 127.0.0.1; each chunk
 * the proxy reads is released rttMs/2 after it arrived, in each direction,
 * so a round trip costs rttMs and the rate is tbf's.
 *
 * The proxy is a timed queue per direction, not a sleep per chunk: chunks
 * wait side by side, in order, and leave when due; a direction whose queue
 * holds more than QUEUE_CAP bytes stops reading its source until it drains
 * (backpressure instead of unbounded buffering). The cap is far above the
 * bandwidth-delay product (200 Mbit/s × 25 ms ≈ 0.6 MB), so it does not
 * limit the rate.
 *
 * Everything (proxy, sshd, veth, namespace) goes on stop(), when this
 * process exits, and on SIGINT/SIGTERM. Needs root, iproute2 (ip, tc).
 */
import { execFileSync, spawn } from 'node:child_process';
import { randomInt } from 'node:crypto';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { startSshd, joinRsh, splitRsh, type Sshd } from '../test/helpers/sshd.js';

export interface LinkOptions {
  rttMs: number;
  mbit: number;
}

export interface ShapedLink {
  /** -e value: ssh to the proxy, with the sshd's key. */
  rsh: string;
  /** The host for operands: 127.0.0.1 (the proxy; the port is in rsh). */
  host: string;
  stop(): Promise<void>;
  /** One line: rate, delay, how they are made. */
  describe: string;
  /** Bytes the link carried (root end of the veth: tx + rx, IP packets with headers). */
  linkBytes(): number;
}

/** Bytes a direction may hold before it stops reading its source. */
const QUEUE_CAP = 8 * 1024 * 1024;
const NS_PREFIX = 'qsync-link-';

const ip = (...args: string[]): string => execFileSync('ip', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const tryIp = (...args: string[]): void => {
  try {
    ip(...args);
  } catch {
    // already gone
  }
};

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Namespaces a killed benchmark left behind (their creator pid is in the name and gone): deleting one removes its veth too. */
function sweepStale(): void {
  for (const line of ip('netns', 'list').split('\n')) {
    const name = line.split(' ')[0] ?? '';
    const m = new RegExp(`^${NS_PREFIX}(\\d+)-`).exec(name);
    if (m && !pidAlive(Number(m[1]))) tryIp('netns', 'del', name);
  }
}

/** A /30 in 10.201.0.0/16 no interface here uses: [network base as four octets]. */
function freeSubnet(): number[] {
  const used = ip('-4', '-o', 'addr', 'show');
  for (let i = 0; i < 100; i++) {
    const c = randomInt(256);
    const d = randomInt(64) * 4;
    if (!used.includes(`10.201.${c}.`)) return [10, 201, c, d];
  }
  throw new Error('no free /30 in 10.201.0.0/16');
}

/**
 * One direction of the proxy: chunks from `from` are written to `to`
 * `delayMs` after they arrived, in order; the end of `from` is passed on
 * after the same delay.
 */
function delayedPipe(from: net.Socket, to: net.Socket, delayMs: number): void {
  const queue: { due: number; chunk: Buffer | null }[] = [];
  let queued = 0;
  let timer: NodeJS.Timeout | undefined;
  let waitingDrain = false;
  const release = (): void => {
    timer = undefined;
    const now = performance.now();
    while (queue.length && queue[0]!.due <= now && !waitingDrain) {
      const { chunk } = queue.shift()!;
      if (chunk === null) {
        to.end();
        return;
      }
      queued -= chunk.length;
      if (!to.write(chunk)) {
        waitingDrain = true;
        to.once('drain', () => {
          waitingDrain = false;
          release();
        });
      }
    }
    if (queued <= QUEUE_CAP && from.isPaused() && !from.destroyed) from.resume();
    if (queue.length && !waitingDrain) timer = setTimeout(release, Math.max(0, queue[0]!.due - performance.now()));
  };
  const push = (chunk: Buffer | null): void => {
    queue.push({ due: performance.now() + delayMs, chunk });
    if (chunk) queued += chunk.length;
    if (queued > QUEUE_CAP) from.pause();
    if (!timer && !waitingDrain) timer = setTimeout(release, delayMs);
  };
  from.on('data', (chunk: Buffer) => push(chunk));
  from.on('end', () => push(null));
  to.on('close', () => clearTimeout(timer));
}

function startProxy(target: { host: string; port: number }, delayMs: number): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer({ allowHalfOpen: true, noDelay: true }, (client) => {
    const upstream = net.connect({ ...target, allowHalfOpen: true, noDelay: true });
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      // Either side failing ends the pair, as a broken link would.
      s.on('error', () => {
        client.destroy();
        upstream.destroy();
      });
    }
    // A side that has sent and received its end is done.
    const closeWhenDone = (s: net.Socket): void => {
      s.on('finish', () => s.readableEnded && s.destroy());
      s.on('end', () => s.writableFinished && s.destroy());
    };
    closeWhenDone(client);
    closeWhenDone(upstream);
    delayedPipe(client, upstream, delayMs);
    delayedPipe(upstream, client, delayMs);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      resolve({
        port: (server.address() as net.AddressInfo).port,
        close: () =>
          new Promise<void>((done) => {
            for (const s of sockets) s.destroy();
            server.close(() => done());
          }),
      });
    });
  });
}

export async function startShapedLink(opts: LinkOptions = { rttMs: 50, mbit: 200 }): Promise<ShapedLink> {
  sweepStale();
  const ns = `${NS_PREFIX}${process.pid}-${randomInt(1e6)}`;
  const tag = randomInt(36 ** 5).toString(36).padStart(5, '0');
  const [outer, inner] = [`qsl${tag}a`, `qsl${tag}b`]; // interface names: 15 characters at most
  const [a, b, c, d] = freeSubnet() as [number, number, number, number];
  const outerAddr = `${a}.${b}.${c}.${d + 1}`;
  const innerAddr = `${a}.${b}.${c}.${d + 2}`;
  // tbf: the rate; burst of about 1 ms at that rate (at least 64 KiB: veth passes 64 KiB GSO packets); a 20 ms queue.
  const burst = Math.max(64 * 1024, Math.round((opts.mbit * 1e6) / 8 / 1000));
  const tbf = ['root', 'tbf', 'rate', `${opts.mbit}mbit`, 'burst', String(burst), 'latency', '20ms'];

  let sshd: Sshd | undefined;
  let proxy: Awaited<ReturnType<typeof startProxy>> | undefined;
  let removed = false;
  const removeNetSync = (): void => {
    if (removed) return;
    removed = true;
    tryIp('link', 'del', outer);
    tryIp('netns', 'del', ns);
  };
  const onExit = (): void => removeNetSync(); // sshd's own exit hook kills it
  const onSignal = (sig: NodeJS.Signals): void => {
    removeNetSync();
    // Only this handler: end as the signal would have; otherwise the other handler decides.
    if (process.listenerCount(sig) === 1) process.exit(128 + (sig === 'SIGINT' ? 2 : 15));
  };
  process.on('exit', onExit);
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const stop = async (): Promise<void> => {
    await proxy?.close();
    await sshd?.stop();
    removeNetSync();
    process.off('exit', onExit);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  };

  try {
    ip('netns', 'add', ns);
    ip('link', 'add', outer, 'type', 'veth', 'peer', 'name', inner);
    ip('link', 'set', inner, 'netns', ns);
    ip('addr', 'add', `${outerAddr}/30`, 'dev', outer);
    ip('link', 'set', outer, 'up');
    ip('-n', ns, 'addr', 'add', `${innerAddr}/30`, 'dev', inner);
    ip('-n', ns, 'link', 'set', inner, 'up');
    ip('-n', ns, 'link', 'set', 'lo', 'up');
    execFileSync('tc', ['qdisc', 'add', 'dev', outer, ...tbf], { stdio: ['ignore', 'ignore', 'pipe'] });
    execFileSync('ip', ['netns', 'exec', ns, 'tc', 'qdisc', 'add', 'dev', inner, ...tbf], { stdio: ['ignore', 'ignore', 'pipe'] });

    sshd = await startSshd({ netns: ns, listenAddress: innerAddr });
    proxy = await startProxy({ host: innerAddr, port: sshd.port }, opts.rttMs / 2);
    const words = splitRsh(sshd.rsh);
    const p = words.indexOf('-p');
    words[p + 1] = String(proxy.port);
    const stat = (f: string): number => Number(readFileSync(`/sys/class/net/${outer}/statistics/${f}`, 'utf8'));
    return {
      rsh: joinRsh(words),
      host: '127.0.0.1',
      stop,
      describe: `${opts.mbit} Mbit/s (tbf on both ends of a veth pair into network namespace ${ns}), RTT ${opts.rttMs} ms (a userspace proxy holds each chunk ${opts.rttMs / 2} ms per direction)`,
      linkBytes: () => stat('tx_bytes') + stat('rx_bytes'),
    };
  } catch (e) {
    await stop();
    const err = e as Error & { stderr?: Buffer | string };
    throw new Error(`cannot set up the shaped link: ${err.stderr ? String(err.stderr).trim() : err.message}`);
  }
}

export interface LinkFigures {
  /** `ssh HOST true` wall time, median: connection set-up, key exchange and authentication included. */
  sshTrueMs: number;
  /** One byte there and back through an open ssh session (remote `cat`), median. */
  rttMs: number;
  /** 50 MiB of payload into ssh (remote `cat >/dev/null`), session open to session end. */
  pushMbit: number;
  /** 50 MiB of payload out of ssh (remote `head -c`), first byte to last. */
  pullMbit: number;
}

const STREAM = 50 * 1024 * 1024;

function sshSpawn(rsh: string, host: string, command: string) {
  const [cmd, ...words] = splitRsh(rsh);
  return spawn(cmd!, [...words, host, command], { stdio: ['pipe', 'pipe', 'pipe'] });
}

function closed(child: ReturnType<typeof sshSpawn>, what: string): Promise<void> {
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  return new Promise((resolve, reject) =>
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`${what}: ssh exited ${code}: ${stderr.trim()}`)))),
  );
}

const mid = (xs: number[]): number => [...xs].sort((x, y) => x - y)[xs.length >> 1]!;

/** Measures a link through ssh: round trips, set-up, and 50 MiB each way. */
export async function measureLink(rsh: string, host: string, rounds = 7): Promise<LinkFigures> {
  const trues: number[] = [];
  for (let i = 0; i < 5; i++) {
    const t0 = performance.now();
    const c = sshSpawn(rsh, host, 'true');
    c.stdin.end();
    await closed(c, 'ssh true');
    trues.push(performance.now() - t0);
  }

  const echo = sshSpawn(rsh, host, 'cat');
  const echoDone = closed(echo, 'echo');
  const rtts: number[] = [];
  for (let i = 0; i < rounds + 1; i++) {
    const t0 = performance.now();
    const back = new Promise<void>((resolve) => echo.stdout.once('data', () => resolve()));
    echo.stdin.write('x');
    await back;
    if (i > 0) rtts.push(performance.now() - t0); // the first one may wait for the session to open
  }
  echo.stdin.end();
  await echoDone;

  // Timed from when the session is open (the remote says so) to its end.
  const push = sshSpawn(rsh, host, 'echo; exec cat >/dev/null');
  const pushDone = closed(push, 'push');
  await new Promise((resolve) => push.stdout.once('data', resolve));
  const t0 = performance.now();
  const block = Buffer.alloc(1024 * 1024, 0x5a);
  for (let sent = 0; sent < STREAM; sent += block.length) {
    if (!push.stdin.write(block)) await new Promise((r) => push.stdin.once('drain', r));
  }
  push.stdin.end();
  await pushDone;
  const pushMs = performance.now() - t0;

  const pull = sshSpawn(rsh, host, `head -c ${STREAM} /dev/zero`);
  pull.stdin.end();
  const pullDone = closed(pull, 'pull');
  let got = 0;
  let first = 0;
  let last = 0;
  pull.stdout.on('data', (d: Buffer) => {
    if (!got) first = performance.now();
    got += d.length;
    last = performance.now();
  });
  await pullDone;
  if (got !== STREAM) throw new Error(`pull: got ${got} of ${STREAM} bytes`);
  const mbit = (ms: number): number => (STREAM * 8) / (ms / 1000) / 1e6;
  return { sshTrueMs: mid(trues), rttMs: mid(rtts), pushMbit: mbit(pushMs), pullMbit: mbit(last - first) };
}
