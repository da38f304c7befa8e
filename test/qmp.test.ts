import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { QmpDecoder, type QmpMessage } from '../src/qemu/codec.js';
import { QmpError } from '../src/qemu/errors.js';
import { QmpClient, parseQmpAddress } from '../src/qemu/qmp.js';
import { QsyncError } from '../src/core/errors.js';
import { needTools } from './helpers/env.js';
import { qemuImgCreate, startVm, tmpDir, useQsd } from './helpers/qemu.js';

describe('QMP codec', () => {
  const decode = (chunks: Buffer[], max?: number) => {
    const msgs: QmpMessage[] = [];
    const errs: QsyncError[] = [];
    const d = new QmpDecoder({ onMessage: (m) => msgs.push(m), onError: (e) => errs.push(e) }, max);
    for (const c of chunks) d.write(c);
    return { msgs, errs };
  };
  const wire = Buffer.from('{"QMP": {"version": {}}}\r\n{"return": {}, "id": "a"}\n\n{"event": "X", "data": {"é": 1}}\n');

  it('decodes whole and split at every byte', () => {
    const whole = decode([wire]).msgs;
    expect(whole).toHaveLength(3);
    expect(whole[2]).toEqual({ event: 'X', data: { é: 1 } });
    for (let i = 1; i < wire.length; i++) {
      expect(decode([wire.subarray(0, i), wire.subarray(i)]).msgs).toEqual(whole);
    }
    expect(decode([...wire].map((b) => Buffer.from([b]))).msgs).toEqual(whole);
  });

  it('rejects non-JSON, non-objects and over-long lines, then stops', () => {
    expect(decode([Buffer.from('nope\n{"return":{}}\n')]).errs[0]!.code).toBe('PROTOCOL');
    const r = decode([Buffer.from('[1]\n{"return":{}}\n')]);
    expect(r.errs).toHaveLength(1);
    expect(r.msgs).toHaveLength(0);
    expect(decode([Buffer.from('{"a":'), Buffer.from('"xxxxxxxxxxxxxxxxxxxxxxxxx"}')], 16).errs).toHaveLength(1);
  });

  it('parses addresses', () => {
    expect(parseQmpAddress('/run/q.sock')).toEqual({ path: '/run/q.sock' });
    expect(parseQmpAddress('unix:/run/q.sock')).toEqual({ path: '/run/q.sock' });
    expect(parseQmpAddress('tcp:[::1]:4444')).toEqual({ host: '::1', port: 4444 });
    expect(() => parseQmpAddress('tcp:host')).toThrow(QsyncError);
  });
});

describe('QMP client against a fake server', () => {
  it('times out, fails pending commands and event waiters on disconnect, and rejects foreign ids', async () => {
    const dir = tmpDir();
    const sock = path.join(dir, 'fake.sock');
    const server = net.createServer((c) => {
      c.write('{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}\n');
      c.on('data', (d) => {
        const msg = JSON.parse(d.toString().trim().split('\n')[0]!);
        if (msg.execute === 'qmp_capabilities') c.write(JSON.stringify({ return: {}, id: msg.id }) + '\n');
        else if (msg.execute === 'hang') c.end();
        else if (msg.execute === 'slow') setTimeout(() => c.write(JSON.stringify({ return: 1, id: msg.id }) + '\n'), 100);
        else if (msg.execute === 'fast') c.write(JSON.stringify({ return: 2, id: msg.id }) + '\n');
        else if (msg.execute === 'foreign') c.write('{"return": {}, "id": "someone-else"}\n');
      });
    });
    await new Promise<void>((r) => server.listen(sock, r));
    try {
      const qmp = await QmpClient.connect(sock);
      const ev = qmp.waitEvent('NEVER');
      const err = await qmp.execute('hang').catch((e: unknown) => e);
      expect(err).toBeInstanceOf(QsyncError);
      await expect(ev).rejects.toThrow(/closed/);
      expect(qmp.closed).toBe(true);
      await expect(qmp.execute('query-status')).rejects.toThrow(/closed/);

      const q2 = await QmpClient.connect(sock);
      await expect(q2.execute('slow', undefined, { timeoutMs: 20 })).rejects.toThrow(/no reply in 20 ms/);
      await new Promise((r) => setTimeout(r, 150));
      // The late reply was dropped and the connection stays usable.
      await expect(q2.execute('fast')).resolves.toBe(2);
      await expect(q2.execute('foreign')).rejects.toMatchObject({ code: 'PROTOCOL' });
    } finally {
      server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe.skipIf(!needTools('qemu-storage-daemon', 'qemu-img'))('QMP client against qemu-storage-daemon', () => {
  const fx = useQsd();
  let qmp: QmpClient;
  beforeAll(() => {
    qmp = fx.qmp;
  });

  it('greets and runs commands, several in flight', async () => {
    expect(qmp.greeting?.version.qemu.major).toBeGreaterThanOrEqual(7);
    const [nodes, ver] = await Promise.all([
      qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true }),
      qmp.execute<{ qemu: { major: number } }>('query-version'),
    ]);
    expect(nodes.map((n) => n['node-name'])).toContain('disk0');
    expect(ver.qemu.major).toBe(qmp.greeting?.version.qemu.major);
  });

  it('turns QMP errors into typed errors with class, desc and the command', async () => {
    const err = await qmp.execute('block-dirty-bitmap-add', { node: 'nope', name: 'x' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpError);
    const q = err as QmpError;
    expect(q.code).toBe('QMP');
    expect(q.errorClass).toBe('GenericError');
    expect(q.desc).toMatch(/nope/);
    expect(q.command).toBe('block-dirty-bitmap-add');
    expect(q.context.command).toBe('block-dirty-bitmap-add');
    const unknown = (await qmp.execute('no-such-command').catch((e: unknown) => e)) as QmpError;
    expect(unknown.errorClass).toBe('CommandNotFound');
  });

  it('runs transactions atomically', async () => {
    await qmp.transaction([
      { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 't1' } },
      { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 't2' } },
    ]);
    const err = (await qmp
      .transaction([
        { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 't3' } },
        { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 't1' } },
      ])
      .catch((e: unknown) => e)) as QmpError;
    expect(err.command).toBe('transaction');
    const nodes = await qmp.execute<{ 'node-name': string; 'dirty-bitmaps'?: { name: string }[] }[]>('query-named-block-nodes', { flat: true });
    const names = nodes.find((n) => n['node-name'] === 'disk0')!['dirty-bitmaps']!.map((b) => b.name).sort();
    expect(names).toEqual(['t1', 't2']);
  });

  it('delivers events to listeners registered before the command', async () => {
    await qmp.execute('blockdev-add', {
      driver: 'null-co', 'node-name': 'null0', size: 64 * 1024 * 1024,
    });
    const seen: string[] = [];
    const off = qmp.on('JOB_STATUS_CHANGE', (ev) => seen.push(String(ev.data.status)));
    const concluded = qmp.waitEvent('JOB_STATUS_CHANGE', (ev) => ev.data.id === 'j0' && ev.data.status === 'concluded', 20_000);
    const never = qmp.waitEvent('JOB_STATUS_CHANGE', (ev) => ev.data.id === 'other', 50);
    await qmp.execute('blockdev-backup', { 'job-id': 'j0', device: 'disk0', target: 'null0', sync: 'full', 'auto-dismiss': false });
    const ev = await concluded;
    expect(ev.data).toEqual({ id: 'j0', status: 'concluded' });
    await expect(never).rejects.toThrow(/not seen/);
    off();
    expect(seen).toContain('running');
    await qmp.execute('job-dismiss', { id: 'j0' });
    await qmp.execute('blockdev-del', { 'node-name': 'null0' });
  });

  it('a monitor another client holds (as libvirt holds its domains\'): refused as busy, saying what to do, not "no greeting"', async () => {
    // fx.qmp holds fx.qsd.qmp: QEMU queues a second client without a greeting.
    const err = await QmpClient.connect(fx.qsd.qmp).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'LOCKED' });
    expect((err as QsyncError).message).toMatch(new RegExp(`QMP monitor ${fx.qsd.qmp} is busy or owned by another client: QEMU \\(pid ${fx.qsd.pid}\\)`));
    expect((err as QsyncError).context.hint).toMatch(/monitor of its own.*back it up through libvirt \(--domain NAME\)/);
  });

  it('cancels an event wait', async () => {
    const w = qmp.waitEvent('NEVER');
    w.cancel();
    await expect(w).rejects.toThrow(/cancelled/);
  });
});

describe.skipIf(!needTools('qemu-system-x86_64', 'qemu-img'))('QMP client against a monitor libvirt holds', () => {
  it('names the domain and says to back it up through libvirt', async () => {
    const dir = tmpDir();
    const mon = path.join(dir, 'monitor.sock');
    qemuImgCreate(path.join(dir, 'web.qcow2'), '16M');
    // The monitor as libvirt sets it up (-name guest=..., chardev charmonitor), held by a client as libvirt holds it.
    const vm = await startVm(dir, path.join(dir, 'web.qcow2'), [
      '-name', 'guest=web,debug-threads=on',
      '-chardev', `socket,id=charmonitor,path=${mon},server=on,wait=off`, '-mon', 'chardev=charmonitor,id=monitor,mode=control',
    ]);
    const libvirt = await QmpClient.connect(mon);
    try {
      const err = await QmpClient.connect(mon).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'LOCKED' });
      expect((err as QsyncError).message).toBe(`QMP monitor ${mon} is busy: it is libvirt's monitor of domain web (libvirt holds its domains' monitors)`);
      expect((err as QsyncError).context.hint).toBe('back it up through libvirt (--domain web)');
    } finally {
      await libvirt.close();
      await vm.kill();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
