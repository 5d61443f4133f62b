#!/usr/bin/env node
// Why: issue 12 asks that costs grow with the data written, not with a volume's size or
// the number of exports. This measures both against a real daemon through NBD:
//   1. volume size sweep: daemon CPU per scattered 4 KiB write (fio randwrite over the
//      whole volume, --norandommap), the same for the first writes after a snapshot,
//      daemon RSS, bytes of the engine's files on disk, and restart time after a clean
//      stop and after kill -9 under writes;
//   2. export count sweep: time of `nbdinfo --list` and `qemu-nbd --list` for N exports;
//   3. snapshot count sweep on a 1 GiB volume: CPU per 4 KiB write with N snapshots
//      present, and the time to delete the newest snapshot (which saved 256 MiB of
//      before-images) and a middle one;
//   4. connection count sweep: 4 KiB random reads at queue depth 4 per connection over N
//      connections, deltavol and nbdkit (file plugin, same 1 GiB file) alternating in one
//      run: I/O per second of wall time, server CPU per I/O, server RSS.
// Each size runs in a fresh daemon on tmpfs. Before the measured writes of a size, a warm-up
// of --warmup bytes (default 64 MiB) of the same writes runs unmeasured, alike for every size:
// V8 compiles the write path's code (and, on large volumes, the journal's and checkpoint's)
// once per process, ~0.1-0.3 s of CPU that would otherwise be charged to the first 64k writes. CPU comes from /proc (utime+stime), so it is
// less sensitive to a busy machine than throughput; the growth column compares each size
// with the first one of the same run.
// Usage: scripts/bench scale [--sizes 1G,1T,4T,16T] [--writes 64M] [--rounds 1] [--exports 1,40,100]
//        [--snapshots 1,10,100] [--connections 1,8,32,128] [--dir /dev/shm] [--out FILE]
// Markdown to stdout, then one JSON line; progress to stderr.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { spawn } from 'node:child_process';
import {
  kit, log, die, cleanupAll, cleanups, waitFor, snapshotBuild, startDaemon, api, createVolume, run, fio, procCpu, rssMiB, f1, f2, now, freePort,
} from './bench-lib.mjs';

const KiB = 1024;
const MiB = 1024 ** 2;
const GOALS = { cpuGrowth: 1.5, restartSeconds: 1, snapshotDeleteSeconds: 0.2 };

const HELP = `Usage: scripts/bench scale [options]

  --sizes LIST     volume sizes to sweep (default 1G,1T,4T,16T; K/M/G/T suffixes; 0 = skip)
  --writes SIZE    bytes of scattered 4 KiB writes per size (default 64M), and half as much
                   again after a snapshot
  --warmup SIZE    unmeasured scattered writes before each size's measured ones (default 64M;
                   0 = none): V8 compiles the code paths once per process
  --rounds N       sweep the sizes N times, in turn (default 1): the table shows each figure's
                   median, and the growth per round (this host's noise is ±20% per run)
  --exports LIST   export counts to list with nbdinfo and qemu-nbd (default 1,40,100; 0 = skip).
                   libnbd 1.14 costs ~0.2 s per export on any server (MSG_MORE on its last send)
  --snapshots LIST snapshot counts to sweep on a 1 GiB volume (default 1,10,100; 0 = skip)
  --connections LIST
                   connection counts for 4 KiB random reads at qd4 per connection, deltavol
                   and nbdkit alternating on the same file (default 1,8,32,128; 0 = skip)
  --conn-seconds N seconds per connection-count job (default 5)
  --dir DIR        base directory of the daemon's data dir (default /dev/shm)
  --out FILE       also write the JSON result to FILE
  --node-args "A"  extra node arguments for the daemon (e.g. "--cpu-prof --cpu-prof-dir=/tmp/p")
  -h, --help       this help

About 1-2 minutes per size with the defaults. Markdown to stdout, then one JSON line.`;

function parseSize(s) {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)$/i.exec(s.trim());
  if (!m) die(`bad size ${s}`);
  return Math.round(Number(m[1]) * 1024 ** ' KMGT'.indexOf((m[2] || ' ').toUpperCase()));
}
const fmtSize = (b) => {
  for (const [u, n] of [['T', 1024 ** 4], ['G', 1024 ** 3], ['M', MiB]]) if (b >= n && b % n === 0) return `${b / n} ${u}iB`;
  return `${b} B`;
};

const argv = process.argv.slice(2);
const opt = { sizes: [1, 1024, 4096, 16384].map((g) => g * 1024 ** 3), writesBytes: 64 * MiB, warmupBytes: 64 * MiB, rounds: 1, exports: [1, 40, 100], snapshots: [1, 10, 100], connections: [1, 8, 32, 128], connSeconds: 5, dir: '/dev/shm', out: null, nodeArgs: [] };
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  const need = () => (i + 1 < argv.length ? argv[++i] : die(`option ${a} needs a value`));
  switch (a) {
    case '--sizes': opt.sizes = need().split(',').map(parseSize).filter((n) => n > 0); break;
    case '--writes': opt.writesBytes = parseSize(need()); break;
    case '--warmup': opt.warmupBytes = parseSize(need()); break;
    case '--rounds': opt.rounds = Number(need()); if (!(Number.isInteger(opt.rounds) && opt.rounds >= 1 && opt.rounds <= 20)) die('--rounds must be 1-20'); break;
    case '--exports': opt.exports = need().split(',').map(Number).filter((n) => n > 0); break;
    case '--snapshots': opt.snapshots = need().split(',').map(Number).filter((n) => n > 0); break;
    case '--connections': opt.connections = need().split(',').map(Number).filter((n) => n > 0); break;
    case '--conn-seconds': opt.connSeconds = Number(need()); if (!(opt.connSeconds >= 1 && opt.connSeconds <= 120)) die('--conn-seconds must be 1-120'); break;
    case '--dir': opt.dir = need(); break;
    case '--out': opt.out = path.resolve(need()); break;
    case '--node-args': opt.nodeArgs = need().split(/\s+/).filter(Boolean); break;
    case '-h': case '--help': console.log(HELP); process.exit(0);
    default: die(`unknown option ${a} (see --help)`);
  }
}
if (!(opt.writesBytes >= 4 * MiB)) die('--writes must be at least 4M');
if (opt.connections.some((n) => !Number.isInteger(n) || n > 1024)) die('--connections: whole numbers up to 1024');
Object.assign(kit, { name: 'bench-scale', nodeArgs: opt.nodeArgs });

const cli = snapshotBuild();
const work = fs.mkdtempSync(path.join(opt.dir, 'deltavol-bench-scale-'));
process.on('exit', () => fs.rmSync(work, { recursive: true, force: true }));

/** Bytes the files of a directory tree occupy (allocated blocks, not apparent size). */
function allocatedBytes(dir) {
  let n = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) n += allocatedBytes(p);
    else if (e.isFile() && e.name !== 'data.img') n += fs.statSync(p).blocks * 512;
  }
  return n;
}

/** Scattered 4 KiB writes over the whole volume; returns daemon CPU µs per write. */
async function scatteredWrites(d, bytes, label) {
  const c0 = procCpu(d.pid);
  const t0 = now();
  const r = await fio(label, d.uri('vol'), ['--rw=randwrite', '--bs=4k', '--iodepth=32', `--io_size=${bytes}`, '--norandommap', '--randrepeat=0', '--refill_buffers'], 600_000);
  const cpuS = procCpu(d.pid) - c0;
  const writes = bytes / (4 * KiB);
  return { cpuUsPerWrite: (cpuS * 1e6) / writes, iops: r.iops, seconds: (now() - t0) / 1000 };
}

/** Starts the daemon on an existing data dir and times spawn → daemon.json. */
async function restartTimed(dataDir) {
  const t0 = now();
  const d = await startDaemon(cli, 'A', work, { dataDir });
  return { d, seconds: (now() - t0) / 1000 };
}

/** Every run: round → size → row; sizeRows holds each size's medians. */
const sizeRuns = [];
for (let round = 0; round < opt.rounds; round++) {
for (const sizeBytes of opt.sizes) {
  const dataDir = path.join(work, `size-${sizeBytes}`);
  log(`round ${round + 1}/${opt.rounds}, size ${fmtSize(sizeBytes)}: create, ${fmtSize(opt.writesBytes)} of scattered writes`);
  let d = await startDaemon(cli, 'A', work, { dataDir });
  const created = await createVolume(d, 'vol', sizeBytes);
  if (opt.warmupBytes > 0) await fio('warmup', d.uri('vol'), ['--rw=randwrite', '--bs=4k', '--iodepth=32', `--io_size=${opt.warmupBytes}`, '--norandommap', '--randrepeat=0', '--refill_buffers'], 600_000);
  const plain = await scatteredWrites(d, opt.writesBytes, 'scattered');
  await api(d, 'POST', '/v1/volumes/vol/snapshots', { name: 's1' });
  const afterSnap = await scatteredWrites(d, opt.writesBytes / 2, 'after-snapshot');
  const rss = rssMiB(d.pid);
  const filesBytes = allocatedBytes(dataDir);
  await d.stop();
  const clean = await restartTimed(dataDir);
  d = clean.d;
  // kill -9 while writes are in flight: the restart replays the activity log.
  const load = fio('crash-load', d.uri('vol'), ['--rw=randwrite', '--bs=4k', '--iodepth=32', '--time_based', '--runtime=30', '--norandommap', '--randrepeat=0'], 120_000).catch(() => null);
  await new Promise((r) => setTimeout(r, 3000));
  await d.kill();
  await load;
  const crash = await restartTimed(dataDir);
  const rssAfterRestart = rssMiB(crash.d.pid);
  await crash.d.stop();
  fs.rmSync(dataDir, { recursive: true, force: true });
  const row = { sizeBytes, trackingBlockBytes: created.trackingBlockBytes, writeCpuUs: plain.cpuUsPerWrite, writeIops: plain.iops, snapWriteCpuUs: afterSnap.cpuUsPerWrite, rssMiB: rss, rssAfterRestartMiB: rssAfterRestart, filesMiB: filesBytes / MiB, restartCleanS: clean.seconds, restartCrashS: crash.seconds };
  log(`  ${JSON.stringify(row)}`);
  sizeRuns.push({ round, ...row });
}
}
const median = (xs) => {
  const v = [...xs].sort((a, b) => a - b);
  return v.length % 2 ? v[v.length >> 1] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2;
};
const sizeRows = opt.sizes.map((sizeBytes) => {
  const runs = sizeRuns.filter((r) => r.sizeBytes === sizeBytes);
  const out = { sizeBytes, trackingBlockBytes: runs[0].trackingBlockBytes, rounds: runs.length };
  for (const k of ['writeCpuUs', 'writeIops', 'snapWriteCpuUs', 'rssMiB', 'rssAfterRestartMiB', 'filesMiB', 'restartCleanS', 'restartCrashS']) out[k] = median(runs.map((r) => r[k]));
  // Growth against the first size of the same round: the rounds' spread shows the noise.
  const growth = (k) => runs.map((r) => r[k] / sizeRuns.find((f) => f.round === r.round && f.sizeBytes === opt.sizes[0])[k]);
  out.writeGrowthRange = [Math.min(...growth('writeCpuUs')), Math.max(...growth('writeCpuUs'))];
  out.snapGrowthRange = [Math.min(...growth('snapWriteCpuUs')), Math.max(...growth('snapWriteCpuUs'))];
  return out;
});

const exportRows = [];
if (opt.exports.length > 0) {
  const dataDir = path.join(work, 'exports');
  const d = await startDaemon(cli, 'A', work, { dataDir });
  let made = 0;
  for (const n of [...opt.exports].sort((a, b) => a - b)) {
    log(`exports: ${n}`);
    for (; made < n; made++) await createVolume(d, `v${String(made).padStart(4, '0')}`, MiB);
    const timeList = async (cmd, args, count) => {
      const t0 = now();
      const r = await run(cmd, args, { timeoutMs: 1_800_000 }).catch((e) => ({ out: '', err: String(e) }));
      const seconds = (now() - t0) / 1000;
      return { seconds, ok: count(r.out) === n };
    };
    const nbdinfo = await timeList('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${d.nbdPort}`], (out) => { try { return JSON.parse(out).exports.length; } catch { return -1; } });
    const qemu = await timeList('qemu-nbd', ['--list', '-b', '127.0.0.1', '-p', String(d.nbdPort)], (out) => [...out.matchAll(/^ export: '/gm)].length);
    exportRows.push({ exports: n, nbdinfoS: nbdinfo.seconds, nbdinfoOk: nbdinfo.ok, qemuS: qemu.seconds, qemuOk: qemu.ok });
  }
  await d.stop();
}

const snapRows = [];
for (const n of opt.snapshots) {
  log(`snapshots: ${n}`);
  const dataDir = path.join(work, `snaps-${n}`);
  const d = await startDaemon(cli, 'A', work, { dataDir });
  await createVolume(d, 'vol', 1024 * MiB);
  await fio('fill', d.uri('vol'), ['--rw=write', '--bs=1M', '--iodepth=8', '--size=1G'], 300_000);
  for (let i = 0; i < n; i++) {
    await api(d, 'POST', '/v1/volumes/vol/snapshots', { name: `s${i}` });
    if (i < n - 1) await fio('between', d.uri('vol'), ['--rw=randwrite', '--bs=4k', '--iodepth=32', '--io_size=1M', '--norandommap', '--randrepeat=0'], 120_000);
  }
  // The newest saves the before-images of 256 MiB of scattered writes.
  const w = await scatteredWrites(d, 256 * MiB, 'after-snapshots');
  const timeDelete = async (name) => {
    const t0 = now();
    await api(d, 'DELETE', `/v1/volumes/vol/snapshots/${name}`);
    return (now() - t0) / 1000;
  };
  const newestS = await timeDelete(`s${n - 1}`);
  const middleS = n >= 3 ? await timeDelete(`s${Math.floor(n / 2)}`) : null;
  const rss = rssMiB(d.pid);
  await d.stop();
  fs.rmSync(dataDir, { recursive: true, force: true });
  snapRows.push({ snapshots: n, writeCpuUs: w.cpuUsPerWrite, writeIops: w.iops, deleteNewestS: newestS, deleteMiddleS: middleS, rssMiB: rss });
}

const connRows = [];
if (opt.connections.length > 0) {
  // One 1 GiB volume, filled, served by deltavol; nbdkit serves the same data file read-only.
  const dataDir = path.join(work, 'connections');
  // All of fio's connections come from 127.0.0.1: lift the per-address cap (64) above the sweep.
  const connMax = Math.max(...opt.connections);
  const d = await startDaemon(cli, 'A', work, { dataDir, serveArgs: ['--connections-per-address-max', String(Math.max(64, connMax))] });
  await createVolume(d, 'vol', 1024 * MiB);
  await fio('fill', d.uri('vol'), ['--rw=write', '--bs=1M', '--iodepth=8', '--size=1G'], 300_000);
  const kitPort = await freePort();
  const nk = spawn('nbdkit', ['-f', '--exit-with-parent', '-r', '-i', '127.0.0.1', '-p', String(kitPort), 'file', path.join(dataDir, 'volumes/vol/data.img')], { stdio: 'ignore' });
  cleanups.push(() => nk.kill('SIGKILL'));
  await waitFor('nbdkit', () => new Promise((r) => { const c = net.connect(kitPort, '127.0.0.1', () => { c.destroy(); r(true); }); c.on('error', () => r(false)); }), 10_000);
  const servers = [{ name: 'deltavol', pid: d.pid, uri: d.uri('vol') }, { name: 'nbdkit', pid: nk.pid, uri: `nbd://127.0.0.1:${kitPort}/` }];
  for (const n of opt.connections) {
    const row = { connections: n };
    for (const s of servers) {
      log(`connections: ${n}, ${s.name}`);
      const c0 = procCpu(s.pid);
      const t0 = now();
      // fio's nbd engine opens one connection per job; threads keep 128 jobs cheap.
      const { out } = await run('fio', ['--name=conns', '--ioengine=nbd', `--uri=${s.uri}`, '--output-format=json', '--thread', '--group_reporting', `--numjobs=${n}`,
        '--rw=randread', '--bs=4k', '--iodepth=4', '--time_based', `--runtime=${opt.connSeconds}`, '--norandommap', '--randrepeat=0'], { timeoutMs: (opt.connSeconds + 120) * 1000 });
      const wallS = (now() - t0) / 1000;
      const cpuS = procCpu(s.pid) - c0;
      const j = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
      const ios = j.read.total_ios;
      log(`  ${s.name}: ${ios} I/Os in ${j.read.runtime} ms, fio wall ${wallS.toFixed(1)} s, server CPU ${cpuS.toFixed(1)} s`);
      // I/O per second of WALL time (fio start to exit, connects included): with many
      // connections fio's jobs may start staggered (nbdkit's file plugin, busy, took ~30 s to
      // accept 128 while the first jobs ran), so fio's own per-job iops would overstate.
      row[s.name] = { iops: ios / wallS, fioIops: j.read.iops, wallS, cpuUsPerIo: (cpuS * 1e6) / ios, cores: cpuS / wallS, rssMiB: rssMiB(s.pid) };
    }
    log(`  ${JSON.stringify(row)}`);
    connRows.push(row);
  }
  nk.kill('SIGTERM');
  await d.stop();
  fs.rmSync(dataDir, { recursive: true, force: true });
}

const first = sizeRows[0];
const lines = [];
if (sizeRows.length > 0) {
  const of = opt.rounds > 1 ? `, medians of ${opt.rounds} rounds (growth: of the medians, then each round's range)` : '';
  lines.push(`### Volume size (scattered 4 KiB writes, ${fmtSize(opt.writesBytes)} per size after ${opt.warmupBytes > 0 ? `a ${fmtSize(opt.warmupBytes)} warm-up` : 'no warm-up'}, fio qd32, tmpfs${of})`, '');
  lines.push('| volume | tracking block | CPU µs / write | growth | after a snapshot | growth | IOPS | RSS MiB | engine files MiB | restart clean s | restart after kill -9 s |');
  lines.push('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |');
  const range = (rg) => (opt.rounds > 1 ? ` (${f2(rg[0])}–${f2(rg[1])})` : '');
  for (const r of sizeRows) {
    const g = r.writeCpuUs / first.writeCpuUs;
    const gs = r.snapWriteCpuUs / first.snapWriteCpuUs;
    lines.push(`| ${fmtSize(r.sizeBytes)} | ${r.trackingBlockBytes / KiB} KiB | ${f1(r.writeCpuUs)} | ${f2(g)}${g > GOALS.cpuGrowth ? ' ⚠' : ''}${range(r.writeGrowthRange)} | ${f1(r.snapWriteCpuUs)} | ${f2(gs)}${gs > GOALS.cpuGrowth ? ' ⚠' : ''}${range(r.snapGrowthRange)} | ${Math.round(r.writeIops)} | ${f1(r.rssMiB)} | ${f1(r.filesMiB)} | ${f2(r.restartCleanS)} | ${f2(r.restartCrashS)} |`);
  }
  lines.push('', 'A volume holds at most 2^32 - 1 tracking blocks: from 16 TiB on the default tracking block is 8 KiB, so 4 KiB writes there are partial blocks.');
  lines.push('', `Goals: CPU growth ≤ ${GOALS.cpuGrowth}× the smallest size; restart ≤ ${GOALS.restartSeconds} s plus time proportional to the data written.`);
}
if (exportRows.length > 0) {
  lines.push('', '### Export count (listing on one connection)', '', '| exports | nbdinfo --list s | s / export | qemu-nbd --list s | all listed |', '| ---: | ---: | ---: | ---: | --- |');
  for (const r of exportRows) lines.push(`| ${r.exports} | ${f2(r.nbdinfoS)} | ${f2(r.nbdinfoS / r.exports)} | ${f2(r.qemuS)} | ${r.nbdinfoOk && r.qemuOk ? 'yes' : `no (nbdinfo ${r.nbdinfoOk}, qemu-nbd ${r.qemuOk})`} |`);
}
if (snapRows.length > 0) {
  lines.push('', '### Snapshot count (1 GiB volume, 256 MiB of scattered 4 KiB writes after the last snapshot)', '', '| snapshots | CPU µs / write | IOPS | delete newest s | delete a middle one s | RSS MiB |', '| ---: | ---: | ---: | ---: | ---: | ---: |');
  for (const r of snapRows) {
    const slow = (x) => (x != null && x > GOALS.snapshotDeleteSeconds ? ' ⚠' : '');
    lines.push(`| ${r.snapshots} | ${f1(r.writeCpuUs)} | ${Math.round(r.writeIops)} | ${f2(r.deleteNewestS)}${slow(r.deleteNewestS)} | ${f2(r.deleteMiddleS)}${slow(r.deleteMiddleS)} | ${f1(r.rssMiB)} |`);
  }
  lines.push('', `Goal: deleting any snapshot ≤ ${GOALS.snapshotDeleteSeconds} s.`);
}
if (connRows.length > 0) {
  const c1 = connRows[0];
  lines.push('', `### Connection count (4 KiB random reads, qd4 per connection, ${opt.connSeconds} s each, 1 GiB on tmpfs, deltavol and nbdkit alternating)`, '');
  lines.push('| connections | deltavol I/O per wall s | nbdkit I/O per wall s | deltavol / nbdkit | deltavol CPU µs / I/O | growth | nbdkit CPU µs / I/O | deltavol cores | nbdkit cores | deltavol RSS MiB | nbdkit RSS MiB |');
  lines.push('| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |');
  for (const r of connRows) {
    const a = r.deltavol;
    const b = r.nbdkit;
    lines.push(`| ${r.connections} | ${Math.round(a.iops)} | ${Math.round(b.iops)} | ${f2(a.iops / b.iops)} | ${f1(a.cpuUsPerIo)} | ${f2(a.cpuUsPerIo / c1.deltavol.cpuUsPerIo)} | ${f1(b.cpuUsPerIo)} | ${f2(a.cores)} | ${f2(b.cores)} | ${f1(a.rssMiB)} | ${f1(b.rssMiB)} |`);
  }
}
console.log(lines.join('\n'));
const result = { when: new Date().toISOString(), writesBytes: opt.writesBytes, warmupBytes: opt.warmupBytes, rounds: opt.rounds, sizes: sizeRows, sizeRuns, exports: exportRows, snapshots: snapRows, connections: connRows };
console.log(JSON.stringify(result));
if (opt.out) fs.writeFileSync(opt.out, JSON.stringify(result, null, 2));
await cleanupAll();
