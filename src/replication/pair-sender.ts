// Why: one pair's connection to its replica: connect, say hello, copy the base snapshot
// if the initial copy is not done, then send the sets of the outbound log in order,
// a window of them in flight, resending what the replica refuses; reconnect with
// back-off after any failure and resume from what the replica says it holds (nothing is
// held only in memory). Its state is what `status` shows for the pair.

import net from 'node:net';
import { crc32c } from '@node-rs/crc32';
import type { Logger } from '../util/log.js';
import { DeltavolError } from '../util/errors.js';
import { Link } from './link.js';
import { trailerChecksum, type Frame, type ReplMessage } from './wire.js';
import type { PairRecord, PairState, VolumeReplicator } from './replicator.js';
import * as L from './limits.js';

type Welcome = Extract<ReplMessage, { t: 'welcome' }>;

/** Refusal codes a reconnect cannot cure. */
const PERMANENT_REFUSALS = new Set(['VOLUME_EXISTS', 'GEOMETRY', 'STALE_GENERATION', 'VOLUME_NOT_FOUND']);

/** A chunk's 'nak' with this chunk number asks for the whole set again. */
export const WHOLE_SET = 0xffffffff;

interface Inflight {
  set: number;
  bytes: number;
  sentAtMs: number;
}

export class PairSender {
  private link: Link | null = null;
  private stopped = false;
  private loop: Promise<void> | null = null;
  private wakeUp: (() => void) | null = null;
  private wakeBackoff: (() => void) | null = null;
  private connecting: net.Socket | null = null;
  private failures = 0;
  private suspending = false;
  private splitAcked: (() => void) | null = null;
  /** This session sent initDone: the next ack ends the initial copy. */
  private initDoneSent = false;
  /** Sets sent on this connection and not yet acknowledged. */
  private inflight: Inflight[] = [];
  private recoverUntilSet = 0;
  private sessionStartMs = 0;
  private sessionBytes = 0;
  private readonly samples: [number, number][] = [];
  private totalBytes = 0;
  lastError: string | null = null;
  lastErrorAtMs: number | null = null;
  initialCopyBytes = 0;
  private initialCopyStartMs = 0;

  constructor(
    private readonly r: VolumeReplicator,
    readonly pair: PairRecord,
    private readonly log: Logger,
  ) {}

  get connected(): boolean {
    return this.link !== null && !this.link.closed && this.sessionStartMs > 0;
  }

  get state(): PairState {
    const p = this.pair;
    if (p.operatorSuspended) return this.suspending ? 'suspending' : 'suspend';
    if (!this.connected) return this.failures >= p.retriesBeforeSuspend ? 'failure-suspend' : p.initialCopy.done ? 'duplex-pending' : 'initial-copy';
    if (!p.initialCopy.done) return 'initial-copy';
    if (p.detached || p.catchUp || this.r.pendingOf(p.id).count() > 0 || p.ackedSet < this.recoverUntilSet) return 'duplex-pending';
    return 'duplex';
  }

  start(): void {
    this.loop = this.run();
  }

  /** Something to send (a set was cut, an ack moved the window): ends a wait for work only. */
  wake(): void {
    const w = this.wakeUp;
    this.wakeUp = null;
    w?.();
  }

  /** Ends any wait, the reconnect back-off included (stop, resume). */
  private wakeAll(): void {
    this.wake();
    const b = this.wakeBackoff;
    this.wakeBackoff = null;
    b?.();
  }

  private sleep(ms: number, backoff = false): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(t);
        if (backoff) this.wakeBackoff = null;
        else this.wakeUp = null;
        resolve();
      };
      const t = setTimeout(done, ms);
      if (backoff) this.wakeBackoff = done;
      else this.wakeUp = done;
    });
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.link?.close('pair stopped');
    this.connecting?.destroy(new Error('pair stopped'));
    this.wakeAll();
    await this.loop;
  }

  /** Operator split: let sent sets be acknowledged (≤ 10 s), then close the link. */
  async suspend(): Promise<void> {
    this.suspending = true;
    const deadline = Date.now() + 10_000;
    while (this.connected && this.inflight.length > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    const link = this.link;
    if (link && this.connected) {
      // Tell the replica (seed 003): it becomes writable and records its own writes.
      const acked = new Promise<void>((r) => (this.splitAcked = r));
      link.send({ t: 'split', generation: this.r.generation });
      await Promise.race([acked, new Promise((r) => setTimeout(r, 5000))]);
      this.splitAcked = null;
    }
    this.suspending = false;
    this.link?.close('pair suspended by the operator');
    this.wakeAll();
    this.log.info({ ackedSet: this.pair.ackedSet }, 'pair suspended');
  }

  resume(): void {
    this.failures = 0;
    this.wakeAll();
    this.log.info('pair resumed');
  }

  // ================= the loop =================

  private async run(): Promise<void> {
    let delay = L.reconnectDelayMsMin;
    while (!this.stopped) {
      if (this.pair.operatorSuspended) {
        await this.sleep(1000, true);
        continue;
      }
      try {
        await this.session();
        delay = L.reconnectDelayMsMin;
      } catch (e) {
        this.failures++;
        // A refusal that retrying cannot fix (the name is taken, sizes differ, a newer
        // generation): straight to failure-suspend so the operator sees it now. Retries go
        // on at the slowest pace, in case the peer is fixed.
        const code = (e as DeltavolError).details?.refuseCode;
        if (typeof code === 'string' && PERMANENT_REFUSALS.has(code)) {
          this.failures = Math.max(this.failures, this.pair.retriesBeforeSuspend);
          delay = L.reconnectDelayMsMax;
        }
        this.lastError = (e as Error).message;
        this.lastErrorAtMs = Date.now();
        const state = this.failures >= this.pair.retriesBeforeSuspend ? 'failure-suspend' : 'retrying';
        if (this.failures === this.pair.retriesBeforeSuspend) this.log.warn({ err: this.lastError, failures: this.failures }, 'pair state failure-suspend');
        else this.log.info({ err: this.lastError, failures: this.failures, state }, 'replication link failed');
      } finally {
        this.link?.close('session ended');
        this.link = null;
        this.sessionStartMs = 0;
        this.inflight = [];
      }
      if (this.stopped) break;
      await this.sleep(delay, true);
      delay = Math.min(delay * 2, L.reconnectDelayMsMax);
    }
  }

  private connect(): Promise<net.Socket> {
    const p = this.pair;
    return new Promise((resolve, reject) => {
      const sock = net.connect({ host: p.peerHost, port: p.peerPort });
      this.connecting = sock;
      const t = setTimeout(() => {
        sock.destroy();
        reject(new DeltavolError('DAEMON_UNREACHABLE', `connect to ${p.peerHost}:${p.peerPort} timed out`));
      }, L.replicationConnectTimeoutMs);
      sock.once('connect', () => {
        clearTimeout(t);
        this.connecting = null;
        resolve(sock);
      });
      sock.once('error', (e) => {
        clearTimeout(t);
        this.connecting = null;
        reject(new DeltavolError('DAEMON_UNREACHABLE', `cannot reach ${p.peerHost}:${p.peerPort}: ${e.message}`));
      });
    });
  }

  /** One connection, until it fails or the pair is stopped/suspended. Throws on failure. */
  private async session(): Promise<void> {
    const p = this.pair;
    const v = this.r.volume;
    const sock = await this.connect();
    let welcome: ((w: Welcome) => void) | null = null;
    let refused: ((e: Error) => void) | null = null;
    const link = new Link(sock, (f) => this.onFrame(f, (w) => welcome?.(w), (e) => refused?.(e)));
    this.link = link;
    const ended = new Promise<never>((_, reject) => link.onClose((reason) => reject(new DeltavolError('IO', reason))));
    ended.catch(() => undefined);
    const welcomed = new Promise<Welcome>((resolve, reject) => {
      welcome = resolve;
      refused = reject;
    });
    link.send({
      t: 'hello',
      protocol: 1,
      pairId: p.id,
      primaryVolume: v.name,
      replicaVolume: p.remoteVolume,
      generation: this.r.generation,
      sizeBytes: v.sizeBytes,
      blockBytes: v.blockBytes,
      create: true,
      description: `replica of ${v.name}`,
    });
    const w = await Promise.race([welcomed, ended]);
    if (w.generation > this.r.generation) {
      throw new DeltavolError('EINVAL_ARGUMENT', `replica has generation ${w.generation}, newer than ours (${this.r.generation}): this primary is stale`);
    }
    this.initDoneSent = false;
    if (!w.initialCopy.done && p.initialCopy.done) await this.r.restartInitialCopy(p);
    // The replica is the truth about what it holds (a copy it finished counts as done even
    // if its ack was lost in a crash of this side).
    if (w.initialCopy.done && !p.initialCopy.done) await this.r.initialCopyDone(p);
    if (w.initialCopy.done) {
      if (w.ackedSet < p.ackedSet && !p.detached) {
        const needed = p.catchUp ? p.catchUp.set : w.ackedSet + 1;
        if (!this.r.log.get(needed) && !(p.catchUp && p.catchUp.from === w.ackedSet)) {
          throw new DeltavolError('METADATA_CORRUPT', `replica holds set ${w.ackedSet} but the primary recorded ${p.ackedSet} and no longer has the sets between: remove and add the replica again`);
        }
        if (!p.catchUp) p.ackedSet = w.ackedSet;
      }
      this.r.onAck(p, w.ackedSet, w.playedSet);
    }
    this.sessionStartMs = Date.now();
    this.sessionBytes = 0;
    this.failures = 0;
    this.recoverUntilSet = this.r.log.lastSet;
    this.log.info({ ackedSet: w.ackedSet, playedSet: w.playedSet, initialCopy: w.initialCopy, splitWriteRuns: w.splitWrites.length }, 'replication link up');
    if (w.splitWrites.length > 0) this.r.addSplitWrites(p, w.splitWrites);
    if (p.detached) this.r.poke();
    const work = (async () => {
      if (!p.initialCopy.done) await this.initialCopy(link, w.initialCopy.offsetBytes);
      await this.ship(link);
    })();
    await Promise.race([work, ended]);
  }

  private onFrame(f: Frame, welcome: (w: Welcome) => void, refused: (e: Error) => void): void {
    const m = f.msg;
    const p = this.pair;
    switch (m.t) {
      case 'welcome':
        welcome(m);
        return;
      case 'refuse':
        refused(new DeltavolError('EINVAL_ARGUMENT', `replica refused: ${m.code}: ${m.message}`, { refuseCode: m.code }));
        this.link?.close(`refused: ${m.code}`);
        return;
      case 'ack': {
        this.splitAcked?.();
        const before = p.ackedSet;
        this.r.onAck(p, m.set, m.playedSet);
        this.inflight = this.inflight.filter((i) => i.set > p.ackedSet);
        // Only the ack that answers initDone ends the initial copy (a split is acked too).
        if (!p.initialCopy.done && this.initDoneSent && m.set >= p.initialCopy.baseSet) void this.r.initialCopyDone(p);
        if (p.ackedSet !== before) this.wake();
        return;
      }
      case 'initAck':
        return;
      case 'nak': {
        this.log.warn({ set: m.set, chunk: m.chunk, reason: m.reason }, 'replica refused a chunk: resending');
        const s = this.r.log.get(m.set);
        const link = this.link;
        if (!s || !link) return;
        const chunks = m.chunk === WHOLE_SET ? s.chunks : s.chunks[m.chunk] ? [s.chunks[m.chunk]!] : [];
        for (const c of chunks) this.sendBytes(link, this.r.log.readChunk(c));
        if (m.chunk === WHOLE_SET) {
          const i = this.inflight.find((x) => x.set === m.set);
          if (i) this.sendTrailer(link, m.set, this.chainFrom(m.set));
        }
        return;
      }
      default:
        this.link?.close(`unexpected message ${m.t} from replica`);
    }
  }

  private chainFrom(set: number): number {
    const p = this.pair;
    return p.catchUp && p.catchUp.set === set ? p.catchUp.from : set - 1;
  }

  private sendBytes(link: Link, frame: Buffer[]): void {
    link.sendEncoded(frame);
    for (const b of frame) this.count(b.length);
  }

  private count(n: number): void {
    this.sessionBytes += n;
    this.totalBytes += n;
  }

  // ================= initial copy =================

  private async initialCopy(link: Link, fromOffset: number): Promise<void> {
    const p = this.pair;
    const v = this.r.volume;
    const base = p.initialCopy.baseSnapshot;
    if (base === null) throw new DeltavolError('METADATA_CORRUPT', 'initial copy not done but its base snapshot is gone: remove and add the replica again');
    const bs = v.blockBytes;
    const valid = v.snapshotValidBlocks(base);
    this.initialCopyStartMs = Date.now();
    this.initialCopyBytes = 0;
    const runBytesMax = Math.max(bs, Math.floor(L.initRunBytesMax / bs) * bs);
    let lastLog = Date.now();
    for (const [start, count] of valid.runs()) {
      let at = Math.max(start * bs, fromOffset);
      const end = Math.min((start + count) * bs, v.sizeBytes);
      if (start * bs < fromOffset) this.initialCopyBytes += Math.min(end, fromOffset) - start * bs;
      while (at < end) {
        if (link.closed || this.stopped || p.operatorSuspended) return;
        const n = Math.min(runBytesMax, end - at);
        const data = Buffer.allocUnsafe(n);
        v.readSnapshot(base, at, n, data);
        link.send({ t: 'init', generation: this.r.generation, offsetBytes: at, lengthBytes: n, zero: false, crc: crc32c(data) }, [data]);
        this.count(n);
        this.initialCopyBytes += n;
        at += n;
        await link.drainBelow(L.socketQueueBytesMax);
        if (Date.now() - lastLog > 10_000) {
          lastLog = Date.now();
          this.log.info({ copiedBytes: this.initialCopyBytes, validBytes: p.initialCopy.validBytes }, 'initial copy progress');
        }
      }
    }
    link.send({ t: 'initDone', generation: this.r.generation, baseSet: p.initialCopy.baseSet });
    this.initDoneSent = true;
  }

  // ================= delta sets =================

  private async ship(link: Link): Promise<void> {
    const p = this.pair;
    let sentUpTo = p.ackedSet;
    if (p.catchUp && p.ackedSet < p.catchUp.set) sentUpTo = p.catchUp.from;
    while (!link.closed && !this.stopped) {
      // A split under way: send nothing new; suspend() tells the replica, then closes the link.
      if (p.operatorSuspended) {
        await this.sleep(100);
        continue;
      }
      // Acks may have moved the chain past what this session sent (a resumed session).
      if (p.ackedSet > sentUpTo) sentUpTo = p.ackedSet;
      const next = this.r.nextSetFor(p, sentUpTo);
      let inflightBytes = 0;
      for (const i of this.inflight) inflightBytes += i.bytes;
      if (next === null || inflightBytes >= L.sendWindowBytes) {
        await this.sleep(500);
        continue;
      }
      const s = this.r.log.get(next.set)!;
      this.inflight.push({ set: s.set, bytes: s.dataBytes, sentAtMs: Date.now() });
      for (const c of s.chunks) {
        if (link.closed) return;
        this.sendBytes(link, this.r.log.readChunk(c));
        await link.drainBelow(L.socketQueueBytesMax);
      }
      this.sendTrailer(link, s.set, next.from);
      sentUpTo = s.set;
    }
  }

  private sendTrailer(link: Link, set: number, from: number): void {
    const s = this.r.log.get(set)!;
    const t = {
      generation: s.generation,
      set: s.set,
      chunks: s.chunks.length,
      blocks: s.blocks,
      dataBytes: s.dataBytes,
      dataCrc: s.dataCrc,
      catchUpFrom: from,
      createdAtMs: s.createdAtMs,
      partial: s.partial,
    };
    link.send({ t: 'trailer', ...t, trailerCrc: trailerChecksum(t) });
  }

  // ================= status =================

  /** Bytes per second over the last few seconds, and since the link came up. */
  rates(): { currentBytesPerSec: number; averageBytesPerSec: number } {
    const now = Date.now();
    this.samples.push([now, this.totalBytes]);
    while (this.samples.length > 2 && now - this.samples[0]![0] > 5000) this.samples.shift();
    const [t0, b0] = this.samples[0]!;
    const current = now - t0 > 0 ? ((this.totalBytes - b0) * 1000) / (now - t0) : 0;
    const average = this.sessionStartMs > 0 && now > this.sessionStartMs ? (this.sessionBytes * 1000) / (now - this.sessionStartMs) : 0;
    return { currentBytesPerSec: Math.round(current), averageBytesPerSec: Math.round(average) };
  }

  initialCopyProgress(): { doneBytes: number; totalBytes: number; bytesPerSec: number; etaSeconds: number | null } | null {
    const p = this.pair;
    if (p.initialCopy.done) return null;
    const elapsed = (Date.now() - this.initialCopyStartMs) / 1000;
    const rate = this.initialCopyStartMs > 0 && elapsed > 0 ? this.initialCopyBytes / elapsed : 0;
    const left = Math.max(0, p.initialCopy.validBytes - this.initialCopyBytes);
    return {
      doneBytes: this.initialCopyBytes,
      totalBytes: p.initialCopy.validBytes,
      bytesPerSec: Math.round(rate),
      etaSeconds: rate > 0 ? Math.round(left / rate) : null,
    };
  }

  /** Bytes this pair has put on the wire since the daemon started (all sessions). */
  get bytesSent(): number {
    return this.totalBytes;
  }

  get inflightSets(): readonly Inflight[] {
    return this.inflight;
  }
}
