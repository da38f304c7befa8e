/**
 * QMP's wire format: one JSON object per line. The decoder is fed chunks in
 * any split and reports whole messages; it never touches a socket.
 */
import { QsyncError } from '../core/errors.js';

export type QmpMessage = Record<string, unknown>;

export interface LineDecoderHandler {
  onMessage(msg: QmpMessage): void;
  onError(err: QsyncError): void;
}

/** Longest line accepted; query-named-block-nodes on a big VM is well under this. */
export const MAX_QMP_LINE = 16 * 1024 * 1024;

export class QmpDecoder {
  #parts: Buffer[] = [];
  #partLen = 0;
  #failed = false;

  constructor(
    private readonly handler: LineDecoderHandler,
    private readonly maxLine = MAX_QMP_LINE,
  ) {}

  write(chunk: Buffer): void {
    let start = 0;
    while (!this.#failed && start < chunk.length) {
      const nl = chunk.indexOf(0x0a, start);
      const end = nl < 0 ? chunk.length : nl;
      if (this.#partLen + end - start > this.maxLine) {
        this.#fail(new QsyncError('PROTOCOL', `QMP line longer than ${this.maxLine} bytes`));
        return;
      }
      if (nl < 0) {
        this.#parts.push(chunk.subarray(start));
        this.#partLen += chunk.length - start;
        return;
      }
      let line = chunk.subarray(start, nl);
      if (this.#partLen) {
        line = Buffer.concat([...this.#parts, line]);
        this.#parts = [];
        this.#partLen = 0;
      }
      start = nl + 1;
      this.#line(line);
    }
  }

  #line(line: Buffer): void {
    const text = line.toString('utf8').trim();
    if (!text) return;
    let msg: unknown;
    try {
      msg = JSON.parse(text);
    } catch (cause) {
      this.#fail(new QsyncError('PROTOCOL', 'QMP sent a line that is not JSON', { line: text.slice(0, 200) }, { cause }));
      return;
    }
    if (typeof msg !== 'object' || msg === null || Array.isArray(msg)) {
      this.#fail(new QsyncError('PROTOCOL', 'QMP sent a JSON value that is not an object', { line: text.slice(0, 200) }));
      return;
    }
    this.handler.onMessage(msg as QmpMessage);
  }

  #fail(err: QsyncError): void {
    this.#failed = true;
    this.#parts = [];
    this.handler.onError(err);
  }
}

export function encodeQmp(msg: QmpMessage): string {
  return JSON.stringify(msg) + '\n';
}
