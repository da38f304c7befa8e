/**
 * Applying a delta (`qsync apply`, `--read-batch`). Pass 1 reads the whole
 * delta and checks everything; then every member's target is checked against
 * the delta's base (size and manifest fingerprint: from the target's trusted
 * manifest, else by hashing the target); only then pass 2 writes. An apply
 * intent beside the manifest makes a crashed apply resumable: re-applying
 * rewrites every record, which gives the same bytes however far it got.
 * Afterwards the target gets a new manifest whose fingerprint must equal the
 * delta's result fingerprint.
 */
import { constants, type BigIntStats } from 'node:fs';
import { open, stat, type FileHandle } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, normalize, sep } from 'node:path';
import type { DeltaHeader } from '../core/delta-codec.js';
import { errnoOf, QsyncError } from '../core/errors.js';
import { blockCount, blockLength } from '../core/geometry.js';
import { digestOf } from '../hash/blake3.js';
import { openDelta, readDeltaFile, summarize, writeAll, type DeltaMemberSummary } from '../io/delta-file.js';
import { intentPathFor, readIntent } from './intent.js';
import { lockDestination } from './lock.js';
import { fsyncDir } from '../io/fsync-dir.js';
import { emptyFingerprint, manifestPathFor, ManifestWriter, openManifest, STATE_DIR } from './manifest-store.js';
import { DigestScratch, hashFile } from './target-digests.js';
import { readStateFile, removeStatePath, withStateParent, writeStateFile } from './state-dir.js';
import { assessManifest } from './trust.js';

const APPLY_MAGIC = 'QSYNCAPI';
const ZEROES = Buffer.alloc(1 << 20);

export type MemberStatus = 'applied' | 'resumed' | 'already';

export interface AppliedMember {
  name: string;
  target: string;
  status: MemberStatus;
  records: number;
}

export interface ApplyHooks {
  notice?(message: string, target?: string): void;
}

interface MemberPlan {
  summary: DeltaMemberSummary;
  target: string;
  manifestPath: string;
  status: MemberStatus;
  /** Base digests already in the scratch file (hashed during the base check). */
  scratch?: DigestScratch;
}

/** Where each member goes: a single delta to `target`; a batch into the directory `target`. */
async function targetsFor(members: DeltaMemberSummary[], target: string): Promise<{ root: string; rel: string }[]> {
  const isDir = await stat(target).then((s) => s.isDirectory(), () => false);
  if (!isDir) {
    if (members.length !== 1) {
      throw new QsyncError('USAGE', `the delta holds ${members.length} files: give a directory to apply it to`, { file: target });
    }
    return [{ root: dirname(target), rel: basename(target) }];
  }
  return members.map(({ header }) => {
    const rel = normalize(header.name);
    if (!header.name || isAbsolute(rel) || rel === '..' || rel.startsWith(`..${sep}`) || rel.split(sep)[0] === STATE_DIR) {
      throw new QsyncError('FORMAT', `delta member name ${JSON.stringify(header.name)} is not a path inside the target directory`, { file: target });
    }
    return { root: target, rel };
  });
}

const applyIntentPath = (manifestPath: string) => `${manifestPath}.apply`;
const scratchPath = (manifestPath: string) => `${manifestPath}.apply-digests`;

async function readApplyIntent(path: string): Promise<Buffer | undefined> {
  const r = await withStateParent(path, false, (sp) => readStateFile(sp.dir, sp.name, 40));
  const b = r?.data;
  return b && r.size === 40 && b.toString('latin1', 0, 8) === APPLY_MAGIC ? b.subarray(8) : undefined;
}

/** Decide what to do with one member without writing to its target. */
async function plan(summary: DeltaMemberSummary, target: string, manifestPath: string): Promise<MemberPlan> {
  const h = summary.header;
  if ((await readApplyIntent(applyIntentPath(manifestPath)))?.equals(summary.streamHash)) {
    return { summary, target, manifestPath, status: 'resumed' };
  }
  const st = await stat(target, { bigint: true }).catch((e) => {
    if (errnoOf(e) === 'ENOENT') return undefined;
    throw new QsyncError('TARGET', `cannot stat ${target}: ${(e as Error).message}`, { file: target }, { cause: e });
  });
  if (st && !st.isFile()) throw new QsyncError('TARGET', `${target} is not a regular file`, { file: target });
  const size = st ? Number(st.size) : 0;
  const { fingerprint, scratch } = st
    ? await targetFingerprint(target, st, manifestPath, h)
    : { fingerprint: emptyFingerprint(h.blockSize), scratch: await DigestScratch.open(scratchPath(manifestPath)) };
  if (st && size === h.resultSize && fingerprint.equals(h.resultFingerprint)) {
    await scratch.close(true);
    return { summary, target, manifestPath, status: 'already' };
  }
  if (size !== h.baseSize || !fingerprint.equals(h.baseFingerprint)) {
    await scratch.close(true);
    const what =
      size !== h.baseSize
        ? `its size is ${size}, the delta's base is ${h.baseSize} bytes`
        : h.baseFingerprint.every((b) => b === 0)
          ? 'the delta does not record its base\'s fingerprint'
          : 'its content differs from the delta\'s base (fingerprint mismatch)';
    throw new QsyncError('BASE_MISMATCH', `${target} is not the base this delta was made for: ${what}; nothing was written`, {
      file: target,
      hint: 'apply the deltas in the order they were made, to the copy they were made from',
    });
  }
  return { summary, target, manifestPath, status: 'applied', scratch };
}

/** The target's fingerprint: its manifest's when trusted, else by hashing it (base digests kept in the scratch file). */
async function targetFingerprint(target: string, st: BigIntStats, manifestPath: string, h: DeltaHeader): Promise<{ fingerprint: Buffer; scratch: DigestScratch }> {
  const scratch = await DigestScratch.open(scratchPath(manifestPath));
  const manifest = await openManifest(manifestPath).catch(() => undefined);
  try {
    const trust = assessManifest(manifest, await readIntent(intentPathFor(manifestPath)), st, h.blockSize);
    if (manifest && trust.trusted && !trust.unknown) {
      await scratch.fillFromManifest(manifest);
      return { fingerprint: manifest.fingerprint, scratch };
    }
    const fh = await open(target, 'r');
    try {
      return { fingerprint: await hashFile(fh, Number(st.size), h.blockSize, (first, d) => scratch.set(first, d)), scratch };
    } finally {
      await fh.close();
    }
  } catch (e) {
    await scratch.close(true);
    throw e;
  } finally {
    await manifest?.close();
  }
}

/**
 * Apply the delta file `deltaPath` to `target` (a file, or for a batch of
 * several files, a directory). Throws QsyncError FORMAT (the delta is bad:
 * nothing written), BASE_MISMATCH (a target is not the delta's base: nothing
 * written), or an I/O error (rerun to finish).
 */
export async function applyDelta(deltaPath: string, target: string, hooks: ApplyHooks = {}): Promise<AppliedMember[]> {
  const fh = await openDelta(deltaPath);
  try {
    const members = await summarize(fh, deltaPath);
    const places = await targetsFor(members, target);
    const locks = new Map<string, Awaited<ReturnType<typeof lockDestination>>>();
    try {
      for (const { root } of places) if (!locks.has(root)) locks.set(root, await lockDestination(join(root, STATE_DIR)));
      const plans: MemberPlan[] = [];
      try {
        for (const [i, m] of members.entries()) {
          const { root, rel } = places[i];
          plans.push(await plan(m, join(root, rel), manifestPathFor(root, rel)));
        }
      } catch (e) {
        for (const p of plans) await p.scratch?.close(true);
        throw e;
      }
      await writeMembers(fh, deltaPath, plans, hooks);
      return plans.map((p) => ({ name: p.summary.header.name, target: p.target, status: p.status, records: p.summary.records }));
    } finally {
      for (const l of locks.values()) await l.release();
    }
  } finally {
    await fh.close();
  }
}

/** Pass 2: one read of the delta, each member written to its target. */
async function writeMembers(fh: FileHandle, deltaPath: string, plans: MemberPlan[], hooks: ApplyHooks): Promise<void> {
  let member = -1;
  let cur: MemberWrite | undefined;
  for await (const ev of readDeltaFile(fh, deltaPath)) {
    if (ev.type === 'header') {
      const p = plans[++member];
      if (p.status === 'already') hooks.notice?.('already up to date with this delta', p.target);
      else cur = await MemberWrite.begin(p, hooks);
    } else if (ev.type === 'record' && cur) {
      await cur.record(ev.record.index, ev.content, ev.record.digest);
    } else if (ev.type === 'trailer' && cur) {
      await cur.finish();
      cur = undefined;
    }
  }
}

class MemberWrite {
  private constructor(
    private readonly p: MemberPlan,
    private readonly h: DeltaHeader,
    private readonly target: FileHandle,
    private readonly scratch: DigestScratch,
  ) {}

  static async begin(p: MemberPlan, hooks: ApplyHooks): Promise<MemberWrite> {
    const h = p.summary.header;
    const intent = applyIntentPath(p.manifestPath);
    let scratch = p.scratch;
    if (p.status === 'resumed') {
      hooks.notice?.('finishing an interrupted apply of this delta', p.target);
      scratch = await DigestScratch.open(scratchPath(p.manifestPath));
    } else {
      // From here on the old manifest would lie: the intent and the scratch digests replace it.
      await scratch!.sync();
      await withStateParent(intent, true, (sp) => writeStateFile(sp.dir, sp.name, Buffer.concat([Buffer.from(APPLY_MAGIC, 'latin1'), p.summary.streamHash])));
      await removeStatePath(p.manifestPath);
      await fsyncDir(dirname(p.manifestPath));
    }
    const target = await open(p.target, constants.O_RDWR | constants.O_CREAT).catch((e) => {
      throw new QsyncError('TARGET', `cannot write ${p.target}: ${(e as Error).message}`, { file: p.target }, { cause: e });
    });
    await target.truncate(h.resultSize);
    await scratch!.fillZeros(blockCount(h.baseSize, h.blockSize), h.resultSize, h.blockSize);
    return new MemberWrite(p, h, target, scratch!);
  }

  async record(index: number, content: Buffer | undefined, digest: Buffer): Promise<void> {
    const off = index * this.h.blockSize;
    const len = blockLength(index, this.h.resultSize, this.h.blockSize);
    if (content) await writeAll(this.target, content, off);
    else for (let done = 0; done < len; done += ZEROES.length) await writeAll(this.target, ZEROES.subarray(0, Math.min(ZEROES.length, len - done)), off + done);
    await this.scratch.set(index, digest);
  }

  async finish(): Promise<void> {
    const { h, p } = this;
    // The block that straddles the old end changed length: its digest is the target's.
    const edge = Math.floor(Math.min(h.baseSize, h.resultSize) / h.blockSize);
    if (edge < blockCount(h.resultSize, h.blockSize)) {
      const len = blockLength(edge, h.resultSize, h.blockSize);
      const buf = Buffer.alloc(len);
      await this.target.read(buf, 0, len, edge * h.blockSize);
      await this.scratch.set(edge, digestOf(buf));
    }
    await this.target.sync();
    await this.target.close();
    // One pass over the scratch digests: the new manifest's fingerprint is the check.
    const w = await ManifestWriter.create(p.manifestPath, h.blockSize, h.resultSize);
    await this.scratch.writeTo(w, h.blockSize, h.resultSize);
    if (!w.fingerprint.equals(h.resultFingerprint)) {
      await w.abort();
      await this.scratch.close();
      throw new QsyncError('IO', `${p.target} does not match the delta's result after applying it (changed while applying?)`, {
        file: p.target,
        hint: 'run the apply again; if it fails again, the target was not the delta\'s base',
      });
    }
    const st = await stat(p.target, { bigint: true });
    await w.commit({ sourceSize: h.resultSize, sourceMtimeNs: 0n, targetMtimeNs: st.mtimeNs, targetIno: st.ino, targetDev: st.dev });
    await removeStatePath(applyIntentPath(p.manifestPath));
    await this.scratch.close(true);
  }
}
