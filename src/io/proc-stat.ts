/**
 * One process's /proc/PID/stat, the fields qsync uses. Field 2 (comm) may
 * hold spaces and ')': the fields after it start after the last ')'.
 */
import { readFileSync } from 'node:fs';

export interface ProcStat {
  /** R, S, D, Z (zombie: it holds no file any more), ... */
  state: string;
  ppid: number;
  /** Start time in clock ticks since boot (field 22): with the pid, names one process. */
  startTime: string;
}

/** The stat of process `pid`; undefined when there is no such process. */
export function procStat(pid: number): ProcStat | undefined {
  let line: string;
  try {
    line = readFileSync(`/proc/${pid}/stat`, 'latin1');
  } catch {
    return undefined;
  }
  const f = line.slice(line.lastIndexOf(')') + 2).split(' ');
  return f.length > 19 ? { state: f[0]!, ppid: Number(f[1]), startTime: f[19]! } : undefined;
}
