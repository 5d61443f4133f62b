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

type BitmapOp = { k: 'set' | 'clear'; bit: number; n: number } | { k: 'stage' } | { k: 'sync' } | { k: 'crash' };

const bitmapOps = fc.array(
  fc.oneof(
    { weight: 4, arbitrary: fc.record({ k: fc.constant('set' as const), bit: fc.integer({ min: 0, max: BITS - 1 }), n: fc.integer({ min: 1, max: 5000 }) }) },
    { weight: 1, arbitrary: fc.record({ k: fc.constant('clear' as const), bit: fc.integer({ min: 0, max: BITS - 1 }), n: fc.integer({ min: 1, max: 5000 }) }) },
    { weight: 3, arbitrary: fc.constant({ k: 'stage' as const }) },
    { weight: 2, arbitrary: fc.constant({ k: 'sync' as const }) },
    { weight: 2, arbitrary: fc.constant({ k: 'crash' as const }) },
  ),
  { minLength: 20, maxLength: 60 },
);

/** Random stages, syncs (a share of them failing) and crashes; every reload is checked. */
async function bitmapCrashRun(ops: BitmapOp[], crashSeed: number, syncFail: number): Promise<void> {
  const rng = prng(crashSeed);
  const withFaults = (f: SimFs) => {
    if (syncFail > 0) f.syncFaults = { fails: () => rng() < syncFail, rng };
    return f;
  };
  let fsys = new SimFs();
  let file = await BitmapFile.create(fsys, 'b.bm', BITS);
  withFaults(fsys);
  let bm = new PagedBitmap(BITS, { trackDirty: true });
  const pages = bm.pageTotal;
  // Per page: allowed reload values (durable one first, then staged ones).
  let allowed: string[][] = Array.from({ length: pages }, () => ['']);
  for (const o of ops) {
    if (o.k === 'set') bm.setRange(o.bit, Math.min(o.n, BITS - o.bit));
    else if (o.k === 'clear') bm.clearRange(o.bit, Math.min(o.n, BITS - o.bit));
    else if (o.k === 'stage') {
      const dirty = bm.takeDirtyPages();
      try {
        for (const p of dirty) {
          file.writePage(p, bm.page(p));
          allowed[p]!.push(pageKey(bm, p));
        }
      } catch (e) {
        expect(String(e)).toMatch(/failed earlier/); // after a failed sync: refused until reopened
      }
    } else if (o.k === 'sync') {
      try {
        await file.sync();
        allowed = allowed.map((a) => [a[a.length - 1]!]);
      } catch (e) {
        expect(String(e)).toMatch(/EIO|failed earlier/); // what was staged may or may not be there
      }
    } else {
      fsys = fsys.crash(rng);
      const opened = BitmapFile.open(fsys, 'b.bm');
      file = opened.file;
      await file.repair();
      withFaults(fsys);
      opened.bitmap.invariants();
      for (let p = 0; p < pages; p++) expect(allowed[p]).toContain(pageKey(opened.bitmap, p));
      bm = opened.bitmap;
      allowed = Array.from({ length: pages }, (_, p) => [pageKey(bm, p)]);
    }
  }
}

describe('BitmapFile', () => {
  it('reloads each page as its last synced value or a value staged after it, across random crashes', async () => {
    const seed = testSeed('bitmap-file crash');
    await fc.assert(
      fc.asyncProperty(bitmapOps, fc.integer(), (ops, crashSeed) => bitmapCrashRun(ops, crashSeed, 0)),
      { seed, numRuns: 300 },
    );
  });

  it('does the same when fsyncs fail', async () => {
    const seed = testSeed('bitmap-file crash with failed syncs');
    await fc.assert(
      fc.asyncProperty(bitmapOps, fc.integer(), (ops, crashSeed) => bitmapCrashRun(ops, crashSeed, 0.15)),
      { seed, numRuns: 300 },
    );
  });

  it('after a failed fsync, never takes a later fsync as covering the lost page, nor rewrites its only durable record', async () => {
    const fsys = new SimFs();
    const file = await BitmapFile.create(fsys, 'f.bm', BITS);
    const bm = new PagedBitmap(BITS, { trackDirty: true });
    const runsOf = () => JSON.stringify(bm.runs().filter(([start]) => start < BITMAP_PAGE_BITS));
    bm.setRange(0, 100);
    file.writeDirty(bm);
    await file.sync();
    const allowed = [runsOf()]; // page 0's durable value, then values staged after it
    bm.setRange(100, 100);
    file.writeDirty(bm);
    allowed.push(runsOf());
    // That record never reaches the disk, and its fsync says so.
    fsys.syncFaults = { fails: () => true, rng: () => 0 };
    await expect(file.sync()).rejects.toThrow(/EIO/);
    fsys.syncFaults = null;
    try {
      // A later fsync that succeeds must not make the lost record page 0's durable one
      // (its next rewrite would then go over the only good record).
      bm.set(BITMAP_PAGE_BITS + 1);
      file.writeDirty(bm);
      await file.sync();
      bm.set(300);
      file.writeDirty(bm);
      allowed.push(runsOf());
    } catch (e) {
      expect(String(e)).toMatch(/failed earlier/); // the file refuses everything until reopened
    }
    // The machine dies while that rewrite is on its way: only its first sector lands.
    const fates = [0.5, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9];
    const { bitmap } = BitmapFile.open(fsys.crash(() => fates.shift() ?? 0.9), 'f.bm');
    expect(allowed).toContain(JSON.stringify(bitmap.runs().filter(([start]) => start < BITMAP_PAGE_BITS)));
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
