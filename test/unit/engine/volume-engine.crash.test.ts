// Why: the two ordering rules of the write path, each proven by crashing at the worst
// moment: while a first-write-after-snapshot waits for its before-image to be durable,
// and while a write to a cold extent waits for the activity log. Whatever survives, the
// snapshot reads its old content and the block is pending (changed) after recovery.
import { describe, expect, it } from 'vitest';
import { VolumeEngine, type EngineOptions } from '../../../src/volume/volume-engine.js';
import { SimFs } from '../../helpers/sim-fs.js';
import { SimVolumeData } from '../../helpers/sim-volume-data.js';
import { prng, testSeed } from '../../helpers/seed.js';

const BS = 4096;
const SIZE = 64 * BS;
const options: EngineOptions = { blockBytes: BS, saveAreaBytesMax: 1 << 30, activityExtentBytes: 4 * BS, activityHotMax: 2 };

describe('volume engine crash ordering', () => {
  it('a snapshot never reads data written after it, whatever a crash keeps', async () => {
    const seed = testSeed('engine crash: before-image first');
    const rng = prng(seed);
    for (let round = 0; round < 60; round++) {
      const fsys = new SimFs();
      const data = new SimVolumeData(SIZE);
      const engine = await VolumeEngine.create(fsys, data, options);
      const old = Buffer.alloc(BS, 0x11);
      await engine.write(5 * BS, [old]);
      await engine.createSnapshot('before');
      // The racing overwrite: not awaited, the machine dies now.
      const r = engine.write(5 * BS, [Buffer.alloc(BS, 0x22)]);
      if (r instanceof Promise) r.catch(() => undefined);
      const reopened = await VolumeEngine.open(fsys.crash(rng), data.crash(rng), options);
      const got = Buffer.alloc(BS);
      reopened.readSnapshot('before', 5 * BS, BS, got);
      expect(got.equals(old), `round ${round}`).toBe(true);
    }
  });

  it('a block whose data may have reached disk is pending after a crash', async () => {
    const seed = testSeed('engine crash: change recorded first');
    const rng = prng(seed);
    for (let round = 0; round < 60; round++) {
      const fsys = new SimFs();
      const data = new SimVolumeData(SIZE);
      const engine = await VolumeEngine.create(fsys, data, options);
      // Touch more extents than the log holds, so evictions and checkpoints happen.
      for (let i = 0; i < 6; i++) await engine.write(i * 4 * BS, [Buffer.alloc(BS, i + 1)]);
      await engine.buildDeltaSet(1, { put() {}, commit: async () => {} }); // replica = volume now
      const shipped = Buffer.from(data.current);
      const b = Math.floor(rng() * 64);
      const r = engine.write(b * BS, [Buffer.alloc(BS, 0x77)]);
      if (r instanceof Promise) r.catch(() => undefined);
      const crashedData = data.crash(rng);
      const reopened = await VolumeEngine.open(fsys.crash(rng), crashedData, options);
      const pending = reopened.changeLog.pending();
      for (let x = 0; x < 64; x++) {
        const differs = !crashedData.current.subarray(x * BS, (x + 1) * BS).equals(shipped.subarray(x * BS, (x + 1) * BS));
        if (differs) expect(pending.test(x), `round ${round} block ${x}`).toBe(true);
      }
    }
  });

  it('a write still waiting when the volume closes fails and never reaches the data (the clean logs say nothing is in flight)', async () => {
    for (const journalRecentExtents of [0, 64]) {
      // 0: the cold write waits for the write journal; 64 after a first journaled write: for the activity log.
      const fsys = new SimFs();
      const data = new SimVolumeData(SIZE);
      const engine = await VolumeEngine.create(fsys, data, { ...options, journalRecentExtents });
      if (journalRecentExtents > 0) await engine.write(8 * BS, [Buffer.alloc(BS, 1)]);
      const w = engine.write(9 * BS, [Buffer.alloc(BS, 0x55)]);
      expect(w, 'the write waits').toBeInstanceOf(Promise);
      const closed = engine.close();
      await expect(w).rejects.toThrow(/closed while the write waited/);
      await closed;
      expect(data.current.subarray(9 * BS, 10 * BS).every((v) => v === 0), `journalRecentExtents ${journalRecentExtents}`).toBe(true);
    }
  });

  it('activity-log evictions checkpoint the bitmaps without flushing the data file, and every block whose data a crash kept is still valid and pending', async () => {
    const seed = testSeed('engine crash: evictions without data flush');
    const rng = prng(seed);
    for (let round = 0; round < 40; round++) {
      const fsys = new SimFs();
      const data = new SimVolumeData(SIZE);
      const engine = await VolumeEngine.create(fsys, data, options);
      // Scattered writes over every extent (the log holds 2): evictions, each behind a checkpoint.
      for (let i = 0; i < 24; i++) {
        const b = Math.floor(rng() * 64);
        await engine.write(b * BS, [Buffer.alloc(BS, 1 + (i % 250))]);
      }
      expect(engine.stats.checkpoints, `round ${round}`).toBeGreaterThan(0);
      // Only clears (TRIM) need the data durable before their bitmap pages: no flush so far.
      expect(data.flushes, `round ${round}`).toBe(0);
      const crashedData = data.crash(rng);
      const reopened = await VolumeEngine.open(fsys.crash(rng), crashedData, options);
      const valid = reopened.validBlocks();
      const pending = reopened.changeLog.pending();
      for (let x = 0; x < 64; x++) {
        if (crashedData.current.subarray(x * BS, (x + 1) * BS).some((v) => v !== 0)) {
          expect(valid.test(x), `round ${round} block ${x} valid`).toBe(true);
          expect(pending.test(x), `round ${round} block ${x} pending`).toBe(true);
        }
      }
    }
  });
});
