/**
 * `qsync -aHAX` over ssh against `rsync -aHAX` over the same ssh (Debian's
 * real sshd on 127.0.0.1, test/helpers/sshd.ts): a push and a pull of the
 * tree test/hax.test.ts uses (hard-link groups, ACLs, default ACLs,
 * user./trusted./security. xattrs, a name that is not UTF-8) give the same
 * tree (getfacl, getfattr, stat, link groups) and the same -i lines after a
 * first run, after changes, after a change of only an xattr and an ACL, and
 * on a run with nothing to do. A peer that sends an attribute past the
 * wire's bounds is refused.
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QSYNC, runQsync } from './helpers/cli.js';
import { needTools } from './helpers/env.js';
import { useQsyncOverSsh } from './helpers/qsync-ssh.js';
import { ageDirs, lines, makeTree, mutateTree, relinkTargets, sh, snapshot } from './helpers/hax-tree.js';
import { MAX_ATTR_VALUE } from '../src/core/wire.js';

const asRoot = process.getuid?.() === 0;
const ready = needTools('sshd', 'ssh', 'rsync', 'getfattr', 'setfattr', 'getfacl', 'setfacl') && asRoot;

const ssh = useQsyncOverSsh('qsync-remote-hax-', ready);
const { at } = ssh;
/** The notice a target replaced behind qsync's back gets (round 1), on stderr as qsync's own: rsync has none. */
const NOTICE = 'qsync: target was replaced since the last run; comparing source and target';

/** Only an xattr and an ACL change: the next run carries just those across. */
function attrsOnly(src: string): void {
  sh('setfattr', '-n', 'user.comment', '-v', 'only this changed', join(src, 'plain'));
  sh('setfacl', '-m', 'u:4242:r', join(src, 'shared/doc'));
  sh('setfattr', '-n', 'trusted.dir-only', '-v', 'x', join(src, 'sub'));
  ageDirs(src);
}

describe.skipIf(!ready)('-aHAX over ssh gives what rsync -aHAX over ssh gives', () => {
  it.each(['push', 'pull'])('%s: first run, after changes, after an xattr/ACL-only change, with nothing to do', async (way) => {
    const base = join(ssh.dir, way);
    const src = join(base, 'src');
    mkdirSync(src, { recursive: true });
    makeTree(src);
    const rs = join(base, 'by-rsync');
    const qs = join(base, 'by-qsync');
    const operands = (dest: string) => (way === 'push' ? [`${src}/`, at(`${dest}/`)] : [at(`${src}/`), `${dest}/`]);
    const seen: string[][] = [];
    for (let round = 0; round < 4; round++) {
      if (round === 1) {
        mutateTree(src);
        for (const d of [rs, qs]) relinkTargets(d);
      }
      if (round === 2) attrsOnly(src);
      {
        // -n says the same and changes nothing.
        const before = round === 0 ? undefined : snapshot(qs, { dirTimes: true });
        const dry = await runQsync(['-aHAX', '-n', '-i', '-e', ssh.sshd.rsh, '--qsync-path', ssh.serverCmd, ...operands(qs)]);
        expect(dry.code, dry.stderr).toBe(0);
        const rdry = sh('rsync', '-aHAX', '-n', '-i', '-e', ssh.sshd.rsh, ...operands(rs)).replace(/^<f/gm, '>f');
        expect(lines(dry.stdout), `round ${round} -n`).toEqual(lines(rdry));
        if (before) expect(snapshot(qs, { dirTimes: true })).toEqual(before);
      }
      // rsync marks a file it sends `<` in a push; qsync prints the receiving end's `>` either way (left as is).
      const r = sh('rsync', '-aHAX', '-i', '-e', ssh.sshd.rsh, ...operands(rs)).replace(/^<f/gm, '>f');
      const q = await runQsync(['-aHAX', '-i', '-e', ssh.sshd.rsh, '--qsync-path', ssh.serverCmd, ...operands(qs)]);
      expect(lines(q.stderr).filter((l) => !l.startsWith(NOTICE)), `round ${round}`).toEqual([]);
      expect(q.code, `round ${round}`).toBe(0);
      expect(lines(q.stdout), `round ${round}`).toEqual(lines(r));
      seen.push(lines(r));
      expect(snapshot(qs, { dirTimes: true }), `round ${round}`).toEqual(snapshot(rs, { dirTimes: true }));
    }
    // What the rounds exercised, so that a silent rsync cannot make this test pass empty.
    expect(seen[0]).toEqual(expect.arrayContaining(['hf+++++++++ a => sub/deep/x', 'hf+++++++++ b => c', 'hL+++++++++ sub/sl2 => sub/sl1']));
    expect(seen[1]).toEqual(expect.arrayContaining(['.f.......a. shared/doc', '.d.......a. shared/', '.L........x link -> plain']));
    expect(seen[2]).toEqual(expect.arrayContaining(['.f........x plain', '.f.......a. shared/doc', '.d........x sub/']));
    expect(seen[3]).toEqual([]);
    // The attributes themselves, as a user checks them.
    expect(sh('getfattr', '--absolute-names', '-n', 'user.comment', '--only-values', join(qs, 'plain'))).toBe('only this changed');
    expect(sh('getfattr', '--absolute-names', '-n', 'trusted.root-only', '--only-values', join(qs, 'plain'))).toBe('t');
    expect(sh('getfacl', '-p', '-n', join(qs, 'shared/doc'))).toMatch(/user:4242:r--/);
  });
});

describe.skipIf(!needTools('getfattr', 'setfattr'))('a peer that sends attributes past the wire\'s bounds', () => {
  const FAKE = join(import.meta.dirname, 'helpers', 'fake-sender.mjs');
  let base: string;
  beforeAll(() => {
    base = mkdtempSync(join(tmpdir(), 'qsync-hostile-xa-'));
  });
  afterAll(() => rmSync(base, { recursive: true, force: true }));
  let n = 0;
  /** A tree of one file `f` whose attributes are `xa`; `more` for a push (its DEST, its options). */
  const scenarioWith = (xa: unknown, more: Record<string, unknown> = {}): string => {
    const p = join(base, `scenario-${++n}.json`);
    writeFileSync(p, JSON.stringify({ tree: { type: 'dir', entries: { f: { type: 'file', text: 'data\n', xa } } }, ...more }));
    return p;
  };

  it.each([
    ['an oversized value', [['user.big', `0s${Buffer.alloc(MAX_ATTR_VALUE + 1).toString('base64')}`]], /not base64 of at most 65536 bytes/],
    ['a name that would start another section of setfattr\'s input', [['user.x\n# file: /proc/self/fd/3', '0sAA==']], /attribute name .* that is not one/],
  ])('a pull refuses %s: exit 12, one clear message, the file not written', async (_what, xa, message) => {
    const scenario = scenarioWith(xa);
    const dest = join(base, `dest-${Math.random().toString(36).slice(2)}`);
    const r = await runQsync(['-aX', '-e', `${process.execPath} ${FAKE} ${scenario}`, 'fake:src/', `${dest}/`], {
      env: { ...process.env, QSYNC_STATE_DIR: join(base, 'state') },
    });
    expect(r.code, r.stderr).toBe(12);
    expect(r.stderr).toMatch(message);
    expect(r.stderr).not.toMatch(/internal error|at .*\.js:\d+/);
    expect(existsSync(join(dest, 'f'))).toBe(false);
  });

  it('a push into --restrict DIR refuses an oversized value from its client: exit 12, nothing written', async () => {
    const jail = join(base, 'jail');
    mkdirSync(jail);
    const scenario = scenarioWith([['user.big', `0s${Buffer.alloc(MAX_ATTR_VALUE + 3).toString('base64')}`]], { dest: 'dest/', options: { xattrs: true, recursive: true } });
    const r = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
      const p = spawn(process.execPath, [FAKE, scenario, '--push', process.execPath, QSYNC, '--server', '--restrict', jail], {
        stdio: ['ignore', 'ignore', 'pipe'],
        env: { ...process.env, QSYNC_STATE_DIR: join(base, 'state') },
      });
      let stderr = '';
      p.stderr.on('data', (d) => (stderr += d));
      p.on('close', (code) => resolve({ code, stderr }));
    });
    expect(r.code, r.stderr).toBe(12);
    expect(r.stderr).toMatch(/protocol error: a value of the attribute user.big that is not base64 of at most 65536 bytes/);
    expect(existsSync(join(jail, 'dest')) ? readdirSync(join(jail, 'dest')) : []).toEqual([]);
  });
});
