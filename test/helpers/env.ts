import { execFileSync } from 'node:child_process';

/** True when `tool` is on PATH. */
export function hasTool(tool: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/**
 * For `describe.skipIf(!needTools(...))`: tests that need real QEMU/rsync/sshd
 * skip on a machine without them, except under QSYNC_REQUIRE_QEMU=1 (CI),
 * where a missing tool is a failure.
 */
export function needTools(...tools: string[]): boolean {
  const missing = tools.filter((t) => !hasTool(t));
  if (missing.length && process.env.QSYNC_REQUIRE_QEMU === '1') {
    throw new Error(`QSYNC_REQUIRE_QEMU=1 but missing: ${missing.join(', ')} (run scripts/setup)`);
  }
  return missing.length === 0;
}

/**
 * Run `mount ARGS...` for a test (needs root). False where mounting is not
 * allowed (the test then skips), except under QSYNC_REQUIRE_QEMU=1 (CI), where it is a failure.
 */
export function mountForTest(args: string[]): boolean {
  try {
    execFileSync('mount', args);
    return true;
  } catch {
    if (process.env.QSYNC_REQUIRE_QEMU === '1') throw new Error(`cannot mount ${args.join(' ')} for this test (needs root)`);
    return false;
  }
}
