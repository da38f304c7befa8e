/**
 * Applying a delta (`qsync apply`, `--read-batch`). Pass 1 reads the whole
 * delta and checks everything; then every member's target is checked against
 * the delta's base (size and manifest fingerprint: from the target's trusted
 * manifest, else by hashing the target), and the result's digests are made
 * from the base's with the records' substituted: their fingerprint must be
 * the delta's result fingerprint. Only then pass 2 writes. An apply intent
 * beside the manifest (with the target's identity) makes a crashed apply
 * resumable: re-applying rewrites every record, which gives the same bytes
 * however far it got. Targets are reached from the target directory by
 * descriptor, never through a symlink.
 */
import { constants, type BigIntStats } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, normalize, sep } from 'node:path';
import type { DeltaHeader } from '../core/delta-codec.js';
import { errnoOf, QsyncError } from '../core/errors.js';
import { blockCount, blockLength } from '../core/geometry.js';
import { digestOf } from '../hash/blake3.js';
import { MemberPatch, openDelta, readDeltaFile, summarize, type DeltaMemberSummary } from '../io/delta-file.js';
import { fsyncDir } from '../io/fsync-dir.js';
import { LocalFileSink, readUpTo } from '../io/local-file.js';
import { Dir } from '../io/safe-fs.js';
import { lockDestination } from './lock.js';
import { emptyFingerprint, manifestPathFor } from './manifest-store.js';
import { commitTarget, fileData, LocalTargetState, type Assessment, type TargetIdentity } from './target.js';
import { DigestScratch, hashFile } from './target-digests.js';
import { readStateFile, removeStatePath, withStateParent, writeStateFile } from './state-dir.js';

const APPLY_MAGIC = 'QSYNCAPI';
/** Magic, member stream hash, target device and inode, check (first 16 bytes of BLAKE3 of the rest). */
const APPLY_INTENT_LEN = 8 + 32 + 8 + 8 + 16;
/** A target apply creates holds raw blocks of someone's file: owner-only. */
const NEW_TARGET_MODE = 0o600;

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

interface Identity {
  dev: bigint;
  ino: bigint;
}

interface MemberPlan {
  summary: DeltaMemberSummary;
  root: string;
  rel: string;
  /** For messages. */
  target: string;
  manifestPath: string;
  status: MemberStatus;
  /** The target's identity when planned (undefined: it does not exist yet, apply creates it). */
  ident?: Identity;
  /** Base digests, then (after precheck) the result's. */
  scratch?: DigestScratch;
  /** The apply intent is written: the scratch file belongs to it now. */
  begun?: boolean;
}

/** Where each member goes: a single delta to `target`; a batch into the directory `target`. */
async function targetsFor(members: DeltaMemberSummary[], target: string): Promise<{ root: string; rel: string }[]> {
  const isDir = await Dir.open(target).then(
    (d) => d.close().then(() => true),
    () => false,
  );
  if (!isDir) {
    if (members.length !== 1) {
      throw new QsyncError('USAGE', `the delta holds ${members.length} files: give a directory to apply it to`, { file: target });
    }
    return [{ root: dirname(target), rel: basename(target) }];
  }
  const seen = new Set<string>();
  return members.map(({ header }) => {
    const rel = normalize(header.name).replace(/(.)\/+$/, '$1');
    if (!header.name || isAbsolute(rel) || rel === '.' || rel === '..' || rel.startsWith(`..${sep}`)) {
      throw new QsyncError('FORMAT', `delta member name ${JSON.stringify(header.name)} is not a path inside the target directory`, { file: target });
    }
    if (seen.has(rel)) throw new QsyncError('FORMAT', `delta member ${JSON.stringify(header.name)} appears twice`, { file: target });
    seen.add(rel);
    return { root: target, rel };
  });
}

/**
 * Open `rel` below `root`, walking every directory by descriptor: no
 * component below `root` may be a symlink, and the file itself must be a
 * regular file. Undefined when it does not exist (unless `create`: then it
 * is created, never over an existing name).
 */
async function openTarget(root: string, rel: string, how: 'read' | 'write' | 'create'): Promise<FileHandle | undefined> {
  const shown = join(root, rel);
  let top: Dir | undefined;
  let parent: Dir | undefined;
  try {
    top = await Dir.open(root);
    parent = how === 'create' ? await makeBeneath(top, dirname(rel)) : await top.openBeneath(dirname(rel));
    const name = basename(rel);
    if (how === 'create') return await parent.createFile(name, NEW_TARGET_MODE);
    return await parent.openFile(name, how === 'read' ? constants.O_RDONLY : constants.O_RDWR);
  } catch (e) {
    // A missing folder on the way: the target does not exist either.
    if (errnoOf(e) === 'ENOENT' && how !== 'create') return undefined;
    if (e instanceof QsyncError) throw e;
    const why = ['ELOOP', 'ENOTDIR'].includes(errnoOf(e) ?? '')
      ? `a folder on the way to it below ${root} is a symlink or not a folder (qsync does not follow symlinks inside the target directory)`
      : (e as Error).message;
    throw new QsyncError('TARGET', `cannot open ${shown}: ${why}`, { file: shown }, { cause: e });
  } finally {
    await parent?.close();
    await top?.close();
  }
}

/**
 * Open `rel` below `top`, creating the folders that are missing (0700: a
 * delta carries no folder metadata), each by descriptor: a new file in a new
 * folder, as the sync that made the batch created it. A symlink on the way
 * is refused as in openBeneath.
 */
async function makeBeneath(top: Dir, rel: string): Promise<Dir> {
  let d = await top.dup();
  for (const p of rel.split('/').filter((x) => x && x !== '.')) {
    try {
      const next = await d.openDir(p).catch(async (e) => {
        if (errnoOf(e) !== 'ENOENT') throw e;
        await d.mkdir(p, 0o700).catch((e2) => {
          if (errnoOf(e2) !== 'EEXIST') throw e2;
        });
        return d.openDir(p);
      });
      await d.close();
      d = next;
    } catch (e) {
      await d.close();
      throw e;
    }
  }
  return d;
}

const applyIntentPath = (manifestPath: string) => `${manifestPath}.apply`;
const scratchPath = (manifestPath: string) => `${manifestPath}.apply-digests`;

function encodeApplyIntent(streamHash: Buffer, id: Identity): Buffer {
  const b = Buffer.alloc(APPLY_INTENT_LEN);
  b.write(APPLY_MAGIC, 0, 'latin1');
  streamHash.copy(b, 8);
  b.writeBigUInt64LE(id.dev, 40);
  b.writeBigUInt64LE(id.ino, 48);
  digestOf(b.subarray(0, 56)).copy(b, 56, 0, 16);
  return b;
}

async function readApplyIntent(path: string): Promise<{ streamHash: Buffer; ident: Identity } | undefined> {
  const r = await withStateParent(path, false, (sp) => readStateFile(sp.dir, sp.name, APPLY_INTENT_LEN));
  const b = r?.data;
  if (!b || r.size !== APPLY_INTENT_LEN || b.toString('latin1', 0, 8) !== APPLY_MAGIC) return undefined;
  if (!digestOf(b.subarray(0, 56)).subarray(0, 16).equals(b.subarray(56))) return undefined;
  return { streamHash: b.subarray(8, 40), ident: { dev: b.readBigUInt64LE(40), ino: b.readBigUInt64LE(48) } };
}

const sameIdentity = (a: Identity, b: Identity) => a.dev === b.dev && a.ino === b.ino;

/** Decide what to do with one member without writing to its target. */
async function plan(summary: DeltaMemberSummary, root: string, rel: string, manifestPath: string): Promise<MemberPlan> {
  const h = summary.header;
  const target = join(root, rel);
  const base = { summary, root, rel, target, manifestPath };
  const intent = await readApplyIntent(applyIntentPath(manifestPath));
  if (intent?.streamHash.equals(summary.streamHash)) {
    const resumed = await planResume(base, intent.ident);
    if (resumed) return resumed;
  }
  const fh = await openTarget(root, rel, 'read');
  try {
    const st = fh ? await fh.stat({ bigint: true }) : undefined;
    const size = st ? Number(st.size) : 0;
    const ident = st && { dev: st.dev, ino: st.ino };
    if (size !== h.baseSize && size !== h.resultSize) throw notBase(target, `its size is ${size}, the delta's base is ${h.baseSize} bytes`);
    const scratch = await DigestScratch.open(scratchPath(manifestPath));
    try {
      const fingerprint = fh ? await targetFingerprint(fh, manifestPath, h.blockSize, scratch) : emptyFingerprint(h.blockSize);
      if (fh && size === h.resultSize && fingerprint.equals(h.resultFingerprint)) {
        await scratch.close(true);
        return { ...base, status: 'already', ident };
      }
      if (st) refuseLinked(st, target);
      if (size !== h.baseSize || !fingerprint.equals(h.baseFingerprint)) {
        throw notBase(
          target,
          size !== h.baseSize
            ? `its size is ${size}, the delta's base is ${h.baseSize} bytes`
            : h.baseFingerprint.every((b) => b === 0)
              ? "the delta does not record its base's fingerprint"
              : "its content differs from the delta's base (fingerprint mismatch)",
        );
      }
      return { ...base, status: 'applied', ident, scratch };
    } catch (e) {
      await scratch.close(true);
      throw e;
    }
  } finally {
    await fh?.close();
  }
}

/**
 * Apply updates a target in place: a target with other hard links (a
 * `cp -al` snapshot, or a link a user planted to another file) would change
 * under every name. It is refused, never written through.
 */
function refuseLinked(st: BigIntStats, target: string): void {
  if (st.nlink <= 1n) return;
  throw new QsyncError('TARGET', `${target} has ${st.nlink} hard links: apply writes a target in place and would change the other names too; nothing was written to it`, {
    file: target,
    hint: `give ${target} a copy of its own (cp -p F F.new && mv F.new F), then apply again`,
  });
}

function notBase(target: string, what: string): QsyncError {
  return new QsyncError('BASE_MISMATCH', `${target} is not the base this delta was made for: ${what}; nothing was written`, {
    file: target,
    hint: 'apply the deltas in the order they were made, to the copy they were made from',
  });
}

/**
 * An interrupted apply of this very delta: resume only if the target is the
 * file that apply was writing (same device and inode) and nothing synced it
 * since. Apply removes the manifest before its first write, so a trusted
 * manifest now is either the base's (nothing was written: plan afresh,
 * undefined), this apply's own (committed just before the crash: done), or
 * another run's (refused).
 */
async function planResume(base: Omit<MemberPlan, 'status'>, ident: Identity): Promise<MemberPlan | undefined> {
  const { target, manifestPath, summary } = base;
  const h = summary.header;
  const refuse = (what: string) =>
    new QsyncError('TARGET', `${target}: an interrupted apply of this delta cannot be resumed: ${what}; nothing was written`, {
      file: target,
      hint: `check ${target}; then remove ${applyIntentPath(manifestPath)} and ${scratchPath(manifestPath)}, and apply again to a copy of the delta's base`,
    });
  const fh = await openTarget(base.root, base.rel, 'read');
  if (!fh) throw refuse('the target no longer exists');
  try {
    const st = await fh.stat({ bigint: true });
    if (!sameIdentity(ident, st)) throw refuse('the target was replaced since (another file is at its path now)');
    const { manifest, trust } = await assessTolerant(manifestPath, st, h.blockSize);
    if (manifest) {
      try {
        const trusted = trust.trusted && !trust.unknown;
        if (trusted && manifest.fingerprint.equals(h.resultFingerprint) && Number(st.size) === h.resultSize) {
          await removeStatePath(applyIntentPath(manifestPath));
          await removeStatePath(scratchPath(manifestPath));
          return { ...base, status: 'already', ident };
        }
        if (trusted && manifest.fingerprint.equals(h.baseFingerprint) && Number(st.size) === h.baseSize) {
          await removeStatePath(applyIntentPath(manifestPath));
          return undefined;
        }
      } finally {
        await manifest.close();
      }
      throw refuse('the target was synced since (it has a new manifest)');
    }
  } finally {
    await fh.close();
  }
  return { ...base, status: 'resumed', ident, scratch: await DigestScratch.open(scratchPath(manifestPath)) };
}

/** The target's state judged as a sync judges it; a manifest that cannot be read at all counts as none (the target is hashed instead). */
const assessTolerant = (manifestPath: string, st: TargetIdentity, blockSize: number) =>
  new LocalTargetState(manifestPath).assess(st, { blockSize }).catch((): Assessment => ({ manifest: undefined, trust: { trusted: false } }));

/** The target's fingerprint: its manifest's when trusted, else by hashing it; its digests go to the scratch file. */
async function targetFingerprint(fh: FileHandle, manifestPath: string, blockSize: number, scratch: DigestScratch): Promise<Buffer> {
  const st = await fh.stat({ bigint: true });
  const { manifest, trust } = await assessTolerant(manifestPath, st, blockSize);
  try {
    if (manifest && trust.trusted && !trust.unknown) {
      await scratch.fillFromManifest(manifest);
      return manifest.fingerprint;
    }
    return await hashFile(fh, Number(st.size), blockSize, (first, d) => scratch.set(first, d));
  } finally {
    await manifest?.close();
  }
}

/**
 * Before anything is written: turn each planned member's base digests into
 * its result's (the resize, then every record's digest, later records
 * winning) and require their fingerprint to be the delta's result
 * fingerprint. A delta whose records do not give its result is refused here.
 */
async function precheck(fh: FileHandle, deltaPath: string, plans: MemberPlan[]): Promise<void> {
  let member = -1;
  let p: MemberPlan | undefined;
  let edgeRecorded = false;
  for await (const ev of readDeltaFile(fh, deltaPath, { payloads: false })) {
    if (ev.type === 'header') {
      p = plans[++member].status === 'applied' ? plans[member] : undefined;
      edgeRecorded = false;
      if (p) await resizeDigests(p);
    } else if (ev.type === 'record' && p) {
      if (ev.record.index === edgeBlock(ev.header)) edgeRecorded = true;
      await p.scratch!.set(ev.record.index, ev.record.digest);
    } else if (ev.type === 'trailer' && p) {
      const h = ev.header;
      const edge = edgeBlock(h);
      if (edge !== undefined && !edgeRecorded) await p.scratch!.set(edge, await edgeDigest(p, h, edge));
      const fp = await p.scratch!.fingerprint(h.blockSize, h.resultSize);
      if (!fp.equals(h.resultFingerprint)) {
        throw new QsyncError('FORMAT', `invalid delta ${deltaPath}: the records for ${p.target} do not give the result the delta names (result fingerprint mismatch); nothing was written`, {
          file: deltaPath,
          hint: 'the delta is forged or was made wrongly: make it again',
        });
      }
      await p.scratch!.sync();
    }
  }
}

/** The block that straddles the old end when the size changes and the end is not on a block boundary: base bytes, then zeros or cut. */
function edgeBlock(h: DeltaHeader): number | undefined {
  const min = Math.min(h.baseSize, h.resultSize);
  if (h.baseSize === h.resultSize || min % h.blockSize === 0) return undefined;
  return Math.floor(min / h.blockSize);
}

/** The area the resize adds reads as zeros. */
async function resizeDigests(p: MemberPlan): Promise<void> {
  const h = p.summary.header;
  await p.scratch!.fillZeros(blockCount(h.baseSize, h.blockSize), h.resultSize, h.blockSize);
}

/** Digest of the edge block after the resize: the target's bytes up to the smaller size, zeros after. */
async function edgeDigest(p: MemberPlan, h: DeltaHeader, edge: number): Promise<Buffer> {
  const buf = Buffer.alloc(blockLength(edge, h.resultSize, h.blockSize));
  const keep = Math.min(h.baseSize, h.resultSize) - edge * h.blockSize;
  const fh = await openTarget(p.root, p.rel, 'read');
  if (!fh) throw new QsyncError('TARGET', `${p.target} disappeared while qsync checked it`, { file: p.target });
  try {
    if (!p.ident || !sameIdentity(p.ident, await fh.stat({ bigint: true }))) throw changedWhile(p.target);
    if ((await readUpTo(fh, buf.subarray(0, keep), edge * h.blockSize)) !== keep) throw changedWhile(p.target);
  } finally {
    await fh.close();
  }
  return digestOf(buf);
}

const changedWhile = (target: string) =>
  new QsyncError('TARGET', `${target} changed while qsync applied a delta to it; nothing more was written`, { file: target, hint: 'run the apply again' });

/**
 * Apply the delta file `deltaPath` to `target` (a file, or for a batch of
 * several files, a directory). Throws QsyncError FORMAT (the delta is bad:
 * nothing written), BASE_MISMATCH (a target is not the delta's base: nothing
 * written), TARGET (a target cannot be reached safely, or an interrupted
 * apply cannot be resumed), or an I/O error (rerun to finish).
 */
export async function applyDelta(deltaPath: string, target: string, hooks: ApplyHooks = {}): Promise<AppliedMember[]> {
  const fh = await openDelta(deltaPath);
  try {
    const members = await summarize(fh, deltaPath);
    const places = await targetsFor(members, target);
    const locks = new Map<string, Awaited<ReturnType<typeof lockDestination>>>();
    try {
      for (const { root } of places) {
        if (locks.has(root)) continue;
        // The lock walks to the state folder by the state-dir rules: a symlinked or foreign one is refused there.
        locks.set(root, await lockDestination(root));
      }
      const plans: MemberPlan[] = [];
      try {
        for (const [i, m] of members.entries()) {
          const { root, rel } = places[i];
          plans.push(await plan(m, root, rel, manifestPathFor(root, rel)));
        }
        await precheck(fh, deltaPath, plans);
      } catch (e) {
        for (const p of plans) if (p.status === 'applied') await p.scratch?.close(true);
        for (const p of plans) if (p.status === 'resumed') await p.scratch?.close();
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
  try {
    for await (const ev of readDeltaFile(fh, deltaPath)) {
      if (ev.type === 'header') {
        const p = plans[++member];
        if (p.status === 'already') hooks.notice?.('already up to date with this delta', p.target);
        else cur = await MemberWrite.begin(p, hooks);
      } else if (ev.type === 'record' && cur) {
        await cur.patch.write(ev.record.index, ev.content);
      } else if (ev.type === 'trailer' && cur) {
        if (!ev.trailer.streamHash.equals(plans[member].summary.streamHash)) {
          throw new QsyncError('FORMAT', `${deltaPath} changed while it was being applied`, { file: deltaPath, hint: 'apply the original delta again to finish' });
        }
        await cur.finish();
        cur = undefined;
      }
    }
  } finally {
    await cur?.close();
    // Members not begun (no apply intent) leave nothing behind; begun ones keep their scratch for the rerun.
    for (const p of plans) await p.scratch?.close(p.status === 'applied' && !p.begun);
  }
}

class MemberWrite {
  private constructor(
    private readonly p: MemberPlan,
    private readonly target: FileHandle,
    readonly patch: MemberPatch,
  ) {}

  static async begin(p: MemberPlan, hooks: ApplyHooks): Promise<MemberWrite> {
    const h = p.summary.header;
    if (p.status === 'resumed') hooks.notice?.('finishing an interrupted apply of this delta', p.target);
    const target = await openTarget(p.root, p.rel, p.ident ? 'write' : 'create');
    if (!target) throw changedWhile(p.target);
    try {
      const st = await target.stat({ bigint: true });
      if (p.ident && !sameIdentity(p.ident, st)) throw changedWhile(p.target);
      refuseLinked(st, p.target);
      if (p.status !== 'resumed') {
        // From here on the old manifest would lie: the intent and the scratch digests replace it.
        await p.scratch!.sync();
        const intent = encodeApplyIntent(p.summary.streamHash, st);
        await withStateParent(applyIntentPath(p.manifestPath), true, (sp) => writeStateFile(sp.dir, sp.name, intent));
        p.begun = true;
        await new LocalTargetState(p.manifestPath).forget();
        await fsyncDir(dirname(p.manifestPath));
      }
      await target.truncate(h.resultSize);
      return new MemberWrite(p, target, new MemberPatch(target, h, blockCount(h.baseSize, h.blockSize)));
    } catch (e) {
      await target.close();
      throw e;
    }
  }

  /** The records are written: make them durable, then the manifest (made before from the result digests). */
  async finish(): Promise<void> {
    const { p } = this;
    const h = p.summary.header;
    const w = await new LocalTargetState(p.manifestPath).begin({ blockSize: h.blockSize, oldSize: h.baseSize, newSize: h.resultSize });
    await p.scratch!.writeTo(w, h.blockSize, h.resultSize);
    if (!w.fingerprint.equals(h.resultFingerprint)) {
      await w.abort();
      throw new QsyncError('IO', `${p.target}: the result digests kept in ${scratchPath(p.manifestPath)} are damaged`, {
        file: p.target,
        hint: 'run the apply again',
      });
    }
    // The one commit sequence (src/sync/target.ts): the records durable, then the manifest naming this inode.
    const data = LocalFileSink.of(this.target, p.target);
    await commitTarget(fileData(data), data, w, { size: h.resultSize, mtimeNs: 0n }).catch(async (e) => {
      await w.abort();
      throw e;
    });
    await removeStatePath(applyIntentPath(p.manifestPath));
    await p.scratch!.close(true);
    p.scratch = undefined;
    await this.close();
  }

  async close(): Promise<void> {
    await this.target.close().catch(() => undefined);
  }
}
