/**
 * Each test file gets qsync state folders of its own (QSYNC_STATE_DIR, read
 * by the CLI and by the modules the tests import), removed after the file:
 * no test sees another's manifests, and nothing lands in /var/lib/qsync.
 * Runs as nobody get a base of nobody's (a state folder must belong to the
 * user running qsync).
 */
import { chmodSync, chownSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll } from 'vitest';

const base = mkdtempSync('/tmp/qsync-test-state-');
chmodSync(base, 0o711);
process.env.QSYNC_STATE_DIR = join(base, 'root');
const nobody = join(base, 'nobody');
mkdirSync(nobody, { mode: 0o700 });
chownSync(nobody, 65534, 65534);
process.env.QSYNC_TEST_NOBODY_STATE_DIR = nobody;

afterAll(() => rmSync(base, { recursive: true, force: true }));
