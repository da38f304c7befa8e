/**
 * The unprivileged attacker of the race class, run as nobody by
 * scripts/faults/race.ts: in a tight loop, swaps the entries of folders it
 * owns (inside SRC and DEST) for symlinks to root's victim files and
 * folders, and back. Runs until killed.
 *
 *   node attacker.js SEED VICTIM_FILE VICTIM_DIR DIR...
 */
import { readdirSync, renameSync, rmSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { Rng } from './runner.js';

const [seedText, victimFile, victimDir, ...dirs] = process.argv.slice(2);
const rng = new Rng(Number(seedText));
/** Run `f`, ignoring its failure (the victim side races us too); true if it succeeded. */
const ok = (f: () => unknown): boolean => {
  try {
    f();
    return true;
  } catch {
    return false;
  }
};

for (;;) {
  const dir = rng.pick(dirs);
  let names: import('node:fs').Dirent[] = [];
  ok(() => (names = readdirSync(dir!, { withFileTypes: true })));
  const e = names.length ? rng.pick(names) : undefined;
  if (!e || e.name.startsWith('.')) continue;
  const p = join(dir!, e.name);
  const aside = join(dir!, `.${e.name}.orig`);
  if (e.isSymbolicLink()) continue;
  if (!ok(() => renameSync(p, aside))) continue;
  ok(() => symlinkSync(e.isDirectory() ? victimDir! : victimFile!, p));
  for (let spin = rng.int(20000); spin > 0; spin--);
  if (rng.chance(0.7)) {
    ok(() => rmSync(p, { force: true }));
    ok(() => renameSync(aside, p));
  }
}
