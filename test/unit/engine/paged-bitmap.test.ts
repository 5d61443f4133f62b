// Why: the paged bitmap is under every change log and snapshot; a wrong bit silently
// loses a block from replication or a snapshot. Random operation sequences are checked
// against a plain Set after every step, with ranges drawn around page and word edges and
// bursts of bits that move pages between the sparse and dense forms.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { BITMAP_GROUP_PAGES, BITMAP_PAGE_BITS, BITMAP_PAGE_WORDS, PagedBitmap, SPARSE_BITS_MAX, SPARSE_BITS_MIN } from '../../../src/bitmap/paged-bitmap.js';
import { collectGarbage } from '../../../src/util/gc.js';
import { prng, testSeed } from '../../helpers/seed.js';
import { runsOfBits } from '../../helpers/bit-runs.js';

// Two full groups of the page table, three pages of a third and a partial page: the
// operations cross word, page and group edges.
const SIZE = BITMAP_PAGE_BITS * (2 * BITMAP_GROUP_PAGES + 3) + 1000;
const G = BITMAP_GROUP_PAGES;
const EDGE_PAGES = [0, 1, 2, 3, G - 1, G, G + 1, 2 * G - 1, 2 * G, 2 * G + 1, 2 * G + 3];

type Op =
  | { k: 'set' | 'clear' | 'test'; bit: number }
  | { k: 'setRange' | 'clearRange' | 'countRange'; start: number; count: number }
  | { k: 'union' | 'difference' | 'intersect'; bits: number[]; ranges: [number, number][] }
  | { k: 'clone' | 'clearAll' | 'dirty' | 'share' | 'swapShared' }
  // n bits of one page set or cleared one at a time (crosses the sparse/dense thresholds).
  | { k: 'burst'; page: number; n: number; clear: boolean; seed: number }
  // A page replaced from words, as when a bitmap file is read.
  | { k: 'loadPage'; page: number; n: number; seed: number };

// Positions cluster near word and page edges, where the bugs live.
const edge = fc.oneof(
  fc.integer({ min: 0, max: SIZE - 1 }),
  fc.constantFrom(...EDGE_PAGES).chain((p) => fc.integer({ min: -40, max: 40 }).map((d) => p * BITMAP_PAGE_BITS + d)),
  fc.constantFrom(0, 31, 32, 33, 63, 64, SIZE - 1, SIZE - 32, SIZE - 33),
).map((b) => Math.max(0, Math.min(SIZE - 1, b)));
const range = fc.tuple(edge, fc.oneof(fc.integer({ min: 0, max: 70 }), fc.integer({ min: 0, max: BITMAP_PAGE_BITS + 100 }))).map(([s, c]) => [s, Math.min(c, SIZE - s)] as [number, number]);
const op: fc.Arbitrary<Op> = fc.oneof(
  fc.record({ k: fc.constantFrom('set' as const, 'clear' as const, 'test' as const), bit: edge }),
  range.chain(([start, count]) => fc.constantFrom('setRange' as const, 'clearRange' as const, 'countRange' as const).map((k) => ({ k, start, count }))),
  fc.record({ k: fc.constantFrom('union' as const, 'difference' as const, 'intersect' as const), bits: fc.array(edge, { maxLength: 20 }), ranges: fc.array(range, { maxLength: 3 }) }),
  fc.record({ k: fc.constantFrom('clone' as const, 'clearAll' as const, 'dirty' as const, 'share' as const, 'swapShared' as const) }),
  {
    weight: 3,
    arbitrary: fc.record({
      k: fc.constant('burst' as const),
      // Few pages and one pattern per page, so a clearing burst often hits the bits a
      // setting burst set (dense → sparse), and counts near both thresholds.
      page: fc.constantFrom(0, G, 2 * G + 3),
      n: fc.oneof(fc.integer({ min: SPARSE_BITS_MIN - 10, max: SPARSE_BITS_MAX + 40 }), fc.integer({ min: SPARSE_BITS_MAX - 20, max: SPARSE_BITS_MAX + 40 })),
      clear: fc.boolean(),
      seed: fc.constant(0),
    }),
  },
  fc.record({ k: fc.constant('loadPage' as const), page: fc.constantFrom(...EDGE_PAGES), n: fc.constantFrom(0, 1, 5, SPARSE_BITS_MIN, SPARSE_BITS_MAX, SPARSE_BITS_MAX + 1, 2000), seed: fc.integer({ min: 0, max: 2 ** 31 - 1 }) }),
);

/**
 * Bits a burst or a loaded page touches: n distinct offsets of page p, every 1st, 2nd or
 * 3rd bit from a base. The same seed gives the same base and step whatever n, so a
 * clearing burst clears a prefix of what a setting burst set.
 */
function burstBits(page: number, n: number, seed: number): number[] {
  const rnd = prng(seed * 7919 + page);
  const step = 1 + Math.floor(rnd() * 3);
  const base = page * BITMAP_PAGE_BITS + Math.floor(rnd() * (BITMAP_PAGE_BITS - 3 * 2000));
  const out: number[] = [];
  for (let k = 0; k < n; k++) out.push(Math.min(SIZE - 1, base + k * step));
  return out;
}

/** Pages whose bits differ between two models. */
function changedPages(a: Set<number>, b: Set<number>): Set<number> {
  const out = new Set<number>();
  for (const x of a) if (!b.has(x)) out.add(Math.floor(x / BITMAP_PAGE_BITS));
  for (const x of b) if (!a.has(x)) out.add(Math.floor(x / BITMAP_PAGE_BITS));
  return out;
}

const runsOf = runsOfBits;

function build(bits: number[], ranges: [number, number][]): { bm: PagedBitmap; set: Set<number> } {
  const bm = new PagedBitmap(SIZE);
  const set = new Set<number>();
  for (const b of bits) {
    bm.set(b);
    set.add(b);
  }
  for (const [s, c] of ranges) {
    bm.setRange(s, c);
    for (let i = s; i < s + c; i++) set.add(i);
  }
  return { bm, set };
}

function check(bm: PagedBitmap, model: Set<number>, probes: number[]): void {
  bm.invariants();
  expect(bm.count()).toBe(model.size);
  expect(bm.runs()).toEqual(runsOf(model));
  // endOfFirst(n): one past the n-th set bit, for the first, the last and n taken from each probe.
  if (model.size > 0) {
    const sorted = [...model].sort((x, y) => x - y);
    for (const n of [1, sorted.length, ...probes.map((b) => 1 + (b % sorted.length))]) expect(bm.endOfFirst(n)).toBe(sorted[n - 1]! + 1);
    expect(() => bm.endOfFirst(sorted.length + 1)).toThrow();
  }
  expect(() => bm.endOfFirst(0)).toThrow();
  for (const b of probes) {
    expect(bm.test(b)).toBe(model.has(b));
    let next = -1;
    for (const m of model) if (m >= b && (next < 0 || m < next)) next = m;
    expect(bm.nextSet(b)).toBe(next);
    let clear = b;
    while (clear < SIZE && model.has(clear)) clear++;
    expect(bm.nextClear(b)).toBe(clear);
    // page() spells the page out as words, whichever form it is held in.
    const p = Math.floor(b / BITMAP_PAGE_BITS);
    const words = bm.page(p);
    let inPage = 0;
    let missing = -1;
    for (const m of model) {
      if (Math.floor(m / BITMAP_PAGE_BITS) !== p) continue;
      inPage++;
      const off = m - p * BITMAP_PAGE_BITS;
      if (!(words !== null && (words[off >>> 5]! & (1 << (off & 31))) !== 0)) missing = m;
    }
    expect(missing).toBe(-1);
    if (words === null) expect(inPage).toBe(0);
    else expect(words.reduce((n, w) => n + popcount(w), 0)).toBe(inPage);
    expect(bm.pageBitCount(p)).toBe(inPage);
  }
}

function popcount(w: number): number {
  let n = 0;
  for (; w !== 0; w &= w - 1) n++;
  return n;
}

describe('PagedBitmap', () => {
  it('matches a Set model under random operation sequences', () => {
    const seed = testSeed('paged-bitmap model');
    // Both forms and both conversions must happen in the run, or the test proves little.
    const seen = { sparse: 0, dense: 0, toDense: 0, toSparse: 0 };
    fc.assert(
      fc.property(fc.array(op, { minLength: 1, maxLength: 40 }), fc.array(edge, { minLength: 4, maxLength: 8 }), (ops, probes) => {
        let bm = new PagedBitmap(SIZE, { trackDirty: true });
        let model = new Set<number>();
        // The model when bm's dirty pages were last taken: every page changed since must be listed.
        let taken = new Set<number>();
        // Bitmaps sharing pages with bm (shareClone): each must keep its own contents.
        const sharers: { bm: PagedBitmap; model: Set<number>; taken: Set<number> }[] = [];
        for (const o of ops) {
          const denseBefore = bm.densePagesUsed;
          const pagesBefore = bm.pagesUsed;
          switch (o.k) {
            case 'set':
              expect(bm.set(o.bit)).toBe(!model.has(o.bit));
              model.add(o.bit);
              break;
            case 'clear':
              expect(bm.clear(o.bit)).toBe(model.has(o.bit));
              model.delete(o.bit);
              break;
            case 'test':
              expect(bm.test(o.bit)).toBe(model.has(o.bit));
              break;
            case 'setRange':
              bm.setRange(o.start, o.count);
              for (let i = o.start; i < o.start + o.count; i++) model.add(i);
              break;
            case 'clearRange':
              bm.clearRange(o.start, o.count);
              for (let i = o.start; i < o.start + o.count; i++) model.delete(i);
              break;
            case 'countRange': {
              let n = 0;
              for (let i = o.start; i < o.start + o.count; i++) if (model.has(i)) n++;
              expect(bm.countRange(o.start, o.count)).toBe(n);
              break;
            }
            case 'union':
            case 'difference':
            case 'intersect': {
              const other = build(o.bits, o.ranges);
              bm[o.k](other.bm);
              if (o.k === 'union') for (const b of other.set) model.add(b);
              else if (o.k === 'difference') for (const b of other.set) model.delete(b);
              else for (const b of [...model]) if (!other.set.has(b)) model.delete(b);
              other.bm.invariants();
              break;
            }
            case 'clone': {
              const c = bm.clone({ trackDirty: true });
              expect(c.equals(bm)).toBe(true);
              bm = c;
              taken = new Set();
              break;
            }
            case 'clearAll':
              bm.clearAll();
              model.clear();
              break;
            case 'share':
              sharers.push({ bm: bm.shareClone({ trackDirty: true }), model: new Set(model), taken: new Set() });
              break;
            case 'swapShared': {
              // Carry on mutating a sharer instead, so both sides of a share get changed.
              const other = sharers.pop();
              if (!other) break;
              sharers.push({ bm, model, taken });
              bm = other.bm;
              model = other.model;
              taken = other.taken;
              break;
            }
            case 'burst':
              // A clearing burst keeps the first n % 100 bits of the longest setting burst's
              // pattern, so a page made dense often drops to near the lower threshold.
              for (const b of o.clear ? burstBits(o.page, SPARSE_BITS_MAX + 40, o.seed).slice(o.n % 100) : burstBits(o.page, o.n, o.seed)) {
                if (o.clear) {
                  expect(bm.clear(b)).toBe(model.has(b));
                  model.delete(b);
                } else {
                  expect(bm.set(b)).toBe(!model.has(b));
                  model.add(b);
                }
              }
              break;
            case 'loadPage': {
              const words = new Uint32Array(BITMAP_PAGE_WORDS);
              const base = o.page * BITMAP_PAGE_BITS;
              for (const m of [...model]) if (Math.floor(m / BITMAP_PAGE_BITS) === o.page) model.delete(m);
              for (const b of burstBits(o.page, o.n, o.seed)) {
                if (b < base) continue; // clamped into the page before (the volume's last page is partial)
                words[(b - base) >>> 5]! |= 1 << ((b - base) & 31);
                model.add(b);
              }
              bm.loadPage(o.page, words);
              words.fill(0xffffffff); // the bitmap keeps no reference to the caller's words
              break;
            }
            case 'dirty': {
              // Every page changed since the last take is reported, once.
              const dirty = bm.takeDirtyPages();
              expect(new Set(dirty).size).toBe(dirty.length);
              for (const p of changedPages(taken, model)) expect(dirty).toContain(p);
              taken = new Set(model);
              expect(bm.dirtyPageCount).toBe(0);
              break;
            }
          }
          const denseAfter = bm.densePagesUsed;
          seen.dense += denseAfter;
          seen.sparse += bm.pagesUsed - denseAfter;
          // A dense page turned sparse (fewer dense pages, none released) or the other way.
          if (denseAfter < denseBefore && bm.pagesUsed >= pagesBefore && o.k !== 'swapShared' && o.k !== 'loadPage') seen.toSparse++;
          if (denseAfter > denseBefore && bm.pagesUsed <= pagesBefore && o.k !== 'swapShared' && o.k !== 'loadPage') seen.toDense++;
          check(bm, model, probes);
          for (const sh of sharers) {
            sh.bm.invariants();
            expect(sh.bm.runs()).toEqual(runsOf(sh.model));
          }
        }
      }),
      { seed, numRuns: 300 },
    );
    console.log('[forms] page-steps sparse/dense, conversions:', JSON.stringify(seen));
    for (const [what, n] of Object.entries(seen)) expect(n, what).toBeGreaterThan(0);
  });

  it('costs memory only for touched pages', () => {
    const oneTiBBlocks = 2 ** 40 / 4096;
    const bm = new PagedBitmap(oneTiBBlocks);
    const empty = bm.bytesUsed();
    expect(empty).toBeLessThan(1024); // the first level of the page table only
    // 1 GiB written contiguously: 262144 blocks = 8 dense pages, all in one group of the table.
    bm.setRange(1234 * 32768, 262144);
    expect(bm.pagesUsed).toBe(8);
    expect(bm.densePagesUsed).toBe(8);
    const groupBytes = BITMAP_GROUP_PAGES * 21;
    expect(bm.bytesUsed() - empty).toBe(8 * (4096 + 232) + groupBytes);
    bm.clearRange(1234 * 32768, 262144);
    expect(bm.pagesUsed).toBe(0);
    bm.invariants();
  });

  it('costs nothing in proportion to the volume size: a 16 TiB bitmap is made, scanned and cleared in microseconds', () => {
    const bits = 2 ** 32; // 16 TiB at 4 KiB blocks
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < 1000; i++) new PagedBitmap(bits);
    const makeNs = Number(process.hrtime.bigint() - t0) / 1000;
    const bm = new PagedBitmap(bits);
    expect(bm.bytesUsed()).toBeLessThan(4096);
    bm.set(bits - 1);
    bm.set(7);
    expect(bm.nextSet(8)).toBe(bits - 1);
    expect(bm.presentPages()).toEqual([0, bm.pageTotal - 1]);
    const t1 = process.hrtime.bigint();
    for (let i = 0; i < 1000; i++) {
      const c = bm.clone();
      c.clearAll();
    }
    const cloneNs = Number(process.hrtime.bigint() - t1) / 1000;
    // A flat table of 131072 entries took ~10 ms to make on a loaded machine; the two-level
    // table takes ~20 µs there. The bounds sit in between, far from both.
    expect(makeNs).toBeLessThan(2_000_000);
    expect(cloneNs).toBeLessThan(2_000_000);
    bm.invariants();
  });

  it('holds 1 GiB of scattered 4 KiB writes over 16 TiB in a few MiB (sparse pages), not 512 MiB', () => {
    const seed = testSeed('paged-bitmap scattered memory');
    const rnd = prng(seed);
    const bits = 2 ** 32;
    const writes = 262144;
    const picks = new Float64Array(writes);
    for (let k = 0; k < writes; k++) picks[k] = Math.floor(rnd() * bits);
    expect(collectGarbage()).toBe(true);
    const before = process.memoryUsage();
    const bm = new PagedBitmap(bits, { trackDirty: true });
    for (let k = 0; k < writes; k++) bm.set(picks[k]!);
    expect(collectGarbage()).toBe(true);
    const after = process.memoryUsage();
    const grownBytes = after.heapUsed - before.heapUsed + (after.arrayBuffers - before.arrayBuffers);
    console.log(`[memory] ${writes} scattered bits in 2^32: ${(grownBytes / 2 ** 20).toFixed(1)} MiB measured, ${(bm.bytesUsed() / 2 ** 20).toFixed(1)} MiB estimated, ${bm.pagesUsed} pages (${bm.densePagesUsed} dense)`);
    // One dense 4 KiB page per touched page was ~512 MiB (nearly all 131072 pages touched).
    expect(grownBytes).toBeLessThan(16 * 2 ** 20);
    expect(bm.bytesUsed()).toBeLessThan(16 * 2 ** 20);
    expect(bm.densePagesUsed).toBe(0);
    bm.invariants();
    // Sharing costs no page; every changed page is reported for persistence.
    const meta = bm.shareClone({ trackDirty: true });
    expect(meta.equals(bm)).toBe(true);
    expect(bm.takeDirtyPages().length).toBe(bm.pagesUsed);
  });

  it('works with bit indexes past 2^32 (a 64 TiB volume at 4 KiB blocks)', () => {
    const bits = 2 ** 34;
    const bm = new PagedBitmap(bits);
    const high = 2 ** 32 + 5 * BITMAP_PAGE_BITS - 3; // three bits below a page edge past 2^32
    bm.setRange(high, 10);
    bm.set(bits - 1);
    bm.set(7);
    expect(bm.test(high + 9)).toBe(true);
    expect(bm.test(high + 10 - 2 ** 32)).toBe(false);
    expect(bm.test(7 + 2 ** 32)).toBe(false);
    expect(bm.nextSet(8)).toBe(high);
    expect(bm.nextClear(high)).toBe(high + 10);
    expect(bm.runs()).toEqual([
      [7, 1],
      [high, 10],
      [bits - 1, 1],
    ]);
    expect(bm.countRange(high - 1, 12)).toBe(10);
    bm.clearRange(high + 2, 3);
    expect(bm.clear(bits - 1)).toBe(true);
    expect(bm.runs()).toEqual([
      [7, 1],
      [high, 2],
      [high + 5, 5],
    ]);
    bm.invariants();
  });

  it('reports pages changed since the last take, for persistence', () => {
    const bm = new PagedBitmap(BITMAP_PAGE_BITS * 4, { trackDirty: true });
    bm.set(5);
    bm.set(BITMAP_PAGE_BITS * 3 + 1);
    expect([...bm.takeDirtyPages()]).toEqual([0, 3]);
    bm.set(5); // no change, not dirty
    expect(bm.takeDirtyPages().length).toBe(0);
    bm.clear(5);
    expect([...bm.takeDirtyPages()]).toEqual([0]);
  });
});
