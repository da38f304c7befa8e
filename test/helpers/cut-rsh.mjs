// An -e value that cuts the link: `node cut-rsh.mjs LIMIT ssh ARGS...` runs
// ssh with ARGS and kills it (SIGKILL) once LIMIT bytes went into it, as a
// dropped connection would end it. Exits 255, as ssh does on a lost link.
import { spawn } from 'node:child_process';

const [limitText, ...cmd] = process.argv.slice(2);
const limit = Number(limitText);
const ssh = spawn(cmd[0], cmd.slice(1), { stdio: ['pipe', 'pipe', 'inherit'] });
let sent = 0;
let cut = false;
process.stdin.on('data', (chunk) => {
  if (cut) return;
  sent += chunk.length;
  if (sent >= limit) {
    cut = true;
    ssh.kill('SIGKILL');
    return;
  }
  if (!ssh.stdin.write(chunk)) {
    process.stdin.pause();
    ssh.stdin.once('drain', () => process.stdin.resume());
  }
});
process.stdin.on('end', () => ssh.stdin.end());
ssh.stdin.on('error', () => {});
ssh.stdout.pipe(process.stdout);
ssh.on('close', (code) => {
  process.exitCode = cut ? 255 : (code ?? 255);
  process.stdin.destroy();
});
