/**
 * One error base for the whole project: a stable `code` the CLI maps to an
 * exit status (src/cli/exit-codes.ts), context fields for the message, and
 * the underlying `cause`.
 */
import { constants as osConstants } from 'node:os';
const ERROR_CODES = [
  'USAGE', // bad flag or operand (rsync exit 1)
  'UNSUPPORTED', // an rsync option qsync does not implement (exit 1)
  'SOURCE', // source missing or unreadable (exit 23 for a file, 3 for an operand)
  'TARGET', // destination unwritable (exit 11)
  'LOCKED', // another qsync holds the target, or QEMU holds the image
  'FORMAT', // manifest, delta or wire data failed validation
  'BASE_MISMATCH', // a delta made for another base
  'PROTOCOL', // NBD / QMP / wire protocol violation
  'QMP', // QEMU answered a command with an error
  'IO', // any other I/O failure
  'INTERRUPTED', // SIGINT/SIGTERM (exit 20)
] as const;
export type ErrorCode = (typeof ERROR_CODES)[number];

/** Whether `v` (a peer's word, say) is one of the codes. */
export const isErrorCode = (v: unknown): v is ErrorCode => (ERROR_CODES as readonly unknown[]).includes(v);

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

/** A Node system error's message, and its code and description when it has the "CODE: description, syscall ..." form. */
function errnoParts(e: unknown): { message: string; code?: string; text?: string } {
  const message = (e as Error | null)?.message ?? String(e);
  const m = /^([A-Z0-9]+): ([^,]+)/.exec(message);
  return m ? { message, code: m[1], text: m[2] } : { message };
}

/**
 * What a Node system error says, without the path it names (qsync reaches
 * files through /proc/self/fd/N/NAME, which tells a user nothing):
 * "EACCES: permission denied, open '/proc/self/fd/27/f'" → "permission denied (EACCES)".
 */
export function errnoText(e: unknown): string {
  const p = errnoParts(e);
  return p.text !== undefined ? `${p.text} (${p.code})` : p.message;
}

/** A system error as rsync words it: "No such file or directory (2)" (strerror and the errno's number, `number` false: without); else errnoText. */
export function rsyncErrnoText(e: unknown, number = true): string {
  const code = errnoOf(e);
  const num = code === undefined ? undefined : (osConstants.errno as Record<string, number>)[code];
  const { text } = errnoParts(e);
  return num !== undefined && text !== undefined ? `${text[0]!.toUpperCase()}${text.slice(1)}${number ? ` (${num})` : ''}` : errnoText(e);
}
