// Why: a write to a cold activity extent (activity-log.ts) makes its whole extent hot:
// one 4 KiB record naming the hot set, and once the log is full an eviction, which must
// first make the bitmap pages of the leaving extents durable. Writes scattered over a
// large volume hit a cold extent almost every time, so each one paid for an extent record
// and, a little later, for two bitmap page records and their fsyncs: scattered writes on
// a 16 TiB volume cost twice the CPU they cost on 1 GiB (issue 12). This journal covers
// such a write instead by naming its blocks: a cold write appends (first, last) to the
// next record, one fsync per group of writes, and no extent becomes hot, nothing is
// evicted, no bitmap page is written until a whole region of the journal is full. After a
// crash, recovery marks exactly the blocks the journal names (changed and valid), like the
// activity log's extents but without rounding up to 4 MiB.
//
// File layout: two regions of journalRegionBytes, each a row of 512-byte slots (a sector:
// a slot is written whole or not at all; a batch of slots may tear between them). A slot:
//   crc32c u32 (of bytes 4..511), magic "DVJN" u32, epoch u32, coveredBelow u32,
//   count u16, zero u16, zero u32, then count × (first u32, last u32) block ranges.
// An all-zero or otherwise invalid slot is skipped.
//
// Epochs and regions. Each time a region becomes the one appended to, it gets the next
// epoch (epochs only grow, also across restarts: open() continues from the largest it
// finds). States of a region: free → active (appended to) → draining (full; the other
// region is active) → free once a checkpoint has made durable every bit its entries
// covered: one that took the bitmaps' dirty pages while no writer of the region was
// between "logged" and "bits set" (inFlight 0). coveredBelow, written in every slot, is
// the smallest epoch not known covered. Recovery finds the valid slot with the largest
// epoch and replays every valid slot whose epoch is at least that slot's coveredBelow:
// every entry a crash could leave uncovered, and at worst some already covered (an
// over-mark: those blocks are sent again, never lost).
//
// Rules the engine keeps (volume-engine.ts) and the crash tests check:
//   - a journaled write's data is issued only after its slot's fsync resolved;
//   - its bits are set before it calls done(), and a region is only freed by a checkpoint
//     that took the dirty pages after every done() of that region;
//   - after a failed write or fsync the journal takes no more entries (a later slot could
//     be durable behind a lost one); cold writes then use the activity log.

import { crc32c } from '@node-rs/crc32';
import { assert } from '../util/assert.js';
import { DeltavolError } from '../util/errors.js';
import type { DurableFile, DurableFs } from '../util/durable-fs.js';

const MAGIC = 0x4e4a5644; // "DVJN"
export const journalSlotBytes = 512;
const SLOT_HEADER_BYTES = 24;
const ENTRY_BYTES = 8;
/** Block ranges one slot holds. */
export const journalSlotEntriesMax = (journalSlotBytes - SLOT_HEADER_BYTES) / ENTRY_BYTES;
/**
 * Bytes of each of the two regions (4096 slots): at least 4096 journaled writes, and about
 * 125000 at 32 writes per fsync, between two checkpoints; recovery reads both (4 MiB).
 */
export const journalRegionBytesDefault = 2 * 1024 * 1024;
assert(Number.isInteger(journalSlotEntriesMax) && journalSlotEntriesMax >= 32, 'a slot holds a useful batch');

export interface WriteJournalOptions {
  /** Bytes per region (a multiple of the slot size; tests use tiny regions). */
  regionBytes?: number;
  /** Told when a region filled and the other took over: a checkpoint frees the full one. */
  wantCheckpoint?: () => void;
}

/**
 * A write covered by the journal: its data may be issued once `durable` resolves (shared by
 * every entry of one group commit). Give it back with done() once its bits are set.
 */
export interface JournalTicket {
  readonly durable: Promise<void>;
  readonly region: number;
  /** The journal's reset count when taken (a ticket from before a reset no longer counts). */
  readonly resets: number;
  /** done() was called. */
  returned: boolean;
}

/** Entries waiting for the next group commit, and the promise they share. */
interface Round {
  regions: number[];
  firsts: number[];
  lasts: number[];
  durable: Promise<void>;
  resolve: () => void;
  reject: (e: unknown) => void;
}

function newRound(): Round {
  let resolve!: () => void;
  let reject!: (e: unknown) => void;
  const durable = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  // A round that fails may have no one waiting any more (its writers gave up): not unhandled.
  durable.catch(() => undefined);
  return { regions: [], firsts: [], lasts: [], durable, resolve, reject };
}

type RegionState = 'free' | 'active' | 'draining' | 'covering';

interface Region {
  state: RegionState;
  epoch: number;
  /** Next slot to write. */
  slot: number;
  /** Slots taken by entries logged but not yet written (including a partly filled one). */
  reservedSlots: number;
  /** Entries in the last reserved slot (it takes more until full or written). */
  openSlotEntries: number;
  /** Writers logged here that have not called done(). */
  inFlight: number;
}

export class WriteJournal {
  private readonly regions: Region[];
  private readonly slotsPerRegion: number;
  private active: number;
  private epoch: number;
  private queue: Round | null = null;
  private scheduled = false;
  private committing = false;
  private failure: Error | null = null;
  private buf = Buffer.alloc(journalSlotBytes * 8);
  /** Counts resets: a ticket taken before the last one no longer counts as in flight. */
  private resets = 0;
  /** Slots written (each batch one write and one fsync): tests and benchmarks. */
  slotsWritten = 0;
  syncs = 0;
  /** Entries taken (writes covered by the journal). */
  entries = 0;

  private constructor(
    private readonly file: DurableFile,
    private readonly regionBytes: number,
    private readonly options: WriteJournalOptions,
    epoch: number,
  ) {
    assert(regionBytes >= 4 * journalSlotBytes && regionBytes % journalSlotBytes === 0, `journal region of ${regionBytes} bytes`);
    this.slotsPerRegion = regionBytes / journalSlotBytes;
    this.epoch = epoch;
    const region = (): Region => ({ state: 'free', epoch: 0, slot: 0, reservedSlots: 0, openSlotEntries: 0, inFlight: 0 });
    this.regions = [region(), region()];
    this.active = 0;
    this.activate(0);
  }

  /**
   * Opens the journal (made empty if absent) and returns the block ranges it may cover:
   * the caller marks them changed and valid, checkpoints, then calls reset().
   */
  static open(fsys: DurableFs, name: string, options: WriteJournalOptions = {}): { journal: WriteJournal; ranges: number[] } {
    const regionBytes = options.regionBytes ?? journalRegionBytesDefault;
    const file = fsys.open(name, true);
    const { ranges, epochMax } = WriteJournal.read(file, regionBytes);
    return { journal: new WriteJournal(file, regionBytes, options, epochMax), ranges };
  }

  /** The ranges a recovery must mark, as first0, last0, first1, last1, ... (also for tests reading a dead daemon's files). */
  static read(file: DurableFile, regionBytes: number): { ranges: number[]; epochMax: number } {
    // The whole file: slots name their epochs, so a file written with larger regions (an
    // older build, other options) is read whole as well.
    const end = Math.max(2 * regionBytes, file.sizeBytes());
    const chunk = Buffer.alloc(Math.min(regionBytes, 256 * 1024));
    const valid: { epoch: number; slot: Buffer }[] = [];
    let newest: { epoch: number; covered: number } | null = null;
    for (let pos = 0; pos < end; pos += chunk.length) {
      const n = file.read(pos, chunk, 0, chunk.length);
      for (let off = 0; off + journalSlotBytes <= n; off += journalSlotBytes) {
        const s = chunk.subarray(off, off + journalSlotBytes);
        if (s.readUInt32LE(4) !== MAGIC || s.readUInt32LE(0) !== crc32c(s.subarray(4))) continue;
        const count = s.readUInt16LE(16);
        if (count > journalSlotEntriesMax) continue;
        const epoch = s.readUInt32LE(8);
        const covered = s.readUInt32LE(12);
        valid.push({ epoch, slot: Buffer.from(s) });
        if (newest === null || epoch > newest.epoch) newest = { epoch, covered };
      }
      if (n < chunk.length) break;
    }
    const ranges: number[] = [];
    if (newest !== null) {
      for (const v of valid) {
        if (v.epoch < newest.covered) continue;
        const s = v.slot;
        const count = s.readUInt16LE(16);
        for (let i = 0; i < count; i++) {
          const first = s.readUInt32LE(SLOT_HEADER_BYTES + ENTRY_BYTES * i);
          const last = s.readUInt32LE(SLOT_HEADER_BYTES + ENTRY_BYTES * i + 4);
          if (last < first) throw new DeltavolError('METADATA_CORRUPT', `write journal ${file.name}: range ${first}-${last} backwards`);
          ranges.push(first, last);
        }
      }
    }
    return { ranges, epochMax: newest?.epoch ?? 0 };
  }

  /**
   * After recovery has made the returned ranges' bits durable: one slot that covers
   * everything before it (a later recovery replays nothing older). Durable on return.
   */
  async reset(): Promise<void> {
    await this.idle();
    this.checkFailed();
    for (const r of this.regions) assert(r.inFlight === 0 && r.reservedSlots === 0, 'reset with writers in flight');
    this.resetRegions();
    await this.writeResetSlot();
  }

  private async writeResetSlot(): Promise<void> {
    // coveredBelow = this epoch: nothing older is replayed.
    this.fillSlot(0, this.epoch, this.epoch, [], [], 0, 0);
    try {
      this.file.write(this.regionStart(this.active), this.buf, 0, journalSlotBytes);
      await this.file.sync();
    } catch (e) {
      throw this.fail(e);
    }
    this.slotsWritten++;
    this.syncs++;
    this.regions[this.active]!.slot = 1;
  }

  /**
   * The write of blocks [first, last] is covered once `durable` resolves; null when the
   * journal cannot take it now (both regions full, or failed): use the activity log.
   */
  log(first: number, last: number): JournalTicket | null {
    if (this.failure !== null) return null;
    assert(Number.isInteger(first) && Number.isInteger(last) && first >= 0 && last >= first && last < 2 ** 32, 'journal range');
    let r = this.regions[this.active]!;
    if (!this.hasRoom(r)) {
      const other = this.active === 0 ? 1 : 0;
      if (this.regions[other]!.state !== 'free') return null;
      r.state = 'draining';
      this.activate(other);
      r = this.regions[other]!;
      this.options.wantCheckpoint?.();
    }
    if (r.openSlotEntries === 0 || r.openSlotEntries === journalSlotEntriesMax) {
      r.reservedSlots++;
      r.openSlotEntries = 0;
    }
    r.openSlotEntries++;
    r.inFlight++;
    this.entries++;
    const region = this.active;
    const round = (this.queue ??= newRound());
    round.regions.push(region);
    round.firsts.push(first);
    round.lasts.push(last);
    if (!this.committing && !this.scheduled) {
      this.scheduled = true;
      // A microtask later, so every write of this event-loop turn shares one fsync.
      queueMicrotask(() => {
        this.scheduled = false;
        void this.commitLoop();
      });
    }
    return { durable: round.durable, region, resets: this.resets, returned: false };
  }

  /** The writer has set its bits (or gave up): a checkpoint from now on covers it. Idempotent. */
  done(t: JournalTicket): void {
    if (t.returned) return;
    t.returned = true;
    if (t.resets !== this.resets) return; // closed meanwhile: the writer fails
    const reg = this.regions[t.region]!;
    assert(reg.inFlight > 0, 'journal done() without a writer in flight');
    reg.inFlight--;
  }

  /**
   * A checkpoint is taking the bitmaps' dirty pages now: returns the regions it will cover
   * (draining, no writer in flight). Pass them to checkpointed() once it is durable.
   */
  checkpointStarting(): number[] {
    const covering: number[] = [];
    this.regions.forEach((r, i) => {
      if (r.state === 'draining' && r.inFlight === 0 && r.reservedSlots === 0) {
        r.state = 'covering';
        covering.push(i);
      }
    });
    return covering;
  }

  /** The checkpoint that started with checkpointStarting() ended: free those regions, or (failed) keep them. */
  checkpointed(covering: number[], ok: boolean): void {
    for (const i of covering) {
      const r = this.regions[i]!;
      assert(r.state === 'covering', 'only a covering region is freed');
      r.state = ok ? 'free' : 'draining';
    }
  }

  /**
   * Clean close: the caller has checkpointed every bitmap, and writers still holding a
   * ticket (waiting at the closed engine's gate) will fail without issuing their data, so
   * nothing needs replaying.
   */
  async closeClean(): Promise<void> {
    await this.idle();
    if (this.failure === null) {
      for (const r of this.regions) {
        assert(r.reservedSlots === 0, 'the journal is idle');
        r.inFlight = 0;
      }
      await this.reset();
    }
    this.file.close();
  }

  /** Every region free, then a fresh epoch in the active one. */
  private resetRegions(): void {
    this.resets++;
    for (const r of this.regions) r.state = 'free';
    this.activate(this.active);
  }

  get failed(): boolean {
    return this.failure !== null;
  }

  private hasRoom(r: Region): boolean {
    const openRoom = r.openSlotEntries > 0 && r.openSlotEntries < journalSlotEntriesMax;
    return openRoom || r.slot + r.reservedSlots < this.slotsPerRegion;
  }

  private activate(i: number): void {
    const r = this.regions[i]!;
    assert(r.state === 'free' && r.inFlight === 0 && r.reservedSlots === 0, 'only a free region becomes active');
    assert(this.epoch < 0xffffffff, 'journal epochs exhausted');
    this.epoch++;
    this.active = i;
    r.state = 'active';
    r.epoch = this.epoch;
    r.slot = 0;
    r.openSlotEntries = 0;
  }

  /** The smallest epoch whose entries may still be needed. */
  private coveredBelow(): number {
    let c = this.regions[this.active]!.epoch;
    for (const r of this.regions) if (r.state === 'draining' || r.state === 'covering') c = Math.min(c, r.epoch);
    return c;
  }

  private regionStart(i: number): number {
    return i * this.regionBytes;
  }

  private fillSlot(at: number, epoch: number, covered: number, firsts: number[], lasts: number[], from: number, to: number): void {
    const s = this.buf.subarray(at, at + journalSlotBytes);
    s.fill(0);
    s.writeUInt32LE(MAGIC, 4);
    s.writeUInt32LE(epoch, 8);
    s.writeUInt32LE(covered, 12);
    s.writeUInt16LE(to - from, 16);
    for (let i = from; i < to; i++) {
      const o = SLOT_HEADER_BYTES + ENTRY_BYTES * (i - from);
      s.writeUInt32LE(firsts[i]!, o);
      s.writeUInt32LE(lasts[i]!, o + 4);
    }
    s.writeUInt32LE(crc32c(s.subarray(4)), 0);
  }

  /** Rounds: every queued entry into slots of its region, one write per region, one fsync. */
  private async commitLoop(): Promise<void> {
    if (this.committing) return;
    this.committing = true;
    try {
      while (this.queue !== null) {
        const round = this.queue;
        this.queue = null;
        const covered = this.coveredBelow();
        const writes: { position: number; bytes: number }[] = [];
        let used = 0;
        const n = round.regions.length;
        for (let i = 0; i < 2; i++) {
          // This region's entries (all of them, in the usual round of one region).
          let firsts = round.firsts;
          let lasts = round.lasts;
          let count = 0;
          for (let k = 0; k < n; k++) if (round.regions[k] === i) count++;
          if (count === 0) continue;
          if (count < n) {
            firsts = [];
            lasts = [];
            for (let k = 0; k < n; k++) {
              if (round.regions[k] !== i) continue;
              firsts.push(round.firsts[k]!);
              lasts.push(round.lasts[k]!);
            }
          }
          const r = this.regions[i]!;
          const slots = Math.ceil(count / journalSlotEntriesMax);
          assert(slots <= r.reservedSlots, 'entries fit the slots reserved for them');
          const need = used + slots * journalSlotBytes;
          if (need > this.buf.length) {
            const grown = Buffer.alloc(Math.max(need, 2 * this.buf.length));
            this.buf.copy(grown, 0, 0, used);
            this.buf = grown;
          }
          for (let k = 0; k < slots; k++) {
            const from = k * journalSlotEntriesMax;
            this.fillSlot(used + k * journalSlotBytes, r.epoch, covered, firsts, lasts, from, Math.min(count, from + journalSlotEntriesMax));
          }
          writes.push({ position: this.regionStart(i) + r.slot * journalSlotBytes, bytes: slots * journalSlotBytes });
          r.slot += slots;
          r.reservedSlots = 0;
          r.openSlotEntries = 0;
          used += slots * journalSlotBytes;
          this.slotsWritten += slots;
        }
        try {
          this.checkFailed();
          let at = 0;
          for (const w of writes) {
            this.file.write(w.position, this.buf, at, w.bytes);
            at += w.bytes;
          }
          this.syncs++;
          await this.file.sync();
        } catch (e) {
          this.fail(e);
          round.reject(e);
          continue;
        }
        round.resolve();
      }
    } finally {
      this.committing = false;
    }
  }

  private async idle(): Promise<void> {
    while (this.committing || this.scheduled || this.queue !== null) await new Promise<void>((r) => setImmediate(r));
  }

  private checkFailed(): void {
    if (this.failure) throw new DeltavolError('IO', `write journal ${this.file.name}: failed earlier (${this.failure.message})`);
  }

  private fail(e: unknown): unknown {
    this.failure ??= e instanceof Error ? e : new Error(String(e));
    return e;
  }

  invariants(): void {
    let active = 0;
    for (const r of this.regions) {
      if (r.state === 'active') active++;
      assert(r.inFlight >= 0 && r.slot + r.reservedSlots <= this.slotsPerRegion, 'region within its slots');
      if (r.state === 'free') assert(r.inFlight === 0 && r.reservedSlots === 0, 'a free region has no writer');
    }
    assert(active === 1, 'exactly one active region');
  }
}
