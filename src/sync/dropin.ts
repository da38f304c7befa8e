/**
 * The drop-in line for libvirt hosts (docs/IMAGE-MODE.md "The drop-in line"):
 * `qsync -a /var/lib/libvirt/images/ /backup/images/` backs up an image a
 * libvirt domain uses through that domain, running or shut off
 * (src/sync/domain-backup.ts: one instant for all its disks), instead of
 * copying its bytes; every other file is synced as before.
 *
 * Before the walk, the domains are listed (`virsh list --all`, quick and
 * silent: no libvirt, no socket that answers, or any error means no domain, and the run is
 * what it always was) and their disk image files known by device and inode.
 * The walk hands such a file here instead of copying it (`claim`); after the
 * walk, one domain backup per domain and DEST folder writes them under their
 * own names: a qcow2 stays a qcow2 (src/sync/qcow2-target.ts), a raw one
 * stays raw. Each is reported as rsync reports a file, with one notice per
 * domain.
 */
import type { BigIntStats } from 'node:fs';
import { stat } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import { errnoOf, errnoText, QsyncError } from '../core/errors.js';
import { DEFAULT_URI, describeDomain, listDomains, type Domain, type DomainDisk } from '../qemu/libvirt.js';
import { fsPath, type Dir } from '../io/safe-fs.js';
import { socketAnswers } from '../io/socket-probe.js';
import type * as DomainBackup from './domain-backup.js';
import type { RunStats, SyncHooks } from './events.js';
import { nsToSeconds, type FileSyncContext } from './file-sync.js';
import { LocalDestination } from './local-target.js';
import type { Destination } from './target.js';

/**
 * Image mode (QMP, NBD, qcow2 targets) loads only when a domain is backed
 * up: a plain file run does not pay its start-up (~40 ms of module loading).
 */
const loadDomainBackup = (): Promise<typeof DomainBackup> => import('./domain-backup.js');

/** The sockets a local libvirt answers qemu:///system on (monolithic libvirtd, or the modular virtqemud). */
const SYSTEM_SOCKETS = ['/run/libvirt/libvirt-sock', '/run/libvirt/virtqemud-sock'];
/** Domains described at once. */
const DESCRIBE_AT_ONCE = 8;

interface OwnedDisk {
  domain: string;
  disk: DomainDisk;
}

/** A file of the tree that a domain's backup writes. */
interface Claimed extends OwnedDisk {
  /** Its path below the destination root. */
  rel: string;
  size: number;
}

export interface DropInOptions {
  /** libvirt URI (`--connect`), default qemu:///system. */
  connect?: string;
  blockSize: number;
  verifySample?: number;
  dryRun: boolean;
  /** Notices per domain (-v, -i, --json). */
  announce: boolean;
  /** Aborted: the running backup cleans up (its job ended, its checkpoint pruned) and the run ends (INTERRUPTED). */
  signal?: AbortSignal;
  /**
   * The run's --backup-dir history and --write-batch record (src/sync/run-deltas.ts), for copies on
   * this host whose bytes are the guest's (raw); a qcow2 copy, or one on another host, keeps neither:
   * each such file is named in a warning and backed up without.
   */
  wrapSink?: FileSyncContext['wrapSink'];
}

export class DropIn {
  readonly #claimed: Claimed[] = [];

  private constructor(
    private readonly uri: string,
    private readonly owned: Map<string, OwnedDisk>,
  ) {}

  /**
   * The disk image files of every domain libvirt defines, by device and
   * inode; undefined when there is none, or no libvirt to ask.
   */
  static async find(connect: string | undefined): Promise<DropIn | undefined> {
    const uri = connect ?? DEFAULT_URI;
    if (uri === DEFAULT_URI && !(await someAnswers(SYSTEM_SOCKETS))) return undefined;
    // No virsh, or no libvirtd answering: the run is what it was without libvirt.
    const names = await listDomains(uri).catch((e: unknown) => {
      if (e instanceof QsyncError) return [];
      throw e;
    });
    // A few virsh at a time: a host's dozens of domains cost a fraction of a second, not one virsh after another.
    const doms: (Domain | undefined)[] = [];
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < names.length) {
        const i = next++;
        // A domain undefined meanwhile is no domain (its files, if a QEMU holds them, are refused by the walk as before).
        doms[i] = await describeDomain(uri, names[i]!).catch((e: unknown) => {
          if (e instanceof QsyncError) return undefined;
          throw e;
        });
      }
    };
    await Promise.all(Array.from({ length: Math.min(DESCRIBE_AT_ONCE, names.length) }, worker));
    const owned = new Map<string, OwnedDisk>();
    for (const dom of doms) {
      for (const disk of dom?.disks ?? []) {
        if (disk.type !== 'file' || !disk.source) continue;
        const st = await stat(fsPath(disk.source), { bigint: true }).catch(() => undefined);
        if (!st?.isFile()) continue;
        // Two definitions of one image (a clone's, a spare's): the one that runs holds it, and backs it up.
        const up = dom!.state === 'running' || dom!.state === 'paused';
        if (!owned.has(keyOf(st)) || up) owned.set(keyOf(st), { domain: dom!.name, disk });
      }
    }
    return owned.size ? new DropIn(uri, owned) : undefined;
  }

  /** The walk met a regular file at `rel`: true when a domain's backup takes it (the walk then leaves it). */
  claim(st: Pick<BigIntStats, 'dev' | 'ino' | 'size'>, rel: string): boolean {
    const o = this.owned.get(keyOf(st));
    // A second name of a disk (a hard link) is no second copy: the walk takes it as any file (a running domain's is refused).
    if (!o || this.#claimed.some((c) => c.domain === o.domain && c.disk.target === o.disk.target)) return false;
    this.#claimed.push({ ...o, rel, size: Number(st.size) });
    return true;
  }

  /**
   * The domains' image files as `dev:ino` (keyOf), for a far walk to leave
   * (src/remote/domain-claims.ts); `within` (a server's --restrict DIR):
   * only those whose path libvirt gives lies in DIR, so a client learns
   * nothing of the others (which it could never claim anyway).
   */
  keys(within?: string): string[] {
    return [...this.owned].filter(([, o]) => within === undefined || o.disk.source!.startsWith(`${within.replace(/\/+$/, '')}/`)).map(([k]) => k);
  }

  /**
   * Back up the claimed files through their domains, each folder of DEST
   * reached through `open` (a local DEST's folders: `localFolders`; a far
   * one's: src/remote/domain-claims.ts). Returns whether some failed
   * (rsync's exit 23); `stats` counts what was written.
   */
  async run(open: FolderOpener, o: DropInOptions, hooks: SyncHooks, stats: RunStats): Promise<boolean> {
    // One backup per domain, whichever folders of the tree its disks lie in: all its disks as of one instant.
    const groups = new Map<string, Claimed[]>();
    for (const c of this.#claimed) groups.set(c.domain, [...(groups.get(c.domain) ?? []), c]);
    let failed = false;
    for (const files of groups.values()) {
      if (o.signal?.aborted) throw new QsyncError('INTERRUPTED', 'interrupted');
      const { domain } = files[0]!;
      const names = files.map((f) => f.rel).join(', ');
      const held = new Map<string, DropInFolder | undefined>();
      try {
        for (const folder of [...new Set(files.map((f) => folderOf(f.rel)))].sort()) held.set(folder, await open(folder, o.dryRun));
        const at = (f: Claimed): DropInFolder | undefined => held.get(folderOf(f.rel));
        const existed = new Set<string>();
        for (const f of files) if (await at(f)?.destination.target(basename(f.rel)).identity()) existed.add(f.rel);
        if (o.dryRun) {
          for (const f of files) {
            hooks.fileEnd?.({ path: f.rel, itemize: existed.has(f.rel) ? '>f.........' : '>f+++++++++', kind: 'file', size: f.size, scanned: 0, literal: 0, matched: 0, unchanged: false });
          }
          if (o.announce) hooks.notice?.(`would back up ${names} through libvirt domain ${domain}`);
          continue;
        }
        // The checkpoints are keyed by a DEST folder: the first of the domain's (its only one, mostly).
        const first = [...held.values()][0]!.destination;
        const summaries = await (await loadDomainBackup()).runDomainBackup({
          domain, connect: this.uri, dest: first.shown, destination: first, blockSize: o.blockSize, verifySamplePct: o.verifySample, signal: o.signal, wrapSink: rawOnly(o.wrapSink, hooks),
          only: new Map(files.map((f) => [f.disk.target, { rel: f.rel, name: basename(f.rel), destination: at(f)!.destination }])),
        }, {
          // The printer's own methods, called on it (a class's are not own properties to spread).
          fileStart: (p, size, method) => hooks.fileStart?.(p, size, method),
          fileProgress: (p, scanned, written) => hooks.fileProgress?.(p, scanned, written),
          fileEnd: (r) => hooks.fileEnd?.({ ...r, itemize: existed.has(r.path) ? r.itemize : '>f+++++++++', unchanged: existed.has(r.path) && r.unchanged }),
          notice: o.announce ? (m, p) => hooks.notice?.(m, p) : undefined,
          warning: (m, p) => hooks.warning?.(m, p),
        });
        const parts: string[] = [];
        for (const s of summaries) {
          const sent = s.written > 0 || !existed.has(s.name);
          if (sent) {
            stats.transferred++;
            stats.transferredSize += s.size;
            if (!existed.has(s.name)) stats.created++;
          }
          stats.literal += s.written;
          stats.matched += s.unchanged;
          stats.scanned += s.read;
          parts.push(`${s.name} (${s.node}: ${s.mode === 'bitmap' ? 'changed blocks only' : `full read${s.reason ? `, ${s.reason}` : ''}`})`);
        }
        if (o.announce) hooks.notice?.(`backed up through libvirt domain ${domain}, all its disks as of one instant: ${parts.join(', ')}`);
      } catch (e) {
        // Ctrl-C ends the run; an error that is neither qsync's nor the system's is a bug, not a failed file.
        if (e instanceof QsyncError ? e.code === 'INTERRUPTED' || e.context.fatal : !errnoOf(e)) throw e;
        failed = true;
        const msg = e instanceof QsyncError ? e.message + (e.context.hint ? ` (${e.context.hint})` : '') : errnoText(e);
        hooks.warning?.(`${names}: backup through libvirt domain ${domain} failed: ${msg}`, files[0]!.rel);
      } finally {
        for (const f of held.values()) await f?.close();
      }
    }
    return failed;
  }
}

/** The folder of DEST a file below it is in: '' or 'a/b'. */
export const folderOf = (rel: string): string => (dirname(rel) === '.' ? '' : dirname(rel));

/** History and batches for a copy that is a file on this host (raw: its bytes are the guest's); any other is named and kept out. */
function rawOnly(wrap: FileSyncContext['wrapSink'], hooks: SyncHooks): FileSyncContext['wrapSink'] {
  return wrap && ((target, info) => {
    if (target && 'fh' in target) return wrap(target, info);
    hooks.warning?.(unkept(info.relPath), info.relPath);
    return target!;
  });
}

/** Why a domain's file gets no history or batch record (the run goes on without them). */
export const unkept = (rel: string): string =>
  `${rel}: backed up through libvirt without --backup-dir history or --write-batch record (kept only for a raw copy on this host)`;

/** A folder of DEST the domains' copies are written into, held while they are. */
export interface DropInFolder {
  readonly destination: Destination;
  /** Done with the folder: with -t, its mtime is put back to what the walk set (a new file moved it), as rsync leaves a folder it has synced. */
  close(): Promise<void>;
}

/** Folder `rel` ('' or 'a/b') of DEST; undefined with -n when it does not exist (nothing is made). */
export type FolderOpener = (rel: string, dryRun: boolean) => Promise<DropInFolder | undefined>;

/** The folders of a DEST on this host, whose lock the run holds: `times` (-t) as for DropInFolder.close. */
export function localFolders(destRoot: string, times: boolean, held?: Dir): FolderOpener {
  return async (rel, dryRun) => {
    const destination = await LocalDestination.within(destRoot, rel, held).catch((e: unknown) => {
      // -n made nothing: a folder still missing holds no copy yet.
      if (dryRun) return undefined;
      throw e;
    });
    return destination && heldFolder(destination, times);
  };
}

/** `destination` as a DropInFolder: its mtime as found is put back on close when -t and a new file moved it. */
async function heldFolder(destination: LocalDestination, times: boolean): Promise<DropInFolder> {
  const before = await destination.folder.stat().catch(async (e: unknown) => {
    await destination.close();
    throw e;
  });
  return {
    destination,
    async close() {
      try {
        if (times && (await destination.folder.stat()).mtimeNs !== before.mtimeNs) {
          await destination.folder.setMeta({ atime: nsToSeconds(before.atimeNs), mtime: nsToSeconds(before.mtimeNs) });
        }
      } finally {
        await destination.close();
      }
    },
  };
}

/** A file's key: its device and inode, as `dev:ino` (also on the wire, src/remote/domain-claims.ts). */
export const keyOf = (st: Pick<BigIntStats, 'dev' | 'ino'>): string => `${st.dev}:${st.ino}`;

/** Whether a daemon listens on one of `paths` (a socket file a stopped libvirtd left behind does not count). */
async function someAnswers(paths: string[]): Promise<boolean> {
  for (const p of paths) if (await socketAnswers(p)) return true;
  return false;
}
