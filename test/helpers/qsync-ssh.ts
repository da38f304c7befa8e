/**
 * qsync over a test file's own sshd (test/helpers/sshd.ts): `useQsyncOverSsh`
 * registers the file's beforeAll/afterAll (a temp dir, sshd on 127.0.0.1,
 * the far side's qsync with a state base of its own in that dir) and returns
 * what the tests reach them by. The fields are set once beforeAll has run.
 */
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll } from 'vitest';
import { QSYNC, runQsync, type RunResult } from './cli.js';
import { countingRsh, readCount, startSshd, type Sshd } from './sshd.js';

export interface QsyncOverSsh {
  /** The file's temp dir (removed after its tests). */
  dir: string;
  sshd: Sshd;
  /** The far side's state base, and the command that starts its qsync (--qsync-path). */
  serverState: string;
  serverCmd: string;
  /** HOST:PATH on the test's sshd. */
  at(path: string): string;
  /**
   * qsync with `args` over the sshd (through `rsh`, default the sshd's own),
   * and the bytes through ssh, counted at the ssh command: NaN when ssh never
   * ran (a run refused before it), so no bound on it can pass.
   */
  overSsh(args: string[], rsh?: string): Promise<RunResult & { wire: number }>;
  /** qsync as the far host runs it, with its state base: restore, verify. */
  onFarSide(args: string[]): Promise<RunResult>;
}

export function useQsyncOverSsh(prefix: string, ready: boolean): QsyncOverSsh {
  let counter = 0;
  const s: QsyncOverSsh = {
    dir: '',
    sshd: undefined as unknown as Sshd,
    serverState: '',
    serverCmd: '',
    at: (path) => `${s.sshd.host}:${path}`,
    async overSsh(args, rsh) {
      const count = join(s.dir, `count-${++counter}`);
      const r = await runQsync(['-e', countingRsh(rsh ?? s.sshd.rsh, count), '--qsync-path', s.serverCmd, ...args]);
      const c = existsSync(count) ? readCount(count) : { sent: NaN, received: NaN };
      return { ...r, wire: c.sent + c.received };
    },
    onFarSide: (args) => runQsync(args, { env: { ...process.env, QSYNC_STATE_DIR: s.serverState } }),
  };
  beforeAll(async () => {
    if (!ready) return;
    s.dir = mkdtempSync(join(tmpdir(), prefix));
    s.sshd = await startSshd();
    s.serverState = join(s.dir, 'server-state');
    s.serverCmd = `QSYNC_STATE_DIR=${s.serverState} ${process.execPath} ${QSYNC}`;
  });
  afterAll(async () => {
    await s.sshd?.stop();
    if (s.dir) rmSync(s.dir, { recursive: true, force: true });
  });
  return s;
}
