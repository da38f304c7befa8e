/**
 * Delta files: a streaming writer (temp file, header sealed last, fsync,
 * rename) and a streaming reader that checks everything the format can check,
 * each record's digest included. Both keep memory flat: one write buffer, one
 * read chunk.
 */
import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { rename, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import {
  encodeHeader,
  encodeRecord,
  encodeTrailer,
  formatError,
  FRAME_LEN,
  headerLength,
  recordBlockLength,
  TRAILER_HASHED_LEN,
  type DeltaCompression,
  type DeltaHeader,
  type DeltaKind,
  type DeltaPosition,
  type DeltaRecord,
  type DeltaTrailer,
} from '../core/delta-codec.js';
import { compressBlock, decompressBlock } from '../core/delta-compression.js';
import { DeltaDecoder } from '../core/delta-decoder.js';
import { QsyncError } from '../core/errors.js';
import { blockCount } from '../core/geometry.js';
import { DIGEST_LEN, digestOf, newHasher, zeroDigest, type Hasher } from '../hash/blake3.js';
import { fsyncDir } from './fsync-dir.js';
import { openRegular } from './safe-fs.js';

/** Delta files carry raw blocks of the files they describe: owner-only. */
export const DELTA_FILE_MODE = 0o600;

const WRITE_BUFFER = 1 << 20;
const READ_CHUNK = 1 << 20;

/** What is known when a member starts; fingerprints (and sizes, if they changed) come at its end. */
export interface DeltaMemberStart {
  kind: DeltaKind;
  blockSize: number;
  baseSize: number;
  resultSize: number;
  createdMs?: number;
  name?: string;
}

export interface DeltaMemberEnd {
  baseFingerprint: Buffer;
  resultFingerprint: Buffer;
  baseSize?: number;
  resultSize?: number;
}

/**
 * Writes one delta file (one or more members). Records go to a temp file
 * beside `path` as they come; each member's header is written last into the
 * space reserved for it, and `finish` makes the file durable and renames it
 * into place. Every method awaits its write: callers get backpressure.
 */
export class DeltaFileWriter {
  private buf = Buffer.allocUnsafe(WRITE_BUFFER);
  private used = 0;
  /** File offset of buf[0]. */
  private flushed = 0;
  private member: { header: DeltaHeader; at: number; records: number; hasher: Hasher } | undefined;
  private closed = false;

  private constructor(
    readonly path: string,
    private readonly tmp: string,
    private readonly fh: FileHandle,
    readonly compression: DeltaCompression,
    private readonly createdMs: number,
  ) {}

  /** `createdMs`: the start of the run, stamped on every member (history points are named by it). */
  /** `shown`: the name in messages when `path` reaches the file through a held folder (Dir.at). */
  static async create(path: string, compression: DeltaCompression = 'none', createdMs = Date.now(), shown = path): Promise<DeltaFileWriter> {
    const tmp = join(dirname(path), `.${basename(path)}.${randomBytes(4).toString('hex')}.tmp`);
    try {
      const fh = await openRegular(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, DELTA_FILE_MODE, shown);
      return new DeltaFileWriter(path, tmp, fh, compression, createdMs);
    } catch (e) {
      throw new QsyncError('TARGET', `cannot create delta ${shown}: ${(e as Error).message}`, { file: shown }, { cause: e });
    }
  }

  /**
   * Start a member. Its header is written now with the fingerprints known so
   * far (`provisional`, zeros by default: unknown), so that a crash leaves a
   * member that says what it is about (salvageable: see salvageMembers);
   * endMember rewrites it with the final values.
   */
  beginMember(start: DeltaMemberStart, provisional?: Partial<DeltaMemberEnd>): void {
    if (this.member) throw new Error('beginMember: previous member not ended');
    const header: DeltaHeader = {
      ...start,
      compression: this.compression,
      createdMs: start.createdMs ?? this.createdMs,
      name: start.name ?? '',
      baseFingerprint: provisional?.baseFingerprint ?? Buffer.alloc(DIGEST_LEN),
      resultFingerprint: provisional?.resultFingerprint ?? Buffer.alloc(DIGEST_LEN),
    };
    const at = this.flushed + this.used;
    this.member = { header, at, records: 0, hasher: newHasher() };
    encodeHeader(header, this.reserve(headerLength(header)), 0);
  }

  /** Replace the current member's provisional fingerprints (written through at once if already flushed). */
  async setProvisional(fps: Partial<DeltaMemberEnd>): Promise<void> {
    const m = this.requireMember();
    m.header = { ...m.header, ...fps };
    await this.writeHeader(m.at, m.header);
  }

  private async writeHeader(at: number, header: DeltaHeader): Promise<void> {
    const bytes = Buffer.alloc(headerLength(header));
    encodeHeader(header, bytes, 0);
    if (at >= this.flushed) bytes.copy(this.buf, at - this.flushed);
    else await writeAll(this.fh, bytes, at);
  }

  /** Add a record as read from another delta of the same compression (salvage). */
  async addRaw(r: DeltaRecord, payload: Buffer | undefined): Promise<void> {
    await this.addRecord(r, r.kind === 'data' ? payload : undefined);
  }

  /** Record block `index`'s result content; zero blocks become zero records. `digest` saves a rehash. */
  async addBlock(index: number, data: Buffer, digest: Buffer = digestOf(data)): Promise<void> {
    const m = this.requireMember();
    if (data.length !== recordBlockLength(m.header, index)) {
      throw new Error(`delta block ${index}: ${data.length} bytes, expected ${recordBlockLength(m.header, index)}`);
    }
    if (digest.equals(zeroDigest(data.length))) return this.addRecord({ index, kind: 'zero', compressed: false, payloadLength: 0, digest }, undefined);
    const packed = compressBlock(this.compression, data);
    const payload = packed ?? data;
    await this.addRecord({ index, kind: 'data', compressed: packed !== undefined, payloadLength: payload.length, digest }, payload);
  }

  async addZero(index: number): Promise<void> {
    const m = this.requireMember();
    const digest = zeroDigest(recordBlockLength(m.header, index));
    await this.addRecord({ index, kind: 'zero', compressed: false, payloadLength: 0, digest }, undefined);
  }

  /** Finish the current member: trailer now, header into its reserved place. */
  async endMember(end: DeltaMemberEnd): Promise<DeltaHeader> {
    const m = this.requireMember();
    const header: DeltaHeader = {
      ...m.header,
      baseFingerprint: end.baseFingerprint,
      resultFingerprint: end.resultFingerprint,
      baseSize: end.baseSize ?? m.header.baseSize,
      resultSize: end.resultSize ?? m.header.resultSize,
    };
    if (headerLength(header) !== headerLength(m.header)) throw new Error('endMember: the name cannot change');
    const headerBytes = Buffer.alloc(headerLength(header));
    encodeHeader(header, headerBytes, 0);
    const trailer = Buffer.alloc(FRAME_LEN);
    encodeTrailer({ recordCount: m.records, streamHash: Buffer.alloc(DIGEST_LEN) }, trailer, 0);
    m.hasher.update(trailer.subarray(0, TRAILER_HASHED_LEN));
    m.hasher.update(headerBytes);
    encodeTrailer({ recordCount: m.records, streamHash: m.hasher.digestBuffer() }, trailer, 0);
    await this.append(trailer);
    await this.writeHeader(m.at, header);
    this.member = undefined;
    return header;
  }

  /**
   * End the current member of a file whose write stopped part way, as a crash's is salvaged
   * (src/sync/delta-sinks.ts salvageHistory): it names no base (the target was left half-written), its base size is
   * the larger of its sizes, and its result is the provisional one. A member with no record is dropped instead.
   */
  async endTorn(): Promise<void> {
    const m = this.requireMember();
    if (m.records === 0) return this.dropMember();
    await this.endMember({ baseFingerprint: Buffer.alloc(DIGEST_LEN), resultFingerprint: m.header.resultFingerprint, baseSize: Math.max(m.header.baseSize, m.header.resultSize) });
  }

  /** Whether a member is begun and not ended. */
  get inMember(): boolean {
    return this.member !== undefined;
  }

  /** Drop the current member as if it had never begun (a file whose run failed): the file ends where it started. */
  async dropMember(): Promise<void> {
    const m = this.requireMember();
    this.member = undefined;
    if (m.at >= this.flushed) {
      this.used = m.at - this.flushed;
      return;
    }
    this.used = 0;
    await this.fh.truncate(m.at);
    this.flushed = m.at;
  }

  /** Make everything added so far durable (the file keeps its temp name). */
  async sync(): Promise<void> {
    await this.flush();
    await this.fh.sync();
  }

  /** Hand everything added so far to the kernel (it survives a kill, not a power cut). */
  async push(): Promise<void> {
    await this.flush();
  }

  /** Make the file durable and move it to its name. */
  async finish(): Promise<void> {
    if (this.member) throw new Error('finish: member not ended');
    await this.flush();
    await this.fh.sync();
    await this.fh.close();
    this.closed = true;
    await rename(this.tmp, this.path);
    await fsyncDir(dirname(this.path));
  }

  /** Drop the temp file (after an error). */
  async abort(): Promise<void> {
    if (!this.closed) await this.fh.close().catch(() => undefined);
    this.closed = true;
    await unlink(this.tmp).catch(() => undefined);
  }

  private requireMember(): NonNullable<DeltaFileWriter['member']> {
    if (!this.member) throw new Error('delta writer: no member begun');
    return this.member;
  }

  private async addRecord(r: DeltaRecord, payload: Buffer | undefined): Promise<void> {
    const m = this.requireMember();
    if (this.used + FRAME_LEN > this.buf.length) await this.flush();
    const frame = this.reserve(FRAME_LEN);
    encodeRecord(r, frame, 0);
    m.hasher.update(frame);
    m.records++;
    if (payload) {
      m.hasher.update(payload);
      await this.append(payload);
    }
  }

  /** `n` bytes of the write buffer, synchronously (the buffer grows in the rare case it is too full). */
  private reserve(n: number): Buffer {
    if (this.used + n > this.buf.length) {
      const bigger = Buffer.allocUnsafe(this.used + n + WRITE_BUFFER);
      this.buf.copy(bigger, 0, 0, this.used);
      this.buf = bigger;
    }
    this.used += n;
    return this.buf.subarray(this.used - n, this.used);
  }

  private async append(data: Buffer): Promise<void> {
    if (this.used + data.length > this.buf.length) await this.flush();
    if (data.length > this.buf.length) {
      await this.writeAll(data);
      this.flushed += data.length;
      return;
    }
    data.copy(this.buf, this.used);
    this.used += data.length;
  }

  private async flush(): Promise<void> {
    if (this.used === 0) return;
    await this.writeAll(this.buf.subarray(0, this.used));
    this.flushed += this.used;
    this.used = 0;
  }

  private async writeAll(data: Buffer): Promise<void> {
    await writeAll(this.fh, data, this.flushed);
  }
}

/** pwrite all of `data` at `offset`. */
export async function writeAll(fh: FileHandle, data: Buffer, offset: number): Promise<void> {
  for (let done = 0; done < data.length; ) {
    const { bytesWritten } = await fh.write(data, done, data.length - done, offset + done);
    done += bytesWritten;
  }
}

export type DeltaEvent =
  | { type: 'header'; header: DeltaHeader; at: DeltaPosition }
  /** `content`: the block's result bytes, digest checked; zero records carry none. */
  | { type: 'record'; header: DeltaHeader; record: DeltaRecord; content: Buffer | undefined; at: DeltaPosition }
  | { type: 'trailer'; header: DeltaHeader; trailer: DeltaTrailer; at: DeltaPosition };

export interface ReadOptions {
  /** Decompress and digest-check every payload (default). Without: records carry no content. */
  payloads?: boolean;
  /** Stop quietly at the first problem instead of throwing (reading what a crash left). */
  tolerant?: boolean;
}

/**
 * Read a delta file from the start, yielding its members' headers, records
 * (content decompressed and digest-checked) and trailers. Throws a FORMAT
 * QsyncError that says where at the first problem (with `tolerant`, ends
 * there instead, after everything before it). A record is yielded before
 * its member's trailer is checked: callers that must not act on a bad delta
 * read it through once first (verifyDeltaFile).
 */
export async function* readDeltaFile(fh: FileHandle, file: string, opts: ReadOptions = {}): AsyncGenerator<DeltaEvent> {
  const payloads = opts.payloads ?? true;
  let events: DeltaEvent[] = [];
  let member: DeltaHeader | undefined;
  const decoder = new DeltaDecoder(
    {
      header(header, at) {
        member = header;
        events.push({ type: 'header', header, at });
      },
      record(record, payload, at) {
        const header = member!;
        const content = payloads ? recordContent(header, record, payload, at) : undefined;
        events.push({ type: 'record', header, record, content, at });
      },
      trailer(trailer, header, at) {
        events.push({ type: 'trailer', header, trailer, at });
      },
    },
    file,
  );
  for (let pos = 0; ; ) {
    // A fresh chunk each time: the decoder hands out subarrays of it.
    const chunk = Buffer.allocUnsafe(READ_CHUNK);
    const { bytesRead } = await fh.read(chunk, 0, READ_CHUNK, pos);
    if (bytesRead === 0) break;
    pos += bytesRead;
    let failed: unknown;
    try {
      decoder.write(chunk.subarray(0, bytesRead));
    } catch (e) {
      failed = e;
    }
    const ready = events;
    events = [];
    if (failed !== undefined && !opts.tolerant) throw failed;
    yield* ready;
    if (failed !== undefined) return;
  }
  if (opts.tolerant) return;
  decoder.end();
}

/** A data record's content: decompressed (capped at the block's length) and checked against its digest. */
function recordContent(header: DeltaHeader, record: DeltaRecord, payload: Buffer, at: DeltaPosition): Buffer | undefined {
  if (record.kind !== 'data') return undefined;
  const len = recordBlockLength(header, record.index);
  let content: Buffer;
  try {
    content = record.compressed ? decompressBlock(header.compression, payload, len) : payload;
  } catch (e) {
    throw formatError(`payload of block ${record.index} does not decompress: ${(e as Error).message}`, at);
  }
  if (!digestOf(content).equals(record.digest)) throw formatError(`digest mismatch for block ${record.index}`, at);
  return content;
}

export interface DeltaMemberSummary {
  header: DeltaHeader;
  records: number;
  dataRecords: number;
  zeroRecords: number;
  payloadBytes: number;
  streamHash: Buffer;
  /** Offset of the member's header in the file. */
  offset: number;
}

/** Read a whole delta file and check everything; returns what each member holds. */
export async function verifyDeltaFile(path: string): Promise<DeltaMemberSummary[]> {
  const fh = await openDelta(path);
  try {
    return await summarize(fh, path);
  } finally {
    await fh.close();
  }
}

export async function summarize(fh: FileHandle, file: string): Promise<DeltaMemberSummary[]> {
  const out: DeltaMemberSummary[] = [];
  let cur: DeltaMemberSummary | undefined;
  for await (const ev of readDeltaFile(fh, file)) {
    if (ev.type === 'header') {
      cur = { header: ev.header, records: 0, dataRecords: 0, zeroRecords: 0, payloadBytes: 0, streamHash: Buffer.alloc(0), offset: ev.at.offset };
    } else if (ev.type === 'record') {
      cur!.records++;
      if (ev.record.kind === 'data') cur!.dataRecords++;
      else cur!.zeroRecords++;
      cur!.payloadBytes += ev.record.payloadLength;
    } else {
      cur!.streamHash = ev.trailer.streamHash;
      checkResultSize(ev.header, cur!.records, ev.at);
      out.push(cur!);
    }
  }
  return out;
}

/**
 * A member can only make its result out of its base and its records: a
 * result larger than base size + records × block size is a forged header
 * (it would make apply or restore allocate what no record describes).
 */
function checkResultSize(h: DeltaHeader, records: number, at: DeltaPosition): void {
  if (h.resultSize > h.baseSize + records * h.blockSize) {
    throw formatError(`result size ${h.resultSize} is larger than the base (${h.baseSize} bytes) and the ${records} records can make`, at);
  }
}

/** Open a delta for reading: a regular file, never a symlink or a FIFO (which would hang the read). */
export async function openDelta(path: string, shown = path): Promise<FileHandle> {
  try {
    return await openRegular(path, constants.O_RDONLY, 0, shown);
  } catch (e) {
    if (e instanceof QsyncError) throw new QsyncError('SOURCE', `cannot read delta ${shown}: ${e.message}`, { file: shown });
    throw new QsyncError('SOURCE', `cannot open delta ${shown}: ${(e as Error).message}`, { file: shown }, { cause: e });
  }
}

const ZEROES = Buffer.alloc(1 << 20);

/**
 * Writes one member's records onto a file already resized to the member's
 * result size. Blocks from `zeroFrom` on lay wholly past the file's size
 * before that resize, so they read as zeros: a zero record there is skipped
 * (the file stays sparse) unless an earlier record of this member wrote the
 * block. The bitmap covers only those blocks (bounded by the record count,
 * see checkResultSize).
 */
export class MemberPatch {
  private readonly written: Uint8Array;

  constructor(
    private readonly fh: FileHandle,
    private readonly h: DeltaHeader,
    private readonly zeroFrom: number,
  ) {
    this.written = new Uint8Array(Math.ceil(Math.max(0, blockCount(h.resultSize, h.blockSize) - zeroFrom) / 8));
  }

  async write(index: number, content: Buffer | undefined): Promise<void> {
    if (index >= this.zeroFrom) {
      const k = index - this.zeroFrom;
      const seen = this.written[k >> 3] & (1 << (k & 7));
      if (!content && !seen) return;
      this.written[k >> 3] |= 1 << (k & 7);
    }
    const off = index * this.h.blockSize;
    if (content) return writeAll(this.fh, content, off);
    const len = recordBlockLength(this.h, index);
    for (let done = 0; done < len; done += ZEROES.length) await writeAll(this.fh, ZEROES.subarray(0, Math.min(ZEROES.length, len - done)), off + done);
  }
}
