// Why: one replica volume's side of replication (seed 001 FIG. 9, 11, 22): it takes the
// initial copy (or a resync's differential), stores incoming chunks durably
// (inbound-area.ts), acknowledges a set only when it is whole and verified, and plays
// complete sets back in order while readers see either the state before a set or after
// it (the set's blocks are read from the inbound area while it is integrated). Snapshots
// of the replica are stamped with the last set played. During an operator split (seed
// 003) the volume is writable and its change log records the replica's own writes,
// reported at the next hello so they travel again. It also remembers what the primary
// last reported (its last set, since when writes were at risk), so a failover can say
// what it loses.
//
// State: the volume's role record (upstream: pair id, playedSet, initial-copy progress,
// split flag; the generation) — changed in place for progress, by transitions for the
// rest. ackedSet is not stored: it is the end of the chain playedSet → complete sets
// whose catchUpFrom is the previous one.

import type { Logger } from '../util/log.js';
import { DeltavolError } from '../util/errors.js';
import { crc32cParts } from '../util/crc32c-parts.js';
import type { DurableFs } from '../util/durable-fs.js';
import type { SnapshotInfo } from '../snapshot/snapshot-queue.js';
import type { RoleRecord, UpstreamRecord } from '../recovery/role-record.js';
import { InboundArea, type InboundSet } from './inbound-area.js';
import { PagedBitmap } from '../bitmap/paged-bitmap.js';
import type { Link } from './link.js';
import { chunkChecksum, trailerChecksum, WHOLE_SET, type Frame, type ReplMessage, type Runs } from './wire.js';
import type { ReplicaPort } from './ports.js';
import { refuseOn } from './refusal.js';
import type { ReplicationPlatform } from './platform.js';
import * as L from './limits.js';
import { decodeHops, encodeHops, type ChainHop } from './chain.js';
import { planPlayback } from './playback-plan.js';

const SPLIT_WRITES_FILE = 'replica-split-writes.json';
/** A copy's writes (and their bytes) in flight at most before the replica waits for them. */
const copyWritesMax = 256;
const copyWriteBytesMax = 16 * 1024 * 1024;

type Hello = Extract<ReplMessage, { t: 'hello' }>;
type TrailerMsg = Extract<ReplMessage, { t: 'trailer' }>;

export interface ReplicaOptions {
  /** Complete sets wait this long before playback (0: at once). */
  playbackDelayMs: number;
  inboundBytesMax: number;
  /** Recovery messages from the primary on this replica's link (a handover). */
  onRecoveryMessage?: (m: ReplMessage, link: Link) => void;
  /**
   * The middle of a cascade: called when the volume equals its primary at a point in time
   * (a set played whole, a sync barrier applied, the initial copy done), with nothing else
   * applied until it returns: a set of its own may be cut right there.
   */
  onConsistentPoint?: () => void;
  /** Before the change log is emptied (a split): the middle of a cascade cuts what it holds first. */
  beforeDiscard?: () => Promise<void>;
  /** The middle of a cascade: its own replicas and what they reported, told to its primary (chain.ts). */
  downstreamChain?: () => ChainHop[];
}

/** What the primary last said about itself (it survives the primary: a failover reports from it). */
export interface PrimaryReport {
  lastSet: number;
  atRiskSinceMs: number | null;
  bytesDifferent: number;
  /** When it was received (this node's clock). */
  atMs: number;
  /** When the primary made it (its clock: the clock of the writes it reports on). */
  primaryAtMs: number;
  /**
   * This replica's acknowledged chain head when the report arrived: the report can have
   * counted no later set as held here, so dropping only later sets leaves it true. Absent in
   * reports kept by older versions (then any dropped set voids it).
   */
  heldSet?: number;
}

/**
 * The oldest write a failover now may lose, from the primary's last report: the oldest it
 * had not had acknowledged, or else the report's own time (what came after is unknown).
 */
export function reportedRiskSince(r: PrimaryReport): number {
  return r.atRiskSinceMs === null ? r.primaryAtMs : Math.min(r.atRiskSinceMs, r.primaryAtMs);
}

/**
 * The latest time T such that every write the primary acknowledged before T is here, or
 * null: the primary's report (pass null when it does not hold), the cut of the last set
 * played when the volume is at a point in time, the later of the two; when neither holds,
 * the cut of the last whole set played. The failover report and the live RPO both use it.
 */
export function heldBeforeMs(report: PrimaryReport | null, played: { consistent: boolean; playedCutAtMs: number | null; wholeCutAtMs?: number | null | undefined }): number | null {
  const bounds: number[] = [];
  if (report) bounds.push(reportedRiskSince(report));
  if (played.consistent && played.playedCutAtMs !== null) bounds.push(played.playedCutAtMs);
  // (Without this fallback a void report on a replica between two points in time read as
  // "nothing at risk", however much was lost.)
  if (bounds.length === 0 && played.wholeCutAtMs != null) bounds.push(played.wholeCutAtMs);
  return bounds.length > 0 ? Math.max(...bounds) : null;
}

export type ReplicaStateWord = 'initial-copy' | 'resyncing' | 'duplex' | 'disconnected' | 'suspend';

/** A sync stream write issued on the replica and not yet known to be complete. */
interface StreamWrite {
  seq: number;
  start: number;
  end: number;
  done: Promise<void>;
  finished: boolean;
}

/** The sync stream of a session (see onStreamStart). */
interface StreamState {
  /** The next item expected. */
  nextSeq: number;
  /** Every item up to this one is applied. */
  applied: number;
  /** Items applied since the last acknowledgement sent. */
  unacked: number;
  /** Writes issued, in sequence order, until every one before them finished too. */
  writes: StreamWrite[];
  /** Writes applied since the last barrier (a snapshot now would not be at a set boundary). */
  sinceBarrier: number;
}

/** Sync stream writes running at once on the replica. */
const streamWritesMax = 64;

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
  /** Playback stopped for good (a failover is taking the volume over). */
  private halted = false;
  private closed = false;
  private sessionSawData = false;
  private initBytesSinceAck = 0;
  /** Writes of the copy issued and not yet settled (see onInit). */
  private copyWrites: Promise<void>[] = [];
  private copyWriteBytes = 0;
  private copyError: Error | null = null;
  private readonly stopTimer: () => void;
  /** When the primary was last heard from (ms since the epoch; after a restart, its last report's time). */
  lastContactMs: number | null;
  lastError: string | null = null;
  /** The copy under way, as its sender announced it (bytes count what arrived since). */
  copy: { kind: string; totalBytes: number; receivedBytes: number; startedAtMs: number } | null = null;
  setsPlayed = 0;
  bytesReceived = 0;
  /**
   * The sync stream of this session (mode sync, sync-stream.ts): the next item expected,
   * the last applied, and how many were applied since the last acknowledgement.
   */
  private stream: StreamState | null = null;
  /** The primary's replication address as its last hello gave it ('' before any). */
  primaryAddress = '';
  /** What the primary reported upstream of it (it is the middle of a cascade), for status. */
  upstreamChain: ChainHop[] = [];
  private readonly stopChainTimer: () => void;
  /** Inside onConsistentPoint: the volume is at a point in time although a play or barrier is finishing. */
  private atPoint = false;
  /** Snapshots asked for while streaming: taken at the next barrier (a set boundary in the stream). */
  private atBarrier: (() => Promise<void>)[] = [];
  /** Sync stream counters (status). */
  readonly streamCounters = { writes: 0, flushes: 0, barriers: 0, sessions: 0 };

  constructor(
    readonly port: ReplicaPort,
    private readonly fsys: DurableFs,
    readonly role: RoleRecord,
    private readonly log: Logger,
    private readonly platform: ReplicationPlatform,
    private readonly options: ReplicaOptions,
  ) {
    if (role.role !== 'replica') throw new DeltavolError('ROLE_CONFLICT', `volume ${port.name} is not a replica`);
    this.inbound = new InboundArea(fsys, () => platform.clock.now());
    for (const s of this.inbound.complete()) if (s.set <= this.state.playedSet) this.inbound.remove(s.set);
    this.ackedSet = this.chainHead();
    this.lastContactMs = this.state.lastReport?.atMs ?? null;
    if (this.state.streaming) {
      // Stopped (or crashed) while a sync stream applied writes: those after the last
      // barrier may be torn. Consistent again once a whole set has been played.
      this.state.streaming = false;
      this.state.consistent = false;
      this.saveState();
      log.warn({ playedSet: this.state.playedSet }, 'the sync stream was cut by a restart: not consistent until the primary catches this replica up');
    }
    this.stopTimer = platform.clock.every(200, () => this.kickPlayback());
    this.stopChainTimer = platform.clock.every(L.replicationHeartbeatMs, () => this.sendChainDown());
  }

  /** What the primary last said about itself (it survives the primary and restarts of this node). */
  get lastReport(): PrimaryReport | null {
    return this.state.lastReport;
  }

  /** The upstream record (progress fields are changed in place, then saveState()). */
  private get state(): UpstreamRecord {
    const u = this.role.upstream;
    if (!u) throw new DeltavolError('ROLE_CONFLICT', `volume ${this.port.name} is no longer a replica`);
    return u;
  }

  get pairId(): string {
    return this.state.pairId;
  }
  get info(): Readonly<UpstreamRecord> {
    return this.state;
  }
  get connected(): boolean {
    return this.link !== null && !this.link.closed;
  }
  /**
   * The primary is connected and was heard from lately (it pings every second): a link
   * whose peer just died stays open until the heartbeat gives up, and must not read as alive.
   */
  get primaryAlive(): boolean {
    return this.connected && this.platform.clock.now() - this.link!.lastHeardAtMs < L.primaryAliveMs;
  }
  /** The primary's session link, if one is up. */
  get currentLink(): Link | null {
    return this.connected ? this.link : null;
  }
  get chainHeadSet(): number {
    return this.ackedSet;
  }

  private saveState(): void {
    this.role.saveProgress();
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
    const generation = this.role.generation;
    // Where the primary's replication port is (status shows it in a cascade's chain).
    this.primaryAddress = hello.returnPort > 0 ? `${hello.returnHost || link.remoteAddress}:${hello.returnPort}` : link.remoteAddress;
    if (this.halted) {
      refuseOn(link, 'ROLE_CONFLICT', `replica ${this.port.name} is taking over: no session now`, 0, 'replica taking over');
      return;
    }
    if (hello.generation < generation) {
      refuseOn(link, 'STALE_GENERATION', `generation ${hello.generation} is older than this replica's ${generation}`, generation, 'stale generation');
      return;
    }
    if (hello.generation > generation) {
      // A newer generation comes only by a resync or a handover (their own messages), never by a hello.
      refuseOn(link, 'ROLE_CONFLICT', `generation ${hello.generation} is newer than this replica's ${generation}: only a resync or a handover moves it`, 0, 'newer generation in a hello');
      return;
    }
    if (hello.sizeBytes !== this.port.sizeBytes || hello.blockBytes !== this.port.blockBytes) {
      refuseOn(link, 'GEOMETRY', `replica ${this.port.name} is ${this.port.sizeBytes} bytes in ${this.port.blockBytes}-byte blocks; primary is ${hello.sizeBytes} in ${hello.blockBytes}`, 0, 'geometry mismatch');
      return;
    }
    this.link?.close('replaced by a new session');
    this.link = link;
    // A stream ends with its link: snapshots waiting for its next barrier are taken then.
    link.onClose(() => {
      this.queue = this.queue.then(() => (this.link === link || this.link === null || this.link.closed ? this.endStream() : undefined));
    });
    this.lastContactMs = this.platform.clock.now();
    await this.queue; // the old session's frames are done
    if (this.link !== link || this.halted) return;
    await this.settleCopyWrites().catch(() => undefined); // a copy of the old session: its offset is what counts
    this.trailers.clear();
    this.inbound.dropIncomplete();
    this.sessionSawData = false;
    await this.endStream();
    // A resyncing old primary: the new primary dialling in means it recorded the resync.
    if (this.state.resync && !this.state.resync.registered) this.role.transition({ t: 'resync-registered' });
    let splitWrites: Runs = [];
    if (this.state.split) {
      // The split ends: what the replica wrote must travel again. Saved before it is
      // reported, removed only once the primary has certainly recorded it.
      await this.waitPlaybackIdle();
      splitWrites = this.port.changedBlocks().runs();
      this.fsys.writeAtomic(SPLIT_WRITES_FILE, Buffer.from(JSON.stringify(splitWrites)));
      this.role.transition({ t: 'split-ended' }, { runs: splitWrites.length });
    } else {
      const f = this.fsys.readAll(SPLIT_WRITES_FILE);
      if (f) splitWrites = JSON.parse(f.toString('utf8')) as Runs;
    }
    this.ackedSet = this.chainHead();
    link.send({
      t: 'welcome',
      generation: this.role.generation,
      ackedSet: this.ackedSet,
      playedSet: this.state.playedSet,
      initialCopy: { done: this.state.initialCopy.done, offsetBytes: this.state.initialCopy.offsetBytes },
      splitWrites,
    });
    this.log.info({ primary: hello.primaryVolume, ackedSet: this.ackedSet, playedSet: this.state.playedSet }, 'replication session started');
  }

  /** Frames of the current session, handled in order. */
  onFrame(link: Link, f: Frame): void {
    if (link !== this.link) return f.release();
    this.lastContactMs = link.lastHeardAtMs;
    this.queued++;
    if (this.queued > 64 || this.inboundFull()) link.pause();
    this.queue = this.queue
      .then(() => this.handle(link, f))
      .catch((e: Error) => {
        this.lastError = e.message;
        this.log.error({ err: e.message }, 'replication frame failed');
        link.close(`replica failed: ${e.message}`);
      })
      .finally(() => {
        // Its data (a pooled buffer) may carry a later frame now; writes still running from
        // it hold it (onInit, onStreamWrite).
        f.release();
        this.queued--;
        // Stream acknowledgements go out when the frames that arrived are all handled (one
        // for a batch), or every streamAckEvery items under a steady stream.
        if (this.queued === 0 && this.stream !== null && this.stream.unacked > 0 && link === this.link) this.sendStreamAck(link);
        if (this.queued <= 16 && !this.inboundFull()) link.resume();
      });
  }

  private sendStreamAck(link: Link): void {
    const st = this.stream!;
    st.unacked = 0;
    link.send({ t: 'sack', seq: st.applied });
  }

  /** The item with sequence number seq may be applied now (else the link is closed). */
  private streamItem(link: Link, seq: number): StreamState | null {
    const st = this.stream;
    if (st === null || seq !== st.nextSeq) {
      link.close(st === null ? 'sync stream item without a stream' : `sync stream item ${seq} where ${st.nextSeq} was due`);
      return null;
    }
    st.nextSeq++;
    return st;
  }

  /**
   * Complete sets held here at or below the last set played can never be played (a
   * catch-up set or a stream's barrier went past them): without this they would stay in
   * the inbound area for good (the simulator's liveness check found them).
   */
  private dropPassedSets(): void {
    for (const held of this.inbound.complete()) if (held.set <= this.state.playedSet) this.inbound.remove(held.set);
  }

  /** The stream of a session ended: its writes settle, snapshots waiting for a barrier are taken now. */
  private async endStream(): Promise<void> {
    const st = this.stream;
    this.stream = null;
    if (st) await Promise.allSettled(st.writes.map((w) => w.done));
    if (this.state.streaming && !this.closed) {
      await this.port.flush().catch(() => undefined);
      this.state.streaming = false;
      this.saveState();
    }
    for (const t of this.atBarrier.splice(0)) await t();
  }

  private async onStreamStart(link: Link, m: Extract<ReplMessage, { t: 'sstart' }>): Promise<void> {
    if (this.state.split || !this.state.initialCopy.done || this.ackedSet < m.afterSet) {
      link.close(`sync stream after set ${m.afterSet} refused: this replica holds ${this.ackedSet}${this.state.split ? ' and is split' : ''}`);
      return;
    }
    // Nothing of the stream lands before the sets in front of it are played: now, whatever
    // the playback delay (a sync replica's volume follows its primary write by write).
    await this.waitPlaybackIdle();
    while (this.snapshotting) await this.snapshotting.catch(() => undefined);
    for (let next = this.nextToPlay(); next && !this.halted && !this.closed && !link.closed && this.state.playedSet < m.afterSet; next = this.nextToPlay()) {
      const before = this.state.playedSet;
      await this.startPlaying(next);
      await this.waitPlaybackIdle();
      if (this.state.playedSet === before) break; // playback failed (logged): refused below
    }
    if (this.state.playedSet < m.afterSet) {
      link.close(`sync stream after set ${m.afterSet}, but set ${this.state.playedSet + 1} cannot be played here`);
      return;
    }
    this.state.streaming = true;
    if (m.fence === 'never' || m.fence === 'data') this.state.sync = { fence: m.fence, timeoutMs: m.timeoutMs };
    this.saveState();
    this.dropPassedSets();
    this.stream = { nextSeq: m.seq, applied: m.seq - 1, unacked: 0, writes: [], sinceBarrier: 0 };
    this.streamCounters.sessions++;
    this.log.info({ afterSet: m.afterSet, seq: m.seq }, 'sync stream started');
  }

  private async onStreamWrite(link: Link, m: Extract<ReplMessage, { t: 'swrite' }>, f: Frame): Promise<void> {
    const parts = f.parts;
    const st = this.streamItem(link, m.seq);
    if (!st) return;
    if (m.offsetBytes + m.lengthBytes > this.port.sizeBytes) throw new DeltavolError('BAD_STREAM', `sync write ${m.offsetBytes}+${m.lengthBytes} past the end of the volume`);
    if (!m.zero) {
      let n = 0;
      for (const d of parts) n += d.length;
      if (n !== m.lengthBytes || crc32cParts(parts) !== m.crc >>> 0) {
        link.close(`sync write ${m.seq}: checksum mismatch`);
        return;
      }
    }
    // Writes are issued without waiting for each other (the primary keeps qd32 in flight),
    // except one that overlaps a write still running: it waits, so the order of the
    // primary holds where it matters. Bounded: at most streamWritesMax at once.
    const start = m.offsetBytes;
    const end = m.offsetBytes + m.lengthBytes;
    for (;;) {
      if (this.stream !== st || link.closed) return; // (a failed write closed the link: its entry stays)
      const clash = st.writes.find((x) => !x.finished && x.start < end && start < x.end);
      const running = st.writes.filter((x) => !x.finished).length;
      if (clash === undefined && running < streamWritesMax) break;
      await (clash ?? st.writes.find((x) => !x.finished)!).done;
    }
    const w = m.zero ? this.port.playbackZero(m.offsetBytes, m.lengthBytes) : this.port.playbackWrite(m.offsetBytes, parts as Buffer[]);
    if (!m.zero) this.bytesReceived += m.lengthBytes;
    this.streamCounters.writes++;
    st.sinceBarrier++;
    // (The volume is past the last set played now, at a point of the primary's write order:
    // still crash-consistent, so `consistent` stays; snapshots wait for a barrier.)
    if (!(w instanceof Promise)) {
      if (st.writes.length === 0) st.applied = m.seq;
      else st.writes.push({ seq: m.seq, start, end, done: Promise.resolve(), finished: true });
      if (++st.unacked >= L.syncAckEveryItems) this.sendStreamAck(link);
      return;
    }
    const entry: StreamWrite = { seq: m.seq, start, end, done: Promise.resolve(), finished: false };
    const held = f.hold();
    void w.then(held, held);
    entry.done = w.then(
      () => {
        entry.finished = true;
        // Applied: every item up to the first write still running.
        let k = 0;
        while (k < st.writes.length && st.writes[k]!.finished) k++;
        if (k > 0) {
          st.applied = st.writes[k - 1]!.seq;
          st.writes.splice(0, k);
          st.unacked += k;
          if (this.stream === st && link === this.link && (this.queued === 0 || st.unacked >= L.syncAckEveryItems)) this.sendStreamAck(link);
        }
      },
      (e: Error) => {
        entry.finished = true; // (not applied: the link closes, nothing more is acknowledged on it)
        this.lastError = e.message;
        this.log.error({ seq: m.seq, err: e.message }, 'sync write failed');
        link.close(`replica failed: ${e.message}`);
      },
    );
    st.writes.push(entry);
  }

  /** Every stream write issued so far has completed (a flush or barrier is behind them). */
  private async settleStreamWrites(st: StreamState): Promise<void> {
    // Each `done` includes its completion handler: after these, `applied` covers them all.
    await Promise.all(st.writes.map((w) => w.done));
  }

  private async onStreamFlush(link: Link, seq: number): Promise<void> {
    const st = this.streamItem(link, seq);
    if (!st) return;
    await this.settleStreamWrites(st);
    await this.port.flush();
    this.streamCounters.flushes++;
    st.applied = seq;
    this.sendStreamAck(link);
  }

  /** Set m.set was cut here: everything before is that set's state; durable, then acknowledged. */
  private async onStreamBarrier(link: Link, m: Extract<ReplMessage, { t: 'sbarrier' }>): Promise<void> {
    const st = this.streamItem(link, m.seq);
    if (!st) return;
    await this.settleStreamWrites(st);
    await this.port.flush();
    st.sinceBarrier = 0;
    this.state.playedSet = m.set;
    this.state.playedCutAtMs = m.createdAtMs;
    this.state.wholeCutAtMs = m.createdAtMs;
    this.state.consistent = true;
    this.saveState();
    this.dropPassedSets();
    this.ackedSet = this.chainHead();
    this.streamCounters.barriers++;
    st.applied = m.seq;
    link.send({ t: 'ack', set: this.ackedSet, playedSet: this.state.playedSet });
    this.sendStreamAck(link);
    for (const t of this.atBarrier.splice(0)) await t();
    this.consistentPoint();
  }

  /**
   * Whether the volume equals its primary at a point in time right now, with nothing being
   * applied: a cascade's middle may cut a set of its own (replicator cut gate).
   */
  atConsistentPoint(): boolean {
    if (this.atPoint) return true;
    if (this.closed || this.state.split || !this.state.consistent || !this.state.initialCopy.done || this.playing || this.snapshotting) return false;
    if (this.copyWrites.length > 0) return false;
    const st = this.stream;
    return st === null || (st.sinceBarrier === 0 && st.writes.length === 0);
  }

  private consistentPoint(): void {
    const hook = this.options.onConsistentPoint;
    if (!hook || !this.state.consistent || this.state.split) return;
    this.atPoint = true;
    try {
      hook();
    } catch (e) {
      this.log.error({ err: (e as Error).message }, 'cut at a consistent point failed');
    } finally {
      this.atPoint = false;
    }
  }

  /**
   * Reading stops while the inbound area is over its bound and playback can make room. When
   * nothing held can be played (the set before them is still missing), reading goes on, or
   * the missing set would never arrive (the sender's window bounds what comes meanwhile).
   */
  private inboundFull(): boolean {
    return this.inbound.bytesHeld > this.options.inboundBytesMax && this.nextToPlay() !== undefined;
  }

  private async handle(link: Link, f: Frame): Promise<void> {
    const m = f.msg;
    if (link.closed || this.halted) return;
    const bound = this.state.peerIdentity ?? null;
    if (link.conn.peerIdentity !== null && bound !== null && link.conn.peerIdentity !== bound) {
      // (The hello was checked already; a session's frames, a split among them, come only from the bound primary.)
      refuseOn(link, 'PEER_REFUSED', `${m.t} from ${link.conn.peerIdentity}, but this pair is bound to ${bound}`, 0, 'not the bound primary');
      return;
    }
    if (!this.sessionSawData && m.t !== 'split' && m.t !== 'progress') {
      // Anything the primary sends after our welcome means it recorded our split writes.
      this.sessionSawData = true;
      if (this.fsys.exists(SPLIT_WRITES_FILE)) this.fsys.remove(SPLIT_WRITES_FILE);
    }
    // (A set's chunks and trailer carry the generation it was cut at: a cascade's middle that
    // took over ships its older sets at its new generation's session. The session itself
    // was accepted at the current generation, so only its other messages are checked.)
    if ('generation' in m && m.t !== 'handover' && m.t !== 'chunk' && m.t !== 'trailer' && m.generation < this.role.generation) {
      const generation = this.role.generation;
      refuseOn(link, 'STALE_GENERATION', `generation ${m.generation} is older than ${generation}`, generation, 'stale generation');
      return;
    }
    switch (m.t) {
      case 'initStart':
        if (!this.state.initialCopy.done) this.copy = { kind: m.kind, totalBytes: m.totalBytes, receivedBytes: 0, startedAtMs: this.platform.clock.now() };
        return;
      case 'init':
        return this.onInit(link, m, f);
      case 'initDone': {
        await this.settleCopyWrites();
        await this.port.flush();
        this.state.initialCopy = { done: true, offsetBytes: this.port.sizeBytes, baseSet: m.baseSet };
        this.state.playedSet = m.baseSet;
        this.state.playedCutAtMs = m.baseCutAtMs > 0 ? m.baseCutAtMs : null;
        this.state.wholeCutAtMs = this.state.playedCutAtMs;
        this.state.consistent = true;
        this.saveState();
        if (this.state.resync) this.role.transition({ t: 'resync-finished' }, { baseSet: m.baseSet, copiedBytes: this.copy?.receivedBytes ?? null });
        this.copy = null;
        this.ackedSet = this.chainHead();
        this.log.info({ baseSet: m.baseSet }, 'initial copy complete');
        this.consistentPoint();
        link.send({ t: 'ack', set: this.ackedSet, playedSet: this.state.playedSet });
        return;
      }
      case 'chunk': {
        if (m.set <= this.ackedSet || this.inbound.get(m.set)) return; // a duplicate of something held
        // The data stays in the socket's buffers (views): checked, stored and played from them.
        const data = f.parts;
        let dataBytes = 0;
        for (const d of data) dataBytes += d.length;
        const blocks = m.runs.reduce((n, [, c]) => n + c, 0);
        if (dataBytes !== blocks * this.port.blockBytes || chunkChecksum(data, m.set, m.chunk, m.runs) !== m.crc) {
          link.send({ t: 'nak', set: m.set, chunk: m.chunk, reason: 'chunk checksum mismatch' });
          return;
        }
        for (const [b, c] of m.runs) {
          if (b + c > Math.ceil(this.port.sizeBytes / this.port.blockBytes)) {
            refuseOn(link, 'BAD_CHUNK', `set ${m.set} chunk ${m.chunk}: blocks past the end of the volume`, 0, 'chunk past the end');
            return;
          }
        }
        this.bytesReceived += dataBytes;
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
      case 'chainUp': {
        this.upstreamChain = decodeHops(m.hops) ?? this.upstreamChain;
        return;
      }
      case 'progress': {
        // (The primary counted as held only sets it had seen acknowledged, all at or below ours.)
        const r = { lastSet: m.lastSet, atRiskSinceMs: m.atRiskSinceMs === 0 ? null : m.atRiskSinceMs, bytesDifferent: m.bytesDifferent, atMs: this.platform.clock.now(), primaryAtMs: m.atMs, heldSet: this.ackedSet };
        const old = this.state.lastReport;
        this.state.lastReport = r;
        // Durable when what a failover would report changes, and every few seconds (the
        // report's own time bounds the loss a failover after a restart would admit).
        if (!old || old.lastSet !== r.lastSet || old.atRiskSinceMs !== r.atRiskSinceMs || old.heldSet !== r.heldSet || r.atMs - old.atMs > L.reportPersistMs) this.saveState();
        return;
      }
      case 'handover':
      case 'handoverAbort':
        if (this.options.onRecoveryMessage) this.options.onRecoveryMessage(m, link);
        return;
      case 'sstart':
        return this.onStreamStart(link, m);
      case 'swrite':
        return this.onStreamWrite(link, m, f);
      case 'sflush':
        return this.onStreamFlush(link, m.seq);
      case 'sbarrier':
        return this.onStreamBarrier(link, m);
      default:
        link.send({ t: 'refuse', code: 'PROTOCOL', message: `unexpected ${m.t}`, generation: 0 });
        link.close(`unexpected ${m.t}`);
    }
  }

  private async onInit(link: Link, m: Extract<ReplMessage, { t: 'init' }>, f: Frame): Promise<void> {
    const data = f.parts;
    if (this.state.initialCopy.done) return; // a late duplicate
    if (m.offsetBytes + m.lengthBytes > this.port.sizeBytes) throw new DeltavolError('BAD_STREAM', `init range ${m.offsetBytes}+${m.lengthBytes} past the end`);
    // The ranges of a copy never overlap: their writes are issued without waiting for each
    // other (the engine group-commits what they need) and settled every so often.
    let w: void | Promise<void>;
    if (m.zero) {
      w = this.port.playbackZero(m.offsetBytes, m.lengthBytes);
    } else {
      if (crc32cParts(data) !== m.crc >>> 0) {
        // A damaged range: drop the link; the primary resumes from the last durable offset.
        link.close('initial copy checksum mismatch');
        return;
      }
      w = this.port.playbackWrite(m.offsetBytes, data as Buffer[]); // the socket's buffers, not joined
      this.bytesReceived += m.lengthBytes;
      if (this.copy) this.copy.receivedBytes += m.lengthBytes;
    }
    if (w) {
      const held = f.hold();
      this.copyWrites.push(w.catch((e: unknown) => void (this.copyError ??= e as Error)).finally(held));
      if (!m.zero) this.copyWriteBytes += m.lengthBytes;
    }
    if (this.copyWrites.length >= copyWritesMax || this.copyWriteBytes >= copyWriteBytesMax) await this.settleCopyWrites();
    this.initBytesSinceAck += m.lengthBytes;
    if (this.initBytesSinceAck >= L.initAckEveryBytes) {
      this.initBytesSinceAck = 0;
      await this.settleCopyWrites();
      await this.port.flush();
      this.state.initialCopy.offsetBytes = m.offsetBytes + m.lengthBytes;
      this.saveState();
      link.send({ t: 'initAck', offsetBytes: this.state.initialCopy.offsetBytes });
    }
  }

  /** Waits for the copy's writes issued so far; throws the first that failed. */
  private async settleCopyWrites(): Promise<void> {
    const ws = this.copyWrites;
    this.copyWrites = [];
    this.copyWriteBytes = 0;
    await Promise.all(ws);
    const e = this.copyError;
    this.copyError = null;
    if (e) throw e;
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
    if (this.playing || this.snapshotting || this.closed || this.halted || this.state.split) return;
    const next = this.nextToPlay();
    if (!next) return;
    if (this.options.playbackDelayMs > 0 && this.platform.clock.now() - next.receivedAtMs < this.options.playbackDelayMs && this.inbound.bytesHeld < this.options.inboundBytesMax / 2) return;
    this.startPlaying(next);
  }

  private startPlaying(next: InboundSet): Promise<void> {
    const p = this.play(next)
      .catch((e: Error) => {
        this.lastError = e.message;
        this.log.error({ set: next.set, err: e.message }, 'playback failed');
      })
      .finally(() => {
        this.playing = null;
        this.kickPlayback();
      });
    this.playing = p;
    return p;
  }

  private nextToPlay(): InboundSet | undefined {
    return this.inbound.complete().find((s) => s.catchUpFrom === this.state.playedSet && s.set <= this.ackedSet);
  }

  private async play(s: InboundSet): Promise<void> {
    const started = this.platform.clock.now();
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
      const ranges = new Float64Array(2 * L.playbackBatchRunsMax);
      const playbackLimits = { runBytesMax: L.playbackBatchRunBytesMax, runsMax: L.playbackBatchRunsMax };
      for (const c of s.chunks) {
        // The chunk's data, read back from the inbound file into one reused buffer: each
        // run is written from a slice of it. Small runs (scattered blocks) go to the file
        // several at once; a large one alone, where the volume decides how (threadpool):
        // playback-plan.ts.
        const data = inbound.chunkData(s.set, c);
        const waits: Promise<void>[] = [];
        planPlayback(c.runs, bs, size, ranges, playbackLimits, (w) => {
          const r = w.batch
            ? this.port.playbackWriteRuns(ranges, w.count, data, w.sourceOffset)
            : this.port.playbackWrite(w.offset, [data.subarray(w.sourceOffset, w.sourceOffset + w.length)]);
          if (r) waits.push(r);
        });
        await Promise.all(waits);
      }
      await this.port.flush();
      this.state.playedSet = s.set;
      this.state.playedCutAtMs = s.createdAtMs;
      if (!s.partial) this.state.wholeCutAtMs = s.createdAtMs;
      this.state.consistent = !s.partial;
      this.saveState();
    } finally {
      this.port.setOverlay(null);
    }
    inbound.remove(s.set);
    this.dropPassedSets();
    this.setsPlayed++;
    this.consistentPoint();
    this.log.debug({ set: s.set, blocks: s.blocks, ms: this.platform.clock.now() - started }, 'delta set played');
    const link = this.link;
    if (link && !link.closed) {
      link.send({ t: 'ack', set: this.ackedSet, playedSet: this.state.playedSet });
      // Reading stopped while the inbound area was full: playback made room.
      if (this.queued <= 16 && !this.inboundFull()) link.resume();
    }
  }

  private async waitPlaybackIdle(): Promise<void> {
    while (this.playing) await this.playing;
  }

  // ================= split and snapshots =================

  private async startSplit(): Promise<void> {
    if (this.state.split) return;
    await this.waitPlaybackIdle();
    // A cascade's middle ships what it played to its own replicas before forgetting it.
    await this.options.beforeDiscard?.();
    await this.port.discardChanges();
    this.role.transition({ t: 'split-started', atMs: this.platform.clock.now() }, { playedSet: this.state.playedSet });
  }

  /**
   * Blocks of every set held whole here but not yet played (the primary may have released
   * them already: a restore from this replica must count them as changed).
   */
  heldBlocks(): PagedBitmap {
    const bits = new PagedBitmap(this.port.blocksTotal);
    for (const s of this.inbound.complete()) {
      if (s.set <= this.state.playedSet) continue;
      for (const c of s.chunks) for (const [b, n] of c.runs) if (b + n <= this.port.blocksTotal) bits.setRange(b, n);
    }
    return bits;
  }

  /** A snapshot between two sets, stamped with the last set played. */
  async createSnapshot(name: string): Promise<SnapshotInfo> {
    if (this.stream !== null && this.connected && this.stream.sinceBarrier > 0) {
      // Streaming: the volume is between sets except at a barrier; take it at the next one
      // (or when the stream ends), in the frame queue, before any later write is applied.
      return new Promise<SnapshotInfo>((resolve, reject) => {
        this.atBarrier.push(async () => {
          this.snapshotNow(name).then(resolve, reject);
          await this.snapshotting?.catch(() => undefined);
        });
      });
    }
    return this.snapshotNow(name);
  }

  private async snapshotNow(name: string): Promise<SnapshotInfo> {
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

  // ================= taking over (recovery) =================

  /** Ends the primary's session (a failover: nothing more is accepted from it). */
  endSession(reason: string): void {
    this.link?.close(reason);
    this.link = null;
  }

  /**
   * Plays every complete set of the chain (unless `now`), then stops playback for good.
   * Returns the sets held whole but not played (their blocks travel at a resync).
   */
  async halt(now: boolean): Promise<{ played: number[]; dropped: InboundSet[] }> {
    const played: number[] = [];
    // First stop background playback from starting sets (a set ending kicks the next one),
    // then play what is left here, one at a time.
    this.halted = true;
    // The session's frames, and the end of its sync stream (endSession closed the link): a
    // stream write still in the engine (waiting for its journal or activity-log record)
    // lands before the restart point, not after it.
    await this.queue.catch(() => undefined);
    await this.waitPlaybackIdle();
    while (!now) {
      const next = this.nextToPlay();
      if (!next) break;
      await this.startPlaying(next);
      if (this.state.playedSet !== next.set) throw new DeltavolError('IO', `set ${next.set} could not be played: ${this.lastError ?? 'unknown error'}`);
      played.push(next.set);
    }
    await this.waitPlaybackIdle();
    const dropped = this.inbound.complete().filter((s) => s.set > this.state.playedSet && s.set <= this.ackedSet);
    return { played, dropped };
  }

  /** A takeover was abandoned: sessions and playback go on. */
  resumeAfterHalt(): void {
    this.halted = false;
    this.kickPlayback();
  }

  /** Blocks of the given sets (what a failover --now left unplayed). */
  static blocksOf(sets: InboundSet[]): Runs {
    const out: Runs = [];
    for (const s of sets) for (const c of s.chunks) out.push(...c.runs);
    return out;
  }

  /** Sets being received but not complete (the primary had begun them). */
  incompleteSets(): number[] {
    return this.inbound.incomplete();
  }

  /** Removes every inbound set and file (the volume is no longer a replica). */
  dropInbound(): void {
    this.inbound.clear();
    if (this.fsys.exists(SPLIT_WRITES_FILE)) this.fsys.remove(SPLIT_WRITES_FILE);
  }

  // ================= status =================

  /** The pair's state word as this replica sees it. */
  get stateWord(): ReplicaStateWord {
    if (this.state.split) return 'suspend';
    if (!this.connected) return 'disconnected';
    if (!this.state.initialCopy.done) return this.state.resync ? 'resyncing' : 'initial-copy';
    return 'duplex';
  }

  /**
   * What a failover now would lose: writes made on the primary since `atRiskSinceMs`
   * (from its last report), up to the last contact; null when nothing was at risk.
   */
  rpo(): { atRiskSinceMs: number | null; seconds: number; lastContactMs: number | null; bytesAtMost: number } {
    const r = this.lastReport;
    const until = this.connected ? this.platform.clock.now() : (this.lastContactMs ?? this.platform.clock.now());
    // The same bound a failover now would report (failover.ts lossReport; nothing dropped).
    const since = heldBeforeMs(r, this.state);
    if (since === null) return { atRiskSinceMs: null, seconds: 0, lastContactMs: this.lastContactMs, bytesAtMost: 0 };
    return { atRiskSinceMs: since, seconds: Math.max(0, (until - since) / 1000), lastContactMs: this.lastContactMs, bytesAtMost: r?.bytesDifferent ?? 0 };
  }

  status() {
    const held = this.inbound.complete();
    const oldest = held.find((s) => s.set > this.state.playedSet);
    const now = this.platform.clock.now();
    return {
      role: 'replica' as const,
      pairId: this.state.pairId,
      primaryVolume: this.state.primaryVolume,
      /** The primary's identity bound to the pair (null: made without TLS). */
      peerIdentity: this.state.peerIdentity ?? null,
      state: this.stateWord,
      connected: this.connected,
      generation: this.role.generation,
      playedSet: this.state.playedSet,
      ackedSet: this.ackedSet,
      consistent: this.state.consistent,
      initialCopy: this.state.initialCopy,
      copy: this.copy,
      resync: this.state.resync,
      setsHeld: held.map((s) => ({ set: s.set, createdAt: new Date(s.createdAtMs).toISOString(), receivedAt: new Date(s.receivedAtMs).toISOString(), blocks: s.blocks, bytes: s.dataBytes })),
      inboundBytes: this.inbound.bytesHeld,
      lagSeconds: oldest ? Math.max(0, (now - oldest.createdAtMs) / 1000) : 0,
      rpo: this.rpo(),
      primaryLastSet: this.lastReport?.lastSet ?? null,
      setsPlayed: this.setsPlayed,
      bytesReceived: this.bytesReceived,
      lastError: this.lastError,
      // A sync pair: its settings (kept for a role swap) and the stream of this session.
      sync: this.state.sync ? { ...this.state.sync, streaming: this.stream !== null, ...this.streamCounters } : null,
      // A cascade: what the primary reported further up (its own primary, ...).
      upstreamChain: this.upstreamChain,
    };
  }

  /** The middle of a cascade tells its primary what is downstream (status on every node shows the chain). */
  private sendChainDown(): void {
    const link = this.link;
    if (!link || link.closed || !this.connected) return;
    const hops = this.options.downstreamChain?.() ?? [];
    if (hops.length > 0) link.send({ t: 'chainDown', hops: encodeHops(hops) });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.stopTimer();
    this.stopChainTimer();
    this.link?.close('replica closing');
    await this.queue.catch(() => undefined);
    await this.waitPlaybackIdle();
    this.inbound.close();
  }
}
