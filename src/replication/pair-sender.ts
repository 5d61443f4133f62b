// Why: one pair's connection to its replica: connect, say hello, copy the base snapshot
// if the initial copy is not done (all of it, or a resync's differential), then send the
// sets of the outbound log in order, a window of them in flight, resending what the
// replica refuses; reconnect with back-off after any failure and resume from what the
// replica says it holds (nothing is held only in memory). Its state is what `status`
// shows for the pair. It knows the replicator only through PairHost, and the network and
// time only through the platform, so the simulator runs it as it is.

import { crc32c } from '@node-rs/crc32';
import type { Logger } from '../util/log.js';
import { DeltavolError, type ErrorCode } from '../util/errors.js';
import type { PagedBitmap } from '../bitmap/paged-bitmap.js';
import type { PairRecord } from '../recovery/role-record.js';
import { Link } from './link.js';
import { chunkDataBytesMax, type ChunkPos, type OutboundLog } from './outbound-log.js';
import type { PrimaryPort } from './ports.js';
import type { SyncStream } from './sync-stream.js';
import type { ReplicationPlatform } from './platform.js';
import { PROTOCOL_VERSION, trailerChecksum, WHOLE_SET, type Frame, type ReplMessage, type Runs } from './wire.js';
import * as L from './limits.js';
import { decodeHops, encodeHops, type ChainHop } from './chain.js';

type Welcome = Extract<ReplMessage, { t: 'welcome' }>;

/**
 * The states of a pair, as status shows them. One word each; a pair that is not
 * connected says so: 'disconnected' within its retry budget, 'failure-suspend' past it.
 */
export type PairState = 'initial-copy' | 'resyncing' | 'duplex' | 'duplex-pending' | 'disconnected' | 'suspending' | 'suspend' | 'failure-suspend' | 'fenced';

/** Refusal codes a reconnect cannot cure. */
const PERMANENT_REFUSALS = new Set(['VOLUME_EXISTS', 'GEOMETRY', 'STALE_GENERATION', 'VOLUME_NOT_FOUND', 'FAILED_OVER', 'ROLE_CONFLICT']);
/** Refusal codes the wire carries that are also local error codes (so the CLI can act on them). */
const REFUSAL_ERROR: Record<string, ErrorCode> = { GEOMETRY: 'GEOMETRY', STALE_GENERATION: 'STALE_GENERATION', FAILED_OVER: 'STALE_GENERATION', VOLUME_EXISTS: 'VOLUME_EXISTS', VOLUME_NOT_FOUND: 'VOLUME_NOT_FOUND', ROLE_CONFLICT: 'ROLE_CONFLICT' };

/** What a sender needs from its volume's replicator. */
export interface PairHost {
  readonly volume: PrimaryPort;
  readonly outbound: OutboundLog;
  readonly generation: number;
  /** False once the volume must not ship (fenced, handed over, closing): the sender stops. */
  readonly shipping: boolean;
  pendingOf(id: string): PagedBitmap;
  /** Makes the pair records durable (after a change in place). */
  saveState(): void;
  onAck(p: PairRecord, set: number, played: number): void;
  restartInitialCopy(p: PairRecord): Promise<void>;
  initialCopyDone(p: PairRecord): Promise<void>;
  addSplitWrites(p: PairRecord, runs: Runs): void;
  nextSetFor(p: PairRecord, after: number): { set: number; from: number } | null;
  /** Set n is no point in time for p's replica (it is owed older blocks a later catch-up set carries). */
  owesBlocksBefore(p: PairRecord, n: number): boolean;
  poke(): void;
  /** Blocks a differential copy moves (null: the whole base). */
  copyBlocks(p: PairRecord): PagedBitmap | null;
  /** When the oldest write the replica does not hold was made (null: none). */
  atRiskSinceMs(p: PairRecord): number | null;
  /** Where this node's replication port listens, for the peer (host '' = as the peer sees us). */
  returnAddress(): { host: string; port: number };
  /** The peer said it holds a newer generation of this volume: this side was replaced. */
  onNewerGeneration(p: PairRecord, generation: number, code: string, message: string): void;
  /** A recovery message from the replica on this pair's link (takeover, handover commit or abort). */
  onRecoveryMessage(p: PairRecord, m: ReplMessage, link: Link): void;
  /** The link of this pair went down (a handover in progress learns of it). */
  onLinkDown(p: PairRecord): void;
  /** The replica welcomed this primary: the pair's session is up. */
  onSessionUp(p: PairRecord): void;
  /** A cascade: what is upstream of this volume (it is a replica itself), for its replicas' status; [] when nothing. */
  upstreamChain(): ChainHop[];
  /** A cascade: the replica reported its own replicas (where they are: they may be shipped to directly later). */
  onDownstreamReport(p: PairRecord, hops: readonly ChainHop[]): void;
  /** The pair's sync stream (mode sync, or a planned handover's), else null. */
  syncStreamOf(p: PairRecord): SyncStream | null;
  /** Cut a set now unless one is being built (a backlog before a stream starts). */
  cutSoon(reason: string): void;
  /** A set is being cut and built now (it is not in the outbound log yet). */
  readonly cutting: boolean;
}

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
  private connecting: AbortController | null = null;
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
  /** The error code of the last failure (a refusal's code, or PEER_UNREACHABLE). */
  lastErrorCode: string | null = null;
  lastErrorAtMs: number | null = null;
  initialCopyBytes = 0;
  private initialCopyStartMs = 0;
  /** In the set-shipping phase of a session (see unsentBytes). */
  private sending = false;
  /** The last set this session put on the wire whole, and chunks sent of the next one. */
  private sentSet = 0;
  private sentChunks = 0;

  constructor(
    private readonly r: PairHost,
    readonly pair: PairRecord,
    private readonly log: Logger,
    private readonly platform: ReplicationPlatform,
  ) {}

  private now(): number {
    return this.platform.clock.now();
  }

  get connected(): boolean {
    return this.link !== null && !this.link.closed && this.sessionStartMs > 0;
  }

  /** The link of the current session (recovery sends on it). */
  get currentLink(): Link | null {
    return this.connected ? this.link : null;
  }

  get state(): PairState {
    const p = this.pair;
    if (!this.r.shipping) return 'fenced';
    if (p.operatorSuspended) return this.suspending ? 'suspending' : 'suspend';
    if (!this.connected) return this.failures >= p.retriesBeforeSuspend ? 'failure-suspend' : 'disconnected';
    if (!p.initialCopy.done) return p.initialCopy.kind === 'full' ? 'initial-copy' : 'resyncing';
    // Streaming: its pending blocks are sets the stream delivers (sync-stream.ts).
    if (this.r.syncStreamOf(p)?.state === 'streaming') return 'duplex';
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
        cancel();
        if (backoff) this.wakeBackoff = null;
        else this.wakeUp = null;
        resolve();
      };
      const cancel = this.platform.clock.after(ms, done);
      if (backoff) this.wakeBackoff = done;
      else this.wakeUp = done;
    });
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.link?.close('pair stopped');
    this.connecting?.abort();
    this.wakeAll();
    await this.loop;
  }

  /** Operator split: let sent sets be acknowledged (≤ 10 s), then close the link. */
  async suspend(): Promise<void> {
    this.suspending = true;
    const deadline = this.now() + 10_000;
    while (this.connected && this.inflight.length > 0 && this.now() < deadline) await this.sleep(50);
    const link = this.link;
    if (link && this.connected) {
      // Tell the replica (seed 003): it becomes writable and records its own writes.
      const acked = new Promise<void>((r) => (this.splitAcked = r));
      link.send({ t: 'split', generation: this.r.generation });
      await Promise.race([acked, new Promise((r) => this.platform.clock.after(5000, () => r(undefined)))]);
      this.splitAcked = null;
    }
    this.suspending = false;
    this.link?.close('pair suspended by the operator');
    this.wakeAll();
    this.log.info({ ackedSet: this.pair.ackedSet }, 'pair suspended');
  }

  /** Ends the session (if any) and dials again at once: the next hello carries what changed (a new generation). */
  renewSession(reason: string): void {
    this.link?.close(reason);
    this.wakeAll();
  }

  /** What the replica reported downstream of it (a cascade), for status. */
  downstream: ChainHop[] = [];

  resume(): void {
    this.failures = 0;
    this.wakeAll();
    this.log.info('pair resumed');
  }

  // ================= the loop =================

  private async run(): Promise<void> {
    let delay = L.reconnectDelayMsMin;
    while (!this.stopped && this.r.shipping) {
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
        this.lastErrorCode = typeof code === 'string' ? code : ((e as DeltavolError).code ?? 'IO');
        this.lastErrorAtMs = this.now();
        const state = this.failures >= this.pair.retriesBeforeSuspend ? 'failure-suspend' : 'disconnected';
        if (this.failures === this.pair.retriesBeforeSuspend) this.log.warn({ err: this.lastError, code: this.lastErrorCode, failures: this.failures }, 'pair state failure-suspend');
        else this.log.info({ err: this.lastError, failures: this.failures, state }, 'replication link failed');
      } finally {
        const had = this.link !== null && this.sessionStartMs > 0;
        // The stream goes down with the link before anything else (writes waiting are released or failed).
        this.link?.close('session ended');
        this.r.syncStreamOf(this.pair)?.stop(`link down: ${this.link?.reason ?? this.lastError ?? 'session ended'}`);
        this.link = null;
        this.sessionStartMs = 0;
        this.inflight = [];
        this.sending = false;
        if (had) this.r.onLinkDown(this.pair);
      }
      if (this.stopped || !this.r.shipping) break;
      await this.sleep(delay, true);
      delay = Math.min(delay * 2, L.reconnectDelayMsMax);
    }
  }

  /** One connection, until it fails or the pair is stopped/suspended. Throws on failure. */
  private async session(): Promise<void> {
    const p = this.pair;
    const v = this.r.volume;
    this.connecting = new AbortController();
    let conn;
    try {
      conn = await this.platform.transport.connect(p.peerHost, p.peerPort, L.replicationConnectTimeoutMs, this.connecting.signal);
    } catch (e) {
      throw new DeltavolError('PEER_UNREACHABLE', (e as Error).message);
    } finally {
      this.connecting = null;
    }
    if (this.stopped) {
      conn.destroy();
      return;
    }
    // Over TLS the replica must be the identity bound to the pair (a node that took over
    // its address, or holds another key of the group, gets nothing and can fence nothing).
    const bound = p.peerIdentity ?? null;
    if (conn.peerIdentity !== null && bound !== null && conn.peerIdentity !== bound) {
      conn.destroy();
      throw new DeltavolError('PEER_REFUSED', `${p.peerHost}:${p.peerPort} is ${conn.peerIdentity}, but this pair is bound to ${bound}: not replicating to it`);
    }
    let welcome: ((w: Welcome) => void) | null = null;
    let refused: ((e: Error) => void) | null = null;
    const link = new Link(conn, this.platform.clock, (f) => this.onFrame(f, (w) => welcome?.(w), (e) => refused?.(e)));
    this.link = link;
    const ended = new Promise<never>((_, reject) => link.onClose((reason) => reject(new DeltavolError('PEER_UNREACHABLE', reason))));
    ended.catch(() => undefined);
    const welcomed = new Promise<Welcome>((resolve, reject) => {
      welcome = resolve;
      refused = reject;
    });
    const back = this.r.returnAddress();
    link.send({
      t: 'hello',
      protocol: PROTOCOL_VERSION,
      pairId: p.id,
      primaryVolume: v.name,
      replicaVolume: p.remoteVolume,
      generation: this.r.generation,
      sizeBytes: v.sizeBytes,
      blockBytes: v.blockBytes,
      create: true,
      description: `replica of ${v.name}`,
      returnHost: back.host,
      returnPort: back.port,
    });
    const w = await Promise.race([welcomed, ended]);
    if (conn.peerIdentity !== null && bound === null) {
      p.peerIdentity = conn.peerIdentity;
      this.r.saveState();
      this.log.info({ peer: conn.peerIdentity }, 'pair bound to the replica\'s identity');
    }
    if (w.generation > this.r.generation) {
      const message = `the replica has generation ${w.generation}, newer than this volume's ${this.r.generation}: this primary was replaced`;
      this.r.onNewerGeneration(p, w.generation, 'STALE_GENERATION', message);
      throw new DeltavolError('STALE_GENERATION', message, { refuseCode: 'STALE_GENERATION' });
    }
    this.initDoneSent = false;
    if (!w.initialCopy.done && p.initialCopy.done) await this.r.restartInitialCopy(p);
    // The replica is the truth about what it holds (a copy it finished counts as done even
    // if its ack was lost in a crash of this side).
    if (w.initialCopy.done && !p.initialCopy.done) await this.r.initialCopyDone(p);
    if (w.initialCopy.done) {
      if (w.ackedSet < p.ackedSet && !p.detached) {
        const needed = p.catchUp ? p.catchUp.set : w.ackedSet + 1;
        if (!this.r.outbound.get(needed) && !(p.catchUp && p.catchUp.from === w.ackedSet)) {
          throw new DeltavolError('METADATA_CORRUPT', `replica holds set ${w.ackedSet} but the primary recorded ${p.ackedSet} and no longer has the sets between: remove and add the replica again`);
        }
        if (!p.catchUp) p.ackedSet = w.ackedSet;
      }
      this.r.onAck(p, w.ackedSet, w.playedSet);
    }
    this.sessionStartMs = this.now();
    this.sessionBytes = 0;
    this.failures = 0;
    this.lastError = null;
    this.lastErrorCode = null;
    this.recoverUntilSet = this.r.outbound.lastSet;
    this.log.info({ ackedSet: w.ackedSet, playedSet: w.playedSet, initialCopy: w.initialCopy, splitWriteRuns: w.splitWrites.length }, 'replication link up');
    this.r.onSessionUp(p);
    if (w.splitWrites.length > 0) this.r.addSplitWrites(p, w.splitWrites);
    if (p.detached) this.r.poke();
    this.sendProgress(link);
    const stopProgress = this.platform.clock.every(L.replicationHeartbeatMs, () => this.sendProgress(link));
    try {
      const work = (async () => {
        if (!p.initialCopy.done) await this.initialCopy(link, w.initialCopy.offsetBytes);
        await this.ship(link);
      })();
      await Promise.race([work, ended]);
    } finally {
      stopProgress();
    }
  }

  /** What the replica should know to report a failover's loss if this node vanishes. */
  private sendProgress(link: Link): void {
    if (link.closed) return;
    const up = this.r.upstreamChain();
    if (up.length > 0) link.send({ t: 'chainUp', hops: encodeHops(up) });
    const since = this.r.atRiskSinceMs(this.pair);
    link.send({
      t: 'progress',
      generation: this.r.generation,
      lastSet: this.r.outbound.lastSet,
      atRiskSinceMs: since ?? 0,
      bytesDifferent: this.bytesDifferent(),
      atMs: this.now(),
    });
  }

  /** Blocks not yet on the replica: changed since the cut, pending, and in unacked sets. */
  bytesDifferent(): number {
    const p = this.pair;
    // Streaming: the replica has every write but those waiting for its acknowledgement.
    const st = this.r.syncStreamOf(p);
    if (st?.state === 'streaming') return st.unackedBytes;
    const bs = this.r.volume.blockBytes;
    let outstanding = 0;
    for (const s of this.r.outbound.sets) {
      if (s.set <= p.ackedSet) continue;
      if (p.catchUp && s.set < p.catchUp.set && s.set > p.catchUp.from) continue;
      outstanding += s.dataBytes;
    }
    return (this.r.volume.unshippedBlockCount() + this.r.pendingOf(p.id).count()) * bs + outstanding;
  }

  private onFrame(f: Frame, welcome: (w: Welcome) => void, refused: (e: Error) => void): void {
    const m = f.msg;
    const p = this.pair;
    switch (m.t) {
      case 'welcome':
        welcome(m);
        return;
      case 'refuse': {
        if (m.generation > this.r.generation && (m.code === 'STALE_GENERATION' || m.code === 'FAILED_OVER' || m.code === 'HANDED_OVER')) {
          this.r.onNewerGeneration(p, m.generation, m.code, m.message);
        }
        const code = REFUSAL_ERROR[m.code] ?? 'PEER_REFUSED';
        refused(new DeltavolError(code, `replica refused: ${m.code}: ${m.message}`, { refuseCode: m.code, generation: m.generation }));
        this.link?.close(`refused: ${m.code}`);
        return;
      }
      case 'chainDown': {
        // What is downstream of the replica (a cascade), for status; a malformed report is dropped.
        const hops = decodeHops(m.hops);
        if (hops) {
          this.downstream = hops;
          this.r.onDownstreamReport(p, hops);
        }
        return;
      }
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
      case 'sack':
        this.r.syncStreamOf(p)?.onAck(m.seq);
        return;
      case 'nak': {
        this.log.warn({ set: m.set, chunk: m.chunk, reason: m.reason }, 'replica refused a chunk: resending');
        const s = this.r.outbound.get(m.set);
        const link = this.link;
        if (!s || !link) return;
        const chunks = m.chunk === WHOLE_SET ? s.chunks : s.chunks[m.chunk] ? [s.chunks[m.chunk]!] : [];
        for (const c of chunks) this.sendChunk(link, c);
        if (m.chunk === WHOLE_SET) {
          const i = this.inflight.find((x) => x.set === m.set);
          if (i) this.sendTrailer(link, m.set, this.chainFrom(m.set));
        }
        return;
      }
      case 'takeover':
      case 'handoverCommit':
      case 'handoverAbort':
        if (this.link && this.connected) this.r.onRecoveryMessage(p, m, this.link);
        return;
      default:
        this.link?.close(`unexpected message ${m.t} from replica`);
    }
  }

  private chainFrom(set: number): number {
    const p = this.pair;
    return p.catchUp && p.catchUp.set === set ? p.catchUp.from : set - 1;
  }

  /**
   * A chunk record from the outbound log, queued without a copy: from the log's file when
   * it is no longer cached (catching up after an outage: no read into memory), else the
   * log lends its buffer.
   */
  private sendChunk(link: Link, c: ChunkPos): void {
    const file = this.r.outbound.chunkFile(c);
    if (file !== null && link.sendFileFrame(file)) {
      this.r.outbound.chunkFileSends++;
      this.count(c.bytes);
      return;
    }
    const lent = this.r.outbound.lendChunk(c);
    link.sendEncoded(lent.parts, lent.done);
    for (const b of lent.parts) this.count(b.length);
  }

  private count(n: number): void {
    this.sessionBytes += n;
    this.totalBytes += n;
  }

  // ================= initial copy =================

  /**
   * Copies the base snapshot from `fromOffset` on, in block order (the replica records
   * durable progress as an offset). A full copy sends the valid blocks; a differential
   * one only the blocks of its list, and zeroes those the base holds no data in; an
   * 'everything' copy sends every block that way.
   */
  private async initialCopy(link: Link, fromOffset: number): Promise<void> {
    const p = this.pair;
    const v = this.r.volume;
    const base = p.initialCopy.baseSnapshot;
    if (base === null) throw new DeltavolError('METADATA_CORRUPT', 'initial copy not done but its base snapshot is gone: remove and add the replica again');
    const bs = v.blockBytes;
    const valid = v.snapshotValidBlocks(base);
    const list = p.initialCopy.kind === 'differential' ? this.r.copyBlocks(p)! : p.initialCopy.kind === 'everything' ? null : valid;
    this.initialCopyStartMs = this.now();
    this.initialCopyBytes = 0;
    link.send({ t: 'initStart', generation: this.r.generation, kind: p.initialCopy.kind, totalBytes: p.initialCopy.totalBytes, baseSet: p.initialCopy.baseSet });
    const runBytesMax = Math.max(bs, Math.floor(L.initRunBytesMax / bs) * bs);
    let lastLog = this.now();
    const runs: [number, number][] = list ? list.runs() : [[0, v.blocksTotal]];
    for (const [start, count] of runs) {
      // Split the run where the base's validity changes: data where it holds data, zeroes elsewhere.
      for (let b = start; b < start + count; ) {
        const isValid = valid.test(b);
        const next = isValid ? valid.nextClear(b) : valid.nextSet(b);
        const end = Math.min(start + count, next < 0 ? start + count : next);
        const endBytes = Math.min(end * bs, v.sizeBytes);
        let at = Math.max(b * bs, fromOffset);
        if (isValid && b * bs < fromOffset) this.initialCopyBytes += Math.min(endBytes, fromOffset) - b * bs;
        while (at < endBytes) {
          if (link.closed || this.stopped || p.operatorSuspended) return;
          if (!isValid) {
            link.send({ t: 'init', generation: this.r.generation, offsetBytes: at, lengthBytes: endBytes - at, zero: true, crc: 0 });
            at = endBytes;
            break;
          }
          const n = Math.min(runBytesMax, endBytes - at);
          const data = Buffer.allocUnsafe(n);
          v.readSnapshot(base, at, n, data);
          link.send({ t: 'init', generation: this.r.generation, offsetBytes: at, lengthBytes: n, zero: false, crc: crc32c(data) }, [data]);
          this.count(n);
          this.initialCopyBytes += n;
          at += n;
          await link.drainBelow(L.socketQueueBytesMax);
          if (this.now() - lastLog > 10_000) {
            lastLog = this.now();
            this.log.info({ copiedBytes: this.initialCopyBytes, totalBytes: p.initialCopy.totalBytes, kind: p.initialCopy.kind }, 'initial copy progress');
          }
        }
        b = end;
      }
    }
    link.send({ t: 'initDone', generation: this.r.generation, baseSet: p.initialCopy.baseSet, baseCutAtMs: p.initialCopy.baseCutAtMs ?? 0 });
    this.initDoneSent = true;
  }

  // ================= delta sets =================

  private async ship(link: Link): Promise<void> {
    const p = this.pair;
    let sentUpTo = p.ackedSet;
    if (p.catchUp && p.ackedSet < p.catchUp.set) sentUpTo = p.catchUp.from;
    this.sentSet = sentUpTo;
    this.sentChunks = 0;
    this.sending = true;
    while (!link.closed && !this.stopped && this.r.shipping) {
      // A split under way: send nothing new; suspend() tells the replica, then closes the link.
      if (p.operatorSuspended) {
        await this.sleep(100);
        continue;
      }
      // Acks may have moved the chain past what this session sent (a resumed session).
      if (p.ackedSet > sentUpTo) sentUpTo = p.ackedSet;
      this.sentSet = sentUpTo;
      const next = this.r.nextSetFor(p, sentUpTo);
      const stream = this.r.syncStreamOf(p);
      if (stream !== null) {
        // Sets cut since the stream started travel as its barriers, not as chunks.
        if (next !== null && stream.covers(next.set)) {
          await this.sleep(500);
          continue;
        }
        // Caught up with nothing in flight: the stream starts at the next cut, once little is
        // left to cut (the writes after that cut wait for its set); a backlog is cut now.
        // (Played, not only held: the replica applies the stream only after playing what came before.)
        // (And no set being built: it would go on the link before the stream's, its writes waiting.)
        if (next === null && stream.state === 'off' && !this.r.cutting && this.inflight.length === 0 && this.state === 'duplex' && p.ackedSet >= this.r.outbound.lastSet && p.playedSet >= this.r.outbound.lastSet) {
          if (this.r.volume.changedBlockCount() * this.r.volume.blockBytes > L.syncStartBacklogBytesMax) {
            this.r.cutSoon('backlog before a sync stream starts');
          } else {
            stream.requestStart(link);
            this.r.poke();
          }
        }
      }
      let inflightBytes = 0;
      for (const i of this.inflight) inflightBytes += i.bytes;
      if (next === null || inflightBytes >= L.sendWindowBytes) {
        await this.sleep(500);
        continue;
      }
      const s = this.r.outbound.get(next.set)!;
      this.inflight.push({ set: s.set, bytes: s.dataBytes, sentAtMs: this.now() });
      for (const c of s.chunks) {
        if (link.closed) return;
        this.sendChunk(link, c);
        this.sentChunks++;
        await link.drainBelow(L.socketQueueBytesMax);
      }
      this.sendTrailer(link, s.set, next.from);
      // The set a sync stream starts behind is on the link: what it held follows it.
      stream?.release(link, s.set);
      sentUpTo = s.set;
      this.sentSet = s.set;
      this.sentChunks = 0;
      // The replicator may be holding a cut back until this sender caught up (buildAheadBytes).
      this.r.poke();
    }
  }

  /**
   * Bytes of committed sets this sender has yet to put on the wire, or null when it is not
   * shipping sets now (not connected, initial copy, suspended): the replicator builds at
   * most L.buildAheadBytesMax ahead of a shipping sender, so what it sends is still in
   * the log's memory cache instead of read back from the file.
   */
  unsentBytes(): number | null {
    if (!this.sending || !this.connected || this.pair.operatorSuspended || this.pair.detached) return null;
    if ((this.r.syncStreamOf(this.pair)?.state ?? 'off') !== 'off') return null; // its sets travel as barriers
    const log = this.r.outbound;
    let n = 0;
    for (const s of log.sets) if (s.set > this.sentSet) n += s.dataBytes;
    if (this.sentChunks > 0) n -= Math.min(n, this.sentChunks * chunkDataBytesMax);
    return n;
  }

  private sendTrailer(link: Link, set: number, from: number): void {
    const s = this.r.outbound.get(set)!;
    const t = {
      generation: s.generation,
      set: s.set,
      chunks: s.chunks.length,
      blocks: s.blocks,
      dataBytes: s.dataBytes,
      dataCrc: s.dataCrc,
      catchUpFrom: from,
      createdAtMs: s.createdAtMs,
      // Partial for this replica too when it is owed older blocks a later catch-up set carries.
      partial: s.partial || this.r.owesBlocksBefore(this.pair, s.set),
    };
    link.send({ t: 'trailer', ...t, trailerCrc: trailerChecksum(t) });
  }

  // ================= status =================

  /** Bytes per second over the last few seconds, and since the link came up. */
  rates(): { currentBytesPerSec: number; averageBytesPerSec: number } {
    const now = this.now();
    this.samples.push([now, this.totalBytes]);
    while (this.samples.length > 2 && now - this.samples[0]![0] > 5000) this.samples.shift();
    const [t0, b0] = this.samples[0]!;
    const current = now - t0 > 0 ? ((this.totalBytes - b0) * 1000) / (now - t0) : 0;
    const average = this.sessionStartMs > 0 && now > this.sessionStartMs ? (this.sessionBytes * 1000) / (now - this.sessionStartMs) : 0;
    return { currentBytesPerSec: Math.round(current), averageBytesPerSec: Math.round(average) };
  }

  initialCopyProgress(): { kind: string; doneBytes: number; totalBytes: number; bytesPerSec: number; etaSeconds: number | null } | null {
    const p = this.pair;
    if (p.initialCopy.done) return null;
    const elapsed = (this.now() - this.initialCopyStartMs) / 1000;
    const rate = this.initialCopyStartMs > 0 && elapsed > 0 ? this.initialCopyBytes / elapsed : 0;
    const left = Math.max(0, p.initialCopy.totalBytes - this.initialCopyBytes);
    return {
      kind: p.initialCopy.kind,
      doneBytes: this.initialCopyBytes,
      totalBytes: p.initialCopy.totalBytes,
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
