// Why: the outbound save area is where every delta set waits for its replicas; it wraps
// around a fixed-size file, so its bookkeeping (positions, wrap gaps, release, reopen
// after a crash mid-set) is exactly the kind of code that is wrong at the edges. Seeded
// random sets are written, read back chunk by chunk, released, and the log reopened.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { nodeDurableFs } from '../../src/util/durable-fs.js';
import { OutboundLog, setDataChecksum } from '../../src/replication/outbound-log.js';
import { chunkChecksum, FrameDecoder, type Frame } from '../../src/replication/wire.js';
import { isDeltavolError } from '../../src/util/errors.js';
import { prng, testSeed } from '../helpers/seed.js';

const BS = 4096;
const BLOCKS = 4096; // a 16 MiB volume
const MiB = 1024 * 1024;

function blockData(set: number, b: number): Buffer {
  const d = Buffer.alloc(BS);
  d.writeUInt32LE(set, 0);
  d.writeUInt32LE(b, 4);
  d.fill(set & 0xff, 8);
  return d;
}

function decode(frame: Buffer): Frame {
  const out: Frame[] = [];
  const d = new FrameDecoder((f) => out.push(f));
  d.push(frame);
  d.end();
  expect(out.length).toBe(1);
  return out[0]!;
}

describe('outbound log', () => {
  it('wraps around, reads back every chunk, releases, and reopens at the last committed set', async () => {
    const seed = testSeed('outbound-log');
    const rnd = prng(seed);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dv-outlog-'));
    try {
      const fsys = nodeDurableFs(dir);
      let log = OutboundLog.open(fsys, 4 * MiB);
      const kept: { set: number; blocks: number[] }[] = [];
      let wrapped = false;
      for (let set = 1; set <= 60; set++) {
        // Random membership, put out of block order sometimes (priority copies do that).
        const n = 1 + Math.floor(rnd() * 300);
        const fit = log.blocksThatFit(BS);
        const take = Math.min(n, fit);
        if (take === 0) {
          // Full: release the oldest half and try again.
          const upTo = kept[Math.floor(kept.length / 2)]!.set;
          log.release(upTo);
          kept.splice(0, kept.findIndex((k) => k.set > upTo));
          set--;
          continue;
        }
        const blocks = new Set<number>();
        while (blocks.size < take) blocks.add(Math.floor(rnd() * BLOCKS));
        const order = [...blocks].sort((x, y) => (rnd() < 0.2 ? y - x : x - y));
        const w = log.beginSet(set, 1, BS, BLOCKS, false, 0, 0);
        for (const b of order) w.put(b, blockData(set, b));
        const before = log.usedBytes;
        await w.commit();
        expect(log.usedBytes - before).toBeLessThanOrEqual(OutboundLog.bytesFor(take, BS));
        const s = log.get(set)!;
        if (s.chunks.some((c) => c.pos % log.capacityBytes < before % log.capacityBytes)) wrapped = true;
        kept.push({ set, blocks: order });
        log.invariants();
      }
      expect(wrapped).toBe(true);
      // Every kept set reads back: checksums, runs and data.
      const check = (l: OutboundLog) => {
        for (const k of kept) {
          const s = l.get(k.set)!;
          expect(s.blocks).toBe(k.blocks.length);
          const got: number[] = [];
          const crcs: number[] = [];
          s.chunks.forEach((c, i) => {
            const f = decode(Buffer.concat(l.readChunk(c)));
            if (f.msg.t !== 'chunk') throw new Error('not a chunk');
            expect(f.msg.set).toBe(k.set);
            expect(f.msg.chunk).toBe(i);
            expect(chunkChecksum(f.data!, f.msg.set, f.msg.chunk, f.msg.runs)).toBe(f.msg.crc);
            crcs.push(f.msg.crc);
            let at = 0;
            for (const [b, n] of f.msg.runs) {
              for (let j = 0; j < n; j++, at += BS) {
                expect(f.data!.subarray(at, at + BS).equals(blockData(k.set, b + j))).toBe(true);
                got.push(b + j);
              }
            }
          });
          expect(got.sort((x, y) => x - y)).toEqual([...k.blocks].sort((x, y) => x - y));
          expect(setDataChecksum(crcs)).toBe(s.dataCrc);
        }
      };
      check(log);
      // A set being built when the process dies is not in the index: reopen drops it.
      const last = log.lastSet;
      const partial = log.beginSet(last + 1, 1, BS, BLOCKS, false, 0, 0);
      for (let b = 0; b < 10; b++) partial.put(b, blockData(last + 1, b));
      log.close();
      log = OutboundLog.open(fsys, 4 * MiB);
      expect(log.lastSet).toBe(last);
      check(log);
      log.invariants();
      // Releasing everything frees everything.
      log.release(log.lastSet);
      expect(log.usedBytes).toBe(0);
      expect(log.sets.length).toBe(0);
      log.close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('reuses a chunk buffer only once it left the cache and no socket holds it', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dv-outlog-'));
    try {
      const log = OutboundLog.open(nodeDurableFs(dir), 8 * MiB);
      const perChunk = MiB / BS;
      const writeSet = async (set: number) => {
        const w = log.beginSet(set, 1, BS, BLOCKS, false, 0, 0);
        for (let b = 0; b < 2 * perChunk; b++) w.put(b, blockData(set, b));
        await w.commit();
        return log.get(set)!;
      };
      const s1 = await writeSet(1);
      expect(log.chunkBuffersReused).toBe(0);
      // A sender queued chunk 0 on a socket that has not written it yet.
      const lent = log.lendChunk(s1.chunks[0]!);
      const sentBytes = Buffer.concat(lent.parts);
      log.release(1); // both chunks leave the cache; only chunk 1's buffer is free
      await writeSet(2);
      expect(log.chunkBuffersReused).toBe(1);
      expect(Buffer.concat(lent.parts).equals(sentBytes), 'a lent chunk is not overwritten').toBe(true);
      lent.done();
      lent.done(); // idempotent
      log.release(2);
      await writeSet(3);
      expect(log.chunkBuffersReused).toBe(3);
      // What the cache serves is still exactly what is in the file.
      for (const c of log.get(3)!.chunks) {
        const f = decode(Buffer.concat(log.lendChunk(c).parts));
        expect(f.msg.t === 'chunk' && f.msg.set).toBe(3);
        expect(f.data.subarray(0, BS).equals(blockData(3, f.msg.t === 'chunk' ? f.msg.runs[0]![0] : -1))).toBe(true);
      }
      log.close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('keeps the buffers of a set acknowledged from the cache for the next set, and lets them go when quiet', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dv-outlog-'));
    try {
      // 16 chunks per set: more than the pool's floor of 8, well inside the cache's budget.
      const log = OutboundLog.open(nodeDurableFs(dir), 64 * MiB);
      const perChunk = MiB / BS;
      const chunks = 16;
      const writeSet = async (set: number) => {
        const w = log.beginSet(set, 1, BS, BLOCKS, false, 0, 0);
        for (let b = 0; b < chunks * perChunk; b++) w.put(b % BLOCKS, blockData(set, b % BLOCKS));
        await w.commit();
      };
      await writeSet(1);
      log.release(1); // acknowledged while every chunk is still cached
      expect(log.pooledBuffers).toBe(chunks);
      await writeSet(2);
      expect(log.chunkBuffersReused, 'every chunk of the next set reuses a buffer').toBe(chunks);
      log.release(2);
      log.trimPool(); // quiet: only the floor stays
      expect(log.pooledBuffers).toBe(8);
      // What the reused buffers hold is the new set's data.
      await writeSet(3);
      const c = log.get(3)!.chunks[0]!;
      const f = decode(Buffer.concat(log.readChunk(c)));
      expect(f.msg.t === 'chunk' && f.data.subarray(0, BS).equals(blockData(3, 0))).toBe(true);
      log.close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('starts over at the file\'s beginning when it is empty, and only then', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dv-outlog-'));
    try {
      const fsys = nodeDurableFs(dir);
      let log = OutboundLog.open(fsys, 16 * MiB);
      const perChunk = MiB / BS;
      const writeSet = async (set: number, chunks: number) => {
        const w = log.beginSet(set, 1, BS, BLOCKS, false, 0, 0);
        for (let b = 0; b < chunks * perChunk; b++) w.put(b, blockData(set, b));
        await w.commit();
        return log.get(set)!;
      };
      const reads = (set: number) => {
        for (const c of log.get(set)!.chunks) {
          const f = decode(Buffer.concat(log.readChunk(c)));
          expect(f.msg.t === 'chunk' && f.msg.set).toBe(set);
          const first = f.msg.t === 'chunk' ? f.msg.runs[0]![0] : -1;
          expect(f.data.subarray(0, BS).equals(blockData(set, first))).toBe(true);
        }
      };
      const s1 = await writeSet(1, 3);
      expect(s1.startPos).toBe(0);
      const s2 = await writeSet(2, 2); // set 1 is kept: set 2 follows it
      expect(s2.startPos).toBe(s1.endPos);
      log.release(1);
      const s3 = await writeSet(3, 2); // set 2 is still kept
      expect(s3.startPos).toBe(s2.endPos);
      log.release(3);
      expect(log.usedBytes).toBe(0);
      // Empty: the next set is written where set 1 was, and the cache serves it, not set 1.
      const s4 = await writeSet(4, 1);
      expect(s4.startPos).toBe(0);
      expect(log.usedBytes).toBe(s4.endPos);
      reads(4);
      log.invariants();
      // The index on disk says so too, and the file (not the cache) holds set 4 there.
      log.close();
      log = OutboundLog.open(fsys, 16 * MiB);
      expect(log.get(4)!.startPos).toBe(0);
      reads(4);
      expect(log.chunkFileReads).toBeGreaterThan(0);
      // A set built but never committed (the process died) leaves the index as it was:
      // the next set after a reopen starts where the index says, here again at 0 once empty.
      log.release(4);
      const dead = log.beginSet(5, 1, BS, BLOCKS, false, 0, 0);
      for (let b = 0; b < perChunk + 3; b++) dead.put(b, blockData(99, b));
      log.close();
      log = OutboundLog.open(fsys, 16 * MiB);
      expect(log.lastSet).toBe(4);
      expect((await writeSet(5, 2)).startPos).toBe(0);
      reads(5);
      log.invariants();
      log.close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses a record that does not fit instead of overwriting a kept set', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dv-outlog-'));
    try {
      const log = OutboundLog.open(nodeDurableFs(dir), 4 * MiB);
      const w = log.beginSet(1, 1, BS, BLOCKS, false, 0, 0);
      let err: unknown = null;
      try {
        for (let b = 0; b < BLOCKS; b++) w.put(b, blockData(1, b)); // 16 MiB into 4 MiB
      } catch (e) {
        err = e;
      }
      expect(isDeltavolError(err, 'SAVE_AREA_FULL')).toBe(true);
      log.close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
