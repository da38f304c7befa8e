/**
 * `qsync --version` (and `-VV`) in the shape of rsync's, so that scripts
 * that read rsync's answer (the first line's "version", a capability such as
 * "ACLs" or "xattrs" in the list, or -VV's JSON) read qsync's. The protocol
 * is qsync's own wire protocol (docs/FORMATS.md), not rsync's; capabilities
 * qsync lacks are listed with "no ", as rsync lists its own.
 */
import { WIRE_VERSION } from '../core/wire.js';
import type { VersionLevel } from './args.js';

/** rsync's capability words, in its order, and whether qsync has each. */
const CAPABILITIES: [string, boolean][] = [
  ['symlinks', true],
  ['symtimes', true],
  ['hardlinks', true],
  ['hardlink-specials', true],
  ['hardlink-symlinks', true],
  ['IPv6', false],
  ['atimes', false],
  ['batchfiles', true],
  ['inplace', true],
  ['append', false],
  ['ACLs', true],
  ['xattrs', true],
  ['iconv', false],
  ['prealloc', false],
  ['stop-at', false],
  ['crtimes', false],
];

const COPYRIGHT = '(C) the qsync authors';

/** rsync's text: 64-bit sizes first, then the words, wrapped as rsync wraps them (lines of at most 80 columns). */
function text(version: string): string {
  const words = ['64-bit files', '64-bit inums', '64-bit timestamps', '64-bit long ints', ...CAPABILITIES.map(([w, has]) => (has ? w : `no ${w}`))];
  const lines: string[] = [];
  let line = '   ';
  for (const [i, w] of words.entries()) {
    const item = ` ${w}${i < words.length - 1 ? ',' : ''}`;
    if (line.length + item.length > 79) {
      lines.push(line);
      line = '   ';
    }
    line += item;
  }
  lines.push(line);
  return [
    `qsync  version ${version}  protocol version ${WIRE_VERSION}`,
    `Copyright ${COPYRIGHT}`,
    'Capabilities:',
    ...lines,
    '',
    'qsync comes with ABSOLUTELY NO WARRANTY.',
    '',
  ].join('\n');
}

/** rsync -VV's JSON: the same facts as a document, capability names with '_' for '-'. */
function json(version: string): string {
  const caps: Record<string, boolean | number> = { file_bits: 64, inum_bits: 64, timestamp_bits: 64, long_int_bits: 64 };
  for (const [w, has] of CAPABILITIES) caps[w.replaceAll('-', '_')] = has;
  return `${JSON.stringify({ program: 'qsync', version, protocol: `${WIRE_VERSION}.0`, copyright: COPYRIGHT, capabilities: caps, license: 'MIT' }, null, 2)}\n`;
}

export const versionText = (version: string, level: VersionLevel): string => (level === 2 ? json(version) : text(version));
