/** libvirt for tests and the benchmark: virsh on qemu:///system, and libvirtd started without systemd. */
import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';

const pexec = promisify(execFile);
export const LIBVIRT_URI = 'qemu:///system';

export const virsh = async (...args: string[]): Promise<string> => (await pexec('virsh', ['-c', LIBVIRT_URI, ...args])).stdout;

async function libvirtUp(): Promise<boolean> {
  return virsh('version').then(() => true, () => false);
}

/** Run a daemon that forks itself away (`-d`): wait only for the parent, whose output nobody reads. */
function daemon(cmd: string): Promise<number | null> {
  return new Promise((res) => spawn(cmd, ['-d'], { stdio: 'ignore' }).once('exit', res).once('error', () => res(null)));
}

/** libvirtd (and virtlogd, which QEMU's logs go through), started as daemons when libvirt does not answer (and left running). */
export async function ensureLibvirtd(): Promise<void> {
  if (await libvirtUp()) return;
  await daemon('virtlogd'); // one already running makes this one exit: fine
  await daemon('libvirtd');
  for (let i = 0; i < 300 && !(await libvirtUp()); i++) await new Promise((r) => setTimeout(r, 100));
  if (!(await libvirtUp())) throw new Error(`libvirtd started but ${LIBVIRT_URI} does not answer`);
}

/** The QEMU device whose backend each disk file is attached to (`info block`: the file, then "Attached to: .../virtio-backend"), for HMP qemu-io. */
export async function diskDevices(domain: string, files: string[]): Promise<(string | undefined)[]> {
  const info = await virsh('qemu-monitor-command', domain, '--hmp', 'info block');
  return files.map((f) => {
    const at = info.indexOf(f);
    return at < 0 ? undefined : info.slice(at).match(/Attached to:\s+(\S+)/)?.[1];
  });
}
