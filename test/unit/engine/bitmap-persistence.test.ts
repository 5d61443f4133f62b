// Why: a bitmap file must reload, after a crash at any point (compaction included), as a
// page-for-page choice between what was durable and what was being written; never a torn
// mix and never older than the last completed sync; and its size must follow what was
// written, not the bitmap's size. Version 1 files must still open. The activity log must
// reload with a superset of the extents whose commits completed, group many joins into
// one record, and evict cold extents in batches.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { BitmapFile, type BitmapFileOptions } from '../../../src/bitmap/bitmap-file.js';
import { ActivityLog } from '../../../src/bitmap/activity-log.js';
import { BITMAP_PAGE_BITS, BITMAP_PAGE_BYTES, PagedBitmap } from '../../../src/bitmap/paged-bitmap.js';
import type { DurableFs } from '../../../src/util/durable-fs.js';
import { SimFs } from '../../helpers/sim-fs.js';
import { writeBitmapV1, type V1Record } from '../../helpers/bitmap-v1.js';
import { prng, testSeed } from '../../helpers/seed.js';

const BITS = BITMAP_PAGE_BITS * 4 + 77;

function pageKey(bm: PagedBitmap, p: number): string {
  const page = bm.page(p);
  if (page === null) return '';
  const key = Buffer.from(page.buffer, page.byteOffset, page.byteLength);
  return key.equals(Buffer.alloc(BITMAP_PAGE_BYTES)) ? '' : key.toString('base64');
}

/** `inner` seen through a DurableFs that calls step() around every write, sync, rename and removal. */
function steppedFs(inner: SimFs, step: () => void): DurableFs {
  return {
    open(name, create) {
      step();
      const f = inner.open(name, create);
      return {
        name: f.name,
        sizeBytes: () => f.sizeBytes(),
        read: (position, target, offset, length) => f.read(position, target, offset, length),
        write(position, source, offset, length) {
          step();
          f.write(position, source, offset, length);
          step();
        },
        truncate(sizeBytes) {
          step();
          f.truncate(sizeBytes);
          step();
        },
        async sync() {
          step();
          await f.sync();
          step();
        },
        close: () => f.close(),
      };
    },
    exists: (name) => inner.exists(name),
    remove(name) {
      step();
      inner.remove(name);
      step();
    },
    rename(from, to) {
      step();
      inner.rename(from, to);
      step();
    },
    writeAtomic(name, data) {
      step();
      inner.writeAtomic(name, data);
      step();
    },
    readAll: (name) => inner.readAll(name),
    list: () => inner.list(),
  };
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

/** Opens a crashed image and checks every page is one of its allowed values; repair() and a reopen keep them. */
async function checkImage(img: SimFs, allowed: string[][], options: BitmapFileOptions): Promise<PagedBitmap> {
  const opened = BitmapFile.open(img, 'b.bm', options);
  opened.bitmap.invariants();
  for (let p = 0; p < allowed.length; p++) expect(allowed[p]).toContain(pageKey(opened.bitmap, p));
  return opened.bitmap;
}

interface RunOptions {
  syncFail: number;
  file: BitmapFileOptions;
  /** Also crash at every step of every sync (compactions included) and check each image. */
  everyStep: boolean;
}

/** Random stages, syncs (a share of them failing) and crashes; every reload is checked. */
async function bitmapCrashRun(ops: BitmapOp[], crashSeed: number, o: RunOptions): Promise<{ compactions: number }> {
  const rng = prng(crashSeed);
  let inner = new SimFs();
  let images: SimFs[] | null = null;
  const wrap = (f: SimFs): DurableFs => {
    inner = f;
    return o.everyStep ? steppedFs(f, () => images?.push(f.crash(rng))) : f;
  };
  const withFaults = (f: SimFs) => {
    if (o.syncFail > 0) f.syncFaults = { fails: () => rng() < o.syncFail, rng };
  };
  let file = await BitmapFile.create(wrap(inner), 'b.bm', BITS, o.file);
  withFaults(inner);
  let compactions = 0;
  let bm = new PagedBitmap(BITS, { trackDirty: true });
  const pages = bm.pageTotal;
  // Per page: allowed reload values (durable one first, then staged ones).
  let allowed: string[][] = Array.from({ length: pages }, () => ['']);
  for (const op of ops) {
    if (op.k === 'set') bm.setRange(op.bit, Math.min(op.n, BITS - op.bit));
    else if (op.k === 'clear') bm.clearRange(op.bit, Math.min(op.n, BITS - op.bit));
    else if (op.k === 'stage') {
      const dirty = bm.takeDirtyPages();
      try {
        for (const p of dirty) {
          // Sparse pages go either way: as words or as their offsets (the checkpoint's path).
          const offsets = bm.sparseOffsets(p);
          if (offsets !== null && rng() < 0.5) file.writeOffsets(p, offsets);
          else file.writePage(p, bm.page(p));
          allowed[p]!.push(pageKey(bm, p));
        }
      } catch (e) {
        expect(String(e)).toMatch(/failed earlier/); // after a failed sync: refused until reopened
      }
    } else if (op.k === 'sync') {
      // A crash at any step of this sync reloads a value allowed before it began.
      const beforeSync = allowed.map((a) => [...a]);
      images = [];
      const compactionsBefore = file.compactions;
      try {
        await file.sync();
        allowed = allowed.map((a) => [a[a.length - 1]!]);
      } catch (e) {
        expect(String(e)).toMatch(/EIO|failed earlier/); // what was staged may or may not be there
      }
      compactions += file.compactions - compactionsBefore;
      const taken = images;
      images = null;
      for (const img of taken) await checkImage(img, beforeSync, o.file);
    } else {
      const crashed = inner.crash(rng);
      bm = await checkImage(crashed, allowed, o.file);
      bm.takeDirtyPages();
      allowed = Array.from({ length: pages }, (_, p) => [pageKey(bm, p)]);
      file = BitmapFile.open(wrap(crashed), 'b.bm', o.file).file;
      withFaults(crashed);
      images = [];
      try {
        await file.repair(); // compacts: a crash at any step of it keeps what was loaded
      } catch (e) {
        expect(String(e)).toMatch(/EIO/); // the file refuses everything until reopened
      }
      compactions += file.compactions;
      const taken = images;
      images = null;
      for (const img of taken) await checkImage(img, allowed, o.file);
    }
  }
  return { compactions };
}
describe('BitmapFile', () => {
  it('reloads each page as its last synced value or a value staged after it, across random crashes', async () => {
    const seed = testSeed('bitmap-file crash');
    await fc.assert(
      fc.asyncProperty(bitmapOps, fc.integer(), (ops, crashSeed) => bitmapCrashRun(ops, crashSeed, { syncFail: 0, file: {}, everyStep: false }).then(() => undefined)),
      { seed, numRuns: 300 },
    );
  });

  it('does the same when fsyncs fail', async () => {
    const seed = testSeed('bitmap-file crash with failed syncs');
    await fc.assert(
      fc.asyncProperty(bitmapOps, fc.integer(), (ops, crashSeed) => bitmapCrashRun(ops, crashSeed, { syncFail: 0.15, file: {}, everyStep: false }).then(() => undefined)),
      { seed, numRuns: 300 },
    );
  });

  it('compacting at every chance, survives a crash at every step of every sync and compaction', async () => {
    const seed = testSeed('bitmap-file compaction crash at every step');
    let compactions = 0;
    await fc.assert(
      fc.asyncProperty(bitmapOps, fc.integer(), async (ops, crashSeed) => {
        compactions += (await bitmapCrashRun(ops, crashSeed, { syncFail: 0, file: { logBytesMin: 0 }, everyStep: true })).compactions;
      }),
      { seed, numRuns: 100 },
    );
    expect(compactions).toBeGreaterThan(50); // the property did exercise compaction
  });

  it('does the same when fsyncs fail', async () => {
    const seed = testSeed('bitmap-file compaction crash at every step, failed syncs');
    await fc.assert(
      fc.asyncProperty(bitmapOps, fc.integer(), (ops, crashSeed) => bitmapCrashRun(ops, crashSeed, { syncFail: 0.15, file: { logBytesMin: 0 }, everyStep: true }).then(() => undefined)),
      { seed, numRuns: 100 },
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

  it('stages a page given as offsets exactly as the same page given as words (same bytes on disk)', async () => {
    const seed = testSeed('bitmap-file offsets');
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ at: fc.integer({ min: 0, max: BITMAP_PAGE_BITS - 1 }), run: fc.integer({ min: 1, max: 40 }) }), { minLength: 1, maxLength: 60 }),
        async (spans) => {
          const bits = new Set<number>();
          for (const { at, run } of spans) for (let b = at; b < Math.min(BITMAP_PAGE_BITS, at + run); b++) bits.add(b);
          const offsets = [...bits].sort((a, b) => a - b);
          const words = new Uint32Array(BITMAP_PAGE_BYTES / 4);
          for (const o of offsets) words[o >>> 5]! |= 1 << (o & 31);
          const a = new SimFs();
          const b = new SimFs();
          const fa = await BitmapFile.create(a, 'x.bm', BITMAP_PAGE_BITS * 2);
          const fb = await BitmapFile.create(b, 'x.bm', BITMAP_PAGE_BITS * 2);
          fa.writePage(1, words);
          fb.writeOffsets(1, offsets);
          fb.writePage(1, words); // the latest record already says this: nothing staged
          await Promise.all([fa.sync(), fb.sync()]);
          expect(Buffer.compare(a.files.get('x.bm')!.durable, b.files.get('x.bm')!.durable)).toBe(0);
          expect(BitmapFile.open(b, 'x.bm').bitmap.runs().reduce((n, [, c]) => n + c, 0)).toBe(offsets.length);
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

  it('keeps the file small for scattered bits: 10000 bits over 2^32, synced every 100, under 1 MiB', async () => {
    const seed = testSeed('bitmap-file scattered');
    const rng = prng(seed);
    const fsys = new SimFs();
    const bits = 2 ** 32;
    const f = await BitmapFile.create(fsys, 'big.bm', bits);
    const bm = new PagedBitmap(bits, { trackDirty: true });
    const set: number[] = [];
    for (let i = 0; i < 10_000; i++) {
      const b = Math.floor(rng() * bits);
      bm.set(b);
      set.push(b);
      if (i % 100 === 99) {
        f.writeDirty(bm);
        await f.sync();
      }
    }
    expect(fsys.files.get('big.bm')!.durable.length).toBeLessThan(1024 * 1024);
    const { bitmap } = BitmapFile.open(fsys, 'big.bm');
    expect(bitmap.count()).toBe(bm.count());
    for (const b of set) expect(bitmap.test(b)).toBe(true);
    // Pages of a few bits load as offsets, as they were held before (no 4 KiB page each).
    expect(bitmap.densePagesUsed).toBe(0);
    bitmap.invariants();
  });

  it('compacts: many rewrites of a few pages keep the file near max(2 x live, the floor), and leave no temporary file', async () => {
    const seed = testSeed('bitmap-file compaction bound');
    const rng = prng(seed);
    const fsys = new SimFs();
    const bits = BITMAP_PAGE_BITS * 8;
    const logBytesMin = 64 * 1024;
    const f = await BitmapFile.create(fsys, 'c.bm', bits, { logBytesMin });
    const bm = new PagedBitmap(bits, { trackDirty: true });
    let sizeMax = 0;
    for (let i = 0; i < 3000; i++) {
      const b = Math.floor(rng() * bits);
      if (rng() < 0.3) bm.clearRange(b, Math.min(200, bits - b));
      else bm.setRange(b, Math.min(1 + Math.floor(rng() * 3), bits - b));
      f.writeDirty(bm);
      await f.sync();
      sizeMax = Math.max(sizeMax, fsys.files.get('c.bm')!.durable.length);
    }
    expect(f.compactions).toBeGreaterThan(3);
    // Live records are at most 8 dense pages; after each sync the log is within its bound.
    expect(sizeMax).toBeLessThanOrEqual(512 + Math.max(2 * 8 * (24 + BITMAP_PAGE_BYTES), logBytesMin));
    expect(fsys.list().sort()).toEqual(['c.bm']);
    const { bitmap, file } = BitmapFile.open(fsys, 'c.bm');
    for (let p = 0; p < bm.pageTotal; p++) expect(pageKey(bitmap, p)).toBe(pageKey(bm, p));
    await file.repair();
    expect(BitmapFile.open(fsys, 'c.bm').bitmap.count()).toBe(bm.count());
  });

  it('reads version 1 files (ping-pong slots, torn slots ignored) and rewrites them as version 2 at repair()', async () => {
    const fsys = new SimFs();
    const bits = BITMAP_PAGE_BITS * 5 + 123;
    const want = new PagedBitmap(bits);
    want.setRange(10, 3000);
    want.set(BITMAP_PAGE_BITS * 2 + 5);
    want.setRange(BITMAP_PAGE_BITS * 5, 123);
    const older = new PagedBitmap(bits);
    older.set(7);
    const records: V1Record[] = [
      [0, 0, older.page(0), 1], // page 0: an older generation in slot 0...
      [0, 1, Uint32Array.from(want.page(0)!), 2], // ...and the newer in slot 1
      [2, 1, Uint32Array.from(want.page(2)!), 9],
      [2, 0, older.page(0), 10], // page 2, slot 0: the newest generation, but torn below
      [5, 0, Uint32Array.from(want.page(5)!), 3],
    ];
    writeBitmapV1(fsys, 'old.bm', bits, records, [[2, 0]]);
    const opened = BitmapFile.open(fsys, 'old.bm');
    expect(opened.bitmap.bitsTotal).toBe(bits);
    expect(opened.bitmap.runs()).toEqual(want.runs());
    expect(() => opened.file.writePage(0, null)).toThrow(/repair/);
    await opened.file.repair();
    const data = fsys.files.get('old.bm')!.durable;
    expect(data.readUInt32LE(4)).toBe(2);
    expect(data.length).toBeLessThan(BITMAP_PAGE_BYTES);
    const again = BitmapFile.open(fsys, 'old.bm');
    expect(again.bitmap.runs()).toEqual(want.runs());
    // And it takes writes as version 2.
    await again.file.repair();
    again.bitmap.set(BITMAP_PAGE_BITS * 3);
    again.file.writeDirty(again.bitmap);
    await again.file.sync();
    expect(BitmapFile.open(fsys, 'old.bm').bitmap.runs()).toEqual(again.bitmap.runs());
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

  it('evicts cold extents in batches: writes to 1000 distinct extents cost one checkpoint per hotMax/8 of them', async () => {
    const fsys = new SimFs();
    let checkpoints = 0;
    const log = await ActivityLog.create(fsys, 'al', { extentsTotal: 100_000, extentBytes: 4 << 20, hotMax: 64, checkpoint: async () => void checkpoints++ });
    for (let e = 0; e < 1000; e++) {
      const w = log.ensure(e * 97, e * 97);
      if (w) await w;
      log.invariants();
      expect(log.hotExtents).toBeLessThanOrEqual(64);
    }
    // 936 extents had to leave; 8 at a time (one per write before).
    expect(checkpoints).toBeLessThanOrEqual(Math.ceil(936 / 8) + 1);
    expect(checkpoints).toBeGreaterThan(0);
  });
});
