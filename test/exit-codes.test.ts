import { describe, expect, it } from 'vitest';
import { describeExit, EXIT, exitCodeFor } from '../src/cli/exit-codes.js';
import { QsyncError, type ErrorCode } from '../src/core/errors.js';

const sysError = (code: string): Error => Object.assign(new Error(code), { code });

describe('exitCodeFor', () => {
  it('maps every error code to an rsync exit code', () => {
    const expected: Record<ErrorCode, number> = {
      USAGE: 1, UNSUPPORTED: 1, SOURCE: 23, TARGET: 11, LOCKED: 3, FORMAT: 12, BASE_MISMATCH: 12,
      PROTOCOL: 12, QMP: 5, IO: 11, INTERRUPTED: 20,
    };
    for (const [code, exit] of Object.entries(expected)) {
      expect(exitCodeFor(new QsyncError(code as ErrorCode, 'x')), code).toBe(exit);
    }
  });

  it('refines I/O failures by errno', () => {
    expect(exitCodeFor(new QsyncError('IO', 'x', {}, { cause: sysError('ECONNRESET') }))).toBe(10);
    expect(exitCodeFor(sysError('EPIPE'))).toBe(10);
    expect(exitCodeFor(sysError('ETIMEDOUT'))).toBe(30);
    expect(exitCodeFor(sysError('ENOSPC'))).toBe(11);
    expect(exitCodeFor(new QsyncError('TARGET', 'x', {}, { cause: sysError('ECONNRESET') }))).toBe(11);
  });

  it('treats aborts as signals and anything else as a fatal I/O error', () => {
    expect(exitCodeFor(Object.assign(new Error('aborted'), { name: 'AbortError' }))).toBe(20);
    expect(exitCodeFor(new TypeError('bug'))).toBe(11);
    expect(exitCodeFor('a string')).toBe(11);
    expect(exitCodeFor(null)).toBe(11);
  });

  it('describes exit codes in rsync words', () => {
    expect(describeExit(EXIT.PARTIAL.code)).toBe(
      'qsync error: some files/attrs were not transferred (see previous errors) (code 23)',
    );
    expect(describeExit(99)).toBe('qsync error: unexplained error (code 99)');
  });
});
