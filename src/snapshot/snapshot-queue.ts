// Why: the snapshot copy facility of seed 001 (FIG. 25–27, 41–46) for one volume: the
// volume itself is the clone; each snapshot owns a save area (before-images + the block
// map rebuilt from it), a bitmap (blocks saved) and a meta bitmap (the volume's validity
// when it was taken). Snapshots form a queue, oldest at the head; only the tail receives
// before-images. This module is pure bookkeeping over a DurableFs: the volume engine
// decides when to call it, and passes a reader of the volume for reads that fall through.
//
// Per snapshot N and block b (bitmaps and their rules):
//   meta_N[b]  - b held data when N was taken. Clear ⇒ N reads b as zeroes.
//   saved_N[b] - N's save area holds b's content as of N (its before-image).
//   saved_N[b] ⇒ meta_N[b]  (an invalid block is never saved).
//   Only the tail is written: a write (or trim) of b with meta_T[b] ∧ ¬saved_T[b] saves b
//   into T first (FIG. 41). Older snapshots never need a copy: if ¬saved_N[b] and
//   meta_N[b], b did not change between N and N+1, so N reads b as N+1 does (FIG. 27).
// N becoming invalid when its save area fills moves to its older neighbour P every
// before-image P still needs (meta_P[b] ∧ ¬saved_P[b]); then N leaves the chain. An
// invalid snapshot stays listed (status) but is skipped by every read.
// Deleting N costs no copy: N is hidden (not listed, not found by name, its name free
// again) but stays in the chain, so every older snapshot reads through it exactly as
// before, and as the tail it goes on receiving before-images. A hidden snapshot leaves
// for good once no visible valid snapshot is older than it (nothing reads through it
// then), or is merged into its older neighbour as above when the queue is full. So
// deleting any snapshot, the newest included, is one manifest write, whatever it saved.
//
// Files, per volume directory: snapshots.json (the queue, replaced atomically: a snapshot
// exists once listed there), snap-ID.meta (its meta bitmap, bitmap-file.ts format),
// snap-ID.save (save-area.ts format).

import { assert, AssertionError } from '../util/assert.js';
import { DeltavolError } from '../util/errors.js';
import type { DurableFs } from '../util/durable-fs.js';
import { PagedBitmap } from '../bitmap/paged-bitmap.js';
import { BitmapFile } from '../bitmap/bitmap-file.js';
import { SaveArea } from './save-area.js';

const MANIFEST = 'snapshots.json';
const FORMAT_VERSION = 1;
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
/** Snapshots per volume. */
const snapshotsMax = 256;

export interface SnapshotInfo {
  id: number;
  name: string;
  createdAt: string;
  /** The volume's size when the snapshot was taken (its export size). */
  sizeBytes: number;
  /** Delta set number stamped by the replicator (0 until it does). */
  deltaSetNumber: number;
  savedBlocks: number;
  saveAreaBytes: number;
  /** False once its save area filled: it no longer reads correctly and is skipped. */
  valid: boolean;
}

interface ManifestEntry {
  id: number;
  name: string;
  createdAt: string;
  sizeBytes: number;
  deltaSetNumber: number;
  valid: boolean;
  /** Deleted by the user but still read through by older snapshots (absent = false). */
  hidden?: boolean;
}

export interface Snapshot {
  readonly id: number;
  readonly name: string;
  readonly createdAt: string;
  readonly sizeBytes: number;
  deltaSetNumber: number;
  valid: boolean;
  /** Deleted: kept only because older snapshots read through its save area. */
  hidden: boolean;
  meta: PagedBitmap;
  area: SaveArea | null;
}

/** Reads tracking block b of the volume (blockBytes) into target at offset. */
export type VolumeBlockReader = (block: number, target: Buffer, offset: number) => void;

export const metaFileName = (id: number) => `snap-${id}.meta`;
export const saveFileName = (id: number) => `snap-${id}.save`;

export class SnapshotQueue {
  /** Oldest first. Invalid snapshots stay listed but have no area and join no chain. */
  private readonly queue: Snapshot[] = [];
  private nextId = 1;
  /** The newest valid snapshot (the one receiving before-images), or null. */
  private tailSnap: Snapshot | null = null;
  private readonly scratch: Buffer;

  private constructor(
    private readonly fsys: DurableFs,
    public blocksTotal: number,
    readonly blockBytes: number,
    readonly saveAreaBytesMax: number,
  ) {
    this.scratch = Buffer.alloc(blockBytes);
  }

  static async open(fsys: DurableFs, blocksTotal: number, blockBytes: number, saveAreaBytesMax: number): Promise<SnapshotQueue> {
    const q = new SnapshotQueue(fsys, blocksTotal, blockBytes, saveAreaBytesMax);
    const text = fsys.readAll(MANIFEST);
    if (text === null) return q;
    let m: { formatVersion: number; nextId: number; snapshots: ManifestEntry[] };
    try {
      m = JSON.parse(text.toString('utf8'));
    } catch (e) {
      throw new DeltavolError('METADATA_CORRUPT', `${MANIFEST}: ${(e as Error).message}`);
    }
    if (m.formatVersion !== FORMAT_VERSION || !Array.isArray(m.snapshots)) throw new DeltavolError('METADATA_CORRUPT', `${MANIFEST}: unknown format`);
    q.nextId = m.nextId;
    for (const e of m.snapshots) {
      let meta = new PagedBitmap(blocksTotal);
      let area: SaveArea | null = null;
      if (e.valid) {
        const opened = BitmapFile.open(fsys, metaFileName(e.id));
        opened.file.close();
        meta = opened.bitmap;
        // Taken before the volume grew: the blocks added since held nothing then.
        if (meta.bitsTotal > blocksTotal) throw new DeltavolError('METADATA_CORRUPT', `${metaFileName(e.id)}: larger than the volume`);
        meta.grow(blocksTotal);
        area = await SaveArea.open(fsys, saveFileName(e.id), e.id, blockBytes, blocksTotal, saveAreaBytesMax);
      }
      if (!Number.isSafeInteger(e.sizeBytes)) throw new DeltavolError('METADATA_CORRUPT', `${MANIFEST}: snapshot ${e.name} has no size`);
      q.queue.push({ id: e.id, name: e.name, createdAt: e.createdAt, sizeBytes: e.sizeBytes, deltaSetNumber: e.deltaSetNumber, valid: e.valid, hidden: e.hidden === true, meta, area });
    }
    q.refreshTail();
    q.commit(); // drops hidden snapshots nothing reads through (none, unless an older version left them)
    return q;
  }

  private refreshTail(): void {
    this.tailSnap = null;
    for (let i = this.queue.length - 1; i >= 0; i--) {
      if (this.queue[i]!.valid) {
        this.tailSnap = this.queue[i]!;
        break;
      }
    }
  }

  private writeManifest(): void {
    const m = {
      formatVersion: FORMAT_VERSION,
      nextId: this.nextId,
      snapshots: this.queue.map((s) => ({ id: s.id, name: s.name, createdAt: s.createdAt, sizeBytes: s.sizeBytes, deltaSetNumber: s.deltaSetNumber, valid: s.valid, ...(s.hidden ? { hidden: true } : {}) })),
    };
    this.fsys.writeAtomic(MANIFEST, Buffer.from(JSON.stringify(m, null, 2) + '\n'));
  }

  /** The volume grew: every snapshot reads the new blocks as holes (they held nothing then). */
  grow(blocksTotal: number): void {
    for (const s of this.queue) {
      s.meta.grow(blocksTotal);
      s.area?.bitmap.grow(blocksTotal);
    }
    this.blocksTotal = blocksTotal;
  }

  /** The snapshots users see (hidden ones left out), oldest first. */
  list(): SnapshotInfo[] {
    return this.queue.filter((s) => !s.hidden).map((s) => ({
      id: s.id,
      name: s.name,
      createdAt: s.createdAt,
      sizeBytes: s.sizeBytes,
      deltaSetNumber: s.deltaSetNumber,
      savedBlocks: s.area?.slots ?? 0,
      saveAreaBytes: s.area?.bytesOnDisk ?? 0,
      valid: s.valid,
    }));
  }

  /** Snapshots users see. */
  get length(): number {
    return this.queue.reduce((n, s) => n + (s.hidden ? 0 : 1), 0);
  }

  /** Deleted snapshots still kept for older ones to read through, and the save-area bytes they hold. */
  hiddenUsage(): { count: number; saveAreaBytes: number } {
    let count = 0;
    let saveAreaBytes = 0;
    for (const s of this.queue) {
      if (!s.hidden) continue;
      count++;
      saveAreaBytes += s.area?.bytesOnDisk ?? 0;
    }
    return { count, saveAreaBytes };
  }

  get tail(): Snapshot | null {
    return this.tailSnap;
  }

  /** Queue index of the visible snapshot of this name. */
  indexOf(name: string): number {
    const i = this.queue.findIndex((s) => s.name === name && !s.hidden);
    if (i < 0) throw new DeltavolError('SNAPSHOT_NOT_FOUND', `no snapshot named "${name}"`);
    return i;
  }

  /**
   * The visible snapshot of this name itself, for a caller that awaits between uses: queue
   * indexes shift when hidden snapshots leave the front, so it looks the index up again
   * with indexOfSnapshot after every await.
   */
  handle(name: string): Snapshot {
    return this.queue[this.indexOf(name)]!;
  }

  /** Queue index of a snapshot from handle(); SNAPSHOT_NOT_FOUND once it was deleted. */
  indexOfSnapshot(snap: Snapshot, during: string): number {
    const i = this.queue.indexOf(snap);
    if (i < 0 || snap.hidden) throw new DeltavolError('SNAPSHOT_NOT_FOUND', `snapshot "${snap.name}" was deleted while it was being ${during}`);
    return i;
  }

  get(index: number): Snapshot {
    const s = this.queue[index];
    if (s === undefined) throw new AssertionError(`snapshot index ${index}`);
    return s;
  }

  // ---- the write path (FIG. 41) ----

  /** Whether a write or trim of b must first save b's current content into the tail. */
  needsSave(b: number): boolean {
    const t = this.tailSnap;
    return t !== null && t.meta.test(b) && !t.area!.has(b);
  }

  /** Appends b's before-image (blockBytes at data[offset]) to the tail; may throw SAVE_AREA_FULL. */
  save(b: number, data: Buffer, offset: number): void {
    const t = this.tailSnap;
    assert(t !== null && t.area !== null, 'save without a tail');
    t.area.append(b, data, offset);
  }

  /** Makes every before-image saved so far durable (group commit). */
  syncTail(): Promise<void> {
    return this.tailSnap?.area?.sync() ?? Promise.resolve();
  }

  // ---- create / delete ----

  /**
   * Takes a snapshot whose meta bitmap is `validity`. The caller has quiesced writes and
   * flushed the volume: the snapshot is the volume as it is now.
   */
  async create(name: string, validity: PagedBitmap, sizeBytes: number, deltaSetNumber = 0, now = new Date()): Promise<SnapshotInfo> {
    if (!NAME_RE.test(name)) throw new DeltavolError('BAD_NAME', `invalid snapshot name "${name}"`);
    if (this.queue.some((s) => s.name === name && !s.hidden)) throw new DeltavolError('SNAPSHOT_EXISTS', `snapshot "${name}" already exists`);
    if (this.queue.length >= snapshotsMax) await this.retireOldestHidden();
    if (this.queue.length >= snapshotsMax) throw new DeltavolError('SNAPSHOTS_MAX', `a volume has at most ${snapshotsMax} snapshots`);
    const id = this.nextId++;
    // Shares the validity bitmap's pages: a snapshot costs memory only where the volume's
    // validity changes after it (one page copied per page changed).
    const meta = validity.shareClone();
    // Files first, the manifest last: a crash before it leaves files no manifest names
    // (removed at the next create of that id: ids are never reused, so they are inert).
    const mf = await BitmapFile.create(this.fsys, metaFileName(id), this.blocksTotal);
    meta.forEachPage((p, page) => mf.writePage(p, page));
    await mf.sync();
    mf.close();
    const area = await SaveArea.create(this.fsys, saveFileName(id), id, this.blockBytes, this.blocksTotal, this.saveAreaBytesMax);
    const snap: Snapshot = { id, name, createdAt: now.toISOString(), sizeBytes, deltaSetNumber, valid: true, hidden: false, meta, area };
    this.queue.push(snap);
    this.writeManifest();
    this.refreshTail();
    return this.list().at(-1)!;
  }

  setDeltaSetNumber(name: string, deltaSetNumber: number): void {
    this.queue[this.indexOf(name)]!.deltaSetNumber = deltaSetNumber;
    this.writeManifest();
  }

  /**
   * Removes a snapshot from view; every other snapshot reads exactly as before. No data
   * moves: a valid snapshot that older ones may read through is hidden (see the header),
   * anything else leaves at once, with the hidden ones nothing reads through any more.
   */
  async delete(name: string): Promise<void> {
    this.queue[this.indexOf(name)]!.hidden = true;
    this.commit();
  }

  /**
   * Ends every change of the queue: drops the hidden snapshots nothing reads through,
   * writes the manifest, finds the tail, then removes the dropped snapshots' files (a
   * crash before that leaves files no manifest names: inert, as ids are never reused).
   */
  private commit(): void {
    const gone = this.pruneHidden();
    this.writeManifest();
    this.refreshTail();
    for (const s of gone) this.removeFiles(s);
  }

  /**
   * Takes out of the queue every hidden snapshot that no visible valid snapshot is older
   * than (nothing reads through it), and every hidden invalid one (it has no area).
   * Only at the end of a top-level change: it shifts queue indexes.
   */
  private pruneHidden(): Snapshot[] {
    const gone: Snapshot[] = [];
    for (let i = 0; i < this.queue.length; ) {
      const s = this.queue[i]!;
      if (!s.hidden) {
        if (s.valid) break; // it may read through every later one
        i++;
        continue;
      }
      this.queue.splice(i, 1);
      gone.push(s);
    }
    // An invalid snapshot a user deleted has no area: nothing reads through it anywhere.
    for (let i = 0; i < this.queue.length; ) {
      const s = this.queue[i]!;
      if (s.hidden && !s.valid) {
        this.queue.splice(i, 1);
        gone.push(s);
      } else i++;
    }
    return gone;
  }

  /** The queue is full: the oldest hidden snapshot hands its older neighbour what it needs, then leaves. */
  private async retireOldestHidden(): Promise<void> {
    const i = this.queue.findIndex((s) => s.hidden && s.valid);
    if (i < 0) return;
    const snap = this.queue[i]!;
    await this.mergeIntoOlder(i);
    this.queue.splice(i, 1);
    // The manifest stops naming it before its files go: a crash in between leaves inert
    // files, not a manifest naming missing ones (which would not open).
    this.commit();
    this.removeFiles(snap);
  }

  /**
   * The tail's save area is full: it becomes invalid (listed, skipped by reads) after
   * handing its older neighbours what they need, so no other snapshot is affected.
   * Returns the names of the snapshots invalidated (more than one when a neighbour's save
   * area fills while taking those blocks: it is then retired the same way first).
   */
  async invalidateTail(): Promise<string[]> {
    const snap = this.tailSnap;
    assert(snap !== null, 'invalidate without a tail');
    const names = await this.invalidate(this.queue.indexOf(snap));
    this.commit();
    return names;
  }

  private async invalidate(i: number): Promise<string[]> {
    const snap = this.queue[i]!;
    assert(snap.valid, 'invalidate a valid snapshot');
    const names = await this.mergeIntoOlder(i);
    snap.valid = false;
    this.writeManifest();
    this.refreshTail();
    this.removeFiles(snap);
    snap.area = null;
    snap.meta = new PagedBitmap(this.blocksTotal);
    // A deleted snapshot going invalid is nobody's news: commit() drops it.
    return snap.hidden ? names : [...names, snap.name];
  }

  private olderValid(i: number): number {
    for (let j = i - 1; j >= 0; j--) if (this.queue[j]!.valid) return j;
    return -1;
  }

  /**
   * Copies into the nearest older valid snapshot every before-image of queue[i] it needs
   * (meta ∧ ¬saved: it read that block through queue[i]). If that one's save area fills,
   * it is invalidated first (its own blocks go further down) and the copy continues into
   * the next older one. Returns the names invalidated on the way.
   */
  private async mergeIntoOlder(i: number): Promise<string[]> {
    const from = this.queue[i]!.area!;
    const invalidated: string[] = [];
    const touched = new Set<SaveArea>();
    const buf = this.scratch;
    let j = this.olderValid(i);
    for (const [start, count] of from.bitmap.runs()) {
      for (let b = start; b < start + count && j >= 0; b++) {
        for (;;) {
          const older = this.queue[j]!;
          if (!older.meta.test(b) || older.area!.has(b)) break;
          if (older.area!.full) {
            touched.delete(older.area!);
            invalidated.push(...(await this.invalidate(j)));
            j = this.olderValid(i);
            if (j < 0) break;
            continue;
          }
          from.readBlock(b, buf, 0);
          older.area!.append(b, buf, 0);
          touched.add(older.area!);
          break;
        }
      }
    }
    for (const area of touched) await area.sync();
    return invalidated;
  }

  private removeFiles(snap: Snapshot): void {
    snap.area?.close();
    this.fsys.remove(saveFileName(snap.id));
    this.fsys.remove(metaFileName(snap.id));
  }

  // ---- reads (FIG. 27 with meta bitmaps) ----

  /**
   * Reads block b of snapshot queue[index] into target: from the first valid snapshot at
   * or after it that saved b, else from the volume. Returns false (target untouched) when
   * b held no data when the snapshot was taken: it reads as zeroes.
   */
  readBlock(index: number, b: number, target: Buffer, offset: number, readVolume: VolumeBlockReader): boolean {
    const snap = this.get(index);
    if (!snap.valid) throw new DeltavolError('SNAPSHOT_INVALID', `snapshot "${snap.name}" is invalid (its save area filled up)`);
    if (!snap.meta.test(b)) return false;
    for (let i = index; i < this.queue.length; i++) {
      const s = this.queue[i]!;
      if (s.valid && s.area!.has(b)) {
        s.area!.readBlock(b, target, offset);
        return true;
      }
    }
    readVolume(b, target, offset);
    return true;
  }

  /** Whether block b of snapshot queue[index] holds data (BLOCK_STATUS on a snapshot export). */
  blockValid(index: number, b: number): boolean {
    return this.get(index).meta.test(b);
  }

  // ---- differential (FIG. 34, 39, 40) ----

  /**
   * The blocks to send to turn a copy of snapshot L into snapshot M (or the volume as it is
   * now, when toIndex is null and `validity` is the volume's): `data` blocks are read from
   * M, `zero` blocks hold no data in M but did in L. A block is in `data` when M holds it
   * and some snapshot I in [L, M) saved it (it changed after I) or did not hold it (so a
   * write to it was never saved anywhere); otherwise it did not change from L to M.
   */
  differential(fromIndex: number, toIndex: number | null, validity: PagedBitmap): { data: PagedBitmap; zero: PagedBitmap } {
    const end = toIndex ?? this.queue.length;
    if (toIndex !== null && !this.get(toIndex).valid) throw new DeltavolError('SNAPSHOT_INVALID', `snapshot "${this.get(toIndex).name}" is invalid`);
    const mMeta = toIndex === null ? validity : this.get(toIndex).meta;
    const { changed, allHeld, lMeta } = this.changesSince(fromIndex, end);
    // data = M.meta ∧ (changed ∨ ¬allHeld)
    const data = mMeta.clone();
    data.intersect(changed);
    const notHeld = mMeta.clone();
    notHeld.difference(allHeld);
    data.union(notHeld);
    // zero = L.meta ∧ ¬M.meta
    const zero = lMeta.clone();
    zero.difference(mMeta);
    return { data, zero };
  }

  /**
   * What rolling the volume back to snapshot queue[index] must do: `write` blocks get the
   * snapshot's content (they may differ now), `zero` blocks held no data in the snapshot
   * but may now. The same reasoning as differential(), in the other direction.
   */
  restorePlan(index: number, validity: PagedBitmap): { write: PagedBitmap; zero: PagedBitmap } {
    const { changed, allHeld, lMeta } = this.changesSince(index, this.queue.length);
    const write = lMeta.clone();
    write.intersect(changed);
    const notHeld = lMeta.clone();
    notHeld.difference(allHeld);
    write.union(notHeld);
    const zero = validity.clone();
    zero.difference(lMeta);
    return { write, zero };
  }

  /** Over valid snapshots I in [from, end): ∪ saved_I and ∩ meta_I. */
  private changesSince(from: number, end: number): { changed: PagedBitmap; allHeld: PagedBitmap; lMeta: PagedBitmap } {
    assert(from >= 0 && from < end && end <= this.queue.length, 'L must be older than M');
    const l = this.get(from);
    if (!l.valid) throw new DeltavolError('SNAPSHOT_INVALID', `snapshot "${l.name}" is invalid`);
    const changed = new PagedBitmap(this.blocksTotal);
    const allHeld = l.meta.clone();
    for (let i = from; i < end; i++) {
      const s = this.queue[i]!;
      if (!s.valid) continue; // merged into its older neighbour when it became invalid
      changed.union(s.area!.bitmap);
      allHeld.intersect(s.meta);
    }
    return { changed, allHeld, lMeta: l.meta };
  }

  close(): void {
    for (const s of this.queue) s.area?.close();
  }

  invariants(): void {
    for (const s of this.queue) {
      if (!s.valid) continue;
      s.meta.invariants();
      s.area!.bitmap.invariants();
      const extra = s.area!.bitmap.clone();
      extra.difference(s.meta);
      assert(extra.count() === 0, `snapshot ${s.name}: saved ⊆ meta`);
      assert(s.area!.bitmap.count() === s.area!.slots, `snapshot ${s.name}: one slot per saved block`);
    }
    assert(this.tailSnap === null || this.tailSnap.valid, 'tail is valid');
  }
}
