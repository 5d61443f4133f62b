// Why: a snapshot's before-images must survive a crash together with the knowledge of
// which volume block each one belongs to. Keeping both in one append-only file of
// self-describing, checksummed records makes it impossible for a block map and its save
// area to disagree: the block map (and the snapshot's bitmap) is rebuilt from the file.
//
// Record at slot s, offset s · (HEADER + blockBytes):
//   magic "DVSA" u32, snapshot id u32, block u32, slot u32, blockBytes u32,
//   crc32c u32 over bytes [0, 20) and the data, 8 reserved bytes, then blockBytes of data.
// States of a slot: free (past `slots`) → appended (written, maybe not durable) → durable
// (after sync()). The write path issues the overwrite of a volume block only after the
// record holding its before-image is durable, so after a crash any record that did not
// survive belonged to a write that never reached the volume. Opening scans the longest
// run of good records from slot 0 and truncates the rest (a later good record past a bad
// one is stale and must not be resurrected by a future append).
//
// A failed write or fsync fails the save area for good: what reached the disk is unknown
// and a later fsync would not write it again (Linux drops the failed pages), so a later
// sync() resolving could let the engine overwrite a block whose before-image is lost.
// From then on sync() rejects and the area counts as full: its snapshot is invalidated
// as when it fills, and writes go on.

import { crc32c } from '@node-rs/crc32';
import { assert, AssertionError } from '../util/assert.js';
import { DeltavolError } from '../util/errors.js';
import type { DurableFile, DurableFs } from '../util/durable-fs.js';
import { GroupCommit } from '../util/group-commit.js';
import { crc32cBytes } from '../util/crc32c-bytes.js';
import { PagedBitmap } from '../bitmap/paged-bitmap.js';
import { BlockMap } from './block-map.js';

const MAGIC = 0x41535644; // "DVSA"
/** Bytes of a record header (magic, snapshot id, block, slot, block size, checksum, reserved). */
const saveRecordHeaderBytes = 32;
/** Bytes read at a time when opening (a whole number of records, at least one). */
const openReadBytes = 1024 * 1024;

export class SaveArea {
  readonly bitmap: PagedBitmap;
  readonly map = new BlockMap();
  private readonly stride: number;
  private readonly record: Buffer;
  private readonly commit: GroupCommit;
  private slotsUsed = 0;
  /** The first write or fsync error: from then on no record appended since open is known durable. */
  private failure: Error | null = null;

  private constructor(
    private readonly file: DurableFile,
    readonly snapshotId: number,
    readonly blockBytes: number,
    bitsTotal: number,
    /** Most bytes this save area may take on disk; beyond, append() throws SAVE_AREA_FULL. */
    readonly bytesMax: number,
  ) {
    this.bitmap = new PagedBitmap(bitsTotal);
    this.stride = saveRecordHeaderBytes + blockBytes;
    this.record = Buffer.alloc(this.stride);
    this.commit = new GroupCommit(() => this.syncOnce());
  }

  static async create(fsys: DurableFs, name: string, snapshotId: number, blockBytes: number, bitsTotal: number, bytesMax: number): Promise<SaveArea> {
    const file = fsys.open(name, true);
    file.truncate(0);
    await file.sync();
    return new SaveArea(file, snapshotId, blockBytes, bitsTotal, bytesMax);
  }

  static async open(fsys: DurableFs, name: string, snapshotId: number, blockBytes: number, bitsTotal: number, bytesMax: number): Promise<SaveArea> {
    const file = fsys.open(name, false);
    const area = new SaveArea(file, snapshotId, blockBytes, bitsTotal, bytesMax);
    const size = file.sizeBytes();
    const stride = area.stride;
    const slotsOnDisk = Math.floor(size / stride);
    // Large sequential reads: one read per record cost as much as checksumming it.
    const perBatch = Math.max(1, Math.floor(openReadBytes / stride));
    const batch = Buffer.allocUnsafe(Math.min(perBatch, Math.max(1, slotsOnDisk)) * stride);
    let slot = 0;
    scan: while (slot < slotsOnDisk) {
      const count = Math.min(perBatch, slotsOnDisk - slot);
      const n = file.read(slot * stride, batch, 0, count * stride);
      for (let i = 0; i < count; i++, slot++) {
        if ((i + 1) * stride > n) break scan;
        const at = i * stride;
        if (!area.good(batch, at, slot)) break scan;
        const block = batch.readUInt32LE(at + 8);
        if (block >= bitsTotal || area.bitmap.test(block)) {
          throw new DeltavolError('METADATA_CORRUPT', `save area ${name}: slot ${slot} names block ${block} twice or past the volume`);
        }
        area.map.insert(block, slot);
        area.bitmap.set(block);
      }
    }
    area.slotsUsed = slot;
    if (size > slot * area.stride) {
      file.truncate(slot * area.stride);
      await file.sync();
    }
    return area;
  }

  /** Whether r[at, at + stride) holds slot `slot` of this area, whole. */
  private good(r: Buffer, at: number, slot: number): boolean {
    if (r.readUInt32LE(at) !== MAGIC || r.readUInt32LE(at + 4) !== this.snapshotId || r.readUInt32LE(at + 12) !== slot) return false;
    if (r.readUInt32LE(at + 16) !== this.blockBytes) return false;
    return r.readUInt32LE(at + 20) === this.checksum(r, at);
  }

  /** crc32c of the header's first 20 bytes, then of the data. */
  private checksum(r: Buffer, at: number): number {
    return crc32c(r.subarray(at + saveRecordHeaderBytes, at + this.stride), crc32cBytes(r, at, 20));
  }

  get slots(): number {
    return this.slotsUsed;
  }

  get bytesOnDisk(): number {
    return this.slotsUsed * this.stride;
  }

  has(block: number): boolean {
    return this.bitmap.test(block);
  }

  /** Whether one more record fits under bytesMax (never, once the area failed). */
  get full(): boolean {
    return this.failure !== null || (this.slotsUsed + 1) * this.stride > this.bytesMax;
  }

  /**
   * Appends the before-image of `block` (blockBytes from data at dataOffset). Not durable
   * until sync() resolves; the caller must not let the block's new data reach the volume
   * before that.
   */
  append(block: number, data: Uint8Array, dataOffset: number): void {
    if (this.bitmap.test(block)) throw new AssertionError(`block ${block} already saved`);
    if (this.failure) throw new DeltavolError('SAVE_AREA_FULL', `snapshot ${this.snapshotId}: its save area failed (${this.failure.message})`);
    if (this.full) throw new DeltavolError('SAVE_AREA_FULL', `snapshot ${this.snapshotId}: save area reached ${this.bytesMax} bytes`);
    const r = this.record;
    const slot = this.slotsUsed;
    r.writeUInt32LE(MAGIC, 0);
    r.writeUInt32LE(this.snapshotId, 4);
    r.writeUInt32LE(block, 8);
    r.writeUInt32LE(slot, 12);
    r.writeUInt32LE(this.blockBytes, 16);
    r.set(data.subarray(dataOffset, dataOffset + this.blockBytes), saveRecordHeaderBytes);
    r.writeUInt32LE(this.checksum(r, 0), 20);
    try {
      this.file.write(slot * this.stride, r, 0, this.stride);
    } catch (e) {
      // Part of the record may be in the file, at a slot the next append would reuse.
      this.failure = e as Error;
      // A full disk is a full save area: the snapshot is invalidated, writes go on.
      const code = (e as { code?: string }).code;
      if (code === 'ENOSPC' || code === 'EDQUOT') {
        throw new DeltavolError('SAVE_AREA_FULL', `snapshot ${this.snapshotId}: no space left for its save area (${code})`);
      }
      throw e;
    }
    this.slotsUsed++;
    this.map.insert(block, slot);
    this.bitmap.set(block);
  }

  /** Reads the before-image of a saved block into target (blockBytes). */
  readBlock(block: number, target: Uint8Array, targetOffset: number): void {
    const slot = this.map.get(block);
    if (slot < 0) throw new AssertionError(`block ${block} not in save area ${this.snapshotId}`);
    const n = this.file.read(slot * this.stride + saveRecordHeaderBytes, target, targetOffset, this.blockBytes);
    assert(n === this.blockBytes, 'short read of a save-area record');
  }

  /** Group-committed: one fsync for every append issued before it. */
  sync(): Promise<void> {
    return this.commit.sync();
  }

  private async syncOnce(): Promise<void> {
    if (this.failure) throw new DeltavolError('IO', `snapshot ${this.snapshotId}: its save area failed earlier (${this.failure.message})`);
    try {
      await this.file.sync();
    } catch (e) {
      this.failure = e as Error;
      throw e;
    }
  }

  get syncs(): number {
    return this.commit.syncs;
  }

  close(): void {
    this.file.close();
  }
}
