/**
 * `npm run demo`: what a user sees on the first and second backup of a VM
 * image directory. Generates a real qcow2 (qemu-img + qemu-io; a random raw
 * image where QEMU's tools are missing), runs qsync exactly as the user ran
 * rsync, changes a few MiB inside the image, runs it again, and checks the
 * copy byte for byte.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, mkdtempSync, openSync, readSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const MiB = 1 << 20;
const qsync = join(import.meta.dirname, '../src/cli/main.js');
const work = process.argv[2] ?? mkdtempSync(join(tmpdir(), 'qsync-demo-'));
const images = join(work, 'images');
const backup = join(work, 'backup');
mkdirSync(images, { recursive: true });

const have = (tool: string) => spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;
const qemu = have('qemu-img') && have('qemu-io');
const image = join(images, qemu ? 'vm1.qcow2' : 'vm1.raw');

function step(title: string): void {
  process.stdout.write(`\n\x1b[1m== ${title}\x1b[0m\n`);
}

function run(args: string[]): number {
  process.stdout.write(`$ qsync ${args.join(' ')}\n`);
  const t0 = performance.now();
  const r = spawnSync(process.execPath, [qsync, ...args], { stdio: 'inherit' });
  const secs = (performance.now() - t0) / 1000;
  process.stdout.write(`(${secs.toFixed(2)} s, exit ${r.status})\n`);
  if (r.status !== 0) process.exitCode = r.status ?? 1;
  return secs;
}

/** Guest-like writes: scattered 64 KiB-to-1 MiB extents. */
function writeSome(count: number, seed: number): void {
  if (qemu) {
    const cmds: string[] = [];
    for (let i = 0; i < count; i++) cmds.push('-c', `write -P ${(seed + i) % 250 + 1} ${((i * 97 + seed) % 900) * MiB} ${64 * 1024 * (1 + (i % 16))}`);
    execFileSync('qemu-io', ['-f', 'qcow2', ...cmds, image], { stdio: 'ignore' });
  } else {
    const fd = openSync(image, 'r+');
    for (let i = 0; i < count; i++) writeSync(fd, randomBytes(64 * 1024), 0, 64 * 1024, ((i * 97 + seed) % 900) * MiB);
    closeSync(fd);
  }
}

function sha(path: string): string {
  const h = createHash('sha256');
  const buf = Buffer.alloc(4 * MiB);
  const fd = openSync(path, 'r');
  for (let n; (n = readSync(fd, buf, 0, buf.length, null)) > 0; ) h.update(buf.subarray(0, n));
  closeSync(fd);
  return h.digest('hex');
}

step(`a ${qemu ? 'qcow2 VM image (qemu-img + qemu-io)' : 'raw image (QEMU tools not found)'} in ${images}`);
if (qemu) {
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '1G']);
  writeSome(600, 1);
  process.stdout.write(execFileSync('qemu-img', ['info', image]).toString().split('\n').slice(0, 4).join('\n') + '\n');
} else {
  const fd = openSync(image, 'w');
  for (let off = 0; off < 1024 * MiB; off += 4 * MiB) writeSync(fd, randomBytes(4 * MiB), 0, 4 * MiB, off);
  closeSync(fd);
}

step('first backup: the whole image is copied');
run(['-hav', '--stats', `${images}/`, `${backup}/`]);

step('the "guest" writes a few MiB');
writeSome(24, 7);

step('second backup: only the changed 64 KiB blocks are written, the target is not read');
run(['-hav', '--stats', `${images}/`, `${backup}/`]);

step('nothing changed: the quick check skips the image without reading it');
run(['-hav', `${images}/`, `${backup}/`]);

step('check');
const same = sha(image) === sha(join(backup, image.split('/').pop()!));
process.stdout.write(same ? `backup is byte-identical to the source (sha256)\nfiles are in ${work}\n` : 'MISMATCH: backup differs from the source\n');
if (!same) process.exitCode = 1;
