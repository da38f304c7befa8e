/**
 * Class "image": kill -9 during `qsync --image IMG DEST/` (qsync alone, as
 * the OOM killer would: its qemu-storage-daemon lives on), rerun, and the
 * raw target must equal `qemu-img convert -O raw` of the image, with
 * `qsync verify` passing.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { firstDiff, firstLine, qsync, reapGroup, type FaultClass, type Rng } from './runner.js';
import { MiB } from './tree-model.js';

const TOOLS = ['qemu-img', 'qemu-io', 'qemu-storage-daemon'];

function missingTools(): string | undefined {
  const missing = TOOLS.filter((t) => spawnSync('sh', ['-c', `command -v ${t}`]).status !== 0);
  return missing.length ? `missing ${missing.join(', ')}` : undefined;
}

/** Guest-like writes: patterned extents, some zeroed ranges. */
function guestWrites(rng: Rng, image: string, sizeMiB: number, count: number): void {
  const cmds: string[] = [];
  for (let i = 0; i < count; i++) {
    const len = rng.range(1, 32) * 64 * 1024;
    const off = rng.int(sizeMiB * 16) * 64 * 1024;
    if (off + len > sizeMiB * MiB) continue;
    cmds.push('-c', rng.chance(0.15) ? `write -z ${off} ${len}` : `write -P ${rng.range(1, 255)} ${off} ${len}`);
  }
  if (cmds.length) execFileSync('qemu-io', ['-f', 'qcow2', ...cmds, image], { stdio: 'ignore' });
}

export const imageClass: FaultClass = {
  name: 'image',
  summary: 'kill -9 during qsync --image; rerun; raw target equals qemu-img convert -O raw of the image',
  defaultTrials: 2,
  timeoutMs: 120_000,
  unavailable: missingTools,
  async trial(c, report) {
    const { rng, ws } = c;
    const sizeMiB = rng.pick([32, 64, 128]);
    const image = join(ws, 'vm.qcow2');
    const dest = join(ws, 'dest');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, `${sizeMiB}M`]);
    guestWrites(rng, image, sizeMiB, rng.range(20, 80));
    const args = ['--image', image, `${dest}/`];
    const first = await qsync(args, { timeoutMs: c.timeoutMs });
    if (!report.setup(first, 'first image run')) return;
    guestWrites(rng, image, sizeMiB, rng.range(5, 60));
    let killedPid = 0;
    const at = rng.chance(0.2) ? rng.range(30, 300) : Math.round(first.ms * (0.2 + 0.9 * rng.next()));
    const k = await qsync(args, { timeoutMs: c.timeoutMs, killAfterMs: at, killLeaderOnly: true, onSpawn: (p) => (killedPid = p) });
    report.ending(k, 'killed image run');
    const label = `image ${sizeMiB} MiB (killed at ${at} ms${k.killed ? '' : ', finished first'})`;
    try {
      const again = await qsync(args, { timeoutMs: c.timeoutMs });
      report.ending(again, 'rerun');
      if (again.code !== 0) return report.note('unconverged', `${label}: rerun exit ${again.code}: ${firstLine(again.stderr)}`);
    } finally {
      reapGroup(killedPid);
    }
    const ref = join(ws, 'ref.raw');
    execFileSync('qemu-img', ['convert', '-O', 'raw', image, ref]);
    const want = readFileSync(ref);
    const got = readFileSync(join(dest, 'vm.raw'));
    if (!got.equals(want)) return report.note('lies', `${label}: rerun exit 0 but vm.raw differs from qemu-img convert at byte ${firstDiff(want, got)} (${got.length} vs ${want.length} bytes)`);
    const v = await qsync(['verify', join(dest, 'vm.raw')], { timeoutMs: c.timeoutMs });
    report.ending(v, 'verify');
    if (v.code !== 0) return report.note('unconverged', `${label}: verify exit ${v.code}: ${firstLine(v.stderr)}`);
    report.converged = true;
  },
};
