/**
 * qsync's state folder (outside DEST: manifests, journals, intents, the lock,
 * temp files, image state, digest scratch) under attack and after crashes:
 * nothing in it is followed, waited on forever, trusted when it should not
 * be, or left readable by other users. End to end through the built CLI,
 * and the modules (from dist/) where a CLI run cannot reach the case.
 */
import { execFileSync, spawn } from 'node:child_process';
import {
  chmodSync,
  chownSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  truncateSync,
  utimesSync,
  writeFileSync,
  openSync,
  writeSync,
  closeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { randomFile } from './helpers/data.js';
import { mountForTest } from './helpers/env.js';
import { NOBODY, runQsync, sha256, stateOf, stateSlot, type RunResult } from './helpers/cli.js';

const DIST = join(import.meta.dirname, '../dist/src');
const KiB = 1024;
const MiB = 1 << 20;
const BOOT_ID = readFileSync('/proc/sys/kernel/random/boot_id', 'latin1').trim();

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'qsync-state-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

/** Run the CLI, killed after `ms`: a hang is a result (timedOut), not a stuck test. */
async function runWithin(args: string[], ms = 20_000): Promise<RunResult & { timedOut: boolean }> {
  let timer: NodeJS.Timeout | undefined;
  let timedOut = false;
  const r = await runQsync(args, {
    onSpawn: (pid) => {
      timer = setTimeout(() => {
        timedOut = true;
        process.kill(pid, 'SIGKILL');
      }, ms);
    },
  });
  clearTimeout(timer);
  return { ...r, timedOut };
}

interface Synced {
  src: string;
  dest: string;
  file: string;
  target: string;
  state: string;
  manifest: string;
}

/** A source folder with one 1 MiB file, synced once: the destination has its manifest. */
async function synced(size = MiB): Promise<Synced> {
  const src = join(dir, 'src');
  const dest = join(dir, 'dest');
  mkdirSync(src);
  randomFile(join(src, 'f.img'), size);
  const r = await runWithin(['-a', `${src}/`, dest]);
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  const state = join(stateOf(dest), 'manifests');
  return { src, dest, file: join(src, 'f.img'), target: join(dest, 'f.img'), state, manifest: join(state, 'f.img.qsm') };
}

/** Change a few blocks of the source so that the next run is manifest-based (intent, journal). */
function touchSource(s: Synced): void {
  const fd = openSync(s.file, 'r+');
  writeSync(fd, Buffer.alloc(100, 7), 0, 100, 3 * 64 * KiB + 5);
  closeSync(fd);
  const t = Date.now() / 1000 + 10;
  utimesSync(s.file, t, t);
}

/** Overwrite target bytes behind qsync's back, keeping the target's size and mtime equal to the source's. */
function spoilTargetKeepingTimes(s: Synced): void {
  const fd = openSync(s.target, 'r+');
  writeSync(fd, Buffer.alloc(4096, 0xee), 0, 4096, 5 * 64 * KiB);
  closeSync(fd);
  execFileSync('touch', ['-r', s.file, s.target]); // to the nanosecond
}

const victim = (): string => {
  const v = join(dir, 'victim');
  writeFileSync(v, 'precious\n');
  return v;
};

async function expectSame(a: string, b: string): Promise<void> {
  expect(await sha256(b)).toBe(await sha256(a));
}

/**
 * Leave the manifest as a crash between making its patch journal durable and
 * applying it would: the old manifest, and the journal that turns it into the new one.
 */
async function leavePendingJournal(s: Synced): Promise<void> {
  const { encodeJournal } = await import(join(DIST, 'sync/manifest-store.js'));
  const before = readFileSync(s.manifest);
  touchSource(s);
  expect((await runWithin(['-a', `${s.src}/`, s.dest])).code).toBe(0);
  const after = readFileSync(s.manifest);
  const changed: number[] = [];
  const digests: Buffer[] = [];
  for (let i = 0; i < 16; i++) {
    const d = after.subarray(80 + i * 32, 112 + i * 32);
    if (!d.equals(before.subarray(80 + i * 32, 112 + i * 32))) (changed.push(i), digests.push(d));
  }
  expect(changed).toEqual([3]);
  writeFileSync(s.manifest, before);
  writeFileSync(`${s.manifest}.journal`, encodeJournal(changed, Buffer.concat(digests), after.subarray(0, 80), after.subarray(after.length - 64), after.length - 64));
}

describe('A: nothing in the state folder is followed; it is private', () => {
  it('a symlinked intent is refused, its target unchanged', async () => {
    const s = await synced();
    const v = victim();
    symlinkSync(v, `${s.manifest}.intent`);
    touchSource(s);
    const r = await runWithin(['-a', `${s.src}/`, s.dest]);
    expect(r.timedOut).toBe(false);
    expect(readFileSync(v, 'utf8')).toBe('precious\n');
    expect(r.stderr).toMatch(/f\.img\.qsm\.intent is a symlink/);
    expect(r.stderr).not.toMatch(/internal|    at /);
  });

  it('a symlinked journal is never followed: its target unchanged, the run finishes', async () => {
    const s = await synced();
    const v = victim();
    symlinkSync(v, `${s.manifest}.journal`);
    touchSource(s);
    const r = await runWithin(['-a', `${s.src}/`, s.dest]);
    expect(r.timedOut).toBe(false);
    expect(readFileSync(v, 'utf8')).toBe('precious\n');
    expect(r.stderr).toMatch(/f\.img\.qsm\.journal is a symlink/);
  });

  it('a lock that is a symlink, a directory or a FIFO: clear message, nothing followed, no hang', async () => {
    const s = await synced();
    const lock = join(stateOf(s.dest), 'lock');
    const v = victim();
    symlinkSync(v, lock);
    let r = await runWithin(['-a', `${s.src}/`, s.dest]);
    expect(readFileSync(v, 'utf8')).toBe('precious\n');
    expect(r.stderr).toMatch(/lock is a symlink/);
    rmSync(lock);
    mkdirSync(lock);
    r = await runWithin(['-a', `${s.src}/`, s.dest]);
    expect(r.stderr).toMatch(/lock is a directory, not a regular file; remove it/);
    expect(r.stderr).not.toMatch(/internal/);
    rmSync(lock, { recursive: true });
    execFileSync('mkfifo', [lock]);
    r = await runWithin(['-a', `${s.src}/`, s.dest], 15_000);
    expect(r.timedOut).toBe(false);
    expect(r.stderr).toMatch(/lock is a FIFO, not a regular file; remove it/);
  });

  it('a state folder that is a symlink, or belongs to another user, is refused: nothing written through it', async () => {
    const src = join(dir, 'src');
    const dest = join(dir, 'dest');
    const elsewhere = join(dir, 'elsewhere');
    mkdirSync(src);
    mkdirSync(dest);
    mkdirSync(elsewhere);
    randomFile(join(src, 'f.img'), 256 * KiB);
    symlinkSync(elsewhere, stateSlot(dest));
    let r = await runWithin(['-a', `${src}/`, dest]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/is a symlink or not a folder/);
    expect(readdirSync(elsewhere)).toEqual([]);
    rmSync(stateOf(dest));
    mkdirSync(stateOf(dest));
    chownSync(stateOf(dest), 65534, 65534);
    r = await runWithin(['-a', `${src}/`, dest]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/belongs to uid 65534, not to the user running qsync/);
    expect(readdirSync(stateOf(dest))).toEqual([]);
  });

  it('state folders are 0700 and state files 0600, whatever the umask', async () => {
    const s = await synced();
    for (const d of [stateOf(s.dest), s.state]) expect(statSync(d).mode & 0o777).toBe(0o700);
    expect(statSync(s.manifest).mode & 0o777).toBe(0o600);
    // A patched manifest keeps its mode; folders of an older qsync (0755) are made private.
    execFileSync('chmod', ['0755', stateOf(s.dest), s.state]);
    touchSource(s);
    expect((await runWithin(['-a', `${s.src}/`, s.dest])).code).toBe(0);
    for (const d of [stateOf(s.dest), s.state]) expect(statSync(d).mode & 0o777).toBe(0o700);
    expect(statSync(s.manifest).mode & 0o777).toBe(0o600);
  });

  it('--manifest PATH follows the folders the user gave, but not a symlink as its last component', async () => {
    const src = join(dir, 'one.img');
    randomFile(src, 128 * KiB);
    const real = join(dir, 'real');
    mkdirSync(real);
    symlinkSync(real, join(dir, 'link'));
    let r = await runWithin(['-a', '--manifest', join(dir, 'link', 'one.qsm'), src, join(dir, 'copy.img')]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(statSync(join(real, 'one.qsm')).mode & 0o777).toBe(0o600);
    const v = victim();
    symlinkSync(v, join(dir, 'evil.qsm'));
    r = await runWithin(['-a', '--manifest', join(dir, 'evil.qsm'), src, join(dir, 'copy.img')]);
    expect(r.stderr).toMatch(/evil\.qsm is a symlink/);
    expect(readFileSync(v, 'utf8')).toBe('precious\n');
  });

  it('temp files are created O_EXCL under unpredictable names: a symlink at the old predictable name is not followed', async () => {
    const { ManifestWriter } = await import(join(DIST, 'sync/manifest-store.js'));
    const folder = join(stateOf(join(dir, 'dest')), 'manifests');
    mkdirSync(folder, { recursive: true, mode: 0o700 });
    const v = victim();
    symlinkSync(v, join(folder, `.f.qsm.tmp-${process.pid}`));
    const w = await ManifestWriter.create(join(folder, 'f.qsm'), 65536, 65536);
    await w.append(Buffer.alloc(32, 1));
    await w.commit({ sourceSize: 65536, sourceMtimeNs: 1n, targetMtimeNs: 1n, targetIno: 1n, targetDev: 1n });
    expect(readFileSync(v, 'utf8')).toBe('precious\n');
    expect(statSync(join(folder, 'f.qsm')).size).toBe(80 + 32 + 64);
    expect(statSync(join(folder, 'f.qsm')).mode & 0o777).toBe(0o600);
  });

  it('image state is written 0600 in a 0700 folder, never through a symlink', async () => {
    const { writeImageState, readImageState, imageStatePath } = await import(join(DIST, 'sync/image-state.js'));
    const dest = join(dir, 'dest');
    mkdirSync(dest);
    const p = imageStatePath(dest, 'vda');
    const st = { node: 'n', bitmap: 'b', baseChecksum: 'c', size: 1 };
    await writeImageState(p, st);
    expect(statSync(join(stateOf(dest), 'image')).mode & 0o777).toBe(0o700);
    expect(statSync(p).mode & 0o777).toBe(0o600);
    expect(await readImageState(p)).toEqual(st);
    const v = victim();
    rmSync(p);
    symlinkSync(v, p);
    await expect(readImageState(p)).rejects.toThrow(/vda\.json is a symlink/);
    expect(readFileSync(v, 'utf8')).toBe('precious\n');
  });
  it('--delete forgets manifests through the state folder: a symlink inside it is not followed', async () => {
    const src = join(dir, 'src');
    const dest = join(dir, 'dest');
    mkdirSync(join(src, 'a', 'b'), { recursive: true });
    randomFile(join(src, 'a', 'b', 'f.img'), 320 * KiB); // not small: it gets a manifest
    expect((await runWithin(['-a', `${src}/`, dest])).code).toBe(0);
    // Someone swapped the manifests of a/ for a symlink to a folder of theirs.
    const theirs = join(dir, 'theirs');
    mkdirSync(join(theirs, 'b'), { recursive: true });
    writeFileSync(join(theirs, 'b', 'precious'), 'precious\n');
    rmSync(join(stateOf(dest), 'manifests', 'a'), { recursive: true });
    symlinkSync(theirs, join(stateOf(dest), 'manifests', 'a'));
    rmSync(join(src, 'a', 'b'), { recursive: true });
    const r = await runWithin(['-a', '--delete', `${src}/`, dest]);
    expect(readFileSync(join(theirs, 'b', 'precious'), 'utf8')).toBe('precious\n');
    expect(r.stderr).toMatch(/manifests\/a is a symlink or not a folder/);
  });

  it('a symlinked apply intent is refused, its target unchanged', async () => {
    const s = await synced();
    const there = join(dir, 'there');
    mkdirSync(there);
    execFileSync('cp', ['-p', s.target, join(there, 'f.img')]);
    touchSource(s);
    const batch = join(dir, 'ship.qdelta');
    expect((await runWithin(['-a', `--only-write-batch=${batch}`, `${s.src}/`, s.dest])).code).toBe(0);
    mkdirSync(join(stateOf(there), 'manifests'), { recursive: true, mode: 0o700 });
    const v = victim();
    symlinkSync(v, join(stateOf(there), 'manifests', 'f.img.qsm.apply'));
    const r = await runWithin([`--read-batch=${batch}`, `${there}/`]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/f\.img\.qsm\.apply is a symlink/);
    expect(readFileSync(v, 'utf8')).toBe('precious\n');
  });
});

describe('B: an untrusted manifest means the run really compares', () => {
  it('a corrupt manifest: the next run makes the target equal the source (not skipped by size and mtime)', async () => {
    const s = await synced();
    spoilTargetKeepingTimes(s);
    const fd = openSync(s.manifest, 'r+');
    writeSync(fd, Buffer.from([0xff]), 0, 1, 100);
    closeSync(fd);
    const r = await runWithin(['-a', `${s.src}/`, s.dest]);
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/failed its checksum.*comparing source and target/);
    await expectSame(s.file, s.target);
  });

  it('an intent from another boot: compare, and the target equals the source', async () => {
    const s = await synced();
    spoilTargetKeepingTimes(s);
    const m = readFileSync(s.manifest);
    writeFileSync(`${s.manifest}.intent`, intent('another-boot-0000-0000-000000000000', m.subarray(m.length - 32), MiB, MiB, [5]));
    const r = await runWithin(['-a', `${s.src}/`, s.dest]);
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/cannot be bounded/);
    await expectSame(s.file, s.target);
  });

  it('a leftover intent listing no block does not turn off the target mtime check (with and without -c)', async () => {
    for (const flags of [['-a'], ['-a', '-c']]) {
      rmSync(join(dir, 'src'), { recursive: true, force: true });
      rmSync(join(dir, 'dest'), { recursive: true, force: true });
      const s = await synced();
      const m = readFileSync(s.manifest);
      writeFileSync(`${s.manifest}.intent`, intent(BOOT_ID, m.subarray(m.length - 32), MiB, MiB, []));
      // Changed behind qsync's back: same size, new mtime.
      const fd = openSync(s.target, 'r+');
      writeSync(fd, Buffer.alloc(4096, 0xee), 0, 4096, 2 * 64 * KiB);
      closeSync(fd);
      const r = await runWithin([...flags, `${s.src}/`, s.dest]);
      expect(r.code).toBe(0);
      await expectSame(s.file, s.target);
    }
  });
});

describe('B (-c)', () => {
  it('-c does not take an interrupted run\'s manifest on trust: a target changed behind qsync is compared and fixed', async () => {
    const s = await synced();
    const m = readFileSync(s.manifest);
    // An interrupted run of this boot listed block 5; block 2 was changed by someone else.
    writeFileSync(`${s.manifest}.intent`, intent(BOOT_ID, m.subarray(m.length - 32), MiB, MiB, [5]));
    const fd = openSync(s.target, 'r+');
    writeSync(fd, Buffer.alloc(4096, 0xee), 0, 4096, 2 * 64 * KiB);
    closeSync(fd);
    const r = await runWithin(['-a', '-c', `${s.src}/`, s.dest]);
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/target changed since the last run.*comparing source and target/);
    await expectSame(s.file, s.target);
  });
});

/** An intent record (docs/FORMATS.md "Intent record"). */
function intent(boot: string, baseChecksum: Buffer, oldSize: number, newSize: number, blocks: number[]): Buffer {
  const b = Buffer.alloc(96 + blocks.length * 8);
  b.write('QSYNCINT', 0, 'latin1');
  b.writeUInt32LE(1, 8);
  b.write(boot.padEnd(36).slice(0, 36), 12, 'latin1');
  baseChecksum.copy(b, 48);
  b.writeBigUInt64LE(BigInt(oldSize), 80);
  b.writeBigUInt64LE(BigInt(newSize), 88);
  blocks.forEach((n, i) => b.writeBigUInt64LE(BigInt(n), 96 + i * 8));
  return b;
}

describe('C: the lock', () => {
  /** A child process that takes the lock, proves it alone holds it with an O_EXCL marker, and lets go. */
  const HOLDER = `
    const { lockDestination } = await import(process.argv[1]);
    const fs = await import('node:fs');
    const [dest, marker] = process.argv.slice(2);
    let lock;
    try { lock = await lockDestination(dest); } catch (e) { console.log(e.code === 'LOCKED' ? 'locked' : 'error ' + e.message); process.exit(0); }
    try { fs.writeFileSync(marker, String(process.pid), { flag: 'wx' }); } catch { console.log('BOTH'); process.exit(0); }
    await new Promise((r) => setTimeout(r, 150));
    fs.rmSync(marker);
    await lock.release();
    console.log('held');
  `;
  const holder = (dest: string, marker: string): Promise<string> =>
    new Promise((resolve) => {
      const c = spawn('node', ['--input-type=module', '-e', HOLDER, join(DIST, 'sync/lock.js'), dest, marker], { stdio: ['ignore', 'pipe', 'inherit'] });
      let out = '';
      c.stdout.on('data', (d) => (out += d));
      const t = setTimeout(() => c.kill('SIGKILL'), 20_000);
      c.on('close', () => {
        clearTimeout(t);
        resolve(out.trim() || 'killed');
      });
    });

  it('four runs started together on a stale lock: never two holders at once (20 trials)', async () => {
    const state = stateSlot(dir);
    const marker = join(dir, 'held');
    mkdirSync(state, { mode: 0o700 });
    for (let trial = 0; trial < 20; trial++) {
      // A lock left by a dead run of this boot (pid 2^22+1 does not exist; no start time matches).
      writeFileSync(join(state, 'lock'), `4194305 1 ${BOOT_ID}\n`);
      const outs = await Promise.all([0, 1, 2, 3].map(() => holder(dir, marker)));
      expect(outs).not.toContain('BOTH');
      expect(outs.filter((o) => o.startsWith('error') || o === 'killed')).toEqual([]);
      expect(outs.filter((o) => o === 'held').length).toBeGreaterThanOrEqual(1);
      expect(existsSync(join(state, 'lock'))).toBe(false);
      expect(readdirSync(state).filter((n) => n !== 'dest' && n !== 'dest-id')).toEqual([]);
    }
  }, 240_000);

  it('a lock naming a live process that is not its owner (recycled pid, or a record without start time) is taken over', async () => {
    const s = await synced();
    const lock = join(stateOf(s.dest), 'lock');
    for (const rec of [`${process.pid} 1 ${BOOT_ID}\n`, `${process.pid} ${BOOT_ID}\n`]) {
      writeFileSync(lock, rec);
      touchSource(s);
      const r = await runWithin(['-a', `${s.src}/`, s.dest]);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      expect(existsSync(lock)).toBe(false);
    }
  });

  it('a state folder that cannot be written (read-only --state-dir) is a clear error before anything is written', async (ctx) => {
    const ro = join(dir, 'ro');
    mkdirSync(ro);
    if (!mountForTest(['-t', 'tmpfs', '-o', 'ro,size=1m,mode=0700', 'tmpfs', ro])) return ctx.skip('cannot mount a tmpfs here (needs root)');
    try {
      const src = join(dir, 'src');
      mkdirSync(src);
      writeFileSync(join(src, 'f'), 'data\n');
      const r = await runWithin(['-a', '--state-dir', ro, `${src}/`, join(dir, 'dest')]);
      expect(r.code, r.stderr).toBe(11);
      expect(r.stderr).toMatch(/cannot (use|create) qsync's state folder [^/]*\/tmp\/[^ ]*ro\/dest: read-only/);
      expect(r.stderr).toMatch(/--state-dir/);
      expect(existsSync(join(dir, 'dest'))).toBe(false);
    } finally {
      execFileSync('umount', [ro]);
    }
  });

  it('a lock held by a running qsync refuses with exit 3; the lock file is 0600', async () => {
    const { lockDestination } = await import(join(DIST, 'sync/lock.js'));
    const s = await synced();
    const l = await lockDestination(s.dest);
    try {
      expect(statSync(join(stateOf(s.dest), 'lock')).mode & 0o777).toBe(0o600);
      const r = await runWithin(['-a', `${s.src}/`, s.dest]);
      expect(r.code).toBe(3);
      expect(r.stderr).toMatch(new RegExp(`another qsync \\(pid ${process.pid}\\)`));
    } finally {
      await l.release();
    }
  });
});

describe('D: no state file hangs a run or sticks it in a failure', () => {
  for (const which of ['manifest', 'journal', 'intent'] as const) {
    it(`a FIFO as the ${which}: the run ends with a clear message`, async () => {
      const s = await synced();
      const p = which === 'manifest' ? s.manifest : `${s.manifest}.${which}`;
      rmSync(p, { force: true });
      execFileSync('mkfifo', [p]);
      touchSource(s);
      const r = await runWithin(['-a', `${s.src}/`, s.dest], 15_000);
      expect(r.timedOut).toBe(false);
      expect(r.stderr).toMatch(/is a FIFO, not a regular file; remove it/);
    });
  }

  it('/dev/zero as the journal (a device node, or a symlink to it): refused, never read', async (ctx) => {
    const s = await synced();
    const j = `${s.manifest}.journal`;
    symlinkSync('/dev/zero', j);
    touchSource(s);
    let r = await runWithin(['-a', `${s.src}/`, s.dest], 15_000);
    expect(r.timedOut).toBe(false);
    expect(r.stderr).toMatch(/f\.img\.qsm\.journal is a symlink/);
    rmSync(j);
    try {
      execFileSync('mknod', [j, 'c', '1', '5']);
    } catch {
      return ctx.skip('cannot make a device node here (needs root)');
    }
    r = await runWithin(['-a', `${s.src}/`, s.dest], 15_000);
    expect(r.timedOut).toBe(false);
    expect(r.stderr).toMatch(/f\.img\.qsm\.journal is a device, not a regular file; remove it/);
  });

  it('a manifest that is a directory or a symlink loop: clear message, no hang', async () => {
    const s = await synced();
    rmSync(s.manifest);
    mkdirSync(s.manifest);
    touchSource(s);
    let r = await runWithin(['-a', `${s.src}/`, s.dest]);
    expect(r.stderr).toMatch(/f\.img\.qsm is a directory, not a regular file; remove it/);
    rmSync(s.manifest, { recursive: true });
    symlinkSync('f.img.qsm', s.manifest);
    r = await runWithin(['-a', `${s.src}/`, s.dest]);
    expect(r.timedOut).toBe(false);
    expect(r.stderr).toMatch(/f\.img\.qsm is a symlink/);
  });

  it('a huge journal is not read whole: dropped as torn, the run finishes and the manifest stays trusted', async () => {
    const s = await synced();
    writeFileSync(`${s.manifest}.journal`, '');
    truncateSync(`${s.manifest}.journal`, 8 * 1024 * MiB);
    touchSource(s);
    const r = await runWithin(['-a', `${s.src}/`, s.dest]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(existsSync(`${s.manifest}.journal`)).toBe(false);
    await expectSame(s.file, s.target);
  });

  it('a whole journal whose offsets do not fit its manifest (≥ 1 TiB): dropped, compare, and every later run succeeds', async () => {
    const { encodeJournal } = await import(join(DIST, 'sync/manifest-store.js'));
    const s = await synced();
    const m = readFileSync(s.manifest);
    spoilTargetKeepingTimes(s);
    const far = 2 ** 36; // block 2^36 × 32 bytes: 2 TiB into the manifest
    writeFileSync(`${s.manifest}.journal`, encodeJournal([far], Buffer.alloc(32, 9), m.subarray(0, 80), m.subarray(m.length - 64), m.length - 64));
    let r = await runWithin(['-a', `${s.src}/`, s.dest]);
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/patch journal that does not fit it.*comparing source and target/);
    await expectSame(s.file, s.target);
    expect(existsSync(`${s.manifest}.journal`)).toBe(false);
    expect(statSync(s.manifest).size).toBe(80 + 16 * 32 + 64);
    touchSource(s);
    r = await runWithin(['-a', `${s.src}/`, s.dest]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    await expectSame(s.file, s.target);
  });

  it('qsync verify writes nothing to the state folder: a pending journal is applied in memory', async () => {
    const s = await synced();
    await leavePendingJournal(s);
    execFileSync('chmod', ['0755', s.state]); // as an older qsync left it: verify does not tighten it either
    const snapshot = () => [
      statSync(s.state).mode,
      ...readdirSync(s.state).map((n) => `${n}:${readFileSync(join(s.state, n)).toString('hex')}:${lstatSync(join(s.state, n)).mtimeMs}`),
    ];
    const was = snapshot();
    const r = await runWithin(['verify', s.target]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(snapshot()).toEqual(was);
  });

  it('reading state writes nothing: a dry run and qsync verify work on a read-only state folder, with a journal pending', async (ctx) => {
    const s = await synced();
    await leavePendingJournal(s);
    const base = process.env.QSYNC_STATE_DIR!;
    const ro = join(dir, 'ro-state');
    mkdirSync(ro, { mode: 0o700 });
    if (!mountForTest(['--bind', base, ro])) return ctx.skip('cannot bind-mount here (needs root)');
    execFileSync('mount', ['-o', 'remount,ro,bind', ro]);
    try {
      touchSource(s);
      const dry = await runWithin(['-a', '-n', '-v', '--state-dir', ro, `${s.src}/`, `${s.dest}/`]);
      expect(dry.stderr).toBe('');
      expect(dry.code).toBe(0);
      expect(dry.stdout).toMatch(/f\.img/);
      const v = await runWithin(['verify', '--state-dir', ro, join(s.dest, 'f.img')]);
      expect(v.stderr).toBe('');
      expect(v.code).toBe(0);
    } finally {
      execFileSync('umount', [ro]);
    }
  });

  it('temp files of killed runs are removed when a run commits in their folder; other files stay', async () => {
    const s = await synced();
    const stale = ['.f.img.qsm.tmp-4194305', '.f.img.qsm.0123456789ab.tmp', '.other.qsm.abcdefabcdef.tmp'];
    for (const n of stale) writeFileSync(join(s.state, n), 'x');
    writeFileSync(join(s.state, 'keep.tmp'), 'x');
    touchSource(s);
    const r = await runWithin(['-a', `${s.src}/`, s.dest]);
    expect(r.code).toBe(0);
    expect(readdirSync(s.state).sort()).toEqual(['f.img.qsm', 'keep.tmp']);
  });
});

describe('E: the folders above the state base', () => {
  /**
   * Whoever can write a folder above the base can rename the base away and
   * put another there: mid-run, a second run then makes a fresh base and
   * takes a lock the first still holds; between runs, an older copy of root's
   * own state (an interrupted run's intent and manifest, say) comes back.
   */
  it('a base below a folder of another user, or one writable by group or others (not sticky), is refused before anything is written', async () => {
    const src = join(dir, 'src');
    mkdirSync(src);
    writeFileSync(join(src, 'f'), 'data\n');
    const theirs = join(dir, 'theirs');
    mkdirSync(theirs, { mode: 0o755 });
    chownSync(theirs, NOBODY, NOBODY);
    const open = join(dir, 'open');
    mkdirSync(open);
    chmodSync(open, 0o777);
    const group = join(dir, 'group');
    mkdirSync(group);
    chmodSync(group, 0o775);
    for (const [above, who] of [[theirs, /belongs to uid 65534/], [open, /writable by other users/], [group, /writable by other users/]] as const) {
      const dest = join(dir, `dest-${basename(above)}`);
      const base = join(above, 'qsync');
      const r = await runWithin(['-a', '--state-dir', base, `${src}/`, `${dest}/`]);
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toContain(above);
      expect(r.stderr).toMatch(who);
      expect(r.stderr).not.toMatch(/internal error|\n\s+at /);
      expect(existsSync(dest)).toBe(false);
      expect(existsSync(base)).toBe(false);
    }
    // A sticky folder (/tmp) is fine: no one else can rename what root made in it.
    const sticky = join(dir, 'sticky');
    mkdirSync(sticky);
    chmodSync(sticky, 0o1777);
    const r = await runWithin(['-a', '--state-dir', join(sticky, 'qsync'), `${src}/`, `${join(dir, 'dest-sticky')}/`]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
  });

  it('a base reached through a symlink of root\'s in a folder another user can write is refused (the symlink could be swapped)', async () => {
    const src = join(dir, 'src');
    mkdirSync(src);
    writeFileSync(join(src, 'f'), 'data\n');
    const theirs = join(dir, 'theirs');
    mkdirSync(theirs, { mode: 0o755 });
    const real = join(dir, 'real-base');
    mkdirSync(real, { mode: 0o700 });
    symlinkSync(real, join(theirs, 'link'));
    chownSync(theirs, NOBODY, NOBODY);
    const r = await runWithin(['-a', '--state-dir', join(theirs, 'link'), `${src}/`, `${join(dir, 'dest')}/`]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toMatch(/belongs to uid 65534/);
    expect(readdirSync(real)).toEqual([]);
  });
});

describe('F: a state folder and the destination it was written for', () => {
  /**
   * Backup disks taking turns at one mount point: the same path, and (the
   * same loop or sd device, made alike) the same device and inode numbers
   * for the same files. An interrupted run's intent on one disk must not
   * vouch for the other disk's file.
   */
  it('another filesystem mounted at DEST since: its files are compared, not taken for the ones the manifests describe', async (ctx) => {
    const src = join(dir, 'src');
    mkdirSync(src);
    const file = join(src, 'f.img');
    const imgs = ['a', 'b'].map((n, i) => {
      const img = join(dir, `${n}.ext4`);
      truncateSync((writeFileSync(img, ''), img), 16 * MiB);
      execFileSync('mkfs.ext4', ['-q', img], { env: { ...process.env, E2FSPROGS_FAKE_TIME: String(1_000_000_000 + i * 1000) } });
      return img;
    });
    const mnt = join(dir, 'mnt');
    mkdirSync(mnt);
    const mount = (img: string) => mountForTest(['-o', 'loop', img, mnt]);
    const idOf = (p: string) => `${statSync(p).dev}:${statSync(p).ino}`;
    // Disk B gets the source as it was; disk A the source as it is now.
    randomFile(file, MiB);
    utimesSync(file, 1_700_000_000, 1_700_000_000);
    if (!mount(imgs[1])) return ctx.skip('cannot mount a loop device here (needs root)');
    let idB: string;
    try {
      expect((await runWithin(['-a', `${src}/`, `${mnt}/`])).code).toBe(0);
      idB = idOf(join(mnt, 'f.img'));
    } finally {
      execFileSync('umount', [mnt]);
    }
    randomFile(file, MiB);
    expect(mount(imgs[0])).toBe(true);
    let idA: string;
    try {
      expect((await runWithin(['-a', `${src}/`, `${mnt}/`])).code).toBe(0);
      idA = idOf(join(mnt, 'f.img'));
      // A run on disk A interrupted after its intent (block 0 listed), as a pulled disk leaves it.
      const { IntentWriter, intentPathFor } = await import(join(DIST, 'sync/intent.js'));
      const manifest = join(stateOf(mnt), 'manifests', 'f.img.qsm');
      const m = readFileSync(manifest);
      const w = await IntentWriter.create(intentPathFor(manifest), m.subarray(m.length - 32), MiB, MiB);
      await w.add([0]);
      await w.close();
    } finally {
      execFileSync('umount', [mnt]);
    }
    expect(mount(imgs[1])).toBe(true);
    try {
      if (idOf(join(mnt, 'f.img')) !== idA || idA !== idB) return ctx.skip('the two disks did not get the same device and inode numbers here');
      const r = await runWithin(['-a', `${src}/`, `${mnt}/`]);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      await expectSame(file, join(mnt, 'f.img'));
    } finally {
      execFileSync('umount', [mnt]);
    }
  });
});
