// Why: the replica acknowledges a delta set only once every chunk of it is durable here
// and every checksum matched (seed 001: the secondary's save volume); playback then
// integrates complete sets in order, and while one is integrated its blocks are read from
// here, so a reader never sees half a set. Knows nothing of sockets or volumes.
//
// Files (in the replica's replication directory, `inbound/`):
//   set-N.part  chunk data appended as it arrives (any order, duplicates ignored)
//   set-N.json  written atomically once the set is complete and verified (the commit
//               point): trailer fields and where each chunk's data sits in set-N.part.
// At open, a .part without its .json is an incomplete set: it is deleted (the sender
// resends it whole).

import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { assert } from '../util/assert.js';
import { DeltavolError } from '../util/errors.js';
import { fsyncDirSync, writeFileAtomicSync } from '../util/atomic-file.js';
import { setDataChecksum } from './outbound-log.js';
import type { ReplMessage, Runs } from './wire.js';

const fdatasync = promisify(fs.fdatasync);

type ChunkMsg = Extract<ReplMessage, { t: 'chunk' }>;
type TrailerMsg = Extract<ReplMessage, { t: 'trailer' }>;

export interface InboundChunk {
  chunk: number;
  runs: Runs;
  crc: number;
  /** Byte offset of the chunk's data in set-N.part. */
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
  fd: number;
  sizeBytes: number;
  chunks: Map<number, InboundChunk>;
}

export type FinishResult = { ok: true; set: InboundSet } | { ok: false; missing: number[]; reason: string };

/** Received chunk data kept in memory for playback (a copy of what is on disk). */
const inboundMemoryBytesMax = 256 * 1024 * 1024;

export class InboundArea {
  private readonly receiving = new Map<number, Receiving>();
  /** Chunk data by set and chunk number, so playback need not read it back. */
  private readonly memory = new Map<number, Map<number, Buffer>>();
  private memoryBytes = 0;
  private readonly completeSets = new Map<number, InboundSet>();
  private readonly fds = new Map<number, number>();

  constructor(readonly dir: string) {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    for (const name of fs.readdirSync(dir)) {
      const m = /^set-(\d+)\.(part|json)$/.exec(name);
      if (!m) {
        if (name.includes('.tmp')) fs.rmSync(path.join(dir, name), { force: true });
        continue;
      }
      const set = Number(m[1]);
      if (m[2] === 'json') {
        const s = JSON.parse(fs.readFileSync(path.join(dir, name), 'utf8')) as InboundSet;
        assert(s.set === set, `${name} names set ${s.set}`);
        this.completeSets.set(set, s);
      }
    }
    for (const name of fs.readdirSync(dir)) {
      const m = /^set-(\d+)\.part$/.exec(name);
      if (m && !this.completeSets.has(Number(m[1]))) fs.rmSync(path.join(dir, name), { force: true });
    }
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

  /** A new session: sets not yet complete are dropped (the sender resends them whole). */
  dropIncomplete(): void {
    for (const [set, r] of this.receiving) {
      this.forget(set);
      fs.closeSync(r.fd);
      fs.rmSync(this.partPath(set), { force: true });
    }
    this.receiving.clear();
  }

  private partPath(set: number): string {
    return path.join(this.dir, `set-${set}.part`);
  }
  private jsonPath(set: number): string {
    return path.join(this.dir, `set-${set}.json`);
  }

  /** Stores a verified chunk (its checksum was checked by the caller). Duplicates are ignored. */
  storeChunk(msg: ChunkMsg, data: Buffer): void {
    assert(!this.completeSets.has(msg.set), 'chunk of a complete set');
    let r = this.receiving.get(msg.set);
    if (!r) {
      r = { fd: fs.openSync(this.partPath(msg.set), 'w+', 0o600), sizeBytes: 0, chunks: new Map() };
      this.receiving.set(msg.set, r);
    }
    if (r.chunks.has(msg.chunk)) return;
    let done = 0;
    while (done < data.length) done += fs.writeSync(r.fd, data, done, data.length - done, r.sizeBytes + done);
    r.chunks.set(msg.chunk, { chunk: msg.chunk, runs: msg.runs, crc: msg.crc, pos: r.sizeBytes, bytes: data.length });
    r.sizeBytes += data.length;
    if (this.memoryBytes + data.length <= inboundMemoryBytesMax) {
      let m = this.memory.get(msg.set);
      if (!m) this.memory.set(msg.set, (m = new Map()));
      m.set(msg.chunk, data);
      this.memoryBytes += data.length;
    }
  }

  /**
   * The trailer arrived: if every chunk it announces is here and the set's checksum
   * matches, the set becomes durable and complete (then, and only then, it may be acked).
   */
  async finishSet(t: TrailerMsg): Promise<FinishResult> {
    const r = this.receiving.get(t.set) ?? { fd: -1, sizeBytes: 0, chunks: new Map<number, InboundChunk>() };
    const missing: number[] = [];
    for (let c = 0; c < t.chunks; c++) if (!r.chunks.has(c)) missing.push(c);
    if (missing.length > 0) return { ok: false, missing, reason: `${missing.length} of ${t.chunks} chunks missing` };
    const chunks = [...r.chunks.values()].sort((a, b) => a.chunk - b.chunk);
    const bad = (reason: string): FinishResult => {
      this.dropSet(t.set);
      return { ok: false, missing: [], reason };
    };
    if (chunks.length !== t.chunks) return bad(`set ${t.set}: ${chunks.length} chunks held, trailer announces ${t.chunks}`);
    let blocks = 0;
    for (const c of chunks) for (const [, n] of c.runs) blocks += n;
    if (blocks !== t.blocks) return bad(`set ${t.set}: ${blocks} blocks held, trailer announces ${t.blocks}`);
    if (r.sizeBytes !== t.dataBytes) return bad(`set ${t.set}: ${r.sizeBytes} data bytes held, trailer announces ${t.dataBytes}`);
    if (setDataChecksum(chunks.map((c) => c.crc)) !== t.dataCrc) return bad(`set ${t.set}: data checksum mismatch`);
    if (r.fd >= 0) {
      await fdatasync(r.fd);
      fs.closeSync(r.fd);
    } else {
      fs.writeFileSync(this.partPath(t.set), Buffer.alloc(0), { mode: 0o600 });
    }
    this.receiving.delete(t.set);
    const s: InboundSet = {
      set: t.set,
      generation: t.generation,
      catchUpFrom: t.catchUpFrom,
      createdAtMs: t.createdAtMs,
      receivedAtMs: Date.now(),
      partial: t.partial,
      blocks,
      dataBytes: t.dataBytes,
      chunks,
    };
    writeFileAtomicSync(this.jsonPath(t.set), JSON.stringify(s));
    this.completeSets.set(t.set, s);
    return { ok: true, set: s };
  }

  private dropSet(set: number): void {
    this.forget(set);
    const r = this.receiving.get(set);
    if (r) fs.closeSync(r.fd);
    this.receiving.delete(set);
    fs.rmSync(this.partPath(set), { force: true });
  }

  /** An open descriptor of a complete set's data (cached until remove()). */
  fdOf(set: number): number {
    let fd = this.fds.get(set);
    if (fd === undefined) {
      if (!this.completeSets.has(set)) throw new DeltavolError('IO', `inbound set ${set} is not complete`);
      fd = fs.openSync(this.partPath(set), 'r');
      this.fds.set(set, fd);
    }
    return fd;
  }

  /** A complete set's chunk data (from memory when still there, else from its file). */
  chunkData(set: number, c: InboundChunk): Buffer {
    const m = this.memory.get(set)?.get(c.chunk);
    if (m) return m;
    const data = Buffer.allocUnsafe(c.bytes);
    this.read(set, c.pos, data, 0, c.bytes);
    return data;
  }

  private forget(set: number): void {
    const m = this.memory.get(set);
    if (!m) return;
    for (const b of m.values()) this.memoryBytes -= b.length;
    this.memory.delete(set);
  }

  /** Reads `length` bytes of a complete set's data at `pos` into target. */
  read(set: number, pos: number, target: Buffer, offset: number, length: number): void {
    const fd = this.fdOf(set);
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, target, offset + done, length - done, pos + done);
      if (n === 0) throw new DeltavolError('IO', `inbound set ${set}: short read at ${pos + done}`);
      done += n;
    }
  }

  /** The set was played: its files go, the json first (a .part alone is removed at open). */
  remove(set: number): void {
    const fd = this.fds.get(set);
    if (fd !== undefined) fs.closeSync(fd);
    this.fds.delete(set);
    this.completeSets.delete(set);
    this.forget(set);
    fs.rmSync(this.jsonPath(set), { force: true });
    fs.rmSync(this.partPath(set), { force: true });
    fsyncDirSync(this.dir);
  }

  /** Removes every set (a fresh initial copy). */
  clear(): void {
    this.dropIncomplete();
    for (const s of [...this.completeSets.keys()]) this.remove(s);
  }

  close(): void {
    this.dropIncomplete();
    for (const fd of this.fds.values()) fs.closeSync(fd);
    this.fds.clear();
  }
}
