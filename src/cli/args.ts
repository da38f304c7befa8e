/**
 * rsync-compatible command line. `parseArgv` is pure: no I/O, no printing,
 * no exit; bad input throws QsyncError('USAGE' | 'UNSUPPORTED').
 *
 * Two stages. `normalise` walks argv the way rsync's popt does (options and
 * operands interleaved, short clusters like `-hav`, `-B64K`, `-B 64K`,
 * `--opt=value` and `--opt value`, where a value may start with '-', and
 * `--` ending options) and rewrites every option to its canonical long form
 * from the one table, SPECS. It also resolves what depends on order, which a
 * parsed object cannot tell: `-a` expands in place so `-a --no-perms` and
 * `--no-perms -a` differ as in rsync, include/exclude rules keep their
 * interleaving, and `--no-v`/`--no-h` reset earlier counts. `readLine` then
 * reads the canonical line back (counts, last-one-wins booleans and values):
 * a line only `normalise` writes needs no general parser, and yargs' own
 * load (about 0.1 s, a third of start-up) is left to the subcommands.
 */
import { QsyncError } from '../core/errors.js';
import { parseFilterRule, type FilterRule } from '../core/filter.js';
import { DEFAULT_BLOCK_SIZE, isValidBlockSize } from '../core/geometry.js';
import { parseChmod } from '../core/chmod.js';
import { parseIdMap } from '../core/idmap.js';
import { checkLogFormat, usesEscape } from './log-format.js';

export interface SyncOptions {
  recursive: boolean;
  links: boolean;
  perms: boolean;
  times: boolean;
  /** -O: folders are left out of -t (their times not set). */
  omitDirTimes: boolean;
  group: boolean;
  owner: boolean;
  devices: boolean;
  specials: boolean;
  /** -H: hard links within the transfer recreated as links. */
  hardLinks: boolean;
  /** -A: POSIX ACLs (implies perms, as in rsync). */
  acls: boolean;
  /** -X: extended attributes. */
  xattrs: boolean;
  /** Number of -v. */
  verbose: number;
  quiet: boolean;
  /**
   * rsync's human-readable level, not the count of -h: 1 by default (digits
   * grouped with commas), +1 per -h (2: units of 1000, 3: units of 1024),
   * 0 after --no-h. Pass it to formatSize() as is.
   */
  human: number;
  dryRun: boolean;
  /** Per-file progress lines (--progress, -P, --info=progress1). */
  progress: boolean;
  /** One total progress line (--info=progress2); takes precedence over `progress`. */
  progress2: boolean;
  stats: boolean;
  itemize: boolean;
  inplace: boolean;
  wholeFile: boolean;
  delete: boolean;
  /** --delete-excluded: excluded names in DEST are deleted too (implies --delete). */
  deleteExcluded: boolean;
  /** --max-delete=NUM: at most NUM deletions (-1: no limit; rsync's exit 25 when it stops some). */
  maxDelete: number;
  /** --mkpath: create DEST's missing path components. */
  mkpath: boolean;
  /** --min-size/--max-size in bytes (-1: no limit): regular files outside are skipped. */
  minSize: number;
  maxSize: number;
  /** -I: no quick check (size and mtime equal is not enough to skip a file). */
  ignoreTimes: boolean;
  /** --modify-window=NUM: mtimes within NUM seconds are equal; -1: to the nanosecond; 0: to the microsecond (qsync's default). */
  modifyWindow: number;
  /** -m: folders without a file, link or node below them (after the filters) are left out. */
  pruneEmptyDirs: boolean;
  /** --no-inc-recursive: rsync builds its list whole first; qsync's walk is the same, only its header says so. */
  noIncRecursive: boolean;
  /** --force: a folder in the way of a file goes with its contents, as under --delete. */
  force: boolean;
  /** --safe-links: symlinks leading out of the tree (absolute, or climbing above its top) are left out. */
  safeLinks: boolean;
  /** -d: folders are made without recursing (contents of an operand ending in '/' or "." one level). */
  dirs: boolean;
  /** --files-from=FILE: the names to transfer, relative to the one SRC (implies -R and -d, not -r). */
  filesFrom?: string;
  /** --chmod arguments, in order (src/core/chmod.ts). */
  chmod: string[];
  /** --usermap/--groupmap (src/core/idmap.ts); --chown=USER:GROUP sets them to "*:USER", "*:GROUP". */
  usermap?: string;
  groupmap?: string;
  /** --out-format=FORMAT: the line printed for each change and deletion (src/cli/log-format.ts). */
  outFormat?: string;
  /** rsync's --info levels, from -v/-q, --progress, --stats and --info=FLAGS as rsync sets them (what prints what: src/cli/output.ts). */
  info: InfoLevels;
  /** --log-file=FILE, --log-file-format=FMT (src/cli/log-file.ts). */
  logFile?: string;
  logFileFormat?: string;
  /** -R: each SRC keeps its path below DEST (from a "/./" in it on). */
  relative: boolean;
  /** --no-implied-dirs (false): -R's folders on the way are not sent; missing ones are made plain, existing ones left as they are. */
  impliedDirs: boolean;
  /** -0: --files-from, --exclude-from and --include-from lists end names with NUL, not newlines. */
  from0: boolean;
  /** In command-line order; *-from files not yet read (see expandFilterFiles). */
  filters: FilterRule[];
  sparse: boolean;
  checksum: boolean;
  sizeOnly: boolean;
  update: boolean;
  existing: boolean;
  ignoreExisting: boolean;
  numericIds: boolean;
  oneFileSystem: boolean;
  /** Bytes; a power of two in [4 KiB, 16 MiB]. */
  blockSize: number;
  manifest?: string;
  /** --state-dir: where qsync keeps manifests, intents and locks (default: /var/lib/qsync or $XDG_STATE_HOME/qsync). */
  stateDir?: string;
  json: boolean;
  rsh?: string;
  /** --timeout, in seconds without a byte from the peer of a remote sync (0: none). */
  timeout: number;
  /** --bwlimit, in bytes a second (0: none). */
  bwlimit: number;
  /** --qsync-path (rsync's --rsync-path): the command that starts qsync on the remote host. */
  qsyncPath?: string;
  writeBatch?: string;
  onlyWriteBatch?: string;
  readBatch?: string;
  backupDir?: string;
  compress: boolean;
  qmp?: string;
  drives: string[];
  image?: string;
  /** `--domain NAME`: a libvirt domain, backed up through libvirt's backup API. */
  domain?: string;
  /** `--connect URI`: the libvirt URI for --domain and for a local sync's domains (default qemu:///system). */
  connect?: string;
  /** Percent of blocks re-read to verify, 0..100. */
  verifySample: number;
}

/** The --info words whose levels qsync's output follows. */
export type InfoLevels = Record<'name' | 'del' | 'skip' | 'flist' | 'misc' | 'stats' | 'nonreg' | 'progress' | 'copy', number>;

export type ParsedArgs =
  | { kind: 'sync'; sources: string[]; dest: string; options: SyncOptions }
  | { kind: 'help'; text: string }
  | { kind: 'version'; level: VersionLevel };

type Kind =
  | 'flag' // boolean; its `neg` spellings turn it off
  | 'count' // -vv; its `neg` spellings reset it to 0
  | 'value' // takes an argument, the last one wins
  | 'list' // takes an argument, repeatable
  | 'filter' // include/exclude rules, kept in order
  | 'info' // --info=FLAGS
  | 'id-map' // --usermap, --groupmap, --chown: turn on -o/-g where they stand, as rsync
  | 'expand' // stands for the options in `expand` (-a, -D, -P)
  | 'noop' // accepted, nothing to do: qsync always behaves that way
  | 'help'
  | 'version';

/** -V (1) or -VV (2, rsync's JSON). */
export type VersionLevel = 1 | 2;

interface Spec {
  /** Canonical name: the yargs key, or the help label of short-only options. */
  name: string;
  kind: Kind;
  short?: string;
  /** Other long spellings. */
  aliases?: string[];
  /** Long spellings (without "--") that negate it. */
  neg?: string[];
  expand?: string[];
  /** Argument placeholder in help; value, list, filter and info kinds. */
  arg?: string;
  /** Short option only, as rsync's -D and -P. */
  noLong?: true;
  help: string;
}

const ARCHIVE = ['recursive', 'links', 'perms', 'times', 'group', 'owner', 'devices', 'specials'];

const SPECS: Spec[] = [
  { name: 'verbose', short: 'v', kind: 'count', neg: ['no-verbose', 'no-v'], help: 'increase verbosity' },
  { name: 'info', kind: 'info', arg: 'FLAGS', help: 'fine-grained informational verbosity (progress2, stats2, ...)' },
  { name: 'debug', kind: 'list', arg: 'FLAGS', help: 'only none or WORD0: qsync prints none of rsync\'s debug output (-vv\'s included)' },
  { name: 'quiet', short: 'q', kind: 'flag', help: 'suppress non-error messages' },
  { name: 'checksum', short: 'c', kind: 'flag', neg: ['no-checksum', 'no-c'], help: 'read and compare every file, not mod-time & size' },
  { name: 'archive', short: 'a', kind: 'expand', expand: ARCHIVE, help: 'archive mode is -rlptgoD' },
  { name: 'recursive', short: 'r', kind: 'flag', neg: ['no-recursive', 'no-r'], help: 'recurse into directories' },
  { name: 'update', short: 'u', kind: 'flag', help: 'skip files that are newer on the receiver' },
  { name: 'inplace', kind: 'flag', neg: ['no-inplace'], help: 'update destination files in-place' },
  { name: 'links', short: 'l', kind: 'flag', neg: ['no-links', 'no-l'], help: 'copy symlinks as symlinks' },
  { name: 'perms', short: 'p', kind: 'flag', neg: ['no-perms', 'no-p'], help: 'preserve permissions' },
  { name: 'owner', short: 'o', kind: 'flag', neg: ['no-owner', 'no-o'], help: 'preserve owner (super-user only)' },
  { name: 'group', short: 'g', kind: 'flag', neg: ['no-group', 'no-g'], help: 'preserve group' },
  { name: 'devices', kind: 'flag', neg: ['no-devices'], help: 'preserve device files (super-user only)' },
  { name: 'specials', kind: 'flag', neg: ['no-specials'], help: 'preserve special files' },
  { name: 'D', short: 'D', noLong: true, kind: 'expand', expand: ['devices', 'specials'], neg: ['no-D'], help: 'same as --devices --specials' },
  { name: 'hard-links', short: 'H', kind: 'flag', neg: ['no-hard-links', 'no-H'], help: 'preserve hard links' },
  { name: 'acls', short: 'A', kind: 'flag', neg: ['no-acls', 'no-A'], help: 'preserve ACLs (implies --perms)' },
  { name: 'xattrs', short: 'X', kind: 'flag', neg: ['no-xattrs', 'no-X'], help: 'preserve extended attributes' },
  { name: 'times', short: 't', kind: 'flag', neg: ['no-times', 'no-t'], help: 'preserve modification times' },
  { name: 'omit-dir-times', short: 'O', kind: 'flag', neg: ['no-omit-dir-times', 'no-O'], help: 'omit directories from --times' },
  { name: 'sparse', short: 'S', kind: 'flag', neg: ['no-sparse', 'no-S'], help: 'turn sequences of nulls into sparse blocks' },
  { name: 'dry-run', short: 'n', kind: 'flag', help: 'perform a trial run with no changes made' },
  { name: 'whole-file', short: 'W', kind: 'flag', neg: ['no-whole-file', 'no-W'], help: 'rewrite changed files whole' },
  { name: 'one-file-system', short: 'x', kind: 'flag', neg: ['no-one-file-system', 'no-x'], help: "don't cross filesystem boundaries" },
  { name: 'block-size', short: 'B', kind: 'value', arg: 'SIZE', help: 'block size: power of two, 4K..16M (default 64K)' },
  { name: 'timeout', kind: 'value', arg: 'SECONDS', help: 'over ssh: give up when the peer sends nothing for SECONDS (0 = wait for ever)' },
  { name: 'bwlimit', kind: 'value', arg: 'RATE', help: 'limit the bandwidth of a remote transfer (KiB/s; 1.5M, 500K; 0 = no limit)' },
  { name: 'rsh', short: 'e', kind: 'value', arg: 'COMMAND', help: 'specify the remote shell to use' },
  { name: 'qsync-path', kind: 'value', arg: 'PROGRAM', help: 'specify the qsync to run on the remote machine' },
  { name: 'existing', kind: 'flag', aliases: ['ignore-non-existing'], help: 'skip creating new files on receiver' },
  { name: 'ignore-existing', kind: 'flag', help: 'skip updating files that exist on receiver' },
  {
    name: 'delete',
    kind: 'flag',
    aliases: ['del', 'delete-before', 'delete-during', 'delete-delay', 'delete-after'],
    help: 'delete extraneous files from dest directories',
  },
  { name: 'delete-excluded', kind: 'flag', help: 'also delete excluded files from dest directories (implies --delete)' },
  { name: 'max-delete', kind: 'value', arg: 'NUM', help: "don't delete more than NUM files (exit 25 when some are left)" },
  { name: 'mkpath', kind: 'flag', neg: ['no-mkpath'], help: "create destination's missing path components" },
  { name: 'max-size', kind: 'value', arg: 'SIZE', help: "don't transfer any file larger than SIZE" },
  { name: 'min-size', kind: 'value', arg: 'SIZE', help: "don't transfer any file smaller than SIZE" },
  { name: 'ignore-times', short: 'I', kind: 'flag', help: "don't skip files that match size and time" },
  { name: 'modify-window', short: '@', kind: 'value', arg: 'NUM', help: 'mtimes within NUM seconds are equal (-1: to the nanosecond)' },
  { name: 'dirs', short: 'd', kind: 'flag', neg: ['no-dirs', 'no-d'], help: 'transfer directories without recursing' },
  { name: 'prune-empty-dirs', short: 'm', kind: 'flag', neg: ['no-prune-empty-dirs', 'no-m'], help: 'prune empty directory chains from file-list' },
  { name: 'force', kind: 'flag', neg: ['no-force'], help: 'force deletion of directories even if not empty' },
  { name: 'safe-links', kind: 'flag', help: 'ignore symlinks that point outside the tree' },
  { name: 'no-inc-recursive', kind: 'flag', aliases: ['no-i-r'], neg: ['inc-recursive', 'i-r'], help: 'send the file list whole first ("building file list ... done")' },
  { name: 'chmod', kind: 'list', arg: 'CHMOD', help: 'affect file and/or directory permissions' },
  { name: 'usermap', kind: 'id-map', arg: 'STRING', help: 'custom username mapping' },
  { name: 'groupmap', kind: 'id-map', arg: 'STRING', help: 'custom groupname mapping' },
  { name: 'chown', kind: 'id-map', arg: 'USER:GROUP', help: 'simple username/groupname mapping' },
  { name: 'log-file', kind: 'value', arg: 'FILE', help: "log what we're doing to the specified FILE" },
  { name: 'log-file-format', kind: 'value', arg: 'FMT', help: 'log updates using the specified FMT' },
  { name: 'out-format', kind: 'value', arg: 'FORMAT', aliases: ['log-format'], help: 'output updates using the specified FORMAT' },
  { name: 'relative', short: 'R', kind: 'flag', neg: ['no-relative', 'no-R'], help: 'use relative path names' },
  { name: 'implied-dirs', kind: 'flag', aliases: ['i-d'], neg: ['no-implied-dirs', 'no-i-d'], help: "with -R: --no-implied-dirs doesn't send the folders on the way" },
  { name: 'files-from', kind: 'value', arg: 'FILE', help: 'read list of source-file names from FILE' },
  { name: 'from0', short: '0', kind: 'flag', neg: ['no-from0'], help: 'all *-from/filter files are delimited by 0s' },
  { name: 'backup', short: 'b', kind: 'flag', neg: ['no-backup'], help: 'only with --backup-dir (which keeps old blocks, not ~ copies)' },
  { name: 'partial', kind: 'noop', help: 'accepted: qsync always resumes' },
  { name: 'fsync', kind: 'noop', help: 'accepted: qsync always fsyncs' },
  { name: 'preallocate', kind: 'noop', help: 'accepted: qsync writes changed blocks in place (holes stay holes with -S); nothing is preallocated' },
  { name: 'no-motd', kind: 'noop', help: 'accepted: no daemon, no MOTD' },
  { name: 'numeric-ids', kind: 'flag', neg: ['no-numeric-ids'], help: "don't map uid/gid values by user/group name" },
  { name: 'size-only', kind: 'flag', help: 'skip files that match in size' },
  { name: 'compress', short: 'z', kind: 'flag', neg: ['no-compress', 'no-z'], help: 'compress file data during the transfer' },
  { name: 'exclude', kind: 'filter', arg: 'PATTERN', help: 'exclude files matching PATTERN' },
  { name: 'exclude-from', kind: 'filter', arg: 'FILE', help: 'read exclude patterns from FILE' },
  { name: 'include', kind: 'filter', arg: 'PATTERN', help: "don't exclude files matching PATTERN" },
  { name: 'include-from', kind: 'filter', arg: 'FILE', help: 'read include patterns from FILE' },
  { name: 'filter', short: 'f', kind: 'filter', arg: 'RULE', help: 'add a file-filtering RULE (- + exclude include merge . clear !; no dir-merge)' },
  { name: 'stats', kind: 'flag', help: 'give some file-transfer stats' },
  { name: 'human-readable', short: 'h', kind: 'count', neg: ['no-human-readable', 'no-h'], help: 'output numbers in a human-readable format' },
  { name: 'progress', kind: 'flag', neg: ['no-progress'], help: 'show progress during transfer' },
  { name: 'P', short: 'P', noLong: true, kind: 'expand', expand: ['partial', 'progress'], help: 'same as --partial --progress' },
  { name: 'itemize-changes', short: 'i', kind: 'count', neg: ['no-itemize-changes', 'no-i'], help: 'output a change-summary for all updates' },
  { name: 'write-batch', kind: 'value', arg: 'FILE', help: 'write a delta to FILE' },
  { name: 'only-write-batch', kind: 'value', arg: 'FILE', help: 'like --write-batch but w/o updating dest' },
  { name: 'read-batch', kind: 'value', arg: 'FILE', help: 'apply the delta in FILE to DEST' },
  { name: 'backup-dir', kind: 'value', arg: 'DIR', help: 'keep reverse deltas of overwritten blocks in DIR' },
  { name: 'manifest', kind: 'value', arg: 'PATH', help: "where a single file's block manifest lives (default: in the state folder)" },
  { name: 'state-dir', kind: 'value', arg: 'DIR', help: 'keep qsync\'s state (manifests, intents, locks) in DIR' },
  { name: 'json', kind: 'flag', help: 'print a JSON summary on stdout' },
  { name: 'qmp', kind: 'value', arg: 'SOCKET', help: 'image mode: read a running VM through its QMP socket' },
  { name: 'drive', kind: 'list', arg: 'NAME', help: 'image mode: drive to back up (repeatable)' },
  { name: 'image', kind: 'value', arg: 'FILE', help: 'image mode: read an offline image through NBD' },
  { name: 'domain', kind: 'value', arg: 'NAME', help: "image mode: every disk of a libvirt domain, through libvirt's backup API" },
  { name: 'connect', kind: 'value', arg: 'URI', help: 'libvirt URI for --domain and a local sync\'s domains (default qemu:///system)' },
  { name: 'verify-sample', kind: 'value', arg: 'PCT', help: 'percent of blocks re-read to verify (default 0.5)' },
  { name: 'version', short: 'V', kind: 'version', help: 'print the version and exit' },
  { name: 'help', kind: 'help', help: 'show this help (-h is help only on its own)' },
];

/**
 * rsync options qsync does not implement, from rsync 3.4's option table;
 * anything else unknown is a plain usage error.
 */
const UNSUPPORTED_LONG = new Set(
  `stderr msgs2stderr no-msgs2stderr motd
  old-dirs old-d executability atimes no-atimes no-U open-noatime
  no-open-noatime crtimes no-crtimes no-N omit-link-times
  no-omit-link-times no-J super no-super fake-super copy-devices write-devices no-write-devices
  drop-D no-drop-D confine-root copy-links copy-unsafe-links insecure-links no-insecure-links
  munge-links no-munge-links copy-dirlinks keep-dirlinks max-alloc
  append append-verify no-append delete-missing-args ignore-missing-args remove-sent-files
  remove-source-files ignore-errors no-ignore-errors cvs-exclude
  checksum-choice cc compare-dest copy-dest link-dest fuzzy no-fuzzy no-y old-compress new-compress
  compress-choice zc skip-compress compress-level zl compress-threads zt no-partial partial-dir
  delay-updates no-delay-updates
  suffix list-only
  old-args no-old-args secluded-args no-secluded-args protect-args no-protect-args no-s trust-sender
  contimeout no-contimeout stop-after time-limit stop-at rsync-path
  temp-dir iconv no-iconv ipv4 ipv6 8-bit-output no-8-bit-output no-8 qsort copy-as
  address port sockopts password-file early-input blocking-io no-blocking-io outbuf remote-option
  protocol checksum-seed server sender config daemon dparam detach no-detach`.split(/\s+/),
);
const UNSUPPORTED_SHORT = new Set('EUNJLkKFCTs468My');

const byLong = new Map<string, { spec: Spec; negated: boolean }>();
const byShort = new Map<string, Spec>();
for (const spec of SPECS) {
  if (!spec.noLong) byLong.set(spec.name, { spec, negated: false });
  for (const a of spec.aliases ?? []) byLong.set(a, { spec, negated: false });
  for (const n of spec.neg ?? []) byLong.set(n, { spec, negated: true });
  if (spec.short) byShort.set(spec.short, spec);
}
const specNamed = (name: string): Spec => byLong.get(name)!.spec;
const specByName = new Map(SPECS.map((spec) => [spec.name, spec]));

const takesValue = (kind: Kind): boolean => kind === 'value' || kind === 'list' || kind === 'filter' || kind === 'info' || kind === 'id-map';

interface Normalised {
  /** Canonical options for yargs: --name, --no-name, --name=value. */
  line: string[];
  filters: FilterRule[];
  operands: string[];
  /** Set by a help option, which ends parsing where it stands. */
  stop?: 'help';
  /** -V/--version seen this many times (rsync: twice gives its JSON). */
  version: number;
  /** A --no-human-readable was seen: the level starts at 0 instead of 1. */
  noHuman: boolean;
  /** -r given itself, not through -a (rsync: --files-from turns off the -r of -a only). */
  ownRecursive: boolean;
  /** The values of repeatable options, as typed (yargs would drop an empty one and read "0644" as a number). */
  lists: Map<string, string[]>;
  /** --usermap/--groupmap, --chown's included. */
  usermap?: string;
  groupmap?: string;
}

function normalise(argv: readonly string[]): Normalised {
  const out: Normalised = { line: [], filters: [], operands: [], noHuman: false, version: 0, ownRecursive: false, lists: new Map() };

  const apply = (spec: Spec, negated: boolean, value?: string, implied = false): void => {
    switch (spec.kind) {
      case 'help':
        out.stop ??= 'help';
        return;
      case 'version':
        out.version++;
        return;
      case 'noop':
        return;
      case 'expand':
        for (const name of spec.expand!) apply(specNamed(name), negated, undefined, true);
        return;
      case 'count':
        if (negated) {
          // rsync's --no-v / --no-h set the level to 0; later -v / -h count up again.
          out.line = out.line.filter((t) => t !== `--${spec.name}`);
          if (spec.name === 'human-readable') out.noHuman = true;
        } else out.line.push(`--${spec.name}`);
        return;
      case 'flag':
        out.line.push(negated ? `--no-${spec.name}` : `--${spec.name}`);
        if (spec.name === 'recursive' && !implied) out.ownRecursive = !negated;
        // rsync: -A turns --perms on where it stands (a later --no-perms still turns it off).
        if (spec.name === 'acls' && !negated) out.line.push('--perms');
        return;
      case 'id-map':
        idMap(spec.name, value!);
        return;
      case 'list':
        out.lists.set(spec.name, [...(out.lists.get(spec.name) ?? []), value!]);
        return;
      case 'filter':
        if (spec.name === 'filter') out.filters.push(...parseFilterRule(value!));
        else {
          out.filters.push(
            spec.name.endsWith('-from')
              ? { type: spec.name as 'include-from' | 'exclude-from', file: value! }
              : { type: spec.name as 'include' | 'exclude', pattern: value! },
          );
        }
        return;
      default:
        out.line.push(`--${spec.name}=${value!}`);
    }
  };

  /** rsync's parse of --usermap, --groupmap and --chown: each map once, --chown's parts only where given. */
  const chownSet = { user: false, group: false };
  const idMap = (name: string, value: string): void => {
    const set = (kind: 'user' | 'group', map: string, viaChown: boolean): void => {
      const key = kind === 'user' ? 'usermap' : 'groupmap';
      if (out[key] !== undefined) {
        const msg = chownSet[kind] !== viaChown ? `--${viaChown ? 'chown' : key} conflicts with prior --${viaChown ? key : 'chown'}.` : viaChown ? `You can only specify a ${kind}-affecting --chown once.` : `You can only specify --${key} once.`;
        throw new QsyncError('USAGE', msg, { option: `--${name}` });
      }
      out[key] = map;
      chownSet[kind] = viaChown;
      out.line.push(kind === 'user' ? '--owner' : '--group');
    };
    if (name !== 'chown') return set(name === 'usermap' ? 'user' : 'group', value, false);
    const colon = value.indexOf(':');
    const user = colon < 0 ? value : value.slice(0, colon);
    const group = colon < 0 ? '' : value.slice(colon + 1);
    if (user) set('user', `*:${user}`, true);
    if (group) set('group', `*:${group}`, true);
  };

  const missingValue = (typed: string): QsyncError =>
    new QsyncError('USAGE', `${typed}: missing argument`, { option: typed });

  let i = 0;
  while (i < argv.length && !out.stop) {
    const arg = argv[i++]!;
    if (arg === '--') {
      out.operands.push(...argv.slice(i));
      break;
    }
    if (arg.startsWith('--')) {
      const eq = arg.indexOf('=');
      const name = arg.slice(2, eq < 0 ? undefined : eq);
      const typed = `--${name}`;
      const hit = byLong.get(name);
      if (!hit) throw unknownOption(typed, UNSUPPORTED_LONG.has(name));
      if (takesValue(hit.spec.kind)) {
        let value: string;
        if (eq >= 0) value = arg.slice(eq + 1);
        else if (i < argv.length) value = argv[i++]!;
        else throw missingValue(typed);
        apply(hit.spec, false, value);
      } else {
        if (eq >= 0) throw new QsyncError('USAGE', `${arg}: option does not take an argument`, { option: typed });
        apply(hit.spec, hit.negated);
      }
    } else if (arg.startsWith('-') && arg.length > 1) {
      for (let j = 1; j < arg.length && !out.stop; j++) {
        const ch = arg[j]!;
        const spec = byShort.get(ch);
        if (!spec) throw unknownOption(`-${ch}`, UNSUPPORTED_SHORT.has(ch), arg);
        if (!takesValue(spec.kind)) {
          apply(spec, false);
          continue;
        }
        // The rest of the cluster is the value (-B64K, -B=64K), else the next argument.
        let value = arg.slice(j + 1).replace(/^=/, '');
        if (!value) {
          if (i >= argv.length) throw missingValue(`-${ch}`);
          value = argv[i++]!;
        }
        apply(spec, false, value);
        break;
      }
    } else {
      out.operands.push(arg);
    }
  }
  return out;
}

/** rsync's options qsync refuses for a reason of its own, said with the refusal. */
const REFUSED_WHY: Record<string, string> = {
  '--suffix': "qsync's --backup-dir keeps the old blocks each run overwrites (qsync restore), not renamed copies for a suffix to name; see README.md, \"Deltas and history\"",
};

/** `typed`: the option as named in the message; `arg`: the argument it came in (rsync names a short option's whole cluster). */
function unknownOption(typed: string, knownToRsync: boolean, arg = typed): QsyncError {
  if (!knownToRsync) return new QsyncError('USAGE', `${arg}: unknown option`, { option: typed });
  const why = REFUSED_WHY[typed];
  return new QsyncError('UNSUPPORTED', `option ${typed} is not supported by qsync${why ? `: ${why}` : ''}; remove it or use rsync`, { option: typed });
}

/**
 * The canonical line (`--name`, `--no-name`, `--name=value`, as `normalise`
 * writes it) as values by name: a count is the number of its `--name`, a
 * flag the last of `--name`/`--no-name`, a value option every value in order
 * (`str` takes the last, as rsync does).
 */
function readLine(line: readonly string[]): Record<string, number | boolean | string[]> {
  const y: Record<string, number | boolean | string[]> = {};
  for (const token of line) {
    const eq = token.indexOf('=');
    if (eq >= 0) {
      const name = token.slice(2, eq);
      y[name] = [...((y[name] as string[] | undefined) ?? []), token.slice(eq + 1)];
      continue;
    }
    const name = token.slice(2);
    const spec = specByName.get(name);
    if (spec?.kind === 'count') y[name] = Number(y[name] ?? 0) + 1;
    else if (spec) y[name] = true;
    else y[name.slice(3)] = false; // --no-NAME
  }
  return y;
}

/** rsync's SIZE syntax: 65536, 64K, 64k, 64KiB (1024), 64KB (1000), 1M, 1G. */
export function parseBlockSize(text: string): number {
  const m = /^(\d+)(?:([kmg])(i?b)?)?$/i.exec(text);
  let bytes = NaN;
  if (m) {
    const base = m[3]?.toLowerCase() === 'b' ? 1000 : 1024;
    const power = m[2] ? 'kmg'.indexOf(m[2].toLowerCase()) + 1 : 0;
    bytes = Number(m[1]) * base ** power;
  }
  if (!isValidBlockSize(bytes)) {
    throw new QsyncError('USAGE', `invalid --block-size ${text}: must be a power of two from 4K to 16M (e.g. 64K)`, {
      option: '--block-size',
      value: text,
    });
  }
  return bytes;
}

/** rsync's --bwlimit RATE: KiB/s unless suffixed (K, M, G: powers of 1024; KB, MB: of 1000); fractions allowed. */
export function parseRate(text: string): number {
  const m = /^(\d+(?:\.\d+)?)(?:([kmg])(i?b)?)?$/i.exec(text);
  if (!m) throw new QsyncError('USAGE', `invalid --bwlimit ${text}: give a rate such as 500 (KiB/s), 1.5M or 0`, { option: '--bwlimit', value: text });
  const base = m[3]?.toLowerCase() === 'b' ? 1000 : 1024;
  const power = m[2] ? 'kmg'.indexOf(m[2].toLowerCase()) + 1 : 1;
  return Math.round(Number(m[1]) * base ** power);
}

/** An integer as rsync takes --max-delete and --modify-window (observed): C's strtol in base 0 (12, 0x1f, 017; empty is 0). */
function parseInt32(option: string, text: string): number {
  const m = /^\s*([+-]?)(?:0x([0-9a-f]+)|(0[0-7]*)|([1-9]\d*))?$/i.exec(text);
  const n = m && (m[2] !== undefined ? parseInt(m[2], 16) : m[3] !== undefined ? parseInt(m[3], 8) : m[4] !== undefined ? Number(m[4]) : text.trim() ? NaN : 0);
  if (n === null || !Number.isSafeInteger(n) || n > 2 ** 31 - 1) throw new QsyncError('USAGE', `--${option}=${text}: invalid numeric value`, { option: `--${option}`, value: text });
  return m![1] === '-' ? -n : n;
}

/** Multipliers of SIZE's unit letters: bytes, kilo, mega, giga, tera, peta. */
const SIZE_UNITS = 'bkmgtp';

/**
 * --min-size/--max-size's SIZE, as `man rsync` describes it: a number
 * with an optional fraction ("1.5m"), an optional unit whose first letter
 * is B, K, M, G, T or P, in any case (alone or followed by "ib": powers of
 * 1024; followed by "b": powers of 1000), and an optional "+1" or "-1"
 * moving it by one byte. Bytes, rounded down. Details the manual leaves out,
 * taken from rsync 3.5's answers (test/args.test.ts): an empty number is 0
 * ("", "k"), an offset needs something before it ("+1" is refused); a
 * leading '-' before a non-zero number, or a result below 0 or from 2^63,
 * is "too large"; anything else is "invalid".
 */
export function parseSizeArg(option: string, text: string): number {
  const fail = (why: 'invalid' | 'too large'): QsyncError =>
    new QsyncError('USAGE', `--${option}=${text} is ${why}`, { option: `--${option}`, value: text });
  if (text.startsWith('-')) throw fail(Number(/^-(\d*\.?\d*)/.exec(text)![1]!.replace(/^\.?$/, '0')) ? 'too large' : 'invalid');
  const m = /^(\d*(?:\.\d*)?)(?:([bkmgtp])(ib|b)?)?([+-]1)?$/i.exec(text);
  if (!m || (m[4] && !m[1] && !m[2])) throw fail('invalid');
  const number = m[1] === '' || m[1] === '.' ? 0 : Number(m[1]);
  const base = m[3]?.toLowerCase() === 'b' ? 1000 : 1024;
  const bytes = number * base ** (m[2] ? SIZE_UNITS.indexOf(m[2].toLowerCase()) : 0) + (m[4] ? Number(m[4]) : 0);
  if (bytes < 0 || bytes >= 2 ** 63) throw fail('too large');
  return Math.trunc(bytes);
}

function parseSeconds(text: string): number {
  if (!/^\d+$/.test(text)) throw new QsyncError('USAGE', `invalid --timeout ${text}: give whole seconds (0 = no timeout)`, { option: '--timeout', value: text });
  return Number(text);
}

function parsePercent(text: string): number {
  const pct = Number(text);
  if (!/^\d+(\.\d+)?$/.test(text) || pct > 100) {
    throw new QsyncError('USAGE', `invalid --verify-sample ${text}: must be a percentage from 0 to 100`, {
      option: '--verify-sample',
      value: text,
    });
  }
  return pct;
}


/**
 * --info=FLAGS as rsync reads it: comma-separated words, each with an
 * optional level (default 1, 0 silences), plus ALL, NONE and HELP. Returns
 * the levels set for each word; only progress and stats change what qsync
 * prints, the others are accepted.
 */
function parseInfo(values: readonly string[]): Map<string, number> | 'help' {
  const levels = new Map<string, number>();
  for (const item of values.flatMap((v) => v.split(','))) {
    if (!item) continue;
    const m = /^(.*?)(\d*)$/.exec(item)!;
    const word = m[1]!.toLowerCase();
    const level = m[2] ? Number(m[2]) : 1;
    if (word === 'help') return 'help';
    if (word === 'none' || word === 'all') {
      for (const w of INFO_WORDS) levels.set(w, word === 'none' ? 0 : level);
    } else if (INFO_WORDS.includes(word)) levels.set(word, level);
    else throw new QsyncError('USAGE', `Unknown --info item: "${m[1]}"`, { option: '--info', value: item });
  }
  return levels;
}

const DEBUG_WORDS = 'acl backup bind chdir connect cmd del deltasum dup exit filter flist fuzzy genr hash hlink iconv io nstr own proto recv send time all'.split(' ');

/**
 * --debug=FLAGS: rsync's debug output, which qsync has none of (not even
 * what rsync's -vv turns on: its "delta-transmission ..." and "total:
 * matches=..." lines). What turns it off is accepted (NONE, WORD0, ALL0);
 * anything asking for some is refused rather than ignored.
 */
function checkDebug(values: readonly string[]): void {
  for (const item of values.flatMap((v) => v.split(','))) {
    const m = /^(.*?)(\d*)$/.exec(item)!;
    const word = m[1]!.toLowerCase();
    if (!item || word === 'none' || (DEBUG_WORDS.includes(word) && m[2] !== '' && Number(m[2]) === 0)) continue;
    if (word !== 'help' && !DEBUG_WORDS.includes(word)) throw new QsyncError('USAGE', `Unknown --debug item: "${m[1]}"`, { option: '--debug', value: item });
    throw new QsyncError('UNSUPPORTED', `--debug=${item} is not supported by qsync, which has no debug output; only --debug=none (or WORD0) is accepted`, { option: '--debug', value: item });
  }
}

/**
 * The --info levels as rsync sets them, the one reading of -v, --progress,
 * --stats, -i and --info=FLAGS (what prints what: src/cli/output.ts; what
 * --log-file adds: src/cli/log-file.ts): each -v turns on a set of words
 * (none: NONREG; -v: COPY DEL FLIST MISC NAME STATS; -vv: SKIP, MISC2,
 * NAME2), --progress adds FLIST2 and PROGRESS (and NAME, unless -i or
 * --out-format names the files), --stats STATS2, and --info=FLAGS has the
 * last word. -q changes no level, as in rsync: it silences stdout
 * (TextPrinter), not the log file.
 */
export function infoLevels(verbose: number, progress: boolean, stats: boolean, formatted: boolean, given: ReadonlyMap<string, number> = new Map()): InfoLevels {
  const v = verbose;
  const l: InfoLevels = {
    nonreg: 1,
    copy: v >= 1 ? 1 : 0,
    del: v >= 1 ? 1 : 0,
    flist: v >= 1 ? 1 : 0,
    misc: v >= 2 ? 2 : v >= 1 ? 1 : 0,
    name: v >= 2 ? 2 : v >= 1 ? 1 : 0,
    stats: v >= 1 ? 1 : 0,
    skip: v >= 2 ? 1 : 0,
    progress: 0,
  };
  if (stats) l.stats = Math.max(l.stats, 2);
  if (progress) {
    if (!formatted && l.name === 0) l.name = 1;
    l.flist = Math.max(l.flist, 2);
    l.progress = 1;
  }
  for (const [word, level] of given) if (word in l) l[word as keyof InfoLevels] = level;
  return l;
}

function helpText(): string {
  const rows = SPECS.map((s) => {
    const long = s.noLong ? '' : `--${s.name}${s.arg ? `=${s.arg}` : ''}`;
    const label = [long, s.short ? `-${s.short}` : ''].filter(Boolean).join(', ');
    return `${label.padEnd(28)} ${s.help}`;
  });
  return [
    'qsync: incremental block-level sync for VM disk images, rsync-compatible',
    '',
    'Usage: qsync [OPTION]... SRC [SRC]... DEST',
    '  or   qsync --qmp SOCKET [--drive NAME]... [OPTION]... DEST',
    '  or   qsync --image FILE [OPTION]... DEST',
    '  or   qsync --domain NAME [--connect URI] [OPTION]... DEST',
    '  or   qsync forget DEST --qmp SOCKET|--image FILE [--drive NAME]... | --domain NAME [--connect URI]',
    '  or   qsync --read-batch=FILE [OPTION]... DEST',
    '  or   qsync apply DELTA TARGET | verify DELTA|TARGET | info DELTA',
    '  or   qsync restore TARGET [OUT] --backup-dir DIR (--list | --at N|TIME) | prune DIR --keep N',
    '',
    'Options',
    ...rows,
    `${'--no-OPTION'.padEnd(28)} turn off an implied OPTION (e.g. --no-D, --no-W)`,
    '',
    'rsync options not listed here are refused with exit code 1.',
    '',
  ].join('\n');
}

/** rsync's --info=HELP, word for word: what scripts and users read for the words and levels. */
const INFO_HELP: [string, string][] = [
  ['BACKUP', 'Mention files backed up'],
  ['COPY', 'Mention files copied locally on the receiving side'],
  ['DEL', 'Mention deletions on the receiving side'],
  ['FLIST', 'Mention file-list receiving/sending (levels 1-2)'],
  ['MISC', 'Mention miscellaneous information (levels 1-2)'],
  ['MOUNT', 'Mention mounts that were found or skipped'],
  ['NAME', 'Mention 1) updated file/dir names, 2) unchanged names'],
  ['NONREG', 'Mention skipped non-regular files (default 1, 0 disables)'],
  ['PROGRESS', 'Mention 1) per-file progress or 2) total transfer progress'],
  ['REMOVE', 'Mention files removed on the sending side'],
  ['SKIP', 'Mention files skipped due to transfer overrides (levels 1-2)'],
  ['STATS', 'Mention statistics at end of run (levels 1-3)'],
  ['SYMSAFE', 'Mention symlinks that are unsafe'],
];

const INFO_WORDS = INFO_HELP.map(([w]) => w.toLowerCase());

const infoHelpText = (): string =>
  [
    'Use OPT or OPT1 for level 1 output, OPT2 for level 2, etc.; OPT0 silences.',
    '',
    ...INFO_HELP.map(([w, text]) => `${w.padEnd(10)} ${text}`),
    '',
    `${'ALL'.padEnd(10)} Set all --info options (e.g. all4)`,
    `${'NONE'.padEnd(10)} Silence all --info options (same as all0)`,
    `${'HELP'.padEnd(10)} Output this help message`,
    '',
    'Options added at each level of verbosity:',
    '0) NONREG',
    '1) COPY,DEL,FLIST,MISC,NAME,STATS,SYMSAFE',
    '2) BACKUP,MISC2,MOUNT,NAME2,REMOVE,SKIP',
    '',
  ].join('\n');

function str(v: unknown): string | undefined {
  // A value option given twice reaches us as an array; the last one wins, as in rsync.
  const last = Array.isArray(v) ? v[v.length - 1] : v;
  return typeof last === 'string' ? last : undefined;
}

export function parseArgv(argv: readonly string[]): ParsedArgs {
  // rsync: "-h is help only on its own".
  if (argv.length === 1 && argv[0] === '-h') return { kind: 'help', text: helpText() };
  const n = normalise(argv);
  if (n.stop === 'help') return { kind: 'help', text: helpText() };
  if (n.version) return { kind: 'version', level: n.version > 1 ? 2 : 1 };

  const y = readLine(n.line);
  const bool = (name: string): boolean => y[name] === true;
  const list = (name: string): string[] => n.lists.get(name) ?? ((y[name] as unknown[] | undefined) ?? []).map(String);

  checkDebug(list('debug'));
  const info = parseInfo(list('info'));
  if (info === 'help') return { kind: 'help', text: infoHelpText() };
  const progressLevel = info.get('progress');
  const statsLevel = info.get('stats');
  const outFormat = str(y['out-format']);
  if (outFormat !== undefined) checkLogFormat(outFormat, '--out-format');
  const itemizeCount = Number(y['itemize-changes'] ?? 0);
  const levels = infoLevels(Number(y.verbose ?? 0), bool('progress'), bool('stats'), itemizeCount > 0 || outFormat !== undefined, info);
  // rsync: -ii shows unchanged entries too, as --info=name2 does, where the line has %i.
  if (itemizeCount >= 2 && (outFormat === undefined || usesEscape(outFormat, 'i'))) levels.name = Math.max(levels.name, 2);

  const verifyText = str(y['verify-sample']);
  const blockText = str(y['block-size']);

  const filesFrom = str(y['files-from']);
  const options: SyncOptions = {
    recursive: bool('recursive') && (filesFrom === undefined || n.ownRecursive),
    links: bool('links'),
    perms: bool('perms'),
    times: bool('times'),
    omitDirTimes: bool('omit-dir-times'),
    group: bool('group'),
    owner: bool('owner'),
    devices: bool('devices'),
    specials: bool('specials'),
    hardLinks: bool('hard-links'),
    acls: bool('acls'),
    xattrs: bool('xattrs'),
    verbose: Number(y.verbose ?? 0),
    quiet: bool('quiet'),
    human: (n.noHuman ? 0 : 1) + Number(y['human-readable'] ?? 0),
    dryRun: bool('dry-run'),
    // An explicit --info=progressN wins over --progress/-P in either order, as in rsync.
    progress: progressLevel === undefined ? bool('progress') : progressLevel === 1,
    progress2: (progressLevel ?? 0) >= 2,
    stats: statsLevel === undefined ? bool('stats') : statsLevel >= 2,
    outFormat,
    info: levels,
    itemize: itemizeCount > 0,
    inplace: bool('inplace'),
    wholeFile: bool('whole-file'),
    delete: bool('delete') || bool('delete-excluded'),
    deleteExcluded: bool('delete-excluded'),
    // rsync: a negative limit means no deletions at all.
    maxDelete: y['max-delete'] === undefined ? -1 : Math.max(0, parseInt32('max-delete', String(str(y['max-delete'])))),
    mkpath: bool('mkpath'),
    minSize: y['min-size'] === undefined ? -1 : parseSizeArg('min-size', String(str(y['min-size']))),
    maxSize: y['max-size'] === undefined ? -1 : parseSizeArg('max-size', String(str(y['max-size']))),
    ignoreTimes: bool('ignore-times'),
    modifyWindow: y['modify-window'] === undefined ? 0 : parseInt32('modify-window', String(str(y['modify-window']))),
    pruneEmptyDirs: bool('prune-empty-dirs'),
    noIncRecursive: bool('no-inc-recursive'),
    force: bool('force'),
    safeLinks: bool('safe-links'),
    dirs: bool('dirs'),
    filesFrom,
    logFile: str(y['log-file']),
    logFileFormat: y['log-file-format'] === undefined ? undefined : (checkLogFormat(String(str(y['log-file-format']))), str(y['log-file-format'])),
    // rsync: --files-from implies -R.
    relative: bool('relative') || (filesFrom !== undefined && y.relative === undefined),
    impliedDirs: y['implied-dirs'] !== false,
    usermap: n.usermap === undefined ? undefined : (parseIdMap(n.usermap, 'user'), n.usermap),
    groupmap: n.groupmap === undefined ? undefined : (parseIdMap(n.groupmap, 'group'), n.groupmap),
    chmod: list('chmod').map((c) => {
      if (!parseChmod(c, 0)) throw new QsyncError('USAGE', `Invalid argument passed to --chmod (${c})`, { option: '--chmod', value: c });
      return c;
    }),
    from0: bool('from0'),
    filters: n.filters,
    sparse: bool('sparse'),
    checksum: bool('checksum'),
    sizeOnly: bool('size-only'),
    update: bool('update'),
    existing: bool('existing'),
    ignoreExisting: bool('ignore-existing'),
    numericIds: bool('numeric-ids'),
    oneFileSystem: bool('one-file-system'),
    blockSize: blockText === undefined ? DEFAULT_BLOCK_SIZE : parseBlockSize(blockText),
    manifest: str(y.manifest),
    stateDir: str(y['state-dir']),
    json: bool('json'),
    rsh: str(y.rsh),
    qsyncPath: str(y['qsync-path']),
    bwlimit: y.bwlimit === undefined ? 0 : parseRate(str(y.bwlimit)!),
    timeout: y.timeout === undefined ? 0 : parseSeconds(str(y.timeout)!),
    writeBatch: str(y['write-batch']),
    onlyWriteBatch: str(y['only-write-batch']),
    readBatch: str(y['read-batch']),
    backupDir: str(y['backup-dir']),
    compress: bool('compress'),
    qmp: str(y.qmp),
    drives: list('drive'),
    image: str(y.image),
    domain: str(y.domain),
    connect: str(y.connect),
    verifySample: verifyText === undefined ? 0.5 : parsePercent(verifyText),
  };

  if (filesFrom !== undefined && y.relative === false) {
    throw new QsyncError('UNSUPPORTED', '--files-from with --no-relative is not supported: the names keep their folders in DEST', { option: '--no-relative' });
  }
  if (bool('backup') && options.backupDir === undefined) {
    throw new QsyncError('UNSUPPORTED', '-b/--backup without --backup-dir is not supported: qsync keeps no whole old copies (FILE~)', {
      option: '--backup',
      hint: 'give --backup-dir=DIR, which keeps the old contents of the blocks each run overwrites (qsync restore brings back any point)',
    });
  }

  const ops = n.operands;
  // Image mode and --read-batch take their source elsewhere: DEST alone is enough.
  const destOnly = options.qmp !== undefined || options.image !== undefined || options.domain !== undefined || options.readBatch !== undefined;
  if (ops.length >= 2) return { kind: 'sync', sources: ops.slice(0, -1), dest: ops[ops.length - 1]!, options };
  if (ops.length === 1 && destOnly) return { kind: 'sync', sources: [], dest: ops[0]!, options };
  throw new QsyncError(
    'USAGE',
    ops.length === 1 && !destOnly
      ? `qsync needs a source and a destination (got only "${ops[0]}"; rsync's listing mode is not supported)`
      : 'qsync needs a source and a destination',
    { operands: ops },
  );
}
