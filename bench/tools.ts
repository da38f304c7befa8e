/** The commands the benchmark times. */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';

export type ToolId = 'qsync' | 'qsync-c' | 'rsync' | 'rsync-inplace' | 'cat' | 'b3sum' | 'qsync-S' | 'qsync-c-S' | 'qsync-qmp' | 'nbdcopy' | 'rsync-ssh' | 'qsync-ssh'
  | 'qsync-domain-full' | 'qsync-domain-inc' | 'virtnbdbackup-full' | 'virtnbdbackup-inc';

export interface Tool {
  id: ToolId;
  /** What a reader sees: the command as typed. */
  label: string;
  /** sync tools write a target that must equal the source; floors only read. */
  kind: 'sync' | 'floor';
  /** Remote tools (over ssh) get DEST as `host:dir` and the -e value. */
  argv(src: string, dstDir: string, rsh?: string): string[];
  /** Why it cannot run here (its result's status), or undefined. */
  unavailable(): 'not built' | 'missing' | undefined;
}

function onPath(cmd: string): boolean {
  try {
    execFileSync('sh', ['-c', 'command -v "$1"', 'sh', cmd], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

const needRsh = (rsh: string | undefined): string => {
  if (!rsh) throw new Error('a remote tool needs an -e value');
  return rsh;
};

/** `main`: the qsync CLI's main.js. */
export function makeTools(main: string): Record<ToolId, Tool> {
  const qsync = (id: ToolId, flags: string[]): Tool => ({
    id,
    label: `qsync ${flags.join(' ')}`,
    kind: 'sync',
    argv: (src, dst) => [process.execPath, main, ...flags, src, `${dst}/`],
    unavailable: () => (existsSync(main) ? undefined : 'not built'),
  });
  const external = (id: ToolId, kind: Tool['kind'], cmd: string, flags: string[], withDst: boolean): Tool => ({
    id,
    label: `${cmd} ${flags.join(' ')}`.trim(),
    kind,
    argv: (src, dst) => [cmd, ...flags, src, ...(withDst ? [`${dst}/`] : [])],
    unavailable: () => (onPath(cmd) ? undefined : 'missing'),
  });
  const virtnbdbackup = (level: 'full' | 'inc'): Tool => ({
    ...external(`virtnbdbackup-${level}`, 'sync', 'virtnbdbackup', [], false),
    label: `virtnbdbackup -d DOM -l ${level} -o DIR`,
    argv: (dom, dst) => ['virtnbdbackup', '-d', dom, '-l', level, '-o', dst],
  });
  return {
    qsync: qsync('qsync', ['-a']),
    'qsync-c': qsync('qsync-c', ['-a', '-c']),
    'qsync-S': qsync('qsync-S', ['-a', '-S']),
    'qsync-c-S': qsync('qsync-c-S', ['-a', '-c', '-S']),
    // The image scenario: SRC is the QMP socket, and for nbdcopy an NBD URI.
    'qsync-qmp': qsync('qsync-qmp', ['--json', '--qmp']),
    rsync: external('rsync', 'sync', 'rsync', ['-a'], true),
    'rsync-inplace': external('rsync-inplace', 'sync', 'rsync', ['-a', '--inplace', '--no-whole-file'], true),
    // Floors: stdout goes to /dev/null (measure() discards it), so `cat SRC` is `cat SRC >/dev/null`.
    cat: external('cat', 'floor', 'cat', [], false),
    b3sum: external('b3sum', 'floor', 'b3sum', ['--num-threads', '2'], false),
    nbdcopy: { ...external('nbdcopy', 'floor', 'nbdcopy', [], false), label: 'nbdcopy DISK null:', argv: (src) => ['nbdcopy', src, 'null:'] },
    // The domain scenario: SRC is the libvirt domain's name, DEST the backup folder (both tools keep their chain there).
    'qsync-domain-full': { ...qsync('qsync-domain-full', ['--json', '--domain']), label: 'qsync --domain DOM DEST (full)' },
    'qsync-domain-inc': { ...qsync('qsync-domain-inc', ['--json', '--domain']), label: 'qsync --domain DOM DEST (incremental)' },
    'virtnbdbackup-full': virtnbdbackup('full'),
    'virtnbdbackup-inc': virtnbdbackup('inc'),
    // The remote scenario: push to host:DIR over the same ssh. The far side's qsync keeps its
    // state under this run's QSYNC_STATE_DIR too (ssh does not pass the environment on).
    'rsync-ssh': {
      ...external('rsync-ssh', 'sync', 'rsync', ['-a', '--inplace', '--no-whole-file'], true),
      label: 'rsync -a --inplace --no-whole-file -e RSH',
      argv: (src, dst, rsh) => ['rsync', '-a', '--inplace', '--no-whole-file', '-e', needRsh(rsh), src, `${dst}/`],
    },
    'qsync-ssh': {
      ...qsync('qsync-ssh', ['-a']),
      label: 'qsync -a -e RSH --qsync-path "node main.js"',
      argv: (src, dst, rsh) => {
        const state = process.env.QSYNC_STATE_DIR;
        const remote = `${state ? `QSYNC_STATE_DIR=${state} ` : ''}${process.execPath} ${main}`;
        return [process.execPath, main, '-a', '-e', needRsh(rsh), '--qsync-path', remote, src, `${dst}/`];
      },
    },
  };
}

/** The tools of every scenario but memory, in the order they are interleaved. */
export const STANDARD_TOOLS: readonly ToolId[] = ['qsync', 'qsync-c', 'rsync', 'rsync-inplace', 'cat', 'b3sum'];
/** The cold scenario: qsync's read path (quick check and forced read) against the read and hash floors. */
export const COLD_TOOLS: readonly ToolId[] = ['qsync', 'qsync-c', 'cat', 'b3sum'];
/** The memory scenario: a 16 GiB sparse file, holes kept (-S) so the target stays small. */
export const MEMORY_TOOLS: readonly ToolId[] = ['qsync-S', 'qsync-c-S'];
/** The image scenario: image mode, the NBD read reference, a forced file-mode scan of the same image. */
export const IMAGE_TOOLS: readonly ToolId[] = ['qsync-qmp', 'nbdcopy', 'qsync-c'];
/** The remote scenario: rsync's delta algorithm and qsync, both pushing over ssh through the shaped link. */
export const REMOTE_TOOLS: readonly ToolId[] = ['rsync-ssh', 'qsync-ssh'];
/** The domain scenario: one libvirt domain each, full then incremental. */
export const DOMAIN_TOOLS: readonly ToolId[] = ['qsync-domain-full', 'virtnbdbackup-full', 'qsync-domain-inc', 'virtnbdbackup-inc'];
/** The read floor every ratio is taken against. */
export const REFERENCE: ToolId = 'cat';
