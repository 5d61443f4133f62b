#!/usr/bin/env node
// Why: READ / WRITE above the 32 MiB maximum are streamed in pieces for clients that
// negotiated no block sizes. This measures what that costs against ordinary requests and
// against nbdkit: a raw NBD_OPT_EXPORT_NAME client (simple replies, queue depth 1) writes
// then reads TOTAL bytes in requests of each size, alternating servers, on tmpfs; it
// prints MB/s, server CPU seconds per GiB, and the server's peak RSS.
//
//   flock /tmp/bench.lock node scripts/bench-big-requests.mjs [--total-mib 1024] [--sizes-mib 1,32,128] [--rounds 2]
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { kit, cleanups, cleanupAll, createVolume, freePort, liveChildren, procCpu, rssMiB, sleep, snapshotBuild, startDaemon, waitFor, log } from './bench-lib.mjs';

kit.name = 'bench-big-requests';
const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const MiB = 1024 * 1024;
const totalBytes = Number(arg('total-mib', '1024')) * MiB;
const sizesMiB = arg('sizes-mib', '1,32,128').split(',').map(Number);
const rounds = Number(arg('rounds', '2'));
if (process.argv.includes('--node-args')) kit.nodeArgs = arg('node-args', '').split(' ').filter(Boolean);

/** A minimal EXPORT_NAME client: no block sizes negotiated, simple replies. */
async function connect(port, name) {
  const sock = net.connect({ port, host: '127.0.0.1' });
  await new Promise((res, rej) => { sock.once('connect', res); sock.once('error', rej); });
  sock.setNoDelay(true);
  let want = null; // { header: true|false, left, resolve }
  let pend = [];
  let pendBytes = 0;
  const take = (n) => {
    const b = Buffer.concat(pend);
    pend = b.length > n ? [b.subarray(n)] : [];
    pendBytes = b.length - n;
    return b.subarray(0, n);
  };
  let onBytes = null;
  sock.on('data', (c) => {
    if (onBytes) onBytes(c);
    else { pend.push(c); pendBytes += c.length; }
  });
  const readExact = (n) => new Promise((resolve) => {
    if (pendBytes >= n) return resolve(take(n));
    onBytes = (c) => {
      pend.push(c); pendBytes += c.length;
      if (pendBytes >= n) { onBytes = null; resolve(take(n)); }
    };
  });
  await readExact(18);
  sock.write(Buffer.from([0, 0, 0, 3]));
  const opt = Buffer.alloc(16 + name.length);
  opt.writeBigUInt64BE(0x49484156454f5054n, 0);
  opt.writeUInt32BE(1, 8);
  opt.writeUInt32BE(name.length, 12);
  opt.write(name, 16);
  sock.write(opt);
  await readExact(10);
  const header = (type, offset, length, cookie) => {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(type, 6);
    h.writeUInt32BE(cookie, 12);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    return h;
  };
  let cookie = 0;
  return {
    async write(offset, data) {
      sock.write(header(1, offset, data.length, ++cookie));
      sock.write(data);
      const r = await readExact(16);
      if (r.readUInt32BE(4) !== 0) throw new Error(`WRITE error ${r.readUInt32BE(4)}`);
    },
    /** Reads length bytes and drops them as they come (only counts). */
    async read(offset, length) {
      sock.write(header(0, offset, length, ++cookie));
      const r = await readExact(16);
      if (r.readUInt32BE(4) !== 0) throw new Error(`READ error ${r.readUInt32BE(4)}`);
      let left = length - pendBytes;
      pend = []; pendBytes = 0;
      if (left < 0) throw new Error('pipelining not expected');
      if (left === 0) return;
      await new Promise((resolve) => {
        onBytes = (c) => {
          if (c.length <= left) { left -= c.length; if (left === 0) { onBytes = null; resolve(); } return; }
          pend.push(c.subarray(left)); pendBytes = c.length - left; left = 0; onBytes = null; resolve();
        };
      });
    },
    close: () => sock.destroy(),
  };
}

async function job(server, sizeBytes, data) {
  const c = await connect(server.port, server.exportName);
  const count = totalBytes / sizeBytes;
  const volBytes = 512 * MiB;
  const result = {};
  for (const op of ['write', 'read']) {
    let peak = rssMiB(server.pid);
    const timer = setInterval(() => (peak = Math.max(peak, rssMiB(server.pid) ?? 0)), 20);
    const cpu0 = procCpu(server.pid);
    const t0 = performance.now();
    for (let i = 0; i < count; i++) {
      const off = (i * sizeBytes) % volBytes;
      if (op === 'write') await c.write(off, data.subarray(0, sizeBytes));
      else await c.read(off, sizeBytes);
    }
    const s = (performance.now() - t0) / 1000;
    clearInterval(timer);
    const cpu = procCpu(server.pid) - cpu0;
    result[op] = { mbps: totalBytes / 1e6 / s, cpuPerGiB: cpu / (totalBytes / 2 ** 30), peakMiB: Math.max(peak, rssMiB(server.pid)) };
  }
  c.close();
  return result;
}

async function main() {
  const work = fs.mkdtempSync(path.join('/dev/shm', 'bench-big-'));
  cleanups.push(() => fs.rmSync(work, { recursive: true, force: true }));
  const cli = snapshotBuild();
  const d = await startDaemon(cli, 'A', work, { serveArgs: [] });
  await createVolume(d, 'big', 512 * MiB);
  const kitFile = path.join(work, 'nbdkit.img');
  fs.writeFileSync(kitFile, '');
  fs.truncateSync(kitFile, 512 * MiB);
  const kitPort = await freePort();
  const nk = spawn('nbdkit', ['-f', '-p', String(kitPort), '-i', '127.0.0.1', 'file', kitFile], { stdio: 'ignore' });
  liveChildren.add(nk);
  cleanups.push(() => { nk.kill('SIGTERM'); });
  await waitFor('nbdkit', () => new Promise((r) => { const s = net.connect(kitPort, '127.0.0.1', () => { s.destroy(); r(true); }); s.on('error', () => r(false)); }), 10_000);
  const servers = [
    { name: 'deltavol', pid: d.pid, port: d.nbdPort, exportName: 'big' },
    { name: 'nbdkit', pid: nk.pid, port: kitPort, exportName: '' },
  ];
  const data = Buffer.alloc(Math.max(...sizesMiB) * MiB);
  for (let i = 0; i < data.length; i += 4096) data.writeUInt32LE((i * 2654435761) >>> 0, i);
  console.log(`total ${totalBytes / MiB} MiB per job, qd1, EXPORT_NAME client, tmpfs; load ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}`);
  console.log('round | server | request | write MB/s | write CPU s/GiB | read MB/s | read CPU s/GiB | peak RSS MiB');
  for (let r = 1; r <= rounds; r++) {
    for (const mib of sizesMiB) {
      for (const s of servers) {
        if (s.name === 'nbdkit' && mib > 32) continue; // nbdkit refuses requests over 64 MiB
        const x = await job(s, mib * MiB, data);
        console.log(`${r} | ${s.name} | ${mib} MiB | ${x.write.mbps.toFixed(0)} | ${x.write.cpuPerGiB.toFixed(2)} | ${x.read.mbps.toFixed(0)} | ${x.read.cpuPerGiB.toFixed(2)} | ${Math.max(x.write.peakMiB, x.read.peakMiB).toFixed(0)}`);
        await sleep(200);
      }
    }
  }
  console.log(`load after ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}`);
}

main().then(cleanupAll, async (e) => { log(`ERROR: ${e.stack ?? e}`); await cleanupAll(); process.exit(2); });
