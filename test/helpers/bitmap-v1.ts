// Why: volumes made before the bitmap file's version 2 hold version 1 files (two fixed
// 4 KiB slots per page); the tests that prove they still open need such files, and the
// code that wrote them is gone. This writes that layout (bitmap-file.ts describes it).
import { crc32c } from '@node-rs/crc32';
import { BITMAP_PAGE_BYTES, type PagedBitmap } from '../../src/bitmap/paged-bitmap.js';
import type { DurableFs } from '../../src/util/durable-fs.js';

/** [page, slot, words (null: zeroes), generation]; `torn` [page, slot] get a bad checksum. */
export type V1Record = [number, number, Readonly<Uint32Array> | null, number];

export function writeBitmapV1(fsys: DurableFs, name: string, bitsTotal: number, records: V1Record[], torn: [number, number][] = []): void {
  const recordBytes = BITMAP_PAGE_BYTES + 32;
  if (fsys.exists(name)) fsys.remove(name);
  const file = fsys.open(name, true);
  const h = Buffer.alloc(4096);
  h.writeUInt32LE(0x46425644, 0); // "DVBF"
  h.writeUInt32LE(1, 4);
  h.writeUInt32LE(bitsTotal >>> 0, 8);
  h.writeUInt32LE(BITMAP_PAGE_BYTES, 12);
  h.writeUInt32LE(crc32c(h.subarray(0, 16)), 16);
  h.writeUInt32LE(bitsTotal >= 2 ** 32 ? 1 : 0, 20);
  file.write(0, h, 0, h.length);
  for (const [p, slot, words, gen] of records) {
    const r = Buffer.alloc(recordBytes);
    if (words) Buffer.from(words.buffer, words.byteOffset, BITMAP_PAGE_BYTES).copy(r);
    const t = BITMAP_PAGE_BYTES;
    r.writeUInt32LE(0x50425644, t); // "DVBP"
    r.writeUInt32LE(p, t + 4);
    r.writeUInt32LE(gen, t + 8);
    r.writeUInt32LE(crc32c(r.subarray(0, t + 16)), t + 16);
    if (torn.some(([tp, ts]) => tp === p && ts === slot)) r[100]! ^= 1;
    file.write(4096 + (2 * p + slot) * recordBytes, r, 0, recordBytes);
  }
  file.close();
}

/** The whole bitmap as a version 1 file (each page in slot 1, generation 1). */
export function writeBitmapAsV1(fsys: DurableFs, name: string, bm: PagedBitmap): void {
  const records: V1Record[] = [];
  bm.forEachPage((p, words) => records.push([p, 1, Uint32Array.from(words), 1]));
  writeBitmapV1(fsys, name, bm.bitsTotal, records);
}
