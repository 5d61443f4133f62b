// Benchmark driver behind scripts/bench (see that file and `--help`).
//
// For each storage (tmpfs, disk) it makes a 1 GiB file of random data, serves one copy
// with deltavol and one with `nbdkit file`, and runs the fio suite against both,
// alternating server per job (deltavol job X, nbdkit job X, next job) because the
// machine is shared and noisy. Per run it records IOPS, MB/s, p99 latency, the CPU
// the server used (from /proc/PID/stat) and fio's own CPU (this process's reaped
// children time); it samples deltavol's RSS throughout. Servers listen on free
// ports on 127.0.0.1 only and are stopped, and work files removed, on every exit path.

import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { root, kit, freePort, liveChildren, log, die, cleanups, cleanupAll, run, sleep, tail, snapshotBuild as snapshotLibBuild } from './bench-lib.mjs';

kit.name = 'bench';
// Set by snapshotBuild(): the daemon runs from a private copy of dist/, so a rebuild by
// someone else in this shared tree cannot mix two builds into one run.
let cliMain = path.join(root, 'dist/cli/main.js');
const VOLUME = 'bench';
const RSS_GOAL_MIB = 150;
// Issue 11's goals: every job at or above nbdkit, and 4 KiB jobs at 1.2× or more.
const RATIO_GOAL = 1.0;
const RATIO_GOAL_4K = 1.2;
const ratioGoal = (name) => (/-4k-/.test(name) ? RATIO_GOAL_4K : RATIO_GOAL);
const CLK_TCK = 100; // Linux USER_HZ; getconf CLK_TCK says 100 on every x86 Debian kernel

// ---- the fio suite ------------------------------------------------------------------

const BASE_JOBS = [
  { base: 'randread-4k-qd32', rw: 'randread', bs: '4k', iodepth: 32 },
  { base: 'randwrite-4k-qd32', rw: 'randwrite', bs: '4k', iodepth: 32 },
  { base: 'read-1M-qd8', rw: 'read', bs: '1M', iodepth: 8 },
  { base: 'write-1M-qd8', rw: 'write', bs: '1M', iodepth: 8 },
  { base: 'randrw70-4k-qd32', rw: 'randrw', bs: '4k', iodepth: 32, rwmixread: 70 },
];
const ALL_JOBS = BASE_JOBS.flatMap((j) =>
  [1, 4].map((numjobs) => ({ ...j, numjobs, name: `${j.base}-j${numjobs}` })),
);
const QUICK_JOBS = [
  'randread-4k-qd32-j1',
  'randwrite-4k-qd32-j1',
  'read-1M-qd8-j1',
  'write-1M-qd8-j1',
  'randrw70-4k-qd32-j4',
];

// ---- options ----------------------------------------------------------------------------

const HELP = `Usage: scripts/bench [options]

  --storage tmpfs|disk|both  where the served files live (default both)
  --quick                    smoke run: runtime 2 s, ramp 1 s, jobs ${QUICK_JOBS.join(', ')}
  --runtime SECONDS          measured time per fio run (default 5)
  --ramp SECONDS             fio ramp_time before measuring (default 1)
  --jobs A,B,...             only jobs whose name contains one of these (names: --list)
  --rounds N                 run the whole job list N times, report the median (default 1);
                             even rounds run the second server first
  --size SIZE                size of the served file (default 1G)
  --tmpfs-dir DIR            base directory for tmpfs (default /dev/shm)
  --disk-dir DIR             base directory for disk (default <repo>/.bench)
  --deltavol-args "ARGS"     extra arguments for 'deltavol serve' (e.g. "--sync-io-max 0")
  --ab "ARGS"                compare deltavol against deltavol with these extra serve
                             arguments instead of against nbdkit
  --out FILE                 JSON results (default <repo>/.bench/results-<timestamp>.json)
  --list                     print the job names and exit
  -h, --help                 this help

Markdown tables go to stdout, progress to stderr. Environment: BENCH_NO_BUILD=1 skips
the rebuild check in scripts/bench.`;

function parseArgs(argv) {
  const o = {
    storage: 'both', quick: false, runtime: null, ramp: null, jobs: null, rounds: 1,
    size: '1G', tmpfsDir: '/dev/shm', diskDir: path.join(root, '.bench'),
    deltavolArgs: [], ab: null, out: null,
  };
  const need = (i) => {
    if (i + 1 >= argv.length) die(`option ${argv[i]} needs a value`);
    return argv[i + 1];
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    switch (a) {
      case '--storage': o.storage = need(i); i++; break;
      case '--quick': o.quick = true; break;
      case '--runtime': o.runtime = Number(need(i)); i++; break;
      case '--ramp': o.ramp = Number(need(i)); i++; break;
      case '--jobs': o.jobs = need(i).split(',').filter(Boolean); i++; break;
      case '--rounds': o.rounds = Number(need(i)); i++; break;
      case '--size': o.size = need(i); i++; break;
      case '--tmpfs-dir': o.tmpfsDir = need(i); i++; break;
      case '--disk-dir': o.diskDir = path.resolve(need(i)); i++; break;
      case '--deltavol-args': o.deltavolArgs = splitArgs(need(i)); i++; break;
      case '--ab': o.ab = splitArgs(need(i)); i++; break;
      case '--out': o.out = path.resolve(need(i)); i++; break;
      case '--list': console.log(ALL_JOBS.map((j) => j.name).join('\n')); process.exit(0);
      case '-h': case '--help': console.log(HELP); process.exit(0);
      default: die(`unknown option ${a} (see --help)`);
    }
  }
  if (!['tmpfs', 'disk', 'both'].includes(o.storage)) die('--storage must be tmpfs, disk or both');
  o.runtime ??= o.quick ? 2 : 5;
  o.ramp ??= 1;
  for (const [k, v] of [['runtime', o.runtime], ['ramp', o.ramp], ['rounds', o.rounds]]) {
    if (!Number.isFinite(v) || v < 0 || (k !== 'ramp' && v <= 0)) die(`bad --${k}`);
  }
  let jobs = o.quick && !o.jobs ? ALL_JOBS.filter((j) => QUICK_JOBS.includes(j.name)) : ALL_JOBS;
  if (o.jobs) jobs = jobs.filter((j) => o.jobs.some((p) => j.name.includes(p)));
  if (jobs.length === 0) die('no job matches --jobs (see --list)');
  o.jobList = jobs;
  o.sizeBytes = parseSize(o.size);
  return o;
}

function splitArgs(s) {
  return s.split(/\s+/).filter(Boolean);
}

function parseSize(s) {
  const m = /^(\d+)([KMG]?)i?B?$/i.exec(s);
  if (!m) die(`bad size ${s}`);
  const mult = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 }[m[2].toUpperCase()];
  return Number(m[1]) * mult;
}

// ---- process bookkeeping: scripts/bench-lib.mjs stops everything started on every exit path


/** Starts a long-lived server; `stop()` sends SIGTERM, then SIGKILL after 10 s. */
function startDaemon(cmd, args, logFile) {
  const fd = fs.openSync(logFile, 'a');
  const p = spawn(cmd, args, { stdio: ['ignore', fd, fd] });
  fs.closeSync(fd);
  liveChildren.add(p);
  let exited = false;
  const exitP = new Promise((r) => p.on('exit', (code, sig) => { exited = true; liveChildren.delete(p); r({ code, sig }); }));
  const stop = async () => {
    if (exited) return exitP;
    p.kill('SIGTERM');
    const t = setTimeout(() => { log(`${path.basename(cmd)} (pid ${p.pid}) ignored SIGTERM; killing`); p.kill('SIGKILL'); }, 10_000);
    const r = await exitP;
    clearTimeout(t);
    return r;
  };
  return { pid: p.pid, stop, isExited: () => exited, exitP };
}

async function waitFor(what, fn, timeoutMs, server) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (server?.isExited()) throw new Error(`${what}: the server exited during start-up`);
    if (Date.now() > deadline) throw new Error(`${what}: not ready after ${timeoutMs / 1000} s`);
    await sleep(50);
  }
}


// ---- /proc readings ------------------------------------------------------------------------

/** utime+stime (own threads) and cutime+cstime (reaped children) of a process, seconds. */
function procCpu(pid) {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' '); // f[0] is field 3 (state)
    return { self: (Number(f[11]) + Number(f[12])) / CLK_TCK, children: (Number(f[13]) + Number(f[14])) / CLK_TCK };
  } catch {
    return null;
  }
}

function procStatusKiB(pid, key) {
  try {
    const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

/** Busy and total jiffies of the whole machine (first line of /proc/stat). */
function machineCpu() {
  const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  const total = f.slice(0, 8).reduce((a, b) => a + b, 0);
  const idle = f[3] + f[4];
  return { busy: (total - idle) / CLK_TCK, total: total / CLK_TCK };
}

/** Samples VmRSS of a process every 200 ms; `peakMiB()` is the largest seen. */
function rssSampler(pid) {
  let peak = 0;
  const sample = () => { const v = procStatusKiB(pid, 'VmRSS'); if (v && v > peak) peak = v; };
  sample();
  const t = setInterval(sample, 200);
  t.unref();
  return { stop: () => clearInterval(t), peakMiB: () => peak / 1024, sample };
}

// ---- the build under test -------------------------------------------------------------

/** Runs the daemon from bench-lib's private copy of dist/ and notes when that build was made. */
function snapshotBuild() {
  const builtAt = fs.statSync(path.join(root, 'dist/cli/main.js')).mtime.toISOString();
  cliMain = snapshotLibBuild();
  return { builtAt };
}

// ---- servers -------------------------------------------------------------------------------

/**
 * deltavol with its own data dir holding one volume. Returns the volume's file (for
 * fillInterleaved) and `start`, which starts the daemon under test once that file is filled.
 */
async function prepareDeltavol(label, workDir, sizeBytes, extraArgs) {
  const dataDir = path.join(workDir, `deltavol-${label.replace(/[^a-z0-9]+/gi, '_')}`);
  fs.mkdirSync(dataDir, { recursive: true });
  const logFile = path.join(workDir, `${path.basename(dataDir)}.log`);
  const infoFile = path.join(dataDir, 'daemon.json');
  const serveArgs = [cliMain, 'serve', '--data-dir', dataDir, '--port', '0', '--control-port', '0', '--repl-port', '0',
    '--bind', '127.0.0.1', '--control-bind', '127.0.0.1', '--log-level', 'warn', ...extraArgs];

  const start = async () => {
    fs.rmSync(infoFile, { force: true });
    const d = startDaemon(process.execPath, serveArgs, logFile);
    cleanups.push(d.stop);
    try {
      const info = await waitFor(`deltavol ${label}`, () => {
        try {
          const j = JSON.parse(fs.readFileSync(infoFile, 'utf8'));
          return j.pid === d.pid ? j : null;
        } catch { return null; }
      }, 15_000, d);
      return { d, info };
    } catch (e) {
      throw new Error(`${e.message}\n${tail(logFile)}`);
    }
  };

  // First start: create the volume. Then stop; the caller fills its file while nobody has
  // it open, and starts again, so the daemon under test begins from a clean state.
  const first = await start();
  await run(process.execPath, [cliMain, '--data-dir', dataDir, 'volume', 'create', VOLUME, '--size', String(sizeBytes)]);
  await first.d.stop();
  cleanups.splice(cleanups.indexOf(first.d.stop), 1);
  const img = path.join(dataDir, 'volumes', VOLUME, 'data.img');
  if (fs.statSync(img).size !== sizeBytes) throw new Error(`unexpected size of ${img}`);
  return {
    img,
    start: async () => {
      const { d, info } = await start();
      return {
        label, kind: 'deltavol', pid: d.pid, args: extraArgs, logFile, img,
        uri: `nbd://127.0.0.1:${info.nbdPort}/${VOLUME}`,
        stop: d.stop,
      };
    },
  };
}

/** nbdkit serves `img` when given (the deltavol volume's own file: the same pages), else a copy of its own. */
function prepareNbdkit(workDir, img = null) {
  const own = img === null;
  const file = img ?? path.join(workDir, 'nbdkit.img');
  return { img: file, own, start: () => startNbdkit(workDir, file) };
}

async function startNbdkit(workDir, img) {
  const logFile = path.join(workDir, 'nbdkit.log');
  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    const pidFile = path.join(workDir, 'nbdkit.pid');
    fs.rmSync(pidFile, { force: true });
    // -P: nbdkit writes the pid file once it is listening.
    const d = startDaemon('nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), '-P', pidFile, 'file', img], logFile);
    cleanups.push(d.stop);
    try {
      await waitFor('nbdkit', () => fs.existsSync(pidFile) && fs.readFileSync(pidFile, 'utf8').trim() !== '', 10_000, d);
      return { label: 'nbdkit', kind: 'nbdkit', pid: d.pid, logFile, img, uri: `nbd://127.0.0.1:${port}/`, stop: d.stop };
    } catch (e) {
      await d.stop();
      if (attempt >= 3) throw new Error(`${e.message}\n${tail(logFile)}`);
      log(`nbdkit did not start on port ${port}; retrying on another port`);
    }
  }
}

/**
 * Overwrites every file of `dsts` (created if missing) with the bytes of `src`, 4 MiB to each
 * in turn, then fsyncs them. Interleaved because where a file's pages land decides how fast
 * it reads: on these VMs a 1 GiB tmpfs file filled right after another was freed read at
 * 7-11 GB/s, a copy made a minute later at 15-17 (2026-12-07), and nbdkit served the slow
 * file ~10% more slowly. Filled together, files get pages of a more alike kind (not the
 * same: one run read 12.7 against 16.3 GB/s), so deltavol and nbdkit share one file.
 */
function fillInterleaved(src, dsts) {
  const piece = Buffer.allocUnsafe(4 << 20);
  const inFd = fs.openSync(src, 'r');
  const outFds = dsts.map((d) => fs.openSync(d, fs.constants.O_WRONLY | fs.constants.O_CREAT, 0o600));
  try {
    for (let pos = 0; ; ) {
      const n = fs.readSync(inFd, piece, 0, piece.length, pos);
      if (n === 0) break;
      for (const fd of outFds) {
        for (let off = 0; off < n; ) off += fs.writeSync(fd, piece, off, n - off, pos + off);
      }
      pos += n;
    }
    for (const fd of outFds) fs.fsyncSync(fd);
  } finally {
    fs.closeSync(inFd);
    for (const fd of outFds) fs.closeSync(fd);
  }
}

/** Sequential read rate of a file (GB/s, best of two passes in 1 MiB preads): shows a placement bias. */
function fileReadGBps(file) {
  const buf = Buffer.allocUnsafe(1 << 20);
  const fd = fs.openSync(file, 'r');
  try {
    let best = 0;
    for (let pass = 0; pass < 2; pass++) {
      const t0 = process.hrtime.bigint();
      let bytes = 0;
      for (let n; (n = fs.readSync(fd, buf, 0, buf.length, bytes)) > 0; ) bytes += n;
      best = Math.max(best, bytes / Number(process.hrtime.bigint() - t0));
    }
    return best;
  } finally {
    fs.closeSync(fd);
  }
}

// ---- one fio run --------------------------------------------------------------------------

function fioArgs(job, uri, opts, outFile) {
  const a = [
    `--name=${job.name}`, '--ioengine=nbd', `--uri=${uri}`,
    `--rw=${job.rw}`, `--bs=${job.bs}`, `--iodepth=${job.iodepth}`, `--numjobs=${job.numjobs}`,
    '--time_based', `--runtime=${opts.runtime}`, `--ramp_time=${opts.ramp}`,
    '--group_reporting', '--lat_percentiles=1', '--output-format=json', `--output=${outFile}`,
    // Bandwidth per second, per fio job: a stall shows as a second with (almost) nothing done.
    `--write_bw_log=${bwLogPrefix(outFile)}`, '--log_avg_msec=1000',
  ];
  if (job.rwmixread) a.push(`--rwmixread=${job.rwmixread}`);
  // With 4 connections each job gets its own quarter of the volume.
  if (job.numjobs > 1) {
    const part = Math.floor(opts.sizeBytes / job.numjobs / 1048576) * 1048576;
    a.push(`--size=${part}`, `--offset_increment=${part}`);
  }
  return a;
}

function bwLogPrefix(outFile) {
  return outFile.replace(/\.json$/, '');
}

/**
 * The slowest whole second of a run in MB/s (all fio jobs together), from fio's
 * per-second bandwidth logs (KiB/s per job), which it removes; null when there are none.
 */
function slowestSecondMBps(outFile, numjobs) {
  const prefix = bwLogPrefix(outFile);
  const perSecond = new Map();
  const seen = new Map();
  for (let i = 1; i <= numjobs; i++) {
    const file = `${prefix}_bw.${i}.log`;
    let text = '';
    try { text = fs.readFileSync(file, 'utf8'); } catch { continue; }
    fs.rmSync(file, { force: true });
    for (const line of text.split('\n')) {
      const f = line.split(',');
      if (f.length < 2) continue;
      const second = Math.round(Number(f[0]) / 1000);
      perSecond.set(second, (perSecond.get(second) ?? 0) + Number(f[1]) * 1024);
      seen.set(second, (seen.get(second) ?? 0) + 1);
    }
  }
  // Only seconds every job reported (the last one may be cut short for some).
  const full = [...perSecond.entries()].filter(([sec]) => seen.get(sec) === numjobs).map(([, b]) => b);
  return full.length ? Math.min(...full) / 1e6 : null;
}

function p99us(dir) {
  const pct = dir.lat_ns?.percentile ?? dir.clat_ns?.percentile ?? {};
  const v = pct['99.000000'];
  return v == null ? null : v / 1000;
}

async function runFio(job, server, opts, workDir) {
  const outFile = path.join(workDir, `fio-${job.name}-${server.kind}.json`);
  const before = { server: procCpu(server.pid), me: procCpu(process.pid), machine: machineCpu(), t: performance.now() };
  const timeoutMs = (opts.runtime + opts.ramp + 60) * 1000;
  let error = null;
  try {
    await run('fio', fioArgs(job, server.uri, opts, outFile), { timeoutMs });
  } catch (e) {
    error = e.message;
  }
  const after = { server: procCpu(server.pid), me: procCpu(process.pid), machine: machineCpu(), t: performance.now() };
  const wall = (after.t - before.t) / 1000;
  let fj = null;
  try {
    const text = fs.readFileSync(outFile, 'utf8');
    fj = JSON.parse(text.slice(text.indexOf('{')));
  } catch (e) {
    error ??= `cannot parse fio output: ${e.message}`;
  }
  fs.rmSync(outFile, { force: true });
  const slowestMBps = slowestSecondMBps(outFile, job.numjobs);
  const j = fj?.jobs?.[0];
  if (!j) return { error: error ?? 'no fio job in output' };
  if (j.error) error ??= `fio job error ${j.error}`;

  const iops = j.read.iops + j.write.iops;
  const serverCpu = before.server && after.server ? after.server.self - before.server.self : null;
  const fioCpu = after.me.children - before.me.children; // fio reaped by this process
  const machineBusy = after.machine.busy - before.machine.busy;
  const r = {
    iops,
    mbps: (j.read.bw_bytes + j.write.bw_bytes) / 1e6,
    p99us: job.rw === 'randrw'
      ? { read: p99us(j.read), write: p99us(j.write) }
      : p99us(job.rw.includes('read') ? j.read : j.write),
    // The slowest second (MB/s) and the longest single I/O (ms): stalls that a median hides.
    slowestSecondMBps: slowestMBps,
    maxLatencyMs: Math.max(j.read.lat_ns?.max ?? 0, j.write.lat_ns?.max ?? 0) / 1e6,
    readIops: j.read.iops,
    writeIops: j.write.iops,
    totalIos: j.read.total_ios + j.write.total_ios,
    fioRuntimeMs: j.job_runtime,
    wallSeconds: wall,
    // CPU in cores (1.0 = one core busy for the whole run) and per I/O, in µs.
    serverCores: serverCpu == null ? null : serverCpu / wall,
    serverUsPerIo: serverCpu == null || !iops ? null : (serverCpu / wall / iops) * 1e6,
    fioCores: fioCpu / wall,
    otherCores: Math.max(0, (machineBusy - (serverCpu ?? 0) - fioCpu) / wall),
    serverRssAfterMiB: (procStatusKiB(server.pid, 'VmRSS') ?? 0) / 1024,
    error,
  };
  return r;
}

// ---- a storage pass -----------------------------------------------------------------------

async function runStorage(storage, opts, serverSpecs) {
  const base = storage === 'tmpfs' ? opts.tmpfsDir : opts.diskDir;
  fs.mkdirSync(base, { recursive: true });
  const workDir = fs.mkdtempSync(path.join(base, 'deltavol-bench-'));
  const removeWork = () => fs.rmSync(workDir, { recursive: true, force: true });
  cleanups.push(removeWork);
  const fsType = toolVersion('findmnt', ['-n', '-o', 'FSTYPE', '-T', workDir]) ?? '?';
  log(`[${storage}] work dir ${workDir} (${fsType}); filling a ${opts.size} seed file from /dev/urandom`);

  const seed = path.join(workDir, 'seed.img');
  await run('dd', ['if=/dev/urandom', `of=${seed}`, 'bs=1M', `count=${Math.ceil(opts.sizeBytes / 1048576)}`, 'iflag=fullblock', 'status=none'], { timeoutMs: 600_000 });
  fs.truncateSync(seed, opts.sizeBytes);

  // Against nbdkit, both servers use the same file (jobs never overlap, and deltavol reads
  // and writes its volume's file as it is): where a file's pages land changes how fast it
  // reads by up to a third here (fillInterleaved), which no other arrangement cancels out.
  // Two deltavol builds (--ab) each need their own volume: their files are filled together.
  const prepared = [];
  for (const spec of serverSpecs) {
    const shared = prepared.find((p) => p.kind === 'deltavol');
    prepared.push(spec.kind === 'nbdkit'
      ? { kind: 'nbdkit', ...prepareNbdkit(workDir, shared?.img ?? null) }
      : { kind: 'deltavol', own: true, ...(await prepareDeltavol(spec.label, workDir, opts.sizeBytes, spec.args)) });
  }
  fillInterleaved(seed, prepared.filter((p) => p.own).map((p) => p.img));
  const servers = [];
  for (const [i, p] of prepared.entries()) {
    log(`[${storage}] starting ${serverSpecs[i].label}`);
    servers.push(await p.start());
  }
  // The same bytes again, now through each deltavol's NBD port (the file's pages stay where
  // fillInterleaved put them): as a user fills a volume, so its blocks count as written.
  // Reads of never-written blocks take the copying path that finds holes; written ones
  // may leave from the page cache (--nbd-reads sendfile), as in the field.
  for (const s of servers.filter((x) => x.kind === 'deltavol')) {
    const t0 = Date.now();
    await run('nbdcopy', ['--flush', seed, s.uri], { timeoutMs: 600_000 });
    log(`[${storage}] wrote the volume of ${s.label} through NBD (nbdcopy) in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  }
  fs.rmSync(seed);
  // Keyed by who serves each file ("deltavol+nbdkit" when they share one).
  const fileGBps = {};
  for (const img of new Set(servers.map((s) => s.img))) {
    fileGBps[servers.filter((s) => s.img === img).map((s) => s.label).join('+')] = fileReadGBps(img);
  }
  log(`[${storage}] file read rate (1 MiB preads): ${Object.entries(fileGBps).map(([who, v]) => `${who} ${v.toFixed(1)} GB/s`).join(', ')}`);
  const rss = new Map(servers.map((s) => [s.label, rssSampler(s.pid)]));

  const jobs = opts.jobList.map((job) => ({ job, runs: Object.fromEntries(servers.map((s) => [s.label, []])) }));
  const started = Date.now();
  for (let round = 1; round <= opts.rounds; round++) {
    // Odd rounds run deltavol first on every job (deltavol X, nbdkit X, next job); even rounds flip the order
    // on even rounds so that neither server always follows the other's writeback.
    const order = round % 2 === 1 ? servers : [...servers].reverse();
    for (const entry of jobs) {
      for (const s of order) {
        const r = await runFio(entry.job, s, opts, workDir);
        entry.runs[s.label].push(r);
        log(`[${storage}] ${opts.rounds > 1 ? `round ${round} ` : ''}${entry.job.name.padEnd(20)} ${s.label.padEnd(12)} ` +
          (r.error && r.iops == null ? `FAILED: ${r.error}` :
            `${fmtK(r.iops).padStart(7)} IOPS ${fmtInt(r.mbps).padStart(6)} MB/s  p99 ${fmtP99(r.p99us)} µs  ` +
            `server ${fmtFix(r.serverCores, 2)} cores ${fmtFix(r.serverUsPerIo, 1)} µs/IO  fio ${fmtFix(r.fioCores, 2)}  ` +
            `slowest 1 s ${fmtInt(r.slowestSecondMBps)} MB/s, max lat ${fmtInt(r.maxLatencyMs)} ms` +
            (r.error ? `  (error: ${r.error})` : '')));
        if (s.kind === 'deltavol' && procCpu(s.pid) == null) throw new Error(`deltavol (pid ${s.pid}) died during ${entry.job.name}\n${tail(s.logFile)}`);
      }
    }
  }

  const memory = {};
  for (const s of servers) {
    const sampler = rss.get(s.label);
    sampler.sample();
    sampler.stop();
    const vmHwmMiB = (procStatusKiB(s.pid, 'VmHWM') ?? 0) / 1024;
    memory[s.label] = { peakMiB: Math.max(vmHwmMiB, sampler.peakMiB()), vmHwmMiB, largestSampleMiB: sampler.peakMiB() };
  }
  // Keep what the servers logged (warn level and up for deltavol) before the work dir goes.
  const serverLogs = Object.fromEntries(servers.map((s) => [s.label, tail(s.logFile, 50)]));
  for (const s of servers) {
    const { code, sig } = await s.stop();
    cleanups.splice(cleanups.indexOf(s.stop), 1);
    if (s.kind === 'deltavol' && code !== 0) log(`[${storage}] deltavol exited with ${sig ?? code} on SIGTERM\n${tail(s.logFile)}`);
  }
  removeWork();
  cleanups.splice(cleanups.indexOf(removeWork), 1);

  const results = jobs.map(({ job, runs }) => {
    const median = Object.fromEntries(Object.entries(runs).map(([k, rs]) => [k, medianRun(rs)]));
    const [a, b] = servers.map((s) => median[s.label]);
    return {
      name: job.name, spec: { rw: job.rw, bs: job.bs, iodepth: job.iodepth, numjobs: job.numjobs, rwmixread: job.rwmixread },
      median, ratio: a?.iops && b?.iops ? a.iops / b.iops : null, runs,
    };
  });
  return { storage, dir: base, fsType, seconds: (Date.now() - started) / 1000, servers: servers.map((s) => ({ label: s.label, kind: s.kind, args: s.args ?? [], uri: s.uri })), fileGBps, memory, serverLogs, results };
}

function medianRun(rs) {
  const ok = rs.filter((r) => r.iops != null).sort((x, y) => x.iops - y.iops);
  return ok.length ? ok[Math.floor((ok.length - 1) / 2)] : null;
}

// ---- output --------------------------------------------------------------------------------

function fmtK(v) {
  if (v == null) return '–';
  return v >= 1000 ? `${(v / 1000).toFixed(1)}k` : v.toFixed(0);
}
function fmtInt(v) {
  return v == null ? '–' : Math.round(v).toString();
}
function fmtFix(v, d) {
  return v == null ? '–' : v.toFixed(d);
}
function fmtP99(v) {
  if (v == null) return '–';
  if (typeof v === 'object') return `${fmtInt(v.read)}/${fmtInt(v.write)}`;
  return fmtInt(v);
}

function systemCongestion() {
  try { return fs.readFileSync('/proc/sys/net/ipv4/tcp_congestion_control', 'utf8').trim(); } catch { return 'unknown'; }
}

/** The algorithm a server's loopback connections send with (src/util/tcp-congestion.ts for deltavol; nbdkit keeps the system's). */
function senderCongestion(sv) {
  if (sv.kind !== 'deltavol') return systemCongestion();
  const args = sv.args ?? [];
  const i = args.lastIndexOf('--tcp-congestion');
  const v = i >= 0 ? args[i + 1] : 'auto';
  return v === 'auto' ? 'cubic' : v === 'system' ? systemCongestion() : v;
}

function markdown(run, opts) {
  const [A, B] = run.servers.map((s) => s.label);
  const lines = [];
  const roundsNote = opts.rounds > 1 ? `, median of ${opts.rounds} rounds` : '';
  lines.push(`### ${run.storage} (${run.fsType}, ${run.dir}), ${opts.runtime} s per job${roundsNote}`, '');
  lines.push(`| job | ${A} IOPS | MB/s | p99 µs | ${B} IOPS | MB/s | p99 µs | ratio (IOPS) |`);
  lines.push('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |');
  for (const r of run.results) {
    const a = r.median[A];
    const b = r.median[B];
    const ratio = r.ratio == null ? '–' : `${r.ratio.toFixed(2)}${r.ratio < ratioGoal(r.name) ? ' ⚠' : ''}`;
    lines.push(`| ${r.name} | ${fmtK(a?.iops)} | ${fmtInt(a?.mbps)} | ${fmtP99(a?.p99us)} | ${fmtK(b?.iops)} | ${fmtInt(b?.mbps)} | ${fmtP99(b?.p99us)} | ${ratio} |`);
  }
  lines.push('', `p99 is total latency (submit to completion); randrw shows read/write. ⚠ = below the goal (${RATIO_GOAL_4K.toFixed(1)} for 4k jobs, ${RATIO_GOAL.toFixed(1)} for the others).`, '');
  lines.push(`CPU during each job, in cores (2 = both vCPUs), and server CPU per I/O:`, '');
  lines.push(`| job | ${A} cores | ${A} µs/IO | ${B} cores | ${B} µs/IO | fio cores (${A} / ${B}) | other load (${A} / ${B}) |`);
  lines.push('| --- | ---: | ---: | ---: | ---: | ---: | ---: |');
  for (const r of run.results) {
    const a = r.median[A];
    const b = r.median[B];
    lines.push(`| ${r.name} | ${fmtFix(a?.serverCores, 2)} | ${fmtFix(a?.serverUsPerIo, 1)} | ${fmtFix(b?.serverCores, 2)} | ${fmtFix(b?.serverUsPerIo, 1)} | ${fmtFix(a?.fioCores, 2)} / ${fmtFix(b?.fioCores, 2)} | ${fmtFix(a?.otherCores, 2)} / ${fmtFix(b?.otherCores, 2)} |`);
  }
  lines.push('', `Stalls: the slowest whole second of any round (MB/s, all connections) and the longest single I/O (ms):`, '');
  lines.push(`| job | ${A} slowest 1 s | ${A} max lat | ${B} slowest 1 s | ${B} max lat |`);
  lines.push('| --- | ---: | ---: | ---: | ---: |');
  const worst = (rs, k, pick) => { const v = rs.map((x) => x[k]).filter((x) => x != null); return v.length ? pick(...v) : null; };
  for (const r of run.results) {
    const a = r.runs[A] ?? [];
    const b = r.runs[B] ?? [];
    lines.push(`| ${r.name} | ${fmtInt(worst(a, 'slowestSecondMBps', Math.min))} | ${fmtInt(worst(a, 'maxLatencyMs', Math.max))} | ${fmtInt(worst(b, 'slowestSecondMBps', Math.min))} | ${fmtInt(worst(b, 'maxLatencyMs', Math.max))} |`);
  }
  lines.push('');
  for (const [label, m] of Object.entries(run.memory)) {
    const goal = label.startsWith('deltavol') ? ` (goal ≤ ${RSS_GOAL_MIB} MiB: ${m.peakMiB <= RSS_GOAL_MIB ? 'met' : 'NOT met'})` : '';
    lines.push(`- ${label} peak RSS: ${m.peakMiB.toFixed(1)} MiB${goal}`);
  }
  if (run.fileGBps) {
    lines.push(`- the servers' file read in 1 MiB preads, before the jobs: ${Object.entries(run.fileGBps).map(([who, v]) => `${who} ${v.toFixed(1)} GB/s`).join(', ')} (one file for both, or pages of unlike speed would bias the ratios)`);
  }
  lines.push(`- TCP congestion control of the reply sockets: ${run.servers.map((sv) => `${sv.label} ${senderCongestion(sv)}`).join(', ')} (system default ${systemCongestion()}; deltavol sets cubic on loopback unless --tcp-congestion says otherwise, since a pacing algorithm such as bbr reorders segments there: README "Speed")`);
  const below = run.results.filter((r) => r.ratio != null && r.ratio < ratioGoal(r.name)).map((r) => `${r.name} ${r.ratio.toFixed(2)}`);
  lines.push(`- jobs below their goal: ${below.length ? below.join(', ') : 'none'}`);
  const failed = run.results.flatMap((r) => Object.entries(r.runs).flatMap(([k, rs]) => rs.filter((x) => x.error).map((x) => `${r.name}/${k}: ${x.error}`)));
  if (failed.length) lines.push(`- errors: ${failed.join('; ')}`);
  for (const [label, text] of Object.entries(run.serverLogs)) {
    if (text && label.startsWith('deltavol')) lines.push(`- ${label} logged (last lines; full text in the JSON):\n\n\`\`\`\n${text.split('\n').slice(-5).join('\n')}\n\`\`\``);
  }
  return lines.join('\n');
}

// ---- main ----------------------------------------------------------------------------------

function toolVersion(cmd, args) {
  try { return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).split('\n')[0].trim(); } catch { return null; }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const storages = opts.storage === 'both' ? ['tmpfs', 'disk'] : [opts.storage];
  const serverSpecs = [
    { kind: 'deltavol', label: 'deltavol', args: opts.deltavolArgs },
    opts.ab
      ? { kind: 'deltavol', label: `deltavol ${opts.ab.join(' ')}`, args: [...opts.deltavolArgs, ...opts.ab] }
      : { kind: 'nbdkit', label: 'nbdkit' },
  ];
  for (const tool of ['fio', 'nbdcopy', ...(opts.ab ? [] : ['nbdkit'])]) {
    if (toolVersion(tool, ['--version']) === null) die(`${tool} is not installed: run scripts/install-test-deps.sh (as root)`);
  }
  const perServer = opts.runtime + opts.ramp + 0.5;
  const estimate = storages.length * opts.rounds * opts.jobList.length * 2 * perServer;
  log(`${opts.jobList.length} jobs × 2 servers × ${storages.length} storage(s) × ${opts.rounds} round(s); ` +
    `about ${Math.ceil(estimate / 60)} min of fio plus ~${storages.length * 15} s set-up`);

  fs.mkdirSync(path.join(root, '.bench'), { recursive: true });
  const build = snapshotBuild();
  const startedAt = new Date();
  const stamp = startedAt.toISOString().replace(/[:.]/g, '-').replace(/-\d+Z$/, 'Z');
  const outFile = opts.out ?? path.join(root, '.bench', `results-${stamp}.json`);
  const report = {
    startedAt: startedAt.toISOString(),
    host: {
      hostname: os.hostname(), cpus: os.cpus().length, memMiB: Math.round(os.totalmem() / 1048576),
      kernel: os.release(), node: process.version, loadavgStart: os.loadavg(), tcpCongestion: systemCongestion(),
      fio: toolVersion('fio', ['--version']), nbdkit: toolVersion('nbdkit', ['--version']),
      gitCommit: toolVersion('git', ['-C', root, 'rev-parse', '--short', 'HEAD']),
      // Uncommitted changes under src/ when the run started (the build may include them).
      srcChanges: (toolVersion('git', ['-C', root, 'status', '--porcelain', '--', 'src']) ?? '') !== '',
      distBuiltAt: build.builtAt,
    },
    options: { storage: opts.storage, quick: opts.quick, runtime: opts.runtime, ramp: opts.ramp, rounds: opts.rounds, size: opts.sizeBytes, deltavolArgs: opts.deltavolArgs, ab: opts.ab, jobs: opts.jobList.map((j) => j.name) },
    storages: [],
  };

  try {
    for (const storage of storages) {
      const r = await runStorage(storage, opts, serverSpecs);
      report.storages.push(r);
      process.stdout.write(`${markdown(r, opts)}\n\n`);
    }
  } finally {
    await cleanupAll();
  }
  report.host.loadavgEnd = os.loadavg();
  report.finishedAt = new Date().toISOString();
  fs.mkdirSync(path.dirname(outFile), { recursive: true });
  fs.writeFileSync(outFile, `${JSON.stringify(report, null, 2)}\n`);
  log(`results written to ${path.relative(process.cwd(), outFile) || outFile}`);
}

main().catch(async (e) => {
  log(`ERROR: ${e.stack ?? e.message}`);
  await cleanupAll();
  process.exit(1);
});
