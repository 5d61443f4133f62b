// Why: delta sets must survive a restart of either daemon and a link that is down for
// hours, so nothing to be sent is held only in memory (seed 001's save volume and
// mailbox). This is the primary's outbound save area: a durable wrap-around log of chunk
// records (each one a ready-to-send wire frame, so sending is a read and a socket write)
// plus an index of the complete sets it holds. It knows nothing of pairs or sockets: the
// replicator decides what to release and when.
//
// Files (in the volume's replication directory):
//   outbound.log   capacityBytes; record r of a set lives at physical offset pos % capacity.
//                  A record never wraps: if it does not fit before the end, it starts at 0.
//   outbound.json  the index, replaced atomically: sets (chunk positions, counts, data
//                  checksum), the logical write position and the released position.
// Positions are logical (increasing while sets are kept; an empty log starts over at 0);
// used space = writePos - releasedPos.
// A set is in the index only once its records are durable (commit): a crash while it is
// built leaves records past writePos, which the next set overwrites.

import { crc32c } from '@node-rs/crc32';
import { assert } from '../util/assert.js';
import { DeltavolError } from '../util/errors.js';
import type { DurableFile, DurableFs } from '../util/durable-fs.js';
import { PagedBitmap } from '../bitmap/paged-bitmap.js';
import type { DeltaSink } from '../volume/volume-engine.js';
import { encodeFrame, chunkChecksum, framePrefixBytes, FrameDecoder, type Runs, type ReplMessage } from './wire.js';
import { outboundCacheBytesMax } from './limits.js';
import type { FileRange } from '../util/file-range.js';

export const OUTBOUND_LOG_FILE = 'outbound.log';
export const OUTBOUND_INDEX_FILE = 'outbound.json';
/** Block data per chunk record. */
export const chunkDataBytesMax = 1024 * 1024;
/**
 * The pool's floor: chunk buffers (each chunkDataBytesMax) kept for reuse even when the
 * volume is quiet, since fresh 1 MiB buffers cost page faults and major GCs. While sets are
 * built the pool also keeps what the memory cache frees, up to the cache's budget (trimPool
 * drops back to the floor): a set acknowledged from the cache freed 64 buffers at once and
 * the next set allocated 56 of them again (1M writes with a replica: ~10 major collections
 * a second, perf and --trace-gc 2026-12-06).
 */
const chunkBufferPoolMax = 8;
/** A chunk's frame prefix and message (generous: runs are ~10 bytes each in msgpack). */
const chunkOverheadBytes = (blocksPerChunk: number) => framePrefixBytes + 128 + 12 * blocksPerChunk;

export interface ChunkPos {
  /** Logical position of the record. */
  pos: number;
  bytes: number;
  /** The chunk's data checksum (from its header). */
  crc: number;
}

export interface OutboundSet {
  set: number;
  generation: number;
  createdAtMs: number;
  /** When the first change this set carries was made (its writes are at risk since then). */
  firstChangeAtMs: number;
  blocks: number;
  dataBytes: number;
  /** crc32c over the big-endian u32 chunk checksums in chunk order (covers every byte). */
  dataCrc: number;
  /** Only some of the changed blocks (the rest follow in later sets): not a point in time. */
  partial: boolean;
  chunks: ChunkPos[];
  startPos: number;
  endPos: number;
}

interface IndexFile {
  version: 1;
  capacityBytes: number;
  writePos: number;
  releasedPos: number;
  /** Highest set number ever committed (sets are numbered without gaps). */
  lastSet: number;
  /**
   * When the change log was last known to hold nothing uncut (the cut of the last whole
   * set, or a cut that made no set): every change not yet in a set came after it, so a
   * restart dates their risk from here.
   */
  lastCutAtMs?: number;
  sets: OutboundSet[];
}

/** The data checksum of a set from its chunk checksums (sender and receiver agree on it). */
export function setDataChecksum(chunkCrcs: number[]): number {
  const b = Buffer.allocUnsafe(4 * chunkCrcs.length);
  chunkCrcs.forEach((c, i) => b.writeUInt32BE(c >>> 0, 4 * i));
  return crc32c(b);
}

/**
 * A cached chunk record. Its data part is a view of `owned` (a pooled chunk buffer) when
 * the log may reuse that buffer: only once it left the cache and no socket holds it
 * (`lent` counts frames queued on connections and not yet written).
 */
interface CachedChunk {
  parts: Buffer[];
  bytes: number;
  owned: Buffer | null;
  lent: number;
  cached: boolean;
}

/** A chunk's frame lent to a sender: call `done` once the connection no longer holds it. */
export interface LentChunk {
  parts: Buffer[];
  done: () => void;
}

const noop = (): void => undefined;

export class OutboundLog {
  /** Recent chunk frames by position (what senders read next, without a file read). */
  private readonly cache = new Map<number, CachedChunk>();
  private cacheBytes = 0;
  /** Chunk buffers free for reuse (SetWriter takes them; see CachedChunk). */
  private readonly pool: Buffer[] = [];
  /** Chunk buffers taken from the pool rather than allocated (status, tests). */
  chunkBuffersReused = 0;
  /** Chunk buffers allocated because the pool had none (status, tests): churn shows here. */
  chunkBuffersAllocated = 0;
  /** Chunk records read back from the file (not in the memory cache any more): status, tests. */
  chunkFileReads = 0;
  /** Chunk records a sender sent from the file (sendfile: not cached, not read into memory; status, tests). */
  chunkFileSends = 0;

  private constructor(
    private readonly fsys: DurableFs,
    private readonly file: DurableFile,
    private index: IndexFile,
  ) {}

  /** Opens (or creates) the log. A capacity change applies once the log is empty. */
  static open(fsys: DurableFs, capacityBytes: number): OutboundLog {
    assert(Number.isSafeInteger(capacityBytes) && capacityBytes >= 4 * chunkDataBytesMax, `outbound capacity ${capacityBytes} below 4 MiB`);
    const raw = fsys.readAll(OUTBOUND_INDEX_FILE);
    let index: IndexFile;
    if (raw === null) {
      index = { version: 1, capacityBytes, writePos: 0, releasedPos: 0, lastSet: 0, sets: [] };
    } else {
      try {
        index = JSON.parse(raw.toString('utf8')) as IndexFile;
      } catch (e) {
        throw new DeltavolError('METADATA_CORRUPT', `${OUTBOUND_INDEX_FILE}: ${(e as Error).message}`);
      }
      if (index.version !== 1 || !Array.isArray(index.sets)) throw new DeltavolError('METADATA_CORRUPT', `${OUTBOUND_INDEX_FILE}: unknown format`);
      if (index.sets.length === 0 && index.capacityBytes !== capacityBytes) {
        index = { ...index, capacityBytes, writePos: 0, releasedPos: 0 };
      }
    }
    const log = new OutboundLog(fsys, fsys.open(OUTBOUND_LOG_FILE, true), index);
    if (raw === null) log.saveIndex();
    log.invariants();
    return log;
  }

  /** The last set number recorded in a log's index, without opening the log (0: none). */
  static lastSetIn(fsys: DurableFs): number {
    const raw = fsys.readAll(OUTBOUND_INDEX_FILE);
    if (raw === null) return 0;
    try {
      return (JSON.parse(raw.toString('utf8')) as IndexFile).lastSet;
    } catch (e) {
      throw new DeltavolError('METADATA_CORRUPT', `${OUTBOUND_INDEX_FILE}: ${(e as Error).message}`);
    }
  }

  get capacityBytes(): number {
    return this.index.capacityBytes;
  }
  get usedBytes(): number {
    return this.index.writePos - this.index.releasedPos;
  }
  get freeBytes(): number {
    return this.capacityBytes - this.usedBytes;
  }
  get sets(): readonly OutboundSet[] {
    return this.index.sets;
  }
  /** Highest set number committed so far (0: none yet). */
  get lastSet(): number {
    return this.index.lastSet;
  }
  /** When the last set was cut (null: never, or a log of version 0.1). */
  get lastCutAtMs(): number | null {
    return this.index.lastCutAtMs ?? null;
  }

  get(set: number): OutboundSet | undefined {
    const first = this.index.sets[0];
    if (!first) return undefined;
    const s = this.index.sets[set - first.set];
    return s && s.set === set ? s : undefined;
  }

  /** Bytes a set of `blocks` blocks may take, wrap gap included (reserve this before a cut). */
  static bytesFor(blocks: number, blockBytes: number): number {
    const perChunk = Math.max(1, Math.floor(chunkDataBytesMax / blockBytes));
    const chunks = Math.ceil(blocks / perChunk);
    const recordMax = perChunk * blockBytes + chunkOverheadBytes(perChunk);
    return blocks * blockBytes + chunks * chunkOverheadBytes(perChunk) + recordMax;
  }

  /** Most blocks one set may hold with the space free now (0: none). */
  blocksThatFit(blockBytes: number): number {
    const perChunk = Math.max(1, Math.floor(chunkDataBytesMax / blockBytes));
    const recordMax = perChunk * blockBytes + chunkOverheadBytes(perChunk);
    const room = this.freeBytes - recordMax;
    if (room <= 0) return 0;
    const perBlock = blockBytes + chunkOverheadBytes(perChunk) / perChunk;
    return Math.max(0, Math.floor(room / perBlock) - 1);
  }

  /**
   * A sink for set lastSet+1 (give it to VolumeEngine.buildDeltaSet), cut at `createdAtMs`,
   * carrying changes made since `firstChangeAtMs`.
   */
  beginSet(set: number, generation: number, blockBytes: number, blocksTotal: number, partial: boolean, createdAtMs: number, firstChangeAtMs: number): SetWriter {
    assert(set === this.index.lastSet + 1, `set ${set} after ${this.index.lastSet}`);
    if (this.index.sets.length === 0 && this.index.writePos !== 0) {
      // Empty: the set starts over at the file's beginning (positions are the log's own,
      // nothing outside it keeps one). A log that its replicas keep up with then writes the
      // same pages again and again: its file holds about one set, not its whole capacity
      // (tmpfs memory, page cache), and on these VMs a page written for the first time costs
      // several times a warm one (the first 1 GiB lap took 15% of a replicating primary's
      // CPU). Not done while sets are kept: a jump would leave the tail of the file unusable
      // until they are released, a smaller area for an outage that follows.
      assert(this.index.releasedPos === this.index.writePos, 'an empty log holds nothing');
      this.index.writePos = 0;
      this.index.releasedPos = 0;
    }
    return new SetWriter(this, set, generation, blockBytes, new PagedBitmap(blocksTotal), partial, this.index.writePos, createdAtMs, firstChangeAtMs);
  }

  /** A buffer for a chunk's data (from the pool when one of this size is free). */
  chunkBuffer(bytes: number): Buffer {
    for (let i = this.pool.length - 1; i >= 0; i--) {
      if (this.pool[i]!.length === bytes) {
        this.chunkBuffersReused++;
        return this.pool.splice(i, 1)[0]!;
      }
    }
    this.chunkBuffersAllocated++;
    return Buffer.allocUnsafe(bytes);
  }

  private recycle(e: CachedChunk): void {
    if (e.owned === null || e.cached || e.lent > 0) return;
    const b = e.owned;
    e.owned = null;
    if (this.pool.length < chunkBufferPoolMax || this.cacheBytes + (this.pool.length + 1) * b.length <= outboundCacheBytesMax) this.pool.push(b);
  }

  /** The volume is quiet: the pool keeps only its floor (the rest goes to the collector). */
  trimPool(): void {
    if (this.pool.length > chunkBufferPoolMax) this.pool.length = chunkBufferPoolMax;
  }

  /** Chunk buffers in the pool (tests). */
  get pooledBuffers(): number {
    return this.pool.length;
  }

  /**
   * Writes one record at logical position ≥ pos; returns where it went. `owned`: the
   * pooled buffer the record's data is a view of (the log reuses it when it is done).
   */
  writeRecord(pos: number, parts: Buffer[], owned: Buffer | null = null): { pos: number; end: number } {
    let bytes = 0;
    for (const p of parts) bytes += p.length;
    const cap = this.capacityBytes;
    assert(bytes <= cap, 'record larger than the log');
    if ((pos % cap) + bytes > cap) pos += cap - (pos % cap); // wrap: records never straddle the end
    if (pos + bytes - this.index.releasedPos > cap) {
      throw new DeltavolError('SAVE_AREA_FULL', `outbound save area full (${cap} bytes)`);
    }
    let at = pos % cap;
    if (this.file.writev) this.file.writev(at, parts); // one system call per record
    else {
      for (const p of parts) {
        this.file.write(at, p, 0, p.length);
        at += p.length;
      }
    }
    this.remember(pos, parts, bytes, owned);
    return { pos, end: pos + bytes };
  }

  /** The set is durable: it enters the index. */
  async commitSet(s: OutboundSet): Promise<void> {
    await this.file.sync();
    assert(s.set === this.index.lastSet + 1, 'sets commit in order');
    this.index.sets.push(s);
    this.index.lastSet = s.set;
    if (!s.partial) this.index.lastCutAtMs = s.createdAtMs; // a partial set leaves older changes behind
    this.index.writePos = s.endPos;
    this.saveIndex();
  }

  /** A cut that made no set (a first replica's base): its time is kept like a set's. */
  noteCut(atMs: number): void {
    this.index.lastCutAtMs = atMs;
    this.saveIndex();
  }

  /** Frees every set (the volume no longer ships: it became a replica). Numbering goes on. */
  releaseAll(): void {
    this.release(this.index.lastSet);
  }

  /** Frees every set ≤ upTo (no pair needs them any more). */
  release(upTo: number): void {
    let n = 0;
    while (n < this.index.sets.length && this.index.sets[n]!.set <= upTo) n++;
    if (n === 0) return;
    for (const s of this.index.sets.slice(0, n)) for (const c of s.chunks) this.forgetCached(c.pos);
    this.index.sets.splice(0, n);
    this.index.releasedPos = this.index.sets[0]?.startPos ?? this.index.writePos;
    this.saveIndex();
  }

  /**
   * The stored frame of a chunk (prefix and message, then data), ready to send. Recent
   * chunks come from memory (a copy of what is on disk), older ones from the file.
   */
  readChunk(c: ChunkPos): Buffer[] {
    const cached = this.cache.get(c.pos);
    if (cached) return cached.parts;
    this.chunkFileReads++;
    const b = Buffer.allocUnsafe(c.bytes);
    const n = this.file.read(c.pos % this.capacityBytes, b, 0, c.bytes);
    if (n !== c.bytes) throw new DeltavolError('IO', `outbound log: short read at ${c.pos}`);
    return [b];
  }

  /**
   * Where a chunk record that is no longer in the memory cache lies in the log's file, for a
   * sender that sends from the file (sendfile) instead of reading it into memory first; null
   * when it is cached (send that) or the file has no descriptor (the simulator's). Its bytes
   * stay until its set is released, which waits for every pair's acknowledgement, which
   * comes only after the replica received the whole set.
   */
  chunkFile(c: ChunkPos): FileRange | null {
    if (this.cache.has(c.pos) || this.file.fd === undefined) return null;
    const file = this.file;
    const at = c.pos % this.capacityBytes;
    return {
      fd: file.fd!,
      offset: at,
      length: c.bytes,
      read: (from, n) => {
        const b = Buffer.allocUnsafe(n);
        if (file.read(at + from, b, 0, n) !== n) throw new DeltavolError('IO', `outbound log: short read at ${c.pos + from}`);
        return b;
      },
    };
  }

  /**
   * readChunk for a socket: the parts stay valid until `done` is called (a cached chunk's
   * buffer is not reused before), so the frame can be queued without a copy.
   */
  lendChunk(c: ChunkPos): LentChunk {
    const e = this.cache.get(c.pos);
    if (!e) return { parts: this.readChunk(c), done: noop };
    e.lent++;
    let returned = false;
    return {
      parts: e.parts,
      done: () => {
        if (returned) return;
        returned = true;
        e.lent--;
        this.recycle(e);
      },
    };
  }

  /** Keeps a just-written record in memory for the senders (bounded, oldest out first). */
  private remember(pos: number, parts: Buffer[], bytes: number, owned: Buffer | null): void {
    this.forgetCached(pos); // a record rewritten after a set that was never committed
    this.cache.set(pos, { parts, bytes, owned, lent: 0, cached: true });
    this.cacheBytes += bytes;
    while (this.cacheBytes > outboundCacheBytesMax) {
      const oldest = this.cache.keys().next();
      if (oldest.done) break;
      this.forgetCached(oldest.value);
    }
  }

  private forgetCached(pos: number): void {
    const e = this.cache.get(pos);
    if (!e) return;
    this.cacheBytes -= e.bytes;
    this.cache.delete(pos);
    e.cached = false;
    this.recycle(e);
  }

  /** Bytes of chunk records held in memory (status, tests). */
  get cachedBytes(): number {
    return this.cacheBytes;
  }

  /** The blocks a set carries (read from its chunk headers). */
  setBlocks(s: OutboundSet): Runs {
    const out: Runs = [];
    for (const c of s.chunks) {
      const frame = decodeOne(Buffer.concat(this.readChunk(c)));
      if (frame.t !== 'chunk') throw new DeltavolError('METADATA_CORRUPT', `outbound log: record at ${c.pos} is not a chunk`);
      out.push(...frame.runs);
    }
    return out;
  }

  private saveIndex(): void {
    this.fsys.writeAtomic(OUTBOUND_INDEX_FILE, Buffer.from(JSON.stringify(this.index)));
  }

  close(): void {
    this.file.close();
  }

  invariants(): void {
    const ix = this.index;
    assert(ix.releasedPos <= ix.writePos && ix.writePos - ix.releasedPos <= ix.capacityBytes, 'log positions');
    let prev = ix.releasedPos;
    let expect = ix.sets[0]?.set;
    for (const s of ix.sets) {
      assert(s.set === expect, 'sets numbered without gaps');
      expect = s.set + 1;
      assert(s.startPos >= prev && s.endPos >= s.startPos, 'sets in log order');
      prev = s.endPos;
    }
    assert(prev <= ix.writePos, 'sets end before the write position');
    if (ix.sets.length > 0) assert(ix.sets[ix.sets.length - 1]!.set === ix.lastSet, 'last set');
  }
}

function decodeOne(frame: Buffer): ReplMessage {
  let msg: ReplMessage | null = null;
  const d = new FrameDecoder((f) => (msg = f.msg));
  d.push(frame);
  if (msg === null) throw new DeltavolError('METADATA_CORRUPT', 'outbound log: damaged record');
  return msg;
}

/** Collects a set's blocks into chunk records (DeltaSink for VolumeEngine.buildDeltaSet). */
export class SetWriter implements DeltaSink {
  private readonly perChunk: number;
  /** The chunk being filled (allocated at its first block: a set of few blocks costs little). */
  private data: Buffer | null = null;
  private fill = 0;
  private runs: Runs = [];
  private readonly chunks: ChunkPos[] = [];
  private blocks = 0;
  private pos: number;

  constructor(
    private readonly log: OutboundLog,
    readonly set: number,
    private readonly generation: number,
    private readonly blockBytes: number,
    /** Every block put (the set's membership). */
    readonly members: PagedBitmap,
    private readonly partial: boolean,
    private readonly startPos: number,
    /** The cut happens right after the writer is made: the set's age counts from here. */
    private readonly createdAtMs: number,
    private readonly firstChangeAtMs: number,
  ) {
    this.perChunk = Math.max(1, Math.floor(chunkDataBytesMax / blockBytes));
    this.pos = startPos;
  }

  put(block: number, data: Buffer): void {
    assert(data.length === this.blockBytes, 'whole tracking blocks');
    const r = this.room(1);
    data.copy(r.buffer, r.offset);
    this.filled(block, 1);
  }

  /** Room in the chunk being filled: the engine reads blocks straight into it (no copy). */
  room(blocks: number): { buffer: Buffer; offset: number; blocks: number } {
    // A buffer per chunk (pooled): the log keeps recent chunks in memory for the senders.
    this.data ??= this.log.chunkBuffer(this.perChunk * this.blockBytes);
    return { buffer: this.data, offset: this.fill * this.blockBytes, blocks: Math.min(blocks, this.perChunk - this.fill) };
  }

  filled(block: number, count: number): void {
    assert(this.data !== null && count >= 1 && this.fill + count <= this.perChunk, 'filled within room');
    this.fill += count;
    this.blocks += count;
    this.members.setRange(block, count);
    const last = this.runs[this.runs.length - 1];
    if (last && last[0] + last[1] === block) last[1] += count;
    else this.runs.push([block, count]);
    if (this.fill === this.perChunk) this.flushChunk();
  }

  private flushChunk(): void {
    if (this.fill === 0 || this.data === null) return;
    const data = this.data.subarray(0, this.fill * this.blockBytes);
    const chunk = this.chunks.length;
    const crc = chunkChecksum(data, this.set, chunk, this.runs);
    const parts = encodeFrame({ t: 'chunk', generation: this.generation, set: this.set, chunk, runs: this.runs, crc }, [data]);
    const at = this.log.writeRecord(this.pos, parts, this.data);
    this.chunks.push({ pos: at.pos, bytes: at.end - at.pos, crc });
    this.pos = at.end;
    this.fill = 0;
    this.runs = [];
    this.data = null;
  }

  /** Blocks put so far. */
  get blockCount(): number {
    return this.blocks;
  }

  async commit(): Promise<void> {
    this.flushChunk();
    await this.log.commitSet({
      set: this.set,
      generation: this.generation,
      createdAtMs: this.createdAtMs,
      firstChangeAtMs: this.firstChangeAtMs,
      blocks: this.blocks,
      dataBytes: this.blocks * this.blockBytes,
      dataCrc: setDataChecksum(this.chunks.map((c) => c.crc)),
      partial: this.partial,
      chunks: this.chunks,
      startPos: this.startPos,
      endPos: this.pos,
    });
  }
}
