/**
 * --chmod=CHMOD as `man rsync` describes it: comma-separated items in
 * chmod(1)'s grammar, each either an octal mode or a symbolic one, and
 * each optionally prefixed by 'D' (directories only) or 'F' (everything
 * else). The result is the mode the source is taken to have.
 *
 *   item     := ('D'+ | 'F'+)? (octal | symbolic)
 *   octal    := [0-7]+, at most 07777: the permission bits, all 12 of them
 *   symbolic := [ugoa]* ('+' | '-' | '=') ([rwxXst]* | 'u' | 'g' | 'o')
 *
 * One operator per item ("u+r-w" is refused; write "u+r,u-w"), and a
 * permission-copy item (g=u) copies from one class, without letters.
 *
 * What chmod(1) leaves open, rsync 3.5 does this way (observed, and pinned
 * by the differential cases in test/rsync-options.test.ts):
 * - no u/g/o/a: all classes, but bits set in the umask are not added or
 *   removed ('=' still clears them);
 * - X looks at the mode the source had before any item: a directory, or
 *   any execute bit;
 * - s is set-user-ID for u, set-group-ID for g, both for both, and
 *   set-user-ID when neither u nor g is named ("o+s", "+s");
 *   t is the sticky bit whoever is named;
 * - '=' clears the named classes' rwx bits; with an s or t among the
 *   letters it also clears set-user-ID for u and set-group-ID for g.
 *   A permission-copy '=' clears each destination class's special bit
 *   (u: set-user-ID, g: set-group-ID, o: sticky), as the manual says;
 * - a copy reads the class's bits as the items before it left them.
 */

const S_IFMT = 0o170000;
const S_IFDIR = 0o040000;
const SETUID = 0o4000;
const SETGID = 0o2000;
const STICKY = 0o1000;
const PERMS = 0o7777;

/** The rwx bits of each class, and the special bit a copy '=' clears in it. */
const CLASSES = {
  u: { rwx: 0o700, shift: 6, special: SETUID },
  g: { rwx: 0o070, shift: 3, special: SETGID },
  o: { rwx: 0o007, shift: 0, special: STICKY },
} as const;
type ClassName = keyof typeof CLASSES;
const ALL_CLASSES: readonly ClassName[] = ['u', 'g', 'o'];

/** The union over `classes` of one of their masks. */
const union = (classes: readonly ClassName[], mask: (c: (typeof CLASSES)[ClassName]) => number): number =>
  classes.reduce((bits, c) => bits | mask(CLASSES[c]), 0);

type Applies = 'all' | 'dirs' | 'files';

/** One item: set the permission bits, or change them for some classes. */
export type ChmodRule =
  | { applies: Applies; kind: 'octal'; bits: number }
  | {
      applies: Applies;
      kind: 'symbolic';
      op: '+' | '-' | '=';
      /** The classes named; none means all of them, less the umask. */
      who: ClassName[];
      /** Letters from rwxXst, or the class whose bits are copied. */
      perms: { letters: string } | { copy: ClassName };
      /** Bits the operation may add or remove (0o7777 less the umask when no class is named). */
      allowed: number;
    };

function parseItem(item: string, umask: number): ChmodRule | undefined {
  const m = /^(D+|F+)?(?:([0-7]+)|([ugoa]*)([-+=])(?:([rwxXst]*)|([ugo])))$/.exec(item);
  if (!m) return undefined;
  const applies: Applies = m[1] === undefined ? 'all' : m[1][0] === 'D' ? 'dirs' : 'files';
  if (m[2] !== undefined) {
    const bits = parseInt(m[2], 8);
    return bits > PERMS ? undefined : { applies, kind: 'octal', bits };
  }
  const named = m[3]!.replace(/a/g, 'ugo');
  const who = ALL_CLASSES.filter((c) => named.includes(c));
  const perms = m[6] !== undefined ? { copy: m[6] as ClassName } : { letters: m[5]! };
  return { applies, kind: 'symbolic', op: m[4] as '+' | '-' | '=', who, perms, allowed: who.length ? PERMS : PERMS & ~umask };
}

/**
 * The rules of one --chmod argument, or undefined when rsync would refuse
 * it ("Invalid argument passed to --chmod"). `umask` limits the items that
 * name no class, as chmod(1) does.
 */
export function parseChmod(text: string, umask: number): ChmodRule[] | undefined {
  const rules: ChmodRule[] = [];
  for (const item of text.split(',')) {
    const rule = parseItem(item, umask);
    if (!rule) return undefined;
    rules.push(rule);
  }
  return rules;
}

/** The bits an item's letters stand for, for its classes; X as the source's `original` mode says. */
function letterBits(letters: string, who: readonly ClassName[], original: number): number {
  const rwx = union(who.length ? who : ALL_CLASSES, (c) => c.rwx);
  const executable = (original & S_IFMT) === S_IFDIR || (original & 0o111) !== 0;
  let bits = 0;
  for (const letter of letters) {
    if (letter === 'r') bits |= 0o444 & rwx;
    else if (letter === 'w') bits |= 0o222 & rwx;
    else if (letter === 'x' || (letter === 'X' && executable)) bits |= 0o111 & rwx;
    else if (letter === 's') bits |= (who.includes('g') ? SETGID : 0) | (who.includes('u') || !who.includes('g') ? SETUID : 0);
    else if (letter === 't') bits |= STICKY;
  }
  return bits;
}

function applyRule(mode: number, rule: ChmodRule, original: number): number {
  const isDir = (original & S_IFMT) === S_IFDIR;
  if ((rule.applies === 'dirs' && !isDir) || (rule.applies === 'files' && isDir)) return mode;
  if (rule.kind === 'octal') return (mode & ~PERMS) | rule.bits;
  const classes = rule.who.length ? rule.who : ALL_CLASSES;
  let bits: number;
  let clear = union(classes, (c) => c.rwx);
  if ('copy' in rule.perms) {
    const from = (mode >> CLASSES[rule.perms.copy].shift) & 0o7;
    bits = union(classes, (c) => from << c.shift);
    clear |= union(classes, (c) => c.special);
  } else {
    bits = letterBits(rule.perms.letters, rule.who, original);
    if (/[st]/.test(rule.perms.letters)) clear |= (rule.who.includes('u') ? SETUID : 0) | (rule.who.includes('g') ? SETGID : 0);
  }
  bits &= rule.allowed;
  if (rule.op === '+') return mode | bits;
  if (rule.op === '-') return mode & ~bits;
  return (mode & ~clear) | bits;
}

/** A source's mode (file type included) after every rule, in order. */
export function tweakMode(mode: number, rules: readonly ChmodRule[]): number {
  return rules.reduce((m, rule) => applyRule(m, rule, mode), mode);
}
