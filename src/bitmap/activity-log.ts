// Why: a write must be recorded as changed (and valid) before its data can reach disk,
// but an fsync of the bitmaps per write would cost most of the write budget. As DRBD does,
// the volume is cut into activity extents; a write may proceed at once when its extent is
// "hot", i.e. listed in the durable activity log. Only the first write to a cold extent
// waits, for one 4 KiB record + fsync shared by every write that joined meanwhile (group
// commit). After a crash, every block of every extent in the newest good record is
// treated as changed and valid: recovery over-marks by at most
// activityExtentsMax × activityExtentBytes, and never under-marks.
//
// States of an extent: cold → joining (named in a record being written) → hot (in the
// durable record; writes pass) → leaving (chosen for eviction: out of `hot` at once, so a
// write to it waits and joins again) → cold once a record without it is durable. An
// extent may only leave after the bitmap pages covering it are durable (checkpoint()).
//
// File layout: two 4 KiB record slots used in turn; a record is
//   magic "DVAL" u32, version u32, seq lo u32, seq hi u32, count u32, extentBytes u32,
//   crc32c u32 (of the record with this field 0), reserved u32, then count extents u32.
// The good record with the highest seq wins; a torn record can only be the one being written.
//
// Slot reuse: a slot is written again only once the other slot holds a record known
// durable (its sync resolved). After a crash the next record goes into the torn slot and
// nothing relies on it until its sync resolves, which also wipes what the crash left
// there; so a torn leftover cannot be completed by a later torn write into a record that
// wins. After a failed sync the slot's content is unknown (whole, torn or lost, and a
// later sync will not write it again), so the next record goes into that same slot: the
// other one still holds the only record known good.

import { crc32c } from '@node-rs/crc32';
import { assert } from '../util/assert.js';
import { DeltavolError } from '../util/errors.js';
import type { DurableFile, DurableFs } from '../util/durable-fs.js';
import { PagedBitmap } from './paged-bitmap.js';

/**
 * Extents that may be "hot" (written since their bitmap pages were last made durable) at
 * once. After a crash every block of every hot extent is marked changed and valid, so this
 * times the extent size (4 MiB by default: ≈ 3.9 GiB) bounds the extra work recovery causes.
 */
const activityExtentsMax = 1000;
/** One sector-aligned 4 KiB record holds the whole hot set. */
const activityRecordBytes = 4096;
assert(activityRecordBytes >= 32 + activityExtentsMax * 4, 'the whole hot set fits one activity record');

/**
 * A full log evicts at least hotMax / this many extents at once (125 of 1000): one
 * checkpoint then covers the bits of many extents, and the next writes to cold extents find
 * room without one. Evicting only what a round needed made scattered writes over a large
 * volume (every write to an extent of its own) pay a checkpoint (three fsyncs) per write.
 */
const activityEvictBatchDivisor = 8;

const MAGIC = 0x4c415644; // "DVAL"
const VERSION = 1;

export interface ActivityLogOptions {
  extentsTotal: number;
  extentBytes: number;
  /** Extents that may be hot at once (default activityExtentsMax). */
  hotMax?: number;
  /** Makes every bitmap bit set so far durable; called before extents are evicted. */
  checkpoint: () => Promise<void>;
}

interface Waiter {
  first: number;
  last: number;
  resolve: () => void;
  reject: (e: unknown) => void;
}

export class ActivityLog {
  private readonly hot: PagedBitmap;
  private readonly referenced: PagedBitmap;
  private readonly hotList: Uint32Array;
  private hotCount = 0;
  private clockHand = 0;
  private seq: number;
  private slot: number;
  private readonly record = Buffer.alloc(activityRecordBytes);
  /** Writes waiting for their extents to be hot, in arrival order. */
  private waiters: Waiter[] = [];
  private scheduled = false;
  private committing = false;
  readonly hotMax: number;
  /** Records written (each one fsync): the cost this log adds to the write path. */
  commits = 0;

  private constructor(
    private readonly file: DurableFile,
    private readonly options: ActivityLogOptions,
    seq: number,
    slot: number,
  ) {
    this.hotMax = options.hotMax ?? activityExtentsMax;
    assert(this.hotMax >= 1 && this.hotMax <= activityExtentsMax, 'hotMax within the record');
    this.hot = new PagedBitmap(options.extentsTotal);
    this.referenced = new PagedBitmap(options.extentsTotal);
    this.hotList = new Uint32Array(this.hotMax);
    this.seq = seq;
    this.slot = slot;
  }

  /** Creates an empty log (durable on return). */
  static async create(fsys: DurableFs, name: string, options: ActivityLogOptions): Promise<ActivityLog> {
    const file = fsys.open(name, true);
    file.truncate(0);
    const log = new ActivityLog(file, options, 1, 0);
    await log.writeRecord([]);
    return log;
  }

  /**
   * Opens a log; returns the extents that were hot at the crash (or clean close: none).
   * The caller marks their blocks changed and valid, checkpoints, then calls reset().
   */
  static open(fsys: DurableFs, name: string, options: ActivityLogOptions): { log: ActivityLog; hotAtOpen: number[] } {
    const file = fsys.open(name, false);
    let best: { seq: number; slot: number; extents: number[] } | null = null;
    const r = Buffer.alloc(activityRecordBytes);
    for (let s = 0; s < 2; s++) {
      if (file.read(s * activityRecordBytes, r, 0, activityRecordBytes) < activityRecordBytes) continue;
      if (r.readUInt32LE(0) !== MAGIC || r.readUInt32LE(4) !== VERSION) continue;
      const crc = r.readUInt32LE(24);
      r.writeUInt32LE(0, 24);
      if (crc32c(r) !== crc) continue;
      const count = r.readUInt32LE(16);
      if (count > activityExtentsMax || r.readUInt32LE(20) !== options.extentBytes) continue;
      const seq = r.readUInt32LE(8) + r.readUInt32LE(12) * 2 ** 32;
      if (best && best.seq >= seq) continue;
      const extents: number[] = [];
      for (let i = 0; i < count; i++) extents.push(r.readUInt32LE(32 + 4 * i));
      best = { seq, slot: s, extents };
    }
    if (!best) throw new DeltavolError('METADATA_CORRUPT', `activity log ${name}: no good record`);
    for (const e of best.extents) {
      if (e >= options.extentsTotal) throw new DeltavolError('METADATA_CORRUPT', `activity log ${name}: extent ${e} past the volume`);
    }
    const log = new ActivityLog(file, options, best.seq + 1, best.slot === 0 ? 1 : 0);
    return { log, hotAtOpen: best.extents };
  }

  /** After recovery has made the hot extents' bits durable: an empty durable record. */
  async reset(): Promise<void> {
    await this.writeRecord([]);
  }

  /** The volume grew: more extents (all cold). */
  grow(extentsTotal: number): void {
    this.options.extentsTotal = extentsTotal;
    this.hot.grow(extentsTotal);
    this.referenced.grow(extentsTotal);
  }

  get hotExtents(): number {
    return this.hotCount;
  }

  /** The fast path: true (and marks them recently used) when every extent is hot. */
  allHot(first: number, last: number): boolean {
    for (let e = first; e <= last; e++) if (!this.hot.test(e)) return false;
    for (let e = first; e <= last; e++) this.referenced.set(e);
    return true;
  }

  /**
   * The write path: extents [first, last] will be written. Returns null when all are hot
   * (the common case: no I/O, no allocation), else a promise resolved once a record
   * naming them all is durable (the caller checks again: anything may have moved since).
   */
  ensure(first: number, last: number): Promise<void> | null {
    let missing = false;
    for (let e = first; e <= last; e++) {
      if (this.hot.test(e)) this.referenced.set(e);
      else missing = true;
    }
    if (!missing) return null;
    assert(last - first + 1 <= this.hotMax, 'one request spans more extents than the log holds');
    return new Promise<void>((resolve, reject) => {
      this.waiters.push({ first, last, resolve, reject });
      // A microtask later, so every write of this event-loop turn joins one record.
      if (!this.committing && !this.scheduled) {
        this.scheduled = true;
        queueMicrotask(() => {
          this.scheduled = false;
          void this.commitLoop();
        });
      }
    });
  }

  /**
   * Rounds of records. Each round admits waiting writes in arrival order while the extents
   * they need fit the log together, makes all of those hot in one record (evicting only
   * extents none of them needs), and lets them pass before the next round may evict
   * anything. Writes that need more extents between them than the log holds therefore
   * take turns instead of evicting each other forever; the first waiting write always fits.
   */
  private async commitLoop(): Promise<void> {
    if (this.committing) return;
    this.committing = true;
    try {
      while (this.waiters.length > 0) {
        const need = new Set<number>();
        let admitted = 0;
        for (const w of this.waiters) {
          let extra = 0;
          for (let e = w.first; e <= w.last; e++) if (!need.has(e)) extra++;
          if (need.size + extra > this.hotMax) break;
          for (let e = w.first; e <= w.last; e++) need.add(e);
          admitted++;
        }
        const round = this.waiters.splice(0, admitted);
        try {
          await this.commitExtents(need);
        } catch (err) {
          for (const w of round) w.reject(err);
          continue;
        }
        for (const w of round) w.resolve();
        // Let the writes just released pass their check before the next record can evict
        // their extents again.
        await new Promise<void>((r) => setImmediate(r));
      }
    } finally {
      this.committing = false;
    }
  }

  private async commitExtents(need: Set<number>): Promise<void> {
    const joining = [...need].filter((e) => !this.hot.test(e));
    if (joining.length === 0) return; // an earlier round made them hot
    const overflow = this.hotCount + joining.length - this.hotMax;
    if (overflow > 0) await this.evict(overflow, Math.ceil(this.hotMax / activityEvictBatchDivisor), need);
    const extents: number[] = [];
    for (let i = 0; i < this.hotCount; i++) extents.push(this.hotList[i]!);
    for (const e of joining) extents.push(e);
    await this.writeRecord(extents);
    for (const e of joining) {
      this.hot.set(e);
      this.hotList[this.hotCount++] = e;
    }
  }

  /**
   * Evicts at least `needed` extents, and up to `batch` when that many are not in `keep`
   * (second-chance clock: recently referenced extents survive one sweep; `keep` ones are
   * not evicted), behind one checkpoint.
   */
  private async evict(needed: number, batch: number, keep: Set<number>): Promise<void> {
    let candidates = 0;
    for (let i = 0; i < this.hotCount; i++) if (!keep.has(this.hotList[i]!)) candidates++;
    assert(needed <= candidates, 'evict more than the extents no waiting write needs');
    const count = Math.min(candidates, Math.max(needed, batch));
    const leaving: number[] = [];
    while (leaving.length < count) {
      if (this.clockHand >= this.hotCount) this.clockHand = 0;
      const e = this.hotList[this.clockHand]!;
      if (keep.has(e) || this.referenced.clear(e)) {
        this.clockHand++;
        continue;
      }
      // Leaving: out of `hot` now, so writes to it wait for a later record.
      this.hot.clear(e);
      this.hotList[this.clockHand] = this.hotList[--this.hotCount]!;
      leaving.push(e);
    }
    // Bits of the leaving extents were set before this point; make them durable before a
    // record without those extents can be.
    try {
      await this.options.checkpoint();
    } catch (err) {
      // Their bits may not be durable: they stay hot (the durable record still names
      // them), or the next record, written with room to spare, would drop them unchecked.
      for (const e of leaving) {
        this.hot.set(e);
        this.hotList[this.hotCount++] = e;
      }
      throw err;
    }
  }

  private async writeRecord(extents: number[]): Promise<void> {
    assert(extents.length <= activityExtentsMax, 'record holds the hot set');
    const r = this.record;
    r.fill(0);
    r.writeUInt32LE(MAGIC, 0);
    r.writeUInt32LE(VERSION, 4);
    r.writeUInt32LE(this.seq % 2 ** 32, 8);
    r.writeUInt32LE(Math.floor(this.seq / 2 ** 32), 12);
    r.writeUInt32LE(extents.length, 16);
    r.writeUInt32LE(this.options.extentBytes, 20);
    for (let i = 0; i < extents.length; i++) r.writeUInt32LE(extents[i]!, 32 + 4 * i);
    r.writeUInt32LE(crc32c(r), 24);
    // The slot not holding the newest durable record: a torn write leaves that one standing.
    this.file.write(this.slot * activityRecordBytes, r, 0, activityRecordBytes);
    this.seq++;
    this.commits++;
    // Only once this record is durable may the other slot be overwritten; if the sync
    // fails, the next record goes into this slot again (see the header).
    await this.file.sync();
    this.slot = this.slot === 0 ? 1 : 0;
  }

  /** Clean shutdown: the caller has checkpointed every bitmap; nothing is hot any more. */
  async closeClean(): Promise<void> {
    // Writers held at the engine's gate may still have a record on its way: let it land.
    while (this.committing || this.waiters.length > 0) await new Promise<void>((r) => setImmediate(r));
    await this.writeRecord([]);
    this.hot.clearAll();
    this.referenced.clearAll();
    this.hotCount = 0;
    this.file.close();
  }

  invariants(): void {
    assert(this.hot.count() === this.hotCount, 'hot bitmap and list agree');
    for (let i = 0; i < this.hotCount; i++) assert(this.hot.test(this.hotList[i]!), 'listed extent is hot');
    assert(this.hotCount <= this.hotMax, 'hot within max');
  }
}
