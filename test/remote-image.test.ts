/**
 * Image mode to a remote DEST (`qsync --image FILE host:DEST/`, `--qmp SOCK
 * host:DEST/`), end to end: Debian's real sshd on 127.0.0.1, the real ssh
 * client, real QEMU (qemu-storage-daemon serving a qcow2, qemu-io standing in
 * for the guest). The far side holds the target, its manifest, intent and
 * bitmap record (src/remote/serve-target.ts); bytes through the channel are
 * counted at the ssh command.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { needTools } from './helpers/env.js';
import { useQsyncOverSsh } from './helpers/qsync-ssh.js';
import { qemuImgCreate, qemuIo, startQsd, type QemuProcess } from './helpers/qemu.js';
import { joinRsh, splitRsh } from './helpers/sshd.js';

const KiB = 1024;
const MiB = 1 << 20;

const ready = needTools('sshd', 'ssh', 'qemu-img', 'qemu-io', 'qemu-storage-daemon');

const ssh = useQsyncOverSsh('qsync-remote-image-', ready);
const { at, overSsh } = ssh;
let views = 0;
const guestView = (img: string): Buffer => {
  const raw = join(ssh.dir, `view-${++views}.raw`);
  execFileSync('qemu-img', ['convert', '-O', 'raw', img, raw]);
  const b = readFileSync(raw);
  rmSync(raw);
  return b;
};

/** `qsync verify TARGET` on the far side's state: the manifest describes the target exactly. */
async function verifyFar(target: string): Promise<void> {
  const r = await ssh.onFarSide(['verify', target]);
  expect(r.code, r.stderr).toBe(0);
}

describe.skipIf(!ready)('image mode to a remote DEST over ssh', () => {
  it('--image: a full first run, then only the written clusters and their digests cross the wire; the far target is the guest view', async () => {
    const img = join(ssh.dir, 'web.qcow2');
    qemuImgCreate(img, '256M');
    qemuIo(img, 'qcow2', 'write -P 0x11 0 16M', 'write -P 0x22 128M 8M');
    const dest = join(ssh.dir, 'bk1');
    const first = await overSsh(['--image', img, at(`${dest}/`)]);
    expect(first.code, first.stderr).toBe(0);
    expect(first.stdout).toMatch(/web: full \(first run\)/);
    expect(readFileSync(join(dest, 'web.raw')).equals(guestView(img))).toBe(true);
    // Holes stay holes on the far side: 24 MiB of data in a 256 MiB disk.
    expect(statSync(join(dest, 'web.raw')).blocks * 512).toBeLessThan(40 * MiB);
    await verifyFar(join(dest, 'web.raw'));

    const changed = 3 * 64 * KiB + 2 * 64 * KiB;
    qemuIo(img, 'qcow2', 'write -P 0x33 1M 192K', 'write -P 0x44 200M 128K');
    const second = await overSsh(['--image', img, at(`${dest}/`)]);
    expect(second.code, second.stderr).toBe(0);
    expect(second.stdout).toMatch(/web: incremental \(dirty bitmap\)/);
    expect(readFileSync(join(dest, 'web.raw')).equals(guestView(img))).toBe(true);
    await verifyFar(join(dest, 'web.raw'));
    // The changed blocks with their digests, and of the manifest only the changed digests (this side cached the rest at the first commit).
    expect(second.wire).toBeLessThan(1.1 * changed + 64 * KiB);

    const none = await overSsh(['--image', img, at(`${dest}/`)]);
    expect(none.code, none.stderr).toBe(0);
    // Nothing dirty: no block and no digest crosses, only the session and its few requests.
    expect(none.wire).toBeLessThan(4 * KiB);
  });

  it('--qmp of a running daemon: the link cut mid-copy, the next run converges and the far manifest never lies', async () => {
    const img = join(ssh.dir, 'db.qcow2');
    qemuImgCreate(img, '128M');
    qemuIo(img, 'qcow2', 'write -P 0x55 0 96M');
    const qsd: QemuProcess = await startQsd(ssh.dir, img, 'db');
    try {
      const dest = join(ssh.dir, 'bk2');
      // A remote shell that dies after 20 MiB through it: the first copy is cut.
      const cut = joinRsh([process.execPath, join(import.meta.dirname, 'helpers/cut-rsh.mjs'), String(20 * MiB), ...splitRsh(ssh.sshd.rsh)]);
      const broken = await overSsh(['--qmp', qsd.qmp, at(`${dest}/`)], cut);
      expect(broken.code).not.toBe(0);
      expect(broken.stderr).not.toMatch(/\n\s+at /);
      const again = await overSsh(['--qmp', qsd.qmp, at(`${dest}/`)]);
      expect(again.code, again.stderr).toBe(0);
      await verifyFar(join(dest, 'db.raw'));
      const next = await overSsh(['--qmp', qsd.qmp, at(`${dest}/`)]);
      expect(next.code, next.stderr).toBe(0);
      expect(next.stdout).toMatch(/db: incremental/);
    } finally {
      await qsd.kill();
    }
    // Read with the daemon gone: the far target is the disk.
    expect(readFileSync(join(ssh.dir, 'bk2', 'db.raw')).equals(guestView(img))).toBe(true);
  });

  it('--image of a grown, then shrunk disk: each run turns full on the manifest it has, and the far target and manifest are the new disk', async () => {
    const img = join(ssh.dir, 'grow.qcow2');
    qemuImgCreate(img, '16M');
    qemuIo(img, 'qcow2', 'write -P 0x61 0 4M', 'write -P 0x62 15M 1M');
    const dest = join(ssh.dir, 'bk4');
    const first = await overSsh(['--image', img, at(`${dest}/`)]);
    expect(first.code, first.stderr).toBe(0);
    execFileSync('qemu-img', ['resize', '-q', img, '24M']);
    qemuIo(img, 'qcow2', 'write -P 0x63 1M 64K', 'write -P 0x64 20M 1M');
    const grown = await overSsh(['--image', img, at(`${dest}/`)]);
    expect(grown.code, grown.stderr).toBe(0);
    expect(grown.stdout).toMatch(/resized/);
    expect(readFileSync(join(dest, 'grow.raw')).equals(guestView(img))).toBe(true);
    await verifyFar(join(dest, 'grow.raw'));
    // Shrunk to a size that ends inside a block: its digests come patched from the larger manifest.
    execFileSync('qemu-img', ['resize', '-q', '--shrink', img, String(12 * MiB + 512)]);
    qemuIo(img, 'qcow2', 'write -P 0x65 12M 512');
    const shrunk = await overSsh(['--image', img, at(`${dest}/`)]);
    expect(shrunk.code, shrunk.stderr).toBe(0);
    expect(readFileSync(join(dest, 'grow.raw')).equals(guestView(img))).toBe(true);
    await verifyFar(join(dest, 'grow.raw'));
  });

  // --write-batch and --backup-dir to a remote DEST: test/remote-deltas.test.ts.
  it('--only-write-batch with a remote DEST is refused before anything is done', async () => {
    const img = join(ssh.dir, 'x.qcow2');
    qemuImgCreate(img, '8M');
    const r = await overSsh(['--image', img, '--only-write-batch', join(ssh.dir, 'b.qdelta'), at(`${join(ssh.dir, 'bk3')}/`)]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/--only-write-batch does not work with --qmp/);
    expect(existsSync(join(ssh.dir, 'bk3'))).toBe(false);
    expect(existsSync(join(ssh.dir, 'b.qdelta'))).toBe(false);
  });
});
