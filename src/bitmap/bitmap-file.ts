// Why: a bitmap (the change log's pending set, the validity bitmap, a snapshot's meta
// bitmap) must come back after a crash no smaller than it was at its last checkpoint, and
// a checkpoint must cost what changed, not what the volume measures: a scattered write
// dirties one 4 KiB page (128 MiB of volume) per bitmap, and on a 16 TiB volume almost
// every write dirties a page of its own. So the file is an append-only log of page
// records, each encoded in as few bytes as its set bits allow (a page with one bit costs
// a 26-byte record, not 4 KiB), and the log is compacted into a fresh image when it has
// grown to twice what is live. Disk use and open() follow what was written, not the size.
//
// File layout (version 2, little-endian):
//   [0, 512)  header: magic "DVBF" u32, version 2 u32, bitsTotal lo u32, bitsTotal hi u32,
//             pageBytes u32, crc32c u32 of the first 20 bytes, zeros. One sector: grow()
//             rewrites it in place, and a sector is written whole or not at all.
//   then records back to back: crc32c u32 of the rest of the record, magic "DVBR" u32,
//             seq u32, page u32, encoding u16, zero u16, payloadBytes u32, payload.
//   Encodings: 0 zero (no payload), 1 offsets (ascending u16 bit offsets in the page),
//             2 runs (start u16, count-1 u16, ascending and apart), 3 dense (4096 bytes).
//   The smallest encoding is chosen. seq starts at 0 after the header and counts by one.
//   A page's value is its last record (no record: all zeroes). open() reads records in
//   order and stops at the first that does not check (magic, seq, length, crc).
//
// States of the file: log (image records, then appended records) → compacting (a fresh
// image is written to NAME.tmp in bounded chunks and fsynced, then renamed over NAME; a
// crash before the rename leaves NAME as it was, after it NAME is the new image) → log.
//
// Crash rules (the property tests check them):
//   - after a crash the bitmap is no smaller than at its last completed sync: synced
//     records precede every unsynced one, and only unsynced appends can be torn or lost;
//   - a torn write never destroys the previous durable state: nothing durable is ever
//     overwritten (appends only; compaction writes another file and renames it);
//   - a failed write or fsync fails the file until it is reopened: Linux drops the failed
//     pages, and a later fsync does not write them again;
//   - a reopened file is never appended to: what follows its last good record may be torn
//     leftovers (or records a failed fsync dropped but the page cache still shows), so
//     repair() first compacts what open() read into a fresh, fsynced image.
// Version 1 files (two fixed 4 KiB slots per page, the file growing with the volume) are
// still read; repair() rewrites them as version 2.
//
// What this file does not do: decide WHEN a checkpoint is safe to rely on. The activity
// log (activity-log.ts) covers bits set since the last durable checkpoint.

import { crc32c } from '@node-rs/crc32';
import { assert, AssertionError } from '../util/assert.js';
import { DeltavolError } from '../util/errors.js';
import type { DurableFile, DurableFs } from '../util/durable-fs.js';
import { BITMAP_PAGE_BITS, BITMAP_PAGE_BYTES, BITMAP_PAGE_WORDS, PagedBitmap, SPARSE_BITS_MAX, popcount32 } from './paged-bitmap.js';
import { RecordArena } from './record-arena.js';
import { copyBytes } from '../util/copy-bytes.js';
import { crc32cBytes } from '../util/crc32c-bytes.js';

const FILE_MAGIC = 0x46425644; // "DVBF"
const RECORD_MAGIC = 0x52425644; // "DVBR"
const VERSION = 2;
const HEADER_BYTES = 512;
const RECORD_HEADER_BYTES = 24;
const ENC_ZERO = 0;
const ENC_OFFSETS = 1;
const ENC_RUNS = 2;
const ENC_DENSE = 3;
/** The log is compacted once it exceeds max(2 × live bytes, this). */
export const bitmapLogBytesMin = 4 * 1024 * 1024;
/**
 * Records up to this many bytes are checksummed in JavaScript: a native call and the
 * subarray it needs cost more than a table lookup per byte for the 26-byte records of
 * scattered pages (a checkpoint writes one per page, up to one per write at 16 TiB).
 */
const recordCrcInJsBytesMax = 128;
/** crc32c of buf[from, to): short ranges in JavaScript, long ones natively. */
function crcOf(buf: Buffer, from: number, to: number): number {
  return to - from <= recordCrcInJsBytesMax ? crc32cBytes(buf, from, to - from) : crc32c(buf.subarray(from, to));
}
/** Records are gathered in memory up to this many bytes per write call (and at sync). */
const appendBufferBytes = 256 * 1024;
/** open() and compaction move the file in pieces of this many bytes. */
const ioChunkBytes = 1024 * 1024;
assert(BITMAP_PAGE_BITS <= 0x10000, 'bit offsets in a page fit u16');
assert(BITMAP_PAGE_WORDS % 4 === 0, 'encodePage tests four words at a time');
assert(appendBufferBytes >= RECORD_HEADER_BYTES + BITMAP_PAGE_BYTES, 'the append buffer holds the largest record');
assert(ioChunkBytes >= RECORD_HEADER_BYTES + BITMAP_PAGE_BYTES, 'a read chunk holds the largest record');

/** Sets bits [start, start+count) of a page's words. */
function setBitsInWords(words: Uint32Array, start: number, count: number): void {
  let b = start;
  const end = start + count;
  while (b < end && (b & 31) !== 0) words[b >>> 5]! |= 1 << (b & 31), b++;
  while (b + 32 <= end) words[b >>> 5] = 0xffffffff, b += 32;
  while (b < end) words[b >>> 5]! |= 1 << (b & 31), b++;
}

/** Indices of a page's non-zero words (encodePage's scratch: scattered pages have few). */
const nonZeroWords = new Uint16Array(BITMAP_PAGE_WORDS);

/**
 * Encodes a page into out[0..) (payload only); returns [encoding, payloadBytes]. `out`
 * holds at least BITMAP_PAGE_BYTES.
 */
function encodePage(words: Readonly<Uint32Array> | null, out: Buffer): [number, number] {
  if (words === null) return [ENC_ZERO, 0];
  let bits = 0;
  let runs = 0;
  let nonZero = 0;
  for (let i = 0; i < BITMAP_PAGE_WORDS; i += 4) {
    // Four words per test: a scattered page is almost all zero words.
    if ((words[i]! | words[i + 1]! | words[i + 2]! | words[i + 3]!) === 0) continue;
    for (let j = i; j < i + 4; j++) {
      const w = words[j]!;
      if (w === 0) continue;
      nonZeroWords[nonZero++] = j;
      bits += popcount32(w);
      const carry = j > 0 ? words[j - 1]! >>> 31 : 0;
      runs += popcount32((w & ~((w << 1) | carry)) >>> 0);
    }
  }
  if (bits === 0) return [ENC_ZERO, 0];
  if (2 * bits <= 4 * runs && 2 * bits < BITMAP_PAGE_BYTES) {
    let n = 0;
    for (let k = 0; k < nonZero; k++) {
      const i = nonZeroWords[k]!;
      let w = words[i]! | 0;
      while (w !== 0) {
        const low = w & -w;
        out.writeUInt16LE(i * 32 + 31 - Math.clz32(low), n);
        n += 2;
        w ^= low;
      }
    }
    return [ENC_OFFSETS, n];
  }
  if (4 * runs < BITMAP_PAGE_BYTES) {
    let n = 0;
    let runStart = -1;
    for (let i = 0; i < BITMAP_PAGE_WORDS; i++) {
      const w = words[i]!;
      if (runStart < 0 && w === 0) continue;
      if (runStart >= 0 && w === 0xffffffff) continue;
      for (let b = 0; b < 32; b++) {
        const set = (w >>> b) & 1;
        const bit = i * 32 + b;
        if (set && runStart < 0) runStart = bit;
        else if (!set && runStart >= 0) {
          out.writeUInt16LE(runStart, n);
          out.writeUInt16LE(bit - runStart - 1, n + 2);
          n += 4;
          runStart = -1;
        }
      }
    }
    if (runStart >= 0) {
      out.writeUInt16LE(runStart, n);
      out.writeUInt16LE(BITMAP_PAGE_BITS - runStart - 1, n + 2);
      n += 4;
    }
    assert(n === 4 * runs, 'run count matches');
    return [ENC_RUNS, n];
  }
  Buffer.from(words.buffer, words.byteOffset, BITMAP_PAGE_BYTES).copy(out, 0);
  return [ENC_DENSE, BITMAP_PAGE_BYTES];
}

/**
 * Encodes a page given as its set bits' offsets (strictly increasing, at least one) into
 * out[0..), choosing as encodePage() does; returns [encoding, payloadBytes]. Costs O(bits),
 * not O(page): a checkpoint after scattered writes encodes pages of one or two bits.
 */
function encodeOffsets(offsets: readonly number[], out: Buffer, words: Uint32Array): [number, number] {
  const bits = offsets.length;
  assert(bits > 0, 'encodeOffsets: at least one bit');
  let runs = 1;
  for (let k = 1; k < bits; k++) if (offsets[k] !== offsets[k - 1]! + 1) runs++;
  if (2 * bits <= 4 * runs && 2 * bits < BITMAP_PAGE_BYTES) {
    for (let k = 0; k < bits; k++) out.writeUInt16LE(offsets[k]!, 2 * k);
    return [ENC_OFFSETS, 2 * bits];
  }
  if (4 * runs < BITMAP_PAGE_BYTES) {
    let n = 0;
    let start = offsets[0]!;
    for (let k = 1; k <= bits; k++) {
      if (k < bits && offsets[k] === offsets[k - 1]! + 1) continue;
      out.writeUInt16LE(start, n);
      out.writeUInt16LE(offsets[k - 1]! - start, n + 2);
      n += 4;
      if (k < bits) start = offsets[k]!;
    }
    return [ENC_RUNS, n];
  }
  words.fill(0);
  for (const o of offsets) words[o >>> 5]! |= 1 << (o & 31);
  return encodePage(words, out);
}

/** Decodes the payload src[from, to) into `words` (overwritten); false when it is malformed. */
function decodePage(encoding: number, src: Buffer, from: number, to: number, words: Uint32Array): boolean {
  words.fill(0);
  const n = to - from;
  switch (encoding) {
    case ENC_ZERO:
      return n === 0;
    case ENC_OFFSETS: {
      if (n % 2 !== 0 || n === 0) return false;
      let prev = -1;
      for (let i = from; i < to; i += 2) {
        const o = src.readUInt16LE(i);
        if (o <= prev) return false;
        words[o >>> 5]! |= 1 << (o & 31);
        prev = o;
      }
      return true;
    }
    case ENC_RUNS: {
      if (n % 4 !== 0 || n === 0) return false;
      let end = -1; // first bit after the previous run
      for (let i = from; i < to; i += 4) {
        const start = src.readUInt16LE(i);
        const count = src.readUInt16LE(i + 2) + 1;
        if (start <= end || start + count > BITMAP_PAGE_BITS) return false;
        setBitsInWords(words, start, count);
        end = start + count;
      }
      return true;
    }
    case ENC_DENSE:
      if (n !== BITMAP_PAGE_BYTES) return false;
      src.copy(Buffer.from(words.buffer, words.byteOffset, BITMAP_PAGE_BYTES), 0, from, to);
      return true;
    default:
      return false;
  }
}

/**
 * An offsets payload src[from, to) of at most SPARSE_BITS_MAX bits as a new exact-size
 * array (what a sparse page holds); null when it is malformed (not strictly increasing).
 */
function decodeOffsets(src: Buffer, from: number, to: number): number[] | null {
  const n = (to - from) / 2;
  const out = new Array<number>(n);
  let prev = -1;
  for (let k = 0; k < n; k++) {
    const o = src.readUInt16LE(from + 2 * k);
    if (o <= prev) return null;
    out[k] = o;
    prev = o;
  }
  return out;
}

/**
 * Writes a record at out[at..) with the payload src[from, to) (src[from - 1] is not read);
 * returns its length.
 */
function putRecord(out: Buffer, at: number, seq: number, p: number, encoding: number, src: Buffer, from: number, to: number): number {
  const end = at + RECORD_HEADER_BYTES + to - from;
  out.writeUInt32LE(RECORD_MAGIC, at + 4);
  out.writeUInt32LE(seq % 2 ** 32, at + 8);
  out.writeUInt32LE(p, at + 12);
  out.writeUInt16LE(encoding, at + 16);
  out.writeUInt16LE(0, at + 18);
  out.writeUInt32LE(to - from, at + 20);
  copyBytes(src, from, out, at + RECORD_HEADER_BYTES, to - from);
  out.writeUInt32LE(crcOf(out, at + 4, end), at);
  return end - at;
}

function header(bitsTotal: number): Buffer {
  const h = Buffer.alloc(HEADER_BYTES);
  h.writeUInt32LE(FILE_MAGIC, 0);
  h.writeUInt32LE(VERSION, 4);
  h.writeUInt32LE(bitsTotal % 2 ** 32, 8);
  h.writeUInt32LE(Math.floor(bitsTotal / 2 ** 32), 12);
  h.writeUInt32LE(BITMAP_PAGE_BYTES, 16);
  h.writeUInt32LE(crc32c(h.subarray(0, 20)), 20);
  return h;
}

export interface BitmapFileOptions {
  /** Compaction threshold floor (bytes; default bitmapLogBytesMin). Tests use tiny ones. */
  logBytesMin?: number;
}

export class BitmapFile {
  /**
   * Per page with a record: its latest record's encoding (byte 0) and payload (from byte
   * 1), staged or durable; what a compaction writes. Pages absent here read as zeroes.
   */
  private readonly latest: RecordArena;
  /** Bytes the latest records of all pages take as records: what an image costs. */
  private liveBytes = 0;
  /** Where the next record goes (records in `appendBuf` are placed from here). */
  private logEnd = HEADER_BYTES;
  private seq = 0;
  /** Records gathered but not yet handed to the file (written at the latest by sync()). */
  private readonly appendBuf = Buffer.allocUnsafe(appendBufferBytes);
  private appendUsed = 0;
  /** The first write or fsync error: from then on every call fails (see the header). */
  private failure: Error | null = null;
  /** Opened from disk: must be compacted (repair()) before anything is appended. */
  private mustRewrite = false;
  /** sync(), grow() and compaction run one at a time, in call order. */
  private chain: Promise<void> = Promise.resolve();
  private readonly scratchWords = new Uint32Array(BITMAP_PAGE_WORDS);
  private readonly payload = Buffer.allocUnsafe(BITMAP_PAGE_BYTES);
  private readonly logBytesMin: number;
  /** Compactions done (tests and benchmarks). */
  compactions = 0;

  private constructor(
    private readonly fsys: DurableFs,
    private readonly name: string,
    private file: DurableFile,
    public bitsTotal: number,
    options: BitmapFileOptions,
  ) {
    this.logBytesMin = options.logBytesMin ?? bitmapLogBytesMin;
    this.latest = new RecordArena(this.pageCount);
  }

  private get pageCount(): number {
    return Math.ceil(this.bitsTotal / BITMAP_PAGE_BITS);
  }

  /** Makes a new, empty bitmap file (durable when this returns a resolved promise). */
  static async create(fsys: DurableFs, name: string, bitsTotal: number, options: BitmapFileOptions = {}): Promise<BitmapFile> {
    const file = fsys.open(name, true);
    file.truncate(0);
    file.write(0, header(bitsTotal), 0, HEADER_BYTES);
    await file.sync();
    return new BitmapFile(fsys, name, file, bitsTotal, options);
  }

  /**
   * Opens a bitmap file and loads it into a new bitmap (dirty tracking on, nothing dirty).
   * Reading only; call repair() before writing to it.
   */
  static open(fsys: DurableFs, name: string, options: BitmapFileOptions = {}): { file: BitmapFile; bitmap: PagedBitmap } {
    const file = fsys.open(name, false);
    const h = Buffer.alloc(HEADER_BYTES);
    const n = file.read(0, h, 0, HEADER_BYTES);
    const bad = (why: string) => new DeltavolError('METADATA_CORRUPT', `bitmap file ${name}: ${why}`);
    if (n < 24 || h.readUInt32LE(0) !== FILE_MAGIC) throw bad('bad magic');
    const version = h.readUInt32LE(4);
    if (version === 1) return openV1(fsys, name, file, options);
    if (version !== VERSION) throw bad(`unknown version ${version}`);
    if (h.readUInt32LE(20) !== crc32c(h.subarray(0, 20))) throw bad('header checksum mismatch');
    if (h.readUInt32LE(16) !== BITMAP_PAGE_BYTES) throw bad('page size differs');
    const bitsTotal = h.readUInt32LE(8) + h.readUInt32LE(12) * 2 ** 32;
    const bitmap = new PagedBitmap(bitsTotal, { trackDirty: true });
    const bf = new BitmapFile(fsys, name, file, bitsTotal, options);
    bf.mustRewrite = true;
    const size = file.sizeBytes();
    const chunk = Buffer.allocUnsafe(ioChunkBytes);
    let chunkPos = HEADER_BYTES; // file offset of chunk[0]
    let have = 0;
    let at = 0;
    const words = bf.scratchWords;
    for (;;) {
      if (have - at < RECORD_HEADER_BYTES + BITMAP_PAGE_BYTES && chunkPos + have < size) {
        chunk.copy(chunk, 0, at, have);
        chunkPos += at;
        have -= at;
        at = 0;
        have += file.read(chunkPos + have, chunk, have, chunk.length - have);
      }
      if (have - at < RECORD_HEADER_BYTES) break;
      if (chunk.readUInt32LE(at + 4) !== RECORD_MAGIC || chunk.readUInt32LE(at + 8) !== bf.seq % 2 ** 32) break;
      const payloadBytes = chunk.readUInt32LE(at + 20);
      const end = at + RECORD_HEADER_BYTES + payloadBytes;
      if (payloadBytes > BITMAP_PAGE_BYTES || end > have) break;
      if (crcOf(chunk, at + 4, end) !== chunk.readUInt32LE(at)) break;
      // A record that checks is what this code wrote: anything odd in it is corruption.
      const p = chunk.readUInt32LE(at + 12);
      const encoding = chunk.readUInt16LE(at + 16);
      if (p >= bitmap.pageTotal) throw bad(`record for page ${p} past the end`);
      if (encoding === ENC_OFFSETS && payloadBytes > 0 && payloadBytes % 2 === 0 && payloadBytes / 2 <= SPARSE_BITS_MAX) {
        // Scattered writes leave mostly pages of a few bits: load them as offsets, O(bits).
        const offsets = decodeOffsets(chunk, at + RECORD_HEADER_BYTES, end);
        if (offsets === null || p * BITMAP_PAGE_BITS + offsets[offsets.length - 1]! >= bitsTotal) {
          throw bad(`malformed record for page ${p}`);
        }
        bitmap.loadSparse(p, offsets);
      } else {
        if (!decodePage(encoding, chunk, at + RECORD_HEADER_BYTES, end, words)) throw bad(`malformed record for page ${p}`);
        bitmap.loadPage(p, words);
      }
      bf.remember(p, encoding, chunk, at + RECORD_HEADER_BYTES, end);
      bf.seq++;
      at = end;
    }
    bf.logEnd = chunkPos + at;
    bitmap.takeDirtyPages();
    return { file: bf, bitmap };
  }

  /** Version 1 reader's result: a file holding `bitmap` that repair() rewrites as version 2. */
  static fromV1(fsys: DurableFs, name: string, file: DurableFile, bitsTotal: number, options: BitmapFileOptions, bitmap: PagedBitmap): BitmapFile {
    const bf = new BitmapFile(fsys, name, file, bitsTotal, options);
    bf.mustRewrite = true;
    bitmap.forEachPage((p, words) => {
      const [encoding, payloadBytes] = encodePage(words, bf.payload);
      bf.remember(p, encoding, bf.payload, 0, payloadBytes);
    });
    return bf;
  }

  /** Records page p's latest record (what compaction writes) and keeps liveBytes. */
  private remember(p: number, encoding: number, src: Buffer, from: number, to: number): void {
    const oldBytes = this.latest.bytesOf(p);
    if (oldBytes !== 0) this.liveBytes -= RECORD_HEADER_BYTES + oldBytes - 1;
    if (encoding === ENC_ZERO) {
      this.latest.delete(p);
      return;
    }
    this.latest.set(p, encoding, src, from, to);
    this.liveBytes += RECORD_HEADER_BYTES + to - from;
  }

  /**
   * The volume grew: more bits. Records do not move; only the header changes, in one
   * sector, which the disk writes whole or not at all (a file whose header still says the
   * old size is grown again when opened).
   */
  grow(bitsTotal: number): Promise<void> {
    assert(bitsTotal >= this.bitsTotal, 'bitmap files only grow');
    return this.serial(async () => {
      this.checkFailed();
      this.bitsTotal = bitsTotal;
      this.latest.grow(this.pageCount);
      try {
        this.flushAppends();
        this.file.write(0, header(bitsTotal), 0, HEADER_BYTES);
        await this.file.sync();
      } catch (e) {
        throw this.fail(e);
      }
    });
  }

  /** Stages page p (null = all zeroes) as a record. Durable after sync(). */
  writePage(p: number, words: Readonly<Uint32Array> | null): void {
    if (!(p >= 0 && p < this.pageCount)) throw new AssertionError(`page ${p} outside bitmap file`);
    this.checkFailed();
    assert(!this.mustRewrite, 'repair() a reopened bitmap file before writing to it');
    const [encoding, payloadBytes] = encodePage(words, this.payload);
    this.stage(p, encoding, payloadBytes);
  }

  /**
   * Stages page p given as its set bits' offsets (strictly increasing, at least one): the
   * same record writePage() would stage for those bits, at a cost in proportion to them.
   */
  writeOffsets(p: number, offsets: readonly number[]): void {
    if (!(p >= 0 && p < this.pageCount)) throw new AssertionError(`page ${p} outside bitmap file`);
    this.checkFailed();
    assert(!this.mustRewrite, 'repair() a reopened bitmap file before writing to it');
    const [encoding, payloadBytes] = encodeOffsets(offsets, this.payload, this.scratchWords);
    this.stage(p, encoding, payloadBytes);
  }

  /** Appends this.payload[0, payloadBytes) as page p's record unless its latest record says the same. */
  private stage(p: number, encoding: number, payloadBytes: number): void {
    if (!this.latest.has(p)) {
      if (encoding === ENC_ZERO) return; // no record: the page already reads as zeroes
    } else if (this.latest.holds(p, encoding, this.payload, 0, payloadBytes)) {
      return; // the latest record already says this
    }
    this.append(p, encoding, payloadBytes);
    this.remember(p, encoding, this.payload, 0, payloadBytes);
  }

  /** Stages page p computed by the caller into `scratch()` (avoids a copy for unions). */
  scratch(): Uint32Array {
    return this.scratchWords;
  }
  writeScratch(p: number): void {
    this.writePage(p, this.scratchWords);
  }

  /**
   * Makes a reopened file writable: compacts what open() read into a fresh image (which
   * also rewrites a version 1 file as version 2). Call before writing to a reopened file.
   */
  repair(): Promise<void> {
    if (!this.mustRewrite) return Promise.resolve();
    return this.serial(async () => {
      this.checkFailed();
      await this.compact();
      this.mustRewrite = false;
    });
  }

  private checkFailed(): void {
    if (this.failure) throw new DeltavolError('IO', `bitmap file ${this.name}: failed earlier (${this.failure.message}); reopen it`);
  }

  private fail(e: unknown): unknown {
    this.failure ??= e instanceof Error ? e : new Error(String(e));
    return e;
  }

  private serial(fn: () => Promise<void>): Promise<void> {
    const run = this.chain.then(fn, fn);
    this.chain = run.catch(() => undefined);
    return run;
  }

  /** Appends a record whose payload is this.payload[0, payloadBytes). */
  private append(p: number, encoding: number, payloadBytes: number): void {
    const bytes = RECORD_HEADER_BYTES + payloadBytes;
    if (this.appendUsed + bytes > this.appendBuf.length) {
      try {
        this.flushAppends();
      } catch (e) {
        throw this.fail(e);
      }
    }
    this.appendUsed += putRecord(this.appendBuf, this.appendUsed, this.seq, p, encoding, this.payload, 0, payloadBytes);
    this.seq++;
  }

  /** Hands the gathered records to the file (throws what the write throws). */
  private flushAppends(): void {
    if (this.appendUsed === 0) return;
    const n = this.appendUsed;
    this.appendUsed = 0;
    this.file.write(this.logEnd, this.appendBuf, 0, n);
    this.logEnd += n;
  }

  /** Stages every page changed in `bitmap` since its last takeDirtyPages(); returns how many. */
  writeDirty(bitmap: PagedBitmap): number {
    assert(bitmap.bitsTotal === this.bitsTotal, 'bitmap and file sizes differ');
    const dirty = bitmap.takeDirtyPages();
    for (const p of dirty) this.writePageOf(bitmap, p);
    return dirty.length;
  }

  /** Stages page p as `bitmap` holds it: a sparse page from its offsets, else its words. */
  writePageOf(bitmap: PagedBitmap, p: number): void {
    const offsets = bitmap.sparseOffsets(p);
    if (offsets !== null) this.writeOffsets(p, offsets);
    else this.writePage(p, bitmap.page(p));
  }

  /**
   * Makes every staged page durable, then compacts the log if it has grown past
   * max(2 × live bytes, logBytesMin).
   */
  sync(): Promise<void> {
    return this.serial(async () => {
      this.checkFailed();
      try {
        this.flushAppends();
        await this.file.sync();
      } catch (e) {
        throw this.fail(e);
      }
      if (this.logEnd - HEADER_BYTES > Math.max(2 * this.liveBytes, this.logBytesMin)) await this.compact();
    });
  }

  /**
   * Writes every page's latest record into NAME.tmp in chunks, fsyncs it and renames it
   * over NAME. Records staged meanwhile go to the new file after the image (they are not
   * durable until a later sync, as always).
   */
  private async compact(): Promise<void> {
    const tmpName = `${this.name}.tmp`;
    const old = this.file;
    let tmp: DurableFile | null = null;
    try {
      this.flushAppends(); // into the old file: a crash before the rename keeps NAME whole
      if (this.fsys.exists(tmpName)) this.fsys.remove(tmpName);
      tmp = this.fsys.open(tmpName, true);
      tmp.write(0, header(this.bitsTotal), 0, HEADER_BYTES);
      const chunk = Buffer.allocUnsafe(ioChunkBytes);
      let used = 0;
      let pos = HEADER_BYTES;
      let seq = 0;
      const image = tmp;
      this.latest.forEach((p, kept, from, to) => {
        const bytes = RECORD_HEADER_BYTES + to - from - 1;
        if (used + bytes > chunk.length) {
          image.write(pos, chunk, 0, used);
          pos += used;
          used = 0;
        }
        used += putRecord(chunk, used, seq++, p, kept[from]!, kept, from + 1, to);
      });
      if (used > 0) tmp.write(pos, chunk, 0, used);
      pos += used;
      // From here new records go after the image in the new file.
      this.file = tmp;
      this.logEnd = pos;
      this.seq = seq;
      await tmp.sync();
      this.fsys.rename(tmpName, this.name);
    } catch (e) {
      // The file is failed now; close whichever handle it no longer uses.
      if (tmp !== null && this.file === tmp) old.close();
      else tmp?.close();
      throw this.fail(e);
    }
    old.close();
    this.compactions++;
  }

  /** Bytes the file's log holds (header and records, staged ones included). */
  get logBytes(): number {
    return this.logEnd + this.appendUsed;
  }

  close(): void {
    this.file.close();
  }
}

// ---------------- version 1: read only ----------------
//   [0, 4096) header: magic "DVBF", version 1 u32, bitsTotal u32, pageBytes u32, crc32c u32
//             of the first 16 bytes, u32 1 when bitsTotal is 2^32
//   page p, slot s ∈ {0,1}: a record at 4096 + (2p + s) · 4128: page bytes, then magic
//   "DVBP" u32, page u32, generation lo u32, hi u32, crc32c u32 of the page bytes and those
//   16 bytes, zeros. A page's value is its good slot with the highest generation.

const V1_HEADER_BYTES = 4096;
const V1_PAGE_MAGIC = 0x50425644; // "DVBP"
const V1_RECORD_BYTES = BITMAP_PAGE_BYTES + 32;
/** Pages whose two slots open() reads in one call (128 pages: ~1 MiB). */
const V1_PAGES_PER_READ = 128;

function openV1(fsys: DurableFs, name: string, file: DurableFile, options: BitmapFileOptions): { file: BitmapFile; bitmap: PagedBitmap } {
  const h = Buffer.alloc(24);
  file.read(0, h, 0, 24);
  const bad = (why: string) => new DeltavolError('METADATA_CORRUPT', `bitmap file ${name}: ${why}`);
  if (h.readUInt32LE(16) !== crc32c(h.subarray(0, 16))) throw bad('header checksum mismatch');
  if (h.readUInt32LE(12) !== BITMAP_PAGE_BYTES) throw bad('page size differs');
  const bitsTotal = h.readUInt32LE(20) === 1 ? 2 ** 32 : h.readUInt32LE(8);
  const bitmap = new PagedBitmap(bitsTotal, { trackDirty: true });
  const size = file.sizeBytes();
  const chunk = Buffer.alloc(V1_PAGES_PER_READ * 2 * V1_RECORD_BYTES);
  const words = new Uint32Array(BITMAP_PAGE_WORDS);
  const wordBytes = Buffer.from(words.buffer);
  for (let p0 = 0; p0 < bitmap.pageTotal; p0 += V1_PAGES_PER_READ) {
    const chunkPos = V1_HEADER_BYTES + 2 * p0 * V1_RECORD_BYTES;
    if (chunkPos >= size) break; // the rest was never written
    const got = file.read(chunkPos, chunk, 0, Math.min(chunk.length, size - chunkPos));
    const pagesHere = Math.min(V1_PAGES_PER_READ, bitmap.pageTotal - p0);
    for (let i = 0; i < pagesHere; i++) {
      const p = p0 + i;
      let bestGen = -1;
      let best: Buffer | null = null;
      for (let s = 0; s < 2; s++) {
        const at = (2 * i + s) * V1_RECORD_BYTES;
        if (at + V1_RECORD_BYTES > got) continue; // past the end: never written
        const r = chunk.subarray(at, at + V1_RECORD_BYTES);
        const t = BITMAP_PAGE_BYTES;
        if (r.readUInt32LE(t) !== V1_PAGE_MAGIC || r.readUInt32LE(t + 4) !== p) continue;
        if (r.readUInt32LE(t + 16) !== crc32c(r.subarray(0, t + 16))) continue;
        const gen = r.readUInt32LE(t + 8) + r.readUInt32LE(t + 12) * 2 ** 32;
        if (gen > bestGen) {
          bestGen = gen;
          best = r;
        }
      }
      if (best === null) continue;
      best.copy(wordBytes, 0, 0, BITMAP_PAGE_BYTES);
      bitmap.loadPage(p, words);
    }
  }
  bitmap.takeDirtyPages();
  const bf = BitmapFile.fromV1(fsys, name, file, bitsTotal, options, bitmap);
  return { file: bf, bitmap };
}
