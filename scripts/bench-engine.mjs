// Why: the volume engine must fit the write budget (PERF.md: ~80k 4k writes/s, change
// tracking may cost ≤ 5%). This measures the engine alone, in process, on tmpfs: the
// server and the network are left out so the ratios show only what the engine adds.
// Run after `npm run build:ts`:  node scripts/bench-engine.mjs [--dir /dev/shm]

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { promisify } from 'node:util';
import { PagedBitmap } from '../dist/bitmap/paged-bitmap.js';
import { VolumeEngine } from '../dist/volume/volume-engine.js';
import { nodeDurableFs } from '../dist/util/durable-fs.js';

const fdatasync = promisify(fs.fdatasync);
const dirArg = process.argv.indexOf('--dir');
const base = dirArg > 0 ? process.argv[dirArg + 1] : fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
const BS = 4096;
const VOLUME_BYTES = 1 << 30;
const BLOCKS = VOLUME_BYTES / BS;

function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function fileData(file) {
  const fd = fs.openSync(file, 'w+');
  fs.ftruncateSync(fd, VOLUME_BYTES);
  return {
    fd,
    sizeBytes: VOLUME_BYTES,
    readSync(offset, target, targetOffset, length) {
      fs.readSync(fd, target, targetOffset, length, offset);
    },
    write(offset, chunks) {
      fs.writeSync(fd, chunks[0], 0, chunks[0].length, offset);
    },
    zero(offset, length) {
      fs.writeSync(fd, Buffer.alloc(length), 0, length, offset);
    },
    flush: () => fdatasync(fd),
  };
}

const results = [];
function report(name, value, unit) {
  results.push({ name, value, unit });
  console.log(`${name.padEnd(58)} ${typeof value === 'number' ? value.toFixed(value < 10 ? 3 : 0) : value} ${unit}`);
}

// ---- bitmap ----
{
  const bm = new PagedBitmap(2 ** 28); // 1 TiB of 4 KiB blocks
  const r = rng(1);
  const idx = new Uint32Array(1 << 20);
  for (let i = 0; i < idx.length; i++) idx[i] = Math.floor(r() * 2 ** 28);
  let t = performance.now();
  for (let rep = 0; rep < 4; rep++) for (let i = 0; i < idx.length; i++) bm.set(idx[i]);
  report('bitmap set, random over 1 TiB', (4 * idx.length) / ((performance.now() - t) / 1000), 'ops/s');
  t = performance.now();
  let hits = 0;
  for (let rep = 0; rep < 4; rep++) for (let i = 0; i < idx.length; i++) if (bm.test(idx[i] ^ rep)) hits++;
  report('bitmap test, random over 1 TiB', (4 * idx.length) / ((performance.now() - t) / 1000), 'ops/s');
  const empty = new PagedBitmap(2 ** 28);
  report('bitmap memory, 1 TiB volume, nothing written', empty.bytesUsed() / 1024, 'KiB');
  const seq = new PagedBitmap(2 ** 28);
  seq.setRange(0, 2 ** 18);
  report('bitmap memory per GiB written sequentially (one bitmap)', (seq.bytesUsed() - empty.bytesUsed()) / 1024, 'KiB');
  const rnd = new PagedBitmap(2 ** 28);
  for (let i = 0; i < 2 ** 18; i++) rnd.set(Math.floor(r() * 2 ** 28));
  report('bitmap memory per GiB of 4k writes scattered over 1 TiB (worst)', (rnd.bytesUsed() - empty.bytesUsed()) / 2 ** 20, 'MiB');
}

// ---- the write path ----
async function withEngine(name, fn) {
  const dir = fs.mkdtempSync(path.join(base, `bench-engine-${name}-`));
  const data = fileData(path.join(dir, 'data.img'));
  const engine = await VolumeEngine.create(nodeDurableFs(dir), data, { blockBytes: BS, saveAreaBytesMax: 2 ** 40 });
  try {
    return await fn(engine, data);
  } finally {
    await engine.close();
    fs.closeSync(data.fd);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const OPS = 200_000;
const offsets = new Float64Array(OPS);
{
  const r = rng(2);
  for (let i = 0; i < OPS; i++) offsets[i] = Math.floor(r() * BLOCKS) * BS;
}
const payload = Buffer.alloc(BS, 0xab);

async function plainRate(data) {
  const t = performance.now();
  for (let i = 0; i < OPS; i++) data.write(offsets[i], [payload]);
  return OPS / ((performance.now() - t) / 1000);
}

/**
 * Keeps QD writes in flight (as a busy NBD connection does): a write that must wait (a
 * before-image being made durable) does not stop the next ones from being issued.
 */
function engineRate(engine, list, qd = 32) {
  return new Promise((resolve, reject) => {
    const t = performance.now();
    let next = 0;
    let inflight = 0;
    const done = () => {
      inflight--;
      pump();
    };
    const pump = () => {
      while (inflight < qd && next < list.length) {
        const p = engine.write(list[next++], [payload]);
        if (p) {
          inflight++;
          p.then(done, reject);
        }
      }
      if (inflight === 0 && next >= list.length) resolve(list.length / ((performance.now() - t) / 1000));
    };
    pump();
  });
}

await withEngine('tracking', async (engine, data) => {
  // Warm: every extent hot once (the activity log holds 1000 × 4 MiB ≥ 1 GiB... nearly).
  const warm = [];
  for (let b = 0; b < BLOCKS; b += 1024) warm.push(b * BS);
  await engineRate(engine, warm);
  const plains = [];
  const trackeds = [];
  for (let round = 0; round < 5; round++) {
    plains.push(await plainRate(data));
    trackeds.push(await engineRate(engine, offsets));
  }
  const plain = Math.max(...plains);
  const tracked = Math.max(...trackeds);
  report('4k randwrite, plain pwrite (tmpfs, in process, best of 5)', plain, 'ops/s');
  report('4k randwrite, through the engine (tracking on, best of 5)', tracked, 'ops/s');
  const overheadNs = (1e9 / tracked - 1e9 / plain);
  report('engine cost per 4k write', overheadNs, 'ns');
  report('  as a share of a write at 80k IOPS (12.5 µs)', (100 * overheadNs) / 12500, '%');
  report('activity log records written (fsyncs)', engine.activityCommits, '');
});

await withEngine('snapshot', async (engine) => {
  const list = offsets.subarray(0, 50_000);
  await engineRate(engine, list); // blocks hold data, extents hot
  const noSnap = await engineRate(engine, list);
  await engine.createSnapshot('s');
  const first = await engineRate(engine, list);
  const rewrite = await engineRate(engine, list);
  report('4k randwrite, no snapshot', noSnap, 'ops/s');
  report('first write after snapshot (saves before-images, qd32)', first, 'ops/s');
  report('ratio first-write-after-snapshot / no snapshot', first / noSnap, '×');
  report('rewrite of already-saved blocks', rewrite, 'ops/s');
  report('ratio rewrite / no snapshot', rewrite / noSnap, '×');
  report('before-images saved', engine.stats.beforeImagesSaved, '');
});

for (const pct of [1, 10]) {
  await withEngine(`diff${pct}`, async (engine) => {
    const VOL_BLOCKS = BLOCKS / 4; // 256 MiB of data
    for (let b = 0; b < VOL_BLOCKS; b += 16) await engine.write(b * BS, [Buffer.alloc(16 * BS, 1)]);
    await engine.createSnapshot('L');
    const r = rng(3);
    const n = Math.floor((VOL_BLOCKS * pct) / 100);
    const list = [];
    for (let i = 0; i < n; i++) list.push(Math.floor(r() * VOL_BLOCKS) * BS);
    await engineRate(engine, list);
    await engine.createSnapshot('M');
    const t = performance.now();
    const { data } = engine.differential('L', 'M');
    const buf = Buffer.alloc(BS);
    let bytes = 0;
    data.forEachRun((s, c) => {
      for (let b = s; b < s + c; b++) {
        engine.readSnapshot('M', b * BS, BS, buf);
        bytes += BS;
      }
    });
    const secs = (performance.now() - t) / 1000;
    report(`differential L→M, ${pct}% of 256 MiB changed (read from M)`, bytes / secs / 1e6, 'MB/s');
  });
}

// ---- recovery: open after the process died (no close), 1 GiB volume ----
{
  const dir = fs.mkdtempSync(path.join(base, 'bench-engine-recovery-'));
  const data = fileData(path.join(dir, 'data.img'));
  const options = { blockBytes: BS, saveAreaBytesMax: 2 ** 40 };
  const engine = await VolumeEngine.create(nodeDurableFs(dir), data, options);
  await engineRate(engine, offsets.subarray(0, 100_000)); // ~37% of the blocks written
  await engine.createSnapshot('s');
  await engineRate(engine, offsets.subarray(100_000, 150_000)); // before-images saved
  await engine.checkpoint();
  await engineRate(engine, offsets.subarray(150_000)); // hot extents in the activity log
  // The process "dies" here: nothing closed, nothing flushed beyond what the engine did.
  const t = performance.now();
  const reopened = await VolumeEngine.open(nodeDurableFs(dir), data, options);
  report('recovery (open after a crash), 1 GiB volume, 1 snapshot', performance.now() - t, 'ms');
  report('  pending blocks after recovery', reopened.changeLog.pending().count(), '');
  report('  before-images in the snapshot', reopened.listSnapshots()[0].savedBlocks, '');
  await reopened.close();
  fs.closeSync(data.fd);
  fs.rmSync(dir, { recursive: true, force: true });
}

console.log(JSON.stringify({ bench: 'engine', results }));
