/** Which disks a QEMU has, and the dirty bitmaps on them, from QMP queries. */
import { QsyncError } from '../core/errors.js';
import type { QmpClient } from './qmp.js';

export interface Drive {
  /** Name for the backup target: the device's qdev id, else its drive id, else the node name. */
  name: string;
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
    return { name: qdevId(extra.qdev) ?? (extra.device || node), node, driver: n.drv, size: n.image['virtual-size'], ...extra };
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
