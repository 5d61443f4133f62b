// Why: one primary volume's side of replication (seed 001 FIG. 5, 7–12): it decides when
// to cut a delta set (timeout, high-water mark, on demand), builds sets into the
// outbound save area, keeps the pairs' progress (what each replica acknowledged, split
// and catch-up state) in the volume's role record, frees log space once every pair is
// past a set, and when the log is full lets a stalled pair fall back to a pending bitmap
// so the others keep going. Each pair's connection is a PairSender (pair-sender.ts).
//
// Pair invariants (role.json, through RoleRecord):
//   - ackedSet is the last set the replica holds durably (its chain head); the log keeps
//     every set after it (or from catchUp.set) until the replica acknowledges it;
//   - a detached pair holds no log space: everything it misses is in its pending file
//     (pair-ID.pending), which is durable before any set it missed is released;
//   - a catch-up set carries the pending blocks (and the replica's split writes) and is
//     sent with catchUpFrom = ackedSet; the pending file is cleared once it is acked;
//   - a differential initial copy (a resync) copies only the blocks of its copy file
//     (pair-ID.copy), written before the pair exists.

import { fanOut } from '../volume/write-mirror.js';
import type { Logger } from '../util/log.js';
import { assert } from '../util/assert.js';
import { DeltavolError } from '../util/errors.js';
import type { DurableFs } from '../util/durable-fs.js';
import { sleep } from '../util/clock.js';
import { PagedBitmap, type ReadonlyBitmap } from '../bitmap/paged-bitmap.js';
import type { InitialCopyRecord, PairConfig, PairRecord, RoleRecord } from '../recovery/role-record.js';
import { OutboundLog } from './outbound-log.js';
import type { PrimaryPort } from './ports.js';
import type { ReplicationPlatform } from './platform.js';
import type { ReplMessage, Runs } from './wire.js';
import type { Link } from './link.js';
import { SyncStream } from './sync-stream.js';
import { PairSender, type PairHost } from './pair-sender.js';
import * as L from './limits.js';
import { deeper, type ChainHop } from './chain.js';
import { DistantTracker } from './distant.js';

interface CutRequest {
  snapshotName?: string;
  reason: string;
  /** Cut even with nothing changed (a set with no blocks). */
  force?: boolean;
  /** No set: a snapshot holding every change, and an empty change log (first replica). */
  forget?: boolean;
  /**
   * A cascade's middle about to empty its change log (a failover, a split, a takeover):
   * cut now, at a consistent point or not (`partial` marks the set when it is not).
   */
  ungated?: boolean;
  partial?: boolean;
}

export interface ReplicatorOptions {
  outboundBytes: number;
}

/** What the replicator leaves to recovery (the replication service wires these). */
export interface ReplicatorHooks {
  returnAddress(): { host: string; port: number };
  onNewerGeneration(p: PairRecord, generation: number, code: string, message: string): void;
  onRecoveryMessage(p: PairRecord, m: ReplMessage, link: Link): void;
  onLinkDown(p: PairRecord): void;
  onSessionUp(p: PairRecord): void;
  onInitialCopyDone(p: PairRecord): void;
  /** A cascade: what is upstream of this volume when it is a replica itself ([] otherwise). */
  upstreamChain(): ChainHop[];
  /** A cascade's middle: the set of its primary it has played whole and when that set was cut there (null: not a replica, or not at a point in time). */
  upstreamPosition(): { set: number; cutAtMs: number | null } | null;
  /** A cascade's middle: since when its primary's writes may be missing here (its primary's last report; null: nothing known at risk). */
  upstreamRiskSinceMs(): number | null;
}

/** How a new pair's replica gets its first copy. */
export type InitialCopyPlan =
  | { kind: 'full' }
  /**
   * Only these blocks (read from the base snapshot; blocks that hold no data there are
   * zeroed). Computed once the base snapshot exists (a resync adds what changed up to it).
   */
  | { kind: 'differential'; blocks: (baseSnapshot: string) => PagedBitmap }
  /** Every block, invalid ones zeroed (a replica volume that holds old data). */
  | { kind: 'everything' };

export interface AddPairOptions {
  /** A given pair id (a resync registers the id the old primary already recorded). */
  id?: string;
  copy?: InitialCopyPlan;
}

const pendingFile = (id: string) => `pair-${id}.pending`;
const copyFile = (id: string) => `pair-${id}.copy`;

function readRuns(fsys: DurableFs, name: string, blocksTotal: number): PagedBitmap | null {
  const f = fsys.readAll(name);
  if (!f) return null;
  const bits = new PagedBitmap(blocksTotal);
  for (const [s, c] of JSON.parse(f.toString('utf8')) as Runs) if (s + c <= blocksTotal) bits.setRange(s, c);
  return bits;
}

export class VolumeReplicator implements PairHost {
  readonly outbound: OutboundLog;
  readonly senders = new Map<string, PairSender>();
  /** The sync stream of each pair in mode sync (at most one per volume: the engine has one mirror). */
  readonly streams = new Map<string, SyncStream>();
  /**
   * Sets cut without data while every pair was streaming, by pair, with their blocks, until
   * the pair acknowledges them (their barrier): the same blocks are in the pair's pending
   * bitmap (durably), so a pair whose stream breaks first gets them in a catch-up set.
   */
  private readonly streamedSets = new Map<string, Map<number, PagedBitmap>>();
  private readonly pending = new Map<string, PagedBitmap>();
  private building: Promise<unknown> | null = null;
  /**
   * The middle of a cascade (a replica forwarding to replicas of its own) may cut only when
   * its volume equals its primary at a point in time (after a whole set played, at a sync
   * barrier), or its sets would carry half of one. Null: any time (a primary).
   */
  private cutGate: (() => boolean) | null = null;
  private cutsHeld = false;
  /**
   * A cascade's middle: for each set it cut at a consistent point (whole), the set of its
   * own primary it equals there. Kept in memory until every pair played it: after a
   * restart the replicas' upstreamPlayed stays where it was (an older position is safe).
   */
  private readonly upstreamOfSet = new Map<number, { set: number; cutAtMs: number | null }>();
  /**
   * Per pair, when its primary cut the newest of its sets the replica holds whole as
   * received and acknowledged (a failover there plays it), in that primary's clock. Newer
   * than upstreamPlayedCutAtMs while sets wait for playback; in memory only (after a
   * restart, the played one: older, so a safe bound).
   */
  private readonly upstreamAckedCutAtMs = new Map<string, number>();
  /**
   * Per pair, the newest catch-up set cut for it: sets before it lack blocks it delivers
   * (they were the pair's pending blocks), so they are no point in time for that replica.
   */
  private readonly catchUpCutFor = new Map<string, number>();
  /** Replicas of this volume's replicas (cascade): what they lack, should their middle be lost. */
  readonly distant: DistantTracker;
  private lastCutMs: number;
  /**
   * No later than the oldest change not yet in a set (null: none): what a failover of a
   * replica would lose starts there, so it may be early, never late.
   */
  private firstChangeMs: number | null = null;
  /** The last time the change log was seen empty (a first change comes after it). */
  private lastQuietMs: number;
  private readonly stopTimer: () => void;
  private closed = false;
  /** Reason the last cut could not happen (outbound full), for status. */
  outboundFull = false;
  setsCut = 0;

  constructor(
    readonly volume: PrimaryPort,
    private readonly fsys: DurableFs,
    readonly role: RoleRecord,
    private readonly log: Logger,
    readonly platform: ReplicationPlatform,
    options: ReplicatorOptions,
    private readonly hooks: ReplicatorHooks,
  ) {
    this.outbound = OutboundLog.open(fsys, options.outboundBytes);
    // After a restart the changes not yet cut were made after the change log was last
    // empty: at the last whole cut (the log keeps its time), or when this volume took over
    // (its change log started empty then). Their risk starts there, not at this start.
    // A takeover's time is written into the log's index at once: the failover record that
    // holds it goes when the old primary has rejoined.
    const tookOverAt = role.state.failover?.atMs;
    if (tookOverAt !== undefined && (this.outbound.lastCutAtMs ?? -Infinity) < tookOverAt) this.outbound.noteCut(tookOverAt);
    this.lastCutMs = this.outbound.lastCutAtMs ?? platform.clock.now();
    this.lastQuietMs = this.lastCutMs;
    for (const p of role.pairs) this.pending.set(p.id, readRuns(fsys, pendingFile(p.id), volume.blocksTotal) ?? new PagedBitmap(volume.blocksTotal));
    this.distant = new DistantTracker(fsys, role, volume.blocksTotal, log, () => platform.clock.now());
    if (volume.changedBlockCount() > 0) this.firstChangeMs = this.lastCutMs;
    this.stopTimer = platform.clock.every(L.replicatorTickMs, () => this.tick());
  }

  get generation(): number {
    return this.role.generation;
  }
  get pairs(): readonly PairRecord[] {
    return this.role.pairs;
  }
  pair(id: string): PairRecord {
    const p = this.role.pairs.find((x) => x.id === id || x.remoteVolume === id || `${x.peerHost}:${x.peerPort}` === id);
    if (!p) throw new DeltavolError('EINVAL_ARGUMENT', `volume ${this.volume.name} has no replica "${id}"`);
    return p;
  }
  syncStreamOf(p: PairRecord): SyncStream | null {
    return this.streams.get(p.id) ?? null;
  }

  get cutting(): boolean {
    return this.building !== null;
  }

  cutSoon(reason: string): void {
    if (this.building || this.closed || !this.shipping) return;
    void this.cut({ reason }).catch((e: Error) => this.log.error({ err: e.message }, 'delta set not built'));
  }

  /**
   * A planned handover of an async pair streams first (seed 004: writes go on while the
   * backlog ships; holding them for the swap then costs a round trip). Fence never, and the
   * replica does not keep it as the pair's setting. A sync pair's own stream is returned as is.
   */
  streamForHandover(p: PairRecord): SyncStream {
    const existing = this.streams.get(p.id);
    if (existing) return existing;
    const st = new SyncStream({
      volume: this.volume.name,
      fence: 'never',
      timeoutMs: L.syncTimeoutMsDefault,
      generation: () => this.role.generation,
      clock: this.platform.clock,
      log: this.log.child({ pair: p.id, stream: 'handover' }),
      temporary: true,
    });
    this.streams.set(p.id, st);
    this.mirrorStreams();
    this.senders.get(p.id)?.wake();
    return st;
  }

  /** The handover did not happen: an async pair stops streaming. */
  endHandoverStream(p: PairRecord): void {
    if (this.streams.get(p.id)?.temporary) this.closeStream(p.id, 'planned handover over');
  }

  /**
   * Set n of the log is no point in time for pair p's replica: p is owed blocks changed
   * before n's cut that travel only in a later catch-up set (its pending blocks: a sync
   * stream that broke, a split, a detach). The sender sends such a set as partial, so the
   * replica does not claim a consistent state it does not have (simulator seed 940319: a
   * replica that played the set after a broken stream, then failed over with --now, reported
   * a restart point that was no state of its primary).
   */
  owesBlocksBefore(p: PairRecord, n: number): boolean {
    return this.pending.get(p.id)!.count() > 0 || n < (this.catchUpCutFor.get(p.id) ?? -Infinity);
  }

  /** The pair's sets travel in its stream now (its pending blocks are the stream's to deliver). */
  private streamCovers(p: PairRecord): boolean {
    const st = this.streams.get(p.id)?.state;
    return st === 'streaming' || st === 'holding';
  }

  /** A dataless set's blocks, kept where a pair that misses the stream will find them. */
  private keepStreamed(n: number, members: ReadonlyBitmap): void {
    this.distant.onSetCut(members);
    for (const p of this.role.pairs) {
      const bits = new PagedBitmap(this.volume.blocksTotal);
      members.forEachRun((start, count) => bits.setRange(start, count));
      let sets = this.streamedSets.get(p.id);
      if (!sets) this.streamedSets.set(p.id, (sets = new Map()));
      sets.set(n, bits);
      this.pending.get(p.id)!.union(bits);
      this.savePending(p.id);
    }
  }

  /** Sets up to p.ackedSet arrived by the stream: their blocks leave the pending bitmap. */
  private forgetStreamed(p: PairRecord): void {
    const sets = this.streamedSets.get(p.id);
    if (!sets || sets.size === 0) return;
    if (this.streams.get(p.id)?.state !== 'streaming') {
      // The stream broke: those blocks are ordinary pending blocks now, shipped (and
      // removed from the pending bitmap) by catch-up sets, never by an acknowledgement.
      sets.clear();
      return;
    }
    const pending = this.pending.get(p.id)!;
    let changed = false;
    for (const [n, bits] of sets) {
      if (n > p.ackedSet) continue;
      pending.difference(bits);
      sets.delete(n);
      changed = true;
    }
    if (!changed) return;
    for (const bits of sets.values()) pending.union(bits); // a block of an acknowledged set may be in a later one too
    this.savePending(p.id);
  }

  private closeStream(id: string, reason: string): void {
    const st = this.streams.get(id);
    if (!st) return;
    st.close(reason);
    this.streams.delete(id);
    // The streams still open stay mirrored (clearing the mirror unconditionally left a sync
    // pair's stream blind to cuts, cutting "sync stream start" sets forever: simulator seed
    // 1979384207, a handover asked of a cascade's middle, then called off).
    this.mirrorStreams();
  }

  /** The volume's one mirror hears every open stream (write-mirror.ts fanOut). */
  private mirrorStreams(): void {
    this.volume.setMirror(fanOut([...this.streams.values()]));
  }

  pendingOf(id: string): PagedBitmap {
    return this.pending.get(id)!;
  }
  /** Whether the volume may ship (a fenced or handed-over volume ships nothing). */
  get shipping(): boolean {
    // A primary, or a replica that forwards (the middle of a cascade); not a fenced one.
    return this.role.role !== 'simplex' && this.role.state.fenced === null && !this.closed;
  }

  /** Starts a sender per pair (after a restart, every pair resumes where its record says). */
  start(): void {
    // (Pairs a role transition added while this replicator ran: a cascade's middle that took over.)
    for (const p of this.role.pairs) if (!this.pending.has(p.id)) this.pending.set(p.id, readRuns(this.fsys, pendingFile(p.id), this.volume.blocksTotal) ?? new PagedBitmap(this.volume.blocksTotal));
    for (const p of this.role.pairs) if (!this.senders.has(p.id)) this.startSender(p);
  }

  private startSender(p: PairRecord): void {
    const log = this.log.child({ pair: p.id, peer: `${p.peerHost}:${p.peerPort}` });
    if (p.mode === 'sync' && !this.streams.has(p.id)) {
      const stream = new SyncStream({
        volume: this.volume.name,
        fence: p.fence ?? 'never',
        timeoutMs: p.syncTimeoutMs ?? L.syncTimeoutMsDefault,
        generation: () => this.role.generation,
        clock: this.platform.clock,
        log,
      });
      this.streams.set(p.id, stream);
      this.mirrorStreams();
    }
    const s = new PairSender(this, p, log, this.platform);
    this.senders.set(p.id, s);
    s.start();
  }

  saveState(): void {
    this.role.saveProgress();
  }

  private savePending(id: string): void {
    this.fsys.writeAtomic(pendingFile(id), Buffer.from(JSON.stringify(this.pending.get(id)!.runs())));
  }

  // ================= pairs =================

  /**
   * A new replica: cut a set with a base snapshot stamped with its number, then the
   * sender copies the snapshot's blocks (all valid ones, or a resync's differential) and
   * continues with the next set.
   */
  async addPair(config: PairConfig, options: AddPairOptions = {}): Promise<PairRecord> {
    for (const p of this.role.pairs) {
      if (p.peerHost === config.peerHost && p.peerPort === config.peerPort && p.remoteVolume === config.remoteVolume) {
        throw new DeltavolError('VOLUME_EXISTS', `volume ${this.volume.name} already replicates to ${config.remoteVolume} at ${config.peerHost}:${config.peerPort}`);
      }
    }
    const id = options.id ?? this.platform.newId();
    const plan = options.copy ?? { kind: 'full' };
    const copy = await this.startCopy(id, plan, this.role.pairs.length === 0, 'initial copy');
    const p: PairRecord = {
      ...config,
      id,
      createdAt: new Date(this.platform.clock.now()).toISOString(),
      ackedSet: copy.baseSet,
      playedSet: 0,
      initialCopy: copy,
      operatorSuspended: false,
      detached: false,
      catchUp: null,
    };
    this.pending.set(id, new PagedBitmap(this.volume.blocksTotal));
    this.role.transition({ t: 'pair-added', pair: p }, { pair: id, peer: `${config.peerHost}:${config.peerPort}`, remoteVolume: config.remoteVolume, baseSet: copy.baseSet, copy: plan.kind });
    this.startSender(this.role.pairs.find((x) => x.id === id)!);
    this.releaseSets();
    return this.role.pairs.find((x) => x.id === id)!;
  }

  /**
   * A base snapshot for a copy (stamped with the set it equals) and what the copy moves.
   * `first`: no other pair needs the changes so far, so the change log starts empty.
   */
  private async startCopy(id: string, plan: InitialCopyPlan, first: boolean, reason: string): Promise<InitialCopyRecord> {
    const startedAtMs = this.platform.clock.now();
    const baseSnapshot = `repl-base-${id}-${startedAtMs.toString(36)}`;
    // A new copy: what the replica acknowledged before is being replaced.
    this.upstreamAckedCutAtMs.delete(id);
    const set = await this.cut({ snapshotName: baseSnapshot, reason, force: true, forget: first });
    if (set === null) throw new DeltavolError('SAVE_AREA_FULL', 'outbound save area full: cannot start an initial copy now');
    // Every write acknowledged before this time is in the base. A cascade's middle holds its
    // primary's writes: the time is that primary's cut of the set the base equals (0:
    // unknown), not this node's clock (simulator seed 930682: C's copy of an empty B
    // counted the risk from B's base time and hid every write A had acknowledged before).
    const baseCutAtMs = this.cutGate === null ? startedAtMs : (this.upstreamOfSet.get(set)?.cutAtMs ?? 0);
    const bs = this.volume.blockBytes;
    let totalBytes: number;
    if (plan.kind === 'differential') {
      const blocks = plan.blocks(baseSnapshot);
      this.fsys.writeAtomic(copyFile(id), Buffer.from(JSON.stringify(blocks.runs())));
      const valid = this.volume.snapshotValidBlocks(baseSnapshot);
      valid.intersect(blocks);
      totalBytes = valid.count() * bs;
    } else if (plan.kind === 'everything') {
      totalBytes = this.volume.snapshotValidBlocks(baseSnapshot).count() * bs;
    } else {
      if (this.fsys.exists(copyFile(id))) this.fsys.remove(copyFile(id));
      totalBytes = this.volume.snapshotValidBlocks(baseSnapshot).count() * bs;
    }
    return { done: false, baseSet: set, baseSnapshot, totalBytes: Math.min(totalBytes, this.volume.sizeBytes), kind: plan.kind, baseCutAtMs };
  }

  /** The blocks a differential copy moves (null: the whole base). */
  copyBlocks(p: PairRecord): PagedBitmap | null {
    if (p.initialCopy.kind !== 'differential') return null;
    const bits = readRuns(this.fsys, copyFile(p.id), this.volume.blocksTotal);
    if (!bits) throw new DeltavolError('METADATA_CORRUPT', `pair ${p.id}: the block list of its differential copy (${copyFile(p.id)}) is missing`);
    return bits;
  }

  async removePair(id: string): Promise<void> {
    const p = this.pair(id);
    await this.senders.get(p.id)?.stop();
    this.senders.delete(p.id);
    this.closeStream(p.id, 'pair removed');
    this.role.transition({ t: 'pair-removed', pairId: p.id }, { pair: p.id });
    this.distant.forgetVia(p.id);
    this.role.saveProgress();
    for (const f of [pendingFile(p.id), copyFile(p.id)]) if (this.fsys.exists(f)) this.fsys.remove(f);
    this.pending.delete(p.id);
    this.upstreamAckedCutAtMs.delete(p.id);
    this.catchUpCutFor.delete(p.id);
    if (p.initialCopy.baseSnapshot && this.volume.snapshots().some((s) => s.name === p.initialCopy.baseSnapshot)) {
      await this.volume.deleteSnapshot(p.initialCopy.baseSnapshot, true);
    }
    this.releaseSets();
  }

  async suspend(id: string): Promise<PairRecord> {
    const p = this.pair(id);
    p.operatorSuspended = true;
    this.saveState();
    await this.senders.get(p.id)!.suspend();
    return p;
  }

  resume(id: string): PairRecord {
    const p = this.pair(id);
    p.operatorSuspended = false;
    this.saveState();
    this.senders.get(p.id)!.resume();
    return p;
  }

  /** The replica acknowledged sets up to `set` and played up to `played`. */
  onAck(p: PairRecord, set: number, played: number): void {
    let changed = false;
    if (set > p.ackedSet) {
      p.ackedSet = set;
      changed = true;
    }
    if (played > p.playedSet) {
      p.playedSet = played;
      changed = true;
    }
    // A cascade's middle: which of its primary's sets the replica now holds whole (the
    // initial copy's base set too, acknowledged as played when the copy is done).
    const upAcked = this.upstreamOfSet.get(set);
    if (upAcked?.cutAtMs != null && upAcked.cutAtMs > (this.upstreamAckedCutAtMs.get(p.id) ?? -Infinity)) this.upstreamAckedCutAtMs.set(p.id, upAcked.cutAtMs);
    const up = this.upstreamOfSet.get(played);
    if (up !== undefined && up.set > (p.upstreamPlayed ?? -1) && p.playedSet === played) {
      p.upstreamPlayed = up.set;
      p.upstreamPlayedCutAtMs = up.cutAtMs;
      changed = true;
    }
    for (const k of [...this.upstreamOfSet.keys()]) if (k < played && this.role.pairs.every((x) => x.playedSet > k)) this.upstreamOfSet.delete(k);
    if ((this.catchUpCutFor.get(p.id) ?? Infinity) <= p.ackedSet) this.catchUpCutFor.delete(p.id);
    if (p.catchUp && p.ackedSet >= p.catchUp.set) {
      this.log.info({ pair: p.id, set: p.catchUp.set, from: p.catchUp.from }, 'catch-up set acknowledged');
      p.catchUp = null;
      changed = true;
    }
    if (!changed) return;
    this.forgetStreamed(p);
    this.saveState();
    this.releaseSets();
  }

  /**
   * The replica has no copy although the pair's record says it had one (its volume was
   * deleted and recreated on the peer): start a new initial copy from a new base snapshot.
   */
  async restartInitialCopy(p: PairRecord): Promise<void> {
    p.initialCopy = await this.startCopy(p.id, { kind: 'full' }, false, 'initial copy again');
    p.ackedSet = p.initialCopy.baseSet;
    p.playedSet = 0;
    p.catchUp = null;
    p.detached = false;
    this.pending.get(p.id)!.clearAll();
    this.saveState();
    this.savePending(p.id);
    this.log.warn({ pair: p.id, baseSet: p.initialCopy.baseSet }, 'the replica has lost its copy: initial copy starts again');
  }

  /** The initial copy finished and the replica holds the base set. */
  async initialCopyDone(p: PairRecord): Promise<void> {
    p.initialCopy.done = true;
    const base = p.initialCopy.baseSnapshot;
    p.initialCopy.baseSnapshot = null;
    this.saveState();
    if (this.fsys.exists(copyFile(p.id))) this.fsys.remove(copyFile(p.id));
    if (base && this.volume.snapshots().some((s) => s.name === base)) await this.volume.deleteSnapshot(base, true);
    this.log.info({ pair: p.id, baseSet: p.initialCopy.baseSet, kind: p.initialCopy.kind }, 'initial copy complete');
    this.hooks.onInitialCopyDone(p);
  }

  returnAddress(): { host: string; port: number } {
    return this.hooks.returnAddress();
  }
  onNewerGeneration(p: PairRecord, generation: number, code: string, message: string): void {
    this.hooks.onNewerGeneration(p, generation, code, message);
  }
  onRecoveryMessage(p: PairRecord, m: ReplMessage, link: Link): void {
    this.hooks.onRecoveryMessage(p, m, link);
  }
  onLinkDown(p: PairRecord): void {
    this.hooks.onLinkDown(p);
  }
  onSessionUp(p: PairRecord): void {
    this.hooks.onSessionUp(p);
  }

  /**
   * A cascade's middle is about to empty its change log (a split, a failover, a takeover)
   * without a consistent point to cut at: every pair is detached, with those blocks and the
   * blocks of every set it has not acknowledged in its pending bitmap (durable now), so its
   * next set is one catch-up set from where it stands: a replica never plays sets cut after
   * this point without the blocks cut before it (it would claim a point in time it never
   * had; the simulator found that).
   */
  forwardPending(blocks: ReadonlyBitmap, reason: string): void {
    for (const p of this.role.pairs) {
      const bits = this.pending.get(p.id)!;
      blocks.forEachRun((s, c) => bits.setRange(s, c));
      // (Their age: the uncut changes', or, on a cascade's middle, the primary's cut of the set the replica holds.)
      if (blocks.count() > 0) this.notePendingSince(p, Math.min(this.firstChangeMs ?? this.lastCutMs, p.upstreamPlayedCutAtMs ?? Infinity));
      this.detach(p);
    }
    this.saveState();
    this.releaseSets();
    this.log.info({ blocks: blocks.count(), pairs: this.role.pairs.length, reason }, 'changes not yet cut go to the pairs as pending blocks: each catches up in one set');
    this.poke();
  }

  /**
   * Pair p gives its place in the log up: the blocks of every set it has not acknowledged
   * go to its pending bitmap (durable here; the caller saves the pair records), and it
   * catches up from there in one set.
   */
  private detach(p: PairRecord): void {
    const bits = this.pending.get(p.id)!;
    if (!p.detached) {
      const from = this.holdFrom(p);
      for (const set of this.outbound.sets) {
        if (set.set < from) continue;
        for (const [b, c] of this.outbound.setBlocks(set)) if (b + c <= bits.bitsTotal) bits.setRange(b, c);
        this.notePendingSince(p, set.firstChangeAtMs);
      }
    }
    this.savePending(p.id);
    p.detached = true;
    p.catchUp = null;
  }

  /** Pending blocks of p made at t or later were added: they are at risk since the oldest. */
  private notePendingSince(p: PairRecord, t: number): void {
    if (p.pendingSinceMs === undefined || p.pendingSinceMs === null || t < p.pendingSinceMs) p.pendingSinceMs = t;
  }

  /** The replica's own writes during a split: they travel in the next (catch-up) set. */
  addSplitWrites(p: PairRecord, runs: Runs): void {
    if (runs.length === 0) return;
    const bits = this.pending.get(p.id)!;
    for (const [s, c] of runs) if (s + c <= bits.bitsTotal) bits.setRange(s, c);
    this.savePending(p.id);
    this.poke();
    this.log.info({ pair: p.id, blocks: bits.count() }, 'replica was written during the split: those blocks travel again');
  }

  /** Next set this pair must be sent after `sent` (its chain), or null when none is cut yet. */
  nextSetFor(p: PairRecord, after: number): { set: number; from: number } | null {
    if (p.detached) return null; // waits for its catch-up set
    if (p.catchUp && after < p.catchUp.set) return this.outbound.get(p.catchUp.set) ? { set: p.catchUp.set, from: p.catchUp.from } : null;
    const s = after + 1;
    return this.outbound.get(s) ? { set: s, from: after } : null;
  }

  /** First set a pair still needs from the log (Infinity when it needs none). */
  private holdFrom(p: PairRecord): number {
    if (p.detached) return Infinity;
    if (p.catchUp && p.ackedSet < p.catchUp.set) return p.catchUp.set;
    return p.ackedSet + 1;
  }

  private releaseSets(): void {
    // (A cascade's middle taking over: its new pair to the old primary is not recorded yet
    // and will need the sets cut meanwhile, the one forwarding its last changes among them.)
    if (this.cutsHeld) return;
    let hold = Infinity;
    for (const p of this.role.pairs) hold = Math.min(hold, this.holdFrom(p));
    const upTo = hold === Infinity ? this.outbound.lastSet : hold - 1;
    if (this.outbound.sets.length > 0 && this.outbound.sets[0]!.set <= upTo) {
      this.outbound.release(upTo);
      this.outboundFull = false;
    }
  }

  /**
   * The log is full: pairs that hold its oldest set and are not connected give their
   * place up; what they miss goes to their pending bitmap (durable first).
   */
  private detachStalled(): boolean {
    const oldest = this.outbound.sets[0]?.set;
    if (oldest === undefined) return false;
    let any = false;
    for (const p of this.role.pairs) {
      if (this.holdFrom(p) !== oldest || this.senders.get(p.id)?.connected) continue;
      this.detach(p);
      any = true;
      this.log.warn({ pair: p.id, pendingBlocks: this.pending.get(p.id)!.count() }, 'outbound save area full: stalled pair detached, it will catch up from its pending bitmap');
    }
    if (any) {
      this.saveState();
      this.releaseSets();
    }
    return any;
  }

  // ================= cuts =================

  upstreamChain(): ChainHop[] {
    return this.hooks.upstreamChain();
  }

  /** A replica of this volume reported its own replicas (a cascade): track where they are. */
  onDownstreamReport(p: PairRecord, hops: readonly ChainHop[]): void {
    this.distant.onReport(p.id, hops, this.outbound.lastSet);
  }

  /** This volume's replicas, and what each reported downstream of it (a cascade), for status and its own primary. */
  downstreamChain(): ChainHop[] {
    const out: ChainHop[] = [];
    for (const p of this.role.pairs) {
      const s = this.senders.get(p.id);
      out.push({ depth: 1, volume: p.remoteVolume, peer: `${p.peerHost}:${p.peerPort}`, role: 'replica', state: s?.state ?? 'fenced', generation: this.role.generation, playedSet: p.playedSet, lagSeconds: this.lagMs(p) / 1000, pairId: p.id, upstreamSet: p.upstreamPlayed ?? null });
      if (s) out.push(...deeper(s.downstream));
    }
    return out;
  }

  /** Every pair's session starts again (this volume moved up a generation: its replicas adopt it in the next hello). */
  renewSessions(reason: string): void {
    for (const s of this.senders.values()) s.renewSession(reason);
  }

  /** See cutGate (the replication service sets it while the volume is a replica). */
  setCutGate(gate: (() => boolean) | null): void {
    this.cutGate = gate;
  }

  /**
   * A cascade's middle taking over from its primary: no sets of its own and none released
   * until it is the primary with its new pair (or the takeover is off).
   */
  holdCuts(on: boolean): void {
    this.cutsHeld = on;
    if (!on) this.releaseSets();
  }

  /** Whether a cut may start now: no gate, or the gate is open and the volume is not quiescing for something else. */
  private cutPointOpen(): boolean {
    if (this.cutsHeld) return false;
    return this.cutGate === null || (this.cutGate() && !this.volume.quiescing);
  }

  /**
   * The volume is at a consistent point now (a cascade's middle: a set was played whole, or
   * a barrier applied) and nothing runs until this returns: if a cut is due, it starts now,
   * its cut point fixed before any later write (the engine holds them at its gate).
   */
  atConsistentPoint(): void {
    if (this.cutGate === null) return;
    this.tick();
  }

  private tick(): void {
    if (this.closed || this.building) return;
    if (this.role.pairs.length === 0 || !this.shipping) {
      this.outbound.trimPool(); // nothing will be built: the pool keeps only its floor
      return;
    }
    const changed = this.volume.changedBlockCount();
    const now = this.platform.clock.now();
    if (changed === 0) {
      this.lastQuietMs = now;
      this.outbound.trimPool();
    } else if (this.firstChangeMs === null) this.firstChangeMs = this.lastQuietMs;
    // (After the bookkeeping: a cascade's middle notes its changes' age even when it may not cut.)
    if (!this.cutPointOpen()) return;
    const pairs = this.role.pairs;
    const active = pairs.filter((p) => !p.operatorSuspended);
    let interval = Infinity;
    let highWater = Infinity;
    for (const p of active.length > 0 ? active : pairs) {
      interval = Math.min(interval, p.cutIntervalMs);
      highWater = Math.min(highWater, p.highWaterBytes);
    }
    // Nobody would take a set (every pair split, or detached and away): let the change log
    // accumulate; it is cut, in sets of at most setBytesMax, when a pair comes back.
    const consumers = pairs.filter((p) => !p.operatorSuspended && (!p.detached || this.senders.get(p.id)?.connected));
    if (consumers.length === 0) return;
    const catchUpWanted = pairs.some((p) => this.senders.get(p.id)?.connected && !this.streamCovers(p) && (p.detached || this.pending.get(p.id)!.count() > 0));
    // A sync pair that caught up starts its stream at a cut: now, even with nothing changed.
    const syncStart = [...this.streams.values()].some((st) => st.state === 'starting');
    const due = (changed > 0 && now - this.lastCutMs >= interval) || changed * this.volume.blockBytes >= highWater || catchUpWanted || syncStart;
    if (!due) return;
    if (syncStart) {
      void this.cut({ reason: 'sync stream start', force: true }).catch((e: Error) => this.log.error({ err: e.message }, 'delta set not built'));
      return;
    }
    // Build just ahead of the link: a set cut while the fastest shipping sender still has
    // buildAheadBytesMax to send would only be read back from the file (its chunks leave
    // the log's memory cache first) and cost a buffer per chunk. The changes wait in the
    // change log meanwhile (durable there as ever); the sender pokes when it moves on.
    if (!catchUpWanted && this.linkBehind()) return;
    void this.cut({ reason: catchUpWanted ? 'catch-up' : 'trigger' }).then(
      (n) => {
        // A backlog (more than a high-water mark waiting): cut again at once, not at the next tick.
        if (n !== null && this.volume.changedBlockCount() * this.volume.blockBytes >= highWater) this.poke();
      },
      (e: Error) => this.log.error({ err: e.message }, 'delta set not built'),
    );
  }

  /** Every sender shipping sets has at least buildAheadBytesMax still to send (none shipping: false). */
  private linkBehind(): boolean {
    let least: number | null = null;
    for (const s of this.senders.values()) {
      const n = s.unsentBytes();
      if (n !== null && (least === null || n < least)) least = n;
    }
    return least !== null && least >= L.buildAheadBytesMax;
  }

  /** Asks for a cut soon (a catch-up is wanted, or space was freed). */
  poke(): void {
    this.platform.clock.after(0, () => this.tick());
  }

  /**
   * Cuts and builds the next set (one at a time). Resolves with its number, or null when
   * there was nothing to cut or no room in the outbound save area.
   */
  cut(options: CutRequest): Promise<number | null> {
    if (options.snapshotName !== undefined && !options.forget) return this.cutRestartPoint(options);
    return this.cutSerial(options);
  }

  /**
   * Resolves when a cut may start: no set is being built and the cut gate is open. The
   * caller checks again without awaiting (cutPointFree) right before cutting, so the check
   * and the cut point are one turn of the event loop. Bounded: DELTA_SET_BUSY.
   */
  private async cutTurn(deadline: number): Promise<void> {
    if (this.building) {
      await this.building.catch(() => null);
      return;
    }
    if (this.platform.clock.now() > deadline) throw new DeltavolError('DELTA_SET_BUSY', `no consistent point to cut at within ${L.cutGateWaitMsMax / 1000} s (this replica keeps playing its primary's sets)`);
    await sleep(this.platform.clock, 10);
  }

  private cutPointFree(): boolean {
    return !this.building && this.cutPointOpen();
  }

  private async cutSerial(options: CutRequest): Promise<number | null> {
    const deadline = this.platform.clock.now() + L.cutGateWaitMsMax;
    while (options.ungated ? this.building !== null : !this.cutPointFree()) await this.cutTurn(deadline);
    // (No await between the check and the cut: its cut point is fixed in this turn.)
    const p = this.cutOnce(options);
    this.building = p;
    try {
      const n = await p;
      return n === 'not-whole' ? null : n;
    } finally {
      if (this.building === p) this.building = null;
    }
  }

  /**
   * A cut with a snapshot stamped with its set: a restart point, which must mean byte
   * equality (a replica that has played set n equals the snapshot stamped n). So the set
   * must be whole: a backlog larger than one set is cut first, in partial sets, and the
   * snapshot goes with the first cut that carries everything left. Waits (bounded) for
   * outbound space; fails with a code rather than stamping a snapshot with a set that
   * carries only part of the changes before it.
   */
  private async cutRestartPoint(options: CutRequest): Promise<number> {
    const deadline = this.platform.clock.now() + L.restartPointCutMsMax;
    for (let round = 0; ; round++) {
      const turnDeadline = this.platform.clock.now() + L.cutGateWaitMsMax;
      while (!this.cutPointFree()) await this.cutTurn(turnDeadline);
      const p = this.cutOnce({ ...options, whole: true });
      this.building = p;
      let n: number | null | 'not-whole';
      try {
        n = await p;
      } finally {
        if (this.building === p) this.building = null;
      }
      if (typeof n === 'number') return n;
      if (n === 'not-whole') {
        // More than one set's worth waits: ship part of it as an ordinary set first.
        const part = await this.cutSerial({ reason: 'backlog before a restart point' });
        if (part !== null) continue;
      }
      if (this.platform.clock.now() > deadline) {
        throw new DeltavolError(
          'SAVE_AREA_FULL',
          `no snapshot taken: the outbound save area has no room for the ${this.volume.unshippedBlockCount()} changed blocks a restart point must carry (${round} rounds in ${L.restartPointCutMsMax / 1000} s); is the replica reachable?`,
        );
      }
      await sleep(this.platform.clock, 100); // acknowledgements free space
    }
  }

  /**
   * A cascade's middle about to empty its change log: cuts what is left into sets for its
   * replicas now (partial: the volume is between two points in time), for at most
   * deadlineMs (the outbound log may have no room while a replica is slow); true when
   * nothing is left uncut.
   */
  async cutForward(reason: string, partial: boolean, deadlineMs: number): Promise<boolean> {
    const deadline = this.platform.clock.now() + deadlineMs;
    for (let i = 0; i < 1_000_000; i++) {
      if (this.volume.unshippedBlockCount() === 0 && !this.building) return true;
      if (this.platform.clock.now() > deadline) return false;
      const n = await this.cutSerial({ reason, ungated: true, partial });
      if (n === null && this.volume.unshippedBlockCount() > 0) await sleep(this.platform.clock, 50);
    }
    return false;
  }

  /** Cuts until nothing changed is left uncut (a planned handover's last sets). Returns the last set. */
  async cutEverything(reason: string): Promise<number> {
    for (let i = 0; i < 1_000_000; i++) {
      if (this.volume.unshippedBlockCount() === 0 && !this.building) return this.outbound.lastSet;
      const n = await this.cutSerial({ reason });
      if (n === null && this.volume.unshippedBlockCount() > 0) await sleep(this.platform.clock, 50);
    }
    throw new DeltavolError('DELTA_SET_BUSY', 'changes keep coming: the backlog does not drain');
  }

  private async cutOnce(options: CutRequest & { whole?: boolean }): Promise<number | null | 'not-whole'> {
    assert(!this.closed, 'replicator closed');
    const now = this.platform.clock.now();
    // (Another pair may have been added meanwhile: then its sets are needed, cut normally.)
    if (options.forget && this.role.pairs.length === 0) {
      assert(options.snapshotName !== undefined, 'forget only for a base snapshot');
      // (A cascade's middle: the base equals its primary's set u, taken in this turn like a cut's.)
      const u = this.cutGate !== null && !options.ungated ? this.hooks.upstreamPosition() : null;
      await this.volume.snapshotAndForget(options.snapshotName, this.outbound.lastSet);
      if (u !== null) this.upstreamOfSet.set(this.outbound.lastSet, u);
      this.outbound.noteCut(now); // a restart dates later changes from here
      this.lastCutMs = now;
      this.lastQuietMs = now;
      this.firstChangeMs = null;
      return this.outbound.lastSet;
    }
    const bs = this.volume.blockBytes;
    const blocksTotal = this.volume.blocksTotal;
    const changed = this.volume.changedBlockCount();
    // Connected pairs with blocks to catch up on (after a detach or a split) get them in this set.
    const catchUps = this.role.pairs.filter((p) => this.senders.get(p.id)?.connected && !this.streamCovers(p) && (p.detached || this.pending.get(p.id)!.count() > 0));
    if (changed === 0 && catchUps.length === 0 && !options.force) return null;
    // Every pair streams: the set's data is on every replica already; only its cut point
    // (a barrier in each stream) and, for a stream that breaks, its blocks are needed.
    const dataless = this.role.pairs.length > 0 && this.role.pairs.every((p) => this.streams.get(p.id)?.state === 'streaming') && options.snapshotName === undefined && catchUps.length === 0;
    const wanted = new PagedBitmap(blocksTotal);
    for (const p of catchUps) wanted.union(this.pending.get(p.id)!);
    let fit = this.outbound.blocksThatFit(bs);
    if (fit < wanted.count() + changed && this.detachStalled()) fit = this.outbound.blocksThatFit(bs);
    const setBlocksMax = Math.max(1, Math.floor(L.setBytesMax / bs));
    const room = dataless ? Infinity : Math.min(fit, setBlocksMax);
    if (room < (changed > 0 ? 2 : 1)) {
      this.outboundFull = true;
      return null;
    }
    // Catch-up blocks first (up to half the room when there are new changes too), then
    // as many changed blocks as fit; whatever is left travels in the next sets.
    const extraMax = changed > 0 ? Math.max(1, Math.floor(room / 2)) : room;
    const extra = firstBlocks(wanted, extraMax);
    const blocksMax = room - extra.count();
    const partial = changed > blocksMax || extra.count() < wanted.count();
    if (partial && options.whole) return 'not-whole';
    const n = this.outbound.lastSet + 1;
    const firstChange = this.firstChangeMs ?? now;
    // (A cascade's middle at a consistent point: this set, if whole, leaves its replicas at its primary's set u.)
    const u = this.cutGate !== null && !partial && !options.ungated ? this.hooks.upstreamPosition() : null;
    if (u !== null) this.upstreamOfSet.set(n, u);
    // Its time is that of the primary's cut it equals: every write the primary acknowledged
    // before then is in it (its replica's failover report counts from there, not from now).
    const stamp = u !== null && u.cutAtMs !== null && u.cutAtMs < now ? u.cutAtMs : now;
    // A dataless set is partial to whoever plays it from the log (a stream that broke): its
    // blocks come later, in a catch-up set.
    // A catch-up set carries pending blocks as old as its pairs' pendingSinceMs.
    let setFirstChange = Math.min(firstChange, stamp);
    for (const p of catchUps) if (p.pendingSinceMs !== undefined && p.pendingSinceMs !== null) setFirstChange = Math.min(setFirstChange, p.pendingSinceMs);
    const writer = this.outbound.beginSet(n, this.role.generation, bs, blocksTotal, partial || dataless || options.partial === true, stamp, setFirstChange);
    await this.volume.buildDeltaSet(n, writer, {
      ...(changed > blocksMax ? { blocksMax } : {}),
      ...(extra.count() > 0 ? { extra } : {}),
      ...(options.snapshotName !== undefined ? { snapshotName: options.snapshotName } : {}),
      ...(dataless ? { dataless: { keep: (members: ReadonlyBitmap) => this.keepStreamed(n, members) } } : {}),
    });
    this.outboundFull = false;
    this.lastCutMs = now;
    this.lastQuietMs = now;
    // What a partial set left behind is as old as the first change it was cut from.
    this.firstChangeMs = this.volume.changedBlockCount() > 0 ? (partial ? firstChange : now) : null;
    this.setsCut++;
    // Record first (a crash after it resends pending blocks: harmless), then shrink the
    // pending bitmaps of the pairs this set catches up, and grow those of detached pairs
    // that miss it (durable before the set can be released).
    if (!dataless) this.distant.onSetCut(writer.members);
    const shrink: PairRecord[] = [];
    for (const p of this.role.pairs) {
      if (catchUps.includes(p)) {
        if (p.detached) p.catchUp = { set: n, from: p.ackedSet };
        p.detached = false;
        shrink.push(p);
      }
    }
    this.saveState();
    let sinceMoved = false;
    for (const p of this.role.pairs) {
      const bits = this.pending.get(p.id)!;
      const before = p.pendingSinceMs;
      if (shrink.includes(p)) {
        this.catchUpCutFor.set(p.id, n);
        bits.difference(writer.members);
        if (bits.count() === 0) p.pendingSinceMs = null;
      } else if (p.detached) {
        bits.union(writer.members);
        this.notePendingSince(p, setFirstChange);
      } else continue;
      this.savePending(p.id);
      if (p.pendingSinceMs !== before) sinceMoved = true;
    }
    if (sinceMoved) this.saveState();
    // (The set may be acknowledged and released already: the engine checkpoints after the commit.)
    this.log.debug({ set: n, blocks: writer.blockCount, bytes: writer.blockCount * bs, partial, reason: options.reason, catchUps: catchUps.map((p) => p.id), ms: this.platform.clock.now() - now }, 'delta set cut');
    for (const sender of this.senders.values()) sender.wake();
    this.releaseSets();
    return n;
  }

  // ================= status =================

  /** Age of the oldest change not yet played on pair p (the data it would lose now). */
  lagMs(p: PairRecord): number {
    const now = this.platform.clock.now();
    const st = this.streams.get(p.id);
    if (st?.state === 'streaming') return st.oldestUnackedAtMs === null ? 0 : Math.max(0, now - st.oldestUnackedAtMs);
    let oldest: number | null = null;
    if (p.detached) {
      const first = this.outbound.sets.find((s) => s.set > p.ackedSet);
      oldest = first?.createdAtMs ?? this.lastCutMs;
    } else {
      for (const s of this.outbound.sets) {
        // (A set at or below the acked chain head but skipped by a catch-up is not this pair's.)
        if (s.set > p.playedSet && (!p.catchUp || s.set > p.ackedSet)) {
          oldest = s.createdAtMs;
          break;
        }
      }
    }
    if (oldest === null && this.volume.unshippedBlockCount() > 0) oldest = this.firstChangeMs ?? this.lastCutMs;
    if (!p.initialCopy.done) oldest = Math.min(oldest ?? now, Date.parse(p.createdAt));
    return oldest === null ? 0 : Math.max(0, now - oldest);
  }

  /**
   * When the oldest write the replica of pair p does not hold durably was made (null:
   * it holds everything): what a failover on that replica would lose now (its RPO).
   */
  atRiskSinceMs(p: PairRecord): number | null {
    const own = this.ownRiskSinceMs(p);
    if (this.cutGate === null) return own;
    // A cascade's middle: the writes at risk are its primary's. Those acknowledged before
    // the cut of the primary's set that the replica holds whole are on it; later ones may
    // not be (when it lacks anything of this node), and whatever this node lacks of its
    // primary is at risk on both. What the replica holds, in the primary's timeline: the newest whole set of the
    // primary it acknowledged (a failover there plays it), even when it lacks nothing of
    // this node: this node may hold sets of its primary it has not played (so not forwarded)
    // yet. Simulator seed 920023: C had every set B had cut, B held A's sets up to 10
    // received and reported its own risk (since 1.018) to C, which held only A's set 4
    // (cut at 0.618): C's failover lost writes acknowledged at 0.662 and did not say so.
    const heldCutAtMs = Math.max(this.upstreamAckedCutAtMs.get(p.id) ?? -Infinity, p.upstreamPlayedCutAtMs ?? -Infinity);
    let since = this.hooks.upstreamRiskSinceMs();
    const tighten = (t: number) => (since = since === null ? t : Math.min(since, t));
    if (Number.isFinite(heldCutAtMs)) tighten(heldCutAtMs);
    if (own !== null) tighten(own);
    return since;
  }

  private ownRiskSinceMs(p: PairRecord): number | null {
    // Streaming: the replica has every write whose reply went out; at risk is what waits for it.
    const st = this.streams.get(p.id);
    if (st?.state === 'streaming') return st.oldestUnackedAtMs;
    let since: number | null = null;
    const consider = (t: number) => (since = since === null ? t : Math.min(since, t));
    for (const s of this.outbound.sets) {
      if (s.set <= p.ackedSet) continue;
      if (p.catchUp && s.set < p.catchUp.set && s.set > p.catchUp.from) continue; // folded into the catch-up set
      consider(s.firstChangeAtMs);
      break;
    }
    if (p.detached || this.pending.get(p.id)!.count() > 0) consider(p.pendingSinceMs ?? this.lastCutMs);
    if (this.volume.unshippedBlockCount() > 0) consider(this.firstChangeMs ?? this.lastCutMs);
    if (!p.initialCopy.done) consider(Date.parse(p.createdAt));
    return since;
  }

  /** Stops shipping (fenced, handed over, closing): senders end, no more cuts. */
  async stopSenders(): Promise<void> {
    await Promise.all([...this.senders.values()].map((s) => s.stop()));
    this.senders.clear();
    for (const id of [...this.streams.keys()]) this.closeStream(id, 'replication stopped');
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.stopTimer();
    await this.stopSenders();
    while (this.building) await this.building.catch(() => null);
    this.outbound.close();
  }
}

/** The first `max` set bits of `bits` (block order). */
function firstBlocks(bits: PagedBitmap, max: number): PagedBitmap {
  if (bits.count() <= max) return bits;
  const out = new PagedBitmap(bits.bitsTotal);
  let left = max;
  for (const [s, c] of bits.runs()) {
    const k = Math.min(c, left);
    out.setRange(s, k);
    left -= k;
    if (left === 0) break;
  }
  return out;
}
