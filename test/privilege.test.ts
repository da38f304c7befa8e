/**
 * qsync run as root over trees that other users own: an unprivileged user
 * (nobody, through setpriv) who owns a folder in SRC or DEST swaps names for
 * symlinks while root runs, and must never make root read, write, chmod or
 * chown anything outside that user's own files. Plus the modes a target has
 * while it is written: never wider than its source, even when killed.
 *
 * The swaps are timed on a large (sparse) file whose copy takes a second or
 * more: the attacker waits for a sign that root is in the tree, then swaps
 * once, so each scenario runs the same way every time.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, lchownSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AS_NOBODY, NOBODY, QSYNC, runQsync, sha256, stateOf, stateSlot } from './helpers/cli.js';
import { mutateBlocks, randomFile } from './helpers/data.js';
import { SMALL_FILE_MAX } from '../src/sync/small-file.js';

const BIG = 256 << 20;
const asRoot = process.getuid?.() === 0;

let base: string;
let victim: string;
let secret: string;

beforeEach(() => {
  base = mkdtempSync(join(tmpdir(), 'qsync-priv-'));
  chmodSync(base, 0o755);
  // What the attacker wants: a root-only folder and file.
  victim = join(base, 'victim');
  mkdirSync(victim, { mode: 0o700 });
  secret = join(victim, 'secret');
  writeFileSync(secret, 'root secret\n', { mode: 0o600 });
});
afterEach(() => rmSync(base, { recursive: true, force: true }));

/** A folder owned by nobody. */
function userDir(path: string, mode = 0o755): string {
  mkdirSync(path, { recursive: true });
  chmodSync(path, mode);
  chownSync(path, NOBODY, NOBODY);
  return path;
}

/** A file with `content`, or a sparse file of that size. */
function file(path: string, content: string | number, mode = 0o644): string {
  if (typeof content === 'number') {
    writeFileSync(path, '');
    truncateSync(path, content);
  } else writeFileSync(path, content);
  chmodSync(path, mode);
  return path;
}

/** A file owned by nobody. */
function userFile(path: string, content: string | number, mode = 0o644): string {
  chownSync(file(path, content, mode), NOBODY, NOBODY);
  return path;
}

/** Run a bash script as nobody; resolves with its exit code (killed after 30 s). */
function asNobody(script: string): Promise<number | null> {
  const p = spawn('setpriv', [...AS_NOBODY, 'bash', '-c', script], { stdio: ['ignore', 'ignore', 'inherit'] });
  const timer = setTimeout(() => p.kill('SIGKILL'), 30_000);
  return new Promise((resolve) => p.on('close', (code) => (clearTimeout(timer), resolve(code))));
}

/** Shell: wait (at most ~10 s) until `test` succeeds. */
const waitFor = (test: string) => `for i in $(seq 5000); do ${test} && break; sleep 0.002; done;`;

const modeOf = (p: string) => lstatSync(p).mode & 0o7777;

function expectVictimUntouched(): void {
  const d = lstatSync(victim);
  expect(d.isDirectory()).toBe(true);
  expect(d.mode & 0o7777).toBe(0o700);
  expect(d.uid).toBe(0);
  expect(readdirSync(victim)).toEqual(['secret']);
  const s = lstatSync(secret);
  expect(s.mode & 0o7777).toBe(0o600);
  expect(s.uid).toBe(0);
  expect(readFileSync(secret, 'utf8')).toBe('root secret\n');
}

describe.skipIf(!asRoot)('a user who owns a folder in DEST swaps names for symlinks while root runs -a', () => {
  it('a new target swapped for a symlink: root never chmods, chowns or times what the link points to', async () => {
    const src = join(base, 'src');
    userDir(join(src, 'u'));
    userFile(join(src, 'u', 'big'), BIG, 0o666);
    const bk = join(base, 'bk');
    mkdirSync(bk);
    const u = userDir(join(bk, 'u'));
    // As soon as root starts writing big (under any name), put a link to the secret where big goes.
    const attacker = asNobody(`cd ${u}; ${waitFor('ls -A | grep -q big')} [ -e big ] && mv big big.moved; ln -s ${secret} big`);
    const r = await runQsync(['-a', `${src}/`, `${bk}/`]);
    expect(await attacker).toBe(0);
    expect(r.code, r.stderr).toBe(0);
    expectVictimUntouched();
    const t = lstatSync(join(u, 'big'));
    expect(t.isFile()).toBe(true);
    expect(t.mode & 0o7777).toBe(0o666);
    expect(t.uid).toBe(NOBODY);
  });

  it('a folder swapped for a symlink: root writes nothing into the victim folder and never chmods or chowns it', async () => {
    const src = join(base, 'src');
    userDir(join(src, 'u'));
    userDir(join(src, 'u', 'd'), 0o777);
    userFile(join(src, 'u', 'd', 'big'), BIG);
    userFile(join(src, 'u', 'd', 'secret'), 'written by the user\n');
    const bk = join(base, 'bk');
    mkdirSync(bk);
    const u = userDir(join(bk, 'u'));
    const attacker = asNobody(`cd ${u}; ${waitFor('[ -e d ]')} mv d d.moved && ln -s ${victim} d`);
    const r = await runQsync(['-a', `${src}/`, `${bk}/`]);
    expect(await attacker).toBe(0);
    expectVictimUntouched();
    // The swap lands before root opens the folder it made (refused, said so, exit 23) or after (what root
    // copied landed in that folder, now d.moved, with the source's metadata): both keep the victim safe.
    if (r.code !== 0) {
      expect(r.code, r.stderr).toBe(23);
      expect(r.stderr).toMatch(/u\/d in the destination was replaced by something other than a folder/);
      return;
    }
    expect(readFileSync(join(u, 'd.moved', 'secret'), 'utf8')).toBe('written by the user\n');
    expect(modeOf(join(u, 'd.moved'))).toBe(0o777);
    expect(lstatSync(join(u, 'd.moved')).uid).toBe(NOBODY);
  });

  it('--delete: an extraneous folder swapped for a symlink is not followed', async () => {
    const src = join(base, 'src');
    mkdirSync(src);
    userFile(join(src, 'big'), BIG);
    userDir(join(src, 'u'));
    const bk = join(base, 'bk');
    mkdirSync(bk);
    const u = userDir(join(bk, 'u'));
    userDir(join(u, 'zz'));
    userDir(join(u, 'zz', 'sub'));
    userFile(join(u, 'zz', 'sub', 'old'), 'old\n');
    // While big is copied (before --delete reaches u), the user swaps zz/sub for a link to the victim folder.
    const attacker = asNobody(`cd ${u}/zz; ${waitFor(`ls -A ${bk} | grep -q big`)} mv sub sub.moved && ln -s ${victim} sub`);
    const r = await runQsync(['-a', '--delete', `${src}/`, `${bk}/`]);
    expect(await attacker).toBe(0);
    expect(r.code, r.stderr).toBe(0);
    expectVictimUntouched();
    expect(existsSync(join(u, 'zz'))).toBe(false);
  });
});

describe.skipIf(!asRoot)('a user who owns a folder in SRC swaps a file for a symlink while root reads', () => {
  it('a file swapped for a link to a root-only file: the root file never lands in the backup', async () => {
    const src = join(base, 'src');
    const su = userDir(join(src, 'u'));
    userFile(join(su, 'a'), BIG);
    userFile(join(su, 'b'), 'public\n');
    const bk = join(base, 'bk');
    mkdirSync(bk);
    // b is listed before a is copied; swap it while a is copied.
    const attacker = asNobody(`${waitFor(`[ -e ${bk}/u ]`)} sleep 0.3; ln -s ${secret} ${su}/b.new && mv -T ${su}/b.new ${su}/b`);
    const r = await runQsync(['-a', `${src}/`, `${bk}/`]);
    expect(await attacker).toBe(0);
    expect(lstatSync(join(su, 'b')).isSymbolicLink()).toBe(true);
    const b = join(bk, 'u', 'b');
    // The old code read the secret through the link, as far as b's listed size (7 bytes: "root se").
    if (existsSync(b)) expect(readFileSync(b, 'utf8')).not.toContain('root');
    expect(r.code).toBe(24);
    expect(r.stderr).toMatch(/u\/b/);
  });
});

describe.skipIf(!asRoot)('paths root is given that pass through a folder a user owns', () => {
  function smallTree(): { src: string; bk: string } {
    const src = join(base, 'src');
    mkdirSync(src);
    // Big enough to get a manifest (a small file has none: src/sync/small-file.ts).
    writeFileSync(join(src, 'f'), Buffer.alloc(SMALL_FILE_MAX + 1, 'd'));
    return { src, bk: join(base, 'bk') };
  }

  it('the state folder as a symlink another user owns is refused; nothing is written through it', async () => {
    const { src, bk } = smallTree();
    userDir(bk);
    symlinkSync(victim, stateSlot(bk));
    lchownSync(stateOf(bk), NOBODY, NOBODY);
    const r = await runQsync(['-a', `${src}/`, `${bk}/`]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/is a symlink or not a folder/);
    expectVictimUntouched();
  });

  it('a state folder owned by another user, or writable by others, is refused', async () => {
    const { src, bk } = smallTree();
    stateSlot(bk);
    userDir(stateOf(bk), 0o777);
    const r = await runQsync(['-a', `${src}/`, `${bk}/`]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/belongs to uid 65534, not to the user running qsync/);
    expect(readdirSync(stateOf(bk))).toEqual([]);

    chownSync(stateOf(bk), 0, 0);
    const open = await runQsync(['-a', `${src}/`, `${bk}/`]);
    expect(open.code).not.toBe(0);
    expect(open.stderr).toMatch(/writable by other users/);
    expect(readdirSync(stateOf(bk))).toEqual([]);
  });

  it('--state-dir a user owns is refused: root keeps no state where a user could plant it', async () => {
    const { src, bk } = smallTree();
    const theirs = join(base, 'their-state');
    userDir(theirs, 0o700);
    const r = await runQsync(['-a', '--state-dir', theirs, `${src}/`, `${bk}/`]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/belongs to uid 65534/);
    expect(readdirSync(theirs)).toEqual([]);
  });

  it('a new state folder is made 0700 outside DEST, and DEST holds the mirror only', async () => {
    const { src, bk } = smallTree();
    userDir(bk);
    const r = await runQsync(['-a', `${src}/`, `${bk}/`]);
    expect(r.code, r.stderr).toBe(0);
    expect(readdirSync(bk)).toEqual(['f']);
    expect(modeOf(stateOf(bk))).toBe(0o700);
    expect(modeOf(join(stateOf(bk), 'manifests'))).toBe(0o700);
    expect(modeOf(join(stateOf(bk), 'manifests', 'f.qsm'))).toBe(0o600);
  });

  it('--write-batch through a parent symlink another user owns is refused; one root owns is followed', async () => {
    const { src, bk } = smallTree();
    const u = userDir(join(base, 'u'));
    symlinkSync(victim, join(u, 'out'));
    lchownSync(join(u, 'out'), NOBODY, NOBODY);
    const r = await runQsync(['-a', `--write-batch=${join(u, 'out', 'b.qdelta')}`, `${src}/`, `${bk}/`]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/symlink owned by uid 65534/);
    expectVictimUntouched();

    mkdirSync(join(base, 'batches'));
    symlinkSync(join(base, 'batches'), join(base, 'rootlink'));
    const ok = await runQsync(['-a', `--write-batch=${join(base, 'rootlink', 'b.qdelta')}`, `${src}/`, `${bk}/`]);
    expect(ok.code, ok.stderr).toBe(0);
    expect(existsSync(join(base, 'batches', 'b.qdelta'))).toBe(true);
  });

  it('--exclude-from through a symlink another user owns is refused; one root owns is read', async () => {
    const { src, bk } = smallTree();
    const u = userDir(join(base, 'u'));
    symlinkSync(secret, join(u, 'ex'));
    lchownSync(join(u, 'ex'), NOBODY, NOBODY);
    const r = await runQsync(['-a', `--exclude-from=${join(u, 'ex')}`, `${src}/`, `${bk}/`]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/symlink owned by uid 65534/);
    expect(existsSync(join(bk, 'f'))).toBe(false);

    writeFileSync(join(base, 'rules'), 'f\n');
    symlinkSync(join(base, 'rules'), join(base, 'ex'));
    const ok = await runQsync(['-a', `--exclude-from=${join(base, 'ex')}`, `${src}/`, `${bk}/`]);
    expect(ok.code, ok.stderr).toBe(0);
    expect(existsSync(join(bk, 'f'))).toBe(false);
  });
});

describe('modes of a target while it is written', () => {
  /** SRC holding one large 0600 file, and a BK that does not exist yet. */
  function privateSource(): { src: string; bk: string } {
    const src = join(base, 'src');
    mkdirSync(src);
    file(join(src, 'big'), BIG, 0o600);
    return { src, bk: join(base, 'bk') };
  }

  it('a 0600 source is never visible as a wider target during its first copy', async () => {
    const { src, bk } = privateSource();
    let widest = 0;
    let seen = 0;
    const watch = setInterval(() => {
      try {
        for (const n of readdirSync(bk)) {
          const st = lstatSync(join(bk, n));
          if (st.isFile()) {
            seen++;
            widest |= st.mode & 0o077;
          }
        }
      } catch {
        // not created yet
      }
    }, 2);
    const r = await runQsync(['-a', `${src}/`, `${bk}/`]);
    clearInterval(watch);
    expect(r.code, r.stderr).toBe(0);
    expect(seen).toBeGreaterThan(0);
    expect(widest.toString(8)).toBe('0');
    expect(modeOf(join(bk, 'big'))).toBe(0o600);
  });

  it('kill -9 in the middle of a first copy leaves nothing under the real name and nothing wider than 0600', async () => {
    const { src, bk } = privateSource();
    let pid = 0;
    const run = runQsync(['-a', `${src}/`, `${bk}/`], { onSpawn: (p) => (pid = p) });
    const deadline = Date.now() + 20_000;
    const partial = () => existsSync(bk) && readdirSync(bk).some((n) => n.includes('big') && statSync(join(bk, n)).blocks > 2048);
    while (!partial() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    process.kill(pid, 'SIGKILL');
    expect((await run).signal).toBe('SIGKILL');
    expect(existsSync(join(bk, 'big'))).toBe(false);
    for (const n of readdirSync(bk)) expect(modeOf(join(bk, n)) & 0o077).toBe(0);

    const again = await runQsync(['-a', `${src}/`, `${bk}/`]);
    expect(again.code, again.stderr).toBe(0);
    expect(modeOf(join(bk, 'big'))).toBe(0o600);
    expect(await sha256(join(bk, 'big'))).toBe(await sha256(join(src, 'big')));
  });
});

describe('targets and trees of any shape', () => {
  it('a target with other hard links (a cp -al snapshot) is not written through: the snapshot keeps the old data', async () => {
    const src = join(base, 'src');
    mkdirSync(src);
    randomFile(join(src, 'f'), 3 << 20);
    const bk = join(base, 'bk');
    expect((await runQsync(['-a', `${src}/`, `${bk}/`])).code).toBe(0);
    const snap = join(base, 'snap');
    execFileSync('cp', ['-al', bk, snap]);
    const old = await sha256(join(snap, 'f'));
    mutateBlocks(join(src, 'f'), 3 << 20, 0.1);
    const r = await runQsync(['-a', `${src}/`, `${bk}/`]);
    expect(r.code, r.stderr).toBe(0);
    expect(await sha256(join(snap, 'f'))).toBe(old);
    expect(await sha256(join(bk, 'f'))).toBe(await sha256(join(src, 'f')));
    expect(statSync(join(bk, 'f')).nlink).toBe(1);
    // The copy is what the manifest now describes: the next run is a quick check.
    const again = await runQsync(['-a', '--json', `${src}/`, `${bk}/`]);
    expect(again.code).toBe(0);
    expect(JSON.parse(again.stdout).files.find((f: { path: string }) => f.path === 'f').method).toBe('quick');
  });

  it('a sparse target with other hard links stays sparse when it is copied away from them', async () => {
    const src = join(base, 'src');
    mkdirSync(src);
    // 64 MiB, of which 1 MiB holds data: the rest is a hole.
    execFileSync('truncate', ['-s', '64M', join(src, 'disk.img')]);
    execFileSync('dd', ['if=/dev/urandom', `of=${join(src, 'disk.img')}`, 'bs=1M', 'count=1', 'seek=8', 'conv=notrunc', 'status=none']);
    const bk = join(base, 'bk');
    expect((await runQsync(['-a', '-S', `${src}/`, `${bk}/`])).code).toBe(0);
    execFileSync('cp', ['-al', bk, join(base, 'snap')]);
    execFileSync('dd', ['if=/dev/urandom', `of=${join(src, 'disk.img')}`, 'bs=64K', 'count=1', 'seek=128', 'conv=notrunc', 'status=none']);
    const r = await runQsync(['-a', '-S', `${src}/`, `${bk}/`]);
    expect(r.code, r.stderr).toBe(0);
    expect(await sha256(join(bk, 'disk.img'))).toBe(await sha256(join(src, 'disk.img')));
    // Allocated 512-byte blocks: about 1 MiB of data, not 64 MiB of written zeros.
    expect(statSync(join(bk, 'disk.img')).blocks * 512).toBeLessThan(8 << 20);
  });

  it('descriptors grow with the depth of the tree, not its width', async () => {
    const src = join(base, 'src');
    let deep = src;
    for (let i = 0; i < 40; i++) deep = join(deep, `d${i}`);
    mkdirSync(deep, { recursive: true });
    for (let i = 0; i < 500; i++) writeFileSync(join(deep, `f${i}`), `${i}\n`);
    const bk = join(base, 'bk');
    // 128 descriptors: node's own (about 30) and two per level of 40; one per file of the 500 would not fit.
    const r = spawnSync('sh', ['-c', 'ulimit -n 128; exec node "$@"', 'sh', QSYNC, '-a', `${src}/`, `${bk}/`], { encoding: 'utf8', timeout: 60_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(readdirSync(deep.replace(src, bk)).length).toBe(500);
  });
});
