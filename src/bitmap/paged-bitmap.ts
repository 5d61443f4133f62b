// Why: every piece of the volume engine (the change log's active and frozen sets, the
// validity bitmap, each snapshot's bitmap and meta bitmap) is a set of tracking blocks
// over a volume that may be terabytes large and is mostly untouched. A flat bitmap of a
// 16 TiB volume at 4 KiB blocks is 512 MiB; this one costs memory only for the regions
// that hold a set bit (seed 001 FIG. 43: a page table whose empty entries cost nothing).
//
// States, per bit: 0 (clear) or 1 (set). Per page (BITMAP_PAGE_BITS bits):
//   absent  - page table entry is null; every bit of the page reads 0; no memory.
//   present - a Uint32Array of BITMAP_PAGE_WORDS words holding at least one set bit.
// Rules (checked by invariants()):
//   - a page is present ⇔ its count of set bits is > 0 (a page whose last bit is
//     cleared is released at once, so "cleared" regions cost nothing either);
//   - pageCounts[p] = popcount of page p; setCount = Σ pageCounts;
//   - no bit at or past bitsTotal is ever set;
//   - with dirty tracking on: a page whose bits changed since the last takeDirtyPages()
//     is listed exactly once in the dirty list (persistence writes only those pages);
//   - a present page may be shared with other bitmaps (shareClone(): a snapshot's meta
//     bitmap shares the validity bitmap's pages); a shared page is never written in
//     place: the first change copies it (copy-on-write), so sharing costs nothing until
//     the bitmaps diverge, and then one page per page changed.
//
// The hot calls (set / test of one bit) allocate nothing once a page exists: a typed-array
// page, a shift and a mask. Bit indexes are < 2^32 (asserted), so >>> is safe.

import { assert, AssertionError } from '../util/assert.js';

export const BITMAP_PAGE_BYTES = 4096;
export const BITMAP_PAGE_WORDS = BITMAP_PAGE_BYTES / 4;
export const BITMAP_PAGE_BITS = BITMAP_PAGE_BYTES * 8;
const PAGE_SHIFT = 15; // log2(BITMAP_PAGE_BITS)
const WORD_MASK_IN_PAGE = BITMAP_PAGE_WORDS - 1;
/** Largest number of bits a bitmap may have (block indexes are unsigned 32-bit). */
export const BITMAP_BITS_MAX = 2 ** 32;
/** Released pages kept for reuse, so a bitmap that fills and empties does not churn the GC. */
const FREE_PAGES_KEPT_MAX = 8;

assert(1 << PAGE_SHIFT === BITMAP_PAGE_BITS, 'page shift matches page size');

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
  private readonly pages: (Uint32Array | null)[];
  private pageCounts: Uint32Array;
  private setCount = 0;
  private pagesPresent = 0;
  private readonly freePages: Uint32Array[] = [];
  /** Dirty tracking (persistence): a flag per page and the list of flagged pages. */
  private dirtyFlags: Uint8Array | null;
  /** Per page: 1 when the page array may also be referenced by another bitmap. */
  private shared: Uint8Array | null = null;
  private dirtyList: Uint32Array | null;
  private dirtyCount = 0;

  constructor(bitsTotal: number, options: { trackDirty?: boolean } = {}) {
    assert(Number.isInteger(bitsTotal) && bitsTotal >= 0 && bitsTotal <= BITMAP_BITS_MAX, `bitmap size ${bitsTotal} out of range`);
    this.bits = bitsTotal;
    this.pageCount = Math.ceil(bitsTotal / BITMAP_PAGE_BITS);
    this.pages = new Array<Uint32Array | null>(this.pageTotal).fill(null);
    this.pageCounts = new Uint32Array(this.pageTotal);
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
      for (let p = this.pageCount; p < pages; p++) this.pages.push(null);
      const counts = new Uint32Array(pages);
      counts.set(this.pageCounts);
      this.pageCounts = counts;
      if (this.dirtyFlags !== null) {
        const flags = new Uint8Array(pages);
        flags.set(this.dirtyFlags);
        this.dirtyFlags = flags;
      }
      if (this.shared !== null) {
        const flags = new Uint8Array(pages);
        flags.set(this.shared);
        this.shared = flags;
      }
      this.pageCount = pages;
    }
    this.bits = bitsTotal;
  }

  // ---- single bits (the write path) ----

  test(bit: number): boolean {
    const page = this.pages[bit >>> PAGE_SHIFT];
    if (page === null || page === undefined) return false;
    return (page[(bit >>> 5) & WORD_MASK_IN_PAGE]! & (1 << (bit & 31))) !== 0;
  }

  /** Sets a bit; true if it was clear. */
  set(bit: number): boolean {
    if (!(bit >= 0 && bit < this.bitsTotal)) throw new AssertionError(`bit ${bit} outside bitmap of ${this.bitsTotal}`);
    const p = bit >>> PAGE_SHIFT;
    let page = this.pages[p]!;
    if (page === null) page = this.allocPage(p);
    const w = (bit >>> 5) & WORD_MASK_IN_PAGE;
    const mask = 1 << (bit & 31);
    const old = page[w]!;
    if ((old & mask) !== 0) return false;
    if (this.shared !== null && this.shared[p] !== 0) page = this.own(p);
    page[w] = old | mask;
    this.pageCounts[p]!++;
    this.setCount++;
    if (this.dirtyFlags !== null) this.markDirty(p);
    return true;
  }

  /** Clears a bit; true if it was set. */
  clear(bit: number): boolean {
    if (!(bit >= 0 && bit < this.bitsTotal)) throw new AssertionError(`bit ${bit} outside bitmap of ${this.bitsTotal}`);
    const p = bit >>> PAGE_SHIFT;
    let page = this.pages[p]!;
    if (page === null) return false;
    const w = (bit >>> 5) & WORD_MASK_IN_PAGE;
    const mask = 1 << (bit & 31);
    const old = page[w]!;
    if ((old & mask) === 0) return false;
    if (this.shared !== null && this.shared[p] !== 0) page = this.own(p);
    page[w] = old & ~mask;
    this.setCount--;
    if (this.dirtyFlags !== null) this.markDirty(p);
    if (--this.pageCounts[p]! === 0) this.releasePage(p);
    return true;
  }

  // ---- ranges ----

  setRange(start: number, count: number): void {
    this.checkRange(start, count);
    this.forWordSpans(start, count, (p, w, mask) => {
      let page = this.pages[p]!;
      if (page === null) page = this.allocPage(p);
      const old = page[w]!;
      const added = popcount32(mask & ~old);
      if (added === 0) return;
      if (this.shared !== null && this.shared[p] !== 0) page = this.own(p);
      page[w] = (old | mask) >>> 0;
      this.pageCounts[p]! += added;
      this.setCount += added;
      if (this.dirtyFlags !== null) this.markDirty(p);
    });
  }

  clearRange(start: number, count: number): void {
    this.checkRange(start, count);
    this.forWordSpans(start, count, (p, w, mask) => {
      let page = this.pages[p]!;
      if (page === null) return;
      const old = page[w]!;
      const removed = popcount32(mask & old);
      if (removed === 0) return;
      if (this.shared !== null && this.shared[p] !== 0) page = this.own(p);
      page[w] = (old & ~mask) >>> 0;
      this.setCount -= removed;
      if (this.dirtyFlags !== null) this.markDirty(p);
      this.pageCounts[p]! -= removed;
      if (this.pageCounts[p] === 0) this.releasePage(p);
    });
  }

  /** Number of set bits in [start, start+count). */
  countRange(start: number, count: number): number {
    this.checkRange(start, count);
    let n = 0;
    this.forWordSpans(start, count, (p, w, mask) => {
      const page = this.pages[p]!;
      if (page !== null) n += popcount32(page[w]! & mask);
    });
    return n;
  }

  /** Calls fn(page, wordInPage, mask) for each word overlapping [start, start+count). */
  private forWordSpans(start: number, count: number, fn: (p: number, w: number, mask: number) => void): void {
    let bit = start;
    const end = start + count;
    while (bit < end) {
      const inWord = bit & 31;
      const take = Math.min(32 - inWord, end - bit);
      // Whole absent pages are skipped by the callbacks themselves; whole words are one call.
      fn(bit >>> PAGE_SHIFT, (bit >>> 5) & WORD_MASK_IN_PAGE, wordMask(inWord, inWord + take));
      bit += take;
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

  /** The first set bit at or after `from`, or -1. Skips absent pages whole. */
  nextSet(from: number): number {
    if (from < 0) from = 0;
    if (from >= this.bitsTotal) return -1;
    let p = from >>> PAGE_SHIFT;
    let w = (from >>> 5) & WORD_MASK_IN_PAGE;
    let skipMask = ~(((1 << (from & 31)) - 1) >>> 0); // bits below `from` in its word are ignored
    for (; p < this.pageTotal; p++, w = 0, skipMask = -1) {
      const page = this.pages[p]!;
      if (page === null) continue;
      for (; w < BITMAP_PAGE_WORDS; w++, skipMask = -1) {
        const word = page[w]! & skipMask;
        if (word !== 0) {
          const bit = p * BITMAP_PAGE_BITS + w * 32 + lowestBit(word);
          return bit < this.bitsTotal ? bit : -1;
        }
      }
    }
    return -1;
  }

  /** The first clear bit at or after `from`, or bitsTotal. */
  nextClear(from: number): number {
    if (from < 0) from = 0;
    if (from >= this.bitsTotal) return this.bitsTotal;
    let p = from >>> PAGE_SHIFT;
    let w = (from >>> 5) & WORD_MASK_IN_PAGE;
    let forceMask = ((1 << (from & 31)) - 1) >>> 0; // bits below `from` count as set
    for (; p < this.pageTotal; p++, w = 0, forceMask = 0) {
      const page = this.pages[p]!;
      if (page === null) return Math.max(from, p * BITMAP_PAGE_BITS);
      for (; w < BITMAP_PAGE_WORDS; w++, forceMask = 0) {
        const word = ~(page[w]! | forceMask);
        if (word !== 0) return Math.min(this.bitsTotal, p * BITMAP_PAGE_BITS + w * 32 + lowestBit(word));
      }
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

  // ---- whole-bitmap operations (cuts, merges, snapshots) ----

  /** this |= other. Sizes may differ: bits past this bitmap's end must be clear in other. */
  union(other: PagedBitmap): void {
    const pagesN = Math.min(this.pageTotal, other.pageTotal);
    for (let p = 0; p < other.pageTotal; p++) {
      const src = other.pages[p]!;
      if (src === null) continue;
      assert(p < pagesN, 'union: other has bits past this bitmap');
      let dst = this.pages[p]!;
      if (dst === null) {
        dst = this.allocPage(p);
        dst.set(src);
        this.pageCounts[p] = other.pageCounts[p]!;
        this.setCount += other.pageCounts[p]!;
        if (this.dirtyFlags !== null) this.markDirty(p);
        continue;
      }
      let n = 0;
      let changed = false;
      if (this.shared !== null && this.shared[p] !== 0) dst = this.own(p);
      for (let w = 0; w < BITMAP_PAGE_WORDS; w++) {
        const v = (dst[w]! | src[w]!) >>> 0;
        if (v !== dst[w]) {
          dst[w] = v;
          changed = true;
        }
        n += popcount32(v);
      }
      if (changed) {
        this.setCount += n - this.pageCounts[p]!;
        this.pageCounts[p] = n;
        if (this.dirtyFlags !== null) this.markDirty(p);
      }
    }
  }

  /** this &= ~other. */
  difference(other: PagedBitmap): void {
    const pagesN = Math.min(this.pageTotal, other.pageTotal);
    for (let p = 0; p < pagesN; p++) {
      const src = other.pages[p]!;
      let dst = this.pages[p]!;
      if (src === null || dst === null) continue;
      if (this.shared !== null && this.shared[p] !== 0) dst = this.own(p);
      let n = 0;
      let changed = false;
      for (let w = 0; w < BITMAP_PAGE_WORDS; w++) {
        const v = (dst[w]! & ~src[w]!) >>> 0;
        if (v !== dst[w]) {
          dst[w] = v;
          changed = true;
        }
        n += popcount32(v);
      }
      if (!changed) continue;
      this.setCount += n - this.pageCounts[p]!;
      this.pageCounts[p] = n;
      if (this.dirtyFlags !== null) this.markDirty(p);
      if (n === 0) this.releasePage(p);
    }
  }

  /** this &= other. */
  intersect(other: PagedBitmap): void {
    for (let p = 0; p < this.pageTotal; p++) {
      let dst = this.pages[p]!;
      if (dst === null) continue;
      if (this.shared !== null && this.shared[p] !== 0) dst = this.own(p);
      const src = p < other.pageTotal ? other.pages[p]! : null;
      let n = 0;
      if (src !== null) {
        for (let w = 0; w < BITMAP_PAGE_WORDS; w++) {
          const v = (dst[w]! & src[w]!) >>> 0;
          dst[w] = v;
          n += popcount32(v);
        }
      }
      if (n === this.pageCounts[p]) continue;
      this.setCount += n - this.pageCounts[p]!;
      this.pageCounts[p] = n;
      if (this.dirtyFlags !== null) this.markDirty(p);
      if (n === 0) this.releasePage(p);
    }
  }

  clone(options: { trackDirty?: boolean } = {}): PagedBitmap {
    const c = new PagedBitmap(this.bitsTotal, options);
    for (let p = 0; p < this.pageTotal; p++) {
      const src = this.pages[p]!;
      if (src === null) continue;
      c.pages[p] = src.slice();
      c.pageCounts[p] = this.pageCounts[p]!;
      c.pagesPresent++;
      if (c.dirtyFlags !== null) c.markDirty(p);
    }
    c.setCount = this.setCount;
    return c;
  }

  /**
   * A copy that shares every page with this bitmap until either changes it (then that
   * page is copied for the one changing it). For bitmaps that rarely diverge: a snapshot's
   * meta bitmap taken from the validity bitmap costs no page until the volume changes.
   */
  shareClone(options: { trackDirty?: boolean } = {}): PagedBitmap {
    const c = new PagedBitmap(this.bitsTotal, options);
    if (this.shared === null) this.shared = new Uint8Array(this.pageCount);
    c.shared = new Uint8Array(this.pageCount);
    for (let p = 0; p < this.pageCount; p++) {
      const page = this.pages[p]!;
      if (page === null) continue;
      c.pages[p] = page;
      c.pageCounts[p] = this.pageCounts[p]!;
      c.pagesPresent++;
      this.shared[p] = 1;
      c.shared[p] = 1;
      if (c.dirtyFlags !== null) c.markDirty(p);
    }
    c.setCount = this.setCount;
    return c;
  }

  /** Makes page p this bitmap's own (copying it if it may be shared) before a change. */
  private own(p: number): Uint32Array {
    const page = this.pages[p]!;
    this.shared![p] = 0;
    const copy = this.freePages.pop() ?? new Uint32Array(BITMAP_PAGE_WORDS);
    copy.set(page);
    this.pages[p] = copy;
    return copy;
  }

  clearAll(): void {
    for (let p = 0; p < this.pageTotal; p++) {
      if (this.pages[p] === null) continue;
      if (this.dirtyFlags !== null) this.markDirty(p);
      this.pageCounts[p] = 0;
      this.releasePage(p);
    }
    this.setCount = 0;
  }

  equals(other: PagedBitmap): boolean {
    if (this.bitsTotal !== other.bitsTotal || this.setCount !== other.setCount) return false;
    for (let p = 0; p < this.pageTotal; p++) {
      const a = this.pages[p]!;
      const b = other.pages[p]!;
      if (a === null || b === null) {
        if (a !== b) return false;
        continue;
      }
      for (let w = 0; w < BITMAP_PAGE_WORDS; w++) if (a[w] !== b[w]) return false;
    }
    return true;
  }

  // ---- memory ----

  get pagesUsed(): number {
    return this.pagesPresent;
  }

  /**
   * Bytes of memory this bitmap holds: present pages plus the page table and counters
   * (a page shared with another bitmap counts in each; see ownBytesUsed()).
   */
  bytesUsed(): number {
    const tableBytes = this.pageTotal * (8 + 4) + (this.dirtyFlags ? this.pageTotal + this.dirtyList!.byteLength : 0);
    return (this.pagesPresent + this.freePages.length) * BITMAP_PAGE_BYTES + tableBytes;
  }

  /** Like bytesUsed(), but pages shared with another bitmap are not counted. */
  ownBytesUsed(): number {
    let shared = 0;
    if (this.shared !== null) for (let p = 0; p < this.pageCount; p++) shared += this.shared[p]!;
    return this.bytesUsed() - shared * BITMAP_PAGE_BYTES;
  }

  // ---- pages, for persistence ----

  /** The live page (do not modify), or null when absent. */
  page(p: number): Readonly<Uint32Array> | null {
    return this.pages[p]!;
  }

  /** Replaces page p with `words` (all-zero words make it absent). Used when loading. */
  loadPage(p: number, words: Uint32Array): void {
    assert(p >= 0 && p < this.pageTotal && words.length === BITMAP_PAGE_WORDS, 'loadPage: bad page');
    let n = 0;
    for (let w = 0; w < BITMAP_PAGE_WORDS; w++) n += popcount32(words[w]!);
    if (p === this.pageTotal - 1 && n > 0) {
      const lastBit = this.bitsTotal - p * BITMAP_PAGE_BITS; // bits past the end must be clear
      for (let b = lastBit; b < BITMAP_PAGE_BITS; b++) assert((words[b >>> 5]! & (1 << (b & 31))) === 0, 'loadPage: bit past end');
    }
    const old = this.pageCounts[p]!;
    if (n === 0) {
      if (this.pages[p] !== null) {
        this.pageCounts[p] = 0;
        this.releasePage(p);
      }
    } else {
      let page = this.pages[p] ?? this.allocPage(p);
      if (this.shared !== null && this.shared[p] !== 0) page = this.own(p);
      page.set(words);
      this.pageCounts[p] = n;
    }
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

  private allocPage(p: number): Uint32Array {
    const page = this.freePages.pop() ?? new Uint32Array(BITMAP_PAGE_WORDS);
    this.pages[p] = page;
    this.pagesPresent++;
    return page;
  }

  private releasePage(p: number): void {
    const page = this.pages[p]!;
    this.pages[p] = null;
    this.pagesPresent--;
    if (this.shared !== null && this.shared[p] !== 0) {
      this.shared[p] = 0; // another bitmap still reads it: never recycle
      return;
    }
    if (this.freePages.length < FREE_PAGES_KEPT_MAX) {
      page.fill(0);
      this.freePages.push(page);
    }
  }

  /** Checks every rule in the header comment; O(present pages). Tests call it after each step. */
  invariants(): void {
    let total = 0;
    let present = 0;
    for (let p = 0; p < this.pageTotal; p++) {
      const page = this.pages[p]!;
      if (page === null) {
        assert(this.pageCounts[p] === 0, `absent page ${p} has count ${this.pageCounts[p]}`);
        continue;
      }
      present++;
      let n = 0;
      for (let w = 0; w < BITMAP_PAGE_WORDS; w++) n += popcount32(page[w]!);
      assert(n > 0, `present page ${p} is empty`);
      assert(n === this.pageCounts[p], `page ${p} count ${this.pageCounts[p]} ≠ popcount ${n}`);
      total += n;
    }
    assert(present === this.pagesPresent, 'present page count');
    assert(total === this.setCount, `set count ${this.setCount} ≠ ${total}`);
    if (this.pageTotal > 0) {
      const last = this.pages[this.pageTotal - 1];
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
