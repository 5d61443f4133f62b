// Why: every write to a volume must pass, in this order, through the snapshot copy-on-
// write, the delta-set priority copy and the change log before its data may reach disk
// (DESIGN.md "Data path"). This is that write path, plus the cold operations that need
// a consistent point (cuts, snapshots, restore) and crash recovery. It knows nothing of
// NBD: callers speak offsets and buffers; the volume's data, the metadata file system
// and the delta-set destination are passed in, so a seeded simulation can crash them.
//
// Bitmaps this engine owns (see change-log.ts and snapshot-queue.ts for the others):
//   validity[b]  - b may hold data. Set before a write's data is issued; cleared only
//                  after a zeroing completed. Over-marking is always safe (a needless
//                  copy of zeroes), under-marking is not (a snapshot would lose data).
//   unsynced[b]  - b's before-image is in the tail's save area but not yet durable: no
//                  write to b may be issued until a sync covers it.
//   clearedUnflushed[b] - validity[b] was cleared after the last data flush began; the
//                  persisted validity keeps b set until a flush covers its zeroing.
// Durability rules (checked by the crash tests):
//   - a before-image is durable before the overwrite is issued (unsynced, group commit);
//   - a changed block is covered by the activity log, the write journal (a cold write
//     scattered far from recent ones: write-journal.ts) or a completed checkpoint before
//     its data is issued, so recovery finds it changed and valid;
//   - a cut or snapshot happens with no write between "marked" and "data written".

import { setImmediate as yieldToLoop } from 'node:timers/promises';
import { assert } from '../util/assert.js';
import { forEachBlockSlice } from '../util/block-slices.js';
import { DeltavolError, isDeltavolError } from '../util/errors.js';
import type { DurableFs } from '../util/durable-fs.js';
import { GroupCommit } from '../util/group-commit.js';
import { PagedBitmap, type ReadonlyBitmap } from '../bitmap/paged-bitmap.js';
import { BitmapFile } from '../bitmap/bitmap-file.js';
import { ActivityLog } from '../bitmap/activity-log.js';
import { isPiped, payloadChunks, payloadLength, type PipedBytes, type WritePayload } from '../util/piped-bytes.js';
import { WriteJournal, type JournalTicket } from '../bitmap/write-journal.js';
import { ChangeLog, type CutOptions } from '../changelog/change-log.js';
import { SnapshotQueue, type SnapshotInfo } from '../snapshot/snapshot-queue.js';
import { activityExtentBytes, trackingBlockBytesMax, trackingBlockBytesMin } from './engine-limits.js';
import { bothDone, type WriteMirror } from './write-mirror.js';

/**
 * The byte range [offset, offset+length) as runs of blocks whose bit is set or clear in
 * `bits` (blocks of blockBytes), at most extentsMax runs (BLOCK_STATUS replies).
 */
function byteExtents(bits: PagedBitmap, blockBytes: number, offset: number, length: number, extentsMax: number): { lengthBytes: number; set: boolean }[] {
  const end = offset + length;
  const out: { lengthBytes: number; set: boolean }[] = [];
  let pos = offset;
  while (pos < end && out.length < extentsMax) {
    const b = Math.floor(pos / blockBytes);
    const set = bits.test(b);
    const nextB = set ? bits.nextClear(b) : bits.nextSet(b);
    const stop = nextB < 0 ? end : Math.min(end, nextB * blockBytes);
    out.push({ lengthBytes: stop - pos, set });
    pos = stop;
  }
  return out;
}

const VALIDITY_FILE = 'validity.bm';
const PENDING_FILE = 'pending.bm';
const ACTIVITY_FILE = 'activity.log';
const JOURNAL_FILE = 'writes.journal';
/**
 * A cold write whose extent was journaled among the last this many journaled writes makes
 * its extent hot instead: writes with locality (a sequential stream) pay one activity
 * record per 4 MiB extent, scattered ones a journal entry each.
 */
const RECENT_JOURNALED_EXTENTS = 64;
/**
 * Larger writes go to the activity log: a stream of them (mkfs, a copy) would otherwise pay a
 * journal fsync and then an activity record for every extent, where the log pays one.
 */
const JOURNAL_WRITE_BYTES_MAX = 64 * 1024;
/** Background copy-out yields to the event loop after this many blocks (default). */
const COPY_BLOCKS_PER_TURN = 256;
/**
 * A checkpoint stages this many dirty bitmap pages per event-loop turn (default): a journal
 * region's checkpoint on a large volume stages ~100k pages, ~0.7 µs each, which in one go
 * stalled every connection for ~120 ms.
 */
const CHECKPOINT_PAGES_PER_TURN = 4096;
/** Background copy-out reads runs of adjacent blocks up to this many bytes at once. */
const COPY_RUN_BYTES_MAX = 1024 * 1024;

/** The volume's data, as the engine needs it. */
export interface VolumeData {
  readonly sizeBytes: number;
  /** Synchronous positional read (whole tracking blocks for copies; page cache hot). */
  readSync(offset: number, target: Buffer, targetOffset: number, length: number): void;
  /**
   * Optional: reads `count` ranges (ranges[2i] = offset, ranges[2i+1] = length) one after
   * the other into target from targetOffset in one call, past the end as zeroes (set
   * building reads thousands of scattered blocks; one call each costs more than the reads).
   */
  readRangesSync?(ranges: Float64Array, count: number, target: Buffer, targetOffset: number): void;
  write(offset: number, chunks: Buffer[]): void | Promise<void>;
  /** Optional: writes bytes waiting in a pipe (util/piped-bytes.ts) without taking them into memory. */
  writePiped?(offset: number, bytes: PipedBytes): void | Promise<void>;
  /**
   * Optional: writes `count` ranges (as readRangesSync's) whose bytes lie one after the other
   * in source from sourceOffset, synchronously, in one call (a replica plays thousands of
   * scattered blocks; one call each costs more than the writes).
   */
  writeRangesSync?(ranges: Float64Array, count: number, source: Buffer, sourceOffset: number): void;
  /**
   * The range reads as zeroes afterwards: a hole where the file system allows, or, with
   * keepAllocated (NBD_CMD_FLAG_NO_HOLE), zeroes that stay provisioned.
   */
  zero(offset: number, length: number, keepAllocated?: boolean): void | Promise<void>;
  flush(): Promise<void>;
}

/** One item of a differential stream: blocks to write (data) or to zero (data null). */
export interface DifferentialRun {
  block: number;
  count: number;
  offsetBytes: number;
  lengthBytes: number;
  data: Buffer | null;
}

/** Where a delta set's blocks go (the replicator's outbound save area). */
export interface DeltaSink {
  /** Content of `block` as of the cut (blockBytes; copy it: the buffer is reused). */
  put(block: number, data: Buffer): void;
  /**
   * Optional, with `filled`: room for up to `blocks` consecutive blocks in the sink's own
   * buffer (at least one), so the engine reads them there instead of copying each one.
   */
  room?(blocks: number): { buffer: Buffer; offset: number; blocks: number };
  /** The first `count` blocks of the last room() now hold blocks block..block+count-1. */
  filled?(block: number, count: number): void;
  /** Every block put so far is durable. */
  commit(): Promise<void>;
}

export interface BuildOptions extends CutOptions {
  /**
   * A set without data: its blocks reached every consumer by the mirror (a sync stream),
   * so nothing is copied; `keep` is given the set's blocks and must make them durable
   * elsewhere (where a replica that misses the stream will find them) before the change
   * log forgets them. The sink still commits (an empty set).
   */
  dataless?: { keep(members: ReadonlyBitmap): Promise<void> | void };
  /**
   * Also take this snapshot at the cut, stamped with the set number: it equals a replica
   * that has played this set (a restart point, or the base of an initial copy).
   */
  snapshotName?: string;
}

export interface EngineOptions {
  blockBytes: number;
  /** Most bytes one snapshot's save area may use; past it the snapshot becomes invalid. */
  saveAreaBytesMax: number;
  /** Hot activity extents (tests use few to force evictions). */
  activityHotMax?: number;
  /** Activity extent size (bytes); tests use tiny extents to force evictions. */
  activityExtentBytes?: number;
  /** Write journal region size (bytes); tests use tiny regions to force region switches. */
  journalRegionBytes?: number;
  /** Recent journaled writes whose extents go to the activity log next (default 64; tests: 0, every cold write is journaled). */
  journalRecentExtents?: number;
  /** Background copy-out yields to the event loop after this many blocks. */
  copyBlocksPerTurn?: number;
  /** A checkpoint yields to the event loop after staging this many bitmap pages (default 4096). */
  checkpointPagesPerTurn?: number;
  /** Told about events an operator must see (a snapshot invalidated). */
  warn?: (message: string, fields: Record<string, unknown>) => void;
}

export interface EngineStats {
  /** Writes, trims and zeroings asked of the engine (any source: clients, playback, restore). */
  writes: number;
  checkpoints: number;
  beforeImagesSaved: number;
  priorityCopies: number;
}

export class VolumeEngine {
  private blocks: number;
  /** The size the bitmaps cover (the data may already be larger until grow() runs). */
  private size: number;
  private readonly extentBlocks: number;
  private readonly buf: Buffer;
  private readonly unsynced: PagedBitmap;
  private clearedUnflushed: PagedBitmap;
  private readonly checkpointer: GroupCommit;
  private gate: Promise<void> | null = null;
  private inflight = 0;
  private drained: (() => void) | null = null;
  private sink: DeltaSink | null = null;
  private journal: WriteJournal | null = null;
  /** Extents of the last RECENT_JOURNALED_EXTENTS journaled writes (a ring; -1 empty; scanned, 64 doubles cost less than a Map's upkeep). */
  private readonly recentExtents: Float64Array;
  private recentAt = 0;
  private mirror: WriteMirror | null = null;
  private closed = false;
  /** Set inside close()'s consistent point: writers released by its gate must fail. */
  private closing = false;
  readonly stats: EngineStats = { writes: 0, checkpoints: 0, beforeImagesSaved: 0, priorityCopies: 0 };

  /** Counts writes: a zeroing that raced with a write keeps its blocks valid (safe side). */
  private writeSeq = 0;
  /** Counts every change (writes, zeroes, consistent points): cached answers expire with it. */
  private version = 0;
  private changedCache: { name: string; version: number; blocks: PagedBitmap } | null = null;

  private constructor(
    private readonly data: VolumeData,
    readonly options: EngineOptions,
    private readonly validity: PagedBitmap,
    private readonly validityFile: BitmapFile,
    private readonly pendingFile: BitmapFile,
    readonly changeLog: ChangeLog,
    private al: ActivityLog | null,
    readonly snapshots: SnapshotQueue,
  ) {
    this.blocks = validity.bitsTotal;
    this.size = data.sizeBytes;
    this.extentBlocks = VolumeEngine.extentBlocksOf(options);
    this.buf = Buffer.alloc(options.blockBytes);
    this.unsynced = new PagedBitmap(this.blocksTotal);
    this.clearedUnflushed = new PagedBitmap(this.blocksTotal);
    this.checkpointer = new GroupCommit(() => this.checkpointOnce());
    this.recentExtents = new Float64Array(options.journalRecentExtents ?? RECENT_JOURNALED_EXTENTS).fill(-1);
  }

  private static check(data: VolumeData, options: EngineOptions): number {
    const bs = options.blockBytes;
    assert(bs >= trackingBlockBytesMin && bs <= trackingBlockBytesMax && (bs & (bs - 1)) === 0, `tracking block ${bs}`);
    return Math.ceil(data.sizeBytes / bs);
  }

  private static extentBlocksOf(options: EngineOptions): number {
    const bytes = options.activityExtentBytes ?? activityExtentBytes;
    assert(bytes >= options.blockBytes && bytes % options.blockBytes === 0, 'an activity extent is whole tracking blocks');
    return bytes / options.blockBytes;
  }

  private static alOptions(blocks: number, options: EngineOptions, checkpoint: () => Promise<void>) {
    const extentBlocks = VolumeEngine.extentBlocksOf(options);
    return {
      extentsTotal: Math.ceil(blocks / extentBlocks),
      extentBytes: extentBlocks * options.blockBytes,
      ...(options.activityHotMax !== undefined ? { hotMax: options.activityHotMax } : {}),
      checkpoint,
    };
  }

  /** A new volume's engine files (nothing written yet: every bitmap empty). */
  static async create(fsys: DurableFs, data: VolumeData, options: EngineOptions): Promise<VolumeEngine> {
    const blocks = VolumeEngine.check(data, options);
    const vf = await BitmapFile.create(fsys, VALIDITY_FILE, blocks);
    const pf = await BitmapFile.create(fsys, PENDING_FILE, blocks);
    const snaps = await SnapshotQueue.open(fsys, blocks, options.blockBytes, options.saveAreaBytesMax);
    const engine = new VolumeEngine(data, options, new PagedBitmap(blocks, { trackDirty: true }), vf, pf, new ChangeLog(blocks), null, snaps);
    engine.al = await ActivityLog.create(fsys, ACTIVITY_FILE, VolumeEngine.alOptions(blocks, options, () => engine.checkpoint()));
    engine.journal = WriteJournal.open(fsys, JOURNAL_FILE, VolumeEngine.journalOptions(options, () => engine.journalWantsCheckpoint())).journal;
    await engine.journal.reset();
    return engine;
  }

  /**
   * Opens after a clean close or a crash. Every block of an extent the activity log
   * names becomes changed and valid (the bounded over-marking), then that is checkpointed
   * and the log starts empty. A delta set being built at the crash is forgotten: its
   * blocks are in the pending bitmap, so the next set carries them.
   */
  static async open(fsys: DurableFs, data: VolumeData, options: EngineOptions): Promise<VolumeEngine> {
    const blocks = VolumeEngine.check(data, options);
    const v = BitmapFile.open(fsys, VALIDITY_FILE);
    const p = BitmapFile.open(fsys, PENDING_FILE);
    await v.file.repair();
    await p.file.repair();
    if (v.bitmap.bitsTotal > blocks || p.bitmap.bitsTotal > blocks) throw new DeltavolError('METADATA_CORRUPT', 'bitmap files are larger than the volume');
    // A crash between growing the data and growing the bitmaps: finish the growth.
    if (v.bitmap.bitsTotal < blocks) {
      v.bitmap.grow(blocks);
      await v.file.grow(blocks);
    }
    if (p.bitmap.bitsTotal < blocks) {
      p.bitmap.grow(blocks);
      await p.file.grow(blocks);
    }
    const snaps = await SnapshotQueue.open(fsys, blocks, options.blockBytes, options.saveAreaBytesMax);
    let engine: VolumeEngine | null = null;
    const alOpts = VolumeEngine.alOptions(blocks, options, () => engine!.checkpoint());
    const { log, hotAtOpen } = ActivityLog.open(fsys, ACTIVITY_FILE, alOpts);
    // What the activity log or the journal names may have changed: changed and valid.
    const recovered = (first: number, count: number) => {
      v.bitmap.setRange(first, count);
      p.bitmap.setRange(first, count);
    };
    const extentBlocks = VolumeEngine.extentBlocksOf(options);
    for (const e of hotAtOpen) {
      const first = e * extentBlocks;
      recovered(first, Math.min(extentBlocks, blocks - first));
    }
    // A volume made before the journal existed has none: open() makes an empty one.
    const { journal, ranges } = WriteJournal.open(fsys, JOURNAL_FILE, VolumeEngine.journalOptions(options, () => engine?.journalWantsCheckpoint()));
    for (let i = 0; i < ranges.length; i += 2) {
      const first = ranges[i]!;
      const last = ranges[i + 1]!;
      if (last >= blocks) throw new DeltavolError('METADATA_CORRUPT', `write journal names block ${last} past the volume's ${blocks}`);
      recovered(first, last - first + 1);
    }
    engine = new VolumeEngine(data, options, v.bitmap, v.file, p.file, new ChangeLog(blocks, p.bitmap), log, snaps);
    engine.journal = journal;
    await engine.checkpoint();
    await log.reset();
    await journal.reset();
    return engine;
  }

  get blocksTotal(): number {
    return this.blocks;
  }

  private static journalOptions(options: EngineOptions, wantCheckpoint: () => void) {
    return { ...(options.journalRegionBytes !== undefined ? { regionBytes: options.journalRegionBytes } : {}), wantCheckpoint };
  }

  /** A journal region filled: a checkpoint frees it (in the background; a failure shows at the next one). */
  private journalWantsCheckpoint(): void {
    this.checkpoint().catch((e: unknown) => this.options.warn?.('checkpoint for the write journal failed', { error: String(e) }));
  }

  /**
   * Whether a cold write of blocks [first, last] (extents [fe, le]) goes to the journal: not
   * when it is large, nor when one of its extents was journaled recently (then the extent is
   * worth making hot). Records the choice.
   */
  private journalWanted(first: number, last: number, fe: number, le: number): boolean {
    if (this.journal === null || this.journal.failed || (last - first + 1) * this.options.blockBytes > JOURNAL_WRITE_BYTES_MAX) return false;
    const recent = this.recentExtents;
    const ring = recent.length;
    for (let i = 0; i < ring; i++) {
      const x = recent[i]!;
      if (x >= fe && x <= le) return false;
    }
    for (let e = fe; e <= le && ring > 0; e++) {
      recent[this.recentAt] = e;
      this.recentAt = (this.recentAt + 1) % ring;
    }
    return true;
  }

  get blockBytes(): number {
    return this.options.blockBytes;
  }

  // ================= the write path =================

  /**
   * Writes the payload at offset. Returns a promise only when it must wait (or the data write
   * is async). Bytes waiting in a pipe go to the data straight from it when the write takes
   * the fast path and no mirror needs them; otherwise they are taken into memory first.
   */
  write(offset: number, payload: WritePayload): void | Promise<void> {
    const length = payloadLength(payload);
    this.checkRange(offset, length);
    if (length === 0) return;
    const bs = this.options.blockBytes;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    this.mirror?.admit();
    this.writeSeq++;
    this.version++;
    this.stats.writes++;
    const fast = this.fastPathOpen(first, last);
    if (fast && this.movesPiped(payload)) {
      this.changeLog.markChanged(first, last);
      this.markValid(first, last);
      return this.issue(this.data.writePiped!(offset, payload));
    }
    if (fast) {
      const chunks = payloadChunks(payload);
      this.changeLog.markChanged(first, last);
      this.markValid(first, last);
      const local = this.issue(this.data.write(offset, chunks));
      return this.mirror === null ? local : bothDone(local, this.mirror.write(offset, chunks));
    }
    // The mirror hears of the write when its data is issued (after any wait), in issue order.
    // Bytes in a pipe stay there through the wait (copies first, a cut's gate) and go to the
    // data from it unless a mirror has come meanwhile.
    let remote: Promise<void> | undefined;
    return this.slowPath(
      first,
      last,
      false,
      () => {
        if (this.movesPiped(payload)) return this.data.writePiped!(offset, payload);
        const chunks = payloadChunks(payload);
        remote = this.mirror?.write(offset, chunks);
        return this.data.write(offset, chunks);
      },
      () => remote,
    );
  }

  /** Bytes in a pipe go to the data from it: nothing else (a mirror) needs them in memory. */
  private movesPiped(payload: WritePayload): payload is PipedBytes {
    return isPiped(payload) && this.mirror === null && this.data.writePiped !== undefined;
  }

  /**
   * Writes `count` runs (ranges[2i] = offset, ranges[2i+1] = length) whose bytes lie one
   * after the other in source from sourceOffset: a replica plays a chunk of scattered blocks
   * (4 KiB random writes: 256 runs per 1 MiB chunk, and one write() each cost its daemon more
   * than the pwrites did). Each run is a write as write() makes it. When every run may take
   * the fast path and the data writes ranges at once, all go in one synchronous call;
   * otherwise one write() per run.
   */
  writeRuns(ranges: Float64Array, count: number, source: Buffer, sourceOffset: number): void | Promise<void> {
    assert(Number.isSafeInteger(count) && count >= 0 && ranges.length >= 2 * count, 'writeRuns: count ranges');
    const bs = this.options.blockBytes;
    let total = 0;
    let batch = this.data.writeRangesSync !== undefined && this.mirror === null;
    for (let i = 0; i < count; i++) {
      const offset = ranges[2 * i]!;
      const length = ranges[2 * i + 1]!;
      this.checkRange(offset, length);
      total += length;
      if (batch && length > 0 && !this.fastPathOpen(Math.floor(offset / bs), Math.floor((offset + length - 1) / bs))) batch = false;
    }
    assert(sourceOffset >= 0 && sourceOffset + total <= source.length, 'writeRuns: the runs\' bytes are in source');
    if (!batch) {
      const waits: Promise<void>[] = [];
      let at = sourceOffset;
      for (let i = 0; i < count; i++) {
        const length = ranges[2 * i + 1]!;
        const r = this.write(ranges[2 * i]!, [source.subarray(at, at + length)]);
        at += length;
        if (r) waits.push(r);
      }
      return waits.length === 0 ? undefined : Promise.all(waits).then(() => undefined);
    }
    for (let i = 0; i < count; i++) {
      const offset = ranges[2 * i]!;
      const length = ranges[2 * i + 1]!;
      if (length === 0) continue;
      const first = Math.floor(offset / bs);
      const last = Math.floor((offset + length - 1) / bs);
      this.writeSeq++;
      this.version++;
      this.stats.writes++;
      this.changeLog.markChanged(first, last);
      this.markValid(first, last);
    }
    this.data.writeRangesSync!(ranges, count, source, sourceOffset);
  }

  /** Throws (EIO) when the mirror refuses writes now (a sync pair's fence); write() checks it too. */
  admitWrite(): void {
    this.mirror?.admit();
  }

  /**
   * The mirror of a synchronous replica (null: none). Writes issued from now on are
   * mirrored; the ones already issued are not.
   */
  setMirror(m: WriteMirror | null): void {
    this.mirror = m;
  }

  /** TRIM and WRITE_ZEROES: the range reads as zeroes; wholly covered blocks become invalid. */
  zero(offset: number, length: number, keepAllocated = false): void | Promise<void> {
    this.checkRange(offset, length);
    if (length === 0) return;
    const bs = this.options.blockBytes;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    const end = offset + length;
    // Blocks wholly covered (the volume's partial last block counts as whole at its end).
    const wholeFirst = Math.ceil(offset / bs);
    const wholeLast = end >= this.size ? last : Math.floor(end / bs) - 1;
    this.mirror?.admit();
    this.version++;
    this.stats.writes++;
    let remote: Promise<void> | undefined;
    return this.slowPath(first, last, true, () => {
      remote = this.mirror?.zero(offset, length, keepAllocated);
      const seq = this.writeSeq;
      const r = this.data.zero(offset, length, keepAllocated);
      const invalidate = () => {
        if (wholeLast < wholeFirst || seq !== this.writeSeq) return;
        this.validity.clearRange(wholeFirst, wholeLast - wholeFirst + 1);
        this.clearedUnflushed.setRange(wholeFirst, wholeLast - wholeFirst + 1);
      };
      if (r instanceof Promise) return r.then(invalidate);
      invalidate();
    }, () => remote);
  }

  /** Every completed write durable (on the mirror too, when there is one). */
  flush(): Promise<void> {
    const remote = this.mirror?.flush();
    return bothDone(this.data.flush(), remote) as Promise<void>;
  }

  /** Plain volume read (the data path reads the file directly; this is for tests and tools). */
  read(offset: number, length: number, target: Buffer): void {
    this.checkRange(offset, length);
    this.data.readSync(offset, target, 0, length);
  }

  private checkRange(offset: number, length: number): void {
    assert(!this.closed, 'engine closed');
    if (!(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0 && offset + length <= this.size)) {
      throw new DeltavolError('EINVAL_ARGUMENT', `range ${offset}+${length} outside the volume of ${this.size} bytes`);
    }
  }

  /** The common case: nothing to copy, nothing to wait for. No allocation, no I/O. */
  private fastPathOpen(first: number, last: number): boolean {
    if (this.gate !== null) return false;
    const eb = this.extentBlocks;
    if (!this.al!.allHot(Math.floor(first / eb), Math.floor(last / eb))) return false;
    const copying = this.changeLog.copying;
    const tail = this.snapshots.tail !== null;
    const unsynced = this.unsynced.count() > 0;
    if (!copying && !tail && !unsynced) return true;
    for (let b = first; b <= last; b++) {
      if (copying && this.changeLog.needsCopy(b)) return false;
      if (tail && this.snapshots.needsSave(b)) return false;
      if (unsynced && this.unsynced.test(b)) return false;
    }
    return true;
  }

  /** Blocks [first, last] hold written data (one bit: the cheaper single-bit set). */
  private markValid(first: number, last: number): void {
    if (first === last) this.validity.set(first);
    else this.validity.setRange(first, last - first + 1);
  }

  /** Counts an issued data operation until it completes (cuts and snapshots wait for it). */
  private issue(r: void | Promise<void>): void | Promise<void> {
    if (!(r instanceof Promise)) return;
    this.inflight++;
    return r.finally(() => this.settle());
  }

  private settle(): void {
    this.inflight--;
    if (this.inflight === 0 && this.drained) {
      const d = this.drained;
      this.drained = null;
      d();
    }
  }

  /**
   * A write that must wait (journal, activity log, copy or save first). doData issues the
   * data operation (and the mirror's, which remoteOf then returns): the result settles once
   * both have, with the first failure, and the local data alone counts as in flight.
   */
  private async slowPath(first: number, last: number, isZero: boolean, doData: () => void | Promise<void>, remoteOf: () => Promise<void> | undefined): Promise<void> {
    const eb = this.extentBlocks;
    const firstExtent = Math.floor(first / eb);
    const lastExtent = Math.floor(last / eb);
    const huge = lastExtent - firstExtent + 1 > this.al!.hotMax / 2;
    /** Set once a durable journal entry covers this write (it stays covered until done()). */
    let ticket: JournalTicket | null = null;
    let failure: { error: unknown } | null = null;
    try {
      for (;;) {
        while (this.gate !== null) await this.gate;
        // Closed while it waited (the close wrote clean logs): its data must not be issued.
        if (this.closing) throw new DeltavolError('SHUTTING_DOWN', 'the volume was closed while the write waited');
        // The activity log or the journal must name every block touched (huge trims
        // checkpoint instead).
        if (!huge && ticket === null && !this.al!.allHot(firstExtent, lastExtent)) {
          const t = this.journalWanted(first, last, firstExtent, lastExtent) ? this.journal!.log(first, last) : null;
          if (t !== null) {
            ticket = t;
            await t.durable;
            continue; // re-check the gate: anything may have moved meanwhile
          }
          const w = this.al!.ensure(firstExtent, lastExtent);
          if (w !== null) {
            await w;
            continue; // re-check the gate and the log: anything may have moved meanwhile
          }
        }
        // From here to the issue of the data operation (or the first await) nothing else runs.
        let mustSync = false;
        try {
          if (this.changeLog.copying) this.priorityCopy(first, last);
          for (let b = first; b <= last; b++) {
            if (this.snapshots.needsSave(b)) {
              this.readBlock(b, this.buf);
              this.snapshots.save(b, this.buf, 0);
              this.stats.beforeImagesSaved++;
              this.unsynced.set(b);
              mustSync = true;
            } else if (this.unsynced.test(b)) {
              mustSync = true;
            }
          }
        } catch (e) {
          if (!isDeltavolError(e, 'SAVE_AREA_FULL')) throw e;
          await this.tailFull();
          continue;
        }
        this.changeLog.markChanged(first, last);
        if (!isZero) this.markValid(first, last);
        // Its bits are set: a checkpoint that takes the dirty pages from now on covers them.
        if (ticket !== null) this.journal!.done(ticket);
        this.inflight++;
        try {
          if (huge) await this.checkpoint();
          if (mustSync) {
            await this.snapshots.syncTail();
            for (let b = first; b <= last; b++) this.unsynced.clear(b);
          }
          const r = doData();
          if (r !== undefined) await r; // a synchronous write costs no extra turn
        } finally {
          this.settle();
        }
        break;
      }
    } catch (e) {
      failure = { error: e };
    } finally {
      if (ticket !== null) this.journal!.done(ticket); // a write that failed before setting its bits leaves the journal's region freeable
    }
    // The mirror's operation (issued with the data, if it was) settles before the answer.
    const remote = remoteOf();
    if (failure !== null) {
      if (remote !== undefined) await bothDone(Promise.reject(failure.error), remote);
      throw failure.error;
    }
    if (remote !== undefined) await remote;
  }

  /**
   * Blocks of [first, last] the set being built has not copied yet go to its sink now, as
   * of the cut, before a write changes them: a run at a time (a 1 MiB write over 256
   * uncopied 4 KiB blocks is one read into the sink's buffer, not 256 reads and puts).
   */
  private priorityCopy(first: number, last: number): void {
    const sink = this.sink!;
    for (let b = this.changeLog.nextUncopied(first); b >= 0 && b <= last; ) {
      const end = Math.min(this.changeLog.nextCopiedOrEnd(b), last + 1);
      this.copyRun(sink, b, end);
      this.stats.priorityCopies += end - b;
      b = end > last ? -1 : this.changeLog.nextUncopied(end);
    }
  }

  /**
   * Copies blocks [b, end), each one still to copy, into the sink as they are now, and
   * marks them copied: straight into the sink's buffer when it offers room, else one block
   * at a time through put. Past the end of the volume reads as zeroes.
   */
  private copyRun(sink: DeltaSink, b: number, end: number): void {
    const bs = this.options.blockBytes;
    if (!sink.room || !sink.filled) {
      for (let at = b; at < end; at++) {
        this.readBlock(at, this.buf);
        sink.put(at, this.buf);
        this.changeLog.markCopied(at);
      }
      return;
    }
    for (let at = b; at < end; ) {
      const r = sink.room(end - at);
      assert(r.blocks >= 1 && r.blocks <= end - at, 'sink room');
      const bytes = Math.max(0, Math.min(r.blocks * bs, this.data.sizeBytes - at * bs));
      if (bytes > 0) this.data.readSync(at * bs, r.buffer, r.offset, bytes);
      if (bytes < r.blocks * bs) r.buffer.fill(0, r.offset + bytes, r.offset + r.blocks * bs);
      sink.filled(at, r.blocks);
      this.changeLog.markCopiedRange(at, r.blocks);
      at += r.blocks;
    }
  }

  /** Reads tracking block b whole; past the end of the volume reads as zeroes. */
  private readBlock(b: number, target: Buffer): void {
    const bs = this.options.blockBytes;
    const at = b * bs;
    const n = Math.min(bs, this.data.sizeBytes - at);
    this.data.readSync(at, target, 0, n);
    if (n < bs) target.fill(0, n, bs);
  }

  private async tailFull(): Promise<void> {
    await this.quiesce(async () => {
      const tail = this.snapshots.tail;
      if (tail === null || !tail.area!.full) return; // another writer handled it
      const names = await this.snapshots.invalidateTail();
      this.options.warn?.('snapshot save area full: snapshot invalidated, other snapshots unaffected', { snapshots: names, saveAreaBytesMax: this.options.saveAreaBytesMax });
    });
  }

  // ================= consistent points =================

  /** A consistent point is being taken (new writes wait at the gate). */
  get quiescing(): boolean {
    return this.gate !== null;
  }

  /** Runs fn with no write between "marked" and "data done", new writes held at the gate. */
  private async quiesce<T>(fn: () => Promise<T> | T): Promise<T> {
    while (this.gate !== null) await this.gate;
    let open!: () => void;
    this.gate = new Promise<void>((r) => (open = r));
    this.version++;
    try {
      while (this.inflight > 0) await new Promise<void>((r) => (this.drained = r));
      return await fn();
    } finally {
      this.gate = null;
      open();
    }
  }

  // ================= delta sets =================

  /**
   * Cuts delta set `setNumber` at a consistent point and copies its blocks, as of the cut,
   * into `sink` in block order (writes racing with the copy send theirs first: priority
   * copy). Resolves when the set is committed; on failure its blocks return to the active
   * bitmap and the error is rethrown.
   */
  async buildDeltaSet(setNumber: number, sink: DeltaSink, options: BuildOptions = {}): Promise<{ blocks: number }> {
    const frozen = await this.quiesce(async () => {
      if (options.dataless) {
        // Nothing is read: the blocks are already where they go. Only the cut point counts.
        const f = this.changeLog.cut(setNumber, options);
        this.mirror?.cut(setNumber);
        this.changeLog.markAllCopied();
        return f;
      }
      // Ship only durable data: a write lost in a crash must not be on the replica only.
      await this.data.flush();
      // The snapshot first: if it is refused (a name in use), nothing was cut.
      if (options.snapshotName !== undefined) await this.snapshots.create(options.snapshotName, this.validity, this.size, setNumber);
      const f = this.changeLog.cut(setNumber, options);
      this.mirror?.cut(setNumber);
      this.sink = sink;
      return f;
    });
    const blocks = frozen.count();
    try {
      if (options.dataless) await options.dataless.keep(frozen);
      // Runs of uncopied blocks are read with one call each (up to a turn's worth); a
      // turn runs without awaiting, so no write can slip between a read and its put.
      const perTurn = this.options.copyBlocksPerTurn ?? COPY_BLOCKS_PER_TURN;
      const bs = this.options.blockBytes;
      const runMax = Math.min(perTurn, Math.max(1, Math.floor(COPY_RUN_BYTES_MAX / bs)));
      // Only a sink without room() needs a buffer of its own (allocated once per set, at need).
      let runBuf: Buffer | null = null;
      let rangeBuf: Float64Array | null = null;
      const runStart: number[] = [];
      const runCount: number[] = [];
      let n = 0;
      for (let b = this.changeLog.nextUncopied(0); b >= 0; ) {
        const end = Math.min(this.changeLog.nextCopiedOrEnd(b), b + runMax);
        const count = end - b;
        if (sink.room && sink.filled && this.data.readRangesSync) {
          // Straight into the sink's buffer, and many runs per call: gather the runs that
          // fill the room (up to a turn's worth), read them all at once, then record them.
          const r = sink.room(perTurn - n);
          const ranges = (rangeBuf ??= new Float64Array(2 * runMax));
          let runs = 0;
          let placed = 0;
          let at = b;
          for (;;) {
            const runEnd = Math.min(this.changeLog.nextCopiedOrEnd(at), at + (r.blocks - placed));
            runStart[runs] = at;
            runCount[runs] = runEnd - at;
            ranges[2 * runs] = at * bs;
            ranges[2 * runs + 1] = (runEnd - at) * bs;
            runs++;
            placed += runEnd - at;
            at = runEnd;
            if (placed === r.blocks || runs === runMax) break;
            at = this.changeLog.nextUncopied(at);
            if (at < 0) break;
          }
          this.data.readRangesSync(ranges, runs, r.buffer, r.offset);
          for (let i = 0; i < runs; i++) {
            sink.filled(runStart[i]!, runCount[i]!);
            this.changeLog.markCopiedRange(runStart[i]!, runCount[i]!);
          }
          n += placed;
          if (n >= perTurn) {
            n = 0;
            await yieldToLoop();
          }
          b = at < 0 ? -1 : this.changeLog.nextUncopied(at);
          continue;
        }
        if (sink.room && sink.filled) {
          // Straight into the sink's buffer (its chunk record): no copy per block.
          this.copyRun(sink, b, end);
        } else {
          const bytes = Math.min(count * bs, this.data.sizeBytes - b * bs);
          runBuf ??= Buffer.allocUnsafe(runMax * bs);
          this.data.readSync(b * bs, runBuf, 0, bytes);
          if (bytes < count * bs) runBuf.fill(0, bytes, count * bs);
          for (let i = 0; i < count; i++) {
            sink.put(b + i, runBuf.subarray(i * bs, (i + 1) * bs));
            this.changeLog.markCopied(b + i);
          }
        }
        n += count;
        if (n >= perTurn) {
          n = 0;
          await yieldToLoop();
        }
        b = this.changeLog.nextUncopied(end);
      }
      await sink.commit();
      this.changeLog.complete();
      this.mirror?.committed(setNumber);
    } catch (e) {
      this.changeLog.abort();
      this.mirror?.aborted(setNumber);
      throw e;
    } finally {
      this.sink = null;
    }
    // Persist the forgetting too, so a crash later does not resend this set's blocks
    // beyond the activity log's bound.
    await this.checkpoint();
    return { blocks };
  }

  /**
   * A snapshot stamped `setNumber` that holds every change so far, and an empty change
   * log: the base of a first replica (nobody needs those changes as a delta set).
   */
  async snapshotAndForget(name: string, setNumber: number): Promise<void> {
    await this.quiesce(async () => {
      if (this.changeLog.buildingSet !== 0) throw new DeltavolError('DELTA_SET_BUSY', 'a delta set is being built');
      await this.data.flush();
      await this.snapshots.create(name, this.validity, this.size, setNumber);
      this.changeLog.discardAll();
    });
    await this.checkpoint();
  }

  /** Blocks changed since the last cut (the high-water mark of a replication pair). */
  changedBlockCount(): number {
    return this.changeLog.active.count();
  }

  /** Blocks not yet safely in a delta set: changed since the cut, or in the set being built. */
  unshippedBlockCount(): number {
    return this.changeLog.active.count() + (this.changeLog.frozen?.count() ?? 0);
  }

  /**
   * Forgets every recorded change (a replica starting a split: from here on its change
   * log holds only its own writes). Durable when it resolves.
   */
  async discardChanges(): Promise<void> {
    await this.quiesce(async () => {
      if (this.changeLog.buildingSet !== 0) throw new DeltavolError('DELTA_SET_BUSY', 'cannot discard changes while a delta set is being built');
      this.changeLog.discardAll();
    });
    await this.checkpoint();
  }

  /**
   * The volume's data grew (VolumeData.sizeBytes is already the new size): every bitmap
   * grows with it. Refused while a delta set is being built.
   */
  async grow(): Promise<void> {
    await this.quiesce(async () => {
      if (this.changeLog.buildingSet !== 0) throw new DeltavolError('DELTA_SET_BUSY', 'cannot grow while a delta set is being built');
      const blocks = Math.ceil(this.data.sizeBytes / this.options.blockBytes);
      assert(blocks >= this.blocks && this.data.sizeBytes >= this.size, 'volumes only grow');
      this.size = this.data.sizeBytes;
      if (blocks === this.blocks) return;
      this.validity.grow(blocks);
      this.changeLog.grow(blocks);
      this.unsynced.grow(blocks);
      this.clearedUnflushed.grow(blocks);
      this.snapshots.grow(blocks);
      this.al!.grow(Math.ceil(blocks / this.extentBlocks));
      this.blocks = blocks;
      await this.validityFile.grow(blocks);
      await this.pendingFile.grow(blocks);
    });
  }

  // ================= snapshots =================

  async createSnapshot(name: string, deltaSetNumber = 0, now?: Date): Promise<SnapshotInfo> {
    return this.quiesce(async () => {
      await this.data.flush(); // the snapshot holds every write acknowledged before it
      return this.snapshots.create(name, this.validity, this.size, deltaSetNumber, now);
    });
  }

  /** Stamps a snapshot with the delta set it corresponds to (the replicator's restart point). */
  stampSnapshot(name: string, deltaSetNumber: number): void {
    this.snapshots.setDeltaSetNumber(name, deltaSetNumber);
  }

  deleteSnapshot(name: string): Promise<void> {
    return this.quiesce(() => this.snapshots.delete(name));
  }

  listSnapshots(): SnapshotInfo[] {
    return this.snapshots.list();
  }

  /** Deleted snapshots kept because older ones read through them, and their save-area bytes. */
  deletedSnapshotsKept(): { count: number; saveAreaBytes: number } {
    return this.snapshots.hiddenUsage();
  }

  /** Reads [offset, offset+length) of a snapshot into target. */
  readSnapshot(name: string, offset: number, length: number, target: Buffer): void {
    this.checkRange(offset, length);
    const index = this.snapshots.indexOf(name);
    const bs = this.options.blockBytes;
    const reader = (b: number, t: Buffer, o: number) => this.readBlock(b, t.subarray(o, o + bs));
    forEachBlockSlice(offset, length, bs, (b, inBlock, done, n) => {
      if (inBlock === 0 && n === bs) {
        if (!this.snapshots.readBlock(index, b, target, done, reader)) target.fill(0, done, done + n);
      } else if (this.snapshots.readBlock(index, b, this.buf, 0, reader)) {
        this.buf.copy(target, done, inBlock, inBlock + n);
      } else {
        target.fill(0, done, done + n);
      }
    });
  }

  /** The blocks that held data when the snapshot was taken (a copy). */
  snapshotValidBlocks(name: string): PagedBitmap {
    return this.snapshots.get(this.snapshots.indexOf(name)).meta.clone();
  }

  /** Whether tracking block b held data when the snapshot was taken (BLOCK_STATUS holes). */
  snapshotBlockValid(name: string, b: number): boolean {
    return this.snapshots.blockValid(this.snapshots.indexOf(name), b);
  }

  /**
   * Snapshot differential L→M (M null: the volume now): blocks to read from M and blocks
   * to zero, each in block order, that turn a copy of L into M.
   */
  differential(from: string, to: string | null): { data: PagedBitmap; zero: PagedBitmap } {
    const l = this.snapshots.indexOf(from);
    const m = to === null ? null : this.snapshots.indexOf(to);
    if (m !== null && m <= l) throw new DeltavolError('EINVAL_ARGUMENT', `snapshot "${to}" is not newer than "${from}"`);
    return this.snapshots.differential(l, m, this.validity);
  }

  /**
   * The differential L→M as a stream in block order: runs of blocks to write (with their
   * content read from M, at most `runBlocksMax` per item) and runs to zero. Applied in
   * order to a volume equal to L, it yields M. Reads happen as the stream is consumed.
   */
  *differentialStream(from: string, to: string | null, runBlocksMax = 256): Generator<DifferentialRun> {
    const { data, zero } = this.differential(from, to);
    const bs = this.options.blockBytes;
    const size = this.size;
    let at = 0;
    for (;;) {
      const d = data.nextSet(at);
      const z = zero.nextSet(at);
      if (d < 0 && z < 0) return;
      if (z >= 0 && (d < 0 || z < d)) {
        const end = zero.nextClear(z);
        yield { block: z, count: end - z, offsetBytes: z * bs, lengthBytes: Math.min(end * bs, size) - z * bs, data: null };
        at = end;
        continue;
      }
      const end = Math.min(data.nextClear(d), d + runBlocksMax);
      const offsetBytes = d * bs;
      const lengthBytes = Math.min(end * bs, size) - offsetBytes;
      const buf = Buffer.alloc(lengthBytes);
      if (to === null) this.read(offsetBytes, lengthBytes, buf);
      else this.readSnapshot(to, offsetBytes, lengthBytes, buf);
      yield { block: d, count: end - d, offsetBytes, lengthBytes, data: buf };
      at = end;
    }
  }

  /**
   * Data and hole extents of a snapshot over [offset, offset+length), at most extentsMax
   * (BLOCK_STATUS base:allocation on a snapshot export): a hole is a run of blocks that
   * held no data when the snapshot was taken.
   */
  snapshotExtents(name: string, offset: number, length: number, extentsMax: number): { lengthBytes: number; hole: boolean }[] {
    this.checkRange(offset, length);
    const meta = this.snapshots.get(this.snapshots.indexOf(name)).meta;
    return byteExtents(meta, this.options.blockBytes, offset, length, extentsMax).map((e) => ({ lengthBytes: e.lengthBytes, hole: !e.set }));
  }

  /**
   * Extents of [offset, offset+length) changed since snapshot `name` (dirty) or not, at
   * most extentsMax: the NBD meta context qemu:dirty-bitmap:NAME, so backup tools read only
   * what changed. Dirty means "may differ": a block rewritten with the same bytes is dirty.
   */
  dirtyExtents(name: string, offset: number, length: number, extentsMax: number): { lengthBytes: number; dirty: boolean }[] {
    this.checkRange(offset, length);
    let cache = this.changedCache;
    if (cache === null || cache.name !== name || cache.version !== this.version) {
      const { data, zero } = this.differential(name, null);
      data.union(zero);
      cache = this.changedCache = { name, version: this.version, blocks: data };
    }
    return byteExtents(cache.blocks, this.options.blockBytes, offset, length, extentsMax).map((e) => ({ lengthBytes: e.lengthBytes, dirty: e.set }));
  }

  /**
   * Rolls the volume back to a snapshot in place, writing only blocks that may differ,
   * through the normal write path (newer snapshots and the change log see it as writes).
   * The caller keeps other writers away; a crash midway is repaired by running it again.
   * The queue may change between blocks (a delete drops hidden snapshots from its front, a
   * full save area invalidates one), so the snapshot's index is looked up again before
   * every read; if it was deleted (SNAPSHOT_NOT_FOUND) or invalidated (SNAPSHOT_INVALID)
   * meanwhile, the restore stops there, the volume holding part of it.
   */
  async restoreSnapshot(name: string): Promise<{ blocksWritten: number; blocksZeroed: number }> {
    const snap = this.snapshots.handle(name);
    const index = () => this.snapshots.indexOfSnapshot(snap, 'restored (the volume now holds part of it)');
    const plan = this.snapshots.restorePlan(index(), this.validity);
    const bs = this.options.blockBytes;
    const reader = (b: number, t: Buffer, o: number) => this.readBlock(b, t.subarray(o, o + bs));
    let blocksWritten = 0;
    const writes: [number, number][] = plan.write.runs();
    for (const [start, count] of writes) {
      for (let b = start; b < start + count; b++) {
        const block = Buffer.alloc(bs);
        const has = this.snapshots.readBlock(index(), b, block, 0, reader);
        assert(has, 'restore writes only blocks the snapshot holds');
        const at = b * bs;
        await this.write(at, [block.subarray(0, Math.min(bs, this.size - at))]);
        blocksWritten++;
      }
    }
    let blocksZeroed = 0;
    for (const [start, count] of plan.zero.runs()) {
      index(); // deleted meanwhile: stop here too, as a user who deleted it expects
      const at = start * bs;
      await this.zero(at, Math.min(count * bs, this.size - at));
      blocksZeroed += count;
    }
    return { blocksWritten, blocksZeroed };
  }

  // ================= persistence =================

  /** Makes every bit set so far durable in the bitmap files (group-committed). */
  checkpoint(): Promise<void> {
    return this.checkpointer.sync();
  }

  private async checkpointOnce(): Promise<void> {
    // Validity clears may be persisted only once their zeroing is durable.
    const covered = this.clearedUnflushed;
    this.clearedUnflushed = new PagedBitmap(this.blocksTotal);
    // Only clears wait for the data file's flush: set bits may be durable before their data
    // (a block marked changed and valid whose write a crash lost is re-sent as it is on disk).
    // Unconditional, this flushed the data file at every activity-log eviction: a disk
    // flush per ~125 scattered writes.
    if (covered.count() > 0) await this.data.flush();
    covered.clearAll();
    // Every bit a journal region covers was set before this point (its writers all called
    // done()), so it is in a page staged below (pages are staged as they are then, or later).
    const journalCovering = this.journal?.checkpointStarting() ?? [];
    try {
      await this.stagePages();
      await Promise.all([this.validityFile.sync(), this.pendingFile.sync()]);
    } catch (e) {
      this.journal?.checkpointed(journalCovering, false);
      throw e;
    }
    this.journal?.checkpointed(journalCovering, true);
    this.stats.checkpoints++;
  }

  /**
   * Stages every dirty page of the validity and pending bitmaps in their files, yielding
   * between batches of pages. A page staged after a yield holds its bits as they are then:
   * every bit set before the checkpoint began, unless cleared meanwhile by what may clear it
   * at any time (a set shipped, changes discarded); a validity clear made meanwhile is in
   * clearedUnflushed, so it is kept set on disk like the others.
   */
  private async stagePages(): Promise<void> {
    const perTurn = this.options.checkpointPagesPerTurn ?? CHECKPOINT_PAGES_PER_TURN;
    let staged = 0;
    const scratch = this.validityFile.scratch();
    for (const p of this.validity.takeDirtyPages()) {
      if (++staged % perTurn === 0) await yieldToLoop();
      if (this.clearedUnflushed.pageBitCount(p) === 0) {
        this.validityFile.writePageOf(this.validity, p); // no clear of this page waits for a flush
        continue;
      }
      const page = this.validity.page(p);
      const late = this.clearedUnflushed.page(p);
      scratch.fill(0);
      if (page) scratch.set(page);
      if (late) for (let w = 0; w < scratch.length; w++) scratch[w]! |= late[w]!;
      this.validityFile.writeScratch(p);
      if (late) this.validity.markDirty(p); // write it again once its clears are flushed
    }
    const ps = this.pendingFile.scratch();
    for (const p of this.changeLog.takeDirtyPages()) {
      if (++staged % perTurn === 0) await yieldToLoop();
      const offsets = this.changeLog.pendingOffsets(p);
      if (offsets !== null) this.pendingFile.writeOffsets(p, offsets);
      else if (this.changeLog.pendingPage(p, ps)) this.pendingFile.writeScratch(p);
      else this.pendingFile.writePage(p, null);
    }
  }

  /** Clean close: checkpoint, then an empty activity log (recovery will mark nothing extra). */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.quiesce(async () => {
      // Writers waiting at this gate resume before close() returns: they must find this.
      this.closing = true;
      await this.checkpoint();
      await this.al!.closeClean();
      await this.journal!.closeClean();
    });
    this.closed = true;
    this.validityFile.close();
    this.pendingFile.close();
    this.snapshots.close();
  }

  get activityCommits(): number {
    return this.al!.commits;
  }

  /** Writes the journal covered, and its fsyncs (tests, benchmarks). */
  get journalStats(): { entries: number; syncs: number } {
    return { entries: this.journal?.entries ?? 0, syncs: this.journal?.syncs ?? 0 };
  }

  /** Memory held by this engine's bitmaps (bytes). */
  bitmapBytes(): number {
    return this.validity.bytesUsed() + this.changeLog.pending().bytesUsed();
  }

  /** Blocks that may hold data (0: nothing was ever written, or all of it was zeroed). */
  validBlockCount(): number {
    return this.validity.count();
  }

  /** Every tracking block that [offset, offset+length) touches holds written data (validity may over-mark, never under-mark). */
  allValid(offset: number, length: number): boolean {
    this.checkRange(offset, length);
    if (length === 0) return true;
    const bs = this.options.blockBytes;
    const first = Math.floor(offset / bs);
    const count = Math.floor((offset + length - 1) / bs) - first + 1;
    return this.validity.countRange(first, count) === count;
  }

  /** The validity bitmap (tests, status). */
  validBlocks(): PagedBitmap {
    return this.validity.clone();
  }

  invariants(): void {
    this.validity.invariants();
    this.changeLog.invariants();
    this.snapshots.invariants();
    this.al!.invariants();
    this.journal?.invariants();
    assert(this.inflight >= 0, 'inflight ≥ 0');
    if (this.gate === null && this.inflight === 0) assert(this.unsynced.count() === 0, 'every before-image synced once writes drain');
  }
}
