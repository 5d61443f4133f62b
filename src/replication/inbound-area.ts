// Why: the replica acknowledges a delta set only once every chunk of it is durable here
// and every checksum matched (seed 001: the secondary's save volume); playback then
// integrates complete sets in order, and while one is integrated its blocks are read from
// here, so a reader never sees half a set. Knows nothing of links or volumes; its files
// live in a DurableFs (the volume's replication directory, or the simulator's).
//
// Files:
//   inbound-set-N.part  chunk data written as it arrives (any order, duplicates ignored)
//   inbound-set-N.json  written atomically once the set is complete and verified (the
//                       commit point): trailer fields and where each chunk's data sits.
//   inbound-spare-K.part a played set's data file, kept (at most sparePartsMax of them, each
//                       at most sparePartBytesMax) for a later set to write over: on tmpfs a
//                       fresh file costs a page allocation and zeroing per 4 KiB and its
//                       deletion frees them again (1 MiB written and unlinked: 670-700 µs of
//                       CPU; written over an existing file: ~235 µs, measured 2026-12-06). Only
//                       the ranges a set's .json names are ever read, so stale bytes past them
//                       do not matter.
// At open, a .part without its .json is an incomplete set: it is deleted (the sender
// resends it whole).

import { assert } from '../util/assert.js';
import { DeltavolError } from '../util/errors.js';
import type { DurableFile, DurableFs } from '../util/durable-fs.js';
import { setDataChecksum } from './outbound-log.js';
import type { ReplMessage, Runs } from './wire.js';

type ChunkMsg = Extract<ReplMessage, { t: 'chunk' }>;
type TrailerMsg = Extract<ReplMessage, { t: 'trailer' }>;

export interface InboundChunk {
  chunk: number;
  runs: Runs;
  crc: number;
  /** Byte offset of the chunk's data in the set's .part file. */
  pos: number;
  bytes: number;
}

export interface InboundSet {
  set: number;
  generation: number;
  catchUpFrom: number;
  createdAtMs: number;
  receivedAtMs: number;
  /** Only some of the primary's changes (more sets follow before a point in time). */
  partial: boolean;
  blocks: number;
  dataBytes: number;
  chunks: InboundChunk[];
}

interface Receiving {
  file: DurableFile;
  sizeBytes: number;
  chunks: Map<number, InboundChunk>;
}

export type FinishResult = { ok: true; set: InboundSet } | { ok: false; missing: number[]; reason: string };

const NAME = /^inbound-set-(\d+)\.(part|json)$/;
const SPARE = /^inbound-spare-(\d+)\.part$/;
/** Played sets' data files kept for reuse. */
const sparePartsMax = 2;
/** A data file larger than this (a big catch-up set) is deleted, not kept. */
const sparePartBytesMax = 256 * 1024 * 1024;

const partName = (set: number) => `inbound-set-${set}.part`;
const jsonName = (set: number) => `inbound-set-${set}.json`;

export class InboundArea {
  private readonly receiving = new Map<number, Receiving>();
  /**
   * Playback reads a chunk back into this one buffer (grown to the largest chunk). Received
   * data is not kept in memory until its set is played: holding the socket's buffers for
   * hundreds of MiB cost more in garbage collection and page faults (fresh memory for every
   * socket read) than reading the chunk back from the page cache, and the RSS goal.
   */
  private scratch = Buffer.alloc(0);
  private readonly completeSets = new Map<number, InboundSet>();
  private readonly files = new Map<number, DurableFile>();
  /** Spare data files (names), and the highest spare number used. */
  private readonly spares: string[] = [];
  private spareSeq = 0;

  constructor(
    private readonly fsys: DurableFs,
    private readonly now: () => number,
  ) {
    const names = fsys.list();
    for (const name of names) {
      const m = NAME.exec(name);
      if (!m || m[2] !== 'json') continue;
      const set = Number(m[1]);
      let s: InboundSet;
      try {
        s = JSON.parse(fsys.readAll(name)!.toString('utf8')) as InboundSet;
      } catch (e) {
        throw new DeltavolError('METADATA_CORRUPT', `${name}: ${(e as Error).message}`);
      }
      assert(s.set === set, `${name} names set ${s.set}`);
      this.completeSets.set(set, s);
    }
    for (const name of names) {
      const m = NAME.exec(name);
      if (m && m[2] === 'part' && !this.completeSets.has(Number(m[1]))) fsys.remove(name);
      const k = SPARE.exec(name);
      if (k) {
        this.spareSeq = Math.max(this.spareSeq, Number(k[1]));
        if (this.spares.length < sparePartsMax) this.spares.push(name);
        else fsys.remove(name);
      }
    }
  }

  /** Spare data files kept for reuse (status, tests). */
  get spareFiles(): number {
    return this.spares.length;
  }

  /** Complete sets, oldest first. */
  complete(): InboundSet[] {
    return [...this.completeSets.values()].sort((a, b) => a.set - b.set);
  }

  get(set: number): InboundSet | undefined {
    return this.completeSets.get(set);
  }

  /** Bytes held by complete and incomplete sets. */
  get bytesHeld(): number {
    let n = 0;
    for (const s of this.completeSets.values()) n += s.dataBytes;
    for (const r of this.receiving.values()) n += r.sizeBytes;
    return n;
  }

  /** Sets being received (some chunks here, not complete): their numbers. */
  incomplete(): number[] {
    return [...this.receiving.keys()].sort((a, b) => a - b);
  }

  /** A new session: sets not yet complete are dropped (the sender resends them whole). */
  dropIncomplete(): void {
    for (const set of [...this.receiving.keys()]) this.dropSet(set);
  }

  /**
   * Stores a verified chunk (its checksum was checked by the caller). Duplicates are
   * ignored. `data` may be the socket's buffers as received: written from them, not kept.
   */
  storeChunk(msg: ChunkMsg, data: Buffer | readonly Buffer[]): void {
    const parts = Buffer.isBuffer(data) ? [data] : data;
    let bytes = 0;
    for (const p of parts) bytes += p.length;
    assert(!this.completeSets.has(msg.set), 'chunk of a complete set');
    let r = this.receiving.get(msg.set);
    if (!r) {
      if (this.fsys.exists(partName(msg.set))) this.fsys.remove(partName(msg.set));
      // Written over a played set's file when there is one (its bytes past ours are never read).
      const spare = this.spares.pop();
      if (spare !== undefined) this.fsys.rename(spare, partName(msg.set));
      r = { file: this.fsys.open(partName(msg.set), true), sizeBytes: 0, chunks: new Map() };
      this.receiving.set(msg.set, r);
    }
    if (r.chunks.has(msg.chunk)) return;
    if (r.file.writev) r.file.writev(r.sizeBytes, parts);
    else for (let at = r.sizeBytes, i = 0; i < parts.length; at += parts[i]!.length, i++) r.file.write(at, parts[i]!, 0, parts[i]!.length);
    r.chunks.set(msg.chunk, { chunk: msg.chunk, runs: msg.runs, crc: msg.crc, pos: r.sizeBytes, bytes });
    r.sizeBytes += bytes;
  }

  /**
   * The trailer arrived: if every chunk it announces is here and the set's checksum
   * matches, the set becomes durable and complete (then, and only then, it may be acked).
   */
  async finishSet(t: TrailerMsg): Promise<FinishResult> {
    const r = this.receiving.get(t.set);
    const held = r?.chunks ?? new Map<number, InboundChunk>();
    const missing: number[] = [];
    for (let c = 0; c < t.chunks; c++) if (!held.has(c)) missing.push(c);
    if (missing.length > 0) return { ok: false, missing, reason: `${missing.length} of ${t.chunks} chunks missing` };
    const chunks = [...held.values()].sort((a, b) => a.chunk - b.chunk);
    const bad = (reason: string): FinishResult => {
      this.dropSet(t.set);
      return { ok: false, missing: [], reason };
    };
    if (chunks.length !== t.chunks) return bad(`set ${t.set}: ${chunks.length} chunks held, trailer announces ${t.chunks}`);
    let blocks = 0;
    for (const c of chunks) for (const [, n] of c.runs) blocks += n;
    if (blocks !== t.blocks) return bad(`set ${t.set}: ${blocks} blocks held, trailer announces ${t.blocks}`);
    const sizeBytes = r?.sizeBytes ?? 0;
    if (sizeBytes !== t.dataBytes) return bad(`set ${t.set}: ${sizeBytes} data bytes held, trailer announces ${t.dataBytes}`);
    if (setDataChecksum(chunks.map((c) => c.crc)) !== t.dataCrc) return bad(`set ${t.set}: data checksum mismatch`);
    if (r) {
      await r.file.sync();
      r.file.close();
    } else {
      this.fsys.open(partName(t.set), true).close(); // an empty set still has its (empty) data file
    }
    this.receiving.delete(t.set);
    const s: InboundSet = {
      set: t.set,
      generation: t.generation,
      catchUpFrom: t.catchUpFrom,
      createdAtMs: t.createdAtMs,
      receivedAtMs: this.now(),
      partial: t.partial,
      blocks,
      dataBytes: t.dataBytes,
      chunks,
    };
    this.fsys.writeAtomic(jsonName(t.set), Buffer.from(JSON.stringify(s)));
    this.completeSets.set(t.set, s);
    return { ok: true, set: s };
  }

  private dropSet(set: number): void {
    const r = this.receiving.get(set);
    if (r) r.file.close();
    this.receiving.delete(set);
    if (this.fsys.exists(partName(set))) this.fsys.remove(partName(set));
  }

  private fileOf(set: number): DurableFile {
    let f = this.files.get(set);
    if (f === undefined) {
      if (!this.completeSets.has(set)) throw new DeltavolError('IO', `inbound set ${set} is not complete`);
      f = this.fsys.open(partName(set), false);
      this.files.set(set, f);
    }
    return f;
  }

  /**
   * A complete set's chunk data, read back from its file into the area's one playback
   * buffer: valid until the next call (playback finishes a chunk's writes before it asks
   * for the next one).
   */
  chunkData(set: number, c: InboundChunk): Buffer {
    if (this.scratch.length < c.bytes) this.scratch = Buffer.allocUnsafe(c.bytes);
    const data = this.scratch.subarray(0, c.bytes);
    this.read(set, c.pos, data, 0, c.bytes);
    return data;
  }

  /** Reads `length` bytes of a complete set's data at `pos` into target. */
  read(set: number, pos: number, target: Buffer, offset: number, length: number): void {
    const n = this.fileOf(set).read(pos, target, offset, length);
    if (n !== length) throw new DeltavolError('IO', `inbound set ${set}: short read at ${pos + n}`);
  }

  /**
   * The set was played (or is dropped): its files go, the json first (a .part alone is
   * removed at open); the data file is kept as a spare while there is room for one.
   */
  remove(set: number): void {
    const f = this.files.get(set);
    const physicalBytes = f?.sizeBytes() ?? this.completeSets.get(set)?.dataBytes ?? Infinity;
    f?.close();
    this.files.delete(set);
    this.completeSets.delete(set);
    if (this.fsys.exists(jsonName(set))) this.fsys.remove(jsonName(set));
    if (!this.fsys.exists(partName(set))) return;
    if (this.spares.length < sparePartsMax && physicalBytes <= sparePartBytesMax) {
      const name = `inbound-spare-${++this.spareSeq}.part`;
      this.fsys.rename(partName(set), name);
      this.spares.push(name);
    } else {
      this.fsys.remove(partName(set));
    }
  }

  /** Removes every set (a fresh initial copy, or a failover that drops what it did not play). */
  clear(): void {
    this.dropIncomplete();
    for (const s of [...this.completeSets.keys()]) this.remove(s);
  }

  close(): void {
    this.dropIncomplete();
    for (const f of this.files.values()) f.close();
    this.files.clear();
  }
}
