/** A system libvirt for tests (no systemd here): libvirtd and virtlogd started as daemons when qemu:///system does not answer. */
import { execFile, spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { promisify } from 'node:util';

const pexec = promisify(execFile);
export const URI = 'qemu:///system';

export const virsh = async (...args: string[]): Promise<string> => (await pexec('virsh', ['-c', URI, ...args])).stdout;

async function libvirtUp(): Promise<boolean> {
  return virsh('version').then(() => true, () => false);
}

/** Run a daemon that forks itself away (`-d`): wait only for the parent, whose output nobody reads. */
function daemon(cmd: string): Promise<number | null> {
  return new Promise((res) => spawn(cmd, ['-d'], { stdio: 'ignore' }).once('exit', res).once('error', () => res(null)));
}

/** libvirtd (and virtlogd, which QEMU's logs go through), started when libvirt does not answer (and left running). */
export async function ensureLibvirtd(): Promise<void> {
  if (await libvirtUp()) return;
  await daemon('virtlogd'); // one already running makes this one exit: fine
  await daemon('libvirtd');
  for (let i = 0; i < 300 && !(await libvirtUp()); i++) await new Promise((r) => setTimeout(r, 100));
  if (!(await libvirtUp())) throw new Error(`libvirtd started but ${URI} does not answer`);
}

/** Define a TCG q35 domain (no OS) with these disk image files (virtio); its XML is written in `dir`. */
export async function defineDomain(dir: string, name: string, disks: { file: string; format: string; target: string }[]): Promise<void> {
  const xml = `${dir}/domain-${name}.xml`;
  writeFileSync(xml, `<domain type='qemu'>
  <name>${name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
${disks.map((d) => `    <disk type='file' device='disk'><driver name='qemu' type='${d.format}'/><source file='${d.file}'/><target dev='${d.target}' bus='virtio'/></disk>`).join('\n')}
  </devices>
</domain>
`);
  await virsh('define', xml);
}

/** Start a domain; the QEMU device backing each of `files` (`info block`: the file, then "Attached to: .../virtio-diskN/virtio-backend"). */
export async function startDomain(name: string, files: string[]): Promise<Map<string, string>> {
  await virsh('start', name);
  const found = await diskDevices(name, files);
  const devices = new Map<string, string>();
  for (const [i, f] of files.entries()) {
    if (!found[i]) throw new Error(`no device for ${f} in the domain's 'info block'`);
    devices.set(f, found[i]!);
  }
  return devices;
}

/** End a test domain: its job, its QEMU, its definition and checkpoints' metadata. */
export async function dropDomain(name: string): Promise<void> {
  await virsh('domjobabort', name).catch(() => {});
  await virsh('destroy', name).catch(() => {});
  await virsh('undefine', name, '--checkpoints-metadata').catch(() => {});
}

/** The QEMU device whose backend each disk file is attached to (`info block`: the file, then "Attached to: .../virtio-backend"), for HMP qemu-io. */
export async function diskDevices(domain: string, files: string[]): Promise<(string | undefined)[]> {
  const info = await virsh('qemu-monitor-command', domain, '--hmp', 'info block');
  return files.map((f) => {
    const at = info.indexOf(f);
    return at < 0 ? undefined : info.slice(at).match(/Attached to:\s+(\S+)/)?.[1];
  });
}
