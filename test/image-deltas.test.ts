/**
 * Image mode with deltas, through the qsync command against
 * qemu-storage-daemon: --backup-dir keeps every point of the guest view,
 * --write-batch turns the previous target into the new one elsewhere.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { runQsync, sha256, stateOf } from './helpers/cli.js';
import { needTools } from './helpers/env.js';
import { qemuIo, readLive, useQsd, withExport } from './helpers/qemu.js';

const MiB = 1 << 20;
const ok = (r: { code: number | null; stderr: string }) => expect(r.code, r.stderr).toBe(0);
const shaOf = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

describe.skipIf(!needTools('qemu-storage-daemon', 'qemu-img', 'qemu-io'))('image mode with --backup-dir and --write-batch', () => {
  const fx = useQsd('64M', (disk) => qemuIo(disk, 'qcow2', 'write -P 0x11 0 8M', 'write -P 0x22 32M 4M'));
  const dest = () => path.join(fx.dir, 'backup');
  const target = () => path.join(dest(), 'disk.raw');
  const guestView = async (): Promise<string> => shaOf(await readLive(fx.qmp, 'disk0', fx.dir));
  /** Guest writes: data at the given MiB offsets, and a zeroed (trimmed) range. */
  const guestWrite = (fill: number, mibs: number[], zeroMib?: number) =>
    withExport(fx.qmp, 'disk0', fx.dir, true, async (c) => {
      for (const m of mibs) await c.write(m * MiB, Buffer.alloc(192 * 1024, fill));
      if (zeroMib !== undefined) await c.writeZeroes(zeroMib * MiB, MiB);
      await c.flush();
    });

  it('three --backup-dir runs: every point restores to the guest view of its time', async () => {
    const history = path.join(fx.dir, 'history');
    const views: string[] = [];
    for (let run = 0; run < 3; run++) {
      if (run === 1) await guestWrite(0xa1, [1, 20, 33]);
      if (run === 2) await guestWrite(0xb2, [2, 21, 50], 4);
      views.push(await guestView());
      ok(await runQsync(['--qmp', fx.qsd.qmp2, `--backup-dir=${history}`, `${dest()}/`]));
      expect(await sha256(target())).toBe(views[run]);
    }
    const list = await runQsync(['restore', target(), '--backup-dir', history, '--list']);
    ok(list);
    for (let point = 1; point <= 2; point++) {
      const out = path.join(fx.dir, `restored-${point}.raw`);
      ok(await runQsync(['restore', target(), out, '--backup-dir', history, '--at', String(point)]));
      // Point 1 is the state before the newest run.
      expect(await sha256(out), list.stdout).toBe(views[2 - point]);
    }
  });

  it('--write-batch applied to a copy of the previous target gives the new target, with or without a manifest; --only-write-batch is refused', async () => {
    const copyDir = path.join(fx.dir, 'copy');
    fs.mkdirSync(copyDir);
    fs.copyFileSync(target(), path.join(copyDir, 'disk.raw'));
    await guestWrite(0xc3, [3, 40], 2);
    const batch = path.join(fx.dir, 'run.qdelta');
    const r = await runQsync(['--qmp', fx.qsd.qmp2, `--write-batch=${batch}`, '--json', `${dest()}/`]);
    ok(r);
    expect((JSON.parse(r.stdout) as { disks: { mode: string }[] }).disks[0]!.mode).toBe('bitmap');
    const now = await guestView();
    expect(await sha256(target())).toBe(now);
    ok(await runQsync(['apply', batch, copyDir]));
    expect(await sha256(path.join(copyDir, 'disk.raw'))).toBe(now);

    // No manifest: a full run compares with the old target, and the batch names the hash of that target as its base.
    fs.rmSync(path.join(stateOf(dest()), 'manifests', 'disk.raw.qsm'));
    await guestWrite(0xd4, [5, 41]);
    const compared = path.join(fx.dir, 'compare.qdelta');
    ok(await runQsync(['--qmp', fx.qsd.qmp2, `--write-batch=${compared}`, `${dest()}/`]));
    const later = await guestView();
    expect(await sha256(target())).toBe(later);
    ok(await runQsync(['apply', compared, copyDir]));
    expect(await sha256(path.join(copyDir, 'disk.raw'))).toBe(later);

    const only = await runQsync(['--qmp', fx.qsd.qmp2, `--only-write-batch=${path.join(fx.dir, 'only.qdelta')}`, `${dest()}/`]);
    expect(only.code).toBe(1);
    expect(only.stderr).toMatch(/--only-write-batch does not work with --qmp/);
  });
});
