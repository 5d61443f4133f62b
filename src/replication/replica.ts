// Why: one replica volume's side of replication (seed 001 FIG. 9, 11, 22): it takes the
// initial copy, stores incoming chunks durably (inbound-area.ts), acknowledges a set only
// when it is whole and verified, and plays complete sets back in order while readers see
// either the state before a set or after it (the set's blocks are read from the inbound
// area while it is integrated). Snapshots of the replica are stamped with the last set
// played. During an operator split (seed 003) the volume is writable and its change log
// records the replica's own writes, reported at the next hello so they travel again.
//
// State (replica/state.json, replaced atomically): pair id, generation, playedSet,
// initial-copy progress (everything below offsetBytes durable), split flag.
// ackedSet is not stored: it is the end of the chain playedSet → complete sets whose
// catchUpFrom is the previous one.

import fs from 'node:fs';
import path from 'node:path';
import { crc32c } from '@node-rs/crc32';
import type { Logger } from '../util/log.js';
import { DeltavolError } from '../util/errors.js';
import { writeFileAtomicSync } from '../util/atomic-file.js';
import type { SnapshotInfo } from '../snapshot/snapshot-queue.js';
import { InboundArea, type InboundSet } from './inbound-area.js';
import { Link } from './link.js';
import { chunkChecksum, trailerChecksum, type Frame, type ReplMessage, type Runs } from './wire.js';
import type { ReplicaPort } from './ports.js';
import { WHOLE_SET } from './pair-sender.js';
import * as L from './limits.js';

export const REPLICA_DIR = 'replica';
const STATE_FILE = 'state.json';
const SPLIT_WRITES_FILE = 'split-writes.json';

type Hello = Extract<ReplMessage, { t: 'hello' }>;
type TrailerMsg = Extract<ReplMessage, { t: 'trailer' }>;

export interface ReplicaState {
  version: 1;
  pairId: string;
  primaryVolume: string;
  generation: number;
  playedSet: number;
  initialCopy: { done: boolean; offsetBytes: number; baseSet: number };
  /**
   * The volume equals the primary at a point in time (false during an initial copy and
   * after a partial set until a whole one is played).
   */
  consistent: boolean;
  split: boolean;
  createdAt: string;
}

export interface ReplicaOptions {
  /** Complete sets wait this long before playback (0: at once). */
  playbackDelayMs: number;
  inboundBytesMax: number;
}

export class ReplicaVolume {
  private link: Link | null = null;
  private readonly inbound: InboundArea;
  private ackedSet: number;
  private readonly trailers = new Map<number, TrailerMsg>();
  /** Frames are handled one at a time, in arrival order. */
  private queue: Promise<void> = Promise.resolve();
  private queued = 0;
  private playing: Promise<void> | null = null;
  private snapshotting: Promise<unknown> | null = null;
  private closed = false;
  private sessionSawData = false;
  private initBytesSinceAck = 0;
  private readonly timer: NodeJS.Timeout;
  lastError: string | null = null;
  setsPlayed = 0;
  bytesReceived = 0;

  private constructor(
    readonly port: ReplicaPort,
    readonly dir: string,
    private state: ReplicaState,
    private readonly log: Logger,
    private readonly options: ReplicaOptions,
  ) {
    this.inbound = new InboundArea(path.join(dir, 'inbound'));
    for (const s of this.inbound.complete()) if (s.set <= state.playedSet) this.inbound.remove(s.set);
    this.ackedSet = this.chainHead();
    this.timer = setInterval(() => this.kickPlayback(), 200);
    this.timer.unref();
  }

  static exists(volumeDir: string): boolean {
    return fs.existsSync(path.join(volumeDir, REPLICA_DIR, STATE_FILE));
  }

  static open(port: ReplicaPort, volumeDir: string, log: Logger, options: ReplicaOptions): ReplicaVolume {
    const dir = path.join(volumeDir, REPLICA_DIR);
    const state = JSON.parse(fs.readFileSync(path.join(dir, STATE_FILE), 'utf8')) as ReplicaState;
    if (state.version !== 1) throw new DeltavolError('METADATA_CORRUPT', `${dir}/${STATE_FILE}: unknown format`);
    state.consistent ??= state.initialCopy.done;
    return new ReplicaVolume(port, dir, state, log, options);
  }

  static create(port: ReplicaPort, volumeDir: string, hello: Hello, log: Logger, options: ReplicaOptions): ReplicaVolume {
    const dir = path.join(volumeDir, REPLICA_DIR);
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const state: ReplicaState = {
      version: 1,
      pairId: hello.pairId,
      primaryVolume: hello.primaryVolume,
      generation: hello.generation,
      playedSet: 0,
      initialCopy: { done: false, offsetBytes: 0, baseSet: 0 },
      consistent: false,
      split: false,
      createdAt: new Date().toISOString(),
    };
    const rv = new ReplicaVolume(port, dir, state, log, options);
    rv.saveState();
    return rv;
  }

  get pairId(): string {
    return this.state.pairId;
  }
  get info(): Readonly<ReplicaState> {
    return this.state;
  }
  get connected(): boolean {
    return this.link !== null && !this.link.closed;
  }

  private saveState(): void {
    writeFileAtomicSync(path.join(this.dir, STATE_FILE), JSON.stringify(this.state, null, 1));
  }

  /** The last set of the chain from playedSet through complete sets. */
  private chainHead(): number {
    let head = this.state.playedSet;
    const byFrom = new Map<number, InboundSet>();
    for (const s of this.inbound.complete()) byFrom.set(s.catchUpFrom, s);
    for (let s = byFrom.get(head); s && s.set > head; s = byFrom.get(head)) head = s.set;
    return head;
  }

  /** Plays complete sets in order (and any left by a crash) before the volume is exported. */
  async recover(): Promise<void> {
    this.kickPlayback();
    while (this.playing) await this.playing;
  }

  // ================= the session =================

  /** A primary said hello on `link`: take the session over (one at a time). */
  async accept(link: Link, hello: Hello): Promise<void> {
    if (hello.generation < this.state.generation) {
      link.send({ t: 'refuse', code: 'STALE_GENERATION', message: `generation ${hello.generation} is older than this replica's ${this.state.generation}` });
      link.close('stale generation');
      return;
    }
    if (hello.sizeBytes !== this.port.sizeBytes || hello.blockBytes !== this.port.blockBytes) {
      link.send({ t: 'refuse', code: 'GEOMETRY', message: `replica ${this.port.name} is ${this.port.sizeBytes} bytes in ${this.port.blockBytes}-byte blocks; primary is ${hello.sizeBytes} in ${hello.blockBytes}` });
      link.close('geometry mismatch');
      return;
    }
    this.link?.close('replaced by a new session');
    this.link = link;
    await this.queue; // the old session's frames are done
    this.trailers.clear();
    this.inbound.dropIncomplete();
    this.sessionSawData = false;
    if (hello.generation > this.state.generation) {
      this.state.generation = hello.generation;
      this.saveState();
    }
    let splitWrites: Runs = [];
    const splitFile = path.join(this.dir, SPLIT_WRITES_FILE);
    if (this.state.split) {
      // The split ends: what the replica wrote must travel again. Saved before it is
      // reported, removed only once the primary has certainly recorded it.
      await this.waitPlaybackIdle();
      splitWrites = this.port.changedBlocks().runs();
      writeFileAtomicSync(splitFile, JSON.stringify(splitWrites));
      await this.port.setReadOnly(true);
      this.state.split = false;
      this.saveState();
      this.log.info({ runs: splitWrites.length }, 'split ends: replica read-only again');
    } else if (fs.existsSync(splitFile)) {
      splitWrites = JSON.parse(fs.readFileSync(splitFile, 'utf8')) as Runs;
    }
    this.ackedSet = this.chainHead();
    link.send({
      t: 'welcome',
      generation: this.state.generation,
      ackedSet: this.ackedSet,
      playedSet: this.state.playedSet,
      initialCopy: { done: this.state.initialCopy.done, offsetBytes: this.state.initialCopy.offsetBytes },
      splitWrites,
    });
    this.log.info({ primary: hello.primaryVolume, ackedSet: this.ackedSet, playedSet: this.state.playedSet }, 'replication session started');
  }

  /** Frames of the current session, handled in order. */
  onFrame(link: Link, f: Frame): void {
    if (link !== this.link) return;
    this.queued++;
    if (this.queued > 64 || this.inbound.bytesHeld > this.options.inboundBytesMax) link.pause();
    this.queue = this.queue
      .then(() => this.handle(link, f))
      .catch((e: Error) => {
        this.lastError = e.message;
        this.log.error({ err: e.message }, 'replication frame failed');
        link.close(`replica failed: ${e.message}`);
      })
      .finally(() => {
        this.queued--;
        if (this.queued <= 16 && this.inbound.bytesHeld <= this.options.inboundBytesMax) link.resume();
      });
  }

  private async handle(link: Link, f: Frame): Promise<void> {
    const m = f.msg;
    if (link.closed) return;
    if (!this.sessionSawData && m.t !== 'split') {
      // Anything the primary sends after our welcome means it recorded our split writes.
      this.sessionSawData = true;
      fs.rmSync(path.join(this.dir, SPLIT_WRITES_FILE), { force: true });
    }
    if ('generation' in m && m.generation < this.state.generation) {
      link.send({ t: 'refuse', code: 'STALE_GENERATION', message: `generation ${m.generation} is older than ${this.state.generation}` });
      link.close('stale generation');
      return;
    }
    switch (m.t) {
      case 'init':
        return this.onInit(link, m, f.data);
      case 'initDone': {
        await this.port.flush();
        this.state.initialCopy = { done: true, offsetBytes: this.port.sizeBytes, baseSet: m.baseSet };
        this.state.playedSet = m.baseSet;
        this.state.consistent = true;
        this.saveState();
        this.ackedSet = this.chainHead();
        this.log.info({ baseSet: m.baseSet }, 'initial copy complete');
        link.send({ t: 'ack', set: this.ackedSet, playedSet: this.state.playedSet });
        return;
      }
      case 'chunk': {
        if (m.set <= this.ackedSet || this.inbound.get(m.set)) return; // a duplicate of something held
        const data = f.data!;
        const blocks = m.runs.reduce((n, [, c]) => n + c, 0);
        if (data.length !== blocks * this.port.blockBytes || chunkChecksum(data, m.set, m.chunk, m.runs) !== m.crc) {
          link.send({ t: 'nak', set: m.set, chunk: m.chunk, reason: 'chunk checksum mismatch' });
          return;
        }
        for (const [b, c] of m.runs) {
          if (b + c > Math.ceil(this.port.sizeBytes / this.port.blockBytes)) {
            link.send({ t: 'refuse', code: 'BAD_CHUNK', message: `set ${m.set} chunk ${m.chunk}: blocks past the end of the volume` });
            link.close('chunk past the end');
            return;
          }
        }
        this.bytesReceived += data.length;
        this.inbound.storeChunk(m, data);
        if (this.trailers.has(m.set)) await this.finish(link, m.set);
        return;
      }
      case 'trailer': {
        const { t: _t, trailerCrc, ...fields } = m;
        if (trailerChecksum(fields) !== trailerCrc) {
          link.send({ t: 'nak', set: m.set, chunk: WHOLE_SET, reason: 'trailer checksum mismatch' });
          return;
        }
        if (m.set <= this.ackedSet || this.inbound.get(m.set)) {
          link.send({ t: 'ack', set: this.ackedSet, playedSet: this.state.playedSet });
          return;
        }
        this.trailers.set(m.set, m);
        await this.finish(link, m.set);
        return;
      }
      case 'split':
        await this.startSplit();
        link.send({ t: 'ack', set: this.ackedSet, playedSet: this.state.playedSet });
        return;
      default:
        link.send({ t: 'refuse', code: 'PROTOCOL', message: `unexpected ${m.t}` });
        link.close(`unexpected ${m.t}`);
    }
  }

  private async onInit(link: Link, m: Extract<ReplMessage, { t: 'init' }>, data: Buffer | null): Promise<void> {
    if (this.state.initialCopy.done) return; // a late duplicate
    if (m.offsetBytes + m.lengthBytes > this.port.sizeBytes) throw new DeltavolError('BAD_STREAM', `init range ${m.offsetBytes}+${m.lengthBytes} past the end`);
    if (!m.zero) {
      if (crc32c(data!) !== m.crc) {
        // A damaged range: drop the link; the primary resumes from the last durable offset.
        link.close('initial copy checksum mismatch');
        return;
      }
      await this.port.playbackWrite(m.offsetBytes, [data!]);
    }
    this.bytesReceived += m.lengthBytes;
    this.initBytesSinceAck += m.lengthBytes;
    if (this.initBytesSinceAck >= L.initAckEveryBytes) {
      this.initBytesSinceAck = 0;
      await this.port.flush();
      this.state.initialCopy.offsetBytes = m.offsetBytes + m.lengthBytes;
      this.saveState();
      link.send({ t: 'initAck', offsetBytes: this.state.initialCopy.offsetBytes });
    }
  }

  private async finish(link: Link, set: number): Promise<void> {
    const t = this.trailers.get(set)!;
    const r = await this.inbound.finishSet(t);
    if (!r.ok) {
      if (r.missing.length > 0) {
        // Wait for the missing chunks (reordered) but ask for them again too (lost).
        for (const c of r.missing.slice(0, 64)) link.send({ t: 'nak', set, chunk: c, reason: 'missing' });
      } else {
        this.trailers.delete(set);
        this.log.warn({ set, reason: r.reason }, 'delta set refused: asking for it again');
        link.send({ t: 'nak', set, chunk: WHOLE_SET, reason: r.reason });
      }
      return;
    }
    this.trailers.delete(set);
    this.log.debug({ set, blocks: r.set.blocks, bytes: r.set.dataBytes }, 'delta set received');
    const before = this.ackedSet;
    this.ackedSet = this.chainHead();
    if (this.ackedSet !== before) link.send({ t: 'ack', set: this.ackedSet, playedSet: this.state.playedSet });
    this.kickPlayback();
  }

  // ================= playback =================

  private kickPlayback(): void {
    if (this.playing || this.snapshotting || this.closed || this.state.split) return;
    const next = this.nextToPlay();
    if (!next) return;
    if (this.options.playbackDelayMs > 0 && Date.now() - next.receivedAtMs < this.options.playbackDelayMs && this.inbound.bytesHeld < this.options.inboundBytesMax / 2) return;
    this.playing = this.play(next)
      .catch((e: Error) => {
        this.lastError = e.message;
        this.log.error({ set: next.set, err: e.message }, 'playback failed');
      })
      .finally(() => {
        this.playing = null;
        this.kickPlayback();
      });
  }

  private nextToPlay(): InboundSet | undefined {
    return this.inbound.complete().find((s) => s.catchUpFrom === this.state.playedSet && s.set <= this.ackedSet);
  }

  private async play(s: InboundSet): Promise<void> {
    const started = Date.now();
    const bs = this.port.blockBytes;
    const size = this.port.sizeBytes;
    // Where each block of the set sits in the inbound file: built on the first read that
    // comes during playback (most sets are played with nobody reading).
    let where: Map<number, number> | null = null;
    const locate = () => {
      const m = new Map<number, number>();
      for (const c of s.chunks) {
        let pos = c.pos;
        for (const [b, n] of c.runs) for (let i = 0; i < n; i++, pos += bs) m.set(b + i, pos);
      }
      return m;
    };
    const inbound = this.inbound;
    this.port.setOverlay({
      readBlock(b, inBlock, target, offset, n) {
        where ??= locate();
        const pos = where.get(b);
        if (pos === undefined) return false;
        inbound.read(s.set, pos + inBlock, target, offset, n);
        return true;
      },
    });
    try {
      await this.port.readsDrained(); // reads that started before the overlay finish first
      // The blocks of a set are distinct: a chunk's writes are issued together (the engine
      // group-commits what they need), one chunk at a time to bound memory.
      for (const c of s.chunks) {
        const data = inbound.chunkData(s.set, c);
        let at = 0;
        const waits: Promise<void>[] = [];
        for (const [b, n] of c.runs) {
          const off = b * bs;
          const len = Math.min(n * bs, size - off);
          const r = this.port.playbackWrite(off, [data.subarray(at, at + len)]);
          if (r) waits.push(r);
          at += n * bs;
        }
        await Promise.all(waits);
      }
      await this.port.flush();
      this.state.playedSet = s.set;
      this.state.consistent = !s.partial;
      this.saveState();
    } finally {
      this.port.setOverlay(null);
    }
    inbound.remove(s.set);
    this.setsPlayed++;
    this.log.debug({ set: s.set, blocks: s.blocks, ms: Date.now() - started }, 'delta set played');
    const link = this.link;
    if (link && !link.closed) {
      link.send({ t: 'ack', set: this.ackedSet, playedSet: this.state.playedSet });
      // Reading stopped while the inbound area was full: playback made room.
      if (this.queued <= 16 && this.inbound.bytesHeld <= this.options.inboundBytesMax) link.resume();
    }
  }

  private async waitPlaybackIdle(): Promise<void> {
    while (this.playing) await this.playing;
  }

  // ================= split and snapshots =================

  private async startSplit(): Promise<void> {
    if (this.state.split) return;
    await this.waitPlaybackIdle();
    await this.port.discardChanges();
    this.state.split = true;
    this.saveState();
    await this.port.setReadOnly(false);
    this.log.info({ playedSet: this.state.playedSet }, 'split: replica writable, its writes are recorded');
  }

  /** A snapshot between two sets, stamped with the last set played. */
  async createSnapshot(name: string): Promise<SnapshotInfo> {
    while (this.snapshotting) await this.snapshotting.catch(() => undefined);
    const run = (async () => {
      await this.waitPlaybackIdle();
      if (!this.state.consistent) {
        this.log.warn({ snapshot: name, playedSet: this.state.playedSet }, 'snapshot of a replica that is between two points in time (initial copy or a partial set): it may not be crash-consistent');
      }
      return this.port.createSnapshot(name, this.state.playedSet);
    })();
    this.snapshotting = run;
    try {
      return await run;
    } finally {
      this.snapshotting = null;
      this.kickPlayback();
    }
  }

  // ================= status =================

  status() {
    const held = this.inbound.complete();
    const oldest = held.find((s) => s.set > this.state.playedSet);
    return {
      role: 'replica' as const,
      pairId: this.state.pairId,
      primaryVolume: this.state.primaryVolume,
      state: this.state.split ? 'suspend' : !this.state.initialCopy.done ? 'initial-copy' : this.connected ? 'duplex' : 'disconnected',
      connected: this.connected,
      generation: this.state.generation,
      playedSet: this.state.playedSet,
      ackedSet: this.ackedSet,
      consistent: this.state.consistent,
      initialCopy: this.state.initialCopy,
      setsHeld: held.map((s) => ({ set: s.set, createdAt: new Date(s.createdAtMs).toISOString(), receivedAt: new Date(s.receivedAtMs).toISOString(), blocks: s.blocks, bytes: s.dataBytes })),
      inboundBytes: this.inbound.bytesHeld,
      lagSeconds: oldest ? Math.max(0, (Date.now() - oldest.createdAtMs) / 1000) : 0,
      setsPlayed: this.setsPlayed,
      bytesReceived: this.bytesReceived,
      lastError: this.lastError,
    };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.timer);
    this.link?.close('replica closing');
    await this.queue.catch(() => undefined);
    await this.waitPlaybackIdle();
    this.inbound.close();
  }
}
