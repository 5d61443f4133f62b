// Why: replication cuts sets the plain model test does not: partial sets (at most N
// blocks, the rest stays changed for the next set), catch-up sets (extra blocks besides
// the changed ones), and a snapshot taken at the cut. Random writes race every build;
// each set must hold its blocks exactly as of its cut, the union of a run of partial
// sets must cover every change, and the snapshot at the cut must read as the volume did.
import { describe, expect, it } from 'vitest';
import { VolumeEngine, type DeltaSink } from '../../../src/volume/volume-engine.js';
import { PagedBitmap } from '../../../src/bitmap/paged-bitmap.js';
import { SimFs } from '../../helpers/sim-fs.js';
import { SimVolumeData } from '../../helpers/sim-volume-data.js';
import { prng, testSeed } from '../../helpers/seed.js';

const BS = 4096;
const BLOCKS = 64;
const SIZE = BLOCKS * BS;

describe('volume engine: partial, catch-up and snapshot-stamped delta sets', () => {
  it('every set is exact as of its cut; partial sets together carry every change', async () => {
    const seed = testSeed('engine-partial-sets');
    const rnd = prng(seed);
    const engine = await VolumeEngine.create(new SimFs(), new SimVolumeData(SIZE), { blockBytes: BS, saveAreaBytesMax: 4 * SIZE, copyBlocksPerTurn: 2 });
    const vol = Buffer.alloc(SIZE);
    const replica = Buffer.alloc(SIZE);
    let tag = 0;
    const write = async () => {
      const b = Math.floor(rnd() * BLOCKS);
      const off = b * BS + (rnd() < 0.3 ? 512 * Math.floor(rnd() * 7) : 0);
      const len = Math.min(SIZE - off, 512 * (1 + Math.floor(rnd() * 16)));
      const d = Buffer.alloc(len, ++tag & 0xff);
      d.writeUInt32LE(tag, 0);
      await engine.write(off, [d]);
      d.copy(vol, off);
    };
    for (let i = 0; i < 40; i++) await write();
    for (let set = 1; set <= 60; set++) {
      const asOfCut = Buffer.from(vol); // no write between here and the cut below
      const changedBefore = engine.changedBlockCount();
      const blocksMax = rnd() < 0.5 ? 1 + Math.floor(rnd() * 8) : undefined;
      const extra = rnd() < 0.3 ? new PagedBitmap(BLOCKS) : undefined;
      if (extra) for (let k = 0; k < 5; k++) extra.set(Math.floor(rnd() * BLOCKS));
      const snapshotName = rnd() < 0.2 ? `s${set}` : undefined;
      const puts = new Map<number, Buffer>();
      const sink: DeltaSink = {
        put(b, d) {
          expect(puts.has(b)).toBe(false);
          puts.set(b, Buffer.from(d));
        },
        commit: async () => undefined,
      };
      const done = engine.buildDeltaSet(set, sink, { ...(blocksMax ? { blocksMax } : {}), ...(extra ? { extra } : {}), ...(snapshotName ? { snapshotName } : {}) });
      // Writes race the copy-out: priority copies must keep the set as of the cut.
      const racing: Promise<void>[] = [];
      for (let i = 0; i < 6; i++) racing.push(write());
      await Promise.all([done, ...racing]);
      for (const [b, d] of puts) expect(d.equals(asOfCut.subarray(b * BS, (b + 1) * BS)), `set ${set} block ${b}`).toBe(true);
      const extraCount = extra ? extra.count() : 0;
      if (blocksMax !== undefined) expect(puts.size).toBeLessThanOrEqual(blocksMax + extraCount);
      if (blocksMax === undefined) expect(puts.size).toBeGreaterThanOrEqual(changedBefore);
      if (extra) extra.forEachRun((s, c) => {
        for (let b = s; b < s + c; b++) expect(puts.has(b), `extra block ${b} in set ${set}`).toBe(true);
      });
      for (const [b, d] of puts) d.copy(replica, b * BS);
      if (snapshotName) {
        const got = Buffer.alloc(SIZE);
        engine.readSnapshot(snapshotName, 0, SIZE, got);
        expect(got.equals(asOfCut), `snapshot at cut ${set}`).toBe(true);
        expect(engine.listSnapshots().find((s) => s.name === snapshotName)!.deltaSetNumber).toBe(set);
        await engine.deleteSnapshot(snapshotName);
      }
    }
    // Drain: whole sets until nothing is changed; the replica then equals the volume.
    for (let set = 61; engine.changedBlockCount() > 0; set++) {
      const sink: DeltaSink = { put: (b, d) => d.copy(replica, b * BS), commit: async () => undefined };
      await engine.buildDeltaSet(set, sink);
    }
    expect(replica.equals(vol)).toBe(true);
    engine.invariants();
  });
});
