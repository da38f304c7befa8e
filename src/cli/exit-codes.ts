/**
 * rsync's exit codes, and the one table from QsyncError codes to them.
 * Scripts written for rsync keep working: 0 ok, 23/24 a partial transfer,
 * anything else a failure.
 */
import { errnoOf, isQsyncError, type ErrorCode } from '../core/errors.js';

/** rsync's exit codes (rsync(1) "EXIT VALUES") that qsync can return, with rsync's wording. */
export const EXIT = {
  OK: { code: 0, text: 'success' },
  SYNTAX: { code: 1, text: 'syntax or usage error' },
  PROTOCOL: { code: 2, text: 'protocol incompatibility' },
  FILE_SELECT: { code: 3, text: 'errors selecting input/output files, dirs' },
  START_CLIENT: { code: 5, text: 'error starting client-server protocol' },
  SOCKET_IO: { code: 10, text: 'error in socket IO' },
  FILE_IO: { code: 11, text: 'error in file IO' },
  STREAM_IO: { code: 12, text: 'error in protocol data stream' },
  SIGNAL: { code: 20, text: 'received SIGINT, SIGTERM, or SIGHUP' },
  PARTIAL: { code: 23, text: 'some files/attrs were not transferred (see previous errors)' },
  VANISHED: { code: 24, text: 'some files vanished before they could be transferred' },
  DEL_LIMIT: { code: 25, text: 'the --max-delete limit stopped deletions' },
  IPC: { code: 14, text: 'error in IPC code' },
  TIMEOUT: { code: 30, text: 'timeout in data send/receive' },
  REMOTE_SHELL: { code: 255, text: 'unexplained error' },
} as const;

type Exit = (typeof EXIT)[keyof typeof EXIT];

const BY_ERROR: Record<ErrorCode, Exit> = {
  USAGE: EXIT.SYNTAX,
  UNSUPPORTED: EXIT.SYNTAX,
  // rsync exits 23 for a missing source, operand or not, after syncing the rest.
  SOURCE: EXIT.PARTIAL,
  TARGET: EXIT.FILE_IO,
  // The target (another qsync run) or the image (QEMU) cannot be taken: nothing selected, nothing written.
  LOCKED: EXIT.FILE_SELECT,
  FORMAT: EXIT.STREAM_IO,
  BASE_MISMATCH: EXIT.STREAM_IO,
  PROTOCOL: EXIT.STREAM_IO,
  // QEMU refused a command: as rsync failing to get its server side going.
  QMP: EXIT.START_CLIENT,
  IO: EXIT.FILE_IO,
  INTERRUPTED: EXIT.SIGNAL,
};

const SOCKET_ERRNOS = new Set(['ECONNRESET', 'ECONNREFUSED', 'ECONNABORTED', 'EPIPE', 'ENOTCONN', 'EHOSTUNREACH', 'ENETUNREACH']);

/**
 * The exit status for an error that ended the run. An I/O failure (a
 * QsyncError 'IO' or a bare Node system error) is refined by its errno:
 * socket errors → 10, ETIMEDOUT → 30, others → 11. An AbortError (a
 * signal handler aborted the run) → 20. Any other error that is
 * not a QsyncError is a bug; it exits 11 too, rsync's generic fatal status,
 * so that scripts never take it for success, a usage error or a partial
 * transfer.
 */
export function exitCodeFor(err: unknown): number {
  // An error that carries its status: the remote shell's 255, or the far side's own code.
  const given = isQsyncError(err) ? err.context.exit : undefined;
  if (typeof given === 'number' && Number.isInteger(given) && given > 0 && given < 256) return given;
  if (isQsyncError(err) && err.code !== 'IO') return BY_ERROR[err.code].code;
  if ((err as { name?: unknown } | null)?.name === 'AbortError') return EXIT.SIGNAL.code;
  const errno = errnoOf(isQsyncError(err) ? err.cause : err);
  if (errno === 'ETIMEDOUT') return EXIT.TIMEOUT.code;
  if (errno !== undefined && SOCKET_ERRNOS.has(errno)) return EXIT.SOCKET_IO.code;
  return EXIT.FILE_IO.code;
}

/** rsync's closing line for a non-zero status, e.g. "qsync error: error in file IO (code 11)". */
export function describeExit(code: number): string {
  const text = Object.values(EXIT).find((e) => e.code === code)?.text ?? 'unexplained error';
  return `qsync error: ${text} (code ${code})`;
}
