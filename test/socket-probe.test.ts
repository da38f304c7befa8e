import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { socketAnswers } from '../src/io/socket-probe.js';

// The drop-in line asks libvirt (a virsh process, ~0.1 s) only when its socket answers.
describe('socketAnswers', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'qsync-sock-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('is true while a server listens, false once it has closed', async () => {
    const path = join(dir, 's');
    const server = createServer((c) => c.destroy());
    await new Promise<void>((res) => server.listen(path, res));
    expect(await socketAnswers(path)).toBe(true);
    await new Promise<void>((res) => server.close(() => res()));
    expect(await socketAnswers(path)).toBe(false);
  });

  it('is false for a socket file a stopped daemon left behind, a plain file and a missing path', async () => {
    const stale = join(dir, 'stale');
    // Bound, never listened, closed: the file stays, connections are refused (as after a daemon's kill -9).
    execFileSync('python3', ['-c', 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.close()', stale]);
    expect(existsSync(stale)).toBe(true);
    expect(await socketAnswers(stale)).toBe(false);
    const plain = join(dir, 'plain');
    writeFileSync(plain, 'x');
    expect(await socketAnswers(plain)).toBe(false);
    expect(await socketAnswers(join(dir, 'missing'))).toBe(false);
  });
});
