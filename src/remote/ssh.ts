/**
 * The remote shell, rsync's way: `[user@]host:PATH` operands, `-e COMMAND`
 * split into words as rsync splits it, `-l USER` when the operand names one,
 * the host, and one remote command, `<qsync-path> --server`. Paths never go
 * on that command line (they travel in the channel's first message), so no
 * name reaches a shell on either side.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { QsyncError } from '../core/errors.js';

export interface RemotePath {
  user?: string;
  host: string;
  path: string;
  /** The operand as typed, for messages. */
  operand: string;
}

/**
 * rsync's reading of an operand: a colon before the first slash makes it
 * remote (`./a:b` is a local name); `[v6addr]:path`; `host::module` and
 * `rsync://` are rsync daemon syntax, which qsync does not speak.
 */
export function parseRemote(operand: string): RemotePath | undefined {
  const m = /^(?:([^@/:]+)@)?(\[[^\]/]+\]|[^/:[\]]+):(.*)$/s.exec(operand);
  if (!m || operand.startsWith('/')) return undefined;
  if (m[3]!.startsWith(':') || /^rsync:\/\//.test(operand)) {
    throw new QsyncError('UNSUPPORTED', `${operand} names an rsync daemon (host::module or rsync://); qsync talks to qsync over a remote shell only`, {
      file: operand,
      hint: 'use host:PATH (over ssh)',
    });
  }
  // `host:` names the remote user's home folder, as with rsync.
  const host = m[2]!.replace(/^\[(.*)\]$/, '$1');
  // A host or user ssh would read as an option (-oProxyCommand=...) would run what it says: refused.
  if (host.startsWith('-') || m[1]?.startsWith('-')) {
    throw new QsyncError('USAGE', `${operand}: a host or user name starting with "-" is refused (the remote shell would take it for an option)`, { file: operand, hint: 'for a local name, write ./NAME' });
  }
  return { user: m[1], host, path: m[3] || '.', operand };
}

/** Split a -e value into words as rsync does: whitespace separates, single and double quotes group, a backslash escapes in double quotes. */
export function splitCommand(cmd: string): string[] {
  const words: string[] = [];
  let cur = '';
  let inWord = false;
  for (let i = 0; i < cmd.length; i++) {
    const c = cmd[i]!;
    if (c === "'") {
      const end = cmd.indexOf("'", i + 1);
      if (end < 0) throw new QsyncError('USAGE', `unbalanced quote in the remote shell command: ${cmd}`);
      cur += cmd.slice(i + 1, end);
      i = end;
      inWord = true;
    } else if (c === '"') {
      let j = i + 1;
      for (; j < cmd.length && cmd[j] !== '"'; j++) {
        if (cmd[j] === '\\' && j + 1 < cmd.length && '"\\'.includes(cmd[j + 1]!)) j++;
        cur += cmd[j];
      }
      if (j >= cmd.length) throw new QsyncError('USAGE', `unbalanced quote in the remote shell command: ${cmd}`);
      i = j;
      inWord = true;
    } else if (/\s/.test(c)) {
      if (inWord) words.push(cur);
      cur = '';
      inWord = false;
    } else {
      cur += c;
      inWord = true;
    }
  }
  if (inWord) words.push(cur);
  if (!words.length) throw new QsyncError('USAGE', 'the remote shell command (-e) is empty');
  return words;
}

/** Start `qsync --server` on the far side: stdin/stdout are the channel, its stderr is ours. */
export function spawnServer(remote: RemotePath, rsh: string | undefined, qsyncPath: string | undefined): ChildProcess {
  const words = splitCommand(rsh ?? process.env.QSYNC_RSH ?? 'ssh');
  const args = [...words.slice(1), ...(remote.user ? ['-l', remote.user] : []), remote.host, `${qsyncPath ?? 'qsync'} --server`];
  return spawn(words[0]!, args, { stdio: ['pipe', 'pipe', 'inherit'] });
}
