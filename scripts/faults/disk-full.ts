/**
 * Class "disk-full": DEST on a small tmpfs, a sync larger than it: exit 11
 * with a message that says so, no partial file under its real name for a
 * first copy, and once space is freed (the tmpfs grown) the rerun converges.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { firstLine, qsync, treeDiff, type FaultClass } from './runner.js';
import { changeContent, MiB, randomContent, writeTree, type Version } from './tree-model.js';

let probed: string | undefined | null = null;
/** Why a tmpfs cannot be mounted here, if it cannot. */
function cannotMount(): string | undefined {
  if (probed !== null) return probed;
  const dir = execFileSync('mktemp', ['-d']).toString().trim();
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', dir]);
  probed = r.status === 0 ? undefined : `cannot mount a tmpfs: ${r.stderr.toString().trim()}`;
  if (r.status === 0) spawnSync('umount', [dir]);
  spawnSync('rmdir', [dir]);
  return probed;
}

function nonZeroBytes(b: Buffer): number {
  let n = 0;
  for (let off = 0; off < b.length; off += 64 * 1024) {
    const blk = b.subarray(off, off + 64 * 1024);
    if (blk.some((x) => x !== 0)) n += blk.length;
  }
  return n;
}

export const diskFullClass: FaultClass = {
  name: 'disk-full',
  summary: 'DEST on a small tmpfs: exit 11 with a clear message, no partial first copy, converges once space is freed',
  defaultTrials: 3,
  timeoutMs: 60_000,
  unavailable: cannotMount,
  async trial(c, report) {
    const { rng, ws } = c;
    const mnt = join(ws, 'mnt');
    mkdirSync(mnt);
    const sizeMiB = rng.range(3, 6);
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}m,mode=755`, 'tmpfs', mnt]);
    try {
      const src = join(ws, 'src');
      const dest = join(mnt, 'dest');
      const modes = new Map<string, number>();
      const update = c.trial % 3 === 1;
      const history = c.trial % 3 === 2;
      const extra = history ? [`--backup-dir=${join(mnt, 'hist')}`] : [];
      mkdirSync(src);
      let v: Version;
      let old: Buffer | undefined;
      if (update) {
        // An update that grows the image past the free space.
        v = new Map([['vm.img', randomContent(rng, 1 * MiB)]]);
        writeTree(src, v, modes);
        const first = await qsync(['-a', `${src}/`, `${dest}/`], { timeoutMs: c.timeoutMs });
        if (!report.setup(first, 'first sync (fits)')) return;
        const old = v.get('vm.img')!;
        v = new Map([['vm.img', Buffer.concat([changeContent(rng, old), randomContent(rng, (sizeMiB + 2) * MiB)])]]);
      } else if (history) {
        // The history on the same small disk: the reverse deltas fill it.
        v = new Map([['vm.img', randomContent(rng, Math.round(sizeMiB * 0.8 * MiB))]]);
        writeTree(src, v, modes);
        const first = await qsync(['-a', ...extra, `${src}/`, `${dest}/`], { timeoutMs: c.timeoutMs });
        if (!report.setup(first, 'first sync (fits)')) return;
        old = v.get('vm.img')!;
        const b = Buffer.from(old);
        randomContent(rng, b.length).copy(b); // every block changes: the history needs as much again
        v = new Map([['vm.img', b]]);
      } else v = new Map([['small.img', randomContent(rng, 256 * 1024)], ['vm.img', randomContent(rng, (sizeMiB + rng.range(1, 4)) * MiB)]]);
      writeTree(src, v, modes);
      const what = `${update ? 'update' : history ? 'sync --backup-dir on the same disk' : 'first copy'} of ${(v.get('vm.img')!.length / MiB).toFixed(1)} MiB into a ${sizeMiB} MiB tmpfs`;
      c.log(what);
      const r = await qsync(['-a', ...extra, `${src}/`, `${dest}/`], { timeoutMs: c.timeoutMs });
      report.ending(r, what);
      // What the run must store: the new files, plus (history) the old content of every block it overwrites.
      const need = [...v.values()].reduce((a, b) => a + b.length, 0) + (history ? nonZeroBytes(old!) : 0);
      if (r.code === 0 && treeDiff(src, dest)) report.note('lies', `${what}: exit 0 but ${treeDiff(src, dest)}`);
      else if (r.code === 0 && need > sizeMiB * MiB) report.note('lies', `${what}: exit 0 though ${(need / MiB).toFixed(1)} MiB cannot fit in ${sizeMiB} MiB`);
      else if (r.code === 0) c.log('it fitted after all: nothing to check');
      else if (r.code !== 11) report.note('crashes', `${what}: exit ${r.code}, expected 11: ${firstLine(r.stderr)}`);
      else if (!/no space|ENOSPC|disk.*full|full/i.test(r.stderr)) report.note('crashes', `${what}: exit 11 but the message does not say the disk is full: ${firstLine(r.stderr)}`);
      if (!update && !history && existsSync(join(dest, 'vm.img')) && statSync(join(dest, 'vm.img')).size !== v.get('vm.img')!.length) {
        report.note('lies', `${what}: a partial first copy is left under its real name (${statSync(join(dest, 'vm.img')).size} bytes)`);
      }
      execFileSync('mount', ['-o', `remount,size=${4 * sizeMiB + 16}m`, mnt]);
      const again = await qsync(['-a', ...extra, `${src}/`, `${dest}/`], { timeoutMs: c.timeoutMs });
      report.ending(again, 'rerun after freeing space');
      const d = again.code === 0 ? treeDiff(src, dest) : undefined;
      if (again.code !== 0) report.note('unconverged', `${what}: rerun after freeing space exit ${again.code}: ${firstLine(again.stderr)}`);
      else if (d) report.note('lies', `${what}: rerun exit 0 but ${d}`);
      else {
        const ver = await qsync(['verify', join(dest, 'vm.img')], { timeoutMs: c.timeoutMs });
        report.ending(ver, 'verify');
        if (ver.code !== 0) report.note('unconverged', `${what}: verify after the rerun exit ${ver.code}: ${firstLine(ver.stderr)}`);
        else report.converged = true;
      }
    } finally {
      spawnSync('umount', ['-l', mnt]);
    }
  },
};
