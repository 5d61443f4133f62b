#!/usr/bin/env node
// Why: issue 9's numbers, measured between two real daemons on this machine (loopback,
// data dirs on tmpfs by default), round after round:
//   1. RTO of `failover` (command → writable primary) on a 10 GiB volume whose replica
//      holds one 64 MiB set received but not played (its playback is delayed), and of
//      `failover --now` (which skips that playback);
//   2. RPO shown live on the replica before the primary is killed vs the loss the
//      failover reports (they must agree within one cut interval);
//   3. resync: bytes moved vs the union of 4 KiB blocks changed on either side since the
//      restart point (the old primary is killed with 16 MiB of writes it never shipped, so
//      its activity log re-marks whole extents; the new primary writes 32 MiB);
//   4. failback: RTO of the planned swap back.
// Writes go through fio (ioengine=nbd) with random data, in the first GiB of the volume.
// Usage: scripts/bench recovery [--rounds 3] [--size 10G] [--set 64] [--dir /dev/shm] [--out FILE]
// Markdown to stdout, then one JSON line; progress to stderr.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  kit, freePort, log, die, cleanups, cleanupAll, waitFor, snapshotBuild, startDaemon, api, createVolume, replStatus, run, median, f0, f1, f2, root,
} from './bench-lib.mjs';

const MiB = 1024 ** 2;
const GiB = 1024 ** 3;
const BS = 4096;
const GOALS = { rtoSeconds: 5, rtoNowSeconds: 1, resyncRatio: 1.1 };

const HELP = `Usage: scripts/bench recovery [options]

  --rounds N     rounds, medians reported (default 3; each round runs failover, then --now)
  --size SIZE    volume size in GiB (default 10)
  --set MIB      size of the set pending playback on the replica at the failover (default 64)
  --dir DIR      base directory of the daemons' data dirs (default /dev/shm)
  --out FILE     also write the JSON result to FILE
  -h, --help     this help

About 1 minute per round. Markdown to stdout, then one JSON line; progress to stderr.`;

const argv = process.argv.slice(2);
const opt = { rounds: 3, sizeGiB: 10, setMiB: 64, dir: '/dev/shm', out: null };
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  const need = () => (i + 1 < argv.length ? argv[++i] : die(`option ${a} needs a value`));
  switch (a) {
    case '--rounds': opt.rounds = Number(need()); break;
    case '--size': opt.sizeGiB = Number(need().replace(/G$/i, '')); break;
    case '--set': opt.setMiB = Number(need().replace(/M$/i, '')); break;
    case '--dir': opt.dir = need(); break;
    case '--out': opt.out = path.resolve(need()); break;
    case '-h': case '--help': console.log(HELP); process.exit(0);
    default: die(`unknown option ${a} (see --help)`);
  }
}
for (const k of ['rounds', 'sizeGiB', 'setMiB']) if (!(opt[k] > 0)) die(`bad --${k}`);
Object.assign(kit, { name: 'bench-recovery' });

const V = 'vol';
const cliPath = { value: '' };

/** The CLI against daemon d; returns parsed JSON and the wall time of the command. */
async function cli(d, args) {
  const t0 = performance.now();
  const { out } = await run(process.execPath, [cliPath.value, '--control', `127.0.0.1:${d.controlPort}`, ...args, '--json'], { timeoutMs: 300_000 });
  return { json: JSON.parse(out), wallMs: performance.now() - t0 };
}

/** fio writes of random data (refilled per write) through NBD. */
async function fioWrite(d, name, extra) {
  await run('fio', [`--name=${name}`, '--ioengine=nbd', `--uri=nbd://127.0.0.1:${d.nbdPort}/${V}`, '--refill_buffers', '--randrepeat=0', '--end_fsync=1', ...extra], { timeoutMs: 300_000 });
}

/** Blocks of the first `bytes` of two readable sources (files) that differ. */
function differingBlocks(fileA, fileB, bytes) {
  const out = new Set();
  const fa = fs.openSync(fileA, 'r');
  const fb = fs.openSync(fileB, 'r');
  const ba = Buffer.alloc(64 * MiB);
  const bb = Buffer.alloc(64 * MiB);
  try {
    for (let off = 0; off < bytes; off += ba.length) {
      const n = Math.min(ba.length, bytes - off);
      ba.fill(0, 0, n);
      bb.fill(0, 0, n);
      fs.readSync(fa, ba, 0, n, off);
      fs.readSync(fb, bb, 0, n, off);
      for (let b = 0; b < n; b += BS) if (ba.compare(bb, b, b + BS, b, b + BS) !== 0) out.add((off + b) / BS);
    }
  } finally {
    fs.closeSync(fa);
    fs.closeSync(fb);
  }
  return out;
}

async function startPair(workDir, round) {
  const pa = { nbd: await freePort(), control: await freePort(), repl: await freePort() };
  const pb = { nbd: await freePort(), control: await freePort(), repl: await freePort() };
  const A = await startDaemon(cliPath.value, `A${round}`, workDir, { ports: pa });
  // The replica delays playback, so a set it received is still pending when the primary dies.
  const B = await startDaemon(cliPath.value, `B${round}`, workDir, { ports: pb, serveArgs: ['--playback-delay', '1h'] });
  await createVolume(A, V, opt.sizeGiB * GiB);
  await api(A, 'POST', `/v1/volumes/${V}/replicas`, { peer: `127.0.0.1:${pb.repl}`, cutIntervalMs: 3_600_000, highWaterBytes: 8 * GiB });
  await waitFor('duplex', async () => (await replStatus(A, V)).replicas[0]?.state === 'duplex', 60_000);
  return { A, B, pa, pb };
}

/** Writes `setMiB` (one set), cuts it, waits until the replica holds it (not played); returns the replica's live RPO. */
async function pendingSet(A, B) {
  await fioWrite(A, 'set', ['--rw=randwrite', '--bs=1M', `--size=${GiB}`, `--io_size=${opt.setMiB}M`]);
  const cut = await api(A, 'POST', `/v1/volumes/${V}/cut`, {});
  await waitFor('the replica holds the set', async () => {
    const r = await replStatus(B, V);
    return r.ackedSet >= cut.set && r.setsHeld?.some((s) => s.set === cut.set);
  }, 120_000);
  const r = await replStatus(B, V);
  return { set: cut.set, played: r.playedSet, rpo: r.rpo };
}

async function round(workDir, i) {
  const out = { round: i };
  // ---- failover (plays the pending set) ----
  {
    const { A, B, pa } = await startPair(workDir, `${i}a`);
    const pend = await pendingSet(A, B);
    // Writes the primary acknowledges (durably) but never ships: the activity log re-marks their extents.
    await fioWrite(A, 'unshipped', ['--rw=randwrite', '--bs=4k', `--size=${GiB}`, '--io_size=16M', '--iodepth=16']);
    const live = (await replStatus(B, V)).rpo;
    await A.kill();
    const fo = await cli(B, ['failover', V]);
    out.failover = { rtoMs: fo.json.rtoMs, wallMs: fo.wallMs, pendingSet: pend.set, setsPlayed: fo.json.setsPlayed, report: fo.json.report, liveRpo: live };
    out.rpoAgreementMs = live.atRiskSinceMs && fo.json.report.atRiskSinceMs ? Math.abs(live.atRiskSinceMs - fo.json.report.atRiskSinceMs) : null;
    log(`round ${i}: failover rto ${fo.json.rtoMs} ms (command ${f0(fo.wallMs)} ms), played ${fo.json.setsPlayed.join(',')}, report ${JSON.stringify(fo.json.report)}`);
    // ---- resync ----
    await fioWrite(B, 'new-primary', ['--rw=randwrite', '--bs=4k', `--size=${GiB}`, '--io_size=32M', '--iodepth=16']);
    const A2 = await startDaemon(cliPath.value, `A${i}a`, workDir, { ports: pa, dataDir: A.dataDir });
    await waitFor('old primary fenced', async () => (await replStatus(A2, V)).state === 'fenced', 30_000);
    // The union of blocks changed since the restart point, from the images themselves.
    const restartImg = path.join(workDir, `restart-${i}.img`);
    await run('nbdcopy', [`nbd://127.0.0.1:${B.nbdPort}/${V}@${fo.json.restartPoint.snapshot}`, restartImg], { timeoutMs: 300_000 });
    cleanups.push(() => fs.rmSync(restartImg, { force: true }));
    const aFile = path.join(A.dataDir, 'volumes', V, 'data.img');
    const bFile = path.join(B.dataDir, 'volumes', V, 'data.img');
    const union = new Set([...differingBlocks(restartImg, aFile, GiB), ...differingBlocks(restartImg, bFile, GiB)]);
    fs.rmSync(restartImg, { force: true });
    const t0 = performance.now();
    const rs = await cli(A2, ['resync', V]);
    await waitFor('resync done, pair in sync', async () => {
      const s = await replStatus(B, V);
      const p = s.replicas?.[0];
      return p && p.initialCopy === null && p.state === 'duplex' && p.playedSet === s.currentSet && s.changedBlocksSinceCut === 0;
    }, 300_000);
    const resyncMs = performance.now() - t0;
    const moved = (await replStatus(B, V)).replicas[0].bytesSent;
    out.resync = { ms: resyncMs, divergentBlocks: rs.json.divergentBlocks, unionBlocks: union.size, unionBytes: union.size * BS, movedBytes: moved, ratio: moved / (union.size * BS), full: rs.json.full };
    log(`round ${i}: resync ${f1(resyncMs / 1000)} s, ${rs.json.divergentBlocks} blocks possibly changed on the old primary, union ${union.size} blocks, moved ${f1(moved / MiB)} MiB = ${f2(out.resync.ratio)} × the union`);
    // ---- failback ----
    const fb = await cli(A2, ['failback', V]);
    out.failback = { rtoMs: fb.json.rtoMs, wallMs: fb.wallMs };
    log(`round ${i}: failback rto ${fb.json.rtoMs} ms (command ${f0(fb.wallMs)} ms)`);
    await A2.stop();
    await B.stop();
  }
  // ---- failover --now (the pending set is not played) ----
  {
    const { A, B } = await startPair(workDir, `${i}b`);
    await pendingSet(A, B);
    await A.kill();
    const fo = await cli(B, ['failover', V, '--now']);
    out.failoverNow = { rtoMs: fo.json.rtoMs, wallMs: fo.wallMs, setsDropped: fo.json.report.setsDropped };
    log(`round ${i}: failover --now rto ${fo.json.rtoMs} ms (command ${f0(fo.wallMs)} ms), dropped ${fo.json.report.setsDropped.join(',')}`);
    await B.stop();
  }
  return out;
}

function markdown(res) {
  const m = (f) => median(res.rounds.map(f));
  const L = [];
  L.push(`### Recovery (${res.options.sizeGiB} GiB volume, one ${res.options.setMiB} MiB set pending on the replica, ${res.rounds.length} round(s), medians; ${res.fsType})`, '');
  L.push('| measure | median | rounds | goal |', '| --- | ---: | --- | --- |');
  const row = (name, f, fmt, goal) => L.push(`| ${name} | ${fmt(m(f))} | ${res.rounds.map((r) => fmt(f(r))).join(' / ')} | ${goal} |`);
  row('failover RTO (command → writable), ms', (r) => r.failover?.rtoMs, f0, `≤ ${GOALS.rtoSeconds * 1000}`);
  row('failover command wall time (CLI start included), ms', (r) => r.failover?.wallMs, f0, '');
  row('failover --now RTO, ms', (r) => r.failoverNow?.rtoMs, f0, `≤ ${GOALS.rtoNowSeconds * 1000}`);
  row('failover --now command wall time, ms', (r) => r.failoverNow?.wallMs, f0, '');
  row('live RPO before the kill vs reported at failover: difference, ms', (r) => r.rpoAgreementMs, f0, '≤ cut interval');
  row('reported loss window, s', (r) => r.failover?.report.seconds, f2, '');
  row('resync: blocks possibly changed on the old primary', (r) => r.resync?.divergentBlocks, f0, '');
  row('resync: union of blocks changed on either side', (r) => r.resync?.unionBlocks, f0, '');
  row('resync: bytes moved / union', (r) => r.resync?.ratio, f2, `≤ ${GOALS.resyncRatio}`);
  row('resync: time to in sync, s', (r) => (r.resync ? r.resync.ms / 1000 : null), f1, '');
  row('failback RTO, ms', (r) => r.failback?.rtoMs, f0, '');
  row('failback command wall time, ms', (r) => r.failback?.wallMs, f0, '');
  return L.join('\n');
}

async function main() {
  const started = Date.now();
  cliPath.value = snapshotBuild();
  for (const tool of ['fio', 'nbdcopy']) {
    try { execFileSync('sh', ['-c', `command -v ${tool}`]); } catch { die(`missing ${tool}: run scripts/install-test-deps.sh`); }
  }
  const workDir = fs.mkdtempSync(path.join(opt.dir, 'deltavol-bench-recovery-'));
  cleanups.push(() => fs.rmSync(workDir, { recursive: true, force: true }));
  let fsType = null;
  try { fsType = execFileSync('stat', ['-f', '-c', '%T', workDir], { encoding: 'utf8' }).trim(); } catch {}
  const res = {
    bench: 'recovery', startedAt: new Date(started).toISOString(), fsType, options: opt,
    host: { cpus: os.cpus().length, node: process.version, loadavgStart: os.loadavg(), gitCommit: (() => { try { return execFileSync('git', ['-C', root, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).trim(); } catch { return null; } })() },
    rounds: [],
  };
  for (let i = 1; i <= opt.rounds; i++) {
    try {
      res.rounds.push(await round(workDir, i));
    } catch (e) {
      res.errors = [...(res.errors ?? []), `round ${i}: ${e.message}`];
      log(`round ${i} FAILED: ${e.stack ?? e.message}`);
    }
  }
  res.seconds = (Date.now() - started) / 1000;
  res.host.loadavgEnd = os.loadavg();
  process.stdout.write(`${markdown(res)}\n\n`);
  if (res.errors) process.stdout.write(`Errors: ${res.errors.join('; ')}\n\n`);
  process.stdout.write(`${JSON.stringify(res)}\n`);
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
