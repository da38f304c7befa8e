import { open } from 'node:fs/promises';

/** fsync a folder, so that a rename or a new name in it is durable. */
export async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
