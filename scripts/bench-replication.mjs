#!/usr/bin/env node
// Why: issue 5's speed questions, measured end to end between two real daemons on this
// machine (loopback, tmpfs data dirs), in one run:
//   1. what an attached replica in duplex costs the primary's 4k random writes (fio
//      through NBD, alternating with/without a replica on the same volume per round);
//   2. how fast a 1 GiB change ships (suspend, write 1 GiB, cut, resume, time until in
//      sync) against raw loopback TCP between two Node processes measured in the same run.
//      With the default 1 GiB outbound area the change does not fit: the suspended pair is
//      detached and catches up from its pending bitmap (the table says which path ran;
//      --serve-args "--outbound-size 2G" ships ready-made sets instead);
//   3. replication lag under a steady 20 MB/s random-write load with a 1 s cut interval;
//   4. initial copy of a 4 GiB volume with 25% valid blocks: time and bytes sent/valid.
// "In sync": nothing changed since the last cut, and every pair copied, played the last
// set, holds no pending blocks and differs by 0 bytes (without the last two a detached
// pair looks in sync between two catch-up sets).
// Every ratio compares things measured in the same run; each test repeats for --rounds
// and reports the median, because the 2-core machine is shared and noisy: the CPU columns
// show how much of it the daemons got and how much went to everything else.
// The daemons run from a private copy of dist/ (built from src/ as it is, see srcChanges
// in the JSON); every daemon, child and tmpfs directory goes on every exit path.
// Usage: scripts/bench replication [--rounds 3] [--runtime 20] [--steady 60]
//        [--only iops,ship,steady,init] [--dir /dev/shm] [--serve-args "ARGS"] [--out FILE]
//        (--help for all options; about 5 minutes with the defaults)
// Markdown tables go to stdout, then one JSON line with every number; progress to stderr.
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  kit, liveChildren, log, die, cleanups, cleanupAll, sleep, now, run, waitFor, tail, procCpu, rssMiB, snapshotBuild, startDaemon, api,
  createVolume, deleteVolume, replStatus, addReplica, inSync, waitDuplex, removeReplica, fio, median, percentile,
  f0, f1, f2, fk, flag, machineBusy, cpuMeter, fmtCores,
} from './bench-lib.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
// Issue 11: duplex writes ≥ 0.7× of no replica (≥ 0.9× with --pin), a 1 GiB change ships at ≥ 0.5× raw TCP.
/** The pairs of the IOPS test use the default cut interval (src/replication/limits.ts cutIntervalMsDefault). */
const CUT_SECONDS = 5;
const GOALS = { iopsRatioSync: 0.5, iopsRatio: 0.7, iopsRatioPinned: 0.9, shipRatio: 0.5, lagSeconds: 3 };
/** The write jobs of the IOPS test (--jobs picks some). */
const JOBS = {
  '4k': { label: '4k randwrite qd32', args: ['--rw=randwrite', '--bs=4k', '--iodepth=32'] },
  '1m': { label: '1M write qd8', args: ['--rw=write', '--bs=1M', '--iodepth=8'] },
  // One write at a time: the latency a replica adds to each write, queueing aside.
  '4k1': { label: '4k randwrite qd1', args: ['--rw=randwrite', '--bs=4k', '--iodepth=1'] },
};

// ---- options ------------------------------------------------------------------------

const HELP = `Usage: scripts/bench replication [options]

  --rounds N          rounds per test, medians reported (default 3)
  --runtime S         seconds per fio run of the IOPS test (default 20, ramp 1 s more)
  --warmup S          seconds of each write job with the replica attached before the IOPS
                      rounds, unmeasured (default 4; 0 = none): V8 compiles the replication
                      path once per daemon (~0.5-0.8 s of CPU measured in the first duplex run);
                      > 0 also writes the outbound log's size sequentially before the IOPS
                      rounds (its first pages land on fresh memory) and runs one unmeasured
                      ship round first (the replica's volume then
                      holds the change's blocks: memory first touched is slow on these VMs)
  --steady S          seconds of the 20 MB/s steady-state load (default 60)
  --only LIST         some of iops,ship,steady,init (default all; raw TCP runs with ship)
  --jobs LIST         write jobs of the iops test: some of 4k,1m,4k1 (default 4k,1m; 4k1 is
                      4k randwrite at qd1, the latency a replica adds to one write)
  --dir DIR           base directory of the daemons' data dirs (default /dev/shm)
  --serve-args "A"    extra arguments for both 'deltavol serve' (e.g. "--outbound-size 2G")
  --node-args "A"     extra node arguments for both daemons (e.g. "--cpu-prof --cpu-prof-dir=/tmp/p")
  --out FILE          also write the JSON result to FILE
  --trace             log the pair's progress at every poll (ship, init) to stderr
  --mode M            async (default) or sync: the kind of pair of the iops test; with sync the
                      table adds the replica round trip per write (p50/p99, from status) against a
                      raw loopback TCP round trip of two Node processes measured in the same run
                      (issue 13 goals: ≥ 0.5× IOPS at qd32, added p50 ≤ 2× a raw round trip)
  --pin               primary daemon and fio on CPU 0, replica daemon on CPU 1 (taskset), as
                      if the replica had its own machine; the no-replica case gets CPU 0 too
  -h, --help          this help

About 5 minutes with the defaults. Markdown to stdout, then one JSON line; progress to stderr.`;

const argv = process.argv.slice(2);
const opt = { jobs: ['4k', '1m'], rounds: 3, runtime: 20, warmup: 4, steady: 60, only: ['iops', 'ship', 'steady', 'init'], dir: '/dev/shm', serveArgs: [], nodeArgs: [], out: null, trace: false, pin: false, mode: 'async' };
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  const need = () => {
    if (i + 1 >= argv.length) die(`option ${a} needs a value`);
    return argv[++i];
  };
  switch (a) {
    case '--rounds': opt.rounds = Number(need()); break;
    case '--runtime': opt.runtime = Number(need()); break;
    case '--warmup': opt.warmup = Number(need()); if (!(opt.warmup >= 0 && opt.warmup <= 120)) die('--warmup must be 0-120 seconds'); break;
    case '--steady': opt.steady = Number(need()); break;
    case '--only': opt.only = need().split(',').filter(Boolean); break;
    case '--jobs': opt.jobs = need().split(',').filter(Boolean); break;
    case '--dir': opt.dir = need(); break;
    case '--serve-args': opt.serveArgs = need().split(/\s+/).filter(Boolean); break;
    case '--node-args': opt.nodeArgs = need().split(/\s+/).filter(Boolean); break;
    case '--out': opt.out = path.resolve(need()); break;
    case '--trace': opt.trace = true; break;
    case '--pin': opt.pin = true; break;
    case '--mode': opt.mode = need(); if (!['async', 'sync'].includes(opt.mode)) die('--mode is async or sync'); break;
    case '-h': case '--help': console.log(HELP); process.exit(0);
    default: die(`unknown option ${a} (see --help)`);
  }
}
for (const k of ['rounds', 'runtime', 'steady']) if (!(opt[k] > 0)) die(`bad --${k}`);
for (const t of opt.only) if (!['iops', 'ship', 'steady', 'init'].includes(t)) die(`unknown test ${t} in --only`);
for (const j of opt.jobs) if (!JOBS[j]) die(`unknown job ${j} in --jobs`);
Object.assign(kit, { name: 'bench-replication', nodeArgs: opt.nodeArgs, serveArgs: opt.serveArgs, pin: opt.pin });
/**
 * The TCP congestion control the daemons' link uses on loopback (src/util/tcp-congestion.ts:
 * 'auto' sets cubic there); the raw TCP reference sends with the same one, or the system's.
 */
function systemCongestion() {
  try { return fs.readFileSync('/proc/sys/net/ipv4/tcp_congestion_control', 'utf8').trim(); } catch { return 'unknown'; }
}
const linkCongestion = (() => {
  const i = opt.serveArgs.indexOf('--tcp-congestion');
  const v = i >= 0 ? opt.serveArgs[i + 1] : 'auto';
  return v === 'auto' ? 'cubic' : v === 'system' ? '' : v;
})();


// ---- 1. primary write IOPS with and without a duplex replica -------------------------------

async function testIops(A, B) {
  const vol = 'iops';
  const size = 1 * GiB;
  await createVolume(A, vol, size);
  log(`iops: pre-filling ${size / GiB} GiB so neither case pays first-touch allocation`);
  await fio('prefill', A.uri(vol), ['--rw=write', '--bs=1M', '--iodepth=8', `--size=${size}`], 120_000);
  const common = ['--time_based', `--runtime=${opt.runtime}`, '--ramp_time=1', '--lat_percentiles=1', '--randrepeat=0'];
  const rounds = [];
  let pair = null; // { id, remote }
  const attach = async (r) => {
    const remote = `iops-r${r}`;
    const t0 = now();
    const id = await addReplica(A, vol, B, remote, opt.mode === 'sync' ? { mode: 'sync' } : {});
    pair = { id, remote };
    await waitDuplex(A, vol, 180_000);
    if (opt.mode === 'sync') await waitFor(`${vol}: sync stream up`, async () => (await replStatus(A, vol)).replicas[0]?.sync?.stream === 'streaming', 60_000, 100);
    return (now() - t0) / 1000;
  };
  const detach = async () => {
    await removeReplica(A, B, vol, pair.id, pair.remote);
    pair = null;
  };
  if (opt.warmup > 0) {
    // Unmeasured: the first duplex run of a daemon also pays V8's compilation of the
    // replication path (set building, outbound log, link; seen in perf as ~0.75 s of
    // TurboFan in an 8 s run), which a daemon that has run for a while does not.
    const at = await attach(0);
    log(`iops: warm-up with the replica attached (${f1(at)} s to duplex), ${opt.warmup} s per job`);
    for (const jobName of opt.jobs) {
      await fio(`warmup-${jobName}`, A.uri(vol), [...JOBS[jobName].args, '--time_based', `--runtime=${opt.warmup}`, '--randrepeat=0'], (opt.warmup + 60) * 1000);
    }
    // The primary's outbound log (a ring, 1 GiB by default) is filled before anything is
    // measured: the first write of each of its pages lands on memory the VM never touched.
    // perf of the primary in a 10 s 4k duplex run (2026-12-07): 15.5% of its samples copying
    // chunks into the log's fresh pages (copy_folio_from_iter_atomic under writev), 1.9% once
    // the log had wrapped (and 1.9% with a 256 MiB log), 2.5% with this warm-up; a daemon that
    // has shipped its first GiB never pays it again, since the log file and its pages stay.
    // (An empty log starts its next set at the file's beginning, so how much of the file
    // this touches depends on how far shipping falls behind; the measured runs' share above
    // is what counts.) bytesSent cannot size this: it counts the initial copy, which does
    // not go through the log.
    const mib = Math.ceil((await replStatus(A, vol)).outbound.capacityBytes / 1048576);
    log(`iops: warm-up writes ${mib} MiB sequentially, the outbound log's size, so its pages have been written once`);
    await fio('warmup-log', A.uri(vol), ['--rw=write', '--bs=1M', '--iodepth=8', `--io_size=${mib}M`], 300_000);
    await waitFor(`${vol}: in sync after the warm-up`, async () => inSync(await replStatus(A, vol)), 180_000, 100);
  }
  for (let r = 1; r <= opt.rounds; r++) for (const jobName of opt.jobs) {
    const order = r % 2 === 1 ? ['none', 'replica'] : ['replica', 'none'];
    const row = { round: r, job: jobName, order };
    const job = [...JOBS[jobName].args, ...common];
    for (const kind of order) {
      if (kind === 'replica' && !pair) row.attachSeconds = await attach(r);
      if (kind === 'none' && pair) await detach();
      // Every duplex run starts with nothing left to ship (not with the last run's backlog).
      if (kind === 'replica') await waitFor(`${vol}: in sync before the run`, async () => inSync(await replStatus(A, vol)), 180_000, 100);
      const before = kind === 'replica' ? await replStatus(A, vol) : null;
      const cpu = cpuMeter([A, B]);
      // BENCH_PERF=PREFIX: `perf record -g` of the primary during each run (PREFIX.<job>-<kind>-r<round>).
      const perf = process.env.BENCH_PERF ? spawn('perf', ['record', '-F', '999', '-g', '-p', String(A.pid), '-o', `${process.env.BENCH_PERF}.${jobName}-${kind}-r${r}`, '--', 'sleep', String(opt.runtime)], { stdio: 'ignore' }) : null;
      const res = await fio(`${jobName === '4k' ? 'randwrite' : 'write1m'}-${kind}`, A.uri(vol), job, (opt.runtime + 60) * 1000);
      if (perf) await new Promise((done) => (perf.exitCode !== null ? done() : perf.once('exit', done)));
      res.cores = cpu();
      // Primary CPU per write (µs; the ramp second counts in both cases alike).
      res.cpuUsPerIoA = res.cores.A > 0 && res.iops > 0 ? (res.cores.A * 1e6) / res.iops : null;
      if (kind === 'replica') {
        const after = await replStatus(A, vol);
        const p0 = before.replicas[0];
        const p1 = after.replicas[0];
        if (opt.mode === 'sync') {
          const sy = p1.sync ?? {};
          res.sync = { stream: sy.stream, breaks: (sy.breaks ?? 0) - (p0.sync?.breaks ?? 0), p50Us: sy.latency?.p50Us ?? null, p99Us: sy.latency?.p99Us ?? null };
          res.rawRtt = await rawRtt();
        }
        Object.assign(res, {
          state: p1.state,
          setsCut: after.currentSet - before.currentSet,
          shippedMB: (p1.bytesSent - p0.bytesSent) / 1e6,
          shippedMBps: (p1.bytesSent - p0.bytesSent) / 1e6 / (opt.runtime + 1),
          backlogMB: p1.bytesDifferent / 1e6,
          lagSecondsAtEnd: p1.lagSeconds,
          outboundFull: after.outbound.full,
          outboundUsedMB: after.outbound.usedBytes / 1e6,
        });
        // Issue 11: the replica keeps up. After the job, back in sync (0 bytes different)
        // within 2 cut intervals plus the backlog at the rate it shipped during the job.
        const t0 = now();
        await waitFor(`${vol}: in sync after the run`, async () => inSync(await replStatus(A, vol)), 180_000, 100);
        res.catchUpSeconds = (now() - t0) / 1000;
        res.catchUpBudgetSeconds = 2 * CUT_SECONDS + res.backlogMB / Math.max(res.shippedMBps, 1);
      }
      row[kind] = res;
      log(`iops round ${r} ${JOBS[jobName].label}: ${kind === 'none' ? 'no replica' : 'duplex replica'} ${f0(res.iops)} IOPS, A ${f1(res.cpuUsPerIoA)} µs CPU per write` +
        (kind === 'replica' ? ` (shipped ${f0(res.shippedMB)} MB in ${res.setsCut} sets, backlog ${f0(res.backlogMB)} MB, lag ${f1(res.lagSecondsAtEnd)} s)` : '') +
        `, cores A/B/other ${fmtCores(res.cores)}`);
    }
    row.ratio = row.replica.iops / row.none.iops;
    if (opt.mode === 'sync') log(`  sync: stream ${row.replica.sync.stream}, ${row.replica.sync.breaks} breaks, replica round trip p50 ${f0(row.replica.sync.p50Us)} µs p99 ${f0(row.replica.sync.p99Us)} µs; raw TCP round trip p50 ${f1(row.replica.rawRtt.p50Us)} µs p99 ${f1(row.replica.rawRtt.p99Us)} µs`);
    rounds.push(row);
  }
  if (pair) await detach();
  await deleteVolume(A, vol);
  const byJob = {};
  for (const j of opt.jobs) {
    const rs = rounds.filter((x) => x.job === j);
    byJob[j] = {
      medianNone: median(rs.map((x) => x.none.iops)),
      medianReplica: median(rs.map((x) => x.replica.iops)),
      medianRatio: median(rs.map((x) => x.ratio)),
      medianCpuUsNone: median(rs.map((x) => x.none.cpuUsPerIoA)),
      medianCpuUsReplica: median(rs.map((x) => x.replica.cpuUsPerIoA)),
      medianP50UsNone: median(rs.map((x) => x.none.p50us)),
      medianP50UsReplica: median(rs.map((x) => x.replica.p50us)),
      ...(opt.mode === 'sync'
        ? {
            medianSyncP50Us: median(rs.map((x) => x.replica.sync.p50Us)),
            medianSyncP99Us: median(rs.map((x) => x.replica.sync.p99Us)),
            medianRawRttP50Us: median(rs.map((x) => x.replica.rawRtt.p50Us)),
            medianRawRttP99Us: median(rs.map((x) => x.replica.rawRtt.p99Us)),
            breaks: rs.reduce((n, x) => n + x.replica.sync.breaks, 0),
          }
        : {}),
    };
  }
  return { volumeBytes: size, runtime: opt.runtime, rounds, byJob, ...byJob[opt.jobs[0]] };
}

// ---- raw loopback TCP between two Node processes ----------------------------------------

const TCP_SERVER = `
const net = require('node:net');
const total = Number(process.argv[1]);
const srv = net.createServer((s) => {
  let got = 0;
  s.on('data', (b) => { got += b.length; if (got >= total) s.end('k'); });
});
srv.listen(0, '127.0.0.1', () => console.log(srv.address().port));
`;
const TCP_CLIENT = `
const net = require('node:net');
const [port, total, congestion, addon] = [Number(process.argv[1]), Number(process.argv[2]), process.argv[3], process.argv[4]];
const buf = require('node:crypto').randomBytes(1 << 20);
const s = net.connect({ host: '127.0.0.1', port }, async () => {
  s.setNoDelay(true);
  if (congestion) require(addon).congestion(s._handle.fd, congestion);
  const t0 = performance.now();
  s.once('data', () => { console.log(JSON.stringify({ seconds: (performance.now() - t0) / 1000 })); s.destroy(); });
  for (let sent = 0; sent < total; sent += buf.length) {
    if (!s.write(buf)) await new Promise((r) => s.once('drain', r));
  }
});
`;

/**
 * Runs a Node server script (it prints its port) and a client script against it (argv: port,
 * then clientArgs); returns the client's JSON output. The server goes on every exit path.
 */
async function serverAndClient(what, serverCode, serverArgs, clientCode, clientArgs) {
  const srv = spawn(process.execPath, ['-e', serverCode, ...serverArgs], { stdio: ['ignore', 'pipe', 'inherit'] });
  liveChildren.add(srv);
  const stop = () => { srv.kill('SIGKILL'); liveChildren.delete(srv); };
  cleanups.push(stop);
  try {
    const port = await new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`${what} server did not start`)), 10_000);
      srv.stdout.once('data', (d) => { clearTimeout(t); resolve(Number(String(d).trim())); });
      srv.once('exit', () => reject(new Error(`${what} server exited`)));
    });
    const { out } = await run(process.execPath, ['-e', clientCode, String(port), ...clientArgs], { timeoutMs: 60_000 });
    return JSON.parse(out.trim());
  } finally {
    stop();
    cleanups.splice(cleanups.indexOf(stop), 1);
  }
}

async function rawTcp(bytes) {
  const addon = path.join(root, 'build/Release/sockx.node');
  const { seconds } = await serverAndClient('tcp', TCP_SERVER, [String(bytes)], TCP_CLIENT, [String(bytes), linkCongestion, addon]);
  return { seconds, mbps: bytes / 1e6 / seconds };
}

// Round trips of 64-byte messages between two Node processes over loopback (one in flight).
const RTT_SERVER = `
const net = require('node:net');
const srv = net.createServer((s) => { s.setNoDelay(true); s.on('data', (b) => s.write(b)); });
srv.listen(0, '127.0.0.1', () => console.log(srv.address().port));
`;
const RTT_CLIENT = `
const net = require('node:net');
const [port, n] = [Number(process.argv[1]), Number(process.argv[2])];
const msg = Buffer.alloc(64, 7);
const s = net.connect({ host: '127.0.0.1', port }, () => {
  s.setNoDelay(true);
  const lat = [];
  let got = 0, t0 = 0;
  const next = () => { got = 0; t0 = performance.now(); s.write(msg); };
  s.on('data', (b) => {
    got += b.length;
    if (got < msg.length) return;
    lat.push((performance.now() - t0) * 1000);
    if (lat.length < n) return next();
    lat.sort((a, b) => a - b);
    console.log(JSON.stringify({ p50Us: lat[Math.floor(n / 2)], p99Us: lat[Math.floor(n * 0.99)] }));
    s.destroy();
  });
  next();
});
`;

function rawRtt(n = 2000) {
  return serverAndClient('rtt', RTT_SERVER, [], RTT_CLIENT, [String(n)]);
}

// ---- 2. shipping a 1 GiB change -------------------------------------------------------------

async function testShip(A, B) {
  const vol = 'ship';
  const change = 1 * GiB;
  await createVolume(A, vol, change);
  const pairId = await addReplica(A, vol, B, vol);
  await waitDuplex(A, vol, 60_000);
  const rounds = [];
  // Round 0 (with --warmup > 0) is not measured: the first 1 GiB the replica writes lands on
  // memory its volume never held. On these VMs a page of guest memory touched for the first
  // time (or freed for a few seconds and reported back to the host) costs ~6x a warm one:
  // dd of 6 GiB into tmpfs took 17-21 s the first times and 3.5 s right after a delete
  // (2026-12-07); a fresh pair's first round shipped at 200 MB/s, the next ones at 930-1120.
  for (let r = opt.warmup > 0 ? 0 : 1; r <= opt.rounds; r++) {
    const tcp = await rawTcp(change);
    await api(A, 'POST', `/v1/volumes/${vol}/replicas/suspend`, {});
    const w = await fio(`change-${r}`, A.uri(vol), ['--rw=write', '--bs=1M', '--iodepth=8', `--size=${change}`], 120_000);
    // Everything changed goes into sets now (when the outbound area has room), so the
    // clock below measures shipping, not waiting for the cut interval.
    const tc = now();
    const cut = await api(A, 'POST', `/v1/volumes/${vol}/cut`, {});
    const cutSeconds = (now() - tc) / 1000;
    const before = await replStatus(A, vol);
    const p0 = before.replicas[0];
    const cpu = cpuMeter([A, B]);
    const t0 = now();
    await api(A, 'POST', `/v1/volumes/${vol}/replicas/resume`, {});
    let polls = 0;
    const end = await waitFor(`${vol}: in sync after resume`, async () => {
      polls++;
      const v = await replStatus(A, vol);
      const p = v.replicas[0];
      if (p.state === 'failure-suspend') throw new Error(`pair failed: ${p.reason}`);
      if (opt.trace) {
        const rb = await replStatus(B, vol).catch(() => ({}));
        log(`  t=${f2((now() - t0) / 1000)} ${p.state} cut ${v.currentSet} acked ${p.ackedSet} played ${p.playedSet} changed ${v.changedBlocksSinceCut} pending ${p.pendingBlocks} sent ${f0((p.bytesSent - p0.bytesSent) / 1e6)} MB outbound ${v.outbound.sets} sets ${f0(v.outbound.usedBytes / 1e6)} MB | replica acked ${rb.ackedSet} played ${rb.playedSet} held ${rb.setsHeld?.length} inbound ${f0((rb.inboundBytes ?? 0) / 1e6)} MB received ${f0((rb.bytesReceived ?? 0) / 1e6)} MB`);
      }
      return inSync(v) ? v : null;
    }, 180_000, 50);
    const seconds = (now() - t0) / 1000;
    const cores = cpu();
    const p1 = end.replicas[0];
    const row = {
      round: r, writeMBps: w.mbps, cutSet: cut?.set ?? null, cutSeconds,
      atResume: { sets: before.outbound.sets, outboundUsedMB: before.outbound.usedBytes / 1e6, outboundFull: before.outbound.full, changedBlocks: before.changedBlocksSinceCut, pendingBlocks: p0.pendingBlocks ?? null, bytesDifferentMB: p0.bytesDifferent / 1e6 },
      seconds, mbps: change / 1e6 / seconds, sentMB: (p1.bytesSent - p0.bytesSent) / 1e6, setsAfter: end.currentSet - before.currentSet, cores,
      tcpMBps: tcp.mbps,
    };
    row.ratio = row.mbps / row.tcpMBps;
    // CPU seconds each daemon spent per GiB shipped (less noisy than MB/s on a shared machine).
    row.cpuSecondsPerGiB = { A: cores.A * seconds, B: cores.B * seconds };
    if (r > 0) rounds.push(row);
    log(`ship round ${r}${r === 0 ? ' (warm-up, not counted)' : ''}: 1 GiB in sync ${f2(seconds)} s after resume = ${f0(row.mbps)} MB/s (sent ${f0(row.sentMB)} MB; at resume ${before.outbound.sets} sets, ` +
      `${f0(row.atResume.outboundUsedMB)} MB outbound${before.outbound.full ? ' FULL' : ''}, pending ${row.atResume.pendingBlocks} blocks; cut took ${f2(cutSeconds)} s), ` +
      `raw TCP ${f0(tcp.mbps)} MB/s, cores A/B/other ${fmtCores(cores)}`);
  }
  await removeReplica(A, B, vol, pairId, vol);
  await deleteVolume(A, vol);
  return {
    changeBytes: change, rounds,
    medianMBps: median(rounds.map((x) => x.mbps)),
    medianTcpMBps: median(rounds.map((x) => x.tcpMBps)),
    medianSeconds: median(rounds.map((x) => x.seconds)),
    medianRatio: median(rounds.map((x) => x.ratio)),
    medianCpuSecondsPerGiBA: median(rounds.map((x) => x.cpuSecondsPerGiB.A)),
    medianCpuSecondsPerGiBB: median(rounds.map((x) => x.cpuSecondsPerGiB.B)),
  };
}

// ---- 3. steady state lag --------------------------------------------------------------------

async function testSteady(A, B) {
  const vol = 'steady';
  const size = 1 * GiB;
  await createVolume(A, vol, size);
  const pairId = await addReplica(A, vol, B, vol, { cutIntervalMs: 1000 });
  await waitDuplex(A, vol, 60_000);
  const before = await replStatus(A, vol);
  const samples = [];
  const states = {};
  let polling = true;
  let pollErrors = 0;
  const poller = (async () => {
    while (polling) {
      const t = now();
      try {
        const v = await replStatus(A, vol);
        const p = v.replicas[0];
        samples.push(p.lagSeconds);
        states[p.state] = (states[p.state] ?? 0) + 1;
      } catch (e) {
        if (++pollErrors <= 3) log(`steady: status poll failed: ${e.message}`);
      }
      await sleep(Math.max(0, 250 - (now() - t)));
    }
  })();
  const cpu = cpuMeter([A, B]);
  let w;
  try {
    w = await fio('steady-20MBps', A.uri(vol), ['--rw=randwrite', '--bs=64k', '--iodepth=4', '--rate=20m', '--time_based', `--runtime=${opt.steady}`, `--size=${size}`, '--randrepeat=0'], (opt.steady + 60) * 1000);
  } finally {
    polling = false;
    await poller;
  }
  const cores = cpu();
  const after = await replStatus(A, vol);
  await removeReplica(A, B, vol, pairId, vol);
  await deleteVolume(A, vol);
  const r = {
    seconds: opt.steady, writeMBps: w.mbps, samples: samples.length, pollErrors, states,
    lagP50: percentile(samples, 50), lagP99: percentile(samples, 99), lagMax: samples.length ? Math.max(...samples) : null,
    setsCut: after.currentSet - before.currentSet,
    shippedMBps: (after.replicas[0].bytesSent - before.replicas[0].bytesSent) / 1e6 / opt.steady,
    cores,
  };
  log(`steady: ${f1(w.mbps)} MB/s written for ${opt.steady} s, lag p50 ${f2(r.lagP50)} p99 ${f2(r.lagP99)} max ${f2(r.lagMax)} s (${samples.length} samples), ${r.setsCut} sets, cores A/B/other ${fmtCores(cores)}`);
  return r;
}

// ---- 4. initial copy of a sparse 4 GiB volume ---------------------------------------------------

async function testInit(A, B) {
  const size = 4 * GiB;
  const rounds = [];
  for (let r = 1; r <= opt.rounds; r++) {
    // A fresh volume per round, so every round is a first replica of a volume whose
    // writes were never cut (as in real use), not a re-add after an earlier round's cuts.
    const vol = `init-${r}`;
    await createVolume(A, vol, size);
    // 1 MiB written, 3 MiB skipped: 1 GiB of valid blocks spread over the whole volume.
    await fio('scatter', A.uri(vol), ['--rw=write:3M', '--bs=1M', '--iodepth=8', `--size=${size}`], 120_000);
    const cpu = cpuMeter([A, B]);
    const t0 = now();
    const id = await addReplica(A, vol, B, vol);
    let totalBytes = null;
    let copied = null;
    const end = await waitFor(`${vol}: initial copy and in sync`, async () => {
      const v = await replStatus(A, vol);
      const p = v.replicas.find((x) => x.id === id);
      if (p.state === 'failure-suspend') throw new Error(`pair failed: ${p.reason}`);
      if (p.initialCopy) totalBytes = p.initialCopy.totalBytes;
      if (opt.trace) log(`  t=${f2((now() - t0) / 1000)} ${p.state} copied ${f0((p.initialCopy?.doneBytes ?? 0) / 1e6)} MB sent ${f0(p.bytesSent / 1e6)} MB cut ${v.currentSet} acked ${p.ackedSet} played ${p.playedSet} changed ${v.changedBlocksSinceCut} outbound ${v.outbound.sets} sets ${f0(v.outbound.usedBytes / 1e6)} MB`);
      if (p.initialCopy === null && copied === null) copied = { seconds: (now() - t0) / 1000, bytesSent: p.bytesSent, cores: cpu() };
      return copied && inSync(v) ? p : null;
    }, 180_000, 50);
    const syncSeconds = (now() - t0) / 1000;
    const valid = totalBytes ?? GiB;
    const row = {
      round: r, validBytes: valid,
      seconds: copied.seconds, mbps: valid / 1e6 / copied.seconds, bytesSent: copied.bytesSent, sentPerValid: copied.bytesSent / valid,
      syncSeconds, bytesSentInSync: end.bytesSent, sentPerValidInSync: end.bytesSent / valid,
      cores: copied.cores,
    };
    rounds.push(row);
    log(`init round ${r}: ${f0(valid / MiB)} MiB valid copied in ${f2(row.seconds)} s = ${f0(row.mbps)} MB/s, sent/valid ${row.sentPerValid.toFixed(3)}; ` +
      `in sync after ${f2(syncSeconds)} s, sent/valid then ${row.sentPerValidInSync.toFixed(3)}; cores A/B/other ${fmtCores(row.cores)}`);
    await removeReplica(A, B, vol, id, vol);
    await deleteVolume(A, vol);
  }
  return {
    volumeBytes: size, rounds,
    medianSeconds: median(rounds.map((x) => x.seconds)),
    medianMBps: median(rounds.map((x) => x.mbps)),
    medianSentPerValid: median(rounds.map((x) => x.sentPerValid)),
    medianSyncSeconds: median(rounds.map((x) => x.syncSeconds)),
    medianSentPerValidInSync: median(rounds.map((x) => x.sentPerValidInSync)),
  };
}

// ---- output -------------------------------------------------------------------------------

function markdown(res) {
  const L = [];
  const n = opt.rounds;
  L.push(`### Replication (two daemons on loopback, data dirs on ${res.fsType} ${opt.dir}; median of ${n} round${n > 1 ? 's' : ''}, steady state one run${opt.only.includes("iops") ? `; IOPS rounds after a ${opt.warmup} s warm-up per job` : ""})`, '');
  L.push('| measure | value | compared with | ratio | goal |');
  L.push('| --- | ---: | ---: | ---: | ---: |');
  if (res.iops) {
    const goal = opt.mode === 'sync' ? GOALS.iopsRatioSync : opt.pin ? GOALS.iopsRatioPinned : GOALS.iopsRatio;
    for (const [j, x] of Object.entries(res.iops.byJob)) {
      L.push(`| ${JOBS[j].label}, ${opt.mode === 'sync' ? 'sync' : 'duplex'} replica (cut 5 s, high water 64M)${opt.pin ? ', pinned' : ''} | ${fk(x.medianReplica)} IOPS | ${fk(x.medianNone)} IOPS without replica | ${f2(x.medianRatio)}${j === '4k1' ? '' : flag(x.medianRatio >= goal)} | ${j === '4k1' ? '(latency job: see below)' : `≥ ${goal}`} |`);
      L.push(`| … primary CPU per write, duplex | ${f1(x.medianCpuUsReplica)} µs | ${f1(x.medianCpuUsNone)} µs without replica | ${f2(x.medianCpuUsReplica / x.medianCpuUsNone)} | |`);
      if (opt.mode === 'sync') {
        const added = x.medianP50UsReplica - x.medianP50UsNone;
        L.push(`| … write latency p50 (fio) with / without the sync replica: added | ${f0(x.medianP50UsReplica)} / ${f0(x.medianP50UsNone)} µs: +${f0(added)} µs | raw loopback TCP round trip p50 ${f1(x.medianRawRttP50Us)} µs | ${f1(added / x.medianRawRttP50Us)} | ${j === '4k1' ? `≤ 2${flag(added / x.medianRawRttP50Us <= 2)}` : '(queueing counts at this depth)'} |`);
        L.push(`| … replica round trip per write (primary's view): p50 / p99 | ${f0(x.medianSyncP50Us)} / ${f0(x.medianSyncP99Us)} µs | raw TCP p99 ${f1(x.medianRawRttP99Us)} µs | | |`);
        if (x.breaks > 0) L.push(`| … sync stream breaks during the runs | ${x.breaks} | | | 0 |`);
      }
    }
  }
  if (res.ship) {
    const x = res.ship;
    L.push(`| 1 GiB change, resume → in sync | ${f0(x.medianMBps)} MB/s (${f2(x.medianSeconds)} s) | ${f0(x.medianTcpMBps)} MB/s raw loopback TCP (${linkCongestion || 'system congestion control'}) | ${f2(x.medianRatio)}${flag(x.medianRatio >= GOALS.shipRatio)} | ≥ ${GOALS.shipRatio} |`);
    L.push(`| … CPU per GiB shipped, primary A / replica B | ${f2(x.medianCpuSecondsPerGiBA)} / ${f2(x.medianCpuSecondsPerGiBB)} s | | | |`);
  }
  if (res.steady) {
    const x = res.steady;
    L.push(`| lag at ${f1(x.writeMBps)} MB/s (fio --rate=20m) random 64k writes, cut 1 s: p50 / p99 / max | ${f2(x.lagP50)} / ${f2(x.lagP99)} / ${f2(x.lagMax)} s | | | p99, max ≤ ${GOALS.lagSeconds} s${flag(x.lagP99 <= GOALS.lagSeconds && x.lagMax <= GOALS.lagSeconds)} |`);
  }
  if (res.init) {
    const x = res.init;
    L.push(`| initial copy, 4 GiB volume with 1 GiB valid | ${f0(x.medianMBps)} MB/s (${f2(x.medianSeconds)} s) | bytes sent / valid bytes | ${f2(x.medianSentPerValid)}${flag(Math.abs(x.medianSentPerValid - 1) <= 0.05)} | ≈ 1 |`);
    L.push(`| … until in sync (sets cut after the base included) | ${f2(x.medianSyncSeconds)} s | bytes sent / valid bytes | ${f2(x.medianSentPerValidInSync)}${flag(Math.abs(x.medianSentPerValidInSync - 1) <= 0.05)} | ≈ 1 |`);
  }
  L.push('', '⚠ = goal not met. Per round (cores = CPU of primary A / replica B / everything else on the machine during the measured phase; 2 = both vCPUs):', '');
  if (res.iops) {
    L.push('| IOPS round | job | order | no replica | duplex replica | ratio | A µs CPU/write none / replica | p99 µs none / replica | shipped MB/s | backlog at end | in sync after (budget) | cores A/B/other none | cores A/B/other replica |');
    L.push('| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |');
    for (const r of res.iops.rounds) {
      const cu = r.replica.catchUpSeconds;
      L.push(`| ${r.round} | ${r.job} | ${r.order.join(' → ')} | ${fk(r.none.iops)} | ${fk(r.replica.iops)} | ${f2(r.ratio)} | ${f1(r.none.cpuUsPerIoA)} / ${f1(r.replica.cpuUsPerIoA)} | ${f0(r.none.p99us)} / ${f0(r.replica.p99us)} | ${f0(r.replica.shippedMBps)} | ${f0(r.replica.backlogMB)} MB | ${f1(cu)} s (${f1(r.replica.catchUpBudgetSeconds)} s)${flag(cu <= r.replica.catchUpBudgetSeconds)} | ${fmtCores(r.none.cores)} | ${fmtCores(r.replica.cores)} |`);
    }
    L.push('');
  }
  if (res.ship) {
    L.push('| ship round | seconds | MB/s | raw TCP MB/s | ratio | CPU s/GiB A / B | outbound at resume | pending blocks | cut took | cores A/B/other |');
    L.push('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |');
    for (const r of res.ship.rounds) {
      L.push(`| ${r.round} | ${f2(r.seconds)} | ${f0(r.mbps)} | ${f0(r.tcpMBps)} | ${f2(r.ratio)} | ${f2(r.cpuSecondsPerGiB.A)} / ${f2(r.cpuSecondsPerGiB.B)} | ${r.atResume.sets} sets, ${f0(r.atResume.outboundUsedMB)} MB${r.atResume.outboundFull ? ' (full)' : ''} | ${r.atResume.pendingBlocks ?? '–'} | ${f2(r.cutSeconds)} s | ${fmtCores(r.cores)} |`);
    }
    L.push('');
  }
  if (res.steady) {
    const x = res.steady;
    L.push(`Steady state: ${x.samples} lag samples every 250 ms over ${x.seconds} s, ${x.setsCut} sets cut, ${f1(x.shippedMBps)} MB/s shipped, states ${JSON.stringify(x.states)}, cores A/B/other ${fmtCores(x.cores)}.`, '');
  }
  if (res.init) {
    L.push('| init round | copy seconds | MB/s | valid MiB | sent / valid | in sync after | sent / valid then | cores A/B/other (copy) |');
    L.push('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |');
    for (const r of res.init.rounds) L.push(`| ${r.round} | ${f2(r.seconds)} | ${f0(r.mbps)} | ${f0(r.validBytes / MiB)} | ${r.sentPerValid.toFixed(3)} | ${f2(r.syncSeconds)} s | ${r.sentPerValidInSync.toFixed(3)} | ${fmtCores(r.cores)} |`);
    L.push('');
  }
  L.push(`Peak RSS: ${Object.entries(res.peakRssMiB).map(([k, v]) => `${k} ${f0(v)} MiB`).join(', ')}. MB = 10^6 bytes.`);
  for (const [k, t] of Object.entries(res.daemonLogs)) if (t) L.push('', `Daemon ${k} logged (last lines):`, '', '```', t.split('\n').slice(-8).join('\n'), '```');
  return L.join('\n');
}

// ---- main -----------------------------------------------------------------------------------

async function main() {
  const started = Date.now();
  const cli = snapshotBuild();
  const workDir = fs.mkdtempSync(path.join(opt.dir, 'deltavol-bench-repl-'));
  cleanups.push(() => fs.rmSync(workDir, { recursive: true, force: true }));
  let fsType = null;
  try { fsType = execFileSync('stat', ['-f', '-c', '%T', workDir], { encoding: 'utf8' }).trim(); } catch {}
  const est = (opt.only.includes('iops') ? opt.rounds * opt.jobs.length * (2 * (opt.runtime + 2) + 8) + 5 : 0) +
    (opt.only.includes('ship') ? opt.rounds * 12 : 0) + (opt.only.includes('steady') ? opt.steady + 5 : 0) + (opt.only.includes('init') ? 10 + opt.rounds * 8 : 0);
  log(`tests ${opt.only.join(', ')}, ${opt.rounds} round(s); about ${Math.ceil(est / 60)} min`);

  const A = await startDaemon(cli, 'A', workDir);
  const B = await startDaemon(cli, 'B', workDir);
  const peak = { A: 0, B: 0 };
  const rssTimer = setInterval(() => {
    for (const d of [A, B]) peak[d.name] = Math.max(peak[d.name], rssMiB(d.pid) ?? 0);
  }, 500);
  cleanups.push(() => clearInterval(rssTimer));

  const res = {
    bench: 'replication', startedAt: new Date(started).toISOString(), fsType, dir: opt.dir,
    host: {
      cpus: os.cpus().length, node: process.version, kernel: os.release(), loadavgStart: os.loadavg(),
      gitCommit: (() => { try { return execFileSync('git', ['-C', root, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).trim(); } catch { return null; } })(),
      // Uncommitted changes under src/ when the run started (the build may include them).
      srcChanges: (() => { try { return execFileSync('git', ['-C', root, 'status', '--porcelain', '--', 'src'], { encoding: 'utf8' }).trim() !== ''; } catch { return null; } })(),
    },
    options: { rounds: opt.rounds, runtime: opt.runtime, warmup: opt.warmup, steady: opt.steady, only: opt.only, jobs: opt.jobs, pin: opt.pin, mode: opt.mode, serveArgs: opt.serveArgs, tcpCongestion: { system: systemCongestion(), link: linkCongestion || 'system' } },
  };
  const tests = { iops: testIops, ship: testShip, steady: testSteady, init: testInit };
  for (const name of ['iops', 'ship', 'steady', 'init']) {
    if (!opt.only.includes(name)) continue;
    const t0 = Date.now();
    try {
      res[name] = await tests[name](A, B);
    } catch (e) {
      res[name] = null;
      res.errors = [...(res.errors ?? []), `${name}: ${e.message}`];
      log(`${name} FAILED: ${e.stack ?? e.message}`);
      for (const d of [A, B]) if (d.isExited()) throw new Error(`daemon ${d.name} died:\n${tail(d.logFile)}`);
    }
    log(`${name} took ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  }
  res.peakRssMiB = peak;
  res.daemonLogs = { A: tail(A.logFile, 50), B: tail(B.logFile, 50) };
  res.seconds = (Date.now() - started) / 1000;
  res.host.loadavgEnd = os.loadavg();
  for (const d of [A, B]) {
    const { code, sig } = await d.stop();
    if (code !== 0) log(`daemon ${d.name} exited with ${sig ?? code} on SIGTERM:\n${tail(d.logFile)}`);
  }
  process.stdout.write(`${markdown(res)}\n\n`);
  if (res.errors) process.stdout.write(`Errors: ${res.errors.join('; ')}\n\n`);
  const line = JSON.stringify(res);
  process.stdout.write(`${line}\n`);
  if (opt.out) fs.writeFileSync(opt.out, `${JSON.stringify(res, null, 2)}\n`);
  log(`done in ${res.seconds.toFixed(0)} s`);
  if (res.errors) process.exitCode = 1;
}

main()
  .catch((e) => {
    log(`ERROR: ${e.stack ?? e.message}`);
    process.exitCode = 1;
  })
  .finally(() => cleanupAll());
