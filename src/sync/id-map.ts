/**
 * --usermap, --groupmap and --chown at run time: the rules
 * (src/core/idmap.ts) resolved against this host's users and groups through
 * getent(1) (so NSS sources count, as for rsync's getpwnam), each name or id
 * looked up once.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { matchIdRule, parseIdMap, type IdRule } from '../core/idmap.js';

const run = promisify(execFile);

/** getent's answer for `key` in `db` (passwd or group): the name and the id, or undefined. */
async function lookup(db: 'passwd' | 'group', key: string): Promise<{ name: string; id: number } | undefined> {
  try {
    const { stdout } = await run('getent', [db, '--', key], { encoding: 'utf8' });
    const [name, , id] = stdout.split('\n')[0]!.split(':');
    return name && id !== undefined && /^\d+$/.test(id) ? { name, id: Number(id) } : undefined;
  } catch {
    return undefined; // getent exits 2 for a key it does not know
  }
}

class OneMap {
  private readonly rules: { rule: IdRule; to: number }[] = [];
  private readonly mapped = new Map<number, number>();

  constructor(
    private readonly db: 'passwd' | 'group',
    private readonly raw: IdRule[],
    private readonly numeric: boolean,
  ) {}

  /** Resolve the names rules map to; each unknown one is reported in rsync's words and its rule dropped, as rsync does. */
  async prepare(kind: 'user' | 'group', warn: (message: string) => void): Promise<void> {
    for (const rule of this.raw) {
      const to = /^\d+$/.test(rule.to) ? Number(rule.to) : (await lookup(this.db, rule.to))?.id;
      if (to === undefined) warn(`Unknown --${kind}map name on receiver: ${rule.to}`);
      else this.rules.push({ rule, to });
    }
  }

  async map(id: number): Promise<number> {
    let to = this.mapped.get(id);
    if (to === undefined) {
      // rsync names id 0 "root" without asking; with --numeric-ids no id has a name.
      const name = this.numeric ? undefined : id === 0 ? 'root' : (await lookup(this.db, String(id)))?.name;
      const hit = matchIdRule(this.rules.map((r) => r.rule), id, name);
      to = hit ? this.rules.find((r) => r.rule === hit)!.to : id;
      this.mapped.set(id, to);
    }
    return to;
  }
}

export class IdMapper {
  private readonly users?: OneMap;
  private readonly groups?: OneMap;

  constructor(usermap: string | undefined, groupmap: string | undefined, numeric: boolean) {
    if (usermap !== undefined) this.users = new OneMap('passwd', parseIdMap(usermap, 'user'), numeric);
    if (groupmap !== undefined) this.groups = new OneMap('group', parseIdMap(groupmap, 'group'), numeric);
  }

  async prepare(warn: (message: string) => void): Promise<void> {
    await this.users?.prepare('user', warn);
    await this.groups?.prepare('group', warn);
  }

  /** The owner and group a source's entry is given. */
  async map(uid: bigint, gid: bigint): Promise<{ uid: bigint; gid: bigint }> {
    return {
      uid: this.users ? BigInt(await this.users.map(Number(uid))) : uid,
      gid: this.groups ? BigInt(await this.groups.map(Number(gid))) : gid,
    };
  }
}
