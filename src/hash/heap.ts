/**
 * V8's heap sized for a walk over many files (README "Trees of small
 * files"). A run allocates a few KiB per file, nearly all of it garbage at
 * once; left to its defaults V8 grows the young generation to 2 × 16 MiB and
 * lets the old one fill with what survived a scavenge before it collects, so
 * a tree of 50,000 files peaked at 105–130 MiB RSS with under 10 MiB live.
 * Here the semi-spaces keep their first size (growth factor 1) and the old
 * generation is collected once it grows by a tenth over what the last full
 * collection kept (a few MiB: a millisecond or two to collect).
 *
 * Both are V8 flags read each time the heap is sized, so setting them once
 * running takes effect. V8 calls setting flags at run time "use with care":
 * only these two plain sizing factors are set, and a V8 that ignored them
 * would only use more memory. Starting a worker thread sets V8's flags
 * again from the command line, so the hash pool calls this again once its
 * workers are up (src/hash/pool.ts). The launcher is left alone (users run
 * the `qsync` bin or `node dist/src/cli/main.js`).
 */
import { setFlagsFromString } from 'node:v8';

export function sizeHeap(): void {
  setFlagsFromString('--semi-space-growth-factor=1');
  setFlagsFromString('--heap-growing-percent=10');
}
