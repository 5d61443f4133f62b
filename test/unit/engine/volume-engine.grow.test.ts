// Why: volumes grow (`volume resize`); every bitmap, file and snapshot must follow, a
// snapshot taken before must read the new region as a hole, and a crash between growing
// the data and growing the bitmaps must be finished by the next open.
import { describe, expect, it } from 'vitest';
import { VolumeEngine, type EngineOptions } from '../../../src/volume/volume-engine.js';
import { SimFs } from '../../helpers/sim-fs.js';
import { SimVolumeData } from '../../helpers/sim-volume-data.js';
import { prng, testSeed } from '../../helpers/seed.js';

const BS = 4096;
const OLD = 10 * BS + 2048;
const NEW = 30 * BS;
const options: EngineOptions = { blockBytes: BS, saveAreaBytesMax: 1 << 30, activityExtentBytes: 4 * BS, activityHotMax: 4 };

function readAll(engine: VolumeEngine, snap: string | null, size: number): Buffer {
  const out = Buffer.alloc(size);
  if (snap === null) engine.read(0, size, out);
  else engine.readSnapshot(snap, 0, size, out);
  return out;
}

describe('volume engine growth', () => {
  it('grows every bitmap; older snapshots read the new region as holes; differentials span it', async () => {
    const fsys = new SimFs();
    const data = new SimVolumeData(OLD);
    let engine = await VolumeEngine.create(fsys, data, options);
    await engine.write(0, [Buffer.alloc(OLD, 1)]);
    await engine.createSnapshot('a');
    const a = Buffer.alloc(NEW);
    a.fill(1, 0, OLD);
    data.grow(NEW);
    await engine.grow();
    expect(engine.blocksTotal).toBe(30);
    await engine.write(5 * BS, [Buffer.alloc(20 * BS, 2)]);
    await engine.createSnapshot('b');
    const b = readAll(engine, null, NEW);
    expect(readAll(engine, 'a', NEW).equals(a)).toBe(true);
    expect(engine.listSnapshots().map((s) => s.sizeBytes)).toEqual([OLD, NEW]);
    const copy = Buffer.from(a);
    for (const run of engine.differentialStream('a', 'b')) {
      if (run.data) run.data.copy(copy, run.offsetBytes);
      else copy.fill(0, run.offsetBytes, run.offsetBytes + run.lengthBytes);
    }
    expect(copy.equals(b)).toBe(true);
    await engine.close();
    engine = await VolumeEngine.open(fsys, data, options);
    expect(readAll(engine, 'a', NEW).equals(a)).toBe(true);
    expect(readAll(engine, 'b', NEW).equals(b)).toBe(true);
    engine.invariants();
  });

  it('finishes a growth cut short by a crash', async () => {
    const seed = testSeed('engine grow crash');
    const rng = prng(seed);
    for (let round = 0; round < 20; round++) {
      const fsys = new SimFs();
      const data = new SimVolumeData(OLD);
      const engine = await VolumeEngine.create(fsys, data, options);
      await engine.write(0, [Buffer.alloc(OLD, 1)]);
      await engine.createSnapshot('a');
      data.grow(NEW);
      const g = engine.grow(); // the machine dies during (or before) the bitmaps' growth
      g.catch(() => undefined);
      for (let i = Math.floor(rng() * 4); i > 0; i--) await new Promise((r) => setImmediate(r));
      const reopened = await VolumeEngine.open(fsys.crash(rng), data.crash(rng), options);
      expect(reopened.blocksTotal).toBe(30);
      const a = Buffer.alloc(NEW);
      a.fill(1, 0, OLD);
      expect(readAll(reopened, 'a', NEW).equals(a)).toBe(true);
      await reopened.write(25 * BS, [Buffer.alloc(BS, 3)]);
      expect(reopened.changeLog.pending().test(25)).toBe(true);
      reopened.invariants();
    }
  });
});
