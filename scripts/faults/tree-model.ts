/**
 * The campaign's model of what a synced target held, run after run, so that
 * every point of history can be checked against the bytes the target really
 * had. A run killed half-way leaves a target that mixes the old and the new
 * version block by block: a point taken from that state is checked block by
 * block against both.
 */
import { lstatSync, mkdirSync, writeFileSync, chmodSync } from 'node:fs';
import { dirname, join } from 'node:path';
import type { Rng } from './runner.js';

export const BLOCK = 64 * 1024;
export const MiB = 1 << 20;

/** What a file held just before a run: exactly one version, or a block mix of two (a killed run's leftover). */
export type FileState = { kind: 'exact'; data: Buffer | undefined } | { kind: 'mix'; from: Buffer | undefined; to: Buffer | undefined };

export type Version = Map<string, Buffer>;

export interface RunRecord {
  spawnMs: number;
  before: Map<string, FileState>;
}

/** Random file contents: compressible and random regions, sometimes zero blocks, sizes not always block-aligned. */
export function randomContent(rng: Rng, size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let off = 0; off < size; off += BLOCK) {
    const len = Math.min(BLOCK, size - off);
    const r = rng.next();
    if (r < 0.1) continue; // a zero block
    if (r < 0.3) b.fill(rng.int(256), off, off + len);
    else rng.bytes(len).copy(b, off);
  }
  return b;
}

/** A new version: some random blocks (whole or partial) changed, sometimes grown or shrunk. */
export function changeContent(rng: Rng, old: Buffer): Buffer {
  let b = Buffer.from(old);
  const r = rng.next();
  if (r < 0.1) b = Buffer.concat([b, rng.bytes(rng.range(1, 3 * BLOCK))]);
  else if (r < 0.2 && b.length > 2 * BLOCK) b = Buffer.from(b.subarray(0, b.length - rng.range(1, 2 * BLOCK)));
  const blocks = Math.max(1, Math.ceil(b.length / BLOCK));
  const n = rng.range(1, Math.min(40, blocks));
  for (let i = 0; i < n; i++) {
    const blk = rng.int(blocks);
    const start = blk * BLOCK + (rng.chance(0.3) ? rng.int(BLOCK) : 0);
    const end = Math.min(b.length, blk * BLOCK + BLOCK);
    if (start >= end) continue;
    if (rng.chance(0.15)) b.fill(0, start, end);
    else rng.bytes(end - start).copy(b, start);
  }
  return b;
}

export function writeTree(root: string, files: Version, modes: Map<string, number>): void {
  for (const [name, data] of files) {
    const p = join(root, name);
    mkdirSync(dirname(p), { recursive: true });
    writeFileSync(p, data);
    chmodSync(p, modes.get(name) ?? 0o644);
  }
}

const blockOf = (b: Buffer | undefined, i: number): Buffer => {
  const out = Buffer.alloc(BLOCK);
  if (b && i * BLOCK < b.length) b.copy(out, 0, i * BLOCK, Math.min(b.length, (i + 1) * BLOCK));
  return out;
};

/** Why `got` is not what `want` allows (undefined: it is). */
export function stateMismatch(got: Buffer, want: FileState): string | undefined {
  if (want.kind === 'exact') {
    // Before a first copy the file did not exist: its point restores as an empty file.
    const data = want.data ?? Buffer.alloc(0);
    if (got.equals(data)) return undefined;
    return `${got.length} bytes, expected ${data.length}${got.length === data.length ? ` (first difference in block ${firstBlockDiff(got, data)})` : ''}`;
  }
  const sizes = [want.from?.length ?? 0, want.to?.length ?? 0];
  if (!sizes.includes(got.length)) return `${got.length} bytes, expected ${sizes.join(' or ')} (a killed run's mix of two versions)`;
  const zero = Buffer.alloc(BLOCK);
  for (let i = 0; i * BLOCK < got.length; i++) {
    const g = blockOf(got, i);
    if (!g.equals(blockOf(want.from, i)) && !g.equals(blockOf(want.to, i)) && !g.equals(zero)) {
      return `block ${i} is neither the old nor the new version's (a killed run's mix of two versions)`;
    }
  }
  return undefined;
}

function firstBlockDiff(a: Buffer, b: Buffer): number {
  for (let i = 0; i * BLOCK < a.length; i++) if (!blockOf(a, i).equals(blockOf(b, i))) return i;
  return -1;
}

/** Tracks what each file of a target held before each run (for history points). */
export class TargetModel {
  readonly runs: RunRecord[] = [];
  /** What the target holds now, per file (exact or a killed run's mix). */
  private now = new Map<string, FileState>();

  /** Call just before spawning a run that syncs `source` into the target. */
  beginRun(spawnMs: number, names: Iterable<string>): void {
    const before = new Map<string, FileState>();
    for (const n of names) before.set(n, this.now.get(n) ?? { kind: 'exact', data: undefined });
    this.runs.push({ spawnMs, before });
  }

  /** The run finished with the target equal to `source`. */
  converged(source: Version): void {
    this.now = new Map([...source].map(([k, v]) => [k, { kind: 'exact', data: v }]));
  }

  /** The run was killed or failed while bringing the target to `source`. */
  interrupted(source: Version): void {
    const next = new Map<string, FileState>();
    for (const [k, v] of source) {
      const cur = this.now.get(k) ?? { kind: 'exact', data: undefined };
      if (cur.kind === 'mix') next.set(k, { kind: 'mix', from: cur.from, to: v }); // only one kill per trial: keeps the model exact
      else next.set(k, cur.data?.equals(v) ? cur : { kind: 'mix', from: cur.data, to: v });
    }
    this.now = next;
  }

  /** What `name` held just before the run that started at `ms` (the `until` of a history point). */
  stateAt(name: string, ms: number): FileState | undefined {
    const r = [...this.runs].reverse().find((x) => x.spawnMs <= ms);
    return r?.before.get(name);
  }
}

/** Permission bits that let group or others read. */
export const READ_BITS = 0o044;

/** Read bits a path has that the reference mode lacks. */
export function extraReadBits(path: string, refMode: number): number {
  return lstatSync(path).mode & READ_BITS & ~refMode;
}
