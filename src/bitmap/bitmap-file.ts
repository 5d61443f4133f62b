// Why: a bitmap (the change log's pending set, the validity bitmap, a snapshot's meta
// bitmap) must come back after a crash no smaller than it was at its last checkpoint,
// even if the machine dies while a page is being rewritten. Each page therefore has two
// record slots used in turn (ping-pong): a rewrite goes to the slot NOT holding the newest
// good record, so a torn write can only destroy the record being written, never the
// previous one. Untouched pages are never written and stay holes in a sparse file.
//
// File layout (little-endian):
//   [0, 4096)   header: magic "DVBF", version u32, bitsTotal u32, pageBytes u32, crc32c u32
//   then for page p, slot s ∈ {0,1}: a record at HEADER + (2p + s) · RECORD_BYTES
//     [page bytes: BITMAP_PAGE_BYTES][trailer: magic "DVBP" u32, page u32, generation u32 lo,
//      generation u32 hi, crc32c u32 over page bytes and the first 16 trailer bytes, zeros]
//   A slot is good when its magic, page number and checksum match. A page's value is its
//   good slot with the highest generation; with no good slot it is all zeroes.
//
// States of a page on disk: never written (both slots holes) → one good record → two good
// records (newest wins) → during a rewrite, the older slot is being overwritten (torn or
// not, the newer one still stands). Generations only grow (the file's largest + 1).
//
// A failed write or fsync fails the file until it is reopened: a page staged before it may
// be lost (Linux drops the failed pages and a later fsync does not write them again), so a
// later sync() must not make its slot the page's durable one, and the page's next rewrite
// must not go over the record that is still good. Reopening reads what is really there.
//
// What this file does not do: decide WHEN a checkpoint is safe to rely on. The activity
// log (activity-log.ts) covers bits set since the last durable checkpoint.

import { crc32c } from '@node-rs/crc32';
import { assert, AssertionError } from '../util/assert.js';
import { DeltavolError } from '../util/errors.js';
import type { DurableFile, DurableFs } from '../util/durable-fs.js';
import { BITMAP_PAGE_BYTES, BITMAP_PAGE_WORDS, PagedBitmap } from './paged-bitmap.js';

const FILE_MAGIC = 0x46425644; // "DVBF"
const PAGE_MAGIC = 0x50425644; // "DVBP"
const VERSION = 1;
const HEADER_BYTES = 4096;
/** Bytes of a page record's trailer (magic, page, generation, checksum, zeros). */
const bitmapRecordTrailerBytes = 32;
const RECORD_BYTES = BITMAP_PAGE_BYTES + bitmapRecordTrailerBytes;
const NO_SLOT = 2;
/** Pages whose two slots open() reads in one call (128 pages: ~1 MiB). */
const PAGES_PER_READ = 128;
assert(BITMAP_PAGE_BYTES % 512 === 0, 'bitmap pages are whole sectors');

function checksum(record: Buffer): number {
  return crc32c(record.subarray(0, BITMAP_PAGE_BYTES + 16));
}

export class BitmapFile {
  /** Per page: the slot holding its newest DURABLE good record, or NO_SLOT. */
  private currentSlot: Uint8Array;
  /**
   * Pages written since the last completed sync → generation of their latest write. They
   * were written into the slot that is not currentSlot; a page written twice before a sync
   * goes to that same slot again, so the durable record is never the one overwritten.
   */
  private readonly staged = new Map<number, number>();
  private generation: number;
  /**
   * Slots found holding a torn record at open. They must be zeroed durably (repair())
   * before any new record is written: a later torn write over leftover sectors of an old
   * record could otherwise complete that old record and bring it back as valid.
   */
  private garbage: number[] = [];
  /** The first write or fsync error: from then on every call fails (see the header). */
  private failure: Error | null = null;
  private readonly record = Buffer.alloc(RECORD_BYTES);
  private readonly words: Uint32Array;

  private constructor(
    private readonly file: DurableFile,
    public bitsTotal: number,
    currentSlot: Uint8Array,
    generation: number,
  ) {
    this.currentSlot = currentSlot;
    this.generation = generation;
    this.words = new Uint32Array(this.record.buffer, this.record.byteOffset, BITMAP_PAGE_WORDS);
    assert(this.record.byteOffset % 4 === 0, 'record buffer is word aligned');
  }

  private static header(bitsTotal: number): Buffer {
    const header = Buffer.alloc(HEADER_BYTES);
    header.writeUInt32LE(FILE_MAGIC, 0);
    header.writeUInt32LE(VERSION, 4);
    header.writeUInt32LE(bitsTotal >>> 0, 8);
    header.writeUInt32LE(BITMAP_PAGE_BYTES, 12);
    header.writeUInt32LE(bitsTotal >= 2 ** 32 ? 1 : 0, 20); // bitsTotal == 2^32 flag
    header.writeUInt32LE(crc32c(header.subarray(0, 16)), 16);
    return header;
  }

  /** Makes a new, empty bitmap file (durable when this returns a resolved promise). */
  static async create(fsys: DurableFs, name: string, bitsTotal: number): Promise<BitmapFile> {
    const file = fsys.open(name, true);
    file.truncate(0);
    file.write(0, BitmapFile.header(bitsTotal), 0, HEADER_BYTES);
    await file.sync();
    const pages = Math.ceil(bitsTotal / (BITMAP_PAGE_BYTES * 8));
    return new BitmapFile(file, bitsTotal, new Uint8Array(pages).fill(NO_SLOT), 1);
  }

  /** Opens a bitmap file and loads it into a new bitmap (dirty tracking on, nothing dirty). */
  static open(fsys: DurableFs, name: string): { file: BitmapFile; bitmap: PagedBitmap } {
    const file = fsys.open(name, false);
    const header = Buffer.alloc(HEADER_BYTES);
    const n = file.read(0, header, 0, HEADER_BYTES);
    const bad = (why: string) => new DeltavolError('METADATA_CORRUPT', `bitmap file ${name}: ${why}`);
    if (n < 24 || header.readUInt32LE(0) !== FILE_MAGIC) throw bad('bad magic');
    if (header.readUInt32LE(16) !== crc32c(header.subarray(0, 16))) throw bad('header checksum mismatch');
    if (header.readUInt32LE(4) !== VERSION) throw bad(`unknown version ${header.readUInt32LE(4)}`);
    if (header.readUInt32LE(12) !== BITMAP_PAGE_BYTES) throw bad('page size differs');
    const bitsTotal = header.readUInt32LE(20) === 1 ? 2 ** 32 : header.readUInt32LE(8);
    const bitmap = new PagedBitmap(bitsTotal, { trackDirty: true });
    const slots = new Uint8Array(bitmap.pageTotal).fill(NO_SLOT);
    const bf = new BitmapFile(file, bitsTotal, slots, 1);
    let generationMax = 0;
    const size = file.sizeBytes();
    // Both slots of PAGES_PER_READ pages per read (~1 MiB): a restart reads the file in big
    // sequential reads, not two small ones per page slot; holes compare with zeroes natively.
    const chunk = Buffer.alloc(PAGES_PER_READ * 2 * RECORD_BYTES);
    const zero = Buffer.alloc(RECORD_BYTES);
    for (let p0 = 0; p0 < bitmap.pageTotal; p0 += PAGES_PER_READ) {
      const chunkPos = HEADER_BYTES + 2 * p0 * RECORD_BYTES;
      if (chunkPos >= size) break; // the rest was never written
      const got = file.read(chunkPos, chunk, 0, Math.min(chunk.length, size - chunkPos));
      const pagesHere = Math.min(PAGES_PER_READ, bitmap.pageTotal - p0);
      for (let i = 0; i < pagesHere; i++) {
        const p = p0 + i;
        let best = NO_SLOT;
        let bestGen = -1;
        let bestRecord: Buffer | null = null;
        for (let s = 0; s < 2; s++) {
          const at = (2 * i + s) * RECORD_BYTES;
          if (at + RECORD_BYTES > got) continue; // past the end: never written
          const r = chunk.subarray(at, at + RECORD_BYTES);
          const t = BITMAP_PAGE_BYTES;
          const good = r.readUInt32LE(t) === PAGE_MAGIC && r.readUInt32LE(t + 4) === p && r.readUInt32LE(t + 16) === checksum(r);
          if (!good) {
            if (!r.equals(zero)) bf.garbage.push(chunkPos + at);
            continue;
          }
          const gen = r.readUInt32LE(t + 8) + r.readUInt32LE(t + 12) * 2 ** 32;
          if (gen > bestGen) {
            best = s;
            bestGen = gen;
            bestRecord = r;
          }
        }
        if (best === NO_SLOT) continue;
        slots[p] = best;
        generationMax = Math.max(generationMax, bestGen);
        const r = bestRecord!;
        bitmap.loadPage(p, new Uint32Array(r.buffer.slice(r.byteOffset, r.byteOffset + BITMAP_PAGE_BYTES)));
      }
    }
    bitmap.takeDirtyPages();
    bf.generation = generationMax + 1;
    return { file: bf, bitmap };
  }

  /**
   * The volume grew: more bits. Page records do not move (their offsets depend on the
   * page number only); only the header changes, in one sector, which the disk writes
   * whole or not at all (a file whose header still says the old size is grown again
   * when opened).
   */
  async grow(bitsTotal: number): Promise<void> {
    assert(bitsTotal >= this.bitsTotal, 'bitmap files only grow');
    this.checkFailed();
    const pages = Math.ceil(bitsTotal / (BITMAP_PAGE_BYTES * 8));
    if (pages > this.currentSlot.length) {
      const slots = new Uint8Array(pages).fill(NO_SLOT);
      slots.set(this.currentSlot);
      this.currentSlot = slots;
    }
    this.bitsTotal = bitsTotal;
    try {
      this.file.write(0, BitmapFile.header(bitsTotal), 0, 512);
      await this.file.sync();
    } catch (e) {
      throw this.fail(e);
    }
  }

  /** Stages page p (null = all zeroes) into its other slot. Durable after sync(). */
  writePage(p: number, words: Readonly<Uint32Array> | null): void {
    if (!(p >= 0 && p < this.currentSlot.length)) throw new AssertionError(`page ${p} outside bitmap file`);
    if (words === null) {
      if (this.currentSlot[p] === NO_SLOT && !this.staged.has(p)) return; // never written: the hole already reads as zeroes
      this.words.fill(0);
    } else {
      this.words.set(words);
    }
    this.writeStaged(p);
  }

  /** Stages page p computed by the caller into `scratch()` (avoids a copy for unions). */
  scratch(): Uint32Array {
    return this.words;
  }
  writeScratch(p: number): void {
    this.writeStaged(p);
  }

  /** Zeroes, durably, the torn records open() found. Call before writing to a reopened file. */
  async repair(): Promise<void> {
    if (this.garbage.length === 0) return;
    this.checkFailed();
    const zero = Buffer.alloc(RECORD_BYTES);
    try {
      for (const pos of this.garbage) this.file.write(pos, zero, 0, RECORD_BYTES);
      await this.file.sync();
    } catch (e) {
      throw this.fail(e);
    }
    this.garbage = [];
  }

  private checkFailed(): void {
    if (this.failure) throw new DeltavolError('IO', `bitmap file ${this.file.name}: failed earlier (${this.failure.message}); reopen it`);
  }

  private fail(e: unknown): unknown {
    this.failure ??= e instanceof Error ? e : new Error(String(e));
    return e;
  }

  private writeStaged(p: number): void {
    assert(this.garbage.length === 0, 'repair() a reopened bitmap file before writing to it');
    this.checkFailed();
    const slot = this.currentSlot[p] === 0 ? 1 : 0; // never the durable newest
    const t = BITMAP_PAGE_BYTES;
    const r = this.record;
    r.writeUInt32LE(PAGE_MAGIC, t);
    r.writeUInt32LE(p, t + 4);
    r.writeUInt32LE(this.generation % 2 ** 32, t + 8);
    r.writeUInt32LE(Math.floor(this.generation / 2 ** 32), t + 12);
    r.writeUInt32LE(checksum(r), t + 16);
    r.fill(0, t + 20);
    try {
      this.file.write(HEADER_BYTES + (2 * p + slot) * RECORD_BYTES, r, 0, RECORD_BYTES);
    } catch (e) {
      throw this.fail(e); // e.g. ENOSPC: part of the record may be there
    }
    this.staged.set(p, this.generation);
    this.generation++;
  }

  /** Stages every page changed in `bitmap` since its last takeDirtyPages(); returns how many. */
  writeDirty(bitmap: PagedBitmap): number {
    assert(bitmap.bitsTotal === this.bitsTotal, 'bitmap and file sizes differ');
    const dirty = bitmap.takeDirtyPages();
    for (const p of dirty) this.writePage(p, bitmap.page(p));
    return dirty.length;
  }

  /**
   * Makes every staged page durable. Only then does a page's new slot become its durable
   * one (and the old slot free for the next rewrite); a page staged again while this sync
   * ran stays staged until a later sync covers it.
   */
  async sync(): Promise<void> {
    this.checkFailed();
    const coveredBelow = this.generation;
    try {
      await this.file.sync();
    } catch (e) {
      throw this.fail(e);
    }
    for (const [p, gen] of this.staged) {
      if (gen >= coveredBelow) continue;
      this.currentSlot[p] = this.currentSlot[p] === 0 ? 1 : 0;
      this.staged.delete(p);
    }
  }

  get stagedPages(): number {
    return this.staged.size;
  }

  close(): void {
    this.file.close();
  }
}
