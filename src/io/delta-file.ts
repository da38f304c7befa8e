/**
 * Delta files: a streaming writer (temp file, header sealed last, fsync,
 * rename) and a streaming reader that checks everything the format can check,
 * each record's digest included. Both keep memory flat: one write buffer, one
 * read chunk.
 */
import { randomBytes } from 'node:crypto';
import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
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
import { DIGEST_LEN, digestOf, newHasher, zeroDigest, type Hasher } from '../hash/blake3.js';
import { fsyncDir } from './fsync-dir.js';

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
  static async create(path: string, compression: DeltaCompression = 'none', createdMs = Date.now()): Promise<DeltaFileWriter> {
    const tmp = join(dirname(path), `.${basename(path)}.${randomBytes(4).toString('hex')}.tmp`);
    try {
      return new DeltaFileWriter(path, tmp, await open(tmp, 'wx'), compression, createdMs);
    } catch (e) {
      throw new QsyncError('TARGET', `cannot create delta ${path}: ${(e as Error).message}`, { file: path }, { cause: e });
    }
  }

  beginMember(start: DeltaMemberStart): void {
    if (this.member) throw new Error('beginMember: previous member not ended');
    const header: DeltaHeader = {
      ...start,
      compression: this.compression,
      createdMs: start.createdMs ?? this.createdMs,
      name: start.name ?? '',
      baseFingerprint: Buffer.alloc(DIGEST_LEN),
      resultFingerprint: Buffer.alloc(DIGEST_LEN),
    };
    const at = this.flushed + this.used;
    this.member = { header, at, records: 0, hasher: newHasher() };
    // Reserve the header's bytes; endMember writes them.
    this.reserve(headerLength(header)).fill(0);
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
    const headerBytes = Buffer.alloc(headerLength(header));
    encodeHeader(header, headerBytes, 0);
    const trailer = Buffer.alloc(FRAME_LEN);
    encodeTrailer({ recordCount: m.records, streamHash: Buffer.alloc(DIGEST_LEN) }, trailer, 0);
    m.hasher.update(trailer.subarray(0, TRAILER_HASHED_LEN));
    m.hasher.update(headerBytes);
    encodeTrailer({ recordCount: m.records, streamHash: m.hasher.digestBuffer() }, trailer, 0);
    await this.append(trailer);
    if (m.at >= this.flushed) headerBytes.copy(this.buf, m.at - this.flushed);
    else await this.fh.write(headerBytes, 0, headerBytes.length, m.at);
    this.member = undefined;
    return header;
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

  /** `n` bytes of the write buffer (n <= WRITE_BUFFER), flushing first if needed; synchronous when it fits. */
  private reserve(n: number): Buffer {
    if (this.used + n > this.buf.length) throw new Error('delta writer: reserve without room');
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

/**
 * Read a delta file from the start, yielding its members' headers, records
 * (content decompressed and digest-checked) and trailers. Throws a FORMAT
 * QsyncError that says where at the first problem. A record is yielded before
 * its member's trailer is checked: callers that must not act on a bad delta
 * read it through once first (verifyDeltaFile).
 */
export async function* readDeltaFile(fh: FileHandle, file: string): AsyncGenerator<DeltaEvent> {
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
        let content: Buffer | undefined;
        if (record.kind === 'data') {
          const len = recordBlockLength(header, record.index);
          try {
            content = record.compressed ? decompressBlock(header.compression, payload, len) : payload;
          } catch (e) {
            throw formatError(`payload of block ${record.index} does not decompress: ${(e as Error).message}`, at);
          }
          if (!digestOf(content).equals(record.digest)) throw formatError(`digest mismatch for block ${record.index}`, at);
        }
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
    decoder.write(chunk.subarray(0, bytesRead));
    const ready = events;
    events = [];
    yield* ready;
  }
  decoder.end();
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
      out.push(cur!);
    }
  }
  return out;
}

export async function openDelta(path: string): Promise<FileHandle> {
  try {
    return await open(path, 'r');
  } catch (e) {
    throw new QsyncError('SOURCE', `cannot open delta ${path}: ${(e as Error).message}`, { file: path }, { cause: e });
  }
}
