import { execFileSync } from 'node:child_process';
import { constants } from 'node:fs';
import { chmod, lstat, mkdir, mkdtemp, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { QsyncError } from '../src/core/errors.js';
import { checkName, Dir, isTempNameFor, openRegular, setMetaAt, splitPath } from '../src/io/safe-fs.js';

let root: string;
beforeEach(async () => {
  root = await mkdtemp(join(tmpdir(), 'qsync-safefs-'));
});
afterEach(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('safe-fs', () => {
  it('reaches entries by descriptor: a directory renamed away and replaced by a symlink is not followed', async () => {
    await mkdir(join(root, 'd'));
    await mkdir(join(root, 'victim'));
    const d = await Dir.open(join(root, 'd'));
    try {
      // The held directory moves; the path now names a symlink to the victim.
      execFileSync('mv', [join(root, 'd'), join(root, 'moved')]);
      await symlink(join(root, 'victim'), join(root, 'd'));
      const fh = await d.createFile('f', 0o600);
      await fh.close();
      await expect(stat(join(root, 'moved', 'f'))).resolves.toBeDefined();
      await expect(stat(join(root, 'victim', 'f'))).rejects.toThrow();
    } finally {
      await d.close();
    }
  });

  it('refuses a symlink in place of a subdirectory or a file', async () => {
    await writeFile(join(root, 'secret'), 'root only');
    await symlink(root, join(root, 'ld'));
    await symlink(join(root, 'secret'), join(root, 'lf'));
    const d = await Dir.open(root);
    try {
      await expect(d.openDir('ld')).rejects.toMatchObject({ code: expect.stringMatching(/ELOOP|ENOTDIR/) });
      await expect(d.openFile('lf', constants.O_RDONLY)).rejects.toThrow(/is a symlink/);
      await expect(d.openBeneath('ld/x')).rejects.toBeDefined();
    } finally {
      await d.close();
    }
  });

  it('a FIFO in place of a file is refused at once, not waited on', async () => {
    execFileSync('mkfifo', [join(root, 'p')]);
    const t0 = Date.now();
    const err = await openRegular(join(root, 'p'), constants.O_RDONLY).catch((e) => e);
    expect(err).toBeInstanceOf(QsyncError);
    expect(String(err.message)).toMatch(/is a FIFO, not a regular file/);
    expect(Date.now() - t0).toBeLessThan(5000);
  });

  it('createTemp makes an unpredictable name with the mode asked, never over an existing one', async () => {
    const d = await Dir.open(root);
    try {
      const a = await d.createTemp('vm.img', 0o600);
      const b = await d.createTemp('vm.img', 0o600);
      await a.fh.close();
      await b.fh.close();
      expect(a.name).not.toBe(b.name);
      // A later run knows them as temps made for vm.img, and nothing else as such.
      expect(isTempNameFor(a.name, 'vm.img') && isTempNameFor(b.name, 'vm.img')).toBe(true);
      for (const other of ['vm.img', '.vm.img.tmp', '.vm.img.0123456789ab.tmpx', '.vm.imgx.0123456789ab.tmp']) expect(isTempNameFor(other, 'vm.img')).toBe(false);
      expect((await lstat(join(root, a.name))).mode & 0o777).toBe(0o600);
    } finally {
      await d.close();
    }
  });

  it('setMetaAt changes the checked inode and refuses an entry of another type', async () => {
    await writeFile(join(root, 'f'), 'x');
    await chmod(join(root, 'f'), 0o600);
    const fst = await lstat(join(root, 'f'), { bigint: true });
    const d = await Dir.open(root);
    try {
      await setMetaAt(d, 'f', fst, { mode: 0o640, mtime: 1_000_000 });
      const st = await stat(join(root, 'f'));
      expect(st.mode & 0o777).toBe(0o640);
      expect(st.mtimeMs).toBe(1_000_000_000);
      // Swapped for a symlink to a victim: refused, the victim keeps its mode.
      await writeFile(join(root, 'victim'), 'v');
      await chmod(join(root, 'victim'), 0o600);
      await rm(join(root, 'f'));
      await symlink(join(root, 'victim'), join(root, 'f'));
      await expect(setMetaAt(d, 'f', fst, { mode: 0o666 })).rejects.toThrow(/changed while qsync worked on it/);
      expect((await stat(join(root, 'victim'))).mode & 0o777).toBe(0o600);
      expect(await readFile(join(root, 'victim'), 'utf8')).toBe('v');
    } finally {
      await d.close();
    }
  });

  it('names are single components; paths split at their last slash', () => {
    for (const bad of ['', '.', '..', 'a/b', 'a\0b']) expect(() => checkName(bad)).toThrow(QsyncError);
    expect(checkName('.qsync')).toBe('.qsync');
    expect(splitPath('/a/b/')).toEqual({ dir: '/a', name: 'b' });
    expect(splitPath('b')).toEqual({ dir: '.', name: 'b' });
    expect(splitPath('/b')).toEqual({ dir: '/', name: 'b' });
  });
});
