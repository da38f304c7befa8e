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
