/**
 * The benchmark's shaped link (bench/link.ts), real parts: a network
 * namespace, veth, tbf, sshd inside, the delaying proxy. Checks the delay
 * and the rate cap through ssh, and that stop() removes everything.
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { startShapedLink } from '../bench/link.js';
import { needTools } from './helpers/env.js';
import { splitRsh, SSHD } from './helpers/sshd.js';

const nsList = (): string => execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' });

describe.skipIf(!needTools(SSHD, 'ssh', 'ssh-keygen', 'ip', 'tc'))('shaped link', () => {
  it('delays each round trip by rttMs, caps the rate, and stop() removes it all', async () => {
    const link = await startShapedLink({ rttMs: 50, mbit: 200 });
    const ns = /namespace (\S+)\)/.exec(link.describe)![1]!;
    const veth = /^qsl\w+a/m.exec(execFileSync('ip', ['-o', 'link'], { encoding: 'utf8' }).replace(/^\d+: /gm, ''))?.[0];
    let sshdDir = '';
    try {
      expect(nsList()).toContain(ns);
      const [cmd, ...words] = splitRsh(link.rsh);
      // One session: echo its HOME (the sshd's temp dir), then echo every byte back; 10 round trips, then 10 MiB.
      const child = spawn(cmd!, [...words, link.host, 'echo "$HOME"; dd bs=1 count=10 status=none; head -c 10485760 /dev/zero'], { stdio: ['pipe', 'pipe', 'pipe'] });
      const chunks: { t: number; n: number }[] = [];
      let text = '';
      child.stdout.on('data', (d: Buffer) => {
        chunks.push({ t: performance.now(), n: d.length });
        if (text.length < 200) text += d.toString('latin1');
      });
      const closed = new Promise<number | null>((resolve) => child.on('close', resolve));
      while (!text.includes('\n')) await new Promise((r) => setTimeout(r, 10));
      sshdDir = text.trim();
      const rtts: number[] = [];
      for (let i = 0; i < 10; i++) {
        const before = chunks.length;
        const t0 = performance.now();
        child.stdin.write('x');
        while (chunks.length === before) await new Promise((r) => setImmediate(r));
        rtts.push(performance.now() - t0);
      }
      child.stdin.end();
      expect(await closed).toBe(0);
      rtts.sort((a, b) => a - b);
      expect(rtts[0]).toBeGreaterThanOrEqual(49); // never faster than the delay
      // Not a timing bound (the machine may be loaded): a proxy that delayed each byte, or each way twice, would be far past it.
      expect(rtts[5]).toBeLessThan(250);
      const bulk = chunks.slice(-Math.floor(chunks.length / 2));
      const bytes = bulk.reduce((s, c) => s + c.n, 0) - bulk[0]!.n;
      const mbit = (bytes * 8) / ((bulk.at(-1)!.t - bulk[0]!.t) / 1000) / 1e6;
      expect(mbit).toBeLessThan(210); // the cap holds (payload; the link also carries headers)
      expect(mbit).toBeGreaterThan(20);
    } finally {
      await link.stop();
    }
    expect(nsList()).not.toContain(ns);
    expect(veth).toBeDefined();
    expect(existsSync(`/sys/class/net/${veth}`)).toBe(false);
    expect(sshdDir).toMatch(/qsync-sshd-/);
    expect(existsSync(sshdDir)).toBe(false);
  });
});
