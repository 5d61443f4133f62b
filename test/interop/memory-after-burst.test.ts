// Why: issue 11 caps the daemon's RSS during the NBD bench (≤ 150 MiB). Large READ and
// WRITE buffers are pooled so a burst of 1 MiB requests does not fault fresh memory for
// every request, but pools that are never emptied kept the daemon at its peak for good:
// 155 MiB after 4 × 1 MiB writes, then 187 MiB once small I/O grew the V8 heap on top.
// This proves a quiet pool is given back (to the GC, then to the kernel) within seconds,
// seen through the daemon's own /metrics memory gauges and its RSS.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { CMD, RawNbd } from '../helpers/raw-nbd.js';

const MiB = 1024 * 1024;
const CONNECTIONS = 4;
const DEPTH = 8;

let d: TestDaemon;
beforeAll(async () => {
  // WRITEs read into buffers (--nbd-writes buffer): spliced payloads (the default for 256 KiB
  // to 2 MiB) wait in kernel pipes and never fill the WRITE payload pool this test watches.
  // READs into buffers (--nbd-reads copy): replies of written blocks sent from the file
  // (the default) never take a buffer from the READ pool it watches either.
  d = await startDaemon({ volumes: [{ name: 'burst', size: '64M' }], tmpfs: true, logLevel: 'warn', extraArgs: ['--nbd-writes', 'buffer', '--nbd-reads', 'copy'] });
});
afterAll(async () => {
  await d?.dispose();
});

async function memory(): Promise<{ rss: number; arrayBuffers: number }> {
  const m = await d.metrics();
  const get = (name: string) => Number(new RegExp(`^${name} (\\d+)`, 'm').exec(m)?.[1] ?? NaN);
  return { rss: get('deltavol_process_resident_bytes'), arrayBuffers: get('deltavol_process_array_buffers_bytes') };
}

const client = () => RawNbd.exportName(d.nbdPort, 'burst');

describe('memory after a burst of large requests', () => {
  it('pooled 1 MiB buffers are given back once the pools are quiet: Buffer memory and RSS fall within seconds', async () => {
    const conns = await Promise.all(Array.from({ length: CONNECTIONS }, () => client()));
    try {
      // 4 connections × 8 pipelined 1 MiB WRITEs then READs, a few rounds: the pools fill.
      for (let round = 0; round < 3; round++) {
        await Promise.all(
          conns.map(async (c, i) => {
            for (let k = 0; k < DEPTH; k++) {
              c.write(RawNbd.request(CMD.WRITE, { cookie: BigInt(k), offset: (i * DEPTH + k) * MiB, length: MiB }));
              c.write(Buffer.alloc(MiB, i * DEPTH + k));
            }
            for (let k = 0; k < DEPTH; k++) expect((await c.simpleReply()).error).toBe(0);
            for (let k = 0; k < DEPTH; k++) c.write(RawNbd.request(CMD.READ, { cookie: BigInt(100 + k), offset: (i * DEPTH + k) * MiB, length: MiB }));
            for (let k = 0; k < DEPTH; k++) {
              // Replies may come in any order (the spec allows it): the cookie says which.
              const r = await c.simpleReply();
              const which = Number(r.cookie) - 100;
              expect(r.error).toBe(0);
              expect(which >= 0 && which < DEPTH).toBe(true);
              expect((await c.read(MiB)).equals(Buffer.alloc(MiB, i * DEPTH + which))).toBe(true);
            }
          }),
        );
      }
      const busy = await memory();
      expect(busy.arrayBuffers).toBeGreaterThan(16 * MiB); // the burst's buffers wait in the pools
      const deadline = Date.now() + 8000;
      let quiet = busy;
      while (Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 250));
        quiet = await memory();
        if (quiet.arrayBuffers < 8 * MiB && quiet.rss < busy.rss - 16 * MiB) break;
      }
      console.log(
        `[memory-after-burst] Buffers ${(busy.arrayBuffers / MiB).toFixed(0)} → ${(quiet.arrayBuffers / MiB).toFixed(0)} MiB, RSS ${(busy.rss / MiB).toFixed(0)} → ${(quiet.rss / MiB).toFixed(0)} MiB`,
      );
      expect(quiet.arrayBuffers).toBeLessThan(8 * MiB);
      expect(quiet.rss).toBeLessThan(busy.rss - 16 * MiB);
      // Still serving, from fresh buffers.
      expect((await conns[0]!.readSimple(0, MiB, 7n)).equals(Buffer.alloc(MiB, 0))).toBe(true);
    } finally {
      for (const c of conns) c.destroy();
    }
  });

  it('a quiet WRITE payload pool is emptied while reads keep the read pool busy', async () => {
    const pools = async () => {
      const m = await d.metrics();
      const get = (pool: string) => Number(new RegExp(`^deltavol_nbd_pool_idle_bytes\\{pool="${pool}"\\} (\\d+)`, 'm').exec(m)?.[1] ?? NaN);
      return { read: get('read'), write: get('write') };
    };
    const conns = await Promise.all(Array.from({ length: CONNECTIONS }, () => client()));
    try {
      await Promise.all(
        conns.map(async (c, i) => {
          for (let k = 0; k < DEPTH; k++) {
            c.write(RawNbd.request(CMD.WRITE, { cookie: BigInt(k), offset: (i * DEPTH + k) * MiB, length: MiB }));
            c.write(Buffer.alloc(MiB, 1 + k));
          }
          for (let k = 0; k < DEPTH; k++) expect((await c.simpleReply()).error).toBe(0);
        }),
      );
      const afterWrites = await pools();
      expect(afterWrites.write).toBeGreaterThanOrEqual(MiB); // the WRITE payload buffers wait in their pool
      // One connection reads 1 MiB at a time, without a pause, until the WRITE pool is empty.
      const reader = conns[0]!;
      const deadline = Date.now() + 12_000;
      let now = afterWrites;
      let reads = 0;
      while (Date.now() < deadline && now.write > 0) {
        for (let k = 0; k < 20; k++, reads++) expect((await reader.readSimple((reads % 32) * MiB, MiB, BigInt(1000 + reads))).length).toBe(MiB);
        now = await pools();
      }
      console.log(`[memory-after-burst] idle WRITE payload buffers ${(afterWrites.write / MiB).toFixed(0)} → ${(now.write / MiB).toFixed(0)} MiB after ${reads} reads; idle READ buffers ${(now.read / MiB).toFixed(0)} MiB`);
      expect(now.write).toBe(0);
      expect(now.read).toBeGreaterThan(0); // the busy pool keeps its buffers
    } finally {
      for (const c of conns) c.destroy();
    }
  });
});
