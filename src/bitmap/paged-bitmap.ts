// Why: every piece of the volume engine (the change log's active and frozen sets, the
// validity bitmap, each snapshot's bitmap and meta bitmap) is a set of tracking blocks
// over a volume that may be terabytes large and is mostly untouched. A flat bitmap of a
// 16 TiB volume at 4 KiB blocks is 512 MiB; this one costs memory in proportion to the
// bits set (seed 001 FIG. 43: a sparse page table of page tables). Scattered writes are
// the hard case: 1 GiB of 4 KiB writes over 16 TiB touches nearly every 4 KiB page with
// one or two bits, so a page holding few bits is a short list of offsets, not 4 KiB.
//
// States, per bit: 0 (clear) or 1 (set). Per page (BITMAP_PAGE_BITS bits):
//   absent - no entry; every bit of the page reads 0; no memory.
//   sparse - an immutable sorted array of the set bits' offsets in the page (1 to
//            SPARSE_BITS_MAX of them; ~48 + 8 bytes per bit in V8, measured).
//   dense  - a Uint32Array of BITMAP_PAGE_WORDS words (~4.3 KiB in V8, measured), holding
//            more than SPARSE_BITS_MIN set bits.
// A sparse page past SPARSE_BITS_MAX bits becomes dense; a dense page down to
// SPARSE_BITS_MIN bits becomes sparse again (the gap stops a page that hovers around one
// threshold from converting on every write).
// The page table has two levels: a directory of groups of GROUP_PAGES pages, each group
// made when a page in it first gets a bit. So making a bitmap, clearing it and every
// whole-bitmap scan cost in proportion to the groups holding bits, not to the volume's
// size (a flat table of a 16 TiB volume was 131072 entries, allocated at every checkpoint).
// Rules (checked by invariants()):
//   - a page is present ⇔ its count of set bits is > 0 (a page whose last bit is
//     cleared is released at once, so "cleared" regions cost nothing either);
//   - a page is never both sparse and dense; sparse ⇒ count ≤ SPARSE_BITS_MAX, offsets
//     strictly increasing; dense ⇒ count > SPARSE_BITS_MIN;
//   - pageCounts[p] = popcount of page p; setCount = Σ pageCounts;
//   - no bit at or past bitsTotal is ever set;
//   - with dirty tracking on: a page whose bits changed since the last takeDirtyPages()
//     is listed exactly once in the dirty list (persistence writes only those pages);
//   - a dense page may be shared with other bitmaps (shareClone(): a snapshot's meta
//     bitmap shares the validity bitmap's pages); a shared page is never written in
//     place: the first change copies it (copy-on-write), so sharing costs nothing until
//     the bitmaps diverge, and then one page per page changed. A sparse page is never
//     changed in place (a change makes a new array), so any number of bitmaps share it
//     with no flag at all.
//
// The hot calls (set / test of one bit) on a dense page allocate nothing: a typed-array
// page, a shift and a mask. On a sparse page, a binary search over ≤ SPARSE_BITS_MAX
// offsets, and set/clear copy the array (≤ 2 KiB). Bit indexes may reach 2^34: the page
// index is found by division (never `>>>` on a bit index); the offset within a page and
// word uses `&`, which is exact because ToInt32 keeps the low 32 bits.

import { assert, AssertionError } from '../util/assert.js';

export const BITMAP_PAGE_BYTES = 4096;
export const BITMAP_PAGE_WORDS = BITMAP_PAGE_BYTES / 4;
export const BITMAP_PAGE_BITS = BITMAP_PAGE_BYTES * 8;
const OFFSET_MASK = BITMAP_PAGE_BITS - 1;
const WORD_MASK_IN_PAGE = BITMAP_PAGE_WORDS - 1;
/** Largest number of bits a bitmap may have (64 TiB at 4 KiB tracking blocks). */
export const BITMAP_BITS_MAX = 2 ** 34;
/** Released dense pages kept for reuse, so a bitmap that fills and empties does not churn the GC. */
const FREE_PAGES_KEPT_MAX = 8;
/** Pages per group of the page table's second level (2 MiB of bitmap, 64 GiB of volume at 4 KiB blocks). */
const GROUP_SHIFT = 9;
export const BITMAP_GROUP_PAGES = 1 << GROUP_SHIFT;
const GROUP_PAGES = BITMAP_GROUP_PAGES;
const GROUP_MASK = GROUP_PAGES - 1;
/**
 * Most bits a sparse page holds. Measured in Node 20 (V8 11.3, no pointer compression,
 * --expose-gc, 200000 objects): an exact-size array of n small integers costs 48 + 8n
 * bytes; a dense page 4096 bytes outside the heap plus ~230 in it. At 256 bits a sparse
 * page is half a dense one, and a set copies at most 2 KiB.
 */
export const SPARSE_BITS_MAX = 256;
/** A dense page down to this many bits becomes sparse again (hysteresis: ¼ of the maximum). */
export const SPARSE_BITS_MIN = 64;
/** Estimated bytes of a sparse page of n bits (measured as above). */
const SPARSE_PAGE_BYTES_BASE = 48;
const SPARSE_BYTES_PER_BIT = 8;
/** Estimated bytes of a dense page: its words plus the typed array and buffer objects. */
const DENSE_PAGE_BYTES = BITMAP_PAGE_BYTES + 232;

type SparsePage = readonly number[];

/** One group of the page table: pages, their counts, and (lazily) their sharing flags. */
interface PageGroup {
  /** Dense pages. */
  readonly pages: (Uint32Array | null)[];
  /** Sparse pages (sorted offsets within the page, never changed in place). */
  readonly lists: (SparsePage | null)[];
  readonly counts: Uint32Array;
  /** Per dense page: 1 when the page array may also be referenced by another bitmap. */
  shared: Uint8Array | null;
  /** Present pages in this group. */
  present: number;
}

function newGroup(): PageGroup {
  return {
    pages: new Array<Uint32Array | null>(GROUP_PAGES).fill(null),
    lists: new Array<SparsePage | null>(GROUP_PAGES).fill(null),
    counts: new Uint32Array(GROUP_PAGES),
    shared: null,
    present: 0,
  };
}

assert(SPARSE_BITS_MIN < SPARSE_BITS_MAX && SPARSE_BITS_MAX < BITMAP_PAGE_BITS, 'sparse thresholds leave a gap and fit a page');
assert(Number.isSafeInteger(BITMAP_BITS_MAX * 2), 'bit indexes are exact doubles');

export function popcount32(x: number): number {
  x = x - ((x >>> 1) & 0x55555555);
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  x = (x + (x >>> 4)) & 0x0f0f0f0f;
  return Math.imul(x, 0x01010101) >>> 24;
}

/** Index (0-31) of the lowest set bit of a non-zero word. */
function lowestBit(w: number): number {
  return 31 - Math.clz32(w & -w);
}

/** Mask of bits [from, to) within one 32-bit word, 0 ≤ from < to ≤ 32. */
function wordMask(from: number, to: number): number {
  const hi = to === 32 ? 0xffffffff : ((1 << to) - 1) >>> 0;
  const lo = ((1 << from) - 1) >>> 0;
  return (hi & ~lo) >>> 0;
}

/** Page holding a bit (division: a bit index may exceed 2^32). */
function pageOf(bit: number): number {
  return Math.floor(bit / BITMAP_PAGE_BITS);
}

/**
 * One shared list per offset for pages holding a single bit: scattered writes make most
 * pages of a large volume one-bit pages, and a fresh array per set was most of their cost
 * (each survives, so the young-generation collector copies it twice: 35% of the time of
 * scattered sets at 16 TiB, measured). Lists are never changed in place, so sharing is
 * free; the table costs at most BITMAP_PAGE_BITS small arrays for the whole process.
 */
const singletons: (SparsePage | undefined)[] = new Array<SparsePage | undefined>(BITMAP_PAGE_BITS);
function singletonList(off: number): SparsePage {
  return (singletons[off] ??= [off]);
}

/** First index k of a sorted list with list[k] ≥ x (list.length when none). */
function lowerBound(list: SparsePage, x: number): number {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (list[mid]! < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/**
 * An exact-size array (a literal or new Array(n) filled in order; push and splice leave
 * spare capacity: 192 bytes for 2 entries pushed, measured, against 64).
 */
function listWithout(list: SparsePage, lo: number, hi: number): number[] {
  const out = new Array<number>(list.length - (hi - lo));
  let j = 0;
  for (let k = 0; k < lo; k++) out[j++] = list[k]!;
  for (let k = hi; k < list.length; k++) out[j++] = list[k]!;
  return out;
}

/** list with [lo, hi) replaced by the offsets from..to-1. */
function listWithRange(list: SparsePage | null, lo: number, hi: number, from: number, to: number): number[] {
  const len = list === null ? 0 : list.length;
  const out = new Array<number>(len - (hi - lo) + (to - from));
  let j = 0;
  for (let k = 0; k < lo; k++) out[j++] = list![k]!;
  for (let b = from; b < to; b++) out[j++] = b;
  for (let k = hi; k < len; k++) out[j++] = list![k]!;
  return out;
}

/** Sorted union of two sorted lists. */
function listUnion(a: SparsePage, b: SparsePage): number[] {
  let n = 0;
  for (let i = 0, j = 0; i < a.length || j < b.length; n++) {
    if (j >= b.length || (i < a.length && a[i]! < b[j]!)) i++;
    else if (i >= a.length || b[j]! < a[i]!) j++;
    else {
      i++;
      j++;
    }
  }
  const out = new Array<number>(n);
  for (let i = 0, j = 0, k = 0; k < n; k++) {
    if (j >= b.length || (i < a.length && a[i]! < b[j]!)) out[k] = a[i++]!;
    else if (i >= a.length || b[j]! < a[i]!) out[k] = b[j++]!;
    else {
      out[k] = a[i++]!;
      j++;
    }
  }
  return out;
}

/** The offsets of list for which keep() is true (an exact-size array). */
function listFilter(list: SparsePage, keep: (off: number) => boolean): number[] {
  let n = 0;
  for (const off of list) if (keep(off)) n++;
  const out = new Array<number>(n);
  let j = 0;
  for (const off of list) if (keep(off)) out[j++] = off;
  return out;
}

function denseHas(page: Readonly<Uint32Array>, off: number): boolean {
  return (page[off >>> 5]! & (1 << (off & 31))) !== 0;
}

/** Sorted offsets of the n set bits of a dense page. */
function denseToList(page: Readonly<Uint32Array>, n: number): number[] {
  const out = new Array<number>(n);
  let j = 0;
  for (let w = 0; w < BITMAP_PAGE_WORDS && j < n; w++) {
    let word = page[w]!;
    while (word !== 0) {
      out[j++] = w * 32 + lowestBit(word);
      word &= word - 1;
    }
  }
  return out;
}

/** Calls fn(wordIndex, mask) for each word overlapping offsets [from, to) of a page. */
function forWordsIn(from: number, to: number, fn: (w: number, mask: number) => void): void {
  let off = from;
  while (off < to) {
    const inWord = off & 31;
    const take = Math.min(32 - inWord, to - off);
    fn(off >>> 5, wordMask(inWord, inWord + take));
    off += take;
  }
}

function denseCountRange(page: Readonly<Uint32Array>, from: number, to: number): number {
  let n = 0;
  forWordsIn(from, to, (w, mask) => {
    n += popcount32(page[w]! & mask);
  });
  return n;
}

/** Read-only view, for consumers that must not change a bitmap they are handed. */
export interface ReadonlyBitmap {
  readonly bitsTotal: number;
  test(bit: number): boolean;
  count(): number;
  nextSet(from: number): number;
  forEachRun(visit: (start: number, count: number) => void, from?: number, to?: number): void;
}

export class PagedBitmap implements ReadonlyBitmap {
  private bits: number;
  private pageCount: number;
  /** First level of the page table: null where no page of the group was ever set. */
  private readonly groups: (PageGroup | null)[];
  private setCount = 0;
  private pagesPresent = 0;
  /** Dense pages that may be shared with another bitmap (0: skip every sharing check). */
  private sharedPages = 0;
  private readonly freePages: Uint32Array[] = [];
  /** Dirty tracking (persistence): a flag per page and the list of flagged pages. */
  private dirtyFlags: Uint8Array | null;
  private dirtyList: Uint32Array | null;
  private dirtyCount = 0;
  /** Where page() and forEachPage() spell out a sparse page as words (made on first use). */
  private pageScratch: Uint32Array | null = null;
  private visitScratch: Uint32Array | null = null;

  constructor(bitsTotal: number, options: { trackDirty?: boolean } = {}) {
    assert(Number.isInteger(bitsTotal) && bitsTotal >= 0 && bitsTotal <= BITMAP_BITS_MAX, `bitmap size ${bitsTotal} out of range`);
    this.bits = bitsTotal;
    this.pageCount = Math.ceil(bitsTotal / BITMAP_PAGE_BITS);
    this.groups = new Array<PageGroup | null>(Math.ceil(this.pageCount / GROUP_PAGES)).fill(null);
    // Persistent bitmaps only (made once per open): one byte per page.
    this.dirtyFlags = options.trackDirty ? new Uint8Array(this.pageTotal) : null;
    this.dirtyList = options.trackDirty ? new Uint32Array(Math.min(this.pageTotal, 64)) : null;
  }

  /** Number of bits (tracking blocks); only grow() changes it. */
  get bitsTotal(): number {
    return this.bits;
  }
  get pageTotal(): number {
    return this.pageCount;
  }

  /** Makes room for more bits (a volume grew); the new bits are clear and cost nothing. */
  grow(bitsTotal: number): void {
    assert(Number.isInteger(bitsTotal) && bitsTotal >= this.bits && bitsTotal <= BITMAP_BITS_MAX, `cannot grow a bitmap of ${this.bits} to ${bitsTotal}`);
    const pages = Math.ceil(bitsTotal / BITMAP_PAGE_BITS);
    if (pages > this.pageCount) {
      const groups = Math.ceil(pages / GROUP_PAGES);
      while (this.groups.length < groups) this.groups.push(null);
      if (this.dirtyFlags !== null) {
        const flags = new Uint8Array(pages);
        flags.set(this.dirtyFlags);
        this.dirtyFlags = flags;
      }
      this.pageCount = pages;
    }
    this.bits = bitsTotal;
  }

  // ---- single bits (the write path) ----

  test(bit: number): boolean {
    const p = pageOf(bit);
    const g = this.groups[p >>> GROUP_SHIFT];
    if (g === null || g === undefined) return false;
    const i = p & GROUP_MASK;
    const page = g.pages[i]!;
    if (page !== null) return (page[(bit >>> 5) & WORD_MASK_IN_PAGE]! & (1 << (bit & 31))) !== 0;
    const list = g.lists[i]!;
    if (list === null) return false;
    const off = bit & OFFSET_MASK;
    const k = lowerBound(list, off);
    return k < list.length && list[k] === off;
  }

  /** Sets a bit; true if it was clear. */
  set(bit: number): boolean {
    if (!(bit >= 0 && bit < this.bitsTotal)) throw new AssertionError(`bit ${bit} outside bitmap of ${this.bitsTotal}`);
    const p = pageOf(bit);
    const g = this.groups[p >>> GROUP_SHIFT] ?? this.allocGroup(p);
    const i = p & GROUP_MASK;
    let page = g.pages[i]!;
    if (page === null) {
      const list = g.lists[i]!;
      const off = bit & OFFSET_MASK;
      if (list === null) {
        g.lists[i] = singletonList(off);
        g.present++;
        this.pagesPresent++;
      } else {
        const k = lowerBound(list, off);
        if (k < list.length && list[k] === off) return false;
        if (list.length < SPARSE_BITS_MAX) g.lists[i] = listWithRange(list, k, k, off, off + 1);
        else {
          page = this.toDense(g, i);
          page[off >>> 5] |= 1 << (off & 31);
        }
      }
      g.counts[i]!++;
      this.setCount++;
      if (this.dirtyFlags !== null) this.markDirty(p);
      return true;
    }
    const w = (bit >>> 5) & WORD_MASK_IN_PAGE;
    const mask = 1 << (bit & 31);
    const old = page[w]!;
    if ((old & mask) !== 0) return false;
    if (this.sharedPages !== 0 && g.shared !== null && g.shared[i] !== 0) page = this.own(g, i);
    page[w] = old | mask;
    g.counts[i]!++;
    this.setCount++;
    if (this.dirtyFlags !== null) this.markDirty(p);
    return true;
  }

  /** Clears a bit; true if it was set. */
  clear(bit: number): boolean {
    if (!(bit >= 0 && bit < this.bitsTotal)) throw new AssertionError(`bit ${bit} outside bitmap of ${this.bitsTotal}`);
    const p = pageOf(bit);
    const g = this.groups[p >>> GROUP_SHIFT];
    if (g === null || g === undefined) return false;
    const i = p & GROUP_MASK;
    let page = g.pages[i]!;
    if (page === null) {
      const list = g.lists[i]!;
      if (list === null) return false;
      const off = bit & OFFSET_MASK;
      const k = lowerBound(list, off);
      if (!(k < list.length && list[k] === off)) return false;
      this.setCount--;
      if (this.dirtyFlags !== null) this.markDirty(p);
      if (--g.counts[i]! === 0) this.releasePage(g, p);
      else g.lists[i] = listWithout(list, k, k + 1);
      return true;
    }
    const w = (bit >>> 5) & WORD_MASK_IN_PAGE;
    const mask = 1 << (bit & 31);
    const old = page[w]!;
    if ((old & mask) === 0) return false;
    if (this.sharedPages !== 0 && g.shared !== null && g.shared[i] !== 0) page = this.own(g, i);
    page[w] = old & ~mask;
    this.setCount--;
    if (this.dirtyFlags !== null) this.markDirty(p);
    this.shrunk(g, p, --g.counts[i]!);
    return true;
  }

  // ---- ranges ----

  setRange(start: number, count: number): void {
    this.checkRange(start, count);
    this.forPageSpans(start, count, (p, from, to) => {
      const g = this.groups[p >>> GROUP_SHIFT] ?? this.allocGroup(p);
      const i = p & GROUP_MASK;
      let page = g.pages[i]!;
      if (page === null) {
        const list = g.lists[i]!;
        const lo = list === null ? 0 : lowerBound(list, from);
        const hi = list === null ? 0 : lowerBound(list, to);
        const added = to - from - (hi - lo);
        if (added === 0) return;
        if (g.counts[i]! + added <= SPARSE_BITS_MAX) {
          g.lists[i] = listWithRange(list, lo, hi, from, to);
          if (list === null) {
            g.present++;
            this.pagesPresent++;
          }
          g.counts[i]! += added;
          this.setCount += added;
          if (this.dirtyFlags !== null) this.markDirty(p);
          return;
        }
        page = list === null ? this.allocPage(g, p) : this.toDense(g, i);
      }
      const added = to - from - denseCountRange(page, from, to);
      if (added === 0) return;
      if (this.sharedPages !== 0 && g.shared !== null && g.shared[i] !== 0) page = this.own(g, i);
      const dst = page;
      forWordsIn(from, to, (w, mask) => {
        dst[w] = (dst[w]! | mask) >>> 0;
      });
      g.counts[i]! += added;
      this.setCount += added;
      if (this.dirtyFlags !== null) this.markDirty(p);
    });
  }

  clearRange(start: number, count: number): void {
    this.checkRange(start, count);
    this.forPageSpans(start, count, (p, from, to) => {
      const g = this.groups[p >>> GROUP_SHIFT];
      if (g === null || g === undefined) return;
      const i = p & GROUP_MASK;
      let page = g.pages[i]!;
      if (page === null) {
        const list = g.lists[i]!;
        if (list === null) return;
        const lo = lowerBound(list, from);
        const hi = lowerBound(list, to);
        if (hi === lo) return;
        this.setCount -= hi - lo;
        if (this.dirtyFlags !== null) this.markDirty(p);
        g.counts[i]! -= hi - lo;
        if (g.counts[i] === 0) this.releasePage(g, p);
        else g.lists[i] = listWithout(list, lo, hi);
        return;
      }
      const removed = denseCountRange(page, from, to);
      if (removed === 0) return;
      if (this.sharedPages !== 0 && g.shared !== null && g.shared[i] !== 0) page = this.own(g, i);
      const dst = page;
      forWordsIn(from, to, (w, mask) => {
        dst[w] = (dst[w]! & ~mask) >>> 0;
      });
      this.setCount -= removed;
      if (this.dirtyFlags !== null) this.markDirty(p);
      g.counts[i]! -= removed;
      this.shrunk(g, p, g.counts[i]!);
    });
  }

  /** Number of set bits in [start, start+count). */
  countRange(start: number, count: number): number {
    this.checkRange(start, count);
    let n = 0;
    this.forPageSpans(start, count, (p, from, to) => {
      const g = this.groups[p >>> GROUP_SHIFT];
      if (g === null || g === undefined) return;
      const i = p & GROUP_MASK;
      const page = g.pages[i]!;
      if (page !== null) n += denseCountRange(page, from, to);
      else {
        const list = g.lists[i]!;
        if (list !== null) n += lowerBound(list, to) - lowerBound(list, from);
      }
    });
    return n;
  }

  /** Calls fn(page, from, to) with the offsets [from, to) of each page overlapping [start, start+count). */
  private forPageSpans(start: number, count: number, fn: (p: number, from: number, to: number) => void): void {
    const end = start + count;
    let bit = start;
    while (bit < end) {
      const p = pageOf(bit);
      const base = p * BITMAP_PAGE_BITS;
      const to = Math.min(end - base, BITMAP_PAGE_BITS);
      fn(p, bit - base, to);
      bit = base + to;
    }
  }

  private checkRange(start: number, count: number): void {
    if (!(Number.isInteger(start) && Number.isInteger(count) && start >= 0 && count >= 0 && start + count <= this.bitsTotal)) {
      throw new AssertionError(`range ${start}+${count} outside bitmap of ${this.bitsTotal}`);
    }
  }

  // ---- scanning, in block order ----

  count(): number {
    return this.setCount;
  }

  /** Set bits in page p (0 when absent). */
  pageBitCount(p: number): number {
    const g = this.groups[p >>> GROUP_SHIFT];
    return g === null || g === undefined ? 0 : g.counts[p & GROUP_MASK]!;
  }

  /**
   * The end of the shortest prefix [0, end) that holds `n` set bits (1 ≤ n ≤ count()): one
   * past the n-th set bit. Counts pages whole and scans only the page where it ends, so a
   * partial delta set is carved off a large change log without visiting its runs.
   */
  endOfFirst(n: number): number {
    assert(Number.isInteger(n) && n >= 1 && n <= this.setCount, 'endOfFirst: 1 ≤ n ≤ count()');
    let left = n;
    for (let p = 0; p < this.pageCount; p++) {
      const g = this.groups[p >>> GROUP_SHIFT];
      if (g === null || g === undefined || g.present === 0) {
        p = (((p >>> GROUP_SHIFT) + 1) << GROUP_SHIFT) - 1;
        continue;
      }
      const i = p & GROUP_MASK;
      const inPage = g.counts[i]!;
      if (inPage < left) {
        left -= inPage;
        continue;
      }
      const base = p * BITMAP_PAGE_BITS;
      const page = g.pages[i]!;
      if (page === null) return base + g.lists[i]![left - 1]! + 1;
      for (let w = 0; w < BITMAP_PAGE_WORDS; w++) {
        let word = page[w]!;
        const c = popcount32(word);
        if (c < left) {
          left -= c;
          continue;
        }
        for (; left > 1; left--) word &= word - 1; // drop the lowest set bits before the n-th
        return base + w * 32 + lowestBit(word) + 1;
      }
    }
    throw new AssertionError('endOfFirst: page counts disagree with the bits');
  }

  /** The first set bit at or after `from`, or -1. Skips absent groups and pages whole. */
  nextSet(from: number): number {
    if (from < 0) from = 0;
    if (from >= this.bitsTotal) return -1;
    let p = pageOf(from);
    let off = from - p * BITMAP_PAGE_BITS;
    while (p < this.pageTotal) {
      const g = this.groups[p >>> GROUP_SHIFT]!;
      if (g === null || g.present === 0) {
        p = ((p >>> GROUP_SHIFT) + 1) << GROUP_SHIFT;
        off = 0;
        continue;
      }
      const i = p & GROUP_MASK;
      const page = g.pages[i]!;
      if (page !== null) {
        let skipMask = ~(((1 << (off & 31)) - 1) >>> 0); // bits below `from` in its word are ignored
        for (let w = off >>> 5; w < BITMAP_PAGE_WORDS; w++, skipMask = -1) {
          const word = page[w]! & skipMask;
          if (word !== 0) return p * BITMAP_PAGE_BITS + w * 32 + lowestBit(word);
        }
      } else {
        const list = g.lists[i]!;
        if (list !== null) {
          const k = lowerBound(list, off);
          if (k < list.length) return p * BITMAP_PAGE_BITS + list[k]!;
        }
      }
      p++;
      off = 0;
    }
    return -1;
  }

  /** The first clear bit at or after `from`, or bitsTotal. */
  nextClear(from: number): number {
    if (from < 0) from = 0;
    if (from >= this.bitsTotal) return this.bitsTotal;
    let p = pageOf(from);
    let off = from - p * BITMAP_PAGE_BITS;
    for (; p < this.pageTotal; p++, off = 0) {
      const g = this.groups[p >>> GROUP_SHIFT];
      const i = p & GROUP_MASK;
      const page = g ? g.pages[i]! : null;
      if (page !== null) {
        let forceMask = ((1 << (off & 31)) - 1) >>> 0; // bits below `from` count as set
        for (let w = off >>> 5; w < BITMAP_PAGE_WORDS; w++, forceMask = 0) {
          const word = ~(page[w]! | forceMask);
          if (word !== 0) return Math.min(this.bitsTotal, p * BITMAP_PAGE_BITS + w * 32 + lowestBit(word));
        }
        continue;
      }
      const list = g ? g.lists[i]! : null;
      if (list !== null) {
        for (let k = lowerBound(list, off); k < list.length && list[k] === off; k++) off++;
      }
      if (off < BITMAP_PAGE_BITS) return Math.min(this.bitsTotal, p * BITMAP_PAGE_BITS + off);
    }
    return this.bitsTotal;
  }

  /** Visits each maximal run of set bits within [from, to), in order. */
  forEachRun(visit: (start: number, count: number) => void, from = 0, to = this.bitsTotal): void {
    let at = this.nextSet(from);
    while (at >= 0 && at < to) {
      const end = Math.min(this.nextClear(at), to);
      visit(at, end - at);
      at = end >= to ? -1 : this.nextSet(end);
    }
  }

  /** Runs of set bits as [start, count] pairs (convenience for tests and cold paths). */
  runs(from = 0, to = this.bitsTotal): [number, number][] {
    const out: [number, number][] = [];
    this.forEachRun((s, c) => out.push([s, c]), from, to);
    return out;
  }

  /**
   * Visits every present page in order, as words; O(groups + present pages), not O(volume
   * size). A sparse page is spelled out in a buffer of this bitmap's that the next visit
   * overwrites: use the words during the call only (page() has a buffer of its own, so a
   * visitor may call it).
   */
  forEachPage(visit: (p: number, page: Readonly<Uint32Array>) => void): void {
    for (let gi = 0; gi < this.groups.length; gi++) {
      const g = this.groups[gi]!;
      if (g === null || g.present === 0) continue;
      const base = gi << GROUP_SHIFT;
      for (let i = 0; i < GROUP_PAGES; i++) {
        const page = g.pages[i]!;
        if (page !== null) visit(base + i, page);
        else {
          const list = g.lists[i]!;
          if (list !== null) visit(base + i, this.spell(list, (this.visitScratch ??= new Uint32Array(BITMAP_PAGE_WORDS))));
        }
      }
    }
  }

  /** Visits every set bit of page p in order, as its offset within the page. */
  forEachSetInPage(p: number, visit: (offset: number) => void): void {
    const g = this.groups[p >>> GROUP_SHIFT];
    if (g === null || g === undefined) return;
    const i = p & GROUP_MASK;
    const page = g.pages[i]!;
    if (page !== null) for (const off of denseToList(page, g.counts[i]!)) visit(off);
    else for (const off of g.lists[i] ?? []) visit(off);
  }

  /** Indexes of the present pages, in order. */
  presentPages(): number[] {
    const out: number[] = [];
    for (let gi = 0; gi < this.groups.length; gi++) {
      const g = this.groups[gi]!;
      if (g === null || g.present === 0) continue;
      for (let i = 0; i < GROUP_PAGES; i++) if (g.counts[i] !== 0) out.push((gi << GROUP_SHIFT) + i);
    }
    return out;
  }

  /** Visits every present page of this bitmap as (p, group, index in group). */
  private forEachPresent(visit: (p: number, g: PageGroup, i: number) => void): void {
    for (let gi = 0; gi < this.groups.length; gi++) {
      const g = this.groups[gi]!;
      if (g === null || g.present === 0) continue;
      for (let i = 0; i < GROUP_PAGES; i++) if (g.counts[i] !== 0) visit((gi << GROUP_SHIFT) + i, g, i);
    }
  }

  // ---- whole-bitmap operations (cuts, merges, snapshots) ----

  /** this |= other. Sizes may differ: bits past this bitmap's end must be clear in other. */
  union(other: PagedBitmap): void {
    other.forEachPresent((p, og, oi) => {
      assert(p < this.pageTotal, 'union: other has bits past this bitmap');
      const g = this.groups[p >>> GROUP_SHIFT] ?? this.allocGroup(p);
      const i = p & GROUP_MASK;
      const srcPage = og.pages[oi]!;
      const srcList = og.lists[oi]!;
      const before = g.counts[i]!;
      let dst = g.pages[i]!;
      const dstList = g.lists[i]!;
      let merged: number[];
      if (dst === null && dstList === null) {
        if (srcList !== null) {
          g.lists[i] = srcList; // immutable: shared as is
          g.present++;
          this.pagesPresent++;
        } else this.allocPage(g, p).set(srcPage!);
        g.counts[i] = og.counts[oi]!;
      } else if (dstList !== null && srcList !== null && (merged = listUnion(dstList, srcList)).length <= SPARSE_BITS_MAX) {
        if (merged.length === before) return;
        g.lists[i] = merged;
        g.counts[i] = merged.length;
      } else {
        if (dst === null) dst = this.toDense(g, i);
        else if (this.sharedPages !== 0 && g.shared !== null && g.shared[i] !== 0) dst = this.own(g, i);
        let n = before;
        if (srcList !== null) {
          for (const off of srcList) {
            if (denseHas(dst, off)) continue;
            dst[off >>> 5] |= 1 << (off & 31);
            n++;
          }
        } else {
          n = 0;
          for (let w = 0; w < BITMAP_PAGE_WORDS; w++) {
            const v = (dst[w]! | srcPage![w]!) >>> 0;
            dst[w] = v;
            n += popcount32(v);
          }
        }
        if (n === before) return;
        g.counts[i] = n;
      }
      this.setCount += g.counts[i]! - before;
      if (this.dirtyFlags !== null) this.markDirty(p);
    });
  }

  /** this &= ~other. */
  difference(other: PagedBitmap): void {
    other.forEachPresent((p, og, oi) => {
      if (p >= this.pageTotal) return;
      const g = this.groups[p >>> GROUP_SHIFT];
      if (g === null || g === undefined) return;
      const i = p & GROUP_MASK;
      const srcPage = og.pages[oi]!;
      const srcList = og.lists[oi]!;
      const before = g.counts[i]!;
      if (before === 0) return;
      let dst = g.pages[i]!;
      let n: number;
      if (dst === null) {
        const kept = listFilter(g.lists[i]!, srcList !== null ? (off) => !listHas(srcList, off) : (off) => !denseHas(srcPage!, off));
        n = kept.length;
        if (n === before) return;
        if (n !== 0) g.lists[i] = kept;
      } else if (srcList !== null) {
        n = before;
        for (const off of srcList) {
          if (!denseHas(dst, off)) continue;
          if (this.sharedPages !== 0 && g.shared !== null && g.shared[i] !== 0) dst = this.own(g, i);
          dst[off >>> 5] &= ~(1 << (off & 31));
          n--;
        }
        if (n === before) return;
      } else {
        if (this.sharedPages !== 0 && g.shared !== null && g.shared[i] !== 0) dst = this.own(g, i);
        n = 0;
        for (let w = 0; w < BITMAP_PAGE_WORDS; w++) {
          const v = (dst[w]! & ~srcPage![w]!) >>> 0;
          dst[w] = v;
          n += popcount32(v);
        }
        if (n === before) return;
      }
      this.setCount += n - before;
      g.counts[i] = n;
      if (this.dirtyFlags !== null) this.markDirty(p);
      this.shrunk(g, p, n);
    });
  }

  /** this &= other. */
  intersect(other: PagedBitmap): void {
    this.forEachPresent((p, g, i) => {
      const og = p < other.pageTotal ? other.groups[p >>> GROUP_SHIFT] : null;
      const oi = p & GROUP_MASK;
      const srcPage = og ? og.pages[oi]! : null;
      const srcList = og ? og.lists[oi]! : null;
      const before = g.counts[i]!;
      let dst = g.pages[i]!;
      let n: number;
      if (srcPage === null && srcList === null) n = 0;
      else if (dst === null) {
        const kept = listFilter(g.lists[i]!, srcList !== null ? (off) => listHas(srcList, off) : (off) => denseHas(srcPage!, off));
        n = kept.length;
        if (n === before) return;
        if (n !== 0) g.lists[i] = kept;
      } else if (srcList !== null) {
        // The result is a subset of the sparse side: it becomes sparse.
        const d = dst;
        const kept = listFilter(srcList, (off) => denseHas(d, off));
        n = kept.length;
        if (n === before) return;
        if (n !== 0) {
          this.dropDense(g, i);
          g.lists[i] = kept;
        }
      } else {
        if (this.sharedPages !== 0 && g.shared !== null && g.shared[i] !== 0) dst = this.own(g, i);
        n = 0;
        for (let w = 0; w < BITMAP_PAGE_WORDS; w++) {
          const v = (dst[w]! & srcPage![w]!) >>> 0;
          dst[w] = v;
          n += popcount32(v);
        }
        if (n === before) return;
      }
      this.setCount += n - before;
      g.counts[i] = n;
      if (this.dirtyFlags !== null) this.markDirty(p);
      this.shrunk(g, p, n);
    });
  }

  clone(options: { trackDirty?: boolean } = {}): PagedBitmap {
    return this.copy(options, false);
  }

  /**
   * A copy that shares every page with this bitmap until either changes it (then that
   * page is copied for the one changing it). For bitmaps that rarely diverge: a snapshot's
   * meta bitmap taken from the validity bitmap costs no page until the volume changes.
   */
  shareClone(options: { trackDirty?: boolean } = {}): PagedBitmap {
    return this.copy(options, true);
  }

  /** clone() copies dense pages, shareClone() shares them; sparse pages are always shared (immutable). */
  private copy(options: { trackDirty?: boolean }, shareDense: boolean): PagedBitmap {
    const c = new PagedBitmap(this.bitsTotal, options);
    this.forEachPresent((p, mine, i) => {
      const theirs = c.groups[p >>> GROUP_SHIFT] ?? c.allocGroup(p);
      const page = mine.pages[i]!;
      if (page === null) theirs.lists[i] = mine.lists[i]!;
      else if (!shareDense) theirs.pages[i] = page.slice();
      else {
        theirs.pages[i] = page;
        mine.shared ??= new Uint8Array(GROUP_PAGES);
        theirs.shared ??= new Uint8Array(GROUP_PAGES);
        if (mine.shared[i] === 0) this.sharedPages++;
        mine.shared[i] = 1;
        theirs.shared[i] = 1;
        c.sharedPages++;
      }
      theirs.counts[i] = mine.counts[i]!;
      theirs.present++;
      c.pagesPresent++;
      if (c.dirtyFlags !== null) c.markDirty(p);
    });
    c.setCount = this.setCount;
    return c;
  }

  /** Makes dense page i of group g this bitmap's own (copying it, as it may be shared) before a change. */
  private own(g: PageGroup, i: number): Uint32Array {
    const page = g.pages[i]!;
    g.shared![i] = 0;
    this.sharedPages--;
    const copy = this.freePages.pop() ?? new Uint32Array(BITMAP_PAGE_WORDS);
    copy.set(page);
    g.pages[i] = copy;
    return copy;
  }

  clearAll(): void {
    this.forEachPresent((p, g, i) => {
      if (this.dirtyFlags !== null) this.markDirty(p);
      g.counts[i] = 0;
      this.releasePage(g, p);
    });
    // Groups go too, unless a dirty flag still points into them (they are cheap to keep).
    if (this.dirtyFlags === null) this.groups.fill(null);
    this.setCount = 0;
  }

  equals(other: PagedBitmap): boolean {
    if (this.bitsTotal !== other.bitsTotal || this.setCount !== other.setCount || this.pagesPresent !== other.pagesPresent) return false;
    let same = true;
    this.forEachPresent((p, g, i) => {
      if (!same) return;
      if (other.pageBitCount(p) !== g.counts[i]) {
        same = false;
        return;
      }
      // Same count: equal when every bit of one is in the other.
      const page = g.pages[i]!;
      if (page === null) {
        for (const off of g.lists[i]!) if (!other.test(p * BITMAP_PAGE_BITS + off)) same = false;
      } else {
        other.forEachSetInPage(p, (off) => {
          if (!denseHas(page, off)) same = false;
        });
      }
    });
    return same;
  }

  // ---- memory ----

  get pagesUsed(): number {
    return this.pagesPresent;
  }

  /** Present pages held dense (the rest are sparse). */
  get densePagesUsed(): number {
    let n = 0;
    this.forEachPresent((_p, g, i) => {
      if (g.pages[i] !== null) n++;
    });
    return n;
  }

  /**
   * Estimated bytes of memory this bitmap holds: pages (sizes measured in V8, see
   * SPARSE_BITS_MAX) plus the page table and counters (a page shared with another bitmap
   * counts in each; see ownBytesUsed()).
   */
  bytesUsed(): number {
    let groupsMade = 0;
    let pageBytes = this.freePages.length * DENSE_PAGE_BYTES;
    for (const g of this.groups) if (g !== null) groupsMade++;
    this.forEachPresent((_p, g, i) => {
      pageBytes += g.pages[i] !== null ? DENSE_PAGE_BYTES : SPARSE_PAGE_BYTES_BASE + SPARSE_BYTES_PER_BIT * g.counts[i]!;
    });
    const tableBytes = this.groups.length * 8 + groupsMade * GROUP_PAGES * (8 + 8 + 4 + 1) + (this.dirtyFlags ? this.pageTotal + this.dirtyList!.byteLength : 0);
    return pageBytes + tableBytes;
  }

  /** Like bytesUsed(), but dense pages shared with another bitmap are not counted. */
  ownBytesUsed(): number {
    return this.bytesUsed() - this.sharedPages * DENSE_PAGE_BYTES;
  }

  // ---- pages, for persistence ----

  /**
   * Page p as words (do not modify), or null when absent. A dense page is the live page; a
   * sparse page is spelled out in a buffer of this bitmap's, valid until the next call of
   * page() on this bitmap (callers use one page at a time; forEachPage() has its own buffer).
   */
  page(p: number): Readonly<Uint32Array> | null {
    const g = this.groups[p >>> GROUP_SHIFT];
    if (g === null || g === undefined) return null;
    const i = p & GROUP_MASK;
    const page = g.pages[i]!;
    if (page !== null) return page;
    const list = g.lists[i]!;
    return list === null ? null : this.spell(list, (this.pageScratch ??= new Uint32Array(BITMAP_PAGE_WORDS)));
  }

  /**
   * The set bits of page p as sorted offsets within the page when the page is held sparse
   * (do not modify; never changed in place, so it stays valid); null when p is absent or
   * dense. Persistence encodes a sparse page from this without spelling out 4 KiB.
   */
  sparseOffsets(p: number): readonly number[] | null {
    const g = this.groups[p >>> GROUP_SHIFT];
    if (g === null || g === undefined) return null;
    return g.lists[p & GROUP_MASK]!;
  }

  /** Replaces page p with `words` (all-zero words make it absent; few bits make it sparse). Used when loading. */
  loadPage(p: number, words: Readonly<Uint32Array>): void {
    assert(p >= 0 && p < this.pageTotal && words.length === BITMAP_PAGE_WORDS, 'loadPage: bad page');
    let n = 0;
    for (let w = 0; w < BITMAP_PAGE_WORDS; w++) n += popcount32(words[w]!);
    if (p === this.pageTotal - 1 && n > 0) {
      const lastBit = this.bitsTotal - p * BITMAP_PAGE_BITS; // bits past the end must be clear
      for (let b = lastBit; b < BITMAP_PAGE_BITS; b++) assert((words[b >>> 5]! & (1 << (b & 31))) === 0, 'loadPage: bit past end');
    }
    const g = this.groups[p >>> GROUP_SHIFT] ?? (n === 0 ? null : this.allocGroup(p));
    const i = p & GROUP_MASK;
    const old = g === null ? 0 : g.counts[i]!;
    if (n === 0) {
      if (g !== null && old !== 0) {
        g.counts[i] = 0;
        this.releasePage(g, p);
      }
    } else if (n <= SPARSE_BITS_MAX) {
      if (old === 0) {
        g!.present++;
        this.pagesPresent++;
      } else if (g!.pages[i] !== null) this.dropDense(g!, i);
      g!.lists[i] = denseToList(words, n);
      g!.counts[i] = n;
    } else {
      let page = g!.pages[i]!;
      if (page === null) page = old === 0 ? this.allocPage(g!, p) : this.toDense(g!, i);
      else if (g!.shared !== null && g!.shared[i] !== 0) page = this.own(g!, i);
      page.set(words);
      g!.counts[i] = n;
    }
    this.setCount += n - old;
    if (this.dirtyFlags !== null) this.markDirty(p);
  }

  /**
   * Replaces page p with the bits at `offsets` (strictly increasing offsets within the
   * page, 1 to SPARSE_BITS_MAX of them; the bitmap keeps the array, so the caller must not
   * change it). Loading a sparse page this way costs O(bits), not O(page).
   */
  loadSparse(p: number, offsets: number[]): void {
    const n = offsets.length;
    assert(p >= 0 && p < this.pageTotal && n > 0 && n <= SPARSE_BITS_MAX, 'loadSparse: bad page or count');
    let prev = -1;
    for (let k = 0; k < n; k++) {
      const o = offsets[k]!;
      assert(o > prev, 'loadSparse: offsets strictly increase');
      prev = o;
    }
    assert(prev < BITMAP_PAGE_BITS && p * BITMAP_PAGE_BITS + prev < this.bitsTotal, 'loadSparse: bit past end');
    const g = this.groups[p >>> GROUP_SHIFT] ?? this.allocGroup(p);
    const i = p & GROUP_MASK;
    const old = g.counts[i]!;
    if (old === 0) {
      g.present++;
      this.pagesPresent++;
    } else if (g.pages[i] !== null) this.dropDense(g, i);
    g.lists[i] = offsets;
    g.counts[i] = n;
    this.setCount += n - old;
    if (this.dirtyFlags !== null) this.markDirty(p);
  }

  /** Pages changed since the last call (dirty tracking must be on); resets the list. */
  takeDirtyPages(): Uint32Array {
    assert(this.dirtyFlags !== null && this.dirtyList !== null, 'dirty tracking is off');
    const out = this.dirtyList.slice(0, this.dirtyCount);
    for (let i = 0; i < this.dirtyCount; i++) this.dirtyFlags[this.dirtyList[i]!] = 0;
    this.dirtyCount = 0;
    return out.sort();
  }

  get dirtyPageCount(): number {
    return this.dirtyCount;
  }

  /** Marks page p changed (persistence: write it again even if its bits look the same). */
  markDirty(p: number): void {
    const flags = this.dirtyFlags!;
    if (flags[p] !== 0) return;
    flags[p] = 1;
    if (this.dirtyCount === this.dirtyList!.length) {
      const grown = new Uint32Array(Math.min(this.pageTotal, this.dirtyList!.length * 2));
      grown.set(this.dirtyList!);
      this.dirtyList = grown;
    }
    this.dirtyList![this.dirtyCount++] = p;
  }

  private allocGroup(p: number): PageGroup {
    const g = newGroup();
    this.groups[p >>> GROUP_SHIFT] = g;
    return g;
  }

  /** A dense page for absent page p (zeroed: free pages are zeroed when released). */
  private allocPage(g: PageGroup, p: number): Uint32Array {
    const page = this.freePages.pop() ?? new Uint32Array(BITMAP_PAGE_WORDS);
    g.pages[p & GROUP_MASK] = page;
    g.present++;
    this.pagesPresent++;
    return page;
  }

  /** Sparse page i becomes dense, same bits (the count is the caller's). */
  private toDense(g: PageGroup, i: number): Uint32Array {
    const list = g.lists[i]!;
    const page = this.freePages.pop() ?? new Uint32Array(BITMAP_PAGE_WORDS);
    for (const off of list) page[off >>> 5] |= 1 << (off & 31);
    g.lists[i] = null;
    g.pages[i] = page;
    return page;
  }

  /** Spells a sparse page out as words in `out`. */
  private spell(list: SparsePage, out: Uint32Array): Uint32Array {
    out.fill(0);
    for (const off of list) out[off >>> 5] |= 1 << (off & 31);
    return out;
  }

  /** After page p lost bits and holds n: released when empty, sparse again when few. */
  private shrunk(g: PageGroup, p: number, n: number): void {
    const i = p & GROUP_MASK;
    if (n === 0) this.releasePage(g, p);
    else if (n <= SPARSE_BITS_MIN && g.pages[i] !== null) {
      const list = denseToList(g.pages[i]!, n);
      this.dropDense(g, i);
      g.lists[i] = list;
    }
  }

  /** Unhooks dense page i (recycled unless another bitmap may still read it). */
  private dropDense(g: PageGroup, i: number): void {
    const page = g.pages[i]!;
    g.pages[i] = null;
    if (g.shared !== null && g.shared[i] !== 0) {
      g.shared[i] = 0; // another bitmap still reads it: never recycle
      this.sharedPages--;
      return;
    }
    if (this.freePages.length < FREE_PAGES_KEPT_MAX) {
      page.fill(0);
      this.freePages.push(page);
    }
  }

  private releasePage(g: PageGroup, p: number): void {
    const i = p & GROUP_MASK;
    if (g.pages[i] !== null) this.dropDense(g, i);
    g.lists[i] = null;
    g.present--;
    this.pagesPresent--;
  }

  /** Checks every rule in the header comment; O(groups + present pages). Tests call it after each step. */
  invariants(): void {
    let total = 0;
    let present = 0;
    let shared = 0;
    assert(this.groups.length === Math.ceil(this.pageTotal / GROUP_PAGES), 'group count matches page count');
    for (let gi = 0; gi < this.groups.length; gi++) {
      const g = this.groups[gi]!;
      if (g === null) continue;
      let inGroup = 0;
      for (let i = 0; i < GROUP_PAGES; i++) {
        const p = (gi << GROUP_SHIFT) + i;
        const page = g.pages[i]!;
        const list = g.lists[i]!;
        if (g.shared !== null && g.shared[i] !== 0) {
          assert(page !== null, `page ${p} flagged shared is not dense`);
          shared++;
        }
        if (page === null && list === null) {
          assert(g.counts[i] === 0, `absent page ${p} has count ${g.counts[i]}`);
          continue;
        }
        assert(page === null || list === null, `page ${p} is both dense and sparse`);
        assert(p < this.pageTotal, `page ${p} past the end`);
        inGroup++;
        let n = 0;
        if (page !== null) {
          for (let w = 0; w < BITMAP_PAGE_WORDS; w++) n += popcount32(page[w]!);
          assert(n > SPARSE_BITS_MIN, `dense page ${p} holds only ${n} bits`);
        } else {
          n = list!.length;
          assert(n > 0 && n <= SPARSE_BITS_MAX, `sparse page ${p} holds ${n} bits`);
          for (let k = 0; k < n; k++) {
            const off = list![k]!;
            assert(Number.isInteger(off) && off >= 0 && off < BITMAP_PAGE_BITS && (k === 0 || off > list![k - 1]!), `sparse page ${p} offsets not sorted in range`);
          }
          assert(p * BITMAP_PAGE_BITS + list![n - 1]! < this.bitsTotal, 'bit set past the end');
        }
        assert(n === g.counts[i], `page ${p} count ${g.counts[i]} ≠ popcount ${n}`);
        total += n;
      }
      assert(inGroup === g.present, `group ${gi} present count`);
      present += inGroup;
    }
    assert(present === this.pagesPresent, 'present page count');
    assert(shared === this.sharedPages, `shared page count ${this.sharedPages} ≠ ${shared}`);
    assert(total === this.setCount, `set count ${this.setCount} ≠ ${total}`);
    if (this.pageTotal > 0) {
      const g = this.groups[(this.pageTotal - 1) >>> GROUP_SHIFT];
      const last = g ? g.pages[(this.pageTotal - 1) & GROUP_MASK]! : null;
      if (last) {
        for (let b = this.bitsTotal - (this.pageTotal - 1) * BITMAP_PAGE_BITS; b < BITMAP_PAGE_BITS; b++) {
          assert((last[b >>> 5]! & (1 << (b & 31))) === 0, 'bit set past the end');
        }
      }
    }
    if (this.dirtyFlags !== null) {
      let flagged = 0;
      for (let p = 0; p < this.pageTotal; p++) flagged += this.dirtyFlags[p]!;
      assert(flagged === this.dirtyCount, 'dirty list and flags agree');
    }
  }
}

function listHas(list: SparsePage, off: number): boolean {
  const k = lowerBound(list, off);
  return k < list.length && list[k] === off;
}
