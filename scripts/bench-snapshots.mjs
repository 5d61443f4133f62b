#!/usr/bin/env node
// Why: issue 4's speed questions, measured through NBD with fio against a real daemon:
// what a snapshot costs the writes after it (first write to a block must read and save its
// before-image; a rewrite of a saved block must cost nothing extra), and how fast a
// snapshot differential streams. Each ratio compares passes over the same region in the
// same run, repeated for --rounds, so machine noise shows as spread, not as a result.
// Usage: scripts/bench snapshots [--rounds 3] [--dir /dev/shm] [--region 256M]
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const cli = path.join(root, 'dist/cli/main.js');
const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
const rounds = Number(opt('rounds', '3'));
const base = opt('dir', '/dev/shm');
const regionMiB = Number(String(opt('region', '256M')).replace(/M$/i, ''));
const volumeMiB = 1024;

const freePort = () =>
  new Promise((res) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });

function sh(cmd, argv, timeoutMs = 600_000) {
  const r = spawnSync(cmd, argv, { encoding: 'utf8', timeout: timeoutMs, maxBuffer: 256 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`${cmd} ${argv.join(' ')} failed (${r.status}):\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

const dataDir = fs.mkdtempSync(path.join(base, 'deltavol-bench-snap-'));
const nbdPort = await freePort();
const ctlPort = await freePort();
const daemon = spawn(process.execPath, [cli, 'serve', '--data-dir', dataDir, '--port', String(nbdPort), '--control-port', String(ctlPort), '--log-level', 'warn'], {
  stdio: ['ignore', 'ignore', 'inherit'],
});
const cleanup = () => {
  daemon.kill('SIGTERM');
  fs.rmSync(dataDir, { recursive: true, force: true });
};
process.on('SIGINT', () => {
  cleanup();
  process.exit(130);
});
const dv = (...a) => sh(process.execPath, [cli, '--control', `127.0.0.1:${ctlPort}`, ...a]);
for (let i = 0; i < 200 && !fs.existsSync(path.join(dataDir, 'daemon.json')); i++) await new Promise((r) => setTimeout(r, 50));

try {
  dv('volume', 'create', 'v', '--size', `${volumeMiB}M`);
  const uri = `nbd://127.0.0.1:${nbdPort}/v`;
  const fio = (name, extra) => {
    const out = sh('fio', [`--name=${name}`, '--ioengine=nbd', `--uri=${uri}`, '--output-format=json', ...extra]);
    const j = JSON.parse(out.slice(out.indexOf('{')));
    const w = j.jobs[0].write;
    return { iops: w.iops, mbps: w.bw / 1024 };
  };
  // Every block of the volume holds data (a snapshot must save it on first write).
  fio('fill', ['--rw=write', '--bs=1M', '--iodepth=8', `--size=${volumeMiB}M`]);
  // One pass of 4k random writes over the region: fio's random map writes each block once.
  const pass = (name) => fio(name, ['--rw=randwrite', '--bs=4k', '--iodepth=32', `--size=${regionMiB}M`, '--randrepeat=0']);

  // Change tracking on (deltavol) vs a plain export of the same file (nbdkit file, no
  // tracking), alternating. nbdkit's writes bypass deltavol's engine: this volume is a
  // scratch volume thrown away at the end.
  const nbdkitPort = await freePort();
  const nbdkit = spawn('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(nbdkitPort), 'file', path.join(dataDir, 'volumes/v/data.img')], { stdio: 'ignore' });
  await new Promise((r) => setTimeout(r, 500));
  const plainUri = `nbd://127.0.0.1:${nbdkitPort}/`;
  const timed = (name, u) => {
    const out = sh('fio', [`--name=${name}`, '--ioengine=nbd', `--uri=${u}`, '--output-format=json', '--rw=randwrite', '--bs=4k', '--iodepth=32', `--size=${volumeMiB}M`, '--runtime=5', '--time_based']);
    return JSON.parse(out.slice(out.indexOf('{'))).jobs[0].write.iops;
  };
  const tracking = [];
  for (let r = 1; r <= rounds; r++) {
    const plainIops = timed('plain-export', plainUri);
    const trackedIops = timed('change-tracking', uri);
    tracking.push(trackedIops / plainIops);
    process.stderr.write(`bench-snapshots: round ${r}: nbdkit file ${plainIops.toFixed(0)}, deltavol ${trackedIops.toFixed(0)} IOPS\n`);
  }
  nbdkit.kill('SIGTERM');
  tracking.sort((a, b) => a - b);

  const rows = [];
  for (let r = 1; r <= rounds; r++) {
    const plain = pass('plain');
    dv('snapshot', 'create', 'v', `s${r}`);
    const first = pass('first-after-snapshot');
    const rewrite = pass('rewrite-saved');
    dv('snapshot', 'delete', 'v', `s${r}`);
    rows.push({ plain: plain.iops, first: first.iops, rewrite: rewrite.iops });
    process.stderr.write(`bench-snapshots: round ${r}: plain ${plain.iops.toFixed(0)}, first ${first.iops.toFixed(0)}, rewrite ${rewrite.iops.toFixed(0)} IOPS\n`);
  }
  const med = (k) => rows.map((x) => x[k]).sort((a, b) => a - b)[Math.floor(rows.length / 2)];
  console.log(`### Snapshot write cost (4k randwrite qd32, one pass over ${regionMiB} MiB, median of ${rounds})\n`);
  console.log('| pass | IOPS | ratio to no snapshot | goal |');
  console.log('| --- | ---: | ---: | ---: |');
  console.log(`| no snapshot | ${med('plain').toFixed(0)} | 1.00 | |`);
  console.log(`| first write after a snapshot | ${med('first').toFixed(0)} | ${(med('first') / med('plain')).toFixed(2)} | ≥ 0.5 |`);
  console.log(`| rewrite of saved blocks | ${med('rewrite').toFixed(0)} | ${(med('rewrite') / med('plain')).toFixed(2)} | ≥ 0.95 |`);
  console.log(`\n4k randwrite qd32 with change tracking (deltavol) / plain export of the same file (nbdkit file), median of ${rounds}: ${tracking[Math.floor(tracking.length / 2)].toFixed(2)} (goal ≥ 0.95)`);

  console.log(`\n### Snapshot differential L→M (${volumeMiB} MiB volume)\n`);
  console.log('| changed | stream bytes | seconds | MB/s of stream |');
  console.log('| --- | ---: | ---: | ---: |');
  for (const pct of [1, 10]) {
    dv('snapshot', 'create', 'v', `L${pct}`);
    const mib = Math.round((volumeMiB * pct) / 100);
    fio(`change${pct}`, ['--rw=randwrite', '--bs=4k', '--iodepth=32', `--size=${volumeMiB}M`, `--io_size=${mib}M`, '--randrepeat=0']);
    dv('snapshot', 'create', 'v', `M${pct}`);
    const file = path.join(dataDir, `d${pct}.diff`);
    const t0 = process.hrtime.bigint();
    dv('snapshot', 'diff', 'v', `L${pct}`, `M${pct}`, '-o', file);
    const s = Number(process.hrtime.bigint() - t0) / 1e9;
    const bytes = fs.statSync(file).size;
    console.log(`| ${pct}% (${mib} MiB of 4k writes) | ${bytes} | ${s.toFixed(2)} | ${(bytes / 1e6 / s).toFixed(0)} |`);
    fs.rmSync(file);
    dv('snapshot', 'delete', 'v', `L${pct}`);
    dv('snapshot', 'delete', 'v', `M${pct}`);
  }
  console.log('\n(differential times include the CLI start-up, ~0.2 s)');
} finally {
  cleanup();
}
