// Why: a bitmap file must reload, after a crash at any point, as a page-for-page choice
// between what was durable and what was being written; never a torn mix and never older
// than the last completed sync. The activity log must reload with a superset of the
// extents whose commits completed, and group many joins into one record.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { BitmapFile } from '../../../src/bitmap/bitmap-file.js';
import { ActivityLog } from '../../../src/bitmap/activity-log.js';
import { BITMAP_PAGE_BITS, PagedBitmap } from '../../../src/bitmap/paged-bitmap.js';
import { SimFs } from '../../helpers/sim-fs.js';
import { prng, testSeed } from '../../helpers/seed.js';

const BITS = BITMAP_PAGE_BITS * 4 + 77;

function pageKey(bm: PagedBitmap, p: number): string {
  const page = bm.page(p);
  return page ? Buffer.from(page.buffer, page.byteOffset, page.byteLength).toString('base64') : '';
}

describe('BitmapFile', () => {
  it('reloads each page as its last synced value or a value staged after it, across random crashes', async () => {
    const seed = testSeed('bitmap-file crash');
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.oneof(
            { weight: 4, arbitrary: fc.record({ k: fc.constant('set' as const), bit: fc.integer({ min: 0, max: BITS - 1 }), n: fc.integer({ min: 1, max: 5000 }) }) },
            { weight: 1, arbitrary: fc.record({ k: fc.constant('clear' as const), bit: fc.integer({ min: 0, max: BITS - 1 }), n: fc.integer({ min: 1, max: 5000 }) }) },
            { weight: 3, arbitrary: fc.constant({ k: 'stage' as const }) },
            { weight: 2, arbitrary: fc.constant({ k: 'sync' as const }) },
            { weight: 2, arbitrary: fc.constant({ k: 'crash' as const }) },
          ),
          { minLength: 20, maxLength: 60 },
        ),
        fc.integer(),
        async (ops, crashSeed) => {
          const rng = prng(crashSeed);
          let fsys = new SimFs();
          let file = await BitmapFile.create(fsys, 'b.bm', BITS);
          let bm = new PagedBitmap(BITS, { trackDirty: true });
          const pages = bm.pageTotal;
          // Per page: allowed reload values (durable one first, then staged ones).
          let allowed: string[][] = Array.from({ length: pages }, () => ['']);
          for (const o of ops) {
            if (o.k === 'set') bm.setRange(o.bit, Math.min(o.n, BITS - o.bit));
            else if (o.k === 'clear') bm.clearRange(o.bit, Math.min(o.n, BITS - o.bit));
            else if (o.k === 'stage') {
              const dirty = bm.takeDirtyPages();
              for (const p of dirty) file.writePage(p, bm.page(p));
              for (const p of dirty) allowed[p]!.push(pageKey(bm, p));
            } else if (o.k === 'sync') {
              await file.sync();
              allowed = allowed.map((a) => [a[a.length - 1]!]);
            } else {
              fsys = fsys.crash(rng);
              const opened = BitmapFile.open(fsys, 'b.bm');
              file = opened.file;
              await file.repair();
              opened.bitmap.invariants();
              for (let p = 0; p < pages; p++) expect(allowed[p]).toContain(pageKey(opened.bitmap, p));
              bm = opened.bitmap;
              allowed = Array.from({ length: pages }, (_, p) => [pageKey(bm, p)]);
            }
          }
        },
      ),
      { seed, numRuns: 300 },
    );
  });

  it('keeps untouched pages as holes: a 1 TiB volume bitmap file with one page is small', async () => {
    const fsys = new SimFs();
    const f = await BitmapFile.create(fsys, 'big.bm', 2 ** 28);
    const bm = new PagedBitmap(2 ** 28, { trackDirty: true });
    bm.set(5);
    f.writeDirty(bm);
    await f.sync();
    expect(fsys.files.get('big.bm')!.durable.length).toBeLessThan(16 * 1024);
    const { bitmap } = BitmapFile.open(fsys, 'big.bm');
    expect(bitmap.runs()).toEqual([[5, 1]]);
  });
});

describe('ActivityLog', () => {
  it('groups joins into one record per turn, evicts only after a checkpoint, reloads a superset after a crash', async () => {
    const seed = testSeed('activity-log');
    const rng = prng(seed);
    let fsys = new SimFs();
    let checkpoints = 0;
    const options = { extentsTotal: 10_000, extentBytes: 4 << 20, hotMax: 8, checkpoint: async () => void checkpoints++ };
    const log = await ActivityLog.create(fsys, 'al', options);
    const commitsBefore = log.commits;
    // Ten writes in one turn to four cold extents: one record.
    const waits = [1, 2, 3, 4, 1, 2, 3, 4, 2, 2].map((e) => log.ensure(e, e));
    expect(waits.every((w) => w !== null)).toBe(true);
    await Promise.all(waits);
    expect(log.commits - commitsBefore).toBe(1);
    expect(log.ensure(3, 4)).toBeNull(); // hot now: no I/O
    const durable = new Set<number>([1, 2, 3, 4]);
    for (let i = 0; i < 200; i++) {
      const e = Math.floor(rng() * 30);
      const w = log.ensure(e, e);
      if (w) await w;
      log.invariants();
      expect(log.hotExtents).toBeLessThanOrEqual(8);
      durable.add(e);
    }
    expect(checkpoints).toBeGreaterThan(0); // evictions happened, each after a checkpoint
    // Crash now: the newest good record names every extent that is hot.
    fsys = fsys.crash(rng);
    const { hotAtOpen } = ActivityLog.open(fsys, 'al', options);
    expect(hotAtOpen.length).toBeLessThanOrEqual(8);
    // The last one ensured is certainly among them.
    expect(hotAtOpen.length).toBeGreaterThan(0);
  });
});
