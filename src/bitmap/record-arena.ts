// Why: a bitmap file must be able to write a fresh image of every page's latest record at
// any compaction, and skip a record identical to the latest one, without reading its own
// log back. Keeping one Buffer per page cost ~130 bytes of V8 objects per page (17 MiB for
// the 131072 pages that 1 GiB of 4 KiB writes scattered over 16 TiB touches, per bitmap
// file). This keeps them back to back in one growable buffer instead: per key 4 bytes of
// index (keys are page numbers, dense and bounded: 32 KiB per TiB of volume at 4 KiB
// tracking blocks) and, per key present, 10 bytes of slot arrays plus the bytes themselves.
//
// States of a slot: free (on the free list, length 0) or used (offset and length of its
// bytes in the arena, and its key). Rules: arenaLive = Σ used lengths ≤ arenaUsed; a repack (copy of the used bytes
// into a new buffer) runs when growing would otherwise keep more dead bytes than live ones.

import { assert } from '../util/assert.js';
import { copyBytes } from '../util/copy-bytes.js';

const ARENA_BYTES_MIN = 64 * 1024;
const SLOTS_MIN = 256;
/** holds() compares up to this many bytes with a loop (a native compare costs more below). */
const SHORT_COMPARE_BYTES_MAX = 64;

export class RecordArena {
  /** Per key: 0 when absent, else its slot + 1. */
  private slotOf: Uint32Array;
  private present = 0;
  private slotOff = new Uint32Array(SLOTS_MIN);
  private slotLen = new Uint16Array(SLOTS_MIN);
  private slotKey = new Uint32Array(SLOTS_MIN);
  private slotsMade = 0;
  private readonly freeSlots: number[] = [];
  private arena = Buffer.allocUnsafe(ARENA_BYTES_MIN);
  private arenaUsed = 0;
  private arenaLive = 0;

  /** Keys are whole numbers below keysTotal (grow() raises it). */
  constructor(keysTotal: number) {
    assert(Number.isInteger(keysTotal) && keysTotal >= 0 && keysTotal < 2 ** 32, `arena key count ${keysTotal}`);
    this.slotOf = new Uint32Array(keysTotal);
  }

  get size(): number {
    return this.present;
  }

  /** Bytes held (arena, index and slot arrays). */
  get bytesHeld(): number {
    return this.arena.length + this.slotOf.byteLength + this.slotOff.byteLength + this.slotLen.byteLength + this.slotKey.byteLength;
  }

  grow(keysTotal: number): void {
    assert(keysTotal >= this.slotOf.length && keysTotal < 2 ** 32, 'arena keys only grow');
    const next = new Uint32Array(keysTotal);
    next.set(this.slotOf);
    this.slotOf = next;
  }

  private slot(key: number): number | undefined {
    assert(key >= 0 && key < this.slotOf.length, `arena key ${key} out of range`);
    const s1 = this.slotOf[key]!;
    return s1 === 0 ? undefined : s1 - 1;
  }

  /** The bytes kept for `key` (a view valid until the next set/delete), or undefined. */
  get(key: number): Buffer | undefined {
    const s = this.slot(key);
    if (s === undefined) return undefined;
    const off = this.slotOff[s]!;
    return this.arena.subarray(off, off + this.slotLen[s]!);
  }

  has(key: number): boolean {
    return this.slot(key) !== undefined;
  }

  /** Length of what is kept for `key` (`first` included); 0 when absent. */
  bytesOf(key: number): number {
    const s = this.slot(key);
    return s === undefined ? 0 : this.slotLen[s]!;
  }

  /** Whether `key` holds exactly `first` followed by src[from, to) (no view is made). */
  holds(key: number, first: number, src: Buffer, from: number, to: number): boolean {
    const s = this.slot(key);
    if (s === undefined || this.slotLen[s] !== 1 + to - from) return false;
    const off = this.slotOff[s]!;
    const arena = this.arena;
    if (arena[off] !== first) return false;
    if (to - from > SHORT_COMPARE_BYTES_MAX) return src.compare(arena, off + 1, off + 1 + to - from, from, to) === 0;
    for (let i = 0; i < to - from; i++) if (arena[off + 1 + i] !== src[from + i]) return false;
    return true;
  }

  /** Keeps src[from, to) for key (≤ 65535 bytes), replacing what it had. */
  set(key: number, first: number, src: Buffer, from: number, to: number): void {
    const len = 1 + to - from;
    assert(len <= 0xffff, 'an arena record fits a u16 length');
    let s = this.slot(key);
    if (s === undefined) {
      s = this.newSlot();
      this.slotOf[key] = s + 1;
      this.slotKey[s] = key;
      this.present++;
    } else {
      this.arenaLive -= this.slotLen[s]!;
      this.slotLen[s] = 0; // not live while room is made (a repack skips it)
    }
    this.reserve(len);
    const off = this.arenaUsed;
    this.arena[off] = first;
    copyBytes(src, from, this.arena, off + 1, to - from);
    this.slotOff[s] = off;
    this.slotLen[s] = len;
    this.arenaUsed += len;
    this.arenaLive += len;
  }

  delete(key: number): void {
    const s = this.slot(key);
    if (s === undefined) return;
    this.arenaLive -= this.slotLen[s]!;
    this.slotLen[s] = 0;
    this.slotOf[key] = 0;
    this.present--;
    this.freeSlots.push(s);
  }

  /**
   * Visits every key with its bytes, in slot order: `arena[from, to)` (the arena is valid
   * during the call; no view is made per key, so visiting many keys allocates nothing).
   */
  forEach(visit: (key: number, arena: Buffer, from: number, to: number) => void): void {
    for (let s = 0; s < this.slotsMade; s++) {
      const n = this.slotLen[s]!;
      if (n === 0) continue; // free (a kept record is never empty: it starts with `first`)
      const off = this.slotOff[s]!;
      visit(this.slotKey[s]!, this.arena, off, off + n);
    }
  }

  private newSlot(): number {
    const free = this.freeSlots.pop();
    if (free !== undefined) return free;
    if (this.slotsMade === this.slotOff.length) {
      const off = new Uint32Array(this.slotOff.length * 2);
      off.set(this.slotOff);
      const len = new Uint16Array(this.slotLen.length * 2);
      len.set(this.slotLen);
      const key = new Uint32Array(this.slotKey.length * 2);
      key.set(this.slotKey);
      this.slotOff = off;
      this.slotLen = len;
      this.slotKey = key;
    }
    return this.slotsMade++;
  }

  /** Makes room for `len` more bytes at arenaUsed: repacks the live bytes, grows, or both. */
  private reserve(len: number): void {
    if (this.arenaUsed + len <= this.arena.length) return;
    let size = this.arena.length;
    while (size < 2 * (this.arenaLive + len)) size *= 2;
    const next = Buffer.allocUnsafe(size);
    let at = 0;
    for (let s = 0; s < this.slotsMade; s++) {
      const n = this.slotLen[s]!;
      if (n === 0) continue;
      copyBytes(this.arena, this.slotOff[s]!, next, at, n);
      this.slotOff[s] = at;
      at += n;
    }
    assert(at === this.arenaLive, 'a repack keeps exactly the live bytes');
    this.arena = next;
    this.arenaUsed = at;
  }
}
