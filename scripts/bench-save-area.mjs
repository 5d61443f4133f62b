// Why: opening a snapshot's save area checks every record (magic, slot, checksum) to rebuild
// its block map, so a volume with a large snapshot opens only as fast as that scan. This
// times SaveArea.open on 1 GiB of 4 KiB before-images (262144 records), page cache warm.
// Run after `npm run build:ts`:  node scripts/bench-save-area.mjs [--dir /dev/shm] [--rounds 7]

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { SaveArea } from '../dist/snapshot/save-area.js';
import { nodeDurableFs } from '../dist/util/durable-fs.js';

const arg = (name, fallback) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : fallback;
};
const base = arg('--dir', fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir());
const rounds = Number(arg('--rounds', '7'));
const BS = 4096;
const RECORDS = 262144;
const NAME = 'snap-1.save';

const dir = fs.mkdtempSync(path.join(base, 'deltavol-bench-save-area-'));
try {
  const fsys = nodeDurableFs(dir);
  const area = await SaveArea.create(fsys, NAME, 1, BS, 2 * RECORDS, 2 ** 40);
  const data = Buffer.alloc(BS);
  for (let i = 0; i < RECORDS; i++) {
    data.writeUInt32LE(i, 0);
    area.append(2 * i + (i % 3 === 0 ? 1 : 0), data, 0); // distinct blocks, not in order
    if (i % 4096 === 4095) await area.sync();
  }
  await area.sync();
  area.close();
  const wall = [];
  const cpu = [];
  for (let r = 0; r < rounds; r++) {
    const t = performance.now();
    const c = process.cpuUsage();
    const opened = await SaveArea.open(fsys, NAME, 1, BS, 2 * RECORDS, 2 ** 40);
    const used = process.cpuUsage(c);
    wall.push(performance.now() - t);
    cpu.push((used.user + used.system) / 1000);
    if (opened.slots !== RECORDS) throw new Error(`opened ${opened.slots} records of ${RECORDS}`);
    opened.close();
  }
  const median = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
  console.log(`save area open, ${RECORDS} records of ${BS} bytes (${dir}): median ${median(wall).toFixed(0)} ms wall, ${median(cpu).toFixed(0)} ms CPU; min ${Math.min(...wall).toFixed(0)} ms (${rounds} rounds)`);
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
