// Why: the paged bitmap is under every change log and snapshot; a wrong bit silently
// loses a block from replication or a snapshot. Random operation sequences are checked
// against a plain Set after every step, with ranges drawn around page and word edges.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { BITMAP_GROUP_PAGES, BITMAP_PAGE_BITS, BITMAP_PAGE_BYTES, PagedBitmap } from '../../../src/bitmap/paged-bitmap.js';
import { testSeed } from '../../helpers/seed.js';

// Two full groups of the page table, three pages of a third and a partial page: the
// operations cross word, page and group edges.
const SIZE = BITMAP_PAGE_BITS * (2 * BITMAP_GROUP_PAGES + 3) + 1000;
const G = BITMAP_GROUP_PAGES;
const EDGE_PAGES = [0, 1, 2, 3, G - 1, G, G + 1, 2 * G - 1, 2 * G, 2 * G + 1, 2 * G + 3];

type Op =
  | { k: 'set' | 'clear' | 'test'; bit: number }
  | { k: 'setRange' | 'clearRange' | 'countRange'; start: number; count: number }
  | { k: 'union' | 'difference' | 'intersect'; bits: number[]; ranges: [number, number][] }
  | { k: 'clone' | 'clearAll' | 'dirty' | 'share' | 'swapShared' };

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
);

function runsOf(model: Set<number>): [number, number][] {
  const sorted = [...model].sort((a, b) => a - b);
  const out: [number, number][] = [];
  for (const b of sorted) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === b) last[1]++;
    else out.push([b, 1]);
  }
  return out;
}

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
  for (const b of probes) {
    expect(bm.test(b)).toBe(model.has(b));
    let next = -1;
    for (const m of model) if (m >= b && (next < 0 || m < next)) next = m;
    expect(bm.nextSet(b)).toBe(next);
    let clear = b;
    while (clear < SIZE && model.has(clear)) clear++;
    expect(bm.nextClear(b)).toBe(clear);
  }
}

describe('PagedBitmap', () => {
  it('matches a Set model under random operation sequences', () => {
    const seed = testSeed('paged-bitmap model');
    fc.assert(
      fc.property(fc.array(op, { minLength: 1, maxLength: 40 }), fc.array(edge, { minLength: 4, maxLength: 8 }), (ops, probes) => {
        let bm = new PagedBitmap(SIZE, { trackDirty: true });
        let model = new Set<number>();
        // Bitmaps sharing pages with bm (shareClone): each must keep its own contents.
        const sharers: { bm: PagedBitmap; model: Set<number> }[] = [];
        for (const o of ops) {
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
              break;
            }
            case 'clearAll':
              bm.clearAll();
              model.clear();
              break;
            case 'share':
              sharers.push({ bm: bm.shareClone({ trackDirty: true }), model: new Set(model) });
              break;
            case 'swapShared': {
              // Carry on mutating a sharer instead, so both sides of a share get changed.
              const other = sharers.pop();
              if (!other) break;
              sharers.push({ bm, model });
              bm = other.bm;
              model = other.model;
              break;
            }
            case 'dirty': {
              // Every page holding a bit, or changed since the last take, is reported dirty once.
              const dirty = bm.takeDirtyPages();
              expect(new Set(dirty).size).toBe(dirty.length);
              expect(bm.dirtyPageCount).toBe(0);
              break;
            }
          }
          check(bm, model, probes);
          for (const sh of sharers) {
            sh.bm.invariants();
            expect(sh.bm.runs()).toEqual(runsOf(sh.model));
          }
        }
      }),
      { seed, numRuns: 300 },
    );
  });

  it('costs memory only for touched pages', () => {
    const oneTiBBlocks = 2 ** 40 / 4096;
    const bm = new PagedBitmap(oneTiBBlocks);
    const empty = bm.bytesUsed();
    expect(empty).toBeLessThan(1024); // the first level of the page table only
    // 1 GiB written contiguously: 262144 blocks = 8 pages, all in one group of the table.
    bm.setRange(1234 * 32768, 262144);
    expect(bm.pagesUsed).toBe(8);
    const groupBytes = BITMAP_GROUP_PAGES * 13;
    expect(bm.bytesUsed() - empty).toBe(8 * BITMAP_PAGE_BYTES + groupBytes);
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
