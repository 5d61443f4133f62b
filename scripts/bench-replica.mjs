#!/usr/bin/env node
// Why: the replica's receive path (frame parsing, chunk checksums, the inbound area, its
// fsync per set, playback into the volume) has to keep up with the link, and the full
// replication bench mixes its cost with the primary's (set building, outbound log). This
// drives one replica daemon alone with ready-made frames from a raw peer speaking the
// public wire format, over loopback TCP, and reports the replica's time and CPU per GiB
// received (until the last set is acked as played), its peak RSS (VmHWM), and raw
// loopback TCP in the same run. `--ab CLI` runs another build's daemon alternately (A/B).
//
// Usage: flock /tmp/bench.lock node scripts/bench-replica.mjs [--gib 1] [--rounds 2]
//          [--pattern seq|4k] [--ab /path/to/other/dist/cli/main.js] [--node-args "..."]
//          [--serve-args "..."]   (extra 'deltavol serve' arguments for the replica daemon)
//          [--ab-env "NAME=VALUE"]   (the other daemon: this build with that environment)
//          [--this /path/to/dist/cli/main.js]   (instead of a snapshot of this tree's dist/)
//          [--warmup 1|0]   (default 1: the same change is sent once, unmeasured, first, so the
//                           replica's volume and inbound files exist and its code is compiled,
//                           as on a replica that has held the volume for a while)
//   seq: 64 MiB sets of 1 MiB chunks of one run each (a big sequential change)
//   4k:  64 MiB sets of 1 MiB chunks of 256 single-block runs (a 4k randwrite change)
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { kit, log, die, cleanups, cleanupAll, sleep, now, procCpu, startDaemon, snapshotBuild, root, median, f2, f0, tail } from './bench-lib.mjs';

const { encodeFrame, FrameDecoder, chunkChecksum, trailerChecksum } = await import(path.join(root, 'dist/replication/wire.js'));
const { setDataChecksum } = await import(path.join(root, 'dist/replication/outbound-log.js'));

const opt = { gib: 1, rounds: 2, pattern: 'seq', ab: null, nodeArgs: [], dir: '/dev/shm', warmup: 1 };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  const need = () => process.argv[++i] ?? die(`${a} needs a value`);
  if (a === '--gib') opt.gib = Number(need());
  else if (a === '--rounds') opt.rounds = Number(need());
  else if (a === '--pattern') opt.pattern = need();
  else if (a === '--ab') opt.ab = need();
  else if (a === '--ab-env') opt.abEnv = need();
  else if (a === '--this') opt.this = need();
  else if (a === '--node-args') opt.nodeArgs = need().split(/\s+/).filter(Boolean);
  else if (a === '--serve-args') opt.serveArgs = need().split(/\s+/).filter(Boolean);
  else if (a === '--dir') opt.dir = need();
  else if (a === '--warmup') opt.warmup = Number(need());
  else die(`unknown option ${a}`);
}
Object.assign(kit, { name: 'bench-replica', nodeArgs: opt.nodeArgs, serveArgs: opt.serveArgs ?? [] });

const MiB = 1024 * 1024;
const BS = 4096;
const CHUNK = MiB;
const SET = 64 * MiB;
const total = opt.gib * 1024 * MiB;
const sets = total / SET;
const chunksPerSet = SET / CHUNK;
const blocksPerChunk = CHUNK / BS;

/** CPU seconds per thread name (main, libuv workers, V8 helpers), user+system. */
function threadCpu(pid) {
  const out = {};
  try {
    for (const t of fs.readdirSync(`/proc/${pid}/task`)) {
      const s = fs.readFileSync(`/proc/${pid}/task/${t}/stat`, 'utf8');
      const name = s.slice(s.indexOf('(') + 1, s.lastIndexOf(')')).replace(/\d+$/, '');
      const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
      const k = Number(t) === pid ? 'main' : name;
      out[k] = (out[k] ?? 0) + (Number(f[11]) + Number(f[12])) / 100;
      out[k + '.sys'] = (out[k + '.sys'] ?? 0) + Number(f[12]) / 100;
    }
  } catch {}
  return out;
}

function vmHwmMiB(pid) {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : null;
  } catch { return null; }
}

// Data: 8 distinct 1 MiB buffers; which block gets which is fixed by the pattern.
const pool = Array.from({ length: 8 }, (_, i) => { const b = Buffer.alloc(CHUNK); for (let j = 0; j < CHUNK; j += 8) b.writeUInt32LE((i * 2654435761 + j) >>> 0, j); return b; });
const volBlocks = total / BS * 2; // the volume: twice the change (4k: scattered over it)

/** The frames of the whole change: per set, its chunk frames then its trailer. */
function buildFrames(firstSet = 1) {
  const frames = [];
  let rnd = 12345;
  // Math.imul: a plain product passes 2^53, loses its low bits and the generator falls
  // into a short cycle (the 4k pattern then never found its blocks).
  const next = () => (rnd = (Math.imul(rnd, 1103515245) + 12345) >>> 0);
  const used = new Uint8Array(volBlocks);
  for (let s = firstSet; s < firstSet + sets; s++) {
    const crcs = [];
    for (let c = 0; c < chunksPerSet; c++) {
      const data = pool[(s * chunksPerSet + c) % pool.length];
      let runs;
      if (opt.pattern === 'seq') {
        runs = [[((s - firstSet) * chunksPerSet + c) * blocksPerChunk, blocksPerChunk]];
      } else {
        const bs = [];
        while (bs.length < blocksPerChunk) { const b = next() % volBlocks; if (used[b] !== s) { used[b] = s; bs.push(b); } }
        bs.sort((x, y) => x - y);
        runs = bs.map((b) => [b, 1]);
      }
      const crc = chunkChecksum(data, s, c, runs);
      crcs.push(crc);
      frames.push(encodeFrame({ t: 'chunk', generation: 1, set: s, chunk: c, runs, crc }, [data]));
    }
    const fields = { generation: 1, set: s, chunks: chunksPerSet, blocks: chunksPerSet * blocksPerChunk, dataBytes: SET, dataCrc: setDataChecksum(crcs), catchUpFrom: s - 1, createdAtMs: Date.now(), partial: false };
    frames.push(encodeFrame({ t: 'trailer', ...fields, trailerCrc: trailerChecksum(fields) }));
  }
  return frames;
}

class Peer {
  constructor(sock) {
    this.sock = sock;
    this.msgs = [];
    this.waiters = [];
    const d = new FrameDecoder((f) => { this.msgs.push(f.msg); for (const w of this.waiters.splice(0)) w(); });
    sock.on('data', (c) => d.push(c));
    sock.on('close', () => { this.closed = true; for (const w of this.waiters.splice(0)) w(); });
    sock.setNoDelay(true);
  }
  static open(port) {
    return new Promise((res, rej) => { const s = net.connect(port, '127.0.0.1'); s.once('connect', () => res(new Peer(s))); s.once('error', rej); });
  }
  send(pieces) {
    let ok = true;
    for (const b of pieces) ok = this.sock.write(b);
    return ok;
  }
  async wait(pred, timeoutMs = 300_000) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.msgs.findIndex(pred);
      if (i >= 0) return this.msgs[i];
      if (this.closed) throw new Error('replica closed the link');
      if (Date.now() > deadline) throw new Error('timed out');
      await new Promise((r) => { const t = setTimeout(r, 100); this.waiters.push(() => { clearTimeout(t); r(); }); });
    }
  }
}

async function runReplica(cli, label, frames, round) {
  const work = fs.mkdtempSync(path.join(opt.dir, 'bench-replica-'));
  cleanups.push(() => fs.rmSync(work, { recursive: true, force: true }));
  const [envName, envValue] = label === 'other' && opt.abEnv ? opt.abEnv.split('=') : [null, null];
  if (envName) process.env[envName] = envValue;
  const B = await startDaemon(cli, `B${label}${round}`, work);
  if (envName) delete process.env[envName];
  try {
    return await measure(B, label, frames, round);
  } catch (e) {
    log(`replica ${label} round ${round} failed; the end of its log:\n${tail(B.logFile, 20)}`);
    throw e;
  } finally {
    await B.stop();
    fs.rmSync(work, { recursive: true, force: true });
  }
}

async function measure(B, label, frames, round) {
  const p = await Peer.open(B.replPort);
  const pairId = `bench${round}${label}`.padEnd(12, 'x').slice(0, 12);
  p.send(encodeFrame({ t: 'hello', protocol: 2, pairId, primaryVolume: 'bench', replicaVolume: 'rr', generation: 1, sizeBytes: volBlocks * BS, blockBytes: BS, create: true, description: '', returnHost: '', returnPort: 0 }));
  await p.wait((m) => m.t === 'welcome' || m.t === 'refuse');
  if (p.msgs.some((m) => m.t === 'refuse')) throw new Error(JSON.stringify(p.msgs));
  p.send(encodeFrame({ t: 'initDone', generation: 1, baseSet: 0, baseCutAtMs: 0 }));
  await p.wait((m) => m.t === 'ack');
  if (frames.warm) {
    await sendAll(p, frames.warm);
    await p.wait((m) => m.t === 'ack' && m.playedSet === sets);
  }
  await sleep(300);
  const cpu0 = procCpu(B.pid);
  const th0 = threadCpu(B.pid);
  // BENCH_PERF=FILE: perf record of the replica during the measured phase (kernel and native frames).
  const perf = process.env.BENCH_PERF ? spawn('perf', ['record', '-F', '999', '-g', '-p', String(B.pid), '-o', `${process.env.BENCH_PERF}.${label}`], { stdio: 'ignore' }) : null;
  if (perf) await sleep(500);
  const t0 = now();
  await sendAll(p, frames.measured);
  const tSent = now();
  await p.wait((m) => m.t === 'ack' && m.playedSet === frames.lastSet);
  const seconds = (now() - t0) / 1000;
  const cpu = procCpu(B.pid) - cpu0;
  const hwm = vmHwmMiB(B.pid);
  const th1 = threadCpu(B.pid);
  if (perf) { perf.kill('SIGINT'); await new Promise((r) => perf.once('exit', r)); }
  const threads = Object.fromEntries(Object.entries(th1).map(([k, v]) => [k, +((v - (th0[k] ?? 0)) / opt.gib).toFixed(2)]).filter(([, v]) => v > 0));
  p.sock.destroy();
  return { label, seconds, sendSeconds: (tSent - t0) / 1000, mbps: total / 1e6 / seconds, cpuSecondsPerGiB: cpu / opt.gib, hwmMiB: hwm, threads };
}

async function sendAll(p, frames) {
  for (const f of frames) {
    if (!p.send(f)) await new Promise((r) => p.sock.once('drain', r));
  }
}

/** Raw loopback TCP: the same bytes into a child that discards them. */
async function rawTcp() {
  const sinkSrc = "const s=require('net').createServer(c=>{c.on('data',()=>{});c.on('end',()=>c.end('k'))});s.listen(0,'127.0.0.1',()=>console.log(s.address().port));";
  const child = spawn(process.execPath, ['-e', sinkSrc], { stdio: ['ignore', 'pipe', 'inherit'] });
  cleanups.push(() => child.kill());
  const port = await new Promise((r) => child.stdout.once('data', (d) => r(Number(String(d).trim()))));
  const s = await new Promise((r) => { const c = net.connect(port, '127.0.0.1', () => r(c)); });
  const t0 = now();
  for (let sent = 0; sent < total; sent += CHUNK) if (!s.write(pool[(sent / CHUNK) % pool.length])) await new Promise((r) => s.once('drain', r));
  s.end();
  await new Promise((r) => s.once('data', r));
  const seconds = (now() - t0) / 1000;
  s.destroy();
  child.kill();
  return total / 1e6 / seconds;
}

/** The daemon runs dist/: refuse to measure a build older than the sources. */
function checkBuild() {
  const built = fs.statSync(path.join(root, 'dist/cli/main.js')).mtimeMs;
  const newer = fs.readdirSync(path.join(root, 'src'), { recursive: true }).filter((f) => /\.ts$/.test(f) && fs.statSync(path.join(root, 'src', f)).mtimeMs > built);
  if (newer.length) die(`dist/ is older than ${newer.slice(0, 3).join(', ')}: run npm run build`);
}

async function main() {
  if (!opt.this) checkBuild();
  log(`load ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}; ${opt.gib} GiB, pattern ${opt.pattern}, ${opt.rounds} round(s), ${opt.warmup ? 'after an unmeasured warm-up pass of the same change' : 'no warm-up'}${opt.ab ? `, A/B against ${opt.ab}` : ''}`);
  const frames = opt.warmup
    ? { warm: buildFrames(1), measured: buildFrames(sets + 1), lastSet: 2 * sets }
    : { warm: null, measured: buildFrames(1), lastSet: sets };
  const cli = opt.this ?? snapshotBuild();
  if (opt.abEnv && !opt.ab) opt.ab = cli;
  const rows = [];
  for (let r = 1; r <= opt.rounds; r++) {
    const order = opt.ab ? (r % 2 ? [['this', cli], ['other', opt.ab]] : [['other', opt.ab], ['this', cli]]) : [['this', cli]];
    for (const [label, c] of order) {
      const x = await runReplica(c, label, frames, r);
      x.round = r;
      x.tcpMBps = await rawTcp();
      x.ratio = x.mbps / x.tcpMBps;
      x.load = os.loadavg()[0];
      log(`round ${r} ${label}: ${f2(x.seconds)} s = ${f0(x.mbps)} MB/s (sender done at ${f2(x.sendSeconds)} s), raw TCP ${f0(x.tcpMBps)} MB/s, ratio ${f2(x.ratio)}, replica CPU ${f2(x.cpuSecondsPerGiB)} s/GiB, VmHWM ${f0(x.hwmMiB)} MiB, load ${f2(x.load)}; CPU s/GiB by thread ${JSON.stringify(x.threads)}`);
      rows.push(x);
    }
  }
  const out = ['| build | MB/s | ratio to raw TCP | replica CPU s/GiB | VmHWM MiB |', '| --- | ---: | ---: | ---: | ---: |'];
  for (const label of opt.ab ? ['this', 'other'] : ['this']) {
    const xs = rows.filter((x) => x.label === label);
    out.push(`| ${label} | ${f0(median(xs.map((x) => x.mbps)))} | ${f2(median(xs.map((x) => x.ratio)))} | ${f2(median(xs.map((x) => x.cpuSecondsPerGiB)))} | ${f0(Math.max(...xs.map((x) => x.hwmMiB)))} |`);
  }
  console.log(out.join('\n'));
}

try {
  await main();
} catch (e) {
  log(`ERROR: ${e.stack ?? e}`);
  process.exitCode = 1;
} finally {
  await cleanupAll();
}
