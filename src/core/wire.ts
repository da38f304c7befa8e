/**
 * The wire protocol's frames (docs/FORMATS.md "Wire protocol"): a pure codec.
 * `encode*` build one frame; WireDecoder is fed chunks as they arrive and
 * hands whole frames to its handler, checking every length against its
 * limit before anything is buffered. Bodies are subarrays of the input when
 * a frame lies in one chunk, copies only when it straddles chunks.
 *
 *     frame   = u32 length | u8 type | body        (length = 1 + body bytes)
 *     CONTROL = 0x01: UTF-8 JSON object with a string "op"
 *     DATA    = 0x02: u64 offset | u32 count | count × 32-byte digests | data
 *     ZERO    = 0x03: u64 offset | u64 length
 *     DIGESTS = 0x04: u64 first block | n × 32-byte digests
 *     DATA_Z  = 0x05: as DATA, the data raw-deflated (-z)
 *
 * All integers little-endian. Offsets and lengths must be safe integers.
 */
import { QsyncError } from './errors.js';

export const WIRE_MAGIC = 'qsync-wire';
export const WIRE_VERSION = 2;
export const DIGEST_BYTES = 32;

/** Control messages are small; a listing is paged to stay well below this. */
export const MAX_CONTROL = 4 << 20;
/** The default frame limit: a DATA frame of a 16 MiB block with its digest, and headroom. */
export const MAX_FRAME = (16 << 20) + 4096;

export const FRAME = { CONTROL: 1, DATA: 2, ZERO: 3, DIGESTS: 4, DATA_Z: 5 } as const;

export interface ControlMessage {
  op: string;
  [key: string]: unknown;
}

export type WireFrame =
  | { type: 'control'; msg: ControlMessage }
  /** `compressed`: `data` is raw deflate of the blocks' bytes (DATA_Z). */
  | { type: 'data'; offset: number; digests: Buffer; data: Buffer; compressed?: boolean }
  | { type: 'zero'; offset: number; length: number }
  | { type: 'digests'; first: number; digests: Buffer };

/** A peer broke the protocol: the run cannot go on over this channel (exit 12). */
export const protocolError = (what: string): QsyncError => new QsyncError('PROTOCOL', `protocol error: ${what}`, { fatal: true });
const bad = protocolError;

/** Field `k` of a control message, which must be a string. */
export function fieldString(m: Record<string, unknown>, k: string): string {
  const v = m[k];
  if (typeof v !== 'string') throw bad(`"${String(m.op)}" needs a string "${k}"`);
  return v;
}

/** Field `k` of a control message, which must be a safe integer ≥ `min`. */
export function fieldInt(m: Record<string, unknown>, k: string, min = 0): number {
  const v = m[k];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) throw bad(`"${k}" is not an integer ≥ ${min}`);
  return v;
}

/** Field `k` of a control message, which must be a BLAKE3 digest in lowercase hex (`what`: a fingerprint, a checksum). */
export function fieldDigest(m: Record<string, unknown>, k: string, what = 'digest'): Buffer {
  const v = m[k];
  if (typeof v !== 'string' || !/^[0-9a-f]{64}$/.test(v)) throw bad(`"${k}" is not a ${what}`);
  return Buffer.from(v, 'hex');
}

/** -A/-X over the wire: one attribute value at most this many bytes (Linux's XATTR_SIZE_MAX). */
export const MAX_ATTR_VALUE = 64 << 10;
/** Names and values (as sent) of one entry's attributes together, at most. */
export const MAX_ENTRY_ATTRS = 1 << 20;
/** One name, as getfattr quotes it (a byte as `\ooo` at most: 4 × XATTR_NAME_MAX). */
const MAX_ATTR_NAME = 1020;
/**
 * A name as getfattr prints it and setfattr reads it back: a kernel
 * namespace, then printable ASCII (space and tab included) without `=` or
 * `\`, which come as `\ooo` escapes, as every byte past 0x7f does.
 */
const ATTR_NAME = /^(?:user|trusted|security|system)\.(?:[\t\x20-\x3c\x3e-\x5b\x5d-\x7e]|\\[0-3][0-7]{2})+$/;
/** A value as getfattr -e base64 prints it (`""`: empty). */
const ATTR_VALUE = /^(?:""|0s[A-Za-z0-9+/]+={0,2})$/;

/** The decoded length of a value checked by ATTR_VALUE. */
const valueBytes = (v: string): number => (v === '""' ? 0 : Math.floor(((v.length - 2) * 3) / 4) - (v.endsWith('==') ? 2 : v.endsWith('=') ? 1 : 0));

/**
 * Why a list of [name, value] attribute pairs cannot travel (or be taken
 * from a peer): undefined when it can. Each name once; bounds above. These
 * pairs end up as lines of setfattr's --restore input, so nothing that
 * could start another line or section there passes.
 */
export function attrPairsProblem(pairs: unknown): string | undefined {
  if (!Array.isArray(pairs)) return 'attributes that are not a list';
  const seen = new Set<string>();
  let total = 0;
  for (const p of pairs as unknown[]) {
    if (!Array.isArray(p) || p.length !== 2 || typeof p[0] !== 'string' || typeof p[1] !== 'string') return 'an attribute that is not a [name, value] pair';
    const [name, value] = p as [string, string];
    if (name.length > MAX_ATTR_NAME || !ATTR_NAME.test(name)) return `an attribute name ${JSON.stringify(name.slice(0, 80))} that is not one`;
    if (seen.has(name)) return `the attribute ${name} twice`;
    seen.add(name);
    if (value.length > 2 + Math.ceil(MAX_ATTR_VALUE / 3) * 4 || !ATTR_VALUE.test(value) || valueBytes(value) > MAX_ATTR_VALUE) {
      return `a value of the attribute ${name} that is not base64 of at most ${MAX_ATTR_VALUE} bytes (${value.length} characters)`;
    }
    total += name.length + value.length;
    if (total > MAX_ENTRY_ATTRS) return `attributes of more than ${MAX_ENTRY_ATTRS} bytes for one entry`;
  }
  return undefined;
}

/** A peer's attribute pairs, checked (attrPairsProblem): anything else ends the run. */
export function attrPairsFromWire(pairs: unknown, of: string): [string, string][] {
  const problem = attrPairsProblem(pairs);
  if (problem) throw bad(`${problem} (for ${of})`);
  return pairs as [string, string][];
}

function header(type: number, bodyLength: number): Buffer {
  const h = Buffer.alloc(5);
  h.writeUInt32LE(1 + bodyLength, 0);
  h[4] = type;
  return h;
}

function u64(n: number): Buffer {
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`not a wire u64: ${n}`);
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b;
}

/** A control frame. Names that are not UTF-8 travel as the lone surrogates decodeName gives them (JSON escapes them). */
export function encodeControl(msg: ControlMessage): Buffer {
  const body = Buffer.from(JSON.stringify(msg), 'utf8');
  if (body.length > MAX_CONTROL) throw new RangeError(`control message of ${body.length} bytes is over ${MAX_CONTROL}`);
  return Buffer.concat([header(FRAME.CONTROL, body.length), body]);
}

/**
 * A DATA frame. The frame is a copy: `digests` and `data` may be reused as
 * soon as this returns (a stream holds what it is given until it is written).
 */
export function encodeData(offset: number, digests: Uint8Array, data: Uint8Array, compressed = false): Buffer {
  if (digests.length % DIGEST_BYTES !== 0 || digests.length === 0) throw new RangeError('DATA needs whole digests');
  if (data.length === 0) throw new RangeError('DATA needs data');
  const n = Buffer.alloc(4);
  n.writeUInt32LE(digests.length / DIGEST_BYTES);
  return Buffer.concat([header(compressed ? FRAME.DATA_Z : FRAME.DATA, 12 + digests.length + data.length), u64(offset), n, digests, data]);
}

export function encodeZero(offset: number, length: number): Buffer {
  return Buffer.concat([header(FRAME.ZERO, 16), u64(offset), u64(length)]);
}

/** A DIGESTS frame (a copy, as encodeData). */
export function encodeDigests(first: number, digests: Uint8Array): Buffer {
  if (digests.length % DIGEST_BYTES !== 0) throw new RangeError('DIGESTS needs whole digests');
  return Buffer.concat([header(FRAME.DIGESTS, 8 + digests.length), u64(first), digests]);
}

function readU64(b: Buffer, at: number, what: string): number {
  const v = b.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(`${what} ${v} is out of range`);
  return Number(v);
}

/** Decode one frame's type and body (without its length word). Throws PROTOCOL on anything malformed. */
export function decodeFrame(type: number, body: Buffer): WireFrame {
  switch (type) {
    case FRAME.CONTROL: {
      if (body.length > MAX_CONTROL) throw bad(`control message of ${body.length} bytes`);
      let msg: unknown;
      try {
        msg = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(body));
      } catch {
        throw bad('a control message is not UTF-8 JSON');
      }
      if (typeof msg !== 'object' || msg === null || Array.isArray(msg) || typeof (msg as { op?: unknown }).op !== 'string') {
        throw bad('a control message is not an object with an "op"');
      }
      return { type: 'control', msg: msg as ControlMessage };
    }
    case FRAME.DATA:
    case FRAME.DATA_Z: {
      if (body.length < 12) throw bad('short DATA frame');
      const offset = readU64(body, 0, 'DATA offset');
      const count = body.readUInt32LE(8);
      const dEnd = 12 + count * DIGEST_BYTES;
      if (count === 0 || dEnd >= body.length) throw bad(`DATA frame with ${count} digests and ${body.length - 12} bytes`);
      const f: WireFrame = { type: 'data', offset, digests: body.subarray(12, dEnd), data: body.subarray(dEnd) };
      if (type === FRAME.DATA_Z) f.compressed = true;
      return f;
    }
    case FRAME.ZERO: {
      if (body.length !== 16) throw bad('ZERO frame of the wrong size');
      return { type: 'zero', offset: readU64(body, 0, 'ZERO offset'), length: readU64(body, 8, 'ZERO length') };
    }
    case FRAME.DIGESTS: {
      if (body.length < 8 || (body.length - 8) % DIGEST_BYTES !== 0) throw bad('DIGESTS frame of the wrong size');
      return { type: 'digests', first: readU64(body, 0, 'DIGESTS first block'), digests: body.subarray(8) };
    }
    default:
      throw bad(`unknown frame type ${type}`);
  }
}

/**
 * Fed chunks, calls `onFrame` for each whole frame in order. A frame longer
 * than `limit` is refused from its length word alone, before its body is
 * buffered. Bodies handed over are valid only during the call.
 */
export class WireDecoder {
  private parts: Buffer[] = [];
  private have = 0;
  private need = 0; // body length of the frame being collected, 0 while reading a length word
  private type = 0;
  /** Bytes taken so far (for messages). */
  consumed = 0;

  constructor(
    private readonly onFrame: (f: WireFrame) => void,
    private readonly limit = MAX_FRAME,
  ) {}

  push(chunk: Buffer): void {
    let buf = chunk;
    while (buf.length) {
      if (this.need === 0) {
        // Collect the 5-byte frame header.
        const want = 5 - this.have;
        const take = Math.min(want, buf.length);
        this.parts.push(buf.subarray(0, take));
        this.have += take;
        buf = buf.subarray(take);
        this.consumed += take;
        if (this.have < 5) continue;
        const h = Buffer.concat(this.parts, 5);
        this.parts = [];
        this.have = 0;
        const len = h.readUInt32LE(0);
        if (len < 1) throw bad(`empty frame at byte ${this.consumed - 5}`);
        if (len > this.limit) throw bad(`frame of ${len} bytes at byte ${this.consumed - 5} is over the limit of ${this.limit}`);
        this.type = h[4];
        if (this.type < FRAME.CONTROL || this.type > FRAME.DATA_Z) throw bad(`unknown frame type ${this.type} at byte ${this.consumed - 5}`);
        this.need = len - 1;
        if (this.need === 0) {
          this.emit(Buffer.alloc(0));
        }
        continue;
      }
      const take = Math.min(this.need - this.have, buf.length);
      if (this.have === 0 && take === this.need) {
        // The whole body in this chunk: no copy.
        const body = buf.subarray(0, take);
        buf = buf.subarray(take);
        this.consumed += take;
        this.need = 0;
        this.emit(body);
        continue;
      }
      this.parts.push(buf.subarray(0, take));
      this.have += take;
      buf = buf.subarray(take);
      this.consumed += take;
      if (this.have === this.need) {
        const body = Buffer.concat(this.parts, this.have);
        this.parts = [];
        this.have = 0;
        this.need = 0;
        this.emit(body);
      }
    }
  }

  /** The stream ended: anything but a frame boundary is a truncated frame. */
  end(): void {
    if (this.need !== 0 || this.have !== 0) throw bad(`the stream ended inside a frame (after ${this.consumed} bytes)`);
  }

  private emit(body: Buffer): void {
    const type = this.type;
    this.type = 0;
    this.onFrame(decodeFrame(type, body));
  }
}
