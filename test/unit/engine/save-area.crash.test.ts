// Why: the engine overwrites a volume block only after sync() of the save area holding its
// before-image resolved, so after any crash every such before-image must reload, byte for
// byte, and nothing may reload that the area did not hold when the machine died (no torn
// record, no record a crash lost coming back later in a reused slot). A failed fsync must
// not let a later sync() resolve as if it had covered the records the failure lost.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { SaveArea } from '../../../src/snapshot/save-area.js';
import { VolumeEngine } from '../../../src/volume/volume-engine.js';
import { isDeltavolError } from '../../../src/util/errors.js';
import { SimFs } from '../../helpers/sim-fs.js';
import { SimVolumeData } from '../../helpers/sim-volume-data.js';
import { prng, testSeed } from '../../helpers/seed.js';

const BS = 4096;
const BLOCKS = 48;
const NAME = 'snap-1.save';
const SNAP_ID = 1;
const BYTES_MAX = 40 * (BS + 32);
const RUNS = Number(process.env.DELTAVOL_RUNS ?? 150);

type Op = { k: 'append'; block: number } | { k: 'sync'; wait: boolean } | { k: 'tick' } | { k: 'crash' };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ k: fc.constant('append' as const), block: fc.nat(BLOCKS - 1) }) },
  { weight: 3, arbitrary: fc.record({ k: fc.constant('sync' as const), wait: fc.boolean() }) },
  { weight: 2, arbitrary: fc.constant({ k: 'tick' as const }) },
  { weight: 2, arbitrary: fc.constant({ k: 'crash' as const }) },
);

function pattern(tag: number): Buffer {
  const b = Buffer.alloc(BS);
  for (let i = 0; i < BS; i++) b[i] = (tag * 131 + i * 7 + (i >> 9) * 13 + 1) & 255;
  return b;
}

const tick = () => new Promise<void>((r) => setImmediate(r));

async function runSequence(ops: Op[], crashSeed: number, syncFail: number): Promise<void> {
  const rng = prng(crashSeed);
  let boot = 0;
  let tag = 0;
  let fsys = new SimFs();
  let area = await SaveArea.create(fsys, NAME, SNAP_ID, BS, BLOCKS, BYTES_MAX);
  /** What the area holds in memory: block → before-image. */
  let held = new Map<number, Buffer>();
  /** Blocks whose sync() resolved after their append: the engine may have overwritten them. */
  let acked = new Set<number>();
  /** This boot's appends, in order (a sync covers a prefix). */
  let appended: number[] = [];
  const withFaults = (f: SimFs) => {
    f.syncFaults = { fails: () => rng() < syncFail, rng };
    return f;
  };
  withFaults(fsys);

  const sync = async (): Promise<void> => {
    const me = boot;
    const covered = appended.length;
    try {
      await area.sync();
    } catch {
      return;
    }
    if (boot === me) for (const b of appended.slice(0, covered)) acked.add(b);
  };

  for (const o of ops) {
    if (o.k === 'append') {
      if (area.has(o.block)) continue;
      const data = pattern(++tag);
      try {
        area.append(o.block, data, 0);
      } catch (e) {
        expect(isDeltavolError(e, 'SAVE_AREA_FULL'), String(e)).toBe(true);
        continue;
      }
      held.set(o.block, data);
      appended.push(o.block);
    } else if (o.k === 'sync') {
      const p = sync();
      if (o.wait) await p;
    } else if (o.k === 'tick') {
      await tick();
    } else {
      boot++;
      area.close();
      fsys = withFaults(fsys.crash(rng));
      fsys.syncFaults = null; // the open's own truncate+sync succeeds (a failure would fail the open)
      area = await SaveArea.open(fsys, NAME, SNAP_ID, BS, BLOCKS, BYTES_MAX);
      withFaults(fsys);
      const got = Buffer.alloc(BS);
      const reloaded = new Map<number, Buffer>();
      for (let b = 0; b < BLOCKS; b++) {
        if (!area.has(b)) {
          expect(acked.has(b), `block ${b}: its sync resolved, its before-image must survive`).toBe(false);
          continue;
        }
        area.readBlock(b, got, 0);
        expect(held.has(b), `block ${b} reloaded but not held at the crash`).toBe(true);
        expect(got.equals(held.get(b)!), `block ${b} reloads its before-image exactly`).toBe(true);
        reloaded.set(b, Buffer.from(got));
      }
      expect(area.bitmap.count()).toBe(area.slots);
      held = reloaded;
      acked = new Set(reloaded.keys());
      appended = [];
    }
  }
}

describe('SaveArea crash safety', () => {
  const ops = fc.array(opArb, { minLength: 20, maxLength: 80 });

  it('reloads every before-image whose sync resolved, exactly, and nothing it did not hold, across crashes', async () => {
    const seed = testSeed('save-area crash');
    await fc.assert(
      fc.asyncProperty(ops, fc.integer(), (o, crashSeed) => runSequence(o, crashSeed, 0)),
      { seed, numRuns: RUNS },
    );
  });

  it('never resolves a sync as covering records an earlier failed fsync lost', async () => {
    const seed = testSeed('save-area crash with failed syncs');
    await fc.assert(
      fc.asyncProperty(ops, fc.integer(), (o, crashSeed) => runSequence(o, crashSeed, 0.15)),
      { seed, numRuns: RUNS },
    );
  });
});

describe('a save area whose fsync failed', () => {
  it('invalidates its snapshot, as a full one does; the snapshot never reads later data and writes go on', async () => {
    const fsys = new SimFs();
    const data = new SimVolumeData(16 * BS);
    const options = { blockBytes: BS, saveAreaBytesMax: 1 << 30 };
    const engine = await VolumeEngine.create(fsys, data, options);
    await engine.write(0, [Buffer.alloc(2 * BS, 0x11)]);
    await engine.createSnapshot('s');
    // Block 0's before-image never reaches the disk, and its fsync says so.
    fsys.syncFaults = { fails: (name) => name === 'snap-1.save', rng: () => 0 };
    await expect(engine.write(0, [Buffer.alloc(BS, 0x22)])).rejects.toThrow(/EIO/);
    expect(data.current[0]).toBe(0x11); // the overwrite was not issued
    fsys.syncFaults = null;
    // The next first write after the snapshot finds the area failed: the snapshot goes.
    await engine.write(BS, [Buffer.alloc(BS, 0x33)]);
    await engine.write(0, [Buffer.alloc(BS, 0x22)]);
    // Had a later fsync been taken to cover block 0's lost record, block 1's record would
    // be dropped with it at the next open and the snapshot would read 0x33 there.
    const reopened = await VolumeEngine.open(fsys.crash(() => 0.9), data.crash(() => 0.9), options);
    if (reopened.listSnapshots()[0]!.valid) {
      const got = Buffer.alloc(2 * BS);
      reopened.readSnapshot('s', 0, 2 * BS, got);
      expect(got.equals(Buffer.alloc(2 * BS, 0x11)), 'a valid snapshot reads what it was taken with').toBe(true);
    }
    expect(engine.listSnapshots()[0]!.valid).toBe(false);
    expect(reopened.listSnapshots()[0]!.valid).toBe(false);
  });
});
