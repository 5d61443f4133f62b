// What NBD TLS costs (scripts/bench tls, or node scripts/bench-tls.mjs --help).
//
// Four servers in one run, on tmpfs, each serving its own copy of the same random data:
// deltavol plain (--tls off), deltavol TLS (--tls require, X.509), nbdkit plain, and
// nbdkit --tls=require with the same certificate. For each fio job (ioengine=nbd) the four
// run back to back, in an order that rotates per round, because the machine is shared and
// noisy. It prints throughput, the server's CPU, the ratio TLS/plain for each server, and
// deltavol-TLS/nbdkit-TLS.
//
// Credentials: fio's nbd engine calls nbd_connect_uri without allowing local files, so a
// URI's tls-psk-file= / tls-certificates= is refused by libnbd; fio runs with HOME set to a
// directory whose .pki/libnbd/ holds the client certificate (libnbd's default place), and
// the URIs are plain nbds://. Certificates are ECDSA P-256, made with certtool (or openssl).

import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { kit, freePort, liveChildren, log, die, cleanups, cleanupAll, run, sleep, waitFor, tail, procCpu, snapshotBuild, startDaemon, f1, f2, fk, median } from './bench-lib.mjs';

kit.name = 'bench-tls';

const JOBS = [
  { name: 'randread-4k-qd32', rw: 'randread', bs: '4k', iodepth: 32, unit: 'iops' },
  { name: 'read-1M-qd8', rw: 'read', bs: '1M', iodepth: 8, unit: 'mbps' },
  { name: 'write-1M-qd8', rw: 'write', bs: '1M', iodepth: 8, unit: 'mbps' },
];

const HELP = `Usage: node scripts/bench-tls.mjs [options]

  --runtime SECONDS   measured time per fio run (default 5)
  --ramp SECONDS      fio ramp_time (default 1)
  --rounds N          repeat the job list N times; the median is reported (default 1)
  --size SIZE         size of each served volume/file, MiB (default 256)
  --dir DIR           work directory base (default /dev/shm)
  -h, --help          this help

Markdown tables go to stdout, progress to stderr.`;

function parseArgs(argv) {
  const o = { runtime: 5, ramp: 1, rounds: 1, sizeMiB: 256, dir: '/dev/shm' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) die(`option ${a} needs a value`);
      return argv[++i];
    };
    switch (a) {
      case '--runtime': o.runtime = Number(val()); break;
      case '--ramp': o.ramp = Number(val()); break;
      case '--rounds': o.rounds = Number(val()); break;
      case '--size': o.sizeMiB = Number(String(val()).replace(/M(iB)?$/i, '')); break;
      case '--dir': o.dir = val(); break;
      case '-h': case '--help': console.log(HELP); process.exit(0);
      default: die(`unknown option ${a} (see --help)`);
    }
  }
  for (const k of ['runtime', 'rounds', 'sizeMiB']) if (!(Number.isFinite(o[k]) && o[k] > 0)) die(`bad --${k}`);
  if (!(o.ramp >= 0)) die('bad --ramp');
  return o;
}

function have(cmd) {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}


// ---- credentials -------------------------------------------------------------------------

async function makeCerts(dir) {
  const t = (name, lines) => {
    const f = path.join(dir, name);
    fs.writeFileSync(f, lines.join('\n') + '\n');
    return f;
  };
  const key = (f) => run('certtool', ['--generate-privkey', '--key-type=ecdsa', '--outfile', f]);
  const server = path.join(dir, 'server');
  const client = path.join(dir, 'home', '.pki', 'libnbd');
  fs.mkdirSync(server, { recursive: true });
  fs.mkdirSync(client, { recursive: true });
  await key(path.join(dir, 'ca-key.pem'));
  await run('certtool', ['--generate-self-signed', '--load-privkey', path.join(dir, 'ca-key.pem'), '--template', t('ca.info', ['cn = bench CA', 'ca', 'cert_signing_key', 'expiration_days = 2']), '--outfile', path.join(dir, 'ca-cert.pem')]);
  const sign = async (keyFile, certFile, lines) => {
    await key(keyFile);
    await run('certtool', ['--generate-certificate', '--load-privkey', keyFile, '--load-ca-certificate', path.join(dir, 'ca-cert.pem'), '--load-ca-privkey', path.join(dir, 'ca-key.pem'), '--template', t(`${path.basename(certFile)}.info`, [...lines, 'expiration_days = 2']), '--outfile', certFile]);
  };
  await sign(path.join(server, 'server-key.pem'), path.join(server, 'server-cert.pem'), ['cn = localhost', 'dns_name = localhost', 'ip_address = 127.0.0.1', 'tls_www_server', 'signing_key']);
  await sign(path.join(client, 'client-key.pem'), path.join(client, 'client-cert.pem'), ['cn = bench', 'tls_www_client', 'signing_key']);
  for (const d of [server, client]) fs.copyFileSync(path.join(dir, 'ca-cert.pem'), path.join(d, 'ca-cert.pem'));
  return { serverDir: server, home: path.join(dir, 'home') };
}

// ---- servers -----------------------------------------------------------------------------

async function setupDeltavol(cli, workDir, label, serveArgs, seed, sizeBytes) {
  const d = await startDaemon(cli, label, workDir, { serveArgs, logLevel: 'warn' });
  await run(process.execPath, [cli, '--control', `127.0.0.1:${d.controlPort}`, 'volume', 'create', 'bench', '--size', String(sizeBytes)]);
  return { label, pid: d.pid, logFile: d.logFile, port: d.nbdPort, exportName: 'bench', fill: true, seed };
}

async function setupNbdkit(workDir, label, tlsArgs, seed) {
  const img = path.join(workDir, `${label}.img`);
  await run('cp', [seed, img]);
  const logFile = path.join(workDir, `${label}.log`);
  const port = await freePort();
  const pidFile = path.join(workDir, `${label}.pid`);
  const fd = fs.openSync(logFile, 'a');
  const p = spawn('nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), '-P', pidFile, ...tlsArgs, 'file', img], { stdio: ['ignore', fd, fd] });
  fs.closeSync(fd);
  liveChildren.add(p);
  let exited = false;
  const exitP = new Promise((r) => p.on('exit', () => { exited = true; liveChildren.delete(p); r(); }));
  cleanups.push(async () => {
    if (!exited) p.kill('SIGTERM');
    await exitP;
  });
  await waitFor(`${label} start-up`, () => {
    if (exited) throw new Error(`${label} exited:\n${tail(logFile)}`);
    return fs.existsSync(pidFile) && fs.readFileSync(pidFile, 'utf8').trim() !== '';
  }, 10_000, 50);
  return { label, pid: p.pid, logFile, port, exportName: '' };
}

// ---- fio ---------------------------------------------------------------------------------

function fioRun(job, server, tls, opts, home) {
  return new Promise((resolve) => {
    const uri = `${tls ? 'nbds' : 'nbd'}://127.0.0.1:${server.port}/${server.exportName}`;
    const args = [
      `--name=${job.name}`, '--ioengine=nbd', `--uri=${uri}`, `--rw=${job.rw}`, `--bs=${job.bs}`, `--iodepth=${job.iodepth}`,
      '--time_based', `--runtime=${opts.runtime}`, `--ramp_time=${opts.ramp}`, '--output-format=json',
    ];
    const cpu0 = procCpu(server.pid);
    const t0 = performance.now();
    const p = spawn('fio', args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, HOME: home } });
    liveChildren.add(p);
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    const timer = setTimeout(() => p.kill('SIGKILL'), (opts.runtime + opts.ramp + 60) * 1000);
    p.on('close', (code) => {
      clearTimeout(timer);
      liveChildren.delete(p);
      const wall = (performance.now() - t0) / 1000;
      const cores = cpu0 != null && procCpu(server.pid) != null ? (procCpu(server.pid) - cpu0) / wall : null;
      try {
        const j = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
        if (code !== 0 || j.error) throw new Error(`exit ${code}, job error ${j.error}`);
        const dir = job.rw.includes('read') ? j.read : j.write;
        resolve({ iops: dir.iops, mbps: dir.bw_bytes / 1e6, cores });
      } catch (e) {
        resolve({ error: `${e.message}: ${(err || out).trim().slice(-400)}` });
      }
    });
  });
}

// ---- main --------------------------------------------------------------------------------

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  for (const t of ['fio', 'nbdkit', 'certtool', 'nbdcopy']) if (!have(t)) die(`missing '${t}' (scripts/install-test-deps.sh installs it)`);
  const cli = snapshotBuild();
  fs.mkdirSync(opts.dir, { recursive: true });
  const workDir = fs.mkdtempSync(path.join(opts.dir, 'deltavol-bench-tls-'));
  cleanups.push(() => fs.rmSync(workDir, { recursive: true, force: true }));
  const sizeBytes = opts.sizeMiB * 1024 * 1024;

  log(`work dir ${workDir}; certificates, a ${opts.sizeMiB} MiB seed file, four servers`);
  const creds = await makeCerts(path.join(workDir, 'creds'));
  const seed = path.join(workDir, 'seed.img');
  await run('dd', ['if=/dev/urandom', `of=${seed}`, 'bs=1M', `count=${opts.sizeMiB}`, 'iflag=fullblock', 'status=none']);
  const s = creds.serverDir;
  const dvTlsArgs = ['--tls', 'require', '--tls-cert', `${s}/server-cert.pem`, '--tls-key', `${s}/server-key.pem`];
  const servers = [
    { ...(await setupDeltavol(cli, workDir, 'deltavol', [], seed, sizeBytes)), key: 'dvPlain', tls: false },
    { ...(await setupDeltavol(cli, workDir, 'deltavol-tls', dvTlsArgs, seed, sizeBytes)), key: 'dvTls', tls: true },
    { ...(await setupNbdkit(workDir, 'nbdkit', [], seed)), key: 'kitPlain', tls: false },
    { ...(await setupNbdkit(workDir, 'nbdkit-tls', ['--tls=require', `--tls-certificates=${s}`], seed)), key: 'kitTls', tls: true },
  ];
  // The deltavol volumes get the seed's bytes through NBD, as a client would write them
  // (over TLS, nbdcopy reads the client certificate from $HOME/.pki/libnbd too).
  for (const sv of servers.filter((x) => x.fill)) {
    const uri = `${sv.tls ? 'nbds' : 'nbd'}://127.0.0.1:${sv.port}/${sv.exportName}`;
    await new Promise((resolve, reject) => {
      const p = spawn('nbdcopy', [seed, uri], { stdio: ['ignore', 'inherit', 'inherit'], env: { ...process.env, HOME: creds.home } });
      liveChildren.add(p);
      p.on('close', (c) => {
        liveChildren.delete(p);
        if (c === 0) resolve();
        else reject(new Error(`nbdcopy into ${sv.label} failed (${c}):\n${tail(sv.logFile)}`));
      });
    });
  }

  const results = {}; // job → server key → [runs]
  for (let round = 0; round < opts.rounds; round++) {
    for (const job of JOBS) {
      const order = servers.map((_, i) => servers[(i + round + JOBS.indexOf(job)) % servers.length]);
      for (const sv of order) {
        log(`round ${round + 1}/${opts.rounds} ${job.name} on ${sv.label}`);
        const r = await fioRun(job, sv, sv.tls, opts, creds.home);
        if (r.error) log(`  ${sv.label}: ${r.error}`);
        ((results[job.name] ??= {})[sv.key] ??= []).push(r);
      }
    }
  }

  const med = (job, key, field) => median((results[job.name]?.[key] ?? []).filter((r) => !r.error).map((r) => r[field]));
  const fmt = (job, v) => (v == null ? '–' : job.unit === 'iops' ? fk(v) : f1(v));
  const ratio = (a, b) => (a == null || b == null || b === 0 ? '–' : f2(a / b));
  const lines = [];
  lines.push(`\n### NBD TLS cost (fio ioengine=nbd, ${opts.runtime} s per run, ${opts.rounds} round(s), tmpfs, ${os.cpus().length} CPUs; IOPS for 4k, MB/s for 1M)\n`);
  lines.push('| job | deltavol plain | deltavol TLS | TLS/plain | nbdkit plain | nbdkit TLS | TLS/plain | deltavol-TLS/nbdkit-TLS |');
  lines.push('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |');
  for (const job of JOBS) {
    const f = job.unit;
    const [a, b, c, d] = ['dvPlain', 'dvTls', 'kitPlain', 'kitTls'].map((k) => med(job, k, f));
    lines.push(`| ${job.name} | ${fmt(job, a)} | ${fmt(job, b)} | ${ratio(b, a)} | ${fmt(job, c)} | ${fmt(job, d)} | ${ratio(d, c)} | ${ratio(b, d)} |`);
  }
  lines.push('\nServer CPU during each run (cores; 1.0 = one core busy):\n');
  lines.push('| job | deltavol plain | deltavol TLS | nbdkit plain | nbdkit TLS |');
  lines.push('| --- | ---: | ---: | ---: | ---: |');
  for (const job of JOBS) {
    lines.push(`| ${job.name} | ${['dvPlain', 'dvTls', 'kitPlain', 'kitTls'].map((k) => f2(med(job, k, 'cores'))).join(' | ')} |`);
  }
  console.log(lines.join('\n'));
}

main()
  .catch((e) => {
    log(`ERROR: ${e.stack ?? e.message}`);
    process.exitCode = 1;
  })
  .finally(async () => {
    await cleanupAll();
    await sleep(0);
  });
