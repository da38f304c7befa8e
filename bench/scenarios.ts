/** What each scenario starts from and what it changes before the timed runs. */
import { BLOCK, type BenchOptions, type ScenarioName } from './args.js';
import {
  appendRandom,
  bumpMtime,
  makeQcow2,
  overwriteBlocks,
  pickClustered,
  pickScattered,
  qcow2WriteBlocks,
  writeRandomFile,
  writeSparseFile,
} from './data.js';
import type { LinkOptions } from './link.js';
import { DOMAIN_DESCRIPTION } from './domain.js';
import { COLD_TOOLS, DOMAIN_TOOLS, IMAGE_TOOLS, MEMORY_TOOLS, REMOTE_TOOLS, STANDARD_TOOLS, type ToolId } from './tools.js';

export interface Scenario {
  name: ScenarioName;
  description: string;
  /** File name of the image inside the source directory. */
  file: string;
  tools: readonly ToolId[];
  /** Targets start empty (first copy) instead of holding the unchanged image. */
  firstCopy: boolean;
  /** The targets are on the far side of a shaped link (bench/link.ts), reached over ssh. */
  link?: LinkOptions;
  /** Timed runs per tool (the memory scenario runs once). */
  runs: number;
  /** The page cache is dropped before every timed command (root), whatever --cold says. */
  cold?: boolean;
  /** Writes the image as it is before the change. */
  create(path: string): Promise<void>;
  /**
   * Changes the image after each tool made its target from it; the mtime
   * always moves. Returns the bytes changed when it knows them exactly.
   */
  mutate(path: string): Promise<number | undefined>;
}

const MEMORY_SIZE = 16 * 1024 ** 3;
/** The remote scenario's link: a fast WAN. */
export const REMOTE_LINK: LinkOptions = { rttMs: 50, mbit: 200 };
const CLUSTERED = 0.1;
const GROWTH = 0.1;

const pct = (f: number): string => `${+(f * 100).toFixed(3)}%`;

export function makeScenarios(o: BenchOptions): Record<ScenarioName, Scenario> {
  const nblocks = o.size / BLOCK;
  const scattered = Math.max(1, Math.round(nblocks * o.change));
  const raw = async (path: string): Promise<void> => writeRandomFile(path, o.size);
  const base = { file: 'disk.raw', tools: STANDARD_TOOLS, firstCopy: false, runs: o.runs, create: raw };
  const changeRaw = (pick: () => number[]) => async (path: string) => {
    const blocks = pick();
    overwriteBlocks(path, blocks);
    bumpMtime(path);
    return blocks.length * BLOCK;
  };
  return {
    first: {
      ...base,
      name: 'first',
      description: 'first copy of a random raw image: the target does not exist',
      firstCopy: true,
      mutate: async () => o.size,
    },
    touch: {
      ...base,
      name: 'touch',
      description: 'second run, content unchanged, mtime moved',
      mutate: async (path) => {
        bumpMtime(path);
        return 0;
      },
    },
    scattered: {
      ...base,
      name: 'scattered',
      description: `${pct(o.change)} of 64 KiB blocks rewritten, scattered`,
      mutate: changeRaw(() => pickScattered(nblocks, scattered)),
    },
    clustered: {
      ...base,
      name: 'clustered',
      description: `${pct(CLUSTERED)} of 64 KiB blocks rewritten, in runs of 1-16 MiB`,
      mutate: changeRaw(() => pickClustered(nblocks, Math.round(nblocks * CLUSTERED))),
    },
    grow: {
      ...base,
      name: 'grow',
      description: `image grew by ${pct(GROWTH)} (random data appended)`,
      mutate: async (path) => {
        const grown = Math.round((o.size * GROWTH) / BLOCK) * BLOCK;
        appendRandom(path, grown);
        bumpMtime(path);
        return grown;
      },
    },
    qcow2: {
      ...base,
      name: 'qcow2',
      file: 'disk.qcow2',
      description: `qcow2 (90% allocated), guest rewrote ${pct(o.change)} of its 64 KiB clusters via qemu-io`,
      create: (path) => makeQcow2(path, o.size),
      mutate: async (path) => {
        await qcow2WriteBlocks(path, pickScattered(nblocks, scattered));
        bumpMtime(path);
        return undefined; // clusters moved, tables updated: measured by diffing the file
      },
    },
    cold: {
      ...base,
      name: 'cold',
      description: `${pct(o.change)} of 64 KiB blocks rewritten, scattered; page cache dropped before every command`,
      tools: COLD_TOOLS,
      cold: true,
      mutate: changeRaw(() => pickScattered(nblocks, scattered)),
    },
    memory: {
      name: 'memory',
      file: 'sparse.raw',
      description: `16 GiB sparse file, ${pct(o.change)} of blocks rewritten: peak RSS`,
      tools: MEMORY_TOOLS,
      firstCopy: false,
      runs: 1,
      create: async (path) => writeSparseFile(path, MEMORY_SIZE, 64),
      mutate: changeRaw(() => pickScattered(MEMORY_SIZE / BLOCK, Math.round((MEMORY_SIZE / BLOCK) * o.change))),
    },
    remote: {
      ...base,
      name: 'remote',
      description: `${pct(o.change)} of 64 KiB blocks rewritten, scattered; the target is across a ${REMOTE_LINK.mbit} Mbit/s link with ${REMOTE_LINK.rttMs} ms RTT (push over ssh)`,
      tools: REMOTE_TOOLS,
      link: REMOTE_LINK,
      mutate: changeRaw(() => pickScattered(nblocks, scattered)),
    },
    image: {
      ...base,
      name: 'image',
      file: 'disk.qcow2',
      description: `qcow2 (90% allocated) served by qemu-storage-daemon, guest rewrote ${pct(o.change)} of its 64 KiB clusters before each run`,
      tools: IMAGE_TOOLS,
      create: (path) => makeQcow2(path, o.size),
      mutate: async () => {
        throw new Error('the image scenario changes the disk through QEMU (bench/image.ts)');
      },
    },
    domain: {
      ...base,
      name: 'domain',
      file: 'sys.qcow2',
      description: DOMAIN_DESCRIPTION,
      tools: DOMAIN_TOOLS,
      create: async () => {
        throw new Error('the domain scenario makes its own images (bench/domain.ts)');
      },
      mutate: async () => {
        throw new Error('the domain scenario changes the disks through libvirt (bench/domain.ts)');
      },
    },
  };
}
