/**
 * `--write-batch` / `--only-write-batch` over a push (docs/FORMATS.md "Batch
 * over a push"): the batch is written where the user ran qsync, as rsync
 * writes it, from the blocks that side sends; the receiving server says
 * which file each member is for and, once the target's data is durable,
 * the fingerprints it vouches for. No block crosses the wire twice.
 *
 * - `RelayToClient` (the server): a member per file the engine writes
 *   (`b-begin`), ended after the target's commit (`b-end`) or dropped when
 *   the file failed (`b-drop`), and at the end of the run whether the batch
 *   is kept (`b-finish`), as a local run keeps it only when no file failed.
 * - `BatchRecorder` (the client): records each DATA and ZERO frame the scan
 *   sends while a member is open (src/remote/serve-sources.ts), as the
 *   engine on the far side writes it.
 */
import { MAX_NAME_LEN } from '../core/delta-codec.js';
import { fieldDigest, fieldInt, fieldString, protocolError, type ControlMessage } from '../core/wire.js';
import { DIGEST_LEN } from '../hash/blake3.js';
import type { DeltaFileWriter } from '../io/delta-file.js';
import { isRelPath } from '../io/safe-fs.js';
import type { BlockSink } from '../io/types.js';
import { ForwardRecorder, type DeltaSinkInfo } from '../sync/delta-sinks.js';
import type { BatchRelay } from '../sync/run-deltas.js';
import type { Channel } from './channel.js';

const bad = protocolError;

/** The receiving server's half: tells the client what each member is. */
export class RelayToClient implements BatchRelay {
  constructor(
    private readonly ch: Channel,
    readonly recordOnly: boolean,
  ) {}

  wrap(target: BlockSink | undefined, info: DeltaSinkInfo): BlockSink {
    this.ch.write({ op: 'b-begin', name: info.relPath, blockSize: info.blockSize, baseSize: info.oldSize, resultSize: info.newSize });
    let ended = false;
    return {
      write: async (offset, data) => target?.write(offset, data),
      writeZeroes: async (offset, length) => target?.writeZeroes(offset, length),
      truncate: async (size) => target?.truncate(size),
      commit: async () => {
        await target?.commit();
        const { before, after } = info.fingerprints();
        this.ch.write({ op: 'b-end', base: before.toString('hex'), result: after.toString('hex') });
        ended = true;
      },
      close: async () => {
        if (!ended) this.ch.write({ op: 'b-drop' });
        ended = true;
        await target?.close();
      },
    };
  }

  async finish(keep: boolean): Promise<void> {
    this.ch.write({ op: 'b-finish', keep });
  }
}

const BATCH_OPS = new Set(['b-begin', 'b-end', 'b-drop', 'b-finish']);


/** The client's half: the batch file, written from what this side sends. */
export class BatchRecorder {
  private member?: { rec: ForwardRecorder; fps: { before: Buffer; after: Buffer } };
  private keep = false;
  /** What went wrong writing the batch (it is then dropped; the sync goes on). */
  failed?: Error;

  constructor(
    private readonly w: DeltaFileWriter,
    private readonly blockSize: number,
  ) {}

  /** A batch message from the server, handled (true), or not one (false). A malformed one ends the session. */
  async take(m: ControlMessage): Promise<boolean> {
    if (!BATCH_OPS.has(m.op)) return false;
    if (m.op === 'b-finish') {
      if (this.member) throw bad('"b-finish" inside a member');
      this.keep = m.keep === true;
      return true;
    }
    if (m.op === 'b-begin') {
      if (this.member) throw bad('"b-begin" before the last member ended');
      const name = fieldString(m, 'name');
      // The name of a file below the destination root, as a local batch names it (no empty, '.' or '..' component).
      if (Buffer.byteLength(name) > MAX_NAME_LEN || !isRelPath(name)) throw bad(`a member named ${JSON.stringify(name)}`);
      if (fieldInt(m, 'blockSize', 1) !== this.blockSize) throw bad('a member of another block size than the session\'s');
      const baseSize = fieldInt(m, 'baseSize');
      const resultSize = fieldInt(m, 'resultSize');
      const fps = { before: Buffer.alloc(DIGEST_LEN), after: Buffer.alloc(DIGEST_LEN) };
      const info: DeltaSinkInfo = { relPath: name, blockSize: this.blockSize, oldSize: baseSize, newSize: resultSize, fingerprints: () => fps };
      await this.guard(async () => {
        this.member = { rec: new ForwardRecorder(this.w, info), fps };
      });
      return true;
    }
    const member = this.member;
    if (!member && !this.failed) throw bad(`"${m.op}" outside a member`);
    this.member = undefined;
    if (m.op === 'b-end') {
      member && Object.assign(member.fps, { before: fieldDigest(m, 'base', 'fingerprint'), after: fieldDigest(m, 'result', 'fingerprint') });
      await this.guard(async () => member?.rec.end());
    } else {
      await this.guard(async () => member?.rec.drop());
    }
    return true;
  }

  /** Blocks [offset, offset + data.length) as sent, into the open member (none: not recorded). */
  data(offset: number, data: Buffer): Promise<void> {
    return this.guard(async () => this.member?.rec.write(offset, data));
  }

  zero(offset: number, length: number): Promise<void> {
    return this.guard(async () => this.member?.rec.writeZeroes(offset, length));
  }

  /** Keep the batch if the server said so and nothing failed here; else drop it. Returns whether it was kept. */
  async close(ok: boolean): Promise<boolean> {
    if (ok && this.keep && !this.member && !this.failed) {
      try {
        await this.w.finish();
        return true;
      } catch (e) {
        this.failed = e as Error;
      }
    }
    await this.w.abort();
    return false;
  }

  /** A failure to write the batch stops the recording, not the sync: the batch is dropped at the end and the run says why. */
  private async guard(fn: () => Promise<unknown>): Promise<void> {
    if (this.failed) return;
    try {
      await fn();
    } catch (e) {
      this.failed = e as Error;
      this.member = undefined;
    }
  }
}
