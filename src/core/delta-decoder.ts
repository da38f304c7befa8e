/**
 * Streaming delta parser: fed chunks with `write(chunk)`, it reports headers,
 * records and trailers to a handler. It keeps only a partial frame or payload
 * between chunks, checks every length, index and count against the header's
 * limits before buffering anything, and checks each frame, the record count
 * and the whole-stream hash. Payload digests are the caller's to check (they
 * need decompression).
 */
import { newHasher, zeroDigest } from '../hash/blake3.js';
import {
  decodeFrame,
  decodeHeader,
  decodeHeaderLength,
  formatError,
  FRAME_LEN,
  HEADER_FIXED_LEN,
  recordBlockLength,
  TRAILER_HASHED_LEN,
  type DeltaHeader,
  type DeltaPosition,
  type DeltaRecord,
  type DeltaTrailer,
} from './delta-codec.js';

export interface DeltaDecoderHandler {
  header(h: DeltaHeader, at: DeltaPosition): void;
  /**
   * `payload` is a subarray of a chunk the caller passed in, or a buffer the
   * decoder allocated for it; the decoder never reuses it. Empty for zero records.
   */
  record(r: DeltaRecord, payload: Buffer, at: DeltaPosition & { record: number }): void;
  /** The member is complete and its count and stream hash matched. */
  trailer(t: DeltaTrailer, h: DeltaHeader, at: DeltaPosition): void;
}

type State = 'header-fixed' | 'header-name' | 'frame' | 'payload' | 'boundary' | 'failed';

export class DeltaDecoder {
  private state: State = 'header-fixed';
  private chunk: Buffer = Buffer.alloc(0);
  private pos = 0;
  /** Bytes consumed before `chunk`. */
  private base = 0;
  private partial: Buffer | undefined;
  private partialLen = 0;
  private unitStart = 0;
  private header: DeltaHeader | undefined;
  private headerFixed: Buffer | undefined;
  private headerBytes: Buffer | undefined;
  private pending: DeltaRecord | undefined;
  private records = 0;
  private members = 0;
  private hasher = newHasher();

  constructor(
    private readonly handler: DeltaDecoderHandler,
    private readonly file?: string,
  ) {}

  /** Bytes consumed so far. */
  get offset(): number {
    return this.base + this.pos;
  }

  write(chunk: Buffer): void {
    if (this.state === 'failed') throw formatError('decoder already failed', this.at(this.offset));
    this.chunk = chunk;
    this.pos = 0;
    try {
      while (this.step());
    } catch (e) {
      this.state = 'failed';
      throw e;
    } finally {
      this.base += this.pos;
      this.chunk = Buffer.alloc(0);
      this.pos = 0;
    }
  }

  /** The input is complete: it must end right after a trailer. */
  end(): void {
    if (this.state === 'boundary') return;
    const inside = this.state === 'payload' ? 'a payload' : this.state === 'frame' ? 'a record or the trailer' : 'the header';
    const what = this.members > 0 && this.state === 'header-fixed' ? 'trailing bytes after the last member' : `truncated inside ${inside}`;
    this.state = 'failed';
    throw formatError(what, this.at(this.offset, this.header ? this.records : undefined));
  }

  private at(offset: number, record?: number): DeltaPosition {
    return { offset, record, file: this.file };
  }

  /** `n` bytes, contiguous, or undefined when the chunk ran out first (the rest is kept). */
  private take(n: number): Buffer | undefined {
    const avail = this.chunk.length - this.pos;
    if (this.partialLen === 0 && avail >= n) {
      this.unitStart = this.offset;
      this.pos += n;
      return this.chunk.subarray(this.pos - n, this.pos);
    }
    if (this.partialLen === 0) {
      this.unitStart = this.offset;
      this.partial = Buffer.allocUnsafe(n);
    }
    const part = this.partial!;
    const k = Math.min(n - this.partialLen, avail);
    this.chunk.copy(part, this.partialLen, this.pos, this.pos + k);
    this.partialLen += k;
    this.pos += k;
    if (this.partialLen < n) return undefined;
    this.partial = undefined;
    this.partialLen = 0;
    return part;
  }

  /** One unit of progress; false when the chunk is used up. */
  private step(): boolean {
    if (this.pos >= this.chunk.length) return false;
    switch (this.state) {
      case 'boundary':
        this.state = 'header-fixed';
        return true;
      case 'header-fixed': {
        const b = this.take(HEADER_FIXED_LEN);
        if (!b) return false;
        const len = decodeHeaderLength(b, 0, this.at(this.unitStart));
        this.headerFixed = Buffer.from(b);
        if (len === HEADER_FIXED_LEN) this.startMember(this.headerFixed);
        else this.state = 'header-name';
        return true;
      }
      case 'header-name': {
        const fixed = this.headerFixed!;
        const b = this.take(decodeHeaderLength(fixed, 0, this.at(this.unitStart)) - HEADER_FIXED_LEN);
        if (!b) return false;
        this.startMember(Buffer.concat([fixed, b]));
        return true;
      }
      case 'frame':
        return this.frame();
      case 'payload': {
        const r = this.pending!;
        const b = this.take(r.payloadLength);
        if (!b) return false;
        this.hasher.update(b);
        this.emitRecord(r, b);
        return true;
      }
      case 'failed':
        return false;
    }
  }

  private startMember(bytes: Buffer): void {
    const at = this.at(this.offset - bytes.length);
    this.header = decodeHeader(bytes, 0, at);
    this.headerBytes = bytes;
    this.hasher = newHasher();
    this.records = 0;
    this.members++;
    this.state = 'frame';
    this.handler.header(this.header, at);
  }

  private frame(): boolean {
    const b = this.take(FRAME_LEN);
    if (!b) return false;
    const h = this.header!;
    const at = this.at(this.unitStart, this.records);
    const f = decodeFrame(b, 0, h, at);
    if (f.type === 'trailer') {
      if (f.recordCount !== this.records) throw formatError(`trailer counts ${f.recordCount} records, found ${this.records}`, at);
      this.hasher.update(b.subarray(0, TRAILER_HASHED_LEN));
      this.hasher.update(this.headerBytes!);
      if (!this.hasher.digestBuffer().equals(f.streamHash)) throw formatError('stream hash mismatch (corrupt delta)', at);
      this.state = 'boundary';
      this.handler.trailer(f, h, at);
      return true;
    }
    const { type: _type, ...r } = f;
    if (r.kind === 'zero' && !r.digest.equals(zeroDigest(recordBlockLength(h, r.index)))) {
      throw formatError(`zero record for block ${r.index} has a wrong digest`, at);
    }
    this.hasher.update(b);
    if (r.payloadLength === 0) this.emitRecord(r, Buffer.alloc(0));
    else {
      this.pending = r;
      this.state = 'payload';
    }
    return true;
  }

  private emitRecord(r: DeltaRecord, payload: Buffer): void {
    const at = { offset: this.offset - payload.length - FRAME_LEN, record: this.records, file: this.file };
    this.records++;
    this.pending = undefined;
    this.state = 'frame';
    this.handler.record(r, payload, at);
  }
}
