// Why: a snapshot restore writes block by block through the write path and yields between
// blocks, so the snapshot queue may change under it: a delete of an older snapshot drops
// hidden ones from the front of the queue (indexes shift), a delete of the snapshot being
// restored removes it, and a save area that fills invalidates snapshots. The restore must
// keep reading the snapshot it was asked for, or stop with an error naming what happened;
// it must never go on from another snapshot's content.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { VolumeRegistry } from '../../../src/volume/registry.js';
import { syncIoBytesMaxDefault } from '../../../src/util/limits.js';
import { silentLogger } from '../../../src/util/log.js';
import { VolumeEngine, type EngineOptions } from '../../../src/volume/volume-engine.js';
import { isDeltavolError } from '../../../src/util/errors.js';
import { SimFs } from '../../helpers/sim-fs.js';
import { SimVolumeData } from '../../helpers/sim-volume-data.js';

const BS = 4096;
const BLOCKS = 64;
const SIZE = BLOCKS * BS;
const options: EngineOptions = { blockBytes: BS, saveAreaBytesMax: 1 << 30, activityExtentBytes: 4 * BS, activityHotMax: 4 };

function readAll(engine: VolumeEngine, snap: string | null): Buffer {
  const out = Buffer.alloc(SIZE);
  if (snap === null) engine.read(0, SIZE, out);
  else engine.readSnapshot(snap, 0, SIZE, out);
  return out;
}

/** Every block of the volume written with `tag` (each snapshot then differs in every block). */
async function fill(engine: VolumeEngine, tag: number): Promise<void> {
  for (let b = 0; b < BLOCKS; b++) await engine.write(b * BS, [Buffer.alloc(BS, (tag * 7 + b) & 0xff)]);
}

/** s1..s5, each taken after the volume was rewritten whole, then the volume rewritten again. */
async function fiveSnapshots(): Promise<{ engine: VolumeEngine; contents: Map<string, Buffer> }> {
  const engine = await VolumeEngine.create(new SimFs(), new SimVolumeData(SIZE), options);
  const contents = new Map<string, Buffer>();
  for (let i = 1; i <= 5; i++) {
    await fill(engine, i);
    await engine.createSnapshot(`s${i}`);
    contents.set(`s${i}`, readAll(engine, null));
  }
  await fill(engine, 6);
  return { engine, contents };
}

/** Lets a restore run a few blocks (each write settles in a turn or two). */
async function turns(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
}

describe('restore while the snapshot queue changes', () => {
  it('a delete that drops hidden snapshots from the front of the queue does not move the restore to another snapshot', async () => {
    const { engine, contents } = await fiveSnapshots();
    await engine.deleteSnapshot('s2'); // hidden: s1 reads through it
    const restoring = engine.restoreSnapshot('s3');
    await turns(6);
    // s1 leaves, and with it the hidden s2: s3 moves from queue index 2 to 0 (index 2 is now s5).
    await engine.deleteSnapshot('s1');
    expect(engine.listSnapshots().map((s) => s.name)).toEqual(['s3', 's4', 's5']);
    const r = await restoring;
    expect(r.blocksWritten).toBe(BLOCKS);
    expect(readAll(engine, null).equals(contents.get('s3')!)).toBe(true);
    // The other snapshots kept their content.
    for (const name of ['s3', 's4', 's5']) expect(readAll(engine, name).equals(contents.get(name)!), name).toBe(true);
  });

  it('a delete of the snapshot being restored stops the restore with SNAPSHOT_NOT_FOUND', async () => {
    const { engine, contents } = await fiveSnapshots();
    const restoring = engine.restoreSnapshot('s3');
    restoring.catch(() => undefined);
    await turns(6);
    await engine.deleteSnapshot('s3');
    await expect(restoring).rejects.toSatisfy((e) => isDeltavolError(e, 'SNAPSHOT_NOT_FOUND') && /deleted while it was being restored/.test((e as Error).message));
    // Nothing of another snapshot was written: every block is s3's or the volume's before.
    const now = readAll(engine, null);
    const before = Buffer.alloc(SIZE);
    for (let b = 0; b < BLOCKS; b++) before.fill((6 * 7 + b) & 0xff, b * BS, (b + 1) * BS);
    for (let b = 0; b < BLOCKS; b++) {
      const blk = now.subarray(b * BS, (b + 1) * BS);
      const ok = blk.equals(contents.get('s3')!.subarray(b * BS, (b + 1) * BS)) || blk.equals(before.subarray(b * BS, (b + 1) * BS));
      expect(ok, `block ${b}`).toBe(true);
    }
    for (const name of ['s1', 's2', 's4', 's5']) expect(readAll(engine, name).equals(contents.get(name)!), name).toBe(true);
  });
});

describe('a volume being restored', () => {
  it('refuses a plain delete of the snapshot it restores and a second restore; --force stops the restore', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'deltavol-restore-races-'));
    try {
      const registry = new VolumeRegistry(dir, { syncIoBytesMax: syncIoBytesMaxDefault }, silentLogger());
      await registry.load();
      const v = await registry.create({ name: 'v', sizeBytes: 16 * 1024 * 1024 });
      const chunk = Buffer.alloc(1024 * 1024, 1);
      for (let at = 0; at < v.sizeBytes; at += chunk.length) await v.write(at, [chunk], false);
      await v.createSnapshot('a');
      await v.createSnapshot('b');
      chunk.fill(2);
      for (let at = 0; at < v.sizeBytes; at += chunk.length) await v.write(at, [chunk], false);
      const restoring = v.restoreSnapshot('a', true);
      restoring.catch(() => undefined);
      await expect(v.deleteSnapshot('a', false)).rejects.toSatisfy((e) => isDeltavolError(e, 'VOLUME_BUSY') && /being restored/.test((e as Error).message));
      expect(() => v.restoreSnapshot('b', true)).toThrow(/being restored from snapshot a/);
      await v.deleteSnapshot('a', true);
      await expect(restoring).rejects.toSatisfy((e) => isDeltavolError(e, 'SNAPSHOT_NOT_FOUND'));
      // Once it ended, restores run again.
      await v.restoreSnapshot('b', true);
      const out = Buffer.alloc(4096);
      await v.read(v.sizeBytes - 4096, 4096, out);
      expect(out.every((x) => x === 1)).toBe(true);
      await registry.closeAll();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
