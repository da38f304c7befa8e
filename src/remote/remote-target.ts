/**
 * A destination on another host as the drivers' Target (src/sync/target.ts):
 * the near half of src/remote/serve-target.ts. The lock, the data, the
 * manifest, intent and note stay on the far side; this side asks for the
 * trust verdict, reads the manifest's digests (from its verified cache
 * keyed by the manifest's fingerprint, src/remote/digest-cache.ts, else sent
 * once), and streams the blocks it decided to write, each with its digest.
 * The commit sequence is the same one: data durable, in place, manifest,
 * intent gone, each step done by the far side in that order.
 *
 * One request is answered at a time, in order: a driver writes one target
 * at a time through one session.
 */
import { blockCount, isValidBlockSize } from '../core/geometry.js';
import { encodeData, fieldDigest, encodeDigests, encodeZero, protocolError, type ControlMessage } from '../core/wire.js';
import { DIGEST_LEN, digestOf, hashBlocksInto } from '../hash/blake3.js';
import type { BlockSink } from '../io/types.js';
import type { ManifestHeader } from '../core/manifest.js';
import type { Manifest } from '../sync/manifest-store.js';
import type { Assessment, AssessOptions, BeginOptions, Destination, OpenData, StateWriter, Target, TargetIdentity, TargetNote, TargetState } from '../sync/target.js';
import { Fingerprinter } from '../sync/manifest-store.js';
import { remoteError, type Channel } from './channel.js';
import { DigestCache } from './digest-cache.js';
import { MAX_TARGET_READ, noteFromWire } from './serve-target.js';

const bad = protocolError;

function big(v: unknown, what: string): bigint {
  if (typeof v !== 'string' || !/^-?\d{1,20}$/.test(v)) throw bad(`${what} is not a number`);
  return BigInt(v);
}

function idFromWire(v: unknown): TargetIdentity | undefined {
  if (v === null || v === undefined) return undefined;
  const o = v as Record<string, unknown>;
  return { size: big(o.size, 'size'), mtimeNs: big(o.mtimeNs, 'mtime'), ino: big(o.ino, 'inode'), dev: big(o.dev, 'device') };
}


const safe = (v: unknown, what: string): number => {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw bad(`${what} is not a size`);
  return v;
};

/** The far side's manifest: its header and fingerprint, its digests fetched once into the verified cache. */
class RemoteManifest implements Manifest {
  private digests?: Promise<{ readDigests(first: number, count: number, out: Uint8Array): Promise<void>; close(): Promise<void> }>;

  constructor(
    private readonly t: RemoteTarget,
    readonly path: string,
    readonly header: ManifestHeader,
    readonly fingerprint: Buffer,
    readonly checksum: Buffer,
  ) {}

  /** As a local manifest reads: blocks past its end are left as they are in `out` (a grown disk's run reads them). */
  readDigests(first: number, count: number, out: Uint8Array): Promise<void> {
    const avail = Math.min(count, blockCount(this.header.targetSize, this.header.blockSize) - first);
    if (avail <= 0) return Promise.resolve();
    this.digests ??= this.t.fetchDigests(this);
    this.digests.catch(() => {});
    return this.digests.then((d) => d.readDigests(first, avail, out));
  }

  async close(): Promise<void> {
    const d = await this.digests?.catch(() => undefined);
    await d?.close();
  }
}

class RemoteTarget implements Target {
  readonly state: TargetState;

  constructor(
    private readonly s: RemoteDestination,
    private readonly name: string,
    /** 'qcow2': the copy is a qcow2 the far side writes through its own QEMU (src/sync/qcow2-target.ts). */
    private readonly format?: 'qcow2',
  ) {
    const t = this;
    this.state = {
      assess: (data, o) => t.assess(data, o),
      begin: (o) => t.begin(o),
      forget: () => Promise.reject(new Error('internal: a remote target forgets its manifest through begin')),
    };
  }

  get shown(): string {
    return `${this.s.shown}/${this.name}`;
  }

  private ask(m: ControlMessage, reply: string): Promise<ControlMessage> {
    return this.s.ask({ ...m, ...this.s.names(this.name, this.format) }, reply);
  }

  async identity(): Promise<TargetIdentity | undefined> {
    return idFromWire((await this.ask({ op: 't-stat' }, 't-id')).id);
  }

  private async assess(_data: TargetIdentity | undefined, o: AssessOptions): Promise<Assessment> {
    // The far side judges against the data as it finds it, not as this side last saw it.
    const r = await this.ask({ op: 't-assess', blockSize: o.blockSize, strict: o.strict === true }, 't-assessed');
    const t = r.trust as Record<string, unknown>;
    if (typeof t !== 'object' || t === null || typeof t.trusted !== 'boolean' || (t.unknown !== undefined && !Array.isArray(t.unknown))) throw bad('a malformed verdict');
    const unknown = t.unknown === undefined ? undefined : new Set((t.unknown as unknown[]).map((b) => safe(b, 'a block')));
    const trust = {
      trusted: t.trusted,
      reason: typeof t.reason === 'string' ? t.reason : undefined,
      unknown,
      unknownFrom: t.unknownFrom === undefined ? undefined : safe(t.unknownFrom, 'a block'),
    };
    for (const k of ['reason', 'unknown', 'unknownFrom'] as const) if (trust[k] === undefined) delete trust[k];
    const m = r.manifest as Record<string, unknown> | undefined | null;
    if (m === undefined || m === null) return { manifest: undefined, trust };
    const h = m.header as Record<string, unknown> | undefined;
    if (typeof m !== 'object' || typeof h !== 'object' || h === null || !isValidBlockSize(h.blockSize as number)) throw bad('a malformed manifest header');
    const header: ManifestHeader = {
      blockSize: safe(h.blockSize, 'block size'),
      targetSize: safe(h.targetSize, 'target size'),
      sourceSize: safe(h.sourceSize, 'source size'),
      sourceMtimeNs: big(h.sourceMtimeNs, 'mtime'),
      targetMtimeNs: big(h.targetMtimeNs, 'mtime'),
      targetIno: big(h.targetIno, 'inode'),
      targetDev: big(h.targetDev, 'device'),
    };
    return { manifest: new RemoteManifest(this, this.shown, header, fieldDigest(m, 'fingerprint', 'fingerprint'), fieldDigest(m, 'checksum', 'checksum')), trust };
  }

  /** The manifest's digests: the cached copy when one hashes to its fingerprint, else all of them once over the wire. */
  async fetchDigests(m: RemoteManifest) {
    const cache = await this.s.cache();
    const { blockSize, targetSize } = m.header;
    const hit = await cache.lookup(m.fingerprint, blockSize, targetSize);
    if (hit) return hit;
    const n = blockCount(targetSize, blockSize);
    const w = await cache.create();
    const fp = new Fingerprinter(blockSize, targetSize);
    try {
      await this.s.exclusive(async () => {
        await this.s.ch.send({ op: 't-digests', ...this.s.names(this.name, this.format), first: 0, count: n });
        for (let got = 0; ; ) {
          const f = await this.s.ch.next();
          if (f.type === 'control') {
            if (f.msg.op === 'error') throw remoteError(f.msg);
            if (f.msg.op !== 't-end' || got !== n) throw bad(`digests ended at ${got} of ${n}`);
            break;
          }
          if (f.type !== 'digests' || f.first !== got) throw bad('digests out of order');
          if (got + f.digests.length / DIGEST_LEN > n) throw bad(`more digests than the manifest's ${n}`);
          fp.append(f.digests);
          await w.append(f.digests);
          got += f.digests.length / DIGEST_LEN;
        }
      });
      if (!fp.digest().equals(m.fingerprint)) throw bad('the digests sent do not hash to the manifest\'s fingerprint');
      await w.keep(m.fingerprint);
    } catch (e) {
      await w.discard();
      throw e;
    }
    const kept = await cache.lookup(m.fingerprint, blockSize, targetSize);
    if (!kept) throw bad('the digests sent could not be kept');
    return kept;
  }

  async open(create: boolean): Promise<OpenData> {
    await this.ask({ op: 't-open', create }, 't-opened');
    // Open there until committed or aborted: a close before either lets it go.
    this.committed = false;
    const s = this.s;
    let bs = 0;
    const sink: BlockSink = {
      async write(offset, data) {
        const digests = Buffer.alloc(Math.ceil(data.length / bs) * DIGEST_LEN);
        hashBlocksInto(data, bs, digests);
        await s.ch.send(encodeData(offset, digests, data));
      },
      writeZeroes: (offset, length) => s.ch.send(encodeZero(offset, length)),
      truncate: (size) => s.ch.send({ op: 't-truncate', size }),
      commit: async () => void (await s.ask({ op: 't-sync' }, 't-synced')),
      close: async () => {},
    };
    this.onBegin = (blockSize) => (bs = blockSize);
    return {
      sink,
      finish: async () => idFromWire((await s.ask({ op: 't-finish' }, 't-finished')).id)!,
      // Hashed where the data is: nothing but its fingerprint crosses.
      hash: async (_size, blockSize) => fieldDigest(await this.ask({ op: 't-hash', blockSize }, 't-hashed'), 'fp', 'fingerprint'),
      reader: {
        async readAt(buf, offset) {
          let done = 0;
          while (done < buf.length) {
            const length = Math.min(MAX_TARGET_READ, buf.length - done);
            const n = await s.exclusive(async () => {
              await s.ch.send({ op: 't-read', offset: offset + done, length });
              const got = safe((await s.ch.expect('t-read')).n, 'a read');
              if (got > length) throw bad('a read longer than asked');
              if (!got) return 0;
              const f = await s.ch.next();
              if (f.type !== 'data' || f.data.length !== got || f.offset !== offset + done || !digestOf(f.data).equals(f.digests)) throw bad('a read answered wrongly');
              f.data.copy(buf, done);
              return got;
            });
            done += n;
            if (n < length) break;
          }
          return done;
        },
      },
      // Anything still open there (a write given up) is aborted with the session or the next run's begin.
      close: async () => {
        if (!this.committed) await s.ask({ op: 't-abort' }, 't-aborted').catch(() => {});
      },
    };
  }

  private onBegin?: (blockSize: number) => void;
  private committed = false;

  private async begin(o: BeginOptions): Promise<StateWriter> {
    this.onBegin?.(o.blockSize);
    this.committed = false;
    await this.ask({ op: 't-begin', blockSize: o.blockSize, oldSize: o.oldSize, newSize: o.newSize, base: o.base ? o.base.checksum.toString('hex') : null }, 't-begun');
    const s = this.s;
    const fp = new Fingerprinter(o.blockSize, o.newSize);
    let appended = 0;
    const baseBlocks = o.base && o.base.header.blockSize === o.blockSize ? blockCount(o.base.header.targetSize, o.blockSize) : undefined;
    // The new manifest's digests are kept here too, so the next run asks for none of them.
    const cache = await s.cache();
    const keep = await cache.create();
    return {
      record: (blocks) => (blocks.length ? s.ch.send({ op: 't-record', blocks: [...blocks] }) : Promise.resolve()),
      async append(digests, changed = []) {
        fp.append(digests);
        await keep.append(digests);
        const n = digests.length / DIGEST_LEN;
        if (baseBlocks !== undefined && appended + n <= baseBlocks) {
          // Within the base: only the digests that differ from it cross the wire, the far side takes the rest from its manifest.
          await s.ch.send({ op: 't-patch', count: n, changed: [...changed] });
          if (changed.length) await s.ch.send(encodeDigests(appended, Buffer.concat(changed.map((b) => digests.subarray((b - appended) * DIGEST_LEN, (b - appended + 1) * DIGEST_LEN)))));
        } else {
          await s.ch.send({ op: 't-append', changed: [...changed] });
          await s.ch.send(encodeDigests(appended, digests));
        }
        appended += n;
      },
      get fingerprint() {
        return fp.digest();
      },
      commit: async (_id, source) => {
        const r = await s.ask({ op: 't-commit', source: { size: source.size, mtimeNs: String(source.mtimeNs) } }, 't-committed');
        this.committed = true;
        // Named by what they hash to: the far manifest's fingerprint, unless the two sides disagree (then the next run asks again).
        await keep.keep(fp.digest()).catch(() => keep.discard());
        if (o.base && !o.base.fingerprint.equals(fp.digest())) await cache.drop(o.base.fingerprint);
        return fieldDigest(r, 'checksum', 'checksum');
      },
      abort: async () => {
        if (!this.committed) {
          await keep.discard();
          await s.ask({ op: 't-abort' }, 't-aborted').catch(() => {});
        }
        this.committed = true;
      },
    };
  }

  async readNote(): Promise<TargetNote | undefined> {
    const n = (await this.ask({ op: 't-note-get' }, 't-note')).note;
    return n === null || n === undefined ? undefined : noteFromWire(n);
  }

  async writeNote(n: TargetNote): Promise<void> {
    await this.ask({ op: 't-note-put', note: n }, 't-ok');
  }

  async dropNote(): Promise<void> {
    await this.ask({ op: 't-note-drop' }, 't-ok');
  }
}

/** The far side's destination, through a session already greeted (role "target"). */
export class RemoteDestination implements Destination {
  private digestCache?: Promise<DigestCache>;

  constructor(
    readonly ch: Channel,
    readonly shown: string,
    /** A folder of the far DEST ('a/b') the far side serves beside others (src/remote/domain-claims.ts), and the destination it is of. */
    private readonly at?: { folder: string; of: RemoteDestination },
  ) {}

  /** Folder `rel` ('' or 'a/b') of this destination, when the far side serves its folders by name: one session, one turn. */
  inFolder(rel: string): RemoteDestination {
    return new RemoteDestination(this.ch, rel ? `${this.shown}/${rel}` : this.shown, { folder: rel, of: this });
  }

  /** What names a target in a request: its name, its folder when served by folder, its format. */
  names(name: string, format?: 'qcow2'): { name: string; folder?: string; format?: 'qcow2' } {
    return { name, ...(this.at && { folder: this.at.folder }), ...(format && { format }) };
  }

  target(name: string): Target {
    return new RemoteTarget(this, name);
  }

  /** A qcow2 copy on the far side (a server with the "domains" feature). */
  qcow2(name: string): Target {
    return new RemoteTarget(this, name, 'qcow2');
  }

  cache(): Promise<DigestCache> {
    if (this.at) return this.at.of.cache();
    return (this.digestCache ??= DigestCache.open());
  }

  private turn: Promise<unknown> = Promise.resolve();

  /**
   * One exchange at a time: `fn` sends a request and reads its whole answer
   * before the next may start (reads ahead of a copy ask concurrently).
   */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    if (this.at) return this.at.of.exclusive(fn);
    const run = this.turn.then(fn, fn);
    this.turn = run.catch(() => {});
    return run;
  }

  /** Send a request and wait for its answer (the far side's error is raised here). */
  ask(m: ControlMessage, reply: string): Promise<ControlMessage> {
    return this.exclusive(async () => {
      await this.ch.send(m);
      return this.ch.expect(reply);
    });
  }

  /** The session's end (a folder's view leaves it to its destination's). */
  async close(): Promise<void> {
    if (this.at) return;
    await this.ch.send({ op: 'bye' }).catch(() => {});
    const c = await this.digestCache?.catch(() => undefined);
    await c?.close();
  }
}
