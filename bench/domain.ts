/**
 * The `domain` scenario: a libvirt domain (TCG q35, no OS, two qcow2 disks,
 * about 700 MiB allocated) backed up by `qsync --domain` and by
 * virtnbdbackup, full and incremental, in the same run. virtnbdbackup
 * refuses a domain that carries another tool's checkpoint ("Foreign
 * checkpoint found"), so each tool gets its own domain, made from the same
 * images and given the same guest writes (HMP qemu-io through libvirt's
 * monitor). Per run: every checkpoint dropped, both full backups into fresh
 * folders, about 20 MiB of guest writes, both incrementals. qsync's targets
 * must equal the guest view (`qemu-img compare -U` against the qcow2, after
 * a guest flush); virtnbdbackup's output is not checked.
 */
import { execFileSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { chmodSync, closeSync, copyFileSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { diskDevices, ensureLibvirtd, virsh } from '../test/helpers/libvirt.js';
import type { BenchOptions } from './args.js';
import { measure, type Measurement } from './measure.js';
import { fail, load, markUnavailable, summarize, type RunRecord, type ScenarioResult, type ToolResult } from './report.js';
import type { Scenario } from './scenarios.js';
import type { makeTools } from './tools.js';
import { fsyncTree } from './tree.js';

const log = (msg: string): void => void process.stderr.write(`[domain] ${msg}\n`);
const MiB = 1 << 20;

/** The two disks: virtual size, and the stretches of random data (offset, length) in MiB. */
const DISKS = [
  { name: 'sys', dev: 'vda', size: 1024, data: [[0, 160], [300, 200], [900, 120]] },
  { name: 'data', dev: 'vdb', size: 512, data: [[16, 220]] },
] as const;
/** Guest writes before each incremental: this many 1 MiB writes, spread over both disks. */
const WRITES = 20;

export const DOMAIN_DESCRIPTION =
  `libvirt domain (TCG q35, no OS) with two qcow2 disks of ${DISKS.map((d) => `${d.size} MiB`).join(' and ')}, ` +
  `${DISKS.reduce((s, d) => s + d.data.reduce((t, [, l]) => t + l, 0), 0)} MiB allocated (random data); ` +
  `full backup, then ${WRITES} MiB of guest writes (HMP qemu-io), then incremental; one domain per tool`;

/** A qcow2 holding random data in the given stretches (holes elsewhere). */
function makeDisk(path: string, d: (typeof DISKS)[number]): void {
  const raw = `${path}.raw`;
  const fd = openSync(raw, 'w');
  try {
    const buf = Buffer.allocUnsafe(4 * MiB);
    for (const [off, len] of d.data) for (let m = 0; m < len; m += 4) writeSync(fd, randomFillSync(buf), 0, buf.length, (off + m) * MiB);
  } finally {
    closeSync(fd);
  }
  execFileSync('truncate', ['-s', `${d.size}M`, raw]);
  execFileSync('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, path]);
  rmSync(raw);
}

class Domain {
  readonly files: string[];
  devices: string[] = [];
  constructor(
    readonly name: string,
    readonly dir: string,
  ) {
    this.files = DISKS.map((d) => join(dir, `${d.name}.qcow2`));
  }

  async define(images: string[]): Promise<void> {
    mkdirSync(this.dir, { recursive: true });
    chmodSync(this.dir, 0o755); // QEMU runs as libvirt-qemu: it must reach the images
    images.forEach((img, i) => copyFileSync(img, this.files[i]!));
    const xml = join(this.dir, 'domain.xml');
    const disks = DISKS.map(
      (d, i) => `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${this.files[i]}'/><target dev='${d.dev}' bus='virtio'/></disk>`,
    );
    execFileSync('sh', ['-c', 'cat > "$0"', xml], {
      input: `<domain type='qemu'><name>${this.name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>${disks.join('')}</devices></domain>\n`,
    });
    await virsh('define', xml);
    await virsh('start', this.name);
    const devs = await diskDevices(this.name, this.files);
    if (devs.some((d) => !d)) throw new Error(`domain ${this.name}: no device found for a disk`);
    this.devices = devs as string[];
  }

  async hmpIo(i: number, cmd: string): Promise<void> {
    const out = await virsh('qemu-monitor-command', this.name, '--hmp', `qemu-io -d ${this.devices[i]} "${cmd}"`);
    if (/error|failed/i.test(out)) throw new Error(`qemu-io ${cmd} on ${this.name}: ${out}`);
  }

  /** The run's guest writes: 1 MiB each at offsets that move with the run, then a flush (so the qcow2 can be compared). */
  async guestWrites(run: number): Promise<void> {
    for (let k = 0; k < WRITES; k++) {
      const i = k % DISKS.length;
      const off = ((run * 97 + k * 53) % (DISKS[i]!.size - 1)) * MiB;
      await this.hmpIo(i, `write -P ${((run * WRITES + k) % 255) + 1} ${off} ${MiB}`);
    }
    for (let i = 0; i < DISKS.length; i++) await this.hmpIo(i, 'flush');
  }

  /** Every checkpoint gone (deleted, not only forgotten: their bitmaps go with them). */
  async dropCheckpoints(): Promise<void> {
    const names = (await virsh('checkpoint-list', this.name, '--name', '--topological')).split('\n').map((l) => l.trim()).filter(Boolean);
    for (const n of names.reverse()) await virsh('checkpoint-delete', this.name, n);
  }

  async remove(): Promise<void> {
    await virsh('domjobabort', this.name).catch(() => {});
    await virsh('destroy', this.name).catch(() => {});
    await virsh('undefine', this.name, '--checkpoints-metadata').catch(() => {});
  }
}

export async function runDomainScenario(sc: Scenario, o: BenchOptions, tools: ReturnType<typeof makeTools>, work: string): Promise<ScenarioResult> {
  const ids = ['qsync-domain-full', 'virtnbdbackup-full', 'qsync-domain-inc', 'virtnbdbackup-inc'] as const;
  const results = ids.map((id): ToolResult => ({ id, label: tools[id].label, kind: tools[id].kind, status: 'ok', runs: [] }));
  const [qFull, vFull, qInc, vInc] = results as [ToolResult, ToolResult, ToolResult, ToolResult];
  const allocated = DISKS.reduce((s, d) => s + d.data.reduce((t, [, l]) => t + l, 0), 0) * MiB;
  const s: ScenarioResult = { name: sc.name, description: sc.description, sourceBytes: allocated, changedBytes: WRITES * MiB, loadBefore: load(), loadAfter: [], tools: results };
  const why = ids.map((id) => tools[id].unavailable());
  for (const cmd of ['virsh', 'libvirtd', 'qemu-system-x86_64']) {
    try {
      execFileSync('sh', ['-c', 'command -v "$1"', 'sh', cmd], { stdio: 'ignore' });
    } catch {
      why[0] ??= 'missing';
      why[2] ??= 'missing';
    }
  }
  const skipped = markUnavailable(s, why);
  if (skipped) {
    log(`skipped: ${skipped}`);
    return s;
  }
  const dir = join(work, sc.name);
  mkdirSync(dir, { recursive: true });
  // QEMU runs as libvirt-qemu: it must reach the images through the work folder (made 0700).
  chmodSync(work, 0o711);
  chmodSync(dir, 0o755);
  await ensureLibvirtd();
  log(`${sc.description}: creating the images`);
  const images = DISKS.map((d) => join(dir, `${d.name}.qcow2`));
  DISKS.forEach((d, i) => makeDisk(images[i]!, d));
  let sync = '';
  const qDom = new Domain(`qsync-bench-q-${process.pid}`, join(dir, 'q'));
  const vDom = new Domain(`qsync-bench-v-${process.pid}`, join(dir, 'v'));
  try {
    await qDom.define(images);
    await vDom.define(images);
    const json = join(dir, 'qsync.json');
    // qsync's --json report goes to a file: measure() discards stdout.
    const qsync = (id: 'qsync-domain-full' | 'qsync-domain-inc', dst: string): Promise<Measurement> =>
      measure(['sh', '-c', 'exec "$@" > "$0"', json, ...tools[id].argv(qDom.name, dst)]);
    /** qsync's run: exit 0, every disk in the expected mode, each target equal to the guest's view. */
    const checkQsync = (m: Measurement, mode: 'full' | 'bitmap', dst: string): string | undefined => {
      if (m.exitCode) return `exit ${m.exitCode}: ${m.stderr}`;
      const disks = (JSON.parse(readFileSync(json, 'utf8')) as { disks: { name: string; mode: string; reason?: string }[] }).disks;
      for (const [i, d] of DISKS.entries()) {
        const x = disks.find((y) => y.name === d.name);
        if (x?.mode !== mode) return `${d.name}: mode ${x?.mode} (${x?.reason ?? ''}), expected ${mode}`;
        try {
          execFileSync('qemu-img', ['compare', '-q', '-U', '-f', 'raw', '-F', 'qcow2', join(dst, `${d.name}.raw`), qDom.files[i]!]);
        } catch {
          return `${d.name}.raw differs from the guest view`;
        }
      }
      return undefined;
    };
    const record = (r: ToolResult, m: Measurement, problem: string | undefined, checked: boolean): RunRecord => {
      if (problem) fail(r, problem);
      return { ...m, correct: checked ? !problem : null };
    };
    const syncS: Record<string, number[]> = Object.fromEntries(ids.map((id) => [id, []]));
    const timed = (fn: () => void): number => {
      const t0 = performance.now();
      fn();
      return (performance.now() - t0) / 1000;
    };
    for (let run = 0; run < sc.runs; run++) {
      const qDst = join(dir, `qsync-${run}`);
      const vDst = join(dir, `virtnbdbackup-${run}`);
      mkdirSync(qDst);
      await qDom.dropCheckpoints();
      await vDom.dropCheckpoints();
      /** Both tools at one level, the first one alternating; each output fsynced after its run (untimed, but the time kept). */
      const step = async (level: 'full' | 'inc'): Promise<void> => {
        const q = async (): Promise<void> => {
          const r = level === 'full' ? qFull : qInc;
          const m = await qsync(`qsync-domain-${level}`, qDst);
          r.runs.push(record(r, m, checkQsync(m, level === 'full' ? 'full' : 'bitmap', qDst), true));
          syncS[r.id].push(timed(() => fsyncTree(qDst)));
        };
        const v = async (): Promise<void> => {
          const r = level === 'full' ? vFull : vInc;
          const m = await measure(tools[`virtnbdbackup-${level}`].argv(vDom.name, vDst));
          r.runs.push(record(r, m, m.exitCode ? `exit ${m.exitCode}: ${m.stderr}` : undefined, false));
          if (existsSync(vDst)) syncS[r.id].push(timed(() => fsyncTree(vDst)));
        };
        for (const p of run % 2 ? [v, q] : [q, v]) await p();
      };
      await step('full');
      await qDom.guestWrites(run);
      await vDom.guestWrites(run);
      await step('inc');
      const w = (r: ToolResult): string => `${r.runs.at(-1)!.wallS.toFixed(2)} s`;
      log(`run ${run + 1}/${sc.runs}: full: qsync ${w(qFull)}, virtnbdbackup ${w(vFull)}; incremental: qsync ${w(qInc)}, virtnbdbackup ${w(vInc)}`);
      if (!o.keep) for (const d of [qDst, vDst]) rmSync(d, { recursive: true, force: true });
    }
    const med = (xs: number[]): string => (xs.length ? [...xs].sort((a, b) => a - b)[xs.length >> 1]!.toFixed(2) : '?');
    sync = `; fsync of each output after its run (untimed, medians): ${ids.map((id) => `${tools[id].label} ${med(syncS[id]!)} s`).join(', ')}`;
  } finally {
    await qDom.remove();
    await vDom.remove();
  }
  for (const r of results) if (r.runs.length) r.summary = summarize(r.runs, r.id.endsWith('-inc') ? WRITES * MiB : allocated, r.kind);
  const ratio = (a: ToolResult, b: ToolResult, k: 'wallMedianS' | 'maxRssMiB'): string =>
    a.summary && b.summary ? (a.summary[k] / b.summary[k]).toFixed(2) : '?';
  s.description += `; qsync ÷ virtnbdbackup, median wall: full ${ratio(qFull, vFull, 'wallMedianS')}×, incremental ${ratio(qInc, vInc, 'wallMedianS')}×; peak RSS: full ${ratio(qFull, vFull, 'maxRssMiB')}×, incremental ${ratio(qInc, vInc, 'maxRssMiB')}×${sync}`;
  s.loadAfter = load();
  if (!o.keep) rmSync(dir, { recursive: true, force: true });
  return s;
}
