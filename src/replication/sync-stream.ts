// Why: a pair in mode sync (issue 13, seed 002's synchronous copy) acknowledges a client's
// write only once its replica has it, and a FLUSH or FUA only once it is durable there. The
// delta sets cannot do that (a set is cut every few seconds); this is the stream that can:
// the engine hands every write it issues to this mirror (write-mirror.ts), in issue order,
// and the client's reply waits for the replica's cumulative acknowledgement. Cuts go into
// the stream as barriers, so a set is still a point in the same order on both sides.
//
// States (one owner: this object; the pair sender drives it):
//   off       - not in sync: writes are recorded by the change log only and ship with the
//               sets; `fence data` refuses them (EIO) instead, `fence never` lets them go.
//   starting  - the pair has caught up; the next cut (forced by the replicator) starts it.
//   holding   - cut n happened: writes since are queued here until set n is on the link,
//               then sent behind it (the replica applies them only after playing set n).
//   streaming - every write is sent as it is issued.
// Any failure (the link down, an acknowledgement later than the timeout) goes back to off:
// writes waiting are released (`never`: acknowledged with what the primary holds; they
// travel in the next sets) or failed with EIO (`data`). The pair catches up with sets and
// starts again by itself.

import { crc32cParts } from '../util/crc32c-parts.js';
import { systemError } from '../util/errors.js';
import { assert } from '../util/assert.js';
import { PartsCursor } from '../util/parts-cursor.js';
import type { Logger } from '../util/log.js';
import type { Clock, Cancel } from '../util/clock.js';
import type { WriteMirror } from '../volume/write-mirror.js';
import type { Link } from './link.js';
import type { ReplMessage } from './wire.js';

export type SyncFence = 'never' | 'data';
export type SyncStreamState = 'off' | 'starting' | 'holding' | 'streaming';

/** How often the oldest unacknowledged item is checked against the timeout. */
const syncCheckMs = 100;
/** Data of one stream frame at most (a bigger write travels as several; wire.ts allows 16 MiB). */
const syncFrameBytesMax = 8 * 1024 * 1024;

/** The buffers as consecutive groups of at most `max` bytes each (views, no copy). */
export function splitParts(chunks: Buffer[], max: number): Buffer[][] {
  let left = 0;
  for (const c of chunks) left += c.length;
  const cursor = new PartsCursor(chunks);
  const out: Buffer[][] = [];
  do {
    const n = Math.min(max, left);
    out.push(cursor.take(n));
    left -= n;
  } while (left > 0);
  return out;
}

interface Waiter {
  seq: number;
  atMs: number;
  /** performance.now() at send (latency statistics only; decisions use the clock). */
  t0: number;
  bytes: number;
  resolve: () => void;
  reject: (e: Error) => void;
}

interface Queued {
  msg: ReplMessage;
  data: Buffer[] | undefined;
}

export interface SyncStreamOptions {
  /** For a planned handover of an async pair only: the replica does not keep it as the pair's setting. */
  temporary?: boolean;
  volume: string;
  fence: SyncFence;
  timeoutMs: number;
  generation: () => number;
  clock: Clock;
  log: Logger;
}

export class SyncStream implements WriteMirror {
  private stateWord: SyncStreamState = 'off';
  private link: Link | null = null;
  /** The set the stream starts behind (holding, streaming). */
  private afterSetNumber = 0;
  /**
   * A set cut while streaming whose number is not durable at the primary yet: its barrier
   * and everything after it wait here (a barrier the replica acted on, for a set a crash
   * then cut again under the same number, would make the replica skip that set).
   */
  private awaitingCommit: number | null = null;
  /** The last sequence number given out, and the first of the current stream. */
  private seq = 0;
  private startSeq = 1;
  /** Waiters in sequence order (barriers have none). */
  private waiters: Waiter[] = [];
  private queue: Queued[] = [];
  private readonly stopTimer: Cancel;
  private closed = false;
  /** Why the stream last stopped (status). */
  lastBreak: { reason: string; atMs: number } | null = null;
  startedAtMs: number | null = null;
  /**
   * Counters (status): items sent by kind, stream starts and breaks; writes refused before
   * they changed anything (fence data), released unacknowledged by the replica (fence
   * never) and failed with EIO after they were sent (fence data).
   */
  readonly counters = { writes: 0, flushes: 0, barriers: 0, starts: 0, breaks: 0, refused: 0, released: 0, failed: 0 };
  /** Replica round trips of acknowledged writes (µs), the last 1024. */
  private readonly latencies: number[] = [];

  constructor(private readonly o: SyncStreamOptions) {
    this.stopTimer = o.clock.every(syncCheckMs, () => this.checkTimeout());
  }

  get state(): SyncStreamState {
    return this.stateWord;
  }
  get temporary(): boolean {
    return this.o.temporary === true;
  }
  get fence(): SyncFence {
    return this.o.fence;
  }
  get afterSet(): number {
    return this.afterSetNumber;
  }
  /** Bytes of writes sent (or queued) and not yet acknowledged. */
  get unackedBytes(): number {
    let n = 0;
    for (const w of this.waiters) n += w.bytes;
    return n;
  }
  /** Items sent (or queued) and not yet acknowledged. */
  get unacknowledged(): number {
    return this.waiters.length;
  }
  /** When the oldest write the replica has not acknowledged was issued (null: none). */
  get oldestUnackedAtMs(): number | null {
    return this.waiters[0]?.atMs ?? null;
  }

  /** Sets from here on travel as barriers in the stream, not as chunks. */
  covers(set: number): boolean {
    return (this.stateWord === 'holding' || this.stateWord === 'streaming') && set > this.afterSetNumber;
  }

  /** The pair caught up on `link`: start at the next cut. */
  requestStart(link: Link): void {
    if (this.closed || this.stateWord !== 'off') return;
    this.link = link;
    this.stateWord = 'starting';
    this.o.log.info('sync stream starting at the next cut');
  }

  /** Set afterSet is on the link: send what was held behind it and stream from now on. */
  release(link: Link, set: number): void {
    if (this.stateWord !== 'holding' || link !== this.link || set !== this.afterSetNumber) return;
    link.send({ t: 'sstart', generation: this.o.generation(), seq: this.startSeq, afterSet: set, fence: this.o.temporary ? 'handover' : this.o.fence, timeoutMs: this.o.timeoutMs });
    this.stateWord = 'streaming';
    this.flushQueue();
    this.startedAtMs = this.o.clock.now();
    this.counters.starts++;
    this.o.log.info({ afterSet: set, held: this.waiters.length }, 'sync stream up: writes wait for the replica');
  }

  /** The replica applied every item up to seq. */
  onAck(seq: number): void {
    const now = performance.now();
    let n = 0;
    while (n < this.waiters.length && this.waiters[n]!.seq <= seq) n++;
    if (n === 0) return;
    const done = this.waiters.splice(0, n);
    for (const w of done) {
      if (this.latencies.length >= 1024) this.latencies.shift();
      this.latencies.push(Math.round((now - w.t0) * 1000));
      w.resolve();
    }
  }

  /** The link went down, or the stream is stopped: back to off (see the top of the file). */
  stop(reason: string): void {
    if (this.stateWord === 'off' && this.waiters.length === 0) return;
    const was = this.stateWord;
    this.stateWord = 'off';
    this.link = null;
    this.queue = [];
    this.awaitingCommit = null;
    const waiting = this.waiters;
    this.waiters = [];
    if (was !== 'starting') {
      this.counters.breaks++;
      this.lastBreak = { reason, atMs: this.o.clock.now() };
    }
    this.startedAtMs = null;
    if (this.o.fence === 'data') {
      const e = systemError('EIO', `volume ${this.o.volume}: sync replica lost (${reason}); fence policy data: write not acknowledged`);
      this.counters.failed += waiting.length;
      for (const w of waiting) w.reject(e);
    } else {
      this.counters.released += waiting.length;
      for (const w of waiting) w.resolve();
    }
    if (was !== 'starting' || waiting.length > 0) this.o.log.warn({ reason, fence: this.o.fence, waiting: waiting.length, was }, 'sync stream down: pair out of sync until it catches up');
  }

  close(reason: string): void {
    this.stop(reason);
    this.closed = true;
    this.stopTimer();
  }

  private checkTimeout(): void {
    const w = this.waiters[0];
    if (w === undefined) return;
    if (this.o.clock.now() - w.atMs <= this.o.timeoutMs) return;
    const reason = `the replica did not acknowledge within ${this.o.timeoutMs} ms`;
    // Closing the link first: nothing queued on it may go out after the writes are released.
    this.link?.close(reason);
    this.stop(reason);
  }

  /** Replica round trip of acknowledged writes: p50 / p99 in µs over the last 1024 (null: none yet). */
  latency(): { p50Us: number; p99Us: number } | null {
    if (this.latencies.length === 0) return null;
    const s = [...this.latencies].sort((a, b) => a - b);
    return { p50Us: s[Math.floor(s.length * 0.5)]!, p99Us: s[Math.min(s.length - 1, Math.floor(s.length * 0.99))]! };
  }

  // ================= WriteMirror =================

  admit(): void {
    if (this.o.fence === 'data' && (this.stateWord === 'off' || this.stateWord === 'starting')) {
      this.counters.refused++;
      throw systemError('EIO', `volume ${this.o.volume}: its sync replica is not in sync and the fence policy is data: write refused`);
    }
  }

  private item(msg: ReplMessage, data: Buffer[] | undefined, wait: boolean, bytes = 0): Promise<void> | undefined {
    const link = this.link;
    assert(link !== null, 'a sync stream that sends has a link');
    let p: Promise<void> | undefined;
    if (wait) {
      p = new Promise<void>((resolve, reject) => this.waiters.push({ seq: (msg as { seq: number }).seq, atMs: this.o.clock.now(), t0: performance.now(), bytes, resolve, reject }));
    }
    if (this.stateWord === 'holding' || this.awaitingCommit !== null) this.queue.push({ msg, data });
    else {
      link.corkForTick();
      link.send(msg, data);
    }
    return p;
  }

  private get sending(): boolean {
    return this.stateWord === 'holding' || this.stateWord === 'streaming';
  }

  write(offset: number, chunks: Buffer[]): Promise<void> | undefined {
    if (!this.sending) return this.o.fence === 'data' ? this.refusedLate() : undefined;
    this.counters.writes++;
    // A write larger than a frame travels as several items; acknowledgements are cumulative,
    // so the last one's is the whole write's.
    const pieces = splitParts(chunks, syncFrameBytesMax);
    let p: Promise<void> | undefined;
    let at = offset;
    for (let i = 0; i < pieces.length; i++) {
      const part = pieces[i]!;
      let length = 0;
      for (const c of part) length += c.length;
      const msg: ReplMessage = { t: 'swrite', generation: this.o.generation(), seq: ++this.seq, offsetBytes: at, lengthBytes: length, zero: false, keepAllocated: false, crc: crc32cParts(part) };
      const last = i === pieces.length - 1;
      const r = this.item(msg, part, last, last ? at + length - offset : 0);
      if (last) p = r;
      at += length;
    }
    return p;
  }

  zero(offset: number, length: number, keepAllocated: boolean): Promise<void> | undefined {
    if (!this.sending) return this.o.fence === 'data' ? this.refusedLate() : undefined;
    this.counters.writes++;
    return this.item({ t: 'swrite', generation: this.o.generation(), seq: ++this.seq, offsetBytes: offset, lengthBytes: length, zero: true, keepAllocated, crc: 0 }, undefined, true, length);
  }

  flush(): Promise<void> | undefined {
    if (!this.sending) {
      // Writes the replica applied may not be durable there: fence data cannot promise it.
      if (this.o.fence !== 'data') return undefined;
      this.counters.refused++;
      return Promise.reject(systemError('EIO', `volume ${this.o.volume}: its sync replica is not in sync and the fence policy is data: flush not acknowledged`));
    }
    this.counters.flushes++;
    return this.item({ t: 'sflush', generation: this.o.generation(), seq: ++this.seq }, undefined, true);
  }

  cut(setNumber: number): void {
    if (this.stateWord === 'starting') {
      this.stateWord = 'holding';
      this.afterSetNumber = setNumber;
      this.startSeq = this.seq + 1;
      return;
    }
    if (!this.sending) return;
    this.counters.barriers++;
    this.awaitingCommit = setNumber;
    this.item({ t: 'sbarrier', generation: this.o.generation(), seq: ++this.seq, set: setNumber, createdAtMs: this.o.clock.now() }, undefined, false);
  }

  committed(setNumber: number): void {
    if (this.awaitingCommit !== setNumber) return;
    this.awaitingCommit = null;
    this.flushQueue();
  }

  aborted(setNumber: number): void {
    if (this.awaitingCommit !== setNumber) return;
    this.awaitingCommit = null;
    // The barrier must not reach the replica (its number is cut again); its place in the
    // sequence stays, as a flush (harmless), so the replica sees no gap.
    this.queue = this.queue.map((q) => (q.msg.t === 'sbarrier' && q.msg.set === setNumber ? { msg: { t: 'sflush', generation: q.msg.generation, seq: q.msg.seq }, data: undefined } : q));
    this.counters.barriers--;
    this.flushQueue();
  }

  /** Sends what waited, once nothing holds it (streaming, no set waiting for its commit). */
  private flushQueue(): void {
    if (this.stateWord !== 'streaming' || this.awaitingCommit !== null || this.link === null) return;
    if (this.queue.length > 0) this.link.corkForTick();
    for (const q of this.queue) this.link.send(q.msg, q.data);
    this.queue = [];
  }

  /** A write admitted while in sync whose issue came after the stream stopped (fence data). */
  private refusedLate(): Promise<void> {
    this.counters.refused++;
    return Promise.reject(systemError('EIO', `volume ${this.o.volume}: its sync replica went out of sync while the write waited; fence policy data: write not acknowledged`));
  }
}
