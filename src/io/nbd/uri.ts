import type net from 'node:net';
import { QsyncError } from '../../core/errors.js';

export interface NbdAddress {
  connect: net.NetConnectOpts;
  exportName: string;
}

/**
 * `nbd://host[:port][/export]` and `nbd+unix:///[export]?socket=PATH`, as
 * qemu and libnbd spell them. TLS schemes (nbds) are not supported.
 */
export function parseNbdUri(uri: string): NbdAddress {
  let u: URL;
  try {
    u = new URL(uri);
  } catch (cause) {
    throw new QsyncError('USAGE', `bad NBD URI ${uri}`, {}, { cause });
  }
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  if (u.protocol === 'nbd:') {
    if (!u.hostname) throw new QsyncError('USAGE', `NBD URI ${uri} has no host`);
    return { connect: { host: u.hostname.replace(/^\[(.*)\]$/, '$1'), port: u.port ? Number(u.port) : 10809 }, exportName };
  }
  if (u.protocol === 'nbd+unix:') {
    const socket = u.searchParams.get('socket');
    if (!socket) throw new QsyncError('USAGE', `NBD URI ${uri} needs ?socket=PATH`);
    return { connect: { path: socket }, exportName };
  }
  throw new QsyncError('UNSUPPORTED', `NBD URI scheme ${u.protocol} is not supported (nbd:// or nbd+unix://)`);
}
