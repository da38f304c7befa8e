/**
 * QEMU takes OFD locks on the images it has open. A qcow2 copied byte by byte
 * while a VM writes to it is inconsistent, so file mode looks the source up
 * in /proc/locks and refuses it, pointing to image mode.
 */
import { readFile } from 'node:fs/promises';
import { majorMinor } from '../io/dev-numbers.js';

/** The "MAJ:MIN:INODE" key /proc/locks uses (major/minor in hex). */
function lockKey(dev: number, ino: number | bigint): string {
  const [major, minor] = majorMinor(dev);
  const hex = (n: number) => n.toString(16).padStart(2, '0');
  return `${hex(major)}:${hex(minor)}:${ino}`;
}

/** How long one read of /proc/locks answers for: a walk checks every file, thousands a second. */
const TABLE_MS = 100;
let table: { at: number; keys: Promise<Set<string>> } | undefined;

/** The lock keys of /proc/locks that a process other than this one holds, read at most every TABLE_MS. */
function lockedByOthers(maxAgeMs: number): Promise<Set<string>> {
  const now = performance.now();
  if (!table || now - table.at > maxAgeMs) {
    const keys = readFile('/proc/locks', 'latin1').then(
      (text) => {
        const out = new Set<string>();
        for (const line of text.split('\n')) {
          // "1: OFDLCK ADVISORY READ -1 fd:01:123 100 101" or "... POSIX ADVISORY WRITE 1234 fd:01:123 0 EOF"
          const f = line.trim().split(/\s+/);
          const i = f.findIndex((x) => /^[0-9a-f]+:[0-9a-f]+:\d+$/.test(x));
          if (i > 0 && f[i - 1] !== String(process.pid)) out.add(f[i]!);
        }
        return out;
      },
      () => new Set<string>(),
    );
    table = { at: now, keys };
  }
  return table.keys;
}

/** True when some process other than us holds a lock on the file (dev, ino); `maxAgeMs` 0: read /proc/locks now. */
export async function isLockedByOther(dev: number, ino: number | bigint, maxAgeMs = TABLE_MS): Promise<boolean> {
  return (await lockedByOthers(maxAgeMs)).has(lockKey(dev, ino));
}
