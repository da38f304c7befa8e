import { spawn } from 'node:child_process';
import { fsync } from 'node:fs';
import { promisify } from 'node:util';

/** fsync(2) of an open descriptor, off this thread. */
export const fsyncFd = promisify(fsync);

/**
 * syncfs(2) of the file system that holds the open file `fd`: everything
 * written to it so far (data, new names, metadata) is durable once this
 * resolves. Node has no syncfs; coreutils' `sync -f` makes the call on the
 * descriptor it is handed as its stdin (`/dev/stdin` reopens that inode, not
 * a path). One call costs about as much as one fsync, whatever was written.
 * When `sync` cannot do it (not installed, the inode not readable by this
 * user), every file in `fallback` is fsync'ed instead.
 */
export async function syncFileSystem(fd: number, fallback: readonly number[]): Promise<void> {
  const ok = await new Promise<boolean>((resolve) => {
    const child = spawn('sync', ['-f', '/dev/stdin'], { stdio: [fd, 'ignore', 'ignore'] });
    child.on('error', () => resolve(false));
    child.on('close', (code) => resolve(code === 0));
  });
  if (!ok) await Promise.all(fallback.map((f) => fsyncFd(f)));
}
