/**
 * The qcow2 copy's daemon holds the copy alone: a header that names a data
 * file (or a backing file) when QEMU reads it, whatever qsync's own check
 * found a moment before, is refused before any I/O (src/sync/qcow2-target.ts
 * servedAlone). Real qemu-img and qemu-storage-daemon.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { startDaemon } from '../src/qemu/offline.js';
import { servedAlone } from '../src/sync/qcow2-target.js';
import { needTools } from './helpers/env.js';

describe.skipIf(!needTools('qemu-img', 'qemu-storage-daemon', 'setpriv'))('a qcow2 copy as QEMU opens it', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'qsync-qcow2t-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  async function served(image: string): Promise<{ qmp: string; stop(): Promise<void> }> {
    const d = await startDaemon(dir, [
      '--blockdev', JSON.stringify({ driver: 'file', 'node-name': 'f', filename: image }),
      '--blockdev', JSON.stringify({ driver: 'qcow2', 'node-name': 'q', file: 'f', backing: null }),
    ]);
    if (typeof d === 'string') throw new Error(d);
    return d;
  }

  it('a plain qcow2 is served alone', async () => {
    const img = join(dir, 'plain.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
    const d = await served(img);
    try {
      await expect(servedAlone(d.qmp, img)).resolves.toBeUndefined();
    } finally {
      await d.stop();
    }
  });

  it('one whose header names a data file is refused, naming the file QEMU opened', async () => {
    const img = join(dir, 'evil.qcow2');
    const data = join(dir, 'victim.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `data_file=${data}`, img, '1M']);
    expect(existsSync(data)).toBe(true);
    const d = await served(img);
    try {
      await expect(servedAlone(d.qmp, img)).rejects.toThrow(new RegExp(`names other files QEMU opened \\(.*victim\\.raw.*\\); left alone`));
    } finally {
      await d.stop();
    }
  });
});
