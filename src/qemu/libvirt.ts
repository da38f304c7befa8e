/**
 * libvirt through its own client, `virsh`: a domain's disks (from its XML),
 * pull-mode backup jobs (`backup-begin`, `backup-dumpxml`, `domjobabort`) and
 * checkpoints. No libvirt RPC and no QMP monitor of qsync's own: the domain
 * stays untainted and libvirt keeps its view of every bitmap.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { QsyncError } from '../core/errors.js';

export const DEFAULT_URI = 'qemu:///system';

/** A hung libvirtd must not hang a backup for ever; every virsh call is short when libvirtd answers. */
const VIRSH_TIMEOUT_MS = 120_000;
/** Largest XML read from virsh: a domain's XML is a few KiB. */
const VIRSH_MAX_OUTPUT = 16 << 20;

/** `virsh -c URI ARGS...`; its stdout, or a SOURCE error quoting virsh's own message. */
export function virsh(uri: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('virsh', ['-c', uri, ...args], { timeout: VIRSH_TIMEOUT_MS, maxBuffer: VIRSH_MAX_OUTPUT, encoding: 'utf8' }, (err, stdout, stderr) => {
      if (!err) return resolve(stdout);
      reject(virshFailure(uri, args[0] ?? '', stderr, err));
    });
  });
}

function virshFailure(uri: string, command: string, stderr: string, err: Error): QsyncError {
  if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
    return new QsyncError('SOURCE', 'virsh is not installed', { hint: 'install libvirt-clients (apt-get install libvirt-clients)' }, { cause: err });
  }
  const msg = stderr.split('\n').map((l) => l.replace(/^error: /, '').trim()).filter(Boolean).join('; ') || err.message;
  const hint = /failed to connect|no such file or directory.*sock|connection refused/i.test(msg)
    ? `is libvirtd running and ${uri} the right URI (--connect)?`
    : /failed to get domain|domain not found/i.test(msg)
      ? `virsh -c ${uri} list --all shows the domains there`
      : undefined;
  return new VirshError(command, msg, hint, err);
}

/** One word for virsh's own command parser (shell-like: '...' is literal). */
const virshWord = (w: string): string => `'${w.replace(/'/g, "'\\''")}'`;

/**
 * Several virsh commands in one process and one connection (each virsh
 * process costs some 20-40 ms to start and connect): each command's stdout,
 * split at `echo` markers. virsh goes on after a failed command, and its
 * errors cannot be told apart by command: any error fails the whole batch,
 * but those matching `tolerate` (a command that failed so prints nothing).
 */
export function virshBatch(uri: string, commands: string[][], tolerate?: RegExp): Promise<string[]> {
  if (commands.length === 1 && !tolerate) return virsh(uri, commands[0]!).then((out) => [out]);
  const marker = `qsync-${randomBytes(8).toString('hex')}`;
  const line = commands.map((c) => c.map(virshWord).join(' ')).join(` ; echo ${marker} ; `);
  const names = commands.map((c) => c[0]).join(', ');
  return new Promise((resolve, reject) => {
    execFile('virsh', ['-c', uri, line], { timeout: VIRSH_TIMEOUT_MS, maxBuffer: VIRSH_MAX_OUTPUT, encoding: 'utf8' }, (err, stdout, stderr) => {
      const failed = stderr.split('\n').filter((l) => /^error:/.test(l) && !tolerate?.test(l));
      // A virsh that failed without saying why (killed, missing, timed out) fails the batch too.
      if (failed.length || (err && !/^error:/m.test(stderr))) {
        return reject(virshFailure(uri, commands[0]![0]!, failed.length ? failed.join('\n') : stderr, err ?? new Error(`virsh ${names} failed`)));
      }
      const parts = stdout.split(`${marker}\n`);
      if (parts.length !== commands.length) return reject(new VirshError(names, 'its answer does not split into one part per command', undefined, undefined));
      resolve(parts);
    });
  });
}

export class VirshError extends QsyncError {
  constructor(
    readonly command: string,
    readonly detail: string,
    hint: string | undefined,
    cause: unknown,
  ) {
    super('SOURCE', `virsh ${command}: ${detail}`, hint ? { hint } : {}, { cause });
  }
}

// --- a reader for the XML libvirt writes (regular, attribute-quoted, no CDATA) ---

const ENTITIES: Record<string, string> = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" };
const unescape = (s: string): string =>
  s.replace(/&(#x[0-9a-f]+|#\d+|amp|lt|gt|quot|apos);/gi, (_, e: string) =>
    e[0] === '#' ? String.fromCodePoint(e[1] === 'x' || e[1] === 'X' ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10)) : ENTITIES[e.toLowerCase()]!,
  );
export const escapeXml = (s: string): string =>
  s.replace(/[&<>"']/g, (c) => `&${Object.entries(ENTITIES).find(([, v]) => v === c)![0]};`);

/** Each `<name ...>...</name>` or `<name .../>` in `xml` (elements of that name do not nest in libvirt's XML). */
function elements(xml: string, name: string): string[] {
  const out: string[] = [];
  const open = new RegExp(`<${name}(?=[\\s/>])[^>]*?(/?)>`, 'g');
  for (let m; (m = open.exec(xml)); ) {
    if (m[1]) {
      out.push(m[0]);
      continue;
    }
    const end = xml.indexOf(`</${name}>`, open.lastIndex);
    if (end < 0) break;
    out.push(xml.slice(m.index, end + name.length + 3));
    open.lastIndex = end;
  }
  return out;
}

/** The attributes of an element's opening tag. */
function attrs(el: string): Record<string, string> {
  const tag = el.slice(0, el.indexOf('>') + 1);
  const out: Record<string, string> = {};
  for (const m of tag.matchAll(/([\w:-]+)=(?:'([^']*)'|"([^"]*)")/g)) out[m[1]!] = unescape(m[2] ?? m[3] ?? '');
  return out;
}

const text = (xml: string, name: string): string | undefined => {
  const el = elements(xml, name)[0];
  return el === undefined || el.endsWith('/>') ? undefined : unescape(el.slice(el.indexOf('>') + 1, el.lastIndexOf('<')).trim());
};

// --- domains ---

export interface DomainDisk {
  /** Target device (vda, sdb): libvirt's name for the disk in backup and checkpoint XML. */
  target: string;
  /** file, block, network, volume ... */
  type: string;
  /** Image format (qcow2, raw), from <driver type>. */
  format: string;
  /** The disk's own source: a file or block device path (not its backing chain). */
  source?: string;
}

export interface Domain {
  name: string;
  uuid: string;
  /** virsh domstate: running, paused, shut off ... */
  state: string;
  disks: DomainDisk[];
  /** uid:gid QEMU runs as (its DAC label), where libvirt says. */
  owner?: { uid: number; gid: number };
}

/** The names of every domain the URI defines, running or not. */
export async function listDomains(uri: string): Promise<string[]> {
  return (await virsh(uri, ['list', '--all', '--name'])).split('\n').map((l) => l.trim()).filter(Boolean);
}

export async function describeDomain(uri: string, name: string): Promise<Domain> {
  return (await surveyDomain(uri, name, false)).domain;
}

export interface DomainSurvey {
  domain: Domain;
  /** Its checkpoints' names. */
  checkpoints: string[];
  /** libvirt runs a job on the domain (a backup or any other). */
  busy: boolean;
}

/** A domain, and (`all`) its checkpoints and whether a job runs on it: asked in one virsh. */
export async function surveyDomain(uri: string, name: string, all: true): Promise<DomainSurvey>;
export async function surveyDomain(uri: string, name: string, all: false): Promise<Pick<DomainSurvey, 'domain'>>;
export async function surveyDomain(uri: string, name: string, all: boolean): Promise<Pick<DomainSurvey, 'domain'> & Partial<DomainSurvey>> {
  // A domain that is not running has no job to show: domjobinfo says so as an error.
  const [state, xml, list, job] = await virshBatch(
    uri,
    [['domstate', '--', name], ['dumpxml', '--', name], ...(all ? [['checkpoint-list', '--name', '--', name], ['domjobinfo', '--', name]] : [])],
    all ? /domain is not running/ : undefined,
  );
  const domain = parseDomain(name, state!.trim(), xml!);
  if (!all) return { domain };
  const type = job!.match(/^Job type:\s*(\S+)/m)?.[1] ?? (domain.state === 'shut off' ? 'None' : undefined);
  if (!type) throw new QsyncError('SOURCE', `virsh domjobinfo ${name}: no job type in its answer`);
  return { domain, checkpoints: names(list!), busy: type !== 'None' };
}

const names = (out: string): string[] => out.split('\n').map((l) => l.trim()).filter(Boolean);

function parseDomain(name: string, state: string, xml: string): Domain {
  const devices = elements(xml, 'devices')[0] ?? '';
  const disks: DomainDisk[] = [];
  for (const d of elements(devices, 'disk')) {
    const a = attrs(d);
    if ((a.device ?? 'disk') !== 'disk') continue; // cdrom, floppy, lun: not disks qsync backs up
    const target = elements(d, 'target')[0];
    if (!target) continue;
    // The first <source> is the disk's own; later ones belong to <backingStore>.
    const src = elements(d, 'source')[0];
    const s = src ? attrs(src) : {};
    disks.push({ target: attrs(target).dev!, type: a.type ?? 'file', format: attrs(elements(d, 'driver')[0] ?? '<driver>').type ?? 'raw', source: s.file ?? s.dev });
  }
  let owner: Domain['owner'];
  for (const sl of elements(xml, 'seclabel')) {
    if (attrs(sl).model !== 'dac') continue;
    const m = text(sl, 'label')?.match(/^\+?(\d+):\+?(\d+)$/);
    if (m) owner = { uid: Number(m[1]), gid: Number(m[2]) };
  }
  return { name, uuid: text(xml, 'uuid') ?? '', state, disks, owner };
}

/** A disk's capacity in bytes (what the guest sees): the command, and its answer parsed. */
export const diskCapacityCommand = (domain: string, target: string): string[] => ['domblkinfo', '--', domain, target];

export function parseCapacity(out: string, domain: string, target: string): number {
  const m = out.match(/^Capacity:\s+(\d+)/m);
  if (!m) throw new QsyncError('SOURCE', `virsh domblkinfo ${domain} ${target}: no capacity in its answer`);
  return Number(m[1]);
}

// --- checkpoints ---

export async function listCheckpoints(uri: string, domain: string): Promise<string[]> {
  return names(await virsh(uri, ['checkpoint-list', '--name', '--', domain]));
}

/** The disks (targets) a checkpoint tracks with a bitmap: the command, and its answer parsed. */
export const checkpointDisksCommand = (domain: string, checkpoint: string): string[] => ['checkpoint-dumpxml', '--no-domain', '--', domain, checkpoint];

export function parseCheckpointDisks(xml: string): string[] {
  return elements(elements(xml, 'disks')[0] ?? '', 'disk').map(attrs).filter((a) => a.checkpoint === 'bitmap').map((a) => a.name!);
}

/**
 * Delete a checkpoint and its bitmaps (libvirt merges them into the parent
 * checkpoint's, so it still covers every change); `metadataOnly`: libvirt's
 * record only, for a checkpoint whose bitmaps are gone.
 */
export async function deleteCheckpoint(uri: string, domain: string, checkpoint: string, metadataOnly = false): Promise<void> {
  await virsh(uri, ['checkpoint-delete', ...(metadataOnly ? ['--metadata'] : []), '--', domain, checkpoint]);
}

/** `skipped`: disks named without a bitmap (libvirt would give an unlisted disk one). */
export function checkpointXml(name: string, targets: string[], skipped: string[] = []): string {
  const disks = [
    ...targets.map((t) => `    <disk name='${escapeXml(t)}' checkpoint='bitmap'/>\n`),
    ...skipped.map((t) => `    <disk name='${escapeXml(t)}' checkpoint='no'/>\n`),
  ].join('');
  return `<domaincheckpoint>\n  <name>${escapeXml(name)}</name>\n  <disks>\n${disks}  </disks>\n</domaincheckpoint>\n`;
}

// --- pull-mode backup jobs ---

export interface BackupDisk {
  target: string;
  /** Incremental from this checkpoint; else a full export. */
  incremental?: string;
  scratch: string;
}

/** `skipped`: disks left out of the job (libvirt would back up an unlisted disk). */
export function backupXml(socket: string, disks: BackupDisk[], skipped: string[] = []): string {
  const rows = disks.map((d) => {
    const mode = d.incremental ? `backupmode='incremental' incremental='${escapeXml(d.incremental)}'` : `backupmode='full'`;
    return `    <disk name='${escapeXml(d.target)}' backup='yes' type='file' ${mode}><scratch file='${escapeXml(d.scratch)}'/></disk>\n`;
  });
  for (const t of skipped) rows.push(`    <disk name='${escapeXml(t)}' backup='no'/>\n`);
  return `<domainbackup mode='pull'>\n  <server transport='unix' socket='${escapeXml(socket)}'/>\n  <disks>\n${rows.join('')}  </disks>\n</domainbackup>\n`;
}

export interface BackupJob {
  /** The NBD server's unix socket (pull mode over unix). */
  socket?: string;
  disks: { target: string; exportName: string; exportBitmap?: string }[];
}

/** The domain's backup job, or undefined when there is none. */
export async function currentBackup(uri: string, domain: string): Promise<BackupJob | undefined> {
  let xml: string;
  try {
    xml = await virsh(uri, ['backup-dumpxml', '--', domain]);
  } catch (e) {
    if (e instanceof VirshError && NO_BACKUP_JOB.test(e.detail)) return undefined;
    throw e;
  }
  return parseBackup(xml);
}

const NO_BACKUP_JOB = /no domain backup job/i;

function parseBackup(xml: string): BackupJob | undefined {
  if (!xml.trim()) return undefined;
  const server = elements(xml, 'server')[0];
  const disks = elements(elements(xml, 'disks')[0] ?? '', 'disk')
    .map(attrs)
    .filter((a) => a.backup !== 'no')
    .map((a) => ({ target: a.name!, exportName: a.exportname ?? a.name!, exportBitmap: a.exportbitmap }));
  return { socket: server ? attrs(server).socket : undefined, disks };
}

/**
 * `virsh backup-begin DOMAIN BACKUP_XML [CHECKPOINT_XML]` and, in the same
 * virsh, the job it began (undefined: gone already). A failed begin is a
 * VirshError with begin's own message.
 */
export async function beginBackup(uri: string, domain: string, backupXmlFile: string, checkpointXmlFile?: string): Promise<BackupJob | undefined> {
  const [, shown] = await virshBatch(uri, [['backup-begin', '--', domain, backupXmlFile, ...(checkpointXmlFile ? [checkpointXmlFile] : [])], ['backup-dumpxml', '--', domain]], NO_BACKUP_JOB);
  return parseBackup(shown!);
}

/** `virsh domjobabort`, then wait (bounded) until libvirt has ended the job: only then are its checkpoints free to delete. */
export async function abortBackup(uri: string, domain: string): Promise<void> {
  // Asked in the same virsh: is the job gone already? (No job to abort, or none to show, is no error here.)
  const [, shown] = await virshBatch(uri, [['domjobabort', '--', domain], ['backup-dumpxml', '--', domain]], /no job is active|not running|no domain backup job/i);
  if (!parseBackup(shown!)) return;
  // libvirt ends a pull-mode job when QEMU reports its block jobs cancelled, usually within tens of ms: asked again
  // after growing pauses (each question is a virsh of its own, some 20-40 ms).
  const deadline = performance.now() + ABORT_WAIT_MS;
  for (let pause = 5; ; pause = Math.min(pause * 2, 100)) {
    await new Promise((r) => setTimeout(r, pause));
    if (!(await currentBackup(uri, domain))) return;
    if (performance.now() > deadline) break;
  }
  throw new QsyncError('SOURCE', `libvirt did not end the backup job of domain ${domain} within ${ABORT_WAIT_MS / 1000} s`, { hint: `see virsh domjobinfo ${domain}` });
}

const ABORT_WAIT_MS = 30_000;
