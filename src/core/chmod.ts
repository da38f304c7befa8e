/**
 * rsync's --chmod (its chmod.c, ported): comma-separated items, each an
 * optional D (folders only) or F (everything else) and then either chmod(1)
 * symbolic form ([ugoa]*[-+=][rwxXst]* or [ugoa]*[-+=][ugo]) or an octal
 * mode. A symbolic item without [ugoa] leaves alone what the umask masks,
 * as chmod(1) does. Applied to the source's mode before anything is compared
 * or set; symlinks are never changed.
 */

const CHMOD_BITS = 0o7777;
const X_KEEP = 1;
const DIRS_ONLY = 2;
const FILES_ONLY = 4;
const S_IFDIR = 0o040000;
const S_IFMT = 0o170000;

const enum Op {
  Add = 1,
  Sub,
  Eq,
  Set,
}

export interface ChmodRule {
  and: number;
  or: number;
  copySrc: number;
  copyDst: number;
  copyAnd: number;
  op: Op;
  flags: number;
}

const specialBitsFor = (where: number): number => (where & 0o100 ? 0o4000 : 0) | (where & 0o010 ? 0o2000 : 0) | (where & 0o001 ? 0o1000 : 0);

/** rsync's parse_chmod(): the rules of one --chmod argument, or undefined when it is not valid. */
export function parseChmod(text: string, umask: number): ChmodRule[] | undefined {
  const rules: ChmodRule[] = [];
  let where = 0;
  let what = 0;
  let op = 0;
  let topbits = 0;
  let topoct = 0;
  let flags = 0;
  let copybits = 0;
  let state: 'first' | 'second' | 'octal' = 'first';
  for (let i = 0; ; i++) {
    const c = text[i];
    if (c === undefined || c === ',') {
      if (!op) return undefined;
      const whereGiven = where;
      let bits: number;
      if (where) bits = where * what;
      else {
        where = 0o111;
        bits = (where * what) & ~umask;
      }
      const copyAnd = whereGiven ? CHMOD_BITS : ~umask;
      const rule: ChmodRule = { and: 0, or: 0, copySrc: copybits, copyDst: where, copyAnd, op, flags };
      if (op === Op.Add) Object.assign(rule, { and: CHMOD_BITS, or: bits + topoct });
      else if (op === Op.Sub) Object.assign(rule, { and: CHMOD_BITS - bits - topoct, or: 0 });
      else if (op === Op.Eq) {
        Object.assign(rule, { and: CHMOD_BITS - where * 7 - (topoct ? topbits : 0) - (copybits ? specialBitsFor(where) : 0), or: bits + topoct });
      } else Object.assign(rule, { and: 0, or: bits, copySrc: 0, copyDst: 0, copyAnd: CHMOD_BITS });
      rules.push(rule);
      if (c === undefined) return rules;
      state = 'first';
      where = what = op = topoct = topbits = flags = copybits = 0;
      continue;
    }
    if (state === 'first') {
      if (c === 'D') {
        if (flags & FILES_ONLY) return undefined;
        flags |= DIRS_ONLY;
      } else if (c === 'F') {
        if (flags & DIRS_ONLY) return undefined;
        flags |= FILES_ONLY;
      } else if (c === 'u') {
        where |= 0o100;
        topbits |= 0o4000;
      } else if (c === 'g') {
        where |= 0o010;
        topbits |= 0o2000;
      } else if (c === 'o') where |= 0o001;
      else if (c === 'a') {
        where |= 0o111;
        topbits |= 0o6000;
      } else if (c === '+' || c === '-' || c === '=') {
        op = c === '+' ? Op.Add : c === '-' ? Op.Sub : Op.Eq;
        state = 'second';
      } else if (c >= '0' && c <= '7' && !where) {
        op = Op.Set;
        state = 'octal';
        where = 1;
        what = Number(c);
      } else return undefined;
    } else if (state === 'second') {
      if ('rwxXst'.includes(c) && copybits) return undefined;
      if (c === 'r') what |= 4;
      else if (c === 'w') what |= 2;
      else if (c === 'x' || c === 'X') {
        if (c === 'X') flags |= X_KEEP;
        what |= 1;
      } else if (c === 's') topoct = topbits ? topoct | topbits : 0o4000;
      else if (c === 't') topoct |= 0o1000;
      else if (c === 'u' || c === 'g' || c === 'o') {
        if (what || topoct || copybits) return undefined;
        copybits = c === 'u' ? 0o100 : c === 'g' ? 0o010 : 0o001;
      } else return undefined;
    } else {
      if (!(c >= '0' && c <= '7')) return undefined;
      what = what * 8 + Number(c);
      if (what > CHMOD_BITS) return undefined;
    }
  }
}

function copyBits(mode: number, src: number, dst: number, and: number): number {
  let bits = 0;
  if (src & 0o100) bits |= (mode >> 6) & 7;
  if (src & 0o010) bits |= (mode >> 3) & 7;
  if (src & 0o001) bits |= mode & 7;
  return (dst * bits) & and;
}

/** rsync's tweak_mode(): `mode` (type bits included) after the rules. */
export function tweakMode(mode: number, rules: readonly ChmodRule[]): number {
  const isX = mode & 0o111;
  const nonPerm = mode & ~CHMOD_BITS;
  const isDir = (nonPerm & S_IFMT) === S_IFDIR;
  for (const r of rules) {
    if (r.flags & DIRS_ONLY && !isDir) continue;
    if (r.flags & FILES_ONLY && isDir) continue;
    const copied = copyBits(mode, r.copySrc, r.copyDst, r.copyAnd);
    mode &= r.and;
    mode |= r.flags & X_KEEP && !isX && !isDir ? r.or & ~0o111 : r.or;
    if (r.op === Op.Sub) mode &= CHMOD_BITS - copied;
    else mode |= copied;
  }
  return (mode & CHMOD_BITS) | nonPerm;
}
