// Why: every piece of the volume engine (the change log's active and frozen sets, the
// validity bitmap, each snapshot's bitmap and meta bitmap) is a set of tracking blocks
// over a volume that may be terabytes large and is mostly untouched. A flat bitmap of a
// 16 TiB volume at 4 KiB blocks is 512 MiB; this one costs memory only for the regions
// that hold a set bit (seed 001 FIG. 43: a page table whose empty entries cost nothing).
//
// States, per bit: 0 (clear) or 1 (set). Per page (BITMAP_PAGE_BITS bits):
//   absent  - page table entry is null; every bit of the page reads 0; no memory.
//   present - a Uint32Array of BITMAP_PAGE_WORDS words holding at least one set bit.
// The page table has two levels: a directory of groups of GROUP_PAGES pages, each group
// made when a page in it first gets a bit. So making a bitmap, clearing it and every
// whole-bitmap scan cost in proportion to the groups holding bits, not to the volume's
// size (a flat table of a 16 TiB volume was 131072 entries, allocated at every checkpoint).
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
/** Pages per group of the page table's second level (2 MiB of bitmap, 64 GiB of volume at 4 KiB blocks). */
const GROUP_SHIFT = 9;
export const BITMAP_GROUP_PAGES = 1 << GROUP_SHIFT;
const GROUP_PAGES = BITMAP_GROUP_PAGES;
const GROUP_MASK = GROUP_PAGES - 1;

/** One group of the page table: pages, their counts, and (lazily) their sharing flags. */
interface PageGroup {
  readonly pages: (Uint32Array | null)[];
  readonly counts: Uint32Array;
  /** Per page: 1 when the page array may also be referenced by another bitmap. */
  shared: Uint8Array | null;
  /** Present pages in this group. */
  present: number;
}

function newGroup(): PageGroup {
  return { pages: new Array<Uint32Array | null>(GROUP_PAGES).fill(null), counts: new Uint32Array(GROUP_PAGES), shared: null, present: 0 };
}

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
  /** First level of the page table: null where no page of the group was ever set. */
  private readonly groups: (PageGroup | null)[];
  private setCount = 0;
  private pagesPresent = 0;
  /** Pages that may be shared with another bitmap (0: skip every sharing check). */
  private sharedPages = 0;
  private readonly freePages: Uint32Array[] = [];
  /** Dirty tracking (persistence): a flag per page and the list of flagged pages. */
  private dirtyFlags: Uint8Array | null;
  private dirtyList: Uint32Array | null;
  private dirtyCount = 0;

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
    const p = bit >>> PAGE_SHIFT;
    const g = this.groups[p >>> GROUP_SHIFT];
    if (g === null || g === undefined) return false;
    const page = g.pages[p & GROUP_MASK]!;
    if (page === null) return false;
    return (page[(bit >>> 5) & WORD_MASK_IN_PAGE]! & (1 << (bit & 31))) !== 0;
  }

  /** Sets a bit; true if it was clear. */
  set(bit: number): boolean {
    if (!(bit >= 0 && bit < this.bitsTotal)) throw new AssertionError(`bit ${bit} outside bitmap of ${this.bitsTotal}`);
    const p = bit >>> PAGE_SHIFT;
    const g = this.groups[p >>> GROUP_SHIFT] ?? this.allocGroup(p);
    const i = p & GROUP_MASK;
    let page = g.pages[i]!;
    if (page === null) page = this.allocPage(g, p);
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
    const p = bit >>> PAGE_SHIFT;
    const g = this.groups[p >>> GROUP_SHIFT];
    if (g === null || g === undefined) return false;
    const i = p & GROUP_MASK;
    let page = g.pages[i]!;
    if (page === null) return false;
    const w = (bit >>> 5) & WORD_MASK_IN_PAGE;
    const mask = 1 << (bit & 31);
    const old = page[w]!;
    if ((old & mask) === 0) return false;
    if (this.sharedPages !== 0 && g.shared !== null && g.shared[i] !== 0) page = this.own(g, i);
    page[w] = old & ~mask;
    this.setCount--;
    if (this.dirtyFlags !== null) this.markDirty(p);
    if (--g.counts[i]! === 0) this.releasePage(g, p);
    return true;
  }

  // ---- ranges ----

  setRange(start: number, count: number): void {
    this.checkRange(start, count);
    this.forWordSpans(start, count, (p, w, mask) => {
      const g = this.groups[p >>> GROUP_SHIFT] ?? this.allocGroup(p);
      const i = p & GROUP_MASK;
      let page = g.pages[i]!;
      if (page === null) page = this.allocPage(g, p);
      const old = page[w]!;
      const added = popcount32(mask & ~old);
      if (added === 0) return;
      if (this.sharedPages !== 0 && g.shared !== null && g.shared[i] !== 0) page = this.own(g, i);
      page[w] = (old | mask) >>> 0;
      g.counts[i]! += added;
      this.setCount += added;
      if (this.dirtyFlags !== null) this.markDirty(p);
    });
  }

  clearRange(start: number, count: number): void {
    this.checkRange(start, count);
    this.forWordSpans(start, count, (p, w, mask) => {
      const g = this.groups[p >>> GROUP_SHIFT];
      if (g === null || g === undefined) return;
      const i = p & GROUP_MASK;
      let page = g.pages[i]!;
      if (page === null) return;
      const old = page[w]!;
      const removed = popcount32(mask & old);
      if (removed === 0) return;
      if (this.sharedPages !== 0 && g.shared !== null && g.shared[i] !== 0) page = this.own(g, i);
      page[w] = (old & ~mask) >>> 0;
      this.setCount -= removed;
      if (this.dirtyFlags !== null) this.markDirty(p);
      g.counts[i]! -= removed;
      if (g.counts[i] === 0) this.releasePage(g, p);
    });
  }

  /** Number of set bits in [start, start+count). */
  countRange(start: number, count: number): number {
    this.checkRange(start, count);
    let n = 0;
    this.forWordSpans(start, count, (p, w, mask) => {
      const page = this.pageOrNull(p);
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

  private pageOrNull(p: number): Uint32Array | null {
    const g = this.groups[p >>> GROUP_SHIFT];
    if (g === null || g === undefined) return null;
    return g.pages[p & GROUP_MASK]!;
  }

  // ---- scanning, in block order ----

  count(): number {
    return this.setCount;
  }

  /** The first set bit at or after `from`, or -1. Skips absent groups and pages whole. */
  nextSet(from: number): number {
    if (from < 0) from = 0;
    if (from >= this.bitsTotal) return -1;
    let p = from >>> PAGE_SHIFT;
    let w = (from >>> 5) & WORD_MASK_IN_PAGE;
    let skipMask = ~(((1 << (from & 31)) - 1) >>> 0); // bits below `from` in its word are ignored
    while (p < this.pageTotal) {
      const g = this.groups[p >>> GROUP_SHIFT]!;
      if (g === null || g.present === 0) {
        p = ((p >>> GROUP_SHIFT) + 1) << GROUP_SHIFT;
        w = 0;
        skipMask = -1;
        continue;
      }
      const page = g.pages[p & GROUP_MASK]!;
      if (page !== null) {
        for (; w < BITMAP_PAGE_WORDS; w++, skipMask = -1) {
          const word = page[w]! & skipMask;
          if (word !== 0) {
            const bit = p * BITMAP_PAGE_BITS + w * 32 + lowestBit(word);
            return bit < this.bitsTotal ? bit : -1;
          }
        }
      }
      p++;
      w = 0;
      skipMask = -1;
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
      const page = this.pageOrNull(p);
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

  /** Visits every present page in order; O(groups + present pages), not O(volume size). */
  forEachPage(visit: (p: number, page: Readonly<Uint32Array>) => void): void {
    for (let gi = 0; gi < this.groups.length; gi++) {
      const g = this.groups[gi]!;
      if (g === null || g.present === 0) continue;
      const base = gi << GROUP_SHIFT;
      for (let i = 0; i < GROUP_PAGES; i++) {
        const page = g.pages[i]!;
        if (page !== null) visit(base + i, page);
      }
    }
  }

  /** Indexes of the present pages, in order. */
  presentPages(): number[] {
    const out: number[] = [];
    this.forEachPage((p) => out.push(p));
    return out;
  }

  // ---- whole-bitmap operations (cuts, merges, snapshots) ----

  /** this |= other. Sizes may differ: bits past this bitmap's end must be clear in other. */
  union(other: PagedBitmap): void {
    other.forEachPage((p, src) => {
      assert(p < this.pageTotal, 'union: other has bits past this bitmap');
      const g = this.groups[p >>> GROUP_SHIFT] ?? this.allocGroup(p);
      const i = p & GROUP_MASK;
      let dst = g.pages[i]!;
      const srcCount = other.groups[p >>> GROUP_SHIFT]!.counts[i]!;
      if (dst === null) {
        dst = this.allocPage(g, p);
        dst.set(src);
        g.counts[i] = srcCount;
        this.setCount += srcCount;
        if (this.dirtyFlags !== null) this.markDirty(p);
        return;
      }
      let n = 0;
      let changed = false;
      if (this.sharedPages !== 0 && g.shared !== null && g.shared[i] !== 0) dst = this.own(g, i);
      for (let w = 0; w < BITMAP_PAGE_WORDS; w++) {
        const v = (dst[w]! | src[w]!) >>> 0;
        if (v !== dst[w]) {
          dst[w] = v;
          changed = true;
        }
        n += popcount32(v);
      }
      if (changed) {
        this.setCount += n - g.counts[i]!;
        g.counts[i] = n;
        if (this.dirtyFlags !== null) this.markDirty(p);
      }
    });
  }

  /** this &= ~other. */
  difference(other: PagedBitmap): void {
    other.forEachPage((p, src) => {
      if (p >= this.pageTotal) return;
      const g = this.groups[p >>> GROUP_SHIFT]!;
      if (g === null) return;
      const i = p & GROUP_MASK;
      let dst = g.pages[i]!;
      if (dst === null) return;
      if (this.sharedPages !== 0 && g.shared !== null && g.shared[i] !== 0) dst = this.own(g, i);
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
      if (!changed) return;
      this.setCount += n - g.counts[i]!;
      g.counts[i] = n;
      if (this.dirtyFlags !== null) this.markDirty(p);
      if (n === 0) this.releasePage(g, p);
    });
  }

  /** this &= other. */
  intersect(other: PagedBitmap): void {
    for (const p of this.presentPages()) {
      const g = this.groups[p >>> GROUP_SHIFT]!;
      const i = p & GROUP_MASK;
      let dst = g.pages[i]!;
      if (this.sharedPages !== 0 && g.shared !== null && g.shared[i] !== 0) dst = this.own(g, i);
      const src = p < other.pageTotal ? other.pageOrNull(p) : null;
      let n = 0;
      if (src !== null) {
        for (let w = 0; w < BITMAP_PAGE_WORDS; w++) {
          const v = (dst[w]! & src[w]!) >>> 0;
          dst[w] = v;
          n += popcount32(v);
        }
      }
      if (n === g.counts[i]) continue;
      this.setCount += n - g.counts[i]!;
      g.counts[i] = n;
      if (this.dirtyFlags !== null) this.markDirty(p);
      if (n === 0) this.releasePage(g, p);
    }
  }

  clone(options: { trackDirty?: boolean } = {}): PagedBitmap {
    const c = new PagedBitmap(this.bitsTotal, options);
    this.forEachPage((p, src) => {
      const g = c.groups[p >>> GROUP_SHIFT] ?? c.allocGroup(p);
      const i = p & GROUP_MASK;
      g.pages[i] = src.slice();
      g.counts[i] = this.groups[p >>> GROUP_SHIFT]!.counts[i]!;
      g.present++;
      c.pagesPresent++;
      if (c.dirtyFlags !== null) c.markDirty(p);
    });
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
    this.forEachPage((p, page) => {
      const mine = this.groups[p >>> GROUP_SHIFT]!;
      const theirs = c.groups[p >>> GROUP_SHIFT] ?? c.allocGroup(p);
      const i = p & GROUP_MASK;
      theirs.pages[i] = page as Uint32Array;
      theirs.counts[i] = mine.counts[i]!;
      theirs.present++;
      c.pagesPresent++;
      mine.shared ??= new Uint8Array(GROUP_PAGES);
      theirs.shared ??= new Uint8Array(GROUP_PAGES);
      if (mine.shared[i] === 0) this.sharedPages++;
      mine.shared[i] = 1;
      theirs.shared[i] = 1;
      c.sharedPages++;
      if (c.dirtyFlags !== null) c.markDirty(p);
    });
    c.setCount = this.setCount;
    return c;
  }

  /** Makes page i of group g this bitmap's own (copying it, as it may be shared) before a change. */
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
    for (const p of this.presentPages()) {
      const g = this.groups[p >>> GROUP_SHIFT]!;
      if (this.dirtyFlags !== null) this.markDirty(p);
      g.counts[p & GROUP_MASK] = 0;
      this.releasePage(g, p);
    }
    // Groups go too, unless a dirty flag still points into them (they are cheap to keep).
    if (this.dirtyFlags === null) this.groups.fill(null);
    this.setCount = 0;
  }

  equals(other: PagedBitmap): boolean {
    if (this.bitsTotal !== other.bitsTotal || this.setCount !== other.setCount || this.pagesPresent !== other.pagesPresent) return false;
    let same = true;
    this.forEachPage((p, a) => {
      if (!same) return;
      const b = other.pageOrNull(p);
      if (b === null) {
        same = false;
        return;
      }
      for (let w = 0; w < BITMAP_PAGE_WORDS; w++) {
        if (a[w] !== b[w]) {
          same = false;
          return;
        }
      }
    });
    return same;
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
    let groupsMade = 0;
    for (const g of this.groups) if (g !== null) groupsMade++;
    const tableBytes = this.groups.length * 8 + groupsMade * GROUP_PAGES * (8 + 4 + 1) + (this.dirtyFlags ? this.pageTotal + this.dirtyList!.byteLength : 0);
    return (this.pagesPresent + this.freePages.length) * BITMAP_PAGE_BYTES + tableBytes;
  }

  /** Like bytesUsed(), but pages shared with another bitmap are not counted. */
  ownBytesUsed(): number {
    return this.bytesUsed() - this.sharedPages * BITMAP_PAGE_BYTES;
  }

  // ---- pages, for persistence ----

  /** The live page (do not modify), or null when absent. */
  page(p: number): Readonly<Uint32Array> | null {
    return this.pageOrNull(p);
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
    const g = this.groups[p >>> GROUP_SHIFT] ?? (n === 0 ? null : this.allocGroup(p));
    const i = p & GROUP_MASK;
    const old = g === null ? 0 : g.counts[i]!;
    if (n === 0) {
      if (g !== null && g.pages[i] !== null) {
        g.counts[i] = 0;
        this.releasePage(g, p);
      }
    } else {
      let page = g!.pages[i] ?? this.allocPage(g!, p);
      if (g!.shared !== null && g!.shared[i] !== 0) page = this.own(g!, i);
      page.set(words);
      g!.counts[i] = n;
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

  private allocGroup(p: number): PageGroup {
    const g = newGroup();
    this.groups[p >>> GROUP_SHIFT] = g;
    return g;
  }

  private allocPage(g: PageGroup, p: number): Uint32Array {
    const page = this.freePages.pop() ?? new Uint32Array(BITMAP_PAGE_WORDS);
    g.pages[p & GROUP_MASK] = page;
    g.present++;
    this.pagesPresent++;
    return page;
  }

  private releasePage(g: PageGroup, p: number): void {
    const i = p & GROUP_MASK;
    const page = g.pages[i]!;
    g.pages[i] = null;
    g.present--;
    this.pagesPresent--;
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
        if (g.shared !== null && g.shared[i] !== 0) {
          assert(page !== null, `absent page ${p} flagged shared`);
          shared++;
        }
        if (page === null) {
          assert(g.counts[i] === 0, `absent page ${p} has count ${g.counts[i]}`);
          continue;
        }
        assert(p < this.pageTotal, `page ${p} past the end`);
        inGroup++;
        let n = 0;
        for (let w = 0; w < BITMAP_PAGE_WORDS; w++) n += popcount32(page[w]!);
        assert(n > 0, `present page ${p} is empty`);
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
      const last = this.pageOrNull(this.pageTotal - 1);
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
