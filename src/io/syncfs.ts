import { spawn } from 'node:child_process';
import type { FileHandle } from 'node:fs/promises';

/**
 * syncfs(2) of the file system that holds the open file `fh`: everything
 * written to it so far (data, new names, metadata) is durable once this
 * resolves. Node has no syncfs; coreutils' `sync -f` makes the call on the
 * descriptor it is handed as its stdin (`/dev/stdin` reopens that inode, not
 * a path). One call costs about as much as one fsync, whatever was written.
 * When `sync` cannot do it (not installed, the inode not readable by this
 * user), every file in `fallback` is fsync'ed instead.
 */
export async function syncFileSystem(fh: FileHandle, fallback: readonly FileHandle[]): Promise<void> {
  const ok = await new Promise<boolean>((resolve) => {
    const child = spawn('sync', ['-f', '/dev/stdin'], { stdio: [fh.fd, 'ignore', 'ignore'] });
    child.on('error', () => resolve(false));
    child.on('close', (code) => resolve(code === 0));
  });
  if (!ok) await Promise.all(fallback.map((f) => f.sync()));
}
