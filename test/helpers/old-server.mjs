// A far side of an older qsync for a push or image mode: `-e "node old-server.mjs"`.
// The client runs `<rsh> host "<qsync-path> --server"`; this script ignores
// those words, answers the client's hello with a hello that names no
// features (docs/FORMATS.md "Session"), and then reads until the client
// goes, answering nothing. It writes nothing anywhere.
import { encodeControl, WireDecoder } from '../../dist/src/core/wire.js';

let greeted = false;
const decoder = new WireDecoder((f) => {
  if (greeted || f.type !== 'control' || f.msg.op !== 'hello') return;
  greeted = true;
  process.stdout.write(encodeControl({ op: 'hello', magic: f.msg.magic, version: f.msg.version, role: f.msg.role }));
}, 32 << 20);
process.stdin.on('data', (chunk) => decoder.push(chunk));
process.stdin.on('end', () => process.exit(0));
