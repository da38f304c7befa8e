/**
 * `--domain NAME`: back up every disk of a libvirt domain into
 * DEST/<disk>.raw through libvirt's own backup API in pull mode
 * (docs/IMAGE-MODE.md "libvirt domains"). One `virsh backup-begin` takes all
 * disks at one instant and exports them over NBD; a checkpoint named for DEST
 * (`qsync-<hash of DEST>-<time>`) starts with it. Each disk is incremental
 * from the checkpoint its image state records (tied to its manifest's
 * checksum, as a bitmap is in image mode), else full; the copy itself is
 * image mode's (copyDisk). The job is always ended (domjobabort) and every
 * checkpoint of this DEST that no disk's state records afterwards is deleted,
 * so a checkpoint whose backup failed never becomes a base.
 * A shut-off domain's disks are read through qemu-storage-daemon instead.
 */
import { createHash } from 'node:crypto';
import { chmod, chown, mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { basename, join, resolve } from 'node:path';
import { errnoOf, QsyncError } from '../core/errors.js';
import { DEFAULT_BLOCK_SIZE, isValidBlockSize } from '../core/geometry.js';
import {
  abortBackup, backupXml, beginBackup, checkpointDisksCommand, checkpointXml, currentBackup, DEFAULT_URI, deleteCheckpoint, diskCapacityCommand,
  listCheckpoints, parseCapacity, parseCheckpointDisks, surveyDomain, virshBatch, VirshError, type Domain, type DomainDisk, type DomainSurvey, type BackupJob,
} from '../qemu/libvirt.js';
import { listBitmaps } from '../qemu/block.js';
import { serveImage } from '../qemu/offline.js';
import { QmpClient } from '../qemu/qmp.js';
import { prefixedHooks, type SyncHooks } from './events.js';
import { copyDisk, type DiskContext, type DiskSummary, type ImageBackupOptions } from './image-backup.js';
import { LocalDestination } from './local-target.js';
import type { Manifest } from './manifest-store.js';
import { qcow2In } from './qcow2-target.js';
import type { Destination, Target, TargetNote } from './target.js';
import type { Trust } from './trust.js';

/** Image mode's options without its sources; tempDir holds the run's folder (NBD socket, scratch files), owned by QEMU's user. */
export interface DomainBackupOptions extends Omit<ImageBackupOptions, 'qmp' | 'image' | 'drives'> {
  domain: string;
  /** libvirt URI (`--connect`), default qemu:///system. */
  connect?: string;
  /**
   * Only these disks (target device → its copy), the drop-in's
   * (src/sync/dropin.ts); a qcow2 disk whose copy is named *.qcow2 stays a
   * qcow2 (src/sync/qcow2-target.ts). Default: every disk, as <disk>.raw in
   * `destination`.
   */
  only?: ReadonlyMap<string, OnlyDisk>;
}

/** A disk's copy in the drop-in: `name` in `destination` (a folder of DEST); `rel`, its path below DEST, names it in reports. */
export interface OnlyDisk {
  rel: string;
  name: string;
  destination: Destination;
}

/** One disk of the run: its target, what qsync knows of it, and what this run does. */
interface Disk {
  disk: DomainDisk;
  name: string;
  rel: string;
  target: Target;
  manifest?: Manifest;
  tStat: boolean;
  trust: Trust;
  state?: TargetNote;
  /** Set: full run, and why. */
  reason?: string;
  /** Incremental from this checkpoint. */
  base?: string;
}

/** Checkpoints and run folders of one DEST start with this; others are never touched. */
export const prefixFor = (dest: string): string => `qsync-${createHash('sha256').update(dest).digest('hex').slice(0, 12)}-`;

/** The target's name: its source file's name without the extension (web.qcow2 → web), else the target device. */
function diskName(d: DomainDisk): string {
  return (d.source ? basename(d.source).replace(/\.[^.]*$/, '') : '') || d.target;
}

/** The name `--domain` gives a disk's copy in DEST: `<disk>.raw`. */
export const defaultCopyName = (d: DomainDisk): string => `${diskName(d)}.raw`;

export async function runDomainBackup(opts: DomainBackupOptions, hooks: SyncHooks = {}): Promise<DiskSummary[]> {
  const blockSize = opts.blockSize ?? DEFAULT_BLOCK_SIZE;
  if (!isValidBlockSize(blockSize)) throw new QsyncError('USAGE', `invalid block size ${blockSize}`);
  const pct = opts.verifySamplePct ?? 0.5;
  if (!(pct >= 0 && pct <= 100)) throw new QsyncError('USAGE', `--verify-sample must be 0..100, not ${pct}`);
  const uri = opts.connect ?? DEFAULT_URI;
  const dest = opts.destination ? opts.dest : resolve(opts.dest);
  const tempDir = opts.tempDir ?? os.tmpdir();
  const ctx: Omit<DiskContext, 'destination'> = {
    dest, blockSize, pct, tempDir, owner: undefined, signal: opts.signal ?? new AbortController().signal, hooks, wrapSink: opts.wrapSink,
  };

  const survey = await surveyDomain(uri, opts.domain, true);
  const dom = survey.domain;
  const { only } = opts;
  const skipped = only ? dom.disks.filter((d) => !only.has(d.target)).map((d) => d.target) : [];
  if (only) dom.disks = dom.disks.filter((d) => only.has(d.target));
  const online = dom.state === 'running' || dom.state === 'paused';
  if (!online && dom.state !== 'shut off') {
    throw new QsyncError('SOURCE', `domain ${dom.name} is ${dom.state}`, { hint: 'back it up running, paused or shut off' });
  }
  if (!dom.disks.length) throw new QsyncError('SOURCE', `domain ${dom.name} has no disk to back up`);
  const seen = new Map<string, string>();
  const relOf = (d: DomainDisk): string => only?.get(d.target)?.rel ?? defaultCopyName(d);
  for (const d of dom.disks) {
    const name = relOf(d);
    const other = seen.get(name);
    if (other) {
      throw new QsyncError('SOURCE', `disks ${other} and ${d.target} of domain ${dom.name} would both be backed up as ${name}`, {
        hint: 'give their image files different names',
      });
    }
    seen.set(name, d.target);
  }

  // DEST is the user's folder, made as asked (as rsync makes a missing destination folder), and locked; or one on another host.
  const destination = opts.destination ?? (await LocalDestination.open(dest));
  const disks: Disk[] = [];
  try {
    for (const d of dom.disks) {
      const rel = relOf(d);
      const copy = only?.get(d.target);
      const at = copy?.destination ?? destination;
      const name = copy?.name ?? rel;
      const target = copy && d.format === 'qcow2' && name.endsWith('.qcow2') ? qcow2In(at, name, tempDir) : at.target(name);
      disks.push(await openDisk(d, rel, target, blockSize, !!only));
    }
    return online ? await backupRunning(uri, survey, disks, skipped, { ...ctx, destination }) : await backupShutOff(uri, survey, disks, { ...ctx, destination });
  } finally {
    for (const d of disks) await d.manifest?.close();
    if (!opts.destination) await destination.close();
  }
}

/** `named`: the disk is known by its copy's name (the drop-in's), not its image's. */
async function openDisk(disk: DomainDisk, rel: string, target: Target, blockSize: number, named: boolean): Promise<Disk> {
  const name = named ? rel : diskName(disk);
  const tStat = await target.identity();
  // A manifest that fails its own checks is no manifest: its reason makes the run full, and is shown then.
  const { manifest, trust } = await target.state.assess(tStat, { blockSize });
  return { disk, name, rel, target, manifest, tStat: !!tStat, trust, state: await target.readNote() };
}

/** The state's `node` for a libvirt disk: the domain and the disk, so that another domain's state is never taken. */
const stateNode = (dom: Domain, d: DomainDisk): string => `libvirt:${dom.uuid}/${d.target}`;

/**
 * Why `d` cannot be incremental from the checkpoint its state records, or
 * undefined (then `d.base` is that checkpoint).
 */
function decide(dom: Domain, d: Disk, checkpoints: string[], asked: Asked): string | undefined {
  const { state, manifest } = d;
  if (!d.tStat) return 'first run';
  if (!d.trust.trusted) return d.trust.reason ?? 'no manifest';
  if (d.disk.format !== 'qcow2') return `a ${d.disk.format} disk has no checkpoints`;
  if (!state || state.node !== stateNode(dom, d.disk)) return 'no checkpoint recorded for this target';
  if (state.baseChecksum !== manifest!.checksum.toString('hex')) return 'the checkpoint belongs to another manifest';
  if (!checkpoints.includes(state.bitmap)) return `checkpoint ${state.bitmap} is gone`;
  if (!asked.covers.get(state.bitmap)!.includes(d.disk.target)) return `checkpoint ${state.bitmap} does not cover this disk`;
  if (dom.state !== 'shut off') {
    const size = asked.capacity.get(d.disk.target)!;
    if (size !== manifest!.header.targetSize) return `disk was resized (${manifest!.header.targetSize} → ${size})`;
  }
  d.base = state.bitmap;
  return undefined;
}

/** What decide() asks libvirt beyond the survey: the disks each recorded checkpoint covers, and (running) the disks' capacities. */
interface Asked {
  covers: Map<string, string[]>;
  capacity: Map<string, number>;
}

/** Everything decide() will ask, in one virsh (none when no disk records a checkpoint that still exists); nothing is changed. */
async function lookups(uri: string, dom: Domain, disks: Disk[], checkpoints: string[]): Promise<Asked> {
  const cps = [...new Set(disks.map((d) => d.state?.bitmap).filter((b): b is string => !!b && checkpoints.includes(b)))];
  const targets = dom.state === 'shut off' || !cps.length ? [] : disks.filter((d) => d.state).map((d) => d.disk.target);
  const asked: Asked = { covers: new Map(), capacity: new Map() };
  if (!cps.length) return asked;
  const outs = await virshBatch(uri, [...cps.map((cp) => checkpointDisksCommand(dom.name, cp)), ...targets.map((t) => diskCapacityCommand(dom.name, t))]);
  cps.forEach((cp, i) => asked.covers.set(cp, parseCheckpointDisks(outs[i]!)));
  targets.forEach((t, i) => asked.capacity.set(t, parseCapacity(outs[cps.length + i]!, dom.name, t)));
  return asked;
}

/** Decide every disk; a full one forgets its state (its checkpoint then goes with the next prune). */
async function decideAll(dom: Domain, disks: Disk[], hooks: SyncHooks, checkpoints: string[], asked: Asked): Promise<void> {
  for (const d of disks) {
    d.reason = decide(dom, d, checkpoints, asked);
    if (!d.reason) continue;
    hooks.notice?.(`${label(d)}: ${d.reason}: full run`, d.rel);
    await d.target.dropNote();
    d.state = undefined;
  }
}

/** What a user reads about one disk starts with its name: `web (vda): ...`. */
const label = (d: Disk): string => `${d.name} (${d.disk.target})`;

function copyContext(ctx: DiskContext, d: Disk, frozen: string | undefined): Parameters<typeof copyDisk>[2] {
  const { hooks } = ctx;
  return {
    ...ctx,
    hooks: prefixedHooks(hooks, label(d)),
    rel: d.rel, target: d.target, manifest: d.manifest, trust: d.trust, tStat: d.tStat,
    reason: d.reason, frozen,
  };
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return errnoOf(e) === 'EPERM';
  }
}

/** The pid in a run folder's name (`<prefix><pid>-XXXXXX`), if the folder is one of this DEST's. */
function runFolderPid(folder: string, prefix: string): number | undefined {
  const name = basename(folder);
  const m = name.startsWith(prefix) ? name.slice(prefix.length).match(/^(\d+)-\w{6}$/) : null;
  return m ? Number(m[1]) : undefined;
}

/**
 * A backup job already on the domain: one a killed qsync of this DEST left
 * (its socket is in a run folder of this DEST whose qsync is gone) is ended;
 * any other is refused (LOCKED): it belongs to another tool, and libvirt runs
 * one backup job per domain. Run folders of dead qsyncs are removed.
 */
async function endLeftovers(uri: string, dom: Domain, busy: boolean, prefix: string, tempDir: string, hooks: SyncHooks): Promise<void> {
  // A job of any kind: see whether it is a backup job (asked only then).
  const job = busy ? await currentBackup(uri, dom.name) : undefined;
  if (job) {
    const pid = job.socket ? runFolderPid(join(job.socket, '..', '..'), prefix) : undefined;
    if (pid === undefined || alive(pid)) {
      throw new QsyncError('LOCKED', `domain ${dom.name} already runs a backup job${pid === undefined ? ' (not qsync\'s for this destination)' : ` (qsync ${pid})`}`, {
        hint: `libvirt runs one backup job per domain: wait for it to end (virsh domjobinfo ${dom.name})`,
      });
    }
    hooks.notice?.(`ending the backup job a killed qsync left on domain ${dom.name}`, dom.name);
    await abortBackup(uri, dom.name);
  }
  for (const f of await readdir(tempDir).catch(() => [] as string[])) {
    const pid = runFolderPid(f, prefix);
    if (pid !== undefined && !alive(pid)) await rm(join(tempDir, f), { recursive: true, force: true });
  }
}

/** Delete checkpoint `cp` of `domain` (its bitmaps merged into the one before, as libvirt does). */
export async function dropCheckpoint(uri: string, domain: string, cp: string, hooks: SyncHooks): Promise<void> {
  try {
    await deleteCheckpoint(uri, domain, cp);
  } catch (e) {
    // Its bitmap is gone (a killed QEMU never saved it): nothing to merge, only libvirt's record to drop.
    if (!(e instanceof VirshError && /not found in backing chain|missing or broken|inconsistent/i.test(e.detail))) throw e;
    hooks.notice?.(`checkpoint ${cp} has lost its bitmap: only its metadata is deleted`, domain);
    await deleteCheckpoint(uri, domain, cp, true);
  }
}

/**
 * Delete this DEST's checkpoints that no disk's state records: the one of a
 * failed run, and the bases the run just replaced. Returns the first error.
 */
async function pruneCheckpoints(uri: string, dom: Domain, prefix: string, disks: Disk[], hooks: SyncHooks, listed: Promise<string[]>): Promise<unknown> {
  try {
    const keep = new Set<string>();
    for (const d of disks) {
      const s = await d.target.readNote();
      if (s && s.node === stateNode(dom, d.disk)) keep.add(s.bitmap);
    }
    for (const cp of await listed) {
      if (!cp.startsWith(prefix) || keep.has(cp)) continue;
      await dropCheckpoint(uri, dom.name, cp, hooks);
    }
    return undefined;
  } catch (e) {
    return e;
  }
}

/**
 * A folder for one run (root's, 0711) with the XML qsync hands to virsh, and
 * in it `qemu/`, owned by the user QEMU runs as (its DAC label), for the NBD
 * socket and the scratch files libvirt creates: QEMU can write there but can
 * neither read nor swap the XML beside it.
 */
async function runFolder(tempDir: string, prefix: string, dom: Domain): Promise<{ dir: string; qemuDir: string }> {
  const dir = await mkdtemp(join(tempDir, `${prefix}${process.pid}-`));
  await chmod(dir, 0o711);
  const qemuDir = join(dir, 'qemu');
  await mkdir(qemuDir, { mode: 0o700 });
  if (dom.owner && process.getuid?.() === 0) await chown(qemuDir, dom.owner.uid, dom.owner.gid);
  return { dir, qemuDir };
}

/** `skipped`: the domain's disks this run leaves out (neither backed up nor given a checkpoint bitmap). */
async function backupRunning(uri: string, survey: DomainSurvey, disks: Disk[], skipped: string[], ctx: DiskContext): Promise<DiskSummary[]> {
  const { hooks } = ctx;
  const { domain: dom, checkpoints } = survey;
  const prefix = prefixFor(ctx.dest);
  const asked = lookups(uri, dom, disks, checkpoints);
  asked.catch(() => {}); // awaited below
  await endLeftovers(uri, dom, survey.busy, prefix, ctx.tempDir, hooks);
  await decideAll(dom, disks, hooks, checkpoints, await asked);
  const tracked = disks.filter((d) => d.disk.format === 'qcow2').map((d) => d.disk.target);
  const checkpoint = tracked.length ? `${prefix}${Date.now().toString(36)}` : undefined;
  const { dir, qemuDir } = await runFolder(ctx.tempDir, prefix, dom);
  const socket = join(qemuDir, 'nbd.sock');
  let began = false;
  let ok = false;
  try {
    const bx = join(dir, 'backup.xml');
    const cx = join(dir, 'checkpoint.xml');
    if (checkpoint) await writeFile(cx, checkpointXml(checkpoint, tracked, skipped), { mode: 0o600 });
    const t0 = performance.now();
    let job: BackupJob | undefined;
    for (;;) {
      await writeFile(bx, backupXml(socket, disks.map((d) => ({ target: d.disk.target, incremental: d.base, scratch: join(qemuDir, `${d.disk.target}.scratch`) })), skipped), { mode: 0o600 });
      try {
        job = await beginBackup(uri, dom.name, bx, checkpoint ? cx : undefined);
        break;
      } catch (e) {
        if (!(e instanceof VirshError)) throw e;
        if (/state change lock|backup job|block job|job is active/i.test(e.detail)) {
          throw new QsyncError('LOCKED', `domain ${dom.name} is busy with another job: ${e.detail}`, { hint: `see virsh domjobinfo ${dom.name}` }, { cause: e });
        }
        // A QEMU that was killed saved no bitmap: that disk's checkpoint counts nothing. Full for it, and begin again.
        const broken = e.detail.match(/missing or broken bitmap '[^']*' for disk '([^']+)'/)?.[1];
        const d = disks.find((x) => x.base && x.disk.target === broken);
        if (!d) throw e;
        d.reason = `checkpoint ${d.base} is broken (QEMU stopped without saving its bitmap)`;
        hooks.notice?.(`${label(d)}: ${d.reason}: full run`, d.rel);
        await d.target.dropNote();
        d.base = d.state = undefined;
      }
    }
    began = true;
    if (!job || job.socket !== socket) throw new QsyncError('SOURCE', `the backup job qsync started on domain ${dom.name} is gone`);
    const setupMs = performance.now() - t0;
    const out: DiskSummary[] = [];
    for (const d of disks) {
      const t1 = performance.now();
      const exp = job.disks.find((x) => x.target === d.disk.target);
      if (!exp) throw new QsyncError('SOURCE', `libvirt's backup job does not export disk ${d.disk.target}`, { file: d.rel });
      if (d.base && !exp.exportBitmap) throw new QsyncError('SOURCE', `libvirt's backup job exports disk ${d.disk.target} without its dirty bitmap`, { file: d.rel });
      const uriOf = `nbd+unix:///${encodeURIComponent(exp.exportName)}?socket=${socket}`;
      const s = await copyDisk({ uri: uriOf }, { name: d.name, node: d.disk.target }, copyContext(ctx, d, d.base ? exp.exportBitmap : undefined));
      // The target is committed: from now on its changes are counted from the new checkpoint.
      if (checkpoint && d.disk.format === 'qcow2') {
        await d.target.writeNote({ node: stateNode(dom, d.disk), bitmap: checkpoint, baseChecksum: s.checksum, size: s.size });
      }
      const { checksum: _c, ...rest } = s;
      out.push({ ...rest, setupMs, elapsedMs: performance.now() - t1 + setupMs });
    }
    ok = true;
    return out;
  } finally {
    const errors: unknown[] = [];
    // Listed while the job ends: a job neither makes nor deletes checkpoints (the one it began with is already there).
    const listed = listCheckpoints(uri, dom.name);
    listed.catch(() => {}); // awaited in pruneCheckpoints
    if (began) await abortBackup(uri, dom.name).catch((e: unknown) => errors.push(e));
    await rm(dir, { recursive: true, force: true }).catch((e: unknown) => errors.push(e));
    // Only once the job is gone (libvirt refuses to delete a checkpoint a job uses); a failed run's new checkpoint goes here too.
    if (!errors.length) {
      const e = await pruneCheckpoints(uri, dom, prefix, disks, hooks, listed);
      if (e) errors.push(e);
    }
    if (ok && errors.length) throw errors[0];
  }
}

/**
 * A shut-off domain: each disk image is served by qemu-storage-daemon
 * (src/qemu/offline.ts). The checkpoint a disk's state validly records has
 * its bitmap in the qcow2 (QEMU stored it at shutdown, and any QEMU that
 * opened the image since kept counting in it): a disabled, non-persistent
 * copy of it is exported with the disk and only its dirty extents are read
 * (the image's own bitmap is never changed). Without one (no checkpoint, a
 * raw disk, a bitmap left in use by a crash) the disk is read in full
 * (allocated extents), written where it differs. The checkpoint stays the
 * base, tied to the new manifest.
 */
async function backupShutOff(uri: string, survey: DomainSurvey, disks: Disk[], ctx: DiskContext): Promise<DiskSummary[]> {
  const { hooks } = ctx;
  const { domain: dom, checkpoints } = survey;
  const asked = await lookups(uri, dom, disks, checkpoints);
  const prefix = prefixFor(ctx.dest);
  const out: DiskSummary[] = [];
  for (const d of disks) {
    if (d.disk.type !== 'file' || !d.disk.source) {
      throw new QsyncError('SOURCE', `disk ${d.disk.target} of shut-off domain ${dom.name} is a ${d.disk.type} disk: only image files are read offline`, {
        file: d.rel, hint: `start the domain (virsh start ${dom.name}) and run again`,
      });
    }
    const keep = decide(dom, d, checkpoints, asked) === undefined ? d.base : undefined;
    const t0 = performance.now();
    const served = await serveImage(d.disk.source, ctx.tempDir);
    const dir = await mkdtemp(join(ctx.tempDir, `${prefix}${process.pid}-`));
    try {
      const qmp = await QmpClient.connect(served.qmp);
      try {
        const bitmap = keep && (await listBitmaps(qmp, served.node)).find((b) => b.name === keep);
        let frozen: string | undefined;
        if (bitmap && !bitmap.inconsistent) {
          frozen = 'qsync-offline';
          await qmp.execute('block-dirty-bitmap-add', { node: served.node, name: frozen, persistent: false, disabled: true });
          await qmp.execute('block-dirty-bitmap-merge', { node: served.node, target: frozen, bitmaps: [keep] });
          d.reason = undefined;
          hooks.notice?.(`${label(d)}: domain is shut off: changes since checkpoint ${keep} read from ${d.disk.source}`, d.rel);
        } else {
          d.reason = keep ? `domain is shut off and its image lacks a sound bitmap of checkpoint ${keep}` : 'domain is shut off';
          hooks.notice?.(`${label(d)}: ${d.reason}: full read of ${d.disk.source}`, d.rel);
        }
        const socket = join(dir, 'nbd.sock');
        await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socket } } });
        await qmp.execute('block-export-add', {
          type: 'nbd', id: 'qsync', 'node-name': served.node, writable: false, name: 'disk', ...(frozen ? { bitmaps: [frozen] } : {}),
        });
        const setupMs = performance.now() - t0;
        const s = await copyDisk({ uri: `nbd+unix:///disk?socket=${socket}` }, { name: d.name, node: d.disk.target }, copyContext(ctx, d, frozen));
        if (keep) await d.target.writeNote({ node: stateNode(dom, d.disk), bitmap: keep, baseChecksum: s.checksum, size: s.size });
        else await d.target.dropNote();
        const { checksum: _c, ...rest } = s;
        out.push({ ...rest, setupMs, elapsedMs: performance.now() - t0 });
      } finally {
        await qmp.close();
      }
    } finally {
      await served.stop();
      await rm(dir, { recursive: true, force: true });
    }
  }
  return out;
}
