/**
 * Image mode on a real Linux guest (Debian's kernel, busybox) that writes
 * through ext4 on two disks while `qsync --qmp` backs it up. Each iteration
 * i of its loop writes a new data file d<i> on vda, fsyncs it, appends
 * "i md5(d<i>)" to vda's /log and fsyncs that, then does the same on vdb,
 * and then prints "rec i" on its console. So at every instant vdb's last
 * record is vda's or one behind, and every backup of both disks must show
 * that: after the journal replay a crash leaves to the next mount (e2fsck),
 * the logs are whole, the newest data file matches its record, and no disk
 * holds a record newer than the other allows. Disks copied one after another
 * (one snapshot each) break it: the test shows that too.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient } from '../src/qemu/qmp.js';
import { runQsync, sha256, type RunResult } from './helpers/cli.js';
import { randomFile } from './helpers/data.js';
import { needTools } from './helpers/env.js';
import { buildInitramfs, guestKernel, makeExt4, recoverExt4, startGuest, waitUntil, type Guest } from './helpers/guest.js';
import { run, tmpDir } from './helpers/qemu.js';

const MiB = 1 << 20;

/** The guest's loop (see the top of this file); a failed mount ends /init, so the kernel panics and QEMU exits. */
const WORKLOAD = `
mount -t ext4 /dev/vda /mnt/a && mount -t ext4 /dev/vdb /mnt/b || { echo "GUEST: mount failed"; exit 1; }
echo GUEST-READY
i=0
while :; do
  i=$((i+1))
  for d in a b; do
    dd if=/dev/urandom of=/mnt/$d/d$i bs=64k count=1 conv=fsync 2>/dev/null || echo "GUEST: dd failed"
    s=$(md5sum /mnt/$d/d$i)
    echo "$i \${s%% *}" >> /mnt/$d/log
    sync /mnt/$d/log || echo "GUEST: fsync failed"
    rm -f /mnt/$d/d$((i-3))
  done
  echo "rec $i"
done
`;

describe.skipIf(!needTools('qemu-system-x86_64', 'qemu-img', 'apt-get', 'apt-cache', 'dpkg', 'busybox', 'mkfs.ext4', 'e2fsck', 'debugfs'))(
  'image mode on a real guest writing ext4 on two disks',
  () => {
    let dir: string;
    let guest: Guest;
    let qmp: QmpClient;
    let dest: string;
    const disk = (n: 'a' | 'b'): string => path.join(dir, `${n}.qcow2`);

    /** The last record the guest has finished on both disks, from its console. */
    const lastRec = (): number => Math.max(0, ...[...guest.console().matchAll(/^rec (\d+)\r?$/gm)].map((m) => Number(m[1])));
    const consoleTail = (): string => guest.console().split('\n').slice(-30).join('\n');

    const qsync = async (args: string[], to: string, onSpawn?: (pid: number) => void): Promise<RunResult> => {
      const r = await runQsync(['--qmp', guest.vm.qmp2, ...args, `${to}/`], { onSpawn });
      expect(r.code, r.stderr).toBe(0);
      return r;
    };

    const modes = (r: RunResult): string[][] => (JSON.parse(r.stdout) as { disks: { name: string; mode: string }[] }).disks.map((d) => [d.name, d.mode]);

    /**
     * One disk of a backup as the guest would find it after a crash: e2fsck
     * passes, /log is records 1..n, each "k md5", and the newest data file
     * d<n> has the md5 its record names. Returns n.
     */
    function records(target: string): number {
      const fsx = recoverExt4(target, dir);
      try {
        expect(fsx.fsck.code, `e2fsck -fy ${target}:\n${fsx.fsck.output}`).toBeLessThanOrEqual(1);
        expect(fsx.recheck, `e2fsck -fn after the repair of ${target}`).toBe(0);
        const lines = fsx.cat('/log').toString('utf8').split('\n');
        expect(lines.pop(), `${target}: /log ends with a whole line`).toBe('');
        lines.forEach((l, k) => expect(l, `${target}: record ${k + 1}`).toMatch(new RegExp(`^${k + 1} [0-9a-f]{32}$`)));
        const n = lines.length;
        if (n) expect(createHash('md5').update(fsx.cat(`/d${n}`)).digest('hex'), `${target}: d${n}`).toBe(lines[n - 1]!.split(' ')[1]);
        return n;
      } finally {
        fsx.remove();
      }
    }

    /** Both disks of the backup in `to`: each consistent, and vdb's last record is vda's or one behind. */
    function crossDisk(to: string): { a: number; b: number } {
      const a = records(path.join(to, 'a.raw'));
      const b = records(path.join(to, 'b.raw'));
      expect([0, 1], `vda's last record ${a}, vdb's ${b}`).toContain(a - b);
      return { a, b };
    }

    beforeAll(async () => {
      const kernel = guestKernel();
      dir = tmpDir('qsync-guest-');
      dest = path.join(dir, 'dest');
      // vda carries 32 MiB of random data besides what the guest writes.
      const fill = path.join(dir, 'fill');
      fs.mkdirSync(fill);
      randomFile(path.join(fill, 'fill'), 32 * MiB);
      makeExt4(disk('a'), 128, fill);
      fs.rmSync(fill, { recursive: true });
      makeExt4(disk('b'), 64);
      const initrd = buildInitramfs(dir, kernel, WORKLOAD, ['mnt/a', 'mnt/b']);
      guest = await startGuest(dir, [disk('a'), disk('b')], kernel, initrd);
      qmp = await QmpClient.connect(guest.vm.qmp);
      await waitUntil(() => lastRec() >= 3, "the guest's first records", 90_000, consoleTail);
    }, 240_000);

    afterAll(async () => {
      await qmp?.close();
      await guest?.vm.kill();
      if (dir) fs.rmSync(dir, { recursive: true, force: true });
    });

    it('a full and two incremental backups of the writing guest: each disk a clean crash image, and both of one instant', async () => {
      // Full. While vda's backup job runs (it ends once vda is copied), qsync is held (SIGSTOP, as a slow
      // copy of a big disk would) until the guest has finished two more records on both disks: a vdb taken
      // only after vda would hold them.
      let pid = 0;
      let held = -1;
      let exited = false;
      const backup = qsync(['--json'], dest, (p) => (pid = p)).finally(() => (exited = true));
      while (!exited) {
        const jobs = await qmp.execute<{ id: string }[]>('query-jobs');
        if (pid && jobs.some((j) => /^qsync-[0-9a-f]{12}-job0$/.test(j.id))) {
          // Read after the job was seen: vda's instant is earlier, so vda holds at most record `rec + 1`.
          const rec = lastRec();
          process.kill(pid, 'SIGSTOP');
          try {
            await waitUntil(() => lastRec() >= rec + 2, 'the guest to write on', 60_000, consoleTail);
            held = lastRec();
          } finally {
            process.kill(pid, 'SIGCONT');
          }
          break;
        }
        await new Promise((r) => setTimeout(r, 20));
      }
      const full = await backup;
      expect(modes(full)).toEqual([['a', 'full'], ['b', 'full']]);
      let prev = crossDisk(dest);
      expect(prev.a).toBeGreaterThanOrEqual(3);
      // What makes this run a test of one instant for both disks.
      expect(held, "the last record the guest finished on both disks while vda's job ran").toBeGreaterThan(prev.a);

      for (let k = 0; k < 2; k++) {
        await waitUntil(() => lastRec() > prev.a + 2, 'the guest to write on', 60_000, consoleTail);
        expect(modes(await qsync(['--json'], dest))).toEqual([['a', 'bitmap'], ['b', 'bitmap']]);
        const now = crossDisk(dest);
        expect(now.a).toBeGreaterThan(prev.a);
        prev = now;
      }
      expect(guest.console()).not.toMatch(/GUEST:|EXT4-fs error|I\/O error/);
    });

    it('the guest paused (stop): the backup is what qemu-img reads from each disk, byte for byte; cont, and it writes on', async () => {
      await qmp.execute('stop');
      let paused: number;
      try {
        expect(modes(await qsync(['--json'], dest))).toEqual([['a', 'bitmap'], ['b', 'bitmap']]);
        for (const n of ['a', 'b'] as const) {
          const raw = path.join(dir, `${n}-paused.raw`);
          run('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', disk(n), raw]);
          expect(await sha256(path.join(dest, `${n}.raw`)), `${n}.raw`).toBe(await sha256(raw));
          fs.rmSync(raw);
        }
        paused = crossDisk(dest).a;
      } finally {
        await qmp.execute('cont');
      }
      await waitUntil(() => lastRec() > paused + 1, 'the guest to write on after cont', 60_000, consoleTail);
      await qsync([], dest);
      expect(crossDisk(dest).a).toBeGreaterThan(paused);
    });

    it('the check catches disks taken one after another: vda by one qsync run, vdb by the next', async () => {
      const apart = path.join(dir, 'apart');
      await qsync(['--drive', 'vda'], apart);
      const a = records(path.join(apart, 'a.raw'));
      await waitUntil(() => lastRec() > a, 'the guest to finish a record vda does not have', 60_000, consoleTail);
      await qsync(['--drive', 'vdb'], apart);
      const b = records(path.join(apart, 'b.raw'));
      // Each disk alone is a clean crash image, but vdb holds a record vda's instant had not reached.
      expect(b).toBeGreaterThan(a);
      expect(() => crossDisk(apart)).toThrow(/vda's last record/);
      const forget = await runQsync(['forget', apart, '--qmp', guest.vm.qmp2]);
      expect(forget.code, forget.stderr).toBe(0);
      expect(guest.console()).not.toMatch(/GUEST:|EXT4-fs error|I\/O error/);
    });
  },
);
