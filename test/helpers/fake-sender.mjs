// A hostile (or buggy) far side for a pull: `-e "node fake-sender.mjs SCENARIO.json"`.
// The client runs `<rsh> host "<qsync-path> --server"`; this script ignores
// those words and speaks the sending end of the wire protocol on
// stdin/stdout (docs/FORMATS.md "Wire protocol"), serving the virtual tree
// the scenario describes, with whatever lies the scenario asks for:
//
//   tree:      { type: 'dir', entries: { NAME: node } } | { type: 'file', text } | { type: 'link', target }
//              (NAME may be anything: '..', 'a/b', '' — the point of the test); a node's `xa`:
//              the [name, value] attribute pairs sent for it when -A/-X asks (none otherwise)
//   dupes:     list every entry twice
//   scanEnd:   'wrong' — a scan-end fingerprint other than the digests sent
//   a file's lie: 'outside' | 'badhash' (see the scan below)
//   silent:    after the hello, read and never answer
//   closeAfterHello: close stdout after the hello but stay alive
//   statError: answer "stat" with an error of this code
//   helloError: answer the hello with an error of this code
//
// `node fake-sender.mjs SCENARIO.json --push CMD...` plays a hostile client
// of a push instead: it runs CMD (a `qsync --server ...`), opens with the
// receiver's hello (scenario.dest, operands ['src/'], scenario.options, and
// the fields of scenario.hello; scenario.filesFrom: the lines of a
// --files-from list, sent after the server's hello),
// serves the tree the same way, and exits with the code of the server's
// "done" (its error, if any, on stderr).
import { spawn } from 'node:child_process';
import { encodeControl, encodeData, WireDecoder } from '../../dist/src/core/wire.js';
import { hashBlocksInto } from '../../dist/src/hash/blake3.js';
import { Fingerprinter } from '../../dist/src/sync/manifest-store.js';
import { readFileSync } from 'node:fs';

const scenario = JSON.parse(readFileSync(process.argv[2], 'utf8'));
let ino = 100;
const withIno = (node) => {
  node.ino = ino++;
  if (node.type === 'dir') for (const c of Object.values(node.entries)) withIno(c);
  return node;
};
// The tree is served as `src`: the client names it `host:src/`.
const root = withIno({ type: 'dir', entries: { src: scenario.tree } });
const T = '1700000000000000000';
const bytesOf = (n) => Buffer.from(n.text ?? '', 'utf8');
const st = (n) => {
  const mode = n.type === 'dir' ? 0o40755 : n.type === 'link' ? 0o120777 : 0o100644;
  const size = n.type === 'file' ? (n.size ?? bytesOf(n).length) : n.type === 'link' ? n.target.length : 4096;
  return ['1', String(n.ino), String(mode), '1', '0', '0', '0', String(size), T, T, T];
};
const lookup = (path) => {
  let n = root;
  for (const c of path.split('/').filter((p) => p && p !== '.')) {
    n = n?.type === 'dir' ? n.entries[c] : undefined;
  }
  return n;
};

const push = process.argv[3] === '--push' ? process.argv.slice(4) : undefined;
const server = push && spawn(push[0], push.slice(1), { stdio: ['pipe', 'pipe', 'inherit'] });
server?.on('close', (code) => {
  process.exitCode ??= code;
});
const input = server ? server.stdout : process.stdin;
const output = server ? server.stdin : process.stdout;
output.on('error', () => {});

const handles = new Map();
let next = 1;
const send = (m) => output.write(encodeControl(m));
const ok = (b = {}) => send({ op: 'ok', ...b });
const enoent = () => send({ op: 'error', code: 'SOURCE', message: 'no such file', errno: 'ENOENT', context: {} });
const hold = (n, path, name, attrs) => {
  const h = next++;
  handles.set(h, n);
  ok({ h, path, name, st: st(n), ...(attrs ? { xa: n.xa ?? [] } : {}) });
};

let helloDone = false;
function onMessage(m) {
  if (!helloDone) {
    helloDone = true;
    if (push && m.op === 'error') {
      // Refused before its hello: the server's message, and its exit code once it is gone.
      process.stderr.write(`${m.message}\n`);
      output.end();
      return;
    }
    if (!push && scenario.helloError) return send({ op: 'error', code: scenario.helloError, message: 'refused by the server' });
    if (!push) send({ op: 'hello', magic: 'qsync-wire', version: 2, role: 'sender' });
    // A push's --files-from: the lines the client read, after the server's hello.
    if (push && scenario.filesFrom) {
      send({ op: 'files-from', names: scenario.filesFrom });
      send({ op: 'files-from-end' });
    }
    if (scenario.closeAfterHello) output.end();
    return;
  }
  if (m.op === 'event') return;
  if (m.op === 'done') {
    if (m.error) process.stderr.write(`${m.error.message}\n`);
    output.end();
    process.exitCode = m.code;
    return;
  }
  if (scenario.silent || scenario.closeAfterHello) return;
  const dirOf = () => handles.get(m.h);
  switch (m.op) {
    case 'stat': {
      if (scenario.statError) return send({ op: 'error', code: scenario.statError, message: 'refused by the server' });
      const n = lookup(m.operand);
      return n ? ok({ st: st(n) }) : enoent();
    }
    case 'open-operand':
      return hold(lookup(m.operand), m.operand, undefined, m.attrs);
    case 'open-parent': {
      const parts = m.operand.split('/').filter(Boolean);
      const name = parts.pop() ?? '.';
      return hold(lookup(parts.join('/')), parts.join('/') || '.', name);
    }
    case 'dir-stat':
      return ok({ st: st(dirOf()) });
    case 'list': {
      const entries = Object.entries(dirOf().entries).map(([name, n]) => ({ name, st: st(n), ...(m.attrs ? { xa: n.xa ?? [] } : {}) }));
      send({ op: 'entries', entries: scenario.dupes ? [...entries, ...entries] : entries });
      return ok();
    }
    case 'lstat': {
      const n = dirOf().entries[m.name];
      return n ? ok({ st: st(n) }) : enoent();
    }
    case 'open-dir':
      return hold(dirOf().entries[m.name], m.name, undefined, m.attrs);
    case 'attrs': {
      const n = m.name === undefined ? dirOf() : dirOf().entries[m.name];
      return n ? ok({ xa: n.xa ?? [] }) : enoent();
    }
    case 'readlink':
      return ok({ target: dirOf().entries[m.name].target });
    case 'open-file': {
      const f = next++;
      handles.set(f, dirOf().entries[m.name]);
      return ok({ f });
    }
    case 'scan': {
      const n = handles.get(m.f);
      const { blockSize, size } = m.plan;
      const fp = new Fingerprinter(blockSize, size);
      const data = n.size !== undefined ? Buffer.alloc(n.size, n.fill ?? 0) : bytesOf(n);
      if (data.length) {
        const digests = Buffer.alloc(Math.ceil(data.length / blockSize) * 32);
        hashBlocksInto(data, blockSize, digests);
        fp.append(digests);
        // A file's `lie`: 'outside' (the right digests, at an offset past the file), 'badhash' (digests of other bytes).
        if (n.lie === 'badhash') digests[0] ^= 1;
        output.write(encodeData(n.lie === 'outside' ? blockSize * 1000 : 0, digests, data));
      }
      const digest = fp.digest();
      if (scenario.scanEnd === 'wrong') digest[0] ^= 1;
      return send({ op: 'scan-end', fp: digest.toString('hex') });
    }
    case 'close':
    case 'close-file':
      return;
    case 'bye':
      output.end();
      return;
    default:
      send({ op: 'error', message: `fake sender: no ${m.op}` });
  }
}

const decoder = new WireDecoder((f) => {
  if (f.type === 'control') onMessage(f.msg);
});
input.on('data', (c) => decoder.push(c));
input.on('end', () => {
  if (!push && !scenario.silent && !scenario.closeAfterHello) process.exit(0);
});
if (push) send({ op: 'hello', magic: 'qsync-wire', version: 2, role: 'receiver', dest: scenario.dest, operands: ['src/'], options: scenario.options ?? {}, ...scenario.hello });
if (scenario.silent || scenario.closeAfterHello) setTimeout(() => process.exit(0), scenario.lingerMs ?? 120_000);
