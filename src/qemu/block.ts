/** Which disks a QEMU has, the dirty bitmaps and block jobs on them, from QMP queries. */
import { basename } from 'node:path';
import { QsyncError } from '../core/errors.js';
import type { QmpClient } from './qmp.js';

export interface Drive {
  /**
   * Name for the backup target: the image file's base name (so that `--qmp`
   * on the VM and `--image` on its file write the same target), else
   * `legacy`. Two disks whose files share a base name both keep `legacy`.
   */
  name: string;
  /** The name qsync used before it named targets after the file: qdev id, else drive id, else node name. */
  legacy: string;
  /** The image file the node opens (a plain path), if any. */
  file?: string;
  /** The format node the guest sees (bitmaps live here). */
  node: string;
  driver: string;
  size: number;
  device?: string;
  qdev?: string;
}

export interface BitmapInfo {
  name: string;
  recording: boolean;
  busy: boolean;
  persistent: boolean;
  /** Persistent bitmap that was in use when QEMU died: its contents cannot be trusted. */
  inconsistent: boolean;
  granularity: number;
  count: number;
}

interface NodeInfo {
  'node-name': string;
  drv: string;
  /** The image's file name; `json:{...}` for a node without a plain one. */
  file?: string;
  image: { 'virtual-size': number };
  'dirty-bitmaps'?: Partial<BitmapInfo>[];
}

interface BlockInfo {
  device: string;
  qdev?: string;
  inserted?: { 'node-name': string };
}

interface BlockGraph {
  nodes: { id: number; type: string; name: string }[];
  edges: { parent: number; child: number }[];
}

async function nodes(qmp: QmpClient): Promise<NodeInfo[]> {
  return qmp.execute<NodeInfo[]>('query-named-block-nodes', { flat: true });
}

/** qdev path /machine/peripheral/vda/virtio-backend → vda. */
const qdevId = (qdev: string | undefined): string | undefined =>
  qdev?.match(/^\/machine\/peripheral(?:-anon)?\/([^/]+)/)?.[1];

/**
 * The disks to back up: devices with a medium (a VM), or the root nodes of
 * the block graph (qemu-storage-daemon). `wanted` names match node-name,
 * drive id, qdev id or qdev path; temp nodes of qsync (qsync-*) never match.
 */
export async function findDrives(qmp: QmpClient, wanted: string[] = []): Promise<Drive[]> {
  const info = new Map((await nodes(qmp)).map((n) => [n['node-name'], n]));
  const drive = (node: string, extra: Partial<Drive> = {}): Drive => {
    const n = info.get(node)!;
    const legacy = qdevId(extra.qdev) ?? (extra.device || node);
    const file = n.file?.startsWith('/') ? n.file : undefined;
    return { name: file ? imageTargetName(file) : legacy, legacy, file, node, driver: n.drv, size: n.image['virtual-size'], ...extra };
  };
  const blocks = (await qmp.execute<BlockInfo[]>('query-block')).filter((b) => b.inserted && info.has(b.inserted['node-name']));
  let all: Drive[];
  if (blocks.length) {
    all = blocks.map((b) => drive(b.inserted!['node-name'], { device: b.device || undefined, qdev: b.qdev }));
  } else {
    const g = await qmp.execute<BlockGraph>('x-debug-query-block-graph');
    const driverIds = new Set(g.nodes.filter((n) => n.type === 'block-driver').map((n) => n.id));
    const children = new Set(g.edges.filter((e) => driverIds.has(e.parent)).map((e) => e.child));
    all = g.nodes
      .filter((n) => n.type === 'block-driver' && !children.has(n.id) && info.has(n.name))
      .map((n) => drive(n.name));
  }
  all = all.filter((d) => !d.node.startsWith('qsync-'));
  for (const d of all) if (all.some((x) => x !== d && x.name === d.name)) d.name = d.legacy;
  if (!wanted.length) return all;
  return wanted.map((w) => {
    const d = all.find((x) => [x.node, x.device, x.qdev, qdevId(x.qdev)].includes(w));
    if (!d) {
      throw new QsyncError('SOURCE', `no drive '${w}' in QEMU (have: ${all.map((x) => x.name).join(', ') || 'none'})`, {
        hint: 'name a drive by node-name, drive id or device id',
      });
    }
    return d;
  });
}

export async function listBitmaps(qmp: QmpClient, node: string): Promise<BitmapInfo[]> {
  const n = (await nodes(qmp)).find((x) => x['node-name'] === node);
  if (!n) throw new QsyncError('SOURCE', `block node '${node}' is gone`);
  return (n['dirty-bitmaps'] ?? []).map((b) => ({
    name: String(b.name),
    recording: b.recording ?? true,
    busy: b.busy ?? false,
    persistent: b.persistent ?? false,
    inconsistent: b.inconsistent ?? false,
    granularity: b.granularity ?? 65536,
    count: b.count ?? 0,
  }));
}

/** Target name for an image file: its base name without the extension, in [A-Za-z0-9_-] (web.qcow2 → web). */
export const imageTargetName = (file: string): string =>
  basename(file).replace(/\.[^.]*$/, '').replace(/[^A-Za-z0-9_-]/g, '_').slice(0, 30) || 'disk';

export interface BlockJob {
  id: string;
  type: string;
}

/**
 * The block jobs that hold each node: a job holds every node reachable from
 * its edges in the block graph (a backup job's filter sits above the disk,
 * its target overlay may be backed by it). Keyed by node name.
 */
export async function jobsByNode(qmp: QmpClient): Promise<Map<string, BlockJob[]>> {
  const types = new Map((await qmp.execute<BlockJob[]>('query-jobs')).map((j) => [j.id, j.type]));
  const g = await qmp.execute<BlockGraph>('x-debug-query-block-graph');
  const children = new Map<number, number[]>();
  for (const e of g.edges) children.set(e.parent, [...(children.get(e.parent) ?? []), e.child]);
  const byId = new Map(g.nodes.map((n) => [n.id, n]));
  const out = new Map<string, BlockJob[]>();
  for (const job of g.nodes.filter((n) => n.type === 'block-job')) {
    const seen = new Set<number>();
    const todo = [...(children.get(job.id) ?? [])];
    while (todo.length) {
      const id = todo.pop()!;
      if (seen.has(id)) continue;
      seen.add(id);
      todo.push(...(children.get(id) ?? []));
      const name = byId.get(id)?.name;
      if (name) out.set(name, [...(out.get(name) ?? []), { id: job.name, type: types.get(job.name) ?? 'block job' }]);
    }
  }
  return out;
}
