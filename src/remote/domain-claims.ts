/**
 * The drop-in line in a push (docs/IMAGE-MODE.md "The drop-in line"):
 * `qsync -a /var/lib/libvirt/images/ host:/backup/images/`. The client, on
 * the libvirt host, names in its hello the image files its domains hold
 * (device and inode, as its listing gives them to this side). The receiving
 * walk here leaves those files, as a local walk leaves them to the drop-in;
 * once it is done, it tells the client which they are and where they go
 * (`claimed`), and then holds DEST's folders, one at a time as the client
 * asks (`claims-folder`), as targets (src/remote/serve-target.ts) for the
 * client's domain backups, until the client is done (`claims-done`, with
 * what it wrote, counted into this run's statistics). DEST stays locked by
 * this run throughout; a qcow2 disk's copy stays a qcow2 written through
 * this host's QEMU.
 */
import type { BigIntStats } from 'node:fs';
import { dirname } from 'node:path';
import { fieldString, protocolError, type ControlMessage } from '../core/wire.js';
import type { RunStats, SyncHooks } from '../sync/events.js';
import { keyOf, localFolders, type DropIn, type DropInOptions, type FolderOpener } from '../sync/dropin.js';
import type { LocalDestination } from '../sync/local-target.js';
import { errorMessage, type Channel } from './channel.js';
import { RemoteDestination } from './remote-target.js';
import { TargetServer } from './serve-target.js';

/** More image files than any host's domains hold: a hello naming more is refused. */
export const MAX_CLAIMS = 65_536;
const KEY = /^\d{1,20}:\d{1,20}$/;

/** The statistics a client's domain backups add to the run: only these, each a count. */
const COUNTED = ['transferred', 'transferredSize', 'created', 'literal', 'matched', 'scanned'] as const;

/** The hello's `claims`: `dev:ino` strings, at most MAX_CLAIMS; undefined when absent. */
export function claimsFromWire(v: unknown): Set<string> | undefined {
  if (v === undefined) return undefined;
  if (!Array.isArray(v) || v.length > MAX_CLAIMS || !v.every((k) => typeof k === 'string' && KEY.test(k))) throw protocolError('bad claims');
  return new Set(v as string[]);
}

/** The receiving end of a push: the walk leaves the client's domain files, then their backups write through here. */
export class ClaimsForPeer {
  readonly #claimed: { rel: string; key: string; size: number }[] = [];

  constructor(
    private readonly ch: Channel,
    private readonly keys: Set<string>,
    private readonly times: boolean,
  ) {}

  claim(st: BigIntStats, rel: string): boolean {
    const key = keyOf(st);
    if (!this.keys.has(key)) return false;
    this.#claimed.push({ rel, key, size: Number(st.size) });
    return true;
  }

  async run(destRoot: string, o: DropInOptions, _hooks: SyncHooks, stats: RunStats): Promise<boolean> {
    if (!this.#claimed.length) return false;
    await this.ch.send({ op: 'claimed', files: this.#claimed });
    const folders = new Set(this.#claimed.map((c) => folderOf(c.rel)));
    const open = localFolders(destRoot, this.times);
    for (;;) {
      const m = await this.ch.control();
      if (m.op === 'claims-done') {
        const add = (m.stats ?? {}) as Record<string, unknown>;
        for (const k of COUNTED) {
          const n = add[k];
          if (!Number.isSafeInteger(n) || (n as number) < 0) throw protocolError(`bad claims-done ${k}`);
          stats[k] += n as number;
        }
        return m.failed === true;
      }
      if (m.op !== 'claims-folder') throw protocolError(`unexpected "${m.op}"`);
      const rel = fieldString(m, 'folder');
      if (!folders.has(rel)) throw protocolError(`${JSON.stringify(rel)} holds no claimed file`);
      let folder;
      try {
        folder = await open(rel, o.dryRun);
      } catch (e) {
        await this.ch.send(errorMessage(e));
        continue;
      }
      await this.ch.send({ op: 'claims-folder-ok', exists: folder !== undefined });
      if (!folder) continue;
      try {
        const last = await new TargetServer(this.ch, folder.destination as LocalDestination).serve();
        if (last.op !== 'bye') throw protocolError(`unexpected "${last.op}"`);
      } finally {
        await folder.close();
      }
    }
  }
}

const folderOf = (rel: string): string => (dirname(rel) === '.' ? '' : dirname(rel));

/**
 * The client's side: the far walk said which files its domains take
 * (`claimed`); they are backed up through the domains into the far DEST's
 * folders, reached over the same channel; `claims-done` then tells the far
 * side whether some failed and what was written.
 */
export async function backUpClaimed(ch: Channel, m: ControlMessage, dropIn: DropIn, shownRoot: string, o: DropInOptions, hooks: SyncHooks): Promise<void> {
  const files = m.files;
  if (!Array.isArray(files) || files.length > MAX_CLAIMS) throw protocolError('bad claimed files');
  for (const f of files as Record<string, unknown>[]) {
    const rel = typeof f?.rel === 'string' ? f.rel : '';
    const key = typeof f?.key === 'string' && KEY.test(f.key) ? f.key.split(':') : undefined;
    if (!rel || rel.startsWith('/') || rel.split('/').some((p) => p === '..' || p === '' || p === '.') || !key || !Number.isSafeInteger(f.size)) {
      throw protocolError('bad claimed file');
    }
    if (!dropIn.claim({ dev: BigInt(key[0]!), ino: BigInt(key[1]!), size: BigInt(f.size as number) }, rel)) throw protocolError(`${rel} is no file of a domain here`);
  }
  const stats = { transferred: 0, transferredSize: 0, created: 0, literal: 0, matched: 0, scanned: 0 } as RunStats;
  const failed = await dropIn.run(farFolders(ch, shownRoot), o, hooks, stats);
  await ch.send({ op: 'claims-done', failed, stats: Object.fromEntries(COUNTED.map((k) => [k, stats[k]])) });
}

/** The far DEST's folders, each held by the far side while its copies are written. */
function farFolders(ch: Channel, shownRoot: string): FolderOpener {
  return async (rel) => {
    await ch.send({ op: 'claims-folder', folder: rel });
    const r = await ch.expect('claims-folder-ok');
    if (r.exists === false) return undefined;
    const destination = new RemoteDestination(ch, rel ? `${shownRoot}/${rel}` : shownRoot);
    return { destination, close: () => destination.close() };
  };
}
