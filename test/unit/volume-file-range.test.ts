// Why: a large READ reply leaves from the volume's file (sendfile) only when those file
// bytes are what a read returns and stay so while the reply is on its way. Volume.fileRange
// decides that; a wrong yes would show a replica's reader half a delta set, or send a hole's
// zeroes as data. This checks each refusal, and that a range it names holds the right bytes.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { VolumeRegistry } from '../../src/volume/registry.js';
import { syncIoBytesMaxDefault } from '../../src/util/limits.js';
import { silentLogger } from '../../src/util/log.js';
import type { Volume } from '../../src/volume/volume.js';

const MiB = 1024 * 1024;
const dirs: string[] = [];

async function volume(): Promise<{ v: Volume; registry: VolumeRegistry }> {
  const dir = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), 'file-range-'));
  dirs.push(dir);
  const registry = new VolumeRegistry(dir, { syncIoBytesMax: syncIoBytesMaxDefault }, silentLogger());
  await registry.load();
  const v = await registry.create({ name: 'v', sizeBytes: 8 * MiB });
  return { v, registry };
}

afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

describe('Volume.fileRange', () => {
  it('names written ranges in the data file; the bytes there, and its read(), are what a read returns', async () => {
    const { v } = await volume();
    const data = Buffer.alloc(2 * MiB);
    for (let i = 0; i < data.length; i++) data[i] = (i * 31 + (i >> 12)) & 0xff;
    await v.write(MiB, [data], false);
    const r = v.fileRange(MiB + 4096, MiB);
    expect(r).not.toBeNull();
    expect(r!.offset).toBe(MiB + 4096);
    expect(r!.length).toBe(MiB);
    const viaFd = Buffer.alloc(MiB);
    expect(fs.readSync(r!.fd, viaFd, 0, MiB, r!.offset)).toBe(MiB);
    expect(viaFd.equals(data.subarray(4096, 4096 + MiB))).toBe(true);
    expect(r!.read(1000, 5000).equals(data.subarray(4096 + 1000, 4096 + 6000))).toBe(true);
    await v.close();
    expect(() => r!.read(0, 10)).toThrow(/closed/);
  });

  it('refuses a range with a block that holds no data (a copying read sends it as a hole), and one outside the volume', async () => {
    const { v } = await volume();
    await v.write(0, [Buffer.alloc(MiB, 7)], false);
    expect(v.fileRange(0, MiB)).not.toBeNull();
    expect(v.fileRange(MiB - 4096, 8192)).toBeNull(); // its second block was never written
    await v.trim(0, 4096, false);
    expect(v.fileRange(0, MiB)).toBeNull(); // trimmed: no data again
    expect(() => v.fileRange(8 * MiB - 4096, 8192)).toThrow();
    await v.close();
  });

  it('refuses while client writes are held or refused (a replica plays sets into its file), through an overlay, and once closed', async () => {
    const { v } = await volume();
    await v.write(0, [Buffer.alloc(2 * MiB, 9)], false);
    expect(v.fileRange(0, MiB)).not.toBeNull();
    v.setWriteAccess({ mode: 'refuse', code: 'READ_ONLY_REPLICA', reason: 'a replica' });
    expect(v.fileRange(0, MiB)).toBeNull();
    v.setWriteAccess({ mode: 'hold', reason: 'a handover' });
    expect(v.fileRange(0, MiB)).toBeNull();
    v.setWriteAccess({ mode: 'open' });
    expect(v.fileRange(0, MiB)).not.toBeNull();
    v.setOverlay({ readBlock: () => false });
    expect(v.fileRange(0, MiB)).toBeNull();
    v.setOverlay(null);
    expect(v.fileRange(0, MiB)).not.toBeNull();
    await v.close();
    expect(v.fileRange(0, MiB)).toBeNull();
  });
});
