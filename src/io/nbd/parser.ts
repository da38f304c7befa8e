/**
 * NBD framing from the server side of the wire, fed chunks in any split
 * (undici receiver style): it never touches the socket and reports to a
 * handler. Headers and small payloads are collected (a subarray when they sit
 * in one chunk, valid only during the handler's call); READ data is streamed
 * to the handler as it arrives, so nothing large is buffered here, and
 * streaming() tells the transport where the data being streamed is to go, so
 * it can read it there itself. The caller may reuse a chunk once write()
 * returns. Every length is checked before use.
 */
import { QsyncError } from '../../core/errors.js';
import {
  IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, REPLY_TYPE_OFFSET_DATA, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
} from './constants.js';

export interface NbdParserHandler {
  greeting(flags: number): void;
  /** `data` is only valid during the call. */
  optionReply(option: number, type: number, data: Buffer): void;
  /**
   * Header of a simple reply. Returns the READ data that follows it (only a
   * successful READ without structured replies has any), else undefined.
   */
  simpleReply(handle: number, error: number): { offset: number; length: number } | undefined;
  /** A simple reply and its data are complete. */
  simpleDone(handle: number, error: number): void;
  /** READ data as it arrives; `piece` is only valid during the call. */
  data(handle: number, offset: number, piece: Buffer): void;
  /** A structured chunk is complete (`payload` is only valid during the call); for OFFSET_DATA the payload went to data() and is empty here. */
  chunk(handle: number, flags: number, type: number, payload: Buffer): void;
}

export interface NbdParserLimits {
  /** Largest option reply payload. */
  maxOptionReply: number;
  /** Largest READ data in one reply or chunk. */
  maxData: number;
  /** Largest payload of any other structured chunk (block status, errors). */
  maxChunk: number;
}

export const DEFAULT_LIMITS: NbdParserLimits = {
  maxOptionReply: 64 * 1024,
  maxData: 32 * 1024 * 1024,
  // QEMU sends at most 1 MiB of block status descriptors per chunk.
  maxChunk: 4 * 1024 * 1024,
};

const EMPTY = Buffer.alloc(0);

type State =
  /** `header`: bytes of a reply's header that follow these (transmission replies only). */
  | { kind: 'collect'; need: number; then: (b: Buffer) => void; header?: number }
  | { kind: 'stream'; handle: number; offset: number; remaining: number; then: () => void };

export class NbdParser {
  limits: NbdParserLimits;
  #state: State;
  /** A collect that spans chunks: its bytes so far. */
  #partial: Buffer | undefined;
  #collected = 0;
  #failed = false;

  constructor(
    private readonly handler: NbdParserHandler,
    limits: Partial<NbdParserLimits> = {},
  ) {
    this.limits = { ...DEFAULT_LIMITS, ...limits };
    this.#state = { kind: 'collect', need: 18, then: (b) => this.#greeting(b) };
  }

  /** After the final reply to NBD_OPT_GO: from now on only transmission replies come. */
  enterTransmission(): void {
    // A reply header; if it is an OFFSET_DATA chunk, its length and offset come next (12 bytes).
    this.#collect(16, (b) => this.#reply(b), 12);
  }

  /**
   * Between transmission replies: how many bytes to read so as to stop where
   * READ data would begin (the rest of a reply header, and of an OFFSET_DATA
   * chunk's length and offset after it); undefined otherwise. Reading no more
   * than this lets the transport read the data itself into its place.
   */
  headerRemaining(): number | undefined {
    const s = this.#state;
    if (s.kind !== 'collect' || this.#failed) return undefined;
    return s.header === undefined ? undefined : s.need - this.#collected + s.header;
  }

  /** READ data being streamed: whose, from which offset, how many bytes are still to come (undefined between replies). */
  streaming(): { handle: number; offset: number; remaining: number } | undefined {
    const s = this.#state;
    return s.kind === 'stream' && !this.#failed ? { handle: s.handle, offset: s.offset, remaining: s.remaining } : undefined;
  }

  /** Throws a QsyncError (PROTOCOL) on a violation; the parser then refuses further input. */
  write(chunk: Buffer): void {
    if (this.#failed) throw new QsyncError('PROTOCOL', 'NBD parser used after an error');
    try {
      this.#write(chunk);
    } catch (e) {
      this.#failed = true;
      throw e;
    }
  }

  #write(chunk: Buffer): void {
    let pos = 0;
    while (pos < chunk.length) {
      const s = this.#state;
      if (s.kind === 'stream') {
        const n = Math.min(s.remaining, chunk.length - pos);
        const piece = chunk.subarray(pos, pos + n);
        pos += n;
        s.remaining -= n;
        const at = s.offset;
        s.offset += n;
        this.handler.data(s.handle, at, piece);
        if (s.remaining === 0) s.then();
        continue;
      }
      const avail = chunk.length - pos;
      if (this.#collected === 0 && avail >= s.need) {
        const b = chunk.subarray(pos, pos + s.need);
        pos += s.need;
        s.then(b);
        continue;
      }
      // Copied: the chunk may be reused once write() returns.
      const n = Math.min(s.need - this.#collected, avail);
      this.#partial ??= Buffer.allocUnsafe(s.need);
      chunk.copy(this.#partial, this.#collected, pos, pos + n);
      this.#collected += n;
      pos += n;
      if (this.#collected === s.need) {
        const b = this.#partial;
        this.#partial = undefined;
        this.#collected = 0;
        s.then(b);
      }
    }
  }

  /** Next state collects `need` bytes; a zero-length collect completes at once. */
  #collect(need: number, then: (b: Buffer) => void, header?: number): void {
    if (need === 0) then(EMPTY);
    else this.#state = { kind: 'collect', need, then, header };
  }

  #greeting(b: Buffer): void {
    if (b.readBigUInt64BE(0) !== NBDMAGIC) throw bad('not an NBD server (no NBDMAGIC)');
    if (b.readBigUInt64BE(8) !== IHAVEOPT) throw bad('NBD server does not speak newstyle negotiation');
    this.#collect(20, (h) => this.#optionHeader(h));
    this.handler.greeting(b.readUInt16BE(16));
  }

  #optionHeader(h: Buffer): void {
    if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw bad('bad option reply magic');
    const option = h.readUInt32BE(8);
    const type = h.readUInt32BE(12);
    const len = h.readUInt32BE(16);
    if (len > this.limits.maxOptionReply) throw bad(`option reply of ${len} bytes exceeds ${this.limits.maxOptionReply}`);
    this.#collect(len, (data) => {
      this.#collect(20, (nh) => this.#optionHeader(nh));
      this.handler.optionReply(option, type, data);
    });
  }

  #reply(h: Buffer): void {
    const magic = h.readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const error = h.readUInt32BE(4);
      const handle = readHandle(h, 8);
      const next = (): void => {
        this.enterTransmission();
        this.handler.simpleDone(handle, error);
      };
      const data = this.handler.simpleReply(handle, error);
      if (data && data.length > 0) {
        if (data.length > this.limits.maxData) throw bad(`simple reply data of ${data.length} bytes exceeds ${this.limits.maxData}`);
        this.#state = { kind: 'stream', handle, offset: data.offset, remaining: data.length, then: next };
      } else {
        next();
      }
      return;
    }
    if (magic !== STRUCTURED_REPLY_MAGIC) throw bad(`bad reply magic 0x${magic.toString(16)}`);
    const flags = h.readUInt16BE(4);
    const type = h.readUInt16BE(6);
    const handle = readHandle(h, 8);
    // The structured header is 20 bytes: the length follows the 16 already read.
    this.#collect(4, (l) => {
      const len = l.readUInt32BE(0);
      if (type === REPLY_TYPE_OFFSET_DATA) {
        if (len <= 8) throw bad(`OFFSET_DATA chunk of ${len} bytes carries no data`);
        if (len - 8 > this.limits.maxData) throw bad(`OFFSET_DATA chunk of ${len} bytes exceeds ${this.limits.maxData}`);
        this.#collect(8, (o) => {
          const offset = readU64(o, 0);
          this.#state = {
            kind: 'stream', handle, offset, remaining: len - 8,
            then: () => {
              this.enterTransmission();
              this.handler.chunk(handle, flags, type, EMPTY);
            },
          };
        }, 0);
        return;
      }
      if (len > this.limits.maxChunk) throw bad(`reply chunk of ${len} bytes exceeds ${this.limits.maxChunk}`);
      this.#collect(len, (payload) => {
        this.enterTransmission();
        this.handler.chunk(handle, flags, type, payload);
      });
    }, type === REPLY_TYPE_OFFSET_DATA ? 8 : undefined);
  }
}

function bad(msg: string): QsyncError {
  return new QsyncError('PROTOCOL', `NBD: ${msg}`);
}

/** Handles are ours: a counter below 2^53, so a number is exact; others will not match. */
function readHandle(b: Buffer, off: number): number {
  return b.readUInt32BE(off) * 2 ** 32 + b.readUInt32BE(off + 4);
}

/** A 64-bit offset or size, refused beyond 2^53. */
export function readU64(b: Buffer, off: number): number {
  const v = b.readBigUInt64BE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(`64-bit value ${v} out of range`);
  return Number(v);
}
