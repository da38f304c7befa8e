/**
 * -R and --files-from over ssh against rsync over the same ssh (Debian's
 * real sshd on 127.0.0.1, test/helpers/sshd.ts), push and pull: the same
 * tree (entries, modes, owners, times, folder times), the same -i lines
 * and exit code. The list is read where the command runs, as rsync reads
 * it: a push sends its lines to the receiving server, a pull walks it here.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { runQsync } from './helpers/cli.js';
import { needTools } from './helpers/env.js';
import { useQsyncOverSsh } from './helpers/qsync-ssh.js';
import { ageAll, dirTimes, runRsync, sh, snapshot, sortedLines, T_SRC } from './helpers/rsync-compare.js';

const ready = needTools('sshd', 'ssh', 'rsync');

const ssh = useQsyncOverSsh('qsync-remote-rel-', ready);

const RTREE = 'mkdir -p a/b/c c/d; echo 1 > a/b/f; echo 2 > top; echo 3 > a/b/c/g; echo 4 > c/h; echo 5 > c/d/i; chmod 750 a; chmod 711 a/b; chmod 700 c/d';

interface Case {
  name: string;
  flags: string[];
  /** Source operands below the source ("SRC/./a/b"), or its contents. */
  sources?: string[];
  list?: string;
  rounds?: number;
}

const cases: Case[] = [
  { name: '-R: folders on the way made with their attributes, from a "/./" on', flags: ['-a', '-i', '-R'], sources: ['SRC/./a/b', 'SRC/./top'], rounds: 2 },
  { name: '-R: a file deep down, and "./c" sending the base folder too', flags: ['-a', '-i', '-R'], sources: ['SRC/./a/b/f', 'SRC/././c'] },
  { name: '--files-from: implied folders, "dir/" one level, comments, a leading / and a missing name (exit 23)', flags: ['-a', '-i', '--files-from=LIST'], list: 'c/\n/top\n#comment\n\n;x\na/b/f\nnothere\n', rounds: 2 },
  { name: '--files-from -r --delete: folders listed walked whole', flags: ['-a', '-r', '-i', '--delete', '--files-from=LIST'], list: 'c\na/b/f\n' },
];

describe.skipIf(!ready)('-R and --files-from over ssh give what rsync gives', () => {
  it.each(cases.flatMap((c) => ['push', 'pull'].map((way) => ({ ...c, way }))))('$way: $name', async (c) => {
    const base = join(ssh.dir, `${c.way}-${c.name.replace(/\W+/g, '_').slice(0, 60)}`);
    const src = join(base, 'src');
    mkdirSync(src, { recursive: true });
    sh(RTREE, src, base);
    ageAll(src, T_SRC);
    const list = join(base, 'list');
    if (c.list !== undefined) writeFileSync(list, c.list);
    const flags = c.flags.map((f) => f.replace('LIST', list));
    const paths = (c.sources ?? ['SRC/']).map((s) => s.replace('SRC', src));
    const args = (d: string) => (c.way === 'push' ? [...paths, `${ssh.sshd.host}:${d}/`] : [...paths.map((p) => `${ssh.sshd.host}:${p}`), `${d}/`]);
    const rs = join(base, 'by-rsync');
    const qs = join(base, 'by-qsync');
    const lines: string[][] = [];
    for (let round = 0; round < (c.rounds ?? 1); round++) {
      const r = runRsync([...flags, '-e', ssh.sshd.rsh, ...args(rs)], false);
      const q = await runQsync([...flags, '-e', ssh.sshd.rsh, '--qsync-path', ssh.serverCmd, ...args(qs)]);
      // rsync marks a file it sends `<` in a push; qsync prints the receiving end's `>` either way.
      const out = (s: string, d: string) => sortedLines(s.replaceAll(d, 'DEST').replace(/^<f/gm, '>f'));
      expect({ round, code: q.code, stdout: out(q.stdout, qs) }, q.stderr).toEqual({ round, code: r.code, stdout: out(r.stdout, rs) });
      lines.push(out(r.stdout, rs));
      expect(snapshot(qs)).toEqual(snapshot(rs));
      expect(dirTimes(qs)).toEqual(dirTimes(rs));
    }
    // Something was sent: a case that copies nothing cannot pass by accident.
    expect(lines[0]!.some((l) => l.startsWith('>f+++++++++'))).toBe(true);
  });
});
