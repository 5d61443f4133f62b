// Why: a partial cut (a set of at most N blocks) splits the change log page-wise
// (PagedBitmap.endOfFirst, then clearRange on each side). A block left on both sides would be
// shipped twice, one on neither side would never be shipped; the engine test that races
// writes against builds cannot tell the first from a racing write. Seeded random logs, with
// scattered (sparse) and dense pages across several pages, checked against a plain model.
import { describe, expect, it } from 'vitest';
import { ChangeLog } from '../../../src/changelog/change-log.js';
import { BITMAP_PAGE_BITS } from '../../../src/bitmap/paged-bitmap.js';
import { prng, testSeed } from '../../helpers/seed.js';
import { runsOfBits } from '../../helpers/bit-runs.js';

const BLOCKS = 3 * BITMAP_PAGE_BITS + 777;

describe('change log: partial cuts', () => {
  it('a set of at most blocksMax blocks takes the first ones in block order, and only those leave the log', () => {
    const seed = testSeed('change-log partial cut');
    const rnd = prng(seed);
    for (let round = 0; round < 60; round++) {
      const log = new ChangeLog(BLOCKS);
      const model = new Set<number>();
      // Scattered blocks, some dense stretches, sometimes the last block.
      const scattered = Math.floor(rnd() * 3000);
      for (let i = 0; i < scattered; i++) model.add(Math.floor(rnd() * BLOCKS));
      for (let i = Math.floor(rnd() * 3); i > 0; i--) {
        const start = Math.floor(rnd() * BLOCKS);
        const count = Math.min(BLOCKS - start, 1 + Math.floor(rnd() * 5000));
        for (let b = start; b < start + count; b++) model.add(b);
      }
      if (rnd() < 0.2) model.add(BLOCKS - 1);
      if (model.size === 0) model.add(0);
      for (const b of model) log.markChanged(b, b);
      const sorted = [...model].sort((x, y) => x - y);
      const blocksMax = rnd() < 0.1 ? sorted.length - 1 || 1 : 1 + Math.floor(rnd() * sorted.length);
      const frozen = log.cut(round + 1, { blocksMax });
      const want = sorted.slice(0, Math.min(blocksMax, sorted.length));
      const rest = sorted.slice(want.length);
      expect(frozen.count(), `seed ${seed} round ${round}`).toBe(want.length);
      expect(frozen.runs()).toEqual(runsOfBits(want));
      expect(log.active.count()).toBe(rest.length);
      expect(log.active.runs()).toEqual(runsOfBits(rest));
    }
  });
});
