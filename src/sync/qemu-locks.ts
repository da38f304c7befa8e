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

/** True when some process other than us holds a lock on the file (dev, ino). */
export async function isLockedByOther(dev: number, ino: number | bigint): Promise<boolean> {
  const table = await readFile('/proc/locks', 'latin1').catch(() => '');
  const key = lockKey(dev, ino);
  return table.split('\n').some((line) => {
    const f = line.trim().split(/\s+/);
    // "1: OFDLCK ADVISORY READ -1 fd:01:123 100 101" or "... POSIX ADVISORY WRITE 1234 fd:01:123 0 EOF"
    const i = f.findIndex((x) => x === key);
    return i > 0 && f[i - 1] !== String(process.pid);
  });
}
