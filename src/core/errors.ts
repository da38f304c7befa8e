/**
 * One error base for the whole project: a stable `code` the CLI maps to an
 * exit status (src/cli/exit-codes.ts), context fields for the message, and
 * the underlying `cause`.
 */
export type ErrorCode =
  | 'USAGE' // bad flag or operand (rsync exit 1)
  | 'UNSUPPORTED' // an rsync option qsync does not implement (exit 1)
  | 'SOURCE' // source missing or unreadable (exit 23 for a file, 3 for an operand)
  | 'TARGET' // destination unwritable (exit 11)
  | 'LOCKED' // another qsync holds the target, or QEMU holds the image
  | 'FORMAT' // manifest, delta or wire data failed validation
  | 'BASE_MISMATCH' // a delta made for another base
  | 'PROTOCOL' // NBD / QMP / wire protocol violation
  | 'QMP' // QEMU answered a command with an error
  | 'IO' // any other I/O failure
  | 'INTERRUPTED'; // SIGINT/SIGTERM (exit 20)

export interface ErrorContext {
  file?: string;
  offset?: number;
  block?: number;
  hint?: string;
  [key: string]: unknown;
}

export class QsyncError extends Error {
  readonly code: ErrorCode;
  readonly context: ErrorContext;

  constructor(code: ErrorCode, message: string, context: ErrorContext = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'QsyncError';
    this.code = code;
    this.context = context;
  }
}

export const isQsyncError = (e: unknown): e is QsyncError => e instanceof QsyncError;

/** Node's errno code (ENOENT, EACCES ...) of an unknown error, if any. */
export function errnoOf(e: unknown): string | undefined {
  const code = (e as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

/**
 * Control characters as rsync prints them (`\#012` for a newline): a name
 * with a newline or an escape sequence cannot forge a line of the log or
 * drive the terminal of whoever reads it.
 */
export const escapeControls = (s: string): string =>
  s.replace(/[\x00-\x1f\x7f]/g, (c) => `\\#${c.charCodeAt(0).toString(8).padStart(3, '0')}`);
