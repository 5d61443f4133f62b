// Why: the benchmark scripts (bench-replication.mjs, bench-recovery.mjs) start real
// daemons, drive them through the control API and fio, and must clean up on every exit
// path; those pieces live here once. `kit` holds the settings they differ in (the log
// prefix, extra node/serve arguments, CPU pinning).
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CLK_TCK = 100;

/** Set by the script before it starts anything. */
export const kit = { name: 'bench', nodeArgs: [], serveArgs: [], pin: false };

function log(msg) {
  if (interrupted && !/^SIG|cleanup|SIGTERM/.test(msg)) return; // the failures a stop causes are noise
  process.stderr.write(`${kit.name}: ${msg}\n`);
}
function die(msg) {
  log(`ERROR: ${msg}`);
  process.exit(2);
}

// ---- processes and clean-up: everything started is stopped on every exit path ---------

const cleanups = []; // LIFO
const liveChildren = new Set();
let cleaningUp = false;
let interrupted = false;
async function cleanupAll() {
  if (cleaningUp) return;
  cleaningUp = true;
  while (cleanups.length) {
    const fn = cleanups.pop();
    try { await fn(); } catch (e) { log(`cleanup: ${e.message}`); }
  }
}
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    interrupted = true;
    log(`${sig}: stopping daemons and removing work files`);
    cleanupAll().finally(() => process.exit(130));
  });
}
process.on('exit', () => {
  for (const p of liveChildren) try { p.kill('SIGKILL'); } catch {}
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const now = () => performance.now();

/** Runs a command to completion; rejects on non-zero exit or timeout. */
function run(cmd, args, { timeoutMs = 120_000 } = {}) {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    liveChildren.add(p);
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    const timer = setTimeout(() => {
      log(`${cmd} took longer than ${timeoutMs / 1000} s; killing it`);
      p.kill('SIGKILL');
    }, timeoutMs);
    p.on('error', (e) => { clearTimeout(timer); liveChildren.delete(p); reject(e); });
    p.on('close', (code, signal) => {
      clearTimeout(timer);
      liveChildren.delete(p);
      if (code === 0) resolve({ out, err });
      else reject(new Error(`${cmd} ${args.join(' ')} failed (${signal ?? code}): ${(err || out).trim().slice(-2000)}`));
    });
  });
}

/** Bounded poll: resolves with fn's first truthy value. */
async function waitFor(what, fn, timeoutMs, everyMs = 100) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`${what}: not done after ${timeoutMs / 1000} s`);
    await sleep(everyMs);
  }
}

function tail(file, n = 20) {
  try { return fs.readFileSync(file, 'utf8').trim().split('\n').slice(-n).join('\n'); } catch { return ''; }
}

/** CPU seconds a process used so far (utime+stime). */
function procCpu(pid) {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / CLK_TCK;
  } catch { return null; }
}
function rssMiB(pid) {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : null;
  } catch { return null; }
}

/** The daemon runs from a private copy of dist/: a rebuild by someone else mid-run cannot mix builds. */
function snapshotBuild() {
  fs.mkdirSync(path.join(root, '.bench'), { recursive: true });
  const dir = fs.mkdtempSync(path.join(root, '.bench', 'build-'));
  cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.cpSync(path.join(root, 'dist'), path.join(dir, 'dist'), { recursive: true });
  fs.copyFileSync(path.join(root, 'package.json'), path.join(dir, 'package.json'));
  fs.mkdirSync(path.join(dir, 'build/Release'), { recursive: true });
  for (const f of fs.readdirSync(path.join(root, 'build/Release')).filter((n) => n.endsWith('.node'))) {
    fs.copyFileSync(path.join(root, 'build/Release', f), path.join(dir, 'build/Release', f));
  }
  return path.join(dir, 'dist/cli/main.js');
}

// ---- daemons and their control API -----------------------------------------------------

async function startDaemon(cli, name, workDir, opts = {}) {
  const dataDir = opts.dataDir ?? path.join(workDir, name);
  fs.mkdirSync(dataDir, { recursive: true });
  fs.rmSync(path.join(dataDir, 'daemon.json'), { force: true });
  const logFile = path.join(workDir, `${name}.log`);
  const fd = fs.openSync(logFile, 'a');
  const ports = opts.ports ?? { nbd: 0, control: 0, repl: 0 };
  const args = [...kit.nodeArgs, cli, 'serve', '--data-dir', dataDir, '--port', String(ports.nbd), '--control-port', String(ports.control), '--repl-port', String(ports.repl), '--log-level', opts.logLevel ?? 'warn', ...kit.serveArgs, ...(opts.serveArgs ?? [])];
  // taskset execs node in place: the pid (and /proc accounting) is the daemon's.
  const p = kit.pin
    ? spawn('taskset', ['-c', name === 'A' ? '0' : '1', process.execPath, ...args], { stdio: ['ignore', fd, fd] })
    : spawn(process.execPath, args, { stdio: ['ignore', fd, fd] });
  fs.closeSync(fd);
  liveChildren.add(p);
  let exited = false;
  const exitP = new Promise((r) => p.on('exit', (code, sig) => { exited = true; liveChildren.delete(p); r({ code, sig }); }));
  const d = {
    name, pid: p.pid, dataDir, logFile,
    isExited: () => exited,
    /** kill -9: a crash. */
    async kill() {
      if (exited) return exitP;
      p.kill('SIGKILL');
      return exitP;
    },
    async stop() {
      if (exited) return exitP;
      p.kill('SIGTERM');
      const t = setTimeout(() => { log(`daemon ${name} ignored SIGTERM for 15 s; killing`); p.kill('SIGKILL'); }, 15_000);
      const r = await exitP;
      clearTimeout(t);
      return r;
    },
  };
  cleanups.push(d.stop);
  const info = await waitFor(`daemon ${name} start-up`, () => {
    if (exited) throw new Error(`daemon ${name} exited during start-up:\n${tail(logFile)}`);
    try {
      const j = JSON.parse(fs.readFileSync(path.join(dataDir, 'daemon.json'), 'utf8'));
      return j.controlPort && j.nbdPort && j.replPort ? j : null;
    } catch { return null; }
  }, 20_000, 50);
  Object.assign(d, { nbdPort: info.nbdPort, controlPort: info.controlPort, replPort: info.replPort });
  // The control API's bearer token, made by the daemon at its first start.
  d.token = fs.readFileSync(path.join(dataDir, 'control.token'), 'utf8').trim();
  d.peerAddr = `127.0.0.1:${info.replPort}`;
  d.uri = (vol) => `nbd://127.0.0.1:${info.nbdPort}/${vol}`;
  return d;
}

async function api(d, method, urlPath, body, timeoutMs = 120_000) {
  if (d.isExited()) throw new Error(`daemon ${d.name} is gone:\n${tail(d.logFile)}`);
  const res = await fetch(`http://127.0.0.1:${d.controlPort}${urlPath}`, {
    method,
    headers: { authorization: `Bearer ${d.token}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(timeoutMs),
  });
  const text = await res.text();
  let j = null;
  try { j = text ? JSON.parse(text) : null; } catch {}
  if (!res.ok) throw new Error(`${d.name}: ${method} ${urlPath} → ${res.status}: ${j?.error?.message ?? text.slice(0, 500)}`);
  return j;
}

const createVolume = (d, name, sizeBytes) => api(d, 'POST', '/v1/volumes', { name, sizeBytes });
const deleteVolume = (d, name) => api(d, 'DELETE', `/v1/volumes/${encodeURIComponent(name)}?force=1`);
const replStatus = async (d, vol) => (await api(d, 'GET', `/v1/replication?volume=${encodeURIComponent(vol)}`)).volumes[0];

/** Adds a replica of `vol` on `peer` (no wait); returns the pair id. */
async function addReplica(primary, vol, peer, as, extra = {}) {
  const p = await api(primary, 'POST', `/v1/volumes/${encodeURIComponent(vol)}/replicas`, { peer: peer.peerAddr, as, ...extra });
  return p.id;
}

/** In sync: nothing changed since the last cut, every replica copied and has played the last set. */
function inSync(v) {
  return v.role === 'primary' && v.changedBlocksSinceCut === 0 &&
    v.replicas.every((r) => r.initialCopy === null && r.playedSet === v.currentSet &&
      // A pair that fell back to its pending bitmap (outbound area full) has played every
      // set cut so far and still differs: its pending blocks travel in catch-up sets.
      r.state === 'duplex' && (r.pendingBlocks ?? 0) === 0 && r.bytesDifferent === 0);
}

async function waitDuplex(primary, vol, timeoutMs) {
  return waitFor(`${vol}: pair in duplex`, async () => {
    const v = await replStatus(primary, vol);
    const r = v.replicas?.[0];
    if (r?.state === 'failure-suspend') throw new Error(`${vol}: pair failed: ${r.reason}`);
    return r && r.state === 'duplex' && r.initialCopy === null ? v : null;
  }, timeoutMs, 100);
}

async function removeReplica(primary, peer, vol, pairId, remoteVol) {
  await api(primary, 'DELETE', `/v1/volumes/${encodeURIComponent(vol)}/replicas/${pairId}`);
  // The replica volume stays on the peer: delete it so tmpfs does not fill up.
  await deleteVolume(peer, remoteVol).catch((e) => log(`could not delete ${remoteVol} on the peer: ${e.message}`));
}

// ---- fio -----------------------------------------------------------------------------

async function fio(name, uri, extra, timeoutMs) {
  const fioArgs = [`--name=${name}`, '--ioengine=nbd', `--uri=${uri}`, '--output-format=json', ...extra];
  const { out } = kit.pin ? await run('taskset', ['-c', '0', 'fio', ...fioArgs], { timeoutMs }) : await run('fio', fioArgs, { timeoutMs });
  const j = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
  if (j.error) throw new Error(`fio ${name}: job error ${j.error}`);
  return { iops: j.write.iops, mbps: j.write.bw_bytes / 1e6, bytes: j.write.io_bytes, p99us: (j.write.lat_ns?.percentile?.['99.000000'] ?? j.write.clat_ns?.percentile?.['99.000000'] ?? 0) / 1000, p50us: (j.write.lat_ns?.percentile?.['50.000000'] ?? j.write.clat_ns?.percentile?.['50.000000'] ?? 0) / 1000 };
}

// ---- statistics ------------------------------------------------------------------------

function median(xs) {
  const s = xs.filter((x) => x != null && Number.isFinite(x)).sort((a, b) => a - b);
  if (s.length === 0) return null;
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}
function percentile(xs, p) {
  const s = [...xs].sort((a, b) => a - b);
  if (s.length === 0) return null;
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
}
const f0 = (v) => (v == null ? '–' : v.toFixed(0));
const f1 = (v) => (v == null ? '–' : v.toFixed(1));
const f2 = (v) => (v == null ? '–' : v.toFixed(2));
const fk = (v) => (v == null ? '–' : v >= 1000 ? `${(v / 1000).toFixed(1)}k` : v.toFixed(0));
const flag = (ok) => (ok ? '' : ' ⚠');

/** Busy CPU seconds of the whole machine (all cores), from /proc/stat. */
function machineBusy() {
  try {
    const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
    const total = f.slice(0, 8).reduce((a, b) => a + b, 0);
    return (total - f[3] - f[4]) / CLK_TCK;
  } catch { return null; }
}

/**
 * CPU over a phase, in cores: each daemon, and `other` = the rest of the machine (fio,
 * this script, and whatever else runs on the shared machine; 2 = both vCPUs).
 */
function cpuMeter(daemons) {
  const t0 = now();
  const c0 = daemons.map((d) => procCpu(d.pid));
  const m0 = machineBusy();
  return () => {
    const s = (now() - t0) / 1000;
    if (!(s > 0)) return {};
    const out = Object.fromEntries(daemons.map((d, i) => [d.name, +((procCpu(d.pid) - c0[i]) / s).toFixed(2)]));
    const machine = (machineBusy() - m0) / s;
    out.other = +Math.max(0, machine - daemons.reduce((n, d) => n + out[d.name], 0)).toFixed(2);
    return out;
  };
}
const fmtCores = (c) => (c ? `${c.A} / ${c.B} / ${c.other}` : '–');

/** A TCP port free on loopback right now (a daemon or peer is then started on it). */
function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export { freePort, liveChildren, log, die, cleanups, cleanupAll, sleep, now, run, waitFor, tail, procCpu, rssMiB, snapshotBuild, startDaemon, api, createVolume, deleteVolume, replStatus, addReplica, inSync, waitDuplex, removeReplica, fio, median, percentile, f0, f1, f2, fk, flag, machineBusy, cpuMeter, fmtCores };
export const isInterrupted = () => interrupted;
