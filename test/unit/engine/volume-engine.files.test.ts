// Why: the engine on real files (nodeDurableFs and a FileStore), not simulations: files
// are created, reopened after a clean close, and recovered after an abandoned process
// state (no close), with snapshots and the change log intact.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { VolumeEngine, type EngineOptions } from '../../../src/volume/volume-engine.js';
import { fileStoreData } from '../../../src/volume/file-store-data.js';
import { nodeDurableFs } from '../../../src/util/durable-fs.js';
import { FileStore } from '../../../src/storage/file-store.js';
import { BitmapFile } from '../../../src/bitmap/bitmap-file.js';
import { writeBitmapAsV1 } from '../../helpers/bitmap-v1.js';

const BS = 4096;
const SIZE = 8 * 1024 * 1024;
const options: EngineOptions = { blockBytes: BS, saveAreaBytesMax: 1 << 30 };
const dirs: string[] = [];

afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

function setup() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'deltavol-engine-'));
  dirs.push(dir);
  FileStore.create(path.join(dir, 'data.img'), SIZE);
  const open = () => FileStore.open(path.join(dir, 'data.img'), { readOnly: false, syncIoBytesMax: 64 * 1024 });
  return { dir, open };
}

describe('volume engine on real files', () => {
  it('survives a clean close and an abandoned state with snapshots and pending blocks intact', async () => {
    const { dir, open } = setup();
    let store = open();
    let engine = await VolumeEngine.create(nodeDurableFs(dir), fileStoreData(store), options);
    await engine.write(0, [Buffer.alloc(3 * BS, 1)]);
    await engine.createSnapshot('one');
    await engine.write(BS, [Buffer.alloc(BS, 2)]);
    await engine.zero(2 * BS, BS);
    await engine.close();
    store.close();

    store = open();
    engine = await VolumeEngine.open(nodeDurableFs(dir), fileStoreData(store), options);
    const got = Buffer.alloc(3 * BS);
    engine.readSnapshot('one', 0, 3 * BS, got);
    expect(got.equals(Buffer.alloc(3 * BS, 1))).toBe(true);
    expect(engine.changeLog.pending().runs()).toEqual([[0, 3]]);
    expect(engine.validBlocks().runs()).toEqual([[0, 2]]);
    // Abandon without close (the process "dies"): the activity log brings the blocks back.
    await engine.write(1000 * BS, [Buffer.alloc(BS, 3)]);
    await store.flush();
    store.close();

    store = open();
    engine = await VolumeEngine.open(nodeDurableFs(dir), fileStoreData(store), options);
    expect(engine.changeLog.pending().test(1000)).toBe(true);
    expect(engine.validBlocks().test(1000)).toBe(true);
    engine.readSnapshot('one', 0, 3 * BS, got);
    expect(got.equals(Buffer.alloc(3 * BS, 1))).toBe(true);
    expect(engine.listSnapshots().map((s) => [s.name, s.savedBlocks])).toEqual([['one', 2]]);
    await engine.close();
    store.close();
    expect(fs.readdirSync(dir).sort()).toEqual(['activity.log', 'data.img', 'pending.bm', 'snap-1.meta', 'snap-1.save', 'snapshots.json', 'validity.bm', 'writes.journal']);
  });

  it('opens a volume whose bitmap files are version 1 (an upgrade) and rewrites its own as version 2', async () => {
    const { dir, open } = setup();
    let store = open();
    let engine = await VolumeEngine.create(nodeDurableFs(dir), fileStoreData(store), options);
    await engine.write(0, [Buffer.alloc(3 * BS, 1)]);
    await engine.createSnapshot('one');
    await engine.write(BS, [Buffer.alloc(BS, 2)]);
    await engine.write(1500 * BS, [Buffer.alloc(BS, 4)]);
    await engine.close();
    store.close();
    // What the previous version would have left: the same bitmaps in version 1 files.
    const fsys = nodeDurableFs(dir);
    for (const name of ['validity.bm', 'pending.bm', 'snap-1.meta']) {
      const { bitmap, file } = BitmapFile.open(fsys, name);
      file.close();
      writeBitmapAsV1(fsys, name, bitmap);
      expect(fs.readFileSync(path.join(dir, name)).readUInt32LE(4)).toBe(1);
    }

    store = open();
    engine = await VolumeEngine.open(nodeDurableFs(dir), fileStoreData(store), options);
    expect(engine.changeLog.pending().runs()).toEqual([[0, 3], [1500, 1]]);
    expect(engine.validBlocks().runs()).toEqual([[0, 3], [1500, 1]]);
    const got = Buffer.alloc(3 * BS);
    engine.readSnapshot('one', 0, 3 * BS, got);
    expect(got.equals(Buffer.alloc(3 * BS, 1))).toBe(true);
    await engine.write(2000 * BS, [Buffer.alloc(BS, 5)]);
    await engine.close();
    store.close();
    for (const name of ['validity.bm', 'pending.bm']) expect(fs.readFileSync(path.join(dir, name)).readUInt32LE(4)).toBe(2);

    store = open();
    engine = await VolumeEngine.open(nodeDurableFs(dir), fileStoreData(store), options);
    expect(engine.changeLog.pending().runs()).toEqual([[0, 3], [1500, 1], [2000, 1]]);
    await engine.close();
    store.close();
  });
});
