// Why: a volume is the unit users create, export and (later) snapshot and replicate.
// Every read and write of a volume passes through here, whoever the caller is (NBD
// exports today; the change log, snapshots and replication hook into this write path
// next). Knows nothing of NBD: callers speak offsets, lengths and buffers.

import path from 'node:path';
import { assert } from '../util/assert.js';
import { DeltavolError, systemError } from '../util/errors.js';
import { writeFileAtomicSync } from '../util/atomic-file.js';
import { FileStore } from '../storage/file-store.js';
import type { VolumeMeta } from './volume-meta.js';

export const META_FILE = 'volume.json';
export const DATA_FILE = 'data.img';

export interface VolumeExtent {
  lengthBytes: number;
  /** The range reads as zeroes and uses no space. */
  hole: boolean;
}

export interface VolumeIoOptions {
  syncIoBytesMax: number;
}

export class Volume {
  private openHandles = 0;
  private closed = false;

  private constructor(
    readonly dir: string,
    private meta: VolumeMeta,
    private readonly store: FileStore,
  ) {
    assert(store.sizeBytes === meta.sizeBytes, `data file size ${store.sizeBytes} ≠ metadata size ${meta.sizeBytes}`);
  }

  static open(dir: string, meta: VolumeMeta, io: VolumeIoOptions): Volume {
    const store = FileStore.open(path.join(dir, DATA_FILE), { readOnly: false, syncIoBytesMax: io.syncIoBytesMax });
    if (store.sizeBytes !== meta.sizeBytes) {
      store.close();
      throw new DeltavolError('METADATA_CORRUPT', `volume ${meta.name}: data file is ${store.sizeBytes} bytes, metadata says ${meta.sizeBytes}`);
    }
    return new Volume(dir, meta, store);
  }

  get name(): string {
    return this.meta.name;
  }
  get sizeBytes(): number {
    return this.meta.sizeBytes;
  }
  get readOnly(): boolean {
    return this.meta.readOnly;
  }
  get description(): string {
    return this.meta.description;
  }
  get info(): Readonly<VolumeMeta> {
    return this.meta;
  }
  /** Discards and zeroing are cheap (holes), so FAST_ZERO can be promised. */
  get canZeroFast(): boolean {
    return this.store.canPunch;
  }
  allocatedBytes(): number {
    return this.store.allocatedBytes();
  }
  get users(): number {
    return this.openHandles;
  }

  /** Counts a user (an NBD connection); release() when done. Refused while closing. */
  acquire(): void {
    if (this.closed) throw new DeltavolError('SHUTTING_DOWN', `volume ${this.name} is closing`);
    this.openHandles++;
  }
  release(): void {
    assert(this.openHandles > 0, 'release without acquire');
    this.openHandles--;
  }

  private checkRange(offset: number, length: number): void {
    if (!(offset >= 0 && length >= 0 && offset + length <= this.meta.sizeBytes)) {
      throw systemError('EINVAL', `range ${offset}+${length} outside volume ${this.name} of ${this.meta.sizeBytes} bytes`);
    }
  }

  private checkWritable(): void {
    if (this.meta.readOnly) throw systemError('EPERM', `volume ${this.name} is read-only`);
  }

  read(offset: number, length: number, target: Buffer): void | Promise<void> {
    this.checkRange(offset, length);
    return this.store.read(offset, length, target);
  }

  write(offset: number, chunks: Buffer[], fua: boolean): void | Promise<void> {
    this.checkWritable();
    let length = 0;
    for (const c of chunks) length += c.length;
    this.checkRange(offset, length);
    const r = this.store.write(offset, chunks);
    if (!fua) return r;
    return r ? r.then(() => this.store.flush()) : this.store.flush();
  }

  flush(): Promise<void> {
    return this.store.flush();
  }

  /** TRIM: the range's contents become unspecified; here, a hole (zeroes) where possible. */
  trim(offset: number, length: number, fua: boolean): void | Promise<void> {
    this.checkWritable();
    this.checkRange(offset, length);
    if (length > 0) this.store.discard(offset, length); // fallocate refuses length 0
    if (fua) return this.store.flush();
  }

  /**
   * Makes the range read as zeroes. noHole keeps it allocated; fastOnly refuses (ENOTSUP)
   * when the only way is to write zeroes.
   */
  zero(offset: number, length: number, noHole: boolean, fastOnly: boolean, fua: boolean): void | Promise<void> {
    this.checkWritable();
    this.checkRange(offset, length);
    if (length === 0) return fua ? this.store.flush() : undefined; // fallocate refuses length 0
    const r = this.store.zero(offset, length, noHole, fastOnly);
    const after = (ok: boolean): void | Promise<void> => {
      if (!ok) throw systemError('ENOTSUP', 'zeroing this range would not be faster than writing zeroes');
      if (fua) return this.store.flush();
    };
    return typeof r === 'boolean' ? after(r) : r.then(after);
  }

  prefetch(offset: number, length: number): void {
    this.checkRange(offset, length);
    this.store.prefetch(offset, length);
  }

  /** Allocation of the range from the file itself: holes read as zeroes. */
  extents(offset: number, length: number, extentsMax: number): VolumeExtent[] {
    this.checkRange(offset, length);
    return this.store.allocation(offset, length, extentsMax);
  }

  updateMeta(patch: Partial<Pick<VolumeMeta, 'readOnly' | 'description' | 'sizeBytes'>>): void {
    const next = { ...this.meta, ...patch };
    if (next.sizeBytes !== this.meta.sizeBytes) {
      if (next.sizeBytes < this.meta.sizeBytes) {
        throw new DeltavolError('VOLUME_SHRINK', `volume ${this.name} cannot shrink (${this.meta.sizeBytes} → ${next.sizeBytes} bytes)`);
      }
      this.store.resize(next.sizeBytes);
    }
    writeFileAtomicSync(path.join(this.dir, META_FILE), JSON.stringify(next, null, 2) + '\n');
    this.meta = next;
  }

  /** Flushes and closes the data file. New users are refused from here on. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.store.flush();
    this.store.close();
  }
}
