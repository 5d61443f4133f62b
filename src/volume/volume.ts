// Why: a volume is the unit users create, export and snapshot (and later replicate).
// Every read and write of a volume passes through here, whoever the caller is; every
// write, TRIM and zeroing goes through the volume engine (change log, snapshot
// copy-on-write, validity, crash safety) before its data reaches the file. Knows nothing
// of NBD: callers speak offsets, lengths and buffers.

import { payloadLength, type WritePayload } from '../util/piped-bytes.js';
import fs from 'node:fs';
import path from 'node:path';
import { assert } from '../util/assert.js';
import { forEachBlockSlice } from '../util/block-slices.js';
import { DeltavolError, systemError } from '../util/errors.js';
import { writeFileAtomicSync } from '../util/atomic-file.js';
import { nodeDurableFs } from '../util/durable-fs.js';
import { FileStore } from '../storage/file-store.js';
import { VolumeEngine, type BuildOptions, type DeltaSink, type VolumeData } from './volume-engine.js';
import type { PagedBitmap } from '../bitmap/paged-bitmap.js';
import { fileStoreData } from './file-store-data.js';
import { validateVolumeName, type VolumeMeta } from './volume-meta.js';
import type { SnapshotInfo } from '../snapshot/snapshot-queue.js';
import type { DiffHeader, DiffRun } from '../snapshot/diff-stream.js';
import { WriteGate, type WriteAccess } from './write-gate.js';

export const META_FILE = 'volume.json';
export const DATA_FILE = 'data.img';
/** Engine metadata (bitmaps, activity log, snapshot save areas) lives in this subdirectory. */
export const ENGINE_DIR = 'engine';

export interface VolumeExtent {
  lengthBytes: number;
  /** The range reads as zeroes and uses no space. */
  hole: boolean;
}

/** Blocks read from elsewhere than the data file (a replica's delta set being integrated). */
export interface ReadOverlay {
  /** Copies n bytes of tracking block b from inBlock into target at offset; false if b is not here. */
  readBlock(b: number, inBlock: number, target: Buffer, offset: number, n: number): boolean;
}

export type { WriteAccess } from './write-gate.js';
import type { WriteMirror } from './write-mirror.js';
import type { ZeroBlockScan } from '../util/zero-block-scan.js';
import type { FileRange } from '../util/file-range.js';

export interface VolumeIoOptions {
  /** Reads/writes up to this many bytes run on the event loop (read at each I/O: it may change). */
  readonly syncIoBytesMax: number;
  /** Reads only (default syncIoBytesMax; read at each I/O). */
  readonly syncReadBytesMax?: number;
  /** Told about events an operator must see (a snapshot invalidated). */
  warn?: (message: string, fields: Record<string, unknown>) => void;
}

export class Volume {
  private openHandles = 0;
  /** Users (NBD connections) per snapshot export. */
  private readonly snapshotUsers = new Map<string, number>();
  /** The snapshot a restore is reading now, if any (its delete needs --force, which stops the restore). */
  private restoringFrom: string | null = null;
  private closed = false;
  private overlay: ReadOverlay | null = null;
  private readsInFlight = 0;
  private readonly readWaiters: (() => void)[] = [];
  /** Who may write (the replication role decides), and which client writes still run. */
  private readonly gate: WriteGate;

  private constructor(
    readonly dir: string,
    private meta: VolumeMeta,
    private readonly store: FileStore,
    /** The data file as the engine sees it (synchronous block reads for overlay reads). */
    private readonly data: VolumeData,
    readonly engine: VolumeEngine,
  ) {
    assert(store.sizeBytes === meta.sizeBytes, `data file size ${store.sizeBytes} ≠ metadata size ${meta.sizeBytes}`);
    this.gate = new WriteGate(meta.name);
  }

  /**
   * Opens a volume's data file and its engine. `fresh`: the volume was just created, so
   * the engine starts with empty bitmaps; otherwise it recovers from its files (after a
   * clean close or a crash).
   */
  static async open(dir: string, meta: VolumeMeta, io: VolumeIoOptions, fresh: boolean): Promise<Volume> {
    // The limit is looked up at each I/O (the daemon's LoopIoPolicy moves it).
    const store = FileStore.open(path.join(dir, DATA_FILE), {
      readOnly: false,
      get syncIoBytesMax() {
        return io.syncIoBytesMax;
      },
      get syncReadBytesMax() {
        return io.syncReadBytesMax ?? io.syncIoBytesMax;
      },
    });
    try {
      if (store.sizeBytes !== meta.sizeBytes) {
        throw new DeltavolError('METADATA_CORRUPT', `volume ${meta.name}: data file is ${store.sizeBytes} bytes, metadata says ${meta.sizeBytes}`);
      }
      const engineDir = path.join(dir, ENGINE_DIR);
      if (!fresh && !fs.existsSync(engineDir)) {
        throw new DeltavolError('METADATA_CORRUPT', `volume ${meta.name}: engine metadata directory ${engineDir} is missing`);
      }
      fs.mkdirSync(engineDir, { recursive: true, mode: 0o700 });
      const options = {
        blockBytes: meta.trackingBlockBytes,
        // By default one snapshot may hold every block of the volume, plus record headers.
        saveAreaBytesMax: meta.snapshotSpaceBytes ?? meta.sizeBytes + Math.ceil(meta.sizeBytes / 8),
        warn: io.warn,
      };
      const data = fileStoreData(store);
      const fsys = nodeDurableFs(engineDir);
      const engine = fresh ? await VolumeEngine.create(fsys, data, options) : await VolumeEngine.open(fsys, data, options);
      return new Volume(dir, meta, store, data, engine);
    } catch (e) {
      store.close();
      throw e;
    }
  }

  get name(): string {
    return this.meta.name;
  }
  get sizeBytes(): number {
    return this.meta.sizeBytes;
  }
  /** Clients get a read-only export: set so by the operator, or refused by the role. */
  get readOnly(): boolean {
    return this.meta.readOnly || this.gate.refusing;
  }
  /** The operator's own read-only setting (`volume set --read-only`). */
  get readOnlySetting(): boolean {
    return this.meta.readOnly;
  }
  get writeAccess(): WriteAccess {
    return this.gate.current;
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

  /** Clients of the volume itself (users that are not readers of its snapshot exports). */
  clientCount(): number {
    let snapshotReaders = 0;
    for (const n of this.snapshotUsers.values()) snapshotReaders += n;
    return this.openHandles - snapshotReaders;
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

  /**
   * Whether a client write may go now: undefined when it may, a promise to wait on when
   * writes are held (then check again); throws EPERM when they are refused.
   */
  private checkWritable(): Promise<void> | undefined {
    if (this.meta.readOnly) throw systemError('EPERM', `volume ${this.name} is read-only`);
    if (this.closed) throw systemError('ESHUTDOWN', `volume ${this.name} is closing`);
    return this.gate.check();
  }

  /** Sets what clients may do (the replication role decides). Held writes go on, or fail, at once. */
  setWriteAccess(a: WriteAccess): void {
    this.gate.set(a);
  }

  /** Resolves when no client write is running (held and refused ones do not count). */
  writesIdle(): Promise<void> {
    return this.gate.idle();
  }

  private track(r: void | Promise<void>): void | Promise<void> {
    return this.gate.track(r);
  }


  /**
   * Reads go straight to the file: the engine changes what is written, not how it is read.
   * While a read overlay is set (a replica integrating a delta set), its blocks are read
   * from the overlay instead, synchronously, so a reader sees the whole set or none of it.
   */
  read(offset: number, length: number, target: Buffer, scan?: ZeroBlockScan): void | Promise<void> {
    this.checkRange(offset, length);
    if (this.overlay !== null) return this.readThroughOverlay(this.overlay, offset, length, target);
    const r = this.store.read(offset, length, target, scan);
    if (!(r instanceof Promise)) return;
    this.readsInFlight++;
    return r.finally(() => {
      if (--this.readsInFlight === 0) for (const w of this.readWaiters.splice(0)) w();
    });
  }

  /**
   * Where a read of [offset, offset+length) lies in the data file, for a reply sent from the
   * page cache (the NBD layer's sendfile), or null when it must be read into memory:
   * - while client writes are held or refused: a replica's playback must not change pages
   *   under a send (its readers see a set whole or not at all), nor a role change;
   * - through a read overlay (a set being integrated);
   * - over blocks holding no data: a copying read finds their zeroes and sends them as holes.
   * A write racing the read may show through, as with any read it overlaps.
   */
  fileRange(offset: number, length: number): FileRange | null {
    this.checkRange(offset, length);
    if (this.closed || this.overlay !== null || this.gate.current.mode !== 'open') return null;
    if (!this.engine.allValid(offset, length)) return null;
    return {
      fd: this.store.fd,
      offset,
      length,
      read: (from, n) => {
        assert(from >= 0 && n >= 0 && from + n <= length, 'within the range');
        if (this.closed) throw systemError('ESHUTDOWN', `volume ${this.name} is closed`);
        const b = Buffer.allocUnsafe(n);
        this.data.readSync(offset + from, b, 0, n);
        return b;
      },
    };
  }

  private readThroughOverlay(o: ReadOverlay, offset: number, length: number, target: Buffer): void {
    forEachBlockSlice(offset, length, this.meta.trackingBlockBytes, (b, inBlock, done, n) => {
      if (!o.readBlock(b, inBlock, target, done, n)) this.data.readSync(offset + done, target, done, n);
    });
  }

  /** Sets (or removes, with null) the read overlay. Reads issued before it may still run: see readsDrained(). */
  setOverlay(o: ReadOverlay | null): void {
    this.overlay = o;
  }

  /** Resolves when no read issued to the threadpool is still running. */
  readsDrained(): Promise<void> {
    if (this.readsInFlight === 0) return Promise.resolve();
    return new Promise((r) => this.readWaiters.push(r));
  }

  /**
   * A replica's playback (or initial copy) writes through the engine even though the
   * volume is read-only to clients: snapshots and the change log see it as any write.
   */
  playbackWrite(offset: number, chunks: Buffer[]): void | Promise<void> {
    if (this.closed) throw systemError('ESHUTDOWN', `volume ${this.name} is closing`);
    return this.engine.write(offset, chunks);
  }

  /** Playback of many runs whose bytes lie one after the other in source (VolumeEngine.writeRuns). */
  playbackWriteRuns(ranges: Float64Array, count: number, source: Buffer, sourceOffset: number): void | Promise<void> {
    if (this.closed) throw systemError('ESHUTDOWN', `volume ${this.name} is closing`);
    return this.engine.writeRuns(ranges, count, source, sourceOffset);
  }

  /** A resync's copy zeroing blocks its source holds no data in (through the engine, like any write). */
  playbackZero(offset: number, length: number): void | Promise<void> {
    if (this.closed) throw systemError('ESHUTDOWN', `volume ${this.name} is closing`);
    this.checkRange(offset, length);
    return this.engine.zero(offset, length);
  }

  write(offset: number, payload: WritePayload, fua: boolean): void | Promise<void> {
    const wait = this.checkWritable();
    if (wait) return wait.then(() => this.write(offset, payload, fua));
    this.checkRange(offset, payloadLength(payload));
    const r = this.engine.write(offset, payload);
    if (!fua) return this.track(r);
    return this.track(r ? r.then(() => this.engine.flush()) : this.engine.flush());
  }

  /** Makes every completed write durable (data; the engine's own ordering covers its metadata). */
  flush(): Promise<void> {
    return this.engine.flush();
  }

  /**
   * TRIM: the range's contents become unspecified. Here it reads as zeroes, through the
   * engine, so snapshots keep the old contents and the change log records the change.
   */
  trim(offset: number, length: number, fua: boolean): void | Promise<void> {
    return this.zero(offset, length, false, false, fua);
  }

  /**
   * Makes the range read as zeroes. noHole keeps it allocated; fastOnly refuses (ENOTSUP)
   * when the only way is to write zeroes.
   */
  zero(offset: number, length: number, noHole: boolean, fastOnly: boolean, fua: boolean): void | Promise<void> {
    const wait = this.checkWritable();
    if (wait) return wait.then(() => this.zero(offset, length, noHole, fastOnly, fua));
    this.checkRange(offset, length);
    if (fastOnly && !this.store.canPunch) {
      throw systemError('ENOTSUP', 'zeroing this range would not be faster than writing zeroes');
    }
    const r = this.engine.zero(offset, length, noHole);
    if (!fua) return this.track(r);
    return this.track(r ? r.then(() => this.engine.flush()) : this.engine.flush());
  }

  prefetch(offset: number, length: number): void {
    this.checkRange(offset, length);
    this.store.prefetch(offset, length);
  }

  /** Allocation of the range from the file itself: holes read as zeroes. */
  extents(offset: number, length: number, extentsMax: number): VolumeExtent[] {
    this.checkRange(offset, length);
    // During playback the file's holes may be about to fill: report data (always safe).
    if (this.overlay !== null) return [{ lengthBytes: length, hole: false }];
    return this.store.allocation(offset, length, extentsMax);
  }

  async updateMeta(patch: Partial<Pick<VolumeMeta, 'readOnly' | 'description' | 'sizeBytes'>>): Promise<void> {
    const next = { ...this.meta, ...patch };
    if (next.sizeBytes !== this.meta.sizeBytes) {
      if (next.sizeBytes < this.meta.sizeBytes) {
        throw new DeltavolError('VOLUME_SHRINK', `volume ${this.name} cannot shrink (${this.meta.sizeBytes} → ${next.sizeBytes} bytes)`);
      }
      // Data first, then the engine's bitmaps (its open() finishes a growth a crash interrupted).
      this.store.resize(next.sizeBytes);
      await this.engine.grow();
    }
    writeFileAtomicSync(path.join(this.dir, META_FILE), JSON.stringify(next, null, 2) + '\n');
    this.meta = next;
  }

  // ================= snapshots =================

  snapshots(): SnapshotInfo[] {
    return this.engine.listSnapshots();
  }

  /** Deleted snapshots whose save areas older snapshots still read through (freed when those go). */
  deletedSnapshotsKept(): { count: number; saveAreaBytes: number } {
    return this.engine.deletedSnapshotsKept();
  }

  snapshot(name: string): SnapshotInfo {
    const s = this.engine.listSnapshots().find((x) => x.name === name);
    if (!s) throw new DeltavolError('SNAPSHOT_NOT_FOUND', `volume ${this.name} has no snapshot named "${name}"`);
    return s;
  }

  /** Takes a snapshot at a consistent point: it holds every write acknowledged before. */
  createSnapshot(name: string, deltaSetNumber = 0): Promise<SnapshotInfo> {
    validateVolumeName(name);
    if (this.closed) throw new DeltavolError('SHUTTING_DOWN', `volume ${this.name} is closing`);
    return this.engine.createSnapshot(name, deltaSetNumber);
  }

  /** Deletes a snapshot; refused while a client reads it unless force. Others keep their content. */
  async deleteSnapshot(name: string, force: boolean): Promise<void> {
    this.snapshot(name);
    const users = this.snapshotUsers.get(name) ?? 0;
    if (users > 0 && !force) {
      throw new DeltavolError('VOLUME_BUSY', `snapshot ${this.name}@${name} has ${users} connected client(s); disconnect them or use --force`);
    }
    if (this.restoringFrom === name && !force) {
      throw new DeltavolError('VOLUME_BUSY', `snapshot ${this.name}@${name} is being restored; wait for the restore to end, or use --force (the restore then stops, the volume holding part of the snapshot)`);
    }
    await this.engine.deleteSnapshot(name);
  }

  /**
   * Rolls the volume back to a snapshot in place, copying only blocks that differ.
   * Refused while clients are connected to the volume (their caches would be wrong) unless force.
   */
  restoreSnapshot(name: string, force: boolean): Promise<{ blocksWritten: number; blocksZeroed: number }> {
    if (this.checkWritable()) throw new DeltavolError('VOLUME_BUSY', `volume ${this.name}: writes are held (${(this.gate.current as { reason: string }).reason})`);
    this.snapshot(name);
    // Readers of snapshot exports are unaffected (snapshots keep their content); only
    // clients of the volume itself would hold stale caches.
    const volumeClients = this.clientCount();
    if (volumeClients > 0 && !force) {
      throw new DeltavolError('VOLUME_BUSY', `volume ${this.name} has ${volumeClients} connected client(s); disconnect them or use --force`);
    }
    // Two restores would interleave their blocks: the volume would end as neither snapshot.
    if (this.restoringFrom !== null) {
      throw new DeltavolError('VOLUME_BUSY', `volume ${this.name} is being restored from snapshot ${this.restoringFrom}; wait for that restore to end`);
    }
    this.restoringFrom = name;
    return this.engine.restoreSnapshot(name).finally(() => (this.restoringFrom = null));
  }

  acquireSnapshot(name: string): SnapshotInfo {
    const s = this.snapshot(name);
    if (!s.valid) throw new DeltavolError('SNAPSHOT_INVALID', `snapshot ${this.name}@${name} is invalid (its save area filled)`);
    this.acquire();
    this.snapshotUsers.set(name, (this.snapshotUsers.get(name) ?? 0) + 1);
    return s;
  }

  releaseSnapshot(name: string): void {
    const n = this.snapshotUsers.get(name) ?? 0;
    assert(n > 0, 'releaseSnapshot without acquireSnapshot');
    if (n === 1) this.snapshotUsers.delete(name);
    else this.snapshotUsers.set(name, n - 1);
    this.release();
  }

  readSnapshot(name: string, offset: number, length: number, target: Buffer): void {
    const s = this.snapshot(name);
    if (!s.valid) throw systemError('EIO', `snapshot ${this.name}@${name} is invalid (its save area filled)`);
    if (!(offset >= 0 && length >= 0 && offset + length <= s.sizeBytes)) {
      throw systemError('EINVAL', `range ${offset}+${length} outside snapshot ${this.name}@${name} of ${s.sizeBytes} bytes`);
    }
    this.engine.readSnapshot(name, offset, length, target);
  }

  /** Holes of a snapshot: blocks that held no data when it was taken. */
  snapshotExtents(name: string, offset: number, length: number, extentsMax: number): VolumeExtent[] {
    return this.engine.snapshotExtents(name, offset, length, extentsMax);
  }

  /** Blocks changed since snapshot `name` (the qemu:dirty-bitmap:NAME context). */
  changedSince(name: string, offset: number, length: number, extentsMax: number): { lengthBytes: number; dirty: boolean }[] {
    this.checkRange(offset, length);
    return this.engine.dirtyExtents(name, offset, length, extentsMax);
  }

  /**
   * The differential L→M (seed 001 FIG. 34–40): the blocks that changed between snapshots
   * `from` and `to`, with their content as of `to`, in block order; ranges that became
   * zero come as zero runs. Applied to a copy of `from`, it yields `to` byte for byte.
   */
  differentialHeader(from: string, to: string): DiffHeader {
    for (const n of [from, to]) {
      if (!this.snapshot(n).valid) throw new DeltavolError('SNAPSHOT_INVALID', `snapshot ${this.name}@${n} is invalid (its save area filled)`);
    }
    return {
      volume: this.name,
      from,
      to,
      blockBytes: this.meta.trackingBlockBytes,
      sizeBytes: this.snapshot(to).sizeBytes,
      createdAt: new Date().toISOString(),
    };
  }

  *differential(from: string, to: string): Generator<DiffRun> {
    for (const r of this.engine.differentialStream(from, to)) {
      yield { offsetBytes: r.offsetBytes, lengthBytes: r.lengthBytes, data: r.data };
    }
  }

  // ================= replication (see src/replication/ports.ts) =================

  get blockBytes(): number {
    return this.meta.trackingBlockBytes;
  }
  get blocksTotal(): number {
    return this.engine.blocksTotal;
  }

  setMirror(m: WriteMirror | null): void {
    this.engine.setMirror(m);
  }

  get quiescing(): boolean {
    return this.engine.quiescing;
  }

  buildDeltaSet(n: number, sink: DeltaSink, options: BuildOptions): Promise<{ blocks: number }> {
    if (this.closed) throw new DeltavolError('SHUTTING_DOWN', `volume ${this.name} is closing`);
    if (options.snapshotName !== undefined) validateVolumeName(options.snapshotName);
    return this.engine.buildDeltaSet(n, sink, options);
  }

  snapshotAndForget(name: string, setNumber: number): Promise<void> {
    validateVolumeName(name);
    return this.engine.snapshotAndForget(name, setNumber);
  }

  changedBlockCount(): number {
    return this.engine.changedBlockCount();
  }

  unshippedBlockCount(): number {
    return this.engine.unshippedBlockCount();
  }

  snapshotValidBlocks(name: string): PagedBitmap {
    return this.engine.snapshotValidBlocks(name);
  }

  discardChanges(): Promise<void> {
    return this.engine.discardChanges();
  }

  changedBlocks(): PagedBitmap {
    return this.engine.changeLog.pending();
  }

  /** Whether any block may hold data (a volume never written holds none). */
  hasData(): boolean {
    return this.engine.validBlockCount() > 0;
  }

  /** Blocks to copy and to zero that turn a copy of snapshot `from` into snapshot `to` (null: the volume now). */
  differenceBlocks(from: string, to: string | null): { data: PagedBitmap; zero: PagedBitmap } {
    return this.engine.differential(from, to);
  }

  /** Applies one run of a differential through the normal write path (the change log sees it). */
  applyRun(run: DiffRun): void | Promise<void> {
    return run.data ? this.write(run.offsetBytes, [run.data], false) : this.zero(run.offsetBytes, run.lengthBytes, false, false, false);
  }

  /** Checkpoints the engine, flushes and closes the data file. New users are refused from here on. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.engine.close();
    await this.store.flush();
    this.store.close();
  }
}
