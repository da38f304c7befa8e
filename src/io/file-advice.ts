/**
 * posix_fadvise for Node, which has no call for it: Node's own WASI (node:wasi,
 * built in, no addon) implements `fd_advise` as posix_fadvise on the host
 * descriptor given as the instance's stdin. Advice is a hint: where WASI is
 * missing or refuses, the read goes on without it.
 *
 * - sequential: the kernel doubles the read-ahead window of the open file
 *   (every reader of this descriptor shares it).
 * - willNeed: the kernel starts reading the range into the page cache now,
 *   without waiting: reads in flight ahead of the one that needs them. On
 *   pages already cached it only looks them up.
 *
 * The instance only holds the descriptor's number (closing it is the
 * caller's business: WASI's fd_close is never called, and collecting the
 * instance leaves the descriptor open).
 */
import type { WASI as WasiType } from 'node:wasi';

const SEQUENTIAL = 1;
const WILLNEED = 3;

/** `(module (memory (export "memory") 0))`: WASI needs an instance with a memory; fd_advise uses none of it. */
const MEMORY_ONLY = new Uint8Array([0x00, 0x61, 0x73, 0x6d, 1, 0, 0, 0, 5, 3, 1, 0, 0, 7, 10, 1, 6, 0x6d, 0x65, 0x6d, 0x6f, 0x72, 0x79, 2, 0]);

type FdAdvise = (fd: number, offset: bigint, length: bigint, advice: number) => number;

let wasiClass: typeof WasiType | null | undefined;
let module: WebAssembly.Module | undefined;

/** Load node:wasi once, without its "experimental" warning on stderr (it says nothing about qsync). */
async function loadWasi(): Promise<typeof WasiType | null> {
  if (wasiClass !== undefined) return wasiClass;
  const emit = process.emitWarning;
  process.emitWarning = () => {};
  try {
    wasiClass = (await import('node:wasi')).WASI;
    module = new WebAssembly.Module(MEMORY_ONLY);
  } catch {
    wasiClass = null;
  } finally {
    process.emitWarning = emit;
  }
  return wasiClass;
}

export interface FileAdvice {
  sequential(): void;
  willNeed(offset: number, length: number): void;
}

const NONE: FileAdvice = { sequential: () => {}, willNeed: () => {} };

/** Advice on the open descriptor `fd`; calls that fail are ignored. Call `prepareFileAdvice` first. */
export function fileAdvice(fd: number): FileAdvice {
  if (!wasiClass || !module) return NONE;
  let advise: FdAdvise;
  try {
    const emit = process.emitWarning;
    process.emitWarning = () => {};
    try {
      const wasi = new wasiClass({ version: 'preview1', stdin: fd, stdout: 1, stderr: 2, returnOnExit: true });
      wasi.initialize(new WebAssembly.Instance(module, {}));
      advise = (wasi.wasiImport as { fd_advise: FdAdvise }).fd_advise;
    } finally {
      process.emitWarning = emit;
    }
  } catch {
    return NONE;
  }
  // WASI's descriptor 0 is the instance's stdin: `fd`.
  const call = (offset: number, length: number, advice: number) => {
    try {
      advise(0, BigInt(offset), BigInt(length), advice);
    } catch {
      // only a hint
    }
  };
  return {
    sequential: () => call(0, 0, SEQUENTIAL),
    willNeed: (offset, length) => call(offset, length, WILLNEED),
  };
}

/** Load what fileAdvice needs (once per thread). */
export async function prepareFileAdvice(): Promise<void> {
  await loadWasi();
}
