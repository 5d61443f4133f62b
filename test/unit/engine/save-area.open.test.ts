// Why: open() reads records in large batches; the first bad record must end the area
// wherever it falls (first in a batch, last in a batch, the very first record), the good
// records before it must all come back, and everything after it must be truncated away.
import { describe, expect, it } from 'vitest';
import { SaveArea } from '../../../src/snapshot/save-area.js';
import { SimFs } from '../../helpers/sim-fs.js';

const BS = 4096;
const STRIDE = BS + 32;
const RECORDS = 600; // more than two 1 MiB read batches (254 records each)
const NAME = 'snap-7.save';

function image(i: number): Buffer {
  const b = Buffer.alloc(BS);
  for (let j = 0; j < BS; j += 4) b.writeUInt32LE((i * 2654435761 + j) >>> 0, j);
  return b;
}

async function filled(): Promise<SimFs> {
  const fsys = new SimFs();
  const area = await SaveArea.create(fsys, NAME, 7, BS, 4 * RECORDS, 1 << 30);
  fsys.open(NAME, false).truncate(RECORDS * STRIDE); // sized once: the simulator then writes in place
  for (let i = 0; i < RECORDS; i++) area.append(3 * i + 1, image(i), 0);
  await area.sync();
  area.close();
  return fsys;
}

describe('SaveArea.open', () => {
  for (const bad of [0, 253, 254, 255, 508, RECORDS - 1, RECORDS]) {
    it(`keeps exactly the ${bad} records before the first bad one and truncates the rest`, async () => {
      const fsys = await filled();
      const file = fsys.files.get(NAME)!;
      if (bad < RECORDS) file.durable[bad * STRIDE + 32 + 100]! ^= 1; // one flipped data bit
      file.durable = Buffer.concat([file.durable, Buffer.alloc(STRIDE - 1, 0x5a)]); // and a partial tail
      file.current = Buffer.from(file.durable);
      const area = await SaveArea.open(fsys, NAME, 7, BS, 4 * RECORDS, 1 << 30);
      expect(area.slots).toBe(bad);
      expect(area.bitmap.count()).toBe(bad);
      const got = Buffer.alloc(BS);
      for (let i = 0; i < RECORDS; i++) {
        expect(area.has(3 * i + 1)).toBe(i < bad);
        if (i >= bad) continue;
        area.readBlock(3 * i + 1, got, 0);
        expect(got.equals(image(i)), `record ${i}`).toBe(true);
      }
      expect(file.durable.length).toBe(bad * STRIDE);
    });
  }
});
