// Why: the snapshot facility's two merges, shown on small hand-built cases: a full save
// area invalidates its snapshot after handing its older neighbour the before-images that
// neighbour read through it (so the neighbour reads as before); deleting a middle
// snapshot keeps both neighbours intact; deleting any snapshot moves no data (it is
// hidden while older ones read through it, and leaves when nothing does).
import { describe, expect, it } from 'vitest';
import { VolumeEngine, type EngineOptions } from '../../../src/volume/volume-engine.js';
import { SimFs } from '../../helpers/sim-fs.js';
import { SimVolumeData } from '../../helpers/sim-volume-data.js';

const BS = 4096;
const SIZE = 32 * BS;

async function engineWith(saveBlocksMax: number) {
  const fsys = new SimFs();
  const data = new SimVolumeData(SIZE);
  const warnings: unknown[] = [];
  const options: EngineOptions = { blockBytes: BS, saveAreaBytesMax: saveBlocksMax * (BS + 32), warn: (m, f) => void warnings.push({ m, f }) };
  const engine = await VolumeEngine.create(fsys, data, options);
  return { engine, warnings, fsys, data, options };
}

async function fill(engine: VolumeEngine, first: number, count: number, value: number) {
  for (let b = first; b < first + count; b++) await engine.write(b * BS, [Buffer.alloc(BS, value)]);
}

/**
 * Records every snapshot file removed while the manifest still names its snapshot as valid: a crash
 * right after such a remove leaves a manifest that cannot be opened (METADATA_CORRUPT).
 */
function watchRemovals(fsys: SimFs): string[] {
  const early: string[] = [];
  const remove = fsys.remove.bind(fsys);
  fsys.remove = (name: string) => {
    const id = /^snap-(\d+)\./.exec(name)?.[1];
    const manifest = fsys.readAll('snapshots.json');
    if (id !== undefined && manifest !== null) {
      // Only a valid entry's files are opened (an invalid snapshot stays listed without them).
      const m = JSON.parse(manifest.toString('utf8')) as { snapshots: { id: number; valid: boolean }[] };
      if (m.snapshots.some((x) => x.id === Number(id) && x.valid)) early.push(name);
    }
    remove(name);
  };
  return early;
}

function blockValues(engine: VolumeEngine, snap: string, first: number, count: number): number[] {
  const out: number[] = [];
  const buf = Buffer.alloc(BS);
  for (let b = first; b < first + count; b++) {
    engine.readSnapshot(snap, b * BS, BS, buf);
    expect(buf.every((x) => x === buf[0])).toBe(true);
    out.push(buf[0]!);
  }
  return out;
}

describe('snapshot queue merges', () => {
  it('a full tail hands its older neighbour what it needs, then only it becomes invalid', async () => {
    const { engine, warnings, fsys } = await engineWith(6);
    const early = watchRemovals(fsys);
    await fill(engine, 0, 10, 1); // blocks 0-9 hold 1
    await engine.createSnapshot('a');
    await fill(engine, 10, 3, 2); // 10-12 hold data only after a
    await engine.createSnapshot('b');
    await fill(engine, 0, 3, 3); // b saves 0-2 (a reads them through b)
    await fill(engine, 10, 3, 4); // b saves 10-12: b is full (6)
    await fill(engine, 13, 1, 5); // 13 was a hole in b: nothing to save
    await fill(engine, 3, 1, 6); // b must save 3: full → b invalid, 0-2 move into a
    expect(engine.listSnapshots().map((s) => [s.name, s.valid])).toEqual([
      ['a', true],
      ['b', false],
    ]);
    expect(warnings.length).toBe(1);
    expect(blockValues(engine, 'a', 0, 14)).toEqual([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]);
    // a is the tail again: a later overwrite of 5 is saved there.
    await fill(engine, 5, 1, 7);
    expect(blockValues(engine, 'a', 5, 1)).toEqual([1]);
    engine.invariants();
    expect(early).toEqual([]);
  });

  it('deleting a middle snapshot keeps the older and newer ones intact', async () => {
    const { engine } = await engineWith(1000);
    await fill(engine, 0, 8, 1);
    await engine.createSnapshot('s1');
    await fill(engine, 0, 2, 2);
    await engine.createSnapshot('s2');
    await fill(engine, 2, 2, 3); // s2 saves 2-3, which s1 reads through s2
    await engine.createSnapshot('s3');
    await fill(engine, 0, 4, 4);
    await engine.deleteSnapshot('s2');
    expect(blockValues(engine, 's1', 0, 8)).toEqual([1, 1, 1, 1, 1, 1, 1, 1]);
    expect(blockValues(engine, 's3', 0, 8)).toEqual([2, 2, 3, 3, 1, 1, 1, 1]);
    const { data, zero } = engine.differential('s1', 's3');
    expect(data.runs()).toEqual([[0, 4]]);
    expect(zero.count()).toBe(0);
    engine.invariants();
  });

  it('deleting the newest snapshot copies nothing: it is hidden while an older one reads through it, then leaves', async () => {
    const { engine, fsys } = await engineWith(1000);
    await fill(engine, 0, 8, 1);
    await engine.createSnapshot('s1');
    await fill(engine, 0, 2, 2);
    await engine.createSnapshot('s2');
    await fill(engine, 2, 4, 3); // s2 saves 2-5, which s1 reads through s2
    const savedBefore = engine.listSnapshots().map((x) => x.savedBlocks);
    expect(savedBefore).toEqual([2, 4]);
    await engine.deleteSnapshot('s2');
    // Nothing moved into s1: the merge copied 4 blocks here before.
    expect(engine.listSnapshots().map((x) => [x.name, x.savedBlocks])).toEqual([['s1', 2]]);
    expect(blockValues(engine, 's1', 0, 8)).toEqual([1, 1, 1, 1, 1, 1, 1, 1]);
    // The hidden snapshot is still the tail: a later overwrite is saved there, for s1.
    await fill(engine, 6, 1, 4);
    expect(blockValues(engine, 's1', 0, 8)).toEqual([1, 1, 1, 1, 1, 1, 1, 1]);
    // Its name is free again, and the new one reads the volume as it is now.
    await engine.createSnapshot('s2');
    await fill(engine, 0, 8, 5);
    expect(blockValues(engine, 's2', 0, 8)).toEqual([2, 2, 3, 3, 3, 3, 4, 1]);
    expect(blockValues(engine, 's1', 0, 8)).toEqual([1, 1, 1, 1, 1, 1, 1, 1]);
    const { data } = engine.differential('s1', 's2');
    expect(data.runs()).toEqual([[0, 7]]);
    engine.invariants();
    // Deleting s1 leaves nothing reading through the hidden one: both go, files too.
    const snapFiles = () => fsys.list().filter((n) => n.startsWith('snap-')).sort();
    expect(snapFiles()).toEqual(['snap-1.meta', 'snap-1.save', 'snap-2.meta', 'snap-2.save', 'snap-3.meta', 'snap-3.save']);
    await engine.deleteSnapshot('s1');
    expect(engine.listSnapshots().map((x) => x.name)).toEqual(['s2']);
    expect(snapFiles()).toEqual(['snap-3.meta', 'snap-3.save']);
    expect(blockValues(engine, 's2', 0, 8)).toEqual([2, 2, 3, 3, 3, 3, 4, 1]);
    engine.invariants();
  });

  it('a hidden snapshot survives a restart, and the older one still reads through it', async () => {
    const { engine, fsys, data, options } = await engineWith(1000);
    await fill(engine, 0, 4, 1);
    await engine.createSnapshot('old');
    await engine.createSnapshot('gone');
    await fill(engine, 0, 4, 2); // 'gone' saves 0-3; 'old' reads them through it
    await engine.deleteSnapshot('gone');
    await engine.close();
    const reopened = await VolumeEngine.open(fsys, data, options);
    expect(reopened.listSnapshots().map((x) => x.name)).toEqual(['old']);
    expect(blockValues(reopened, 'old', 0, 4)).toEqual([1, 1, 1, 1]);
    await expect(reopened.deleteSnapshot('gone')).rejects.toMatchObject({ code: 'SNAPSHOT_NOT_FOUND' });
    reopened.invariants();
    await reopened.close();
  });

  it('a queue full of hidden snapshots makes room by merging the oldest hidden one into its older neighbour', async () => {
    const { engine, fsys } = await engineWith(100_000);
    const early = watchRemovals(fsys);
    await fill(engine, 0, 8, 1);
    await engine.createSnapshot('base');
    // 255 deleted snapshots that 'base' reads through (each saved the block written after it).
    for (let i = 0; i < 255; i++) {
      await engine.createSnapshot(`t${i}`);
      await fill(engine, i % 8, 1, 10 + (i % 200));
      await engine.deleteSnapshot(`t${i}`);
    }
    expect(engine.listSnapshots().map((x) => x.name)).toEqual(['base']);
    expect(engine.listSnapshots()[0]!.savedBlocks).toBe(0); // no copy so far
    await engine.createSnapshot('one-more'); // 256 in the queue: the oldest hidden one is merged
    const base = engine.listSnapshots().find((x) => x.name === 'base')!;
    expect(base.savedBlocks).toBe(1);
    expect(blockValues(engine, 'base', 0, 8)).toEqual([1, 1, 1, 1, 1, 1, 1, 1]);
    engine.invariants();
    // The merged snapshot's files went after the manifest stopped naming it.
    expect(early).toEqual([]);
  });
});
