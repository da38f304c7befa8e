/**
 * QEMU that does not run as root (libvirt runs it as libvirt-qemu): the
 * fleece overlay qsync creates must be one QEMU can open, and no wider than
 * needed; a temp folder QEMU cannot use is refused with a clear message.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient } from '../src/qemu/qmp.js';
import { runImageBackup } from '../src/sync/image-backup.js';
import { NOBODY } from './helpers/cli.js';
import { needTools } from './helpers/env.js';
import { qemuImgCreate, qemuIo, readLive, startQsd, tmpDir, type QemuProcess } from './helpers/qemu.js';

describe.skipIf(!needTools('qemu-storage-daemon', 'qemu-img', 'qemu-io', 'setpriv'))('image mode with QEMU running as another user', () => {
  let dir: string;
  let qsd: QemuProcess;
  let qmp: QmpClient;
  beforeAll(async () => {
    dir = tmpDir('qsync-owner-');
    const disk = path.join(dir, 'web.qcow2');
    qemuImgCreate(disk, '32M');
    qemuIo(disk, 'qcow2', 'write -P 0x5a 0 4M');
    // As libvirt does: the image and QEMU's own folder belong to the user QEMU runs as.
    fs.chownSync(disk, NOBODY, NOBODY);
    fs.chownSync(dir, NOBODY, NOBODY);
    qsd = await startQsd(dir, disk, 'disk0', [], { user: [String(NOBODY), String(NOBODY)] });
    qmp = await QmpClient.connect(qsd.qmp);
  });
  afterAll(async () => {
    await qmp?.close();
    await qsd?.kill();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('creates the overlay 0600 owned by the user QEMU runs as, and backs the disk up', async () => {
    const dest = path.join(dir, 'dest');
    const seen: fs.Stats[] = [];
    const [r] = await runImageBackup({ qmp: qsd.qmp2, dest, tempDir: dir }, {
      fileStart: () => {
        for (const f of fs.readdirSync(dir).filter((n) => /^qsync-.*fleece\d+-\d+\.qcow2$/.test(n))) seen.push(fs.statSync(path.join(dir, f)));
      },
    });
    expect(seen).toHaveLength(1);
    expect(seen[0]!.uid).toBe(NOBODY);
    expect(seen[0]!.gid).toBe(NOBODY);
    expect(seen[0]!.mode & 0o777).toBe(0o600);
    expect(r!.name).toBe('web');
    expect(fs.readFileSync(r!.target).equals(await readLive(qmp, 'disk0', dir))).toBe(true);
  });

  it('refuses a temp folder QEMU cannot create its socket in, before touching anything', async () => {
    const closed = tmpDir('qsync-owner-tmp-');
    try {
      const err = await runImageBackup({ qmp: qsd.qmp2, dest: path.join(dir, 'dest'), tempDir: closed }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'TARGET' });
      expect((err as Error).message).toMatch(new RegExp(`QEMU runs as uid ${NOBODY} and cannot create its NBD socket in ${closed}`));
    } finally {
      fs.rmSync(closed, { recursive: true, force: true });
    }
  });
});
