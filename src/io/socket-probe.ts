/**
 * Whether something listens on a Unix socket: a connection accepted, then
 * closed at once. A socket file left by a daemon that has gone (refused), a
 * missing one, or a path that is no socket all answer false; nothing is sent.
 */
import { connect } from 'node:net';

export function socketAnswers(path: string): Promise<boolean> {
  return new Promise<boolean>((res) => {
    const s = connect(path, () => (s.destroy(), res(true)));
    s.on('error', () => res(false));
  });
}
