/**
 * A qcow2 image as a target (src/sync/target.ts): the drop-in's copy of a
 * domain's qcow2 disk stays a qcow2 (docs/IMAGE-MODE.md "The drop-in line").
 * Its bytes are written through QEMU's own qcow2 driver: a
 * qemu-storage-daemon qsync starts serves the file writable over NBD (fd 3 of
 * the daemon is the file qsync opened through its held folder, never a path
 * that could be swapped), and the engine writes the changed guest blocks to
 * that export, so only the clusters behind them change.
 *
 * The manifest describes the guest view (the digests of the virtual disk's
 * blocks). The identity the manifest records is the qcow2 file's: its inode
 * and its mtime once the daemon has flushed and closed it (`finish`), and
 * the virtual size from its header. Any later write to the file, by QEMU or
 * anyone, moves that mtime: the next run then compares instead of trusting.
 *
 * A qcow2 with a backing file, an external data file or encryption is not
 * written (its guest view would not be this file alone): refused with a hint.
 */
import { spawn } from 'node:child_process';
import { constants, type BigIntStats } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { errnoOf, errnoText, QsyncError } from '../core/errors.js';
import { readUpTo } from '../io/local-file.js';
import { checkName } from '../io/safe-fs.js';
import { NbdClient } from '../io/nbd/client.js';
import { qemuToolsHint, startDaemon, toolsMissing, type StorageDaemon } from '../qemu/offline.js';
import { QmpClient } from '../qemu/qmp.js';
import { LocalDestination, LocalTarget } from './local-target.js';
import type { Destination, OpenData, Target, TargetIdentity } from './target.js';

const QCOW2_MAGIC = 0x514649fb;
/** Where the tools a qcow2 copy is written with are missing (a backup host without QEMU). */
const QEMU_TOOLS = `${qemuToolsHint('the host that holds DEST')}, which write a qcow2 copy`;
/** Bytes of the header read: up to the v3 incompatible features. */
const HEADER_LEN = 80;

/** `name` in `dest` as a qcow2 target; `tempDir` holds its daemon's sockets. */
export function qcow2Target(dest: LocalDestination, name: string, tempDir: string): Target {
  checkName(name);
  return new Qcow2Target(dest, name, tempDir);
}

/** `name` in any destination as a qcow2 copy: on this host as above; on a far one, written there (src/remote/serve-target.ts). */
export function qcow2In(dest: Destination, name: string, tempDir: string): Target {
  if (dest instanceof LocalDestination) return qcow2Target(dest, name, tempDir);
  if (dest.qcow2) return dest.qcow2(name);
  throw new QsyncError('UNSUPPORTED', `${dest.shown} cannot keep ${name} as a qcow2`, { hint: 'install the same qsync version on both hosts' });
}

/** Its manifest is kept under `guest/` (src/sync/manifest-store.ts): it describes the guest view, not the file. */
class Qcow2Target extends LocalTarget {
  constructor(
    dest: LocalDestination,
    name: string,
    private readonly tempDir: string,
  ) {
    super(dest.root, dest.folder, name, dest.stateAt, 'guest');
  }

  override async identity(): Promise<TargetIdentity | undefined> {
    const st = await super.identity();
    if (!st) return undefined;
    const fh = await this.#openFile(constants.O_RDONLY);
    try {
      return await this.#identityOf(fh);
    } finally {
      await fh.close();
    }
  }

  /** The file's inode and mtime, the virtual size its header gives; a qcow2 qsync cannot write alone is refused. */
  async #identityOf(fh: FileHandle): Promise<TargetIdentity> {
    const st: BigIntStats = await fh.stat({ bigint: true });
    const h = Buffer.alloc(HEADER_LEN);
    const n = await readUpTo(fh, h, 0);
    const refuse = (why: string): never => {
      throw new QsyncError('TARGET', `${this.shown} ${why}; left alone`, { file: this.shown, hint: 'move it away (qsync then writes a new qcow2 there), or back up into another folder' });
    };
    if (n < 72 || h.readUInt32BE(0) !== QCOW2_MAGIC) refuse('is not a qcow2 image');
    const version = h.readUInt32BE(4);
    if (version !== 2 && version !== 3) refuse(`is a qcow2 of version ${version}`);
    if (h.readBigUInt64BE(8) !== 0n) refuse('has a backing file');
    if (h.readUInt32BE(32) !== 0) refuse('is encrypted');
    const incompatible = version === 3 && n >= 80 ? h.readBigUInt64BE(72) : 0n;
    if (incompatible & 2n) refuse('is marked corrupt by QEMU');
    if (incompatible & 4n) refuse('keeps its data in an external file');
    return { size: h.readBigUInt64BE(24), mtimeNs: st.mtimeNs, ino: st.ino, dev: st.dev };
  }

  #openFile(flags: number, create = false): Promise<FileHandle> {
    return (create ? this.dir.createFile(this.name, 0o600) : this.dir.openFile(this.name, flags)).catch((e) => {
      throw new QsyncError('TARGET', `cannot ${create ? 'create' : 'open'} ${this.shown}: ${errnoOf(e) === 'ELOOP' ? 'it is a symlink (qsync does not follow symlinks in the destination)' : errnoText(e)}`, { file: this.shown }, { cause: e });
    });
  }

  override async open(create: boolean): Promise<OpenData> {
    const fh = await this.#openFile(constants.O_RDWR, create);
    const shown = this.shown;
    let daemon: StorageDaemon | undefined;
    let nbd: NbdClient | undefined;
    const stop = async (): Promise<void> => {
      const [n, d] = [nbd, daemon];
      [nbd, daemon] = [undefined, undefined];
      await n?.close().catch(() => {});
      await d?.stop();
    };
    const serve = async (): Promise<NbdClient> => {
      const dir = await mkdtemp(join(this.tempDir, 'qsync-qsd-'));
      const socket = join(dir, 'nbd.sock');
      const d = await startDaemon(this.tempDir, [
        '--blockdev', JSON.stringify({ driver: 'file', 'node-name': 'f', filename: '/dev/fd/3', discard: 'unmap' }),
        // No backing file, whatever the header says (such images are refused above): the guest view is this file.
        '--blockdev', JSON.stringify({ driver: 'qcow2', 'node-name': 'q', file: 'f', backing: null, discard: 'unmap' }),
        '--nbd-server', `addr.type=unix,addr.path=${socket}`,
        '--export', 'type=nbd,id=e,node-name=q,name=disk,writable=on',
      ], [fh.fd], dir).catch(async (e: unknown) => {
        await rm(dir, { recursive: true, force: true });
        throw e;
      });
      if (typeof d === 'string') {
        throw new QsyncError('TARGET', `qemu-storage-daemon could not open ${shown}: ${d}`, { file: shown, hint: toolsMissing(d) ? QEMU_TOOLS : 'is it open in a QEMU (a VM booted from the backup)?' });
      }
      daemon = d;
      // What QEMU opened, before a block is read or written: the header it read may not be the one checked above.
      await servedAlone(d.qmp, shown);
      nbd = await NbdClient.connect(`nbd+unix:///disk?socket=${socket}`);
      return nbd;
    };
    const client = (): NbdClient => {
      if (!nbd) throw new Error(`internal: ${shown} is not being served`);
      return nbd;
    };
    try {
      if (create) await qemuImg(['create', '-q', '-f', 'qcow2', '/dev/fd/3', '0'], fh.fd, shown);
      else await this.#identityOf(fh);
      await serve();
    } catch (e) {
      await stop();
      // A copy this run made and could not make a qcow2 of goes again (left, the next run would refuse it as no qcow2).
      if (create) {
        const mine = await fh.stat({ bigint: true });
        const there = await this.dir.lstatOrUndefined(this.name).catch(() => undefined);
        if (there && there.ino === mine.ino && there.dev === mine.dev) await this.dir.unlink(this.name).catch(() => {});
      }
      await fh.close();
      throw e;
    }
    const close = async (): Promise<void> => {
      await stop();
      await fh.close().catch(() => {});
    };
    return {
      sink: {
        write: (offset, data) => client().write(offset, data),
        writeZeroes: (offset, length) => client().writeZeroes(offset, length),
        // The virtual size changes with QEMU's own resize, the daemon stopped (an NBD export's size is fixed).
        truncate: async (size) => {
          const shrink = size < Number(client().size);
          await stop();
          // qemu-img reads the header again: it must still be one qsync writes alone (no data file for it to open and resize).
          await this.#identityOf(fh);
          await qemuImg(['resize', '-q', '-f', 'qcow2', ...(shrink ? ['--shrink'] : []), '/dev/fd/3', String(size)], fh.fd, shown);
          await serve();
        },
        commit: async () => {
          await client().flush();
        },
        close: async () => {},
      },
      reader: { readAt: (buf, offset) => client().readAt(buf, offset) },
      // The daemon closes the image cleanly (its metadata written and flushed); only then is the file's identity taken.
      finish: async () => {
        await stop();
        await fh.datasync();
        return this.#identityOf(fh);
      },
      close,
    };
  }
}

/**
 * The daemon behind `qmp` holds only the copy itself: its file node `f` and
 * the qcow2 node `q`, with no data file and no backing. The header was
 * checked through qsync's descriptor, but QEMU reads it again when it opens
 * the file; one changed in between (a data file naming any path, opened by
 * QEMU as the user qsync runs as) is found here, before any I/O through the
 * export, and the copy is left alone.
 */
export async function servedAlone(qmp: string, shown: string): Promise<void> {
  const c = await QmpClient.connect(qmp);
  let nodes: { 'node-name': string; file?: string; image?: { 'backing-filename'?: string; 'format-specific'?: { data?: Record<string, unknown> } } }[];
  try {
    nodes = await c.execute('query-named-block-nodes');
  } finally {
    await c.close();
  }
  const others = nodes.filter((n) => n['node-name'] !== 'f' && n['node-name'] !== 'q').map((n) => n.file ?? n['node-name']);
  const q = nodes.find((n) => n['node-name'] === 'q');
  const dataFile = q?.image?.['format-specific']?.data?.['data-file'];
  if (others.length || dataFile !== undefined || q?.image?.['backing-filename'] !== undefined) {
    throw new QsyncError('TARGET', `${shown} names other files QEMU opened (${[...others, dataFile].filter(Boolean).join(', ')}); left alone`, {
      file: shown, hint: 'its header changed while qsync opened it: move it away (qsync then writes a new qcow2 there)',
    });
  }
}

/** `qemu-img ARGS` with `fd` as its fd 3 (`/dev/fd/3` in ARGS). */
function qemuImg(args: string[], fd: number, shown: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn('qemu-img', args, { stdio: ['ignore', 'ignore', 'pipe', fd] });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', (e) => reject(new QsyncError('TARGET', `cannot run qemu-img for ${shown}: ${errnoText(e)}`, { file: shown, hint: errnoOf(e) === 'ENOENT' ? QEMU_TOOLS : undefined }, { cause: e })));
    child.on('exit', (code) => {
      if (code === 0) resolve();
      else reject(new QsyncError('TARGET', `qemu-img ${args[0]} ${shown}: ${stderr.trim() || `exit ${code}`}`, { file: shown }));
    });
  });
}
