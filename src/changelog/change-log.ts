// Why: replication ships, in delta sets, the blocks changed between two cuts, each with
// its content as of the later cut (seed 001, the text after FIG. 10: "a queue of two
// bit-map tables"). This module is only the bookkeeping of those two bitmaps; the volume
// engine does the copying, so it can be tested without disks.
//
// Bitmaps and their states, per tracking block b:
//   active[b]   - b was written (or trimmed/zeroed) since the last cut.
//   frozen[b]   - b belongs to the delta set being built (its membership; never changes
//                 while the set is built).
//   uncopied[b] - b belongs to that set and its as-of-cut content has not been copied out
//                 yet. uncopied ⊆ frozen. A write to b while uncopied[b] copies b first
//                 (priority copy), so the set is exactly the volume as of the cut.
// Phases: idle (frozen = uncopied = null) → building (after cut()) → idle again by
//   complete() (the set is durable elsewhere; its bits are forgotten) or
//   abort() (frozen is merged back into active: nothing forgotten).
// Persistence: the durable "pending" bitmap is active ∪ frozen (what is not yet safely
// in a delta set); pendingPage() computes a page of it for the bitmap file.

import { assert, AssertionError } from '../util/assert.js';
import { DeltavolError } from '../util/errors.js';
import { BITMAP_PAGE_BITS, BITMAP_PAGE_WORDS, PagedBitmap, type ReadonlyBitmap } from '../bitmap/paged-bitmap.js';

export interface CutOptions {
  /** At most this many blocks go into the set (the first ones in block order). */
  blocksMax?: number;
  /** Blocks the set carries besides the changed ones (a catch-up after a split). */
  extra?: PagedBitmap;
}

export class ChangeLog {
  private activeMap: PagedBitmap;
  private frozenMap: PagedBitmap | null = null;
  private uncopiedMap: PagedBitmap | null = null;
  /** Pages whose pending value changed outside active/frozen dirty tracking (complete()). */
  private readonly extraDirty: PagedBitmap;
  private building = 0;

  constructor(
    public blocksTotal: number,
    /** Pending blocks recovered from disk (they start in active). */
    recovered?: PagedBitmap,
  ) {
    this.activeMap = recovered ?? new PagedBitmap(blocksTotal, { trackDirty: true });
    assert(this.activeMap.bitsTotal === blocksTotal, 'recovered bitmap size');
    this.extraDirty = new PagedBitmap(this.activeMap.pageTotal);
  }

  get active(): ReadonlyBitmap {
    return this.activeMap;
  }
  get frozen(): ReadonlyBitmap | null {
    return this.frozenMap;
  }
  /** Number of the set being built (0 when idle). */
  get buildingSet(): number {
    return this.building;
  }

  /** The volume grew; refused by the engine while a set is being built. */
  grow(blocksTotal: number): void {
    assert(this.frozenMap === null, 'grow while building a delta set');
    this.activeMap.grow(blocksTotal);
    this.extraDirty.grow(this.activeMap.pageTotal);
    this.blocksTotal = blocksTotal;
  }

  // ---- the write path ----

  /** Records blocks [first, last] as changed. */
  markChanged(first: number, last: number): void {
    if (first === last) this.activeMap.set(first);
    else this.activeMap.setRange(first, last - first + 1);
  }

  /** Whether b must be copied out (as of the cut) before it may be overwritten. */
  needsCopy(b: number): boolean {
    return this.uncopiedMap !== null && this.uncopiedMap.test(b);
  }

  /** True when some block of the set being built still waits to be copied. */
  get copying(): boolean {
    return this.uncopiedMap !== null && this.uncopiedMap.count() > 0;
  }

  markCopied(b: number): void {
    assert(this.uncopiedMap !== null, 'markCopied while idle');
    const was = this.uncopiedMap.clear(b);
    if (!was) throw new AssertionError(`block ${b} copied twice`);
  }

  /** markCopied for blocks start..start+count-1 (each must still wait for its copy). */
  markCopiedRange(start: number, count: number): void {
    assert(this.uncopiedMap !== null, 'markCopied while idle');
    if (this.uncopiedMap.countRange(start, count) !== count) throw new AssertionError(`a block of ${start}+${count} copied twice`);
    this.uncopiedMap.clearRange(start, count);
  }

  /** The first block at or after `from` that needs no copy (end of a run of uncopied blocks). */
  nextCopiedOrEnd(from: number): number {
    if (this.uncopiedMap === null) return from;
    const c = this.uncopiedMap.nextClear(from);
    return c < 0 ? this.blocksTotal : c;
  }

  /** The next block still to copy at or after `from`, or -1 (the background builder). */
  nextUncopied(from: number): number {
    return this.uncopiedMap === null ? -1 : this.uncopiedMap.nextSet(from);
  }

  // ---- cuts ----

  /**
   * Swaps the bitmaps: what was written so far becomes delta set `setNumber`. The caller
   * guarantees the consistent point (no write between marking and data in flight).
   */
  cut(setNumber: number, options: CutOptions = {}): ReadonlyBitmap {
    if (this.frozenMap !== null) throw new DeltavolError('DELTA_SET_BUSY', `delta set ${this.building} is still being built`);
    assert(setNumber > 0, 'delta set numbers start at 1');
    const { blocksMax, extra } = options;
    const whole = this.activeMap;
    if (blocksMax !== undefined && whole.count() > blocksMax) {
      // A partial set: the first blocksMax changed blocks (block order); the rest stay active.
      assert(blocksMax > 0, 'a partial set holds at least one block');
      // Page by page: 4k random writes leave one run per block, and building an array of
      // every run here held every write for 2.7 ms (p50) at each cut of a busy pair. Only
      // the pages up to the set's end are copied (a large backlog's others stay where they are).
      const end = whole.endOfFirst(blocksMax);
      const part = new PagedBitmap(this.blocksTotal, { trackDirty: true });
      for (let b = whole.nextSet(0); b >= 0 && b < end; ) {
        const p = Math.floor(b / BITMAP_PAGE_BITS);
        part.loadPage(p, whole.page(p)!);
        b = whole.nextSet((p + 1) * BITMAP_PAGE_BITS);
      }
      const lastPageEnd = Math.min(this.blocksTotal, (Math.floor((end - 1) / BITMAP_PAGE_BITS) + 1) * BITMAP_PAGE_BITS);
      part.clearRange(end, lastPageEnd - end);
      whole.clearRange(0, end);
      // The pending bitmap (active ∪ frozen) is unchanged by the split.
      part.takeDirtyPages();
      this.frozenMap = part;
    } else {
      this.frozenMap = whole;
      this.activeMap = new PagedBitmap(this.blocksTotal, { trackDirty: true });
    }
    if (extra) {
      assert(extra.bitsTotal <= this.blocksTotal, 'extra blocks inside the volume');
      this.frozenMap.union(extra);
    }
    this.uncopiedMap = this.frozenMap.clone();
    this.building = setNumber;
    return this.frozenMap;
  }

  /** Forgets every change recorded so far (nothing is being built): a fresh start. */
  discardAll(): void {
    assert(this.frozenMap === null, 'discard while building a delta set');
    const old = this.activeMap;
    for (const p of old.presentPages()) this.extraDirty.set(p);
    this.activeMap = new PagedBitmap(this.blocksTotal, { trackDirty: true });
  }

  /** Nothing of the set being built needs copying (its data travelled another way: a sync stream). */
  markAllCopied(): void {
    assert(this.uncopiedMap !== null, 'markAllCopied while idle');
    this.uncopiedMap.clearAll();
  }

  /** The set is durable in its destination: forget its blocks (active keeps later writes). */
  complete(): void {
    assert(this.frozenMap !== null && this.uncopiedMap !== null, 'complete while idle');
    assert(this.uncopiedMap.count() === 0, 'complete before every block was copied');
    const frozen = this.frozenMap;
    for (const p of frozen.presentPages()) this.extraDirty.set(p);
    for (const p of frozen.takeDirtyPages()) this.extraDirty.set(p);
    this.frozenMap = null;
    this.uncopiedMap = null;
    this.building = 0;
  }

  /** Building failed: its blocks go back into active, so the next set carries them. */
  abort(): void {
    assert(this.frozenMap !== null, 'abort while idle');
    for (const p of this.frozenMap.takeDirtyPages()) this.extraDirty.set(p);
    this.activeMap.union(this.frozenMap);
    this.frozenMap = null;
    this.uncopiedMap = null;
    this.building = 0;
  }

  // ---- persistence ----

  /** Pages of the pending bitmap (active ∪ frozen) changed since the last call, ascending. */
  takeDirtyPages(): Uint32Array {
    // Each source is ascending: merge them (after scattered writes on a large volume a
    // checkpoint takes one page per write, and a Set plus a sort was a tenth of its cost).
    let pages = this.activeMap.takeDirtyPages();
    if (this.frozenMap) pages = mergeAscending(pages, this.frozenMap.takeDirtyPages());
    if (this.extraDirty.count() > 0) {
      const extra: number[] = [];
      this.extraDirty.forEachRun((s, c) => {
        for (let p = s; p < s + c; p++) extra.push(p);
      });
      this.extraDirty.clearAll();
      pages = mergeAscending(pages, Uint32Array.from(extra));
    }
    return pages;
  }

  /** Writes page p of active ∪ frozen into `out`; false when it is all zeroes. */
  pendingPage(p: number, out: Uint32Array): boolean {
    const a = this.activeMap.page(p);
    const f = this.frozenMap?.page(p) ?? null;
    if (a === null && f === null) return false;
    if (f === null) out.set(a!);
    else if (a === null) out.set(f);
    else for (let w = 0; w < BITMAP_PAGE_WORDS; w++) out[w] = a[w]! | f[w]!;
    return true;
  }

  /**
   * Page p of active ∪ frozen as sorted offsets when that is one sparse page as held in
   * memory (only active has bits there and holds them sparse); null otherwise (then use
   * pendingPage()).
   */
  pendingOffsets(p: number): readonly number[] | null {
    if (this.frozenMap !== null && this.frozenMap.pageBitCount(p) !== 0) return null;
    return this.activeMap.sparseOffsets(p);
  }

  /** Every block not yet safely in a delta set (tests, status). */
  pending(): PagedBitmap {
    const all = this.activeMap.clone();
    if (this.frozenMap) all.union(this.frozenMap);
    return all;
  }

  invariants(): void {
    this.activeMap.invariants();
    assert((this.frozenMap === null) === (this.uncopiedMap === null), 'frozen and uncopied go together');
    if (this.frozenMap && this.uncopiedMap) {
      this.frozenMap.invariants();
      this.uncopiedMap.invariants();
      const extra = this.uncopiedMap.clone();
      extra.difference(this.frozenMap);
      assert(extra.count() === 0, 'uncopied ⊆ frozen');
    }
  }
}

/** The sorted union of two ascending lists without repeats. */
function mergeAscending(a: Uint32Array, b: Uint32Array): Uint32Array {
  if (b.length === 0) return a;
  if (a.length === 0) return b;
  const out = new Uint32Array(a.length + b.length);
  let i = 0;
  let j = 0;
  let n = 0;
  while (i < a.length || j < b.length) {
    const x = j >= b.length || (i < a.length && a[i]! <= b[j]!) ? a[i]! : b[j]!;
    if (i < a.length && a[i] === x) i++;
    if (j < b.length && b[j] === x) j++;
    out[n++] = x;
  }
  return out.subarray(0, n);
}
