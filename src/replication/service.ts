// Why: the node's replication, in one object: it listens for peers on the replication
// port, finds (or creates) the replica volume a hello names, keeps a VolumeReplicator for
// every volume that ships and a ReplicaVolume for every volume that is a replica, resumes
// them all after a restart, answers the control API (add, remove, suspend, resume, cut,
// status, and the recovery commands), and applies every role change to the volume's
// write access. It sees volumes only through a VolumeHost and the world only through a
// ReplicationPlatform; recovery (src/recovery) acts through the RecoveryContext it implements.

import type { Logger } from '../util/log.js';
import { DeltavolError } from '../util/errors.js';
import type { DurableFs } from '../util/durable-fs.js';
import type { SnapshotInfo } from '../snapshot/snapshot-queue.js';
import { RoleRecord, type PairConfig, type PairRecord, type RoleEvent, type RoleState } from '../recovery/role-record.js';
import type { RecoveryContext } from '../recovery/context.js';
import * as failover from '../recovery/failover.js';
import * as handover from '../recovery/handover.js';
import * as resync from '../recovery/resync.js';
import * as restore from '../recovery/restore.js';
import { deeper, type ChainHop } from './chain.js';
import { Link } from './link.js';
import type { Frame, ReplMessage } from './wire.js';
import { VolumeReplicator, type ReplicatorHooks } from './replicator.js';
import { ReplicaVolume } from './replica.js';
import type { SyncStream } from './sync-stream.js';
import type { VolumeHost } from './ports.js';
import type { ReplicationPlatform } from './platform.js';
import type { Admission, Conn, Listener } from './transport.js';
import { AdmissionGate } from './admission.js';
import { publicRefusal } from './refusal.js';
import * as L from './limits.js';

/** The description of a replica volume this node creates (also how a half-made one is recognised). */
const replicaDescription = (primaryVolume: string) => `replica of ${primaryVolume}`;

type Hello = Extract<ReplMessage, { t: 'hello' }>;

export interface ReplicationConfig {
  host: string;
  port: number;
  /** The address peers should dial back (host '' = the address they see us at; port 0 = the bound port). */
  advertiseHost: string;
  advertisePort: number;
  outboundBytes: number;
  playbackDelayMs: number;
  inboundBytesMax: number;
  /** What protects the port (shown by status; the transport in the platform enforces it). */
  security?: ReplicationSecurity;
}

export interface ReplicationSecurity {
  /** 'none': plain TCP, peers unauthenticated (loopback, or --insecure). */
  mode: 'none' | 'psk' | 'x509';
  /** Ours, as peers see it (`psk:NAME`, `x509:CN`). */
  identity: string | null;
  fingerprint: string | null;
  allow: string[] | null;
  insecure: boolean;
}

export interface AddReplicaOptions {
  peerHost: string;
  peerPort: number;
  remoteVolume?: string;
  cutIntervalMs?: number;
  highWaterBytes?: number;
  retriesBeforeSuspend?: number;
  mode?: 'async' | 'sync';
  fence?: 'never' | 'data';
  syncTimeoutMs?: number;
}

export class ReplicationService implements RecoveryContext {
  private readonly roles = new Map<string, RoleRecord>();
  private readonly replicators = new Map<string, VolumeReplicator>();
  private readonly replicas = new Map<string, ReplicaVolume>();
  private listener: Listener | null = null;
  private readonly links = new Set<Link>();
  private stopped = false;
  private readonly gate: AdmissionGate;

  constructor(
    readonly host: VolumeHost,
    readonly platform: ReplicationPlatform,
    private readonly config: ReplicationConfig,
    readonly log: Logger,
  ) {
    this.gate = new AdmissionGate(
      { connectionsMax: L.unauthConnectionsMax, connectionsPerAddressMax: L.unauthConnectionsPerAddressMax, handshakeTimeoutMs: L.tlsHandshakeTimeoutMs },
      log.child({ part: 'replication-port' }),
      () => platform.clock.now(),
    );
  }

  get port(): number {
    return this.listener?.port ?? 0;
  }

  // ================= RecoveryContext =================

  stateFs(volume: string): DurableFs {
    return this.host.stateFs(volume);
  }

  /** The volume's role record (opened on first use; every change reaches the volume's write access). */
  role(volume: string): RoleRecord {
    let r = this.roles.get(volume);
    if (r) return r;
    const v = this.host.require(volume);
    r = RoleRecord.open(this.host.stateFs(volume), this.log.child({ volume }), () => this.platform.clock.now());
    const record = r;
    record.onChange((s, e) => {
      v.setWriteAccess(record.writeAccess);
      this.onRoleChange(volume, s, e);
    });
    v.setWriteAccess(r.writeAccess);
    this.roles.set(volume, r);
    return r;
  }

  private onRoleChange(volume: string, s: Readonly<RoleState>, e: RoleEvent | null): void {
    // A fenced primary ships nothing more: its senders stop at their next turn.
    if (s.fenced) for (const sender of this.replicators.get(volume)?.senders.values() ?? []) sender.wake();
    const r = this.replicators.get(volume);
    // The middle of a cascade cuts only at consistent points; once a primary, at any time.
    r?.setCutGate(s.role === 'replica' ? this.cutGateOf(volume) : null);
    // It took over from its primary: its own replicas get the new generation in a new hello.
    if (r && (e?.t === 'failed-over' || e?.t === 'took-over')) r.renewSessions('this volume took over from its primary: new generation');
  }

  /** A replica's own sets are cut only when it equals its primary at a point in time (cascade). */
  private cutGateOf(volume: string): () => boolean {
    return () => this.replicas.get(volume)?.atConsistentPoint() ?? false;
  }

  replica(volume: string): ReplicaVolume | undefined {
    return this.replicas.get(volume);
  }

  openedReplicator(volume: string): VolumeReplicator | undefined {
    return this.replicators.get(volume);
  }

  replicator(volume: string): VolumeReplicator {
    let r = this.replicators.get(volume);
    if (r) return r;
    const v = this.host.require(volume);
    const role = this.role(volume);
    r = new VolumeReplicator(v, this.host.stateFs(volume), role, this.log.child({ volume }), this.platform, { outboundBytes: this.config.outboundBytes }, this.hooksFor(volume));
    // A replica that ships is the middle of a cascade (seed 002): it forwards what it plays.
    if (role.role === 'replica') r.setCutGate(this.cutGateOf(volume));
    this.replicators.set(volume, r);
    r.start();
    return r;
  }

  private hooksFor(volume: string): ReplicatorHooks {
    return {
      returnAddress: () => this.returnAddress(),
      onNewerGeneration: (p, generation, code, message) => handover.onNewerGeneration(this, volume, p, generation, code, message),
      onRecoveryMessage: (p, m, link) => handover.onPrimaryMessage(this, volume, p, m, link),
      onLinkDown: (p) => handover.onLinkDown(this, volume, p),
      onSessionUp: (p) => handover.onSessionUp(this, volume, p),
      onInitialCopyDone: (p) => void resync.onCopyDone(this, volume, p).catch((e: Error) => this.log.error({ volume, err: e.message }, 'closing the failover record failed')),
      upstreamChain: () => this.upstreamChainOf(volume),
      upstreamPosition: () => {
        const role = this.role(volume);
        const up = role.upstream;
        return role.role === 'replica' && up!.consistent && this.replicas.get(volume)?.atConsistentPoint() ? { set: up!.playedSet, cutAtMs: up!.playedCutAtMs } : null;
      },
      upstreamRiskSinceMs: () => {
        const role = this.role(volume);
        const rv = this.replicas.get(volume);
        return role.role === 'replica' && rv ? rv.rpo().atRiskSinceMs : null;
      },
    };
  }

  /**
   * The whole chain this volume is in, top first: what is upstream (its primary, its
   * primary's primary...), this node, then its replicas and theirs (seed 002's three sites).
   */
  private chainOf(volume: string, state: string) {
    const role = this.role(volume);
    const up = this.upstreamChainOf(volume).reverse().map((h) => ({ position: 'upstream' as const, ...h }));
    const here = { position: 'here' as const, depth: 0, volume, peer: '', role: role.role, state, generation: role.generation, playedSet: role.upstream?.playedSet ?? null, lagSeconds: null };
    const down = (this.replicators.get(volume)?.downstreamChain() ?? []).map((h) => ({ position: 'downstream' as const, ...h }));
    return [...up, here, ...down];
  }

  /** A cascade: this volume's primary (when it is a replica) and what that primary reported further up. */
  private upstreamChainOf(volume: string): ChainHop[] {
    const role = this.role(volume);
    const rv = this.replicas.get(volume);
    if (role.role !== 'replica' || !rv) return [];
    const up = role.upstream!;
    return [
      { depth: 1, volume: up.primaryVolume, peer: rv.primaryAddress, role: 'primary', state: rv.stateWord, generation: role.generation, playedSet: up.playedSet, lagSeconds: rv.status().lagSeconds },
      ...deeper(rv.upstreamChain),
    ];
  }

  async openReplica(volume: string): Promise<ReplicaVolume> {
    const existing = this.replicas.get(volume);
    if (existing) return existing;
    const rv = new ReplicaVolume(this.host.require(volume), this.host.stateFs(volume), this.role(volume), this.log.child({ replica: volume }), this.platform, {
      playbackDelayMs: this.config.playbackDelayMs,
      inboundBytesMax: this.config.inboundBytesMax,
      onRecoveryMessage: (m, link) => handover.onReplicaMessage(this, volume, m, link),
      onConsistentPoint: () => this.replicators.get(volume)?.atConsistentPoint(),
      beforeDiscard: () => this.forwardEverything(volume, 'before a split empties the change log'),
      downstreamChain: () => this.replicators.get(volume)?.downstreamChain() ?? [],
    });
    this.replicas.set(volume, rv);
    await rv.recover();
    return rv;
  }

  /**
   * The middle of a cascade is about to empty its change log (a split, a failover, a
   * takeover): what it played and did not cut yet is cut for its replicas first (a partial
   * set when it is between two points in time). Only if the outbound log has no room for
   * it within the bound do those blocks become the pairs' pending blocks instead (each then
   * catches up in one set), so the takeover does not wait on a slow distant replica.
   */
  async forwardEverything(volume: string, reason: string): Promise<void> {
    const r = this.replicators.get(volume);
    const role = this.role(volume);
    if (!r || role.pairs.length === 0) return;
    const consistent = role.upstream?.consistent ?? true;
    if (await r.cutForward(reason, !consistent, L.forwardCutMsMax)) return;
    // (The change log's pending blocks include those of a set being built: sent twice, harmless.)
    const changed = this.host.require(volume).changedBlocks();
    if (changed.count() > 0) r.forwardPending(changed, reason);
  }

  async closeReplica(volume: string): Promise<void> {
    const rv = this.replicas.get(volume);
    if (!rv) return;
    this.replicas.delete(volume);
    await rv.close();
    rv.dropInbound();
  }

  async closeReplicator(volume: string): Promise<void> {
    const r = this.replicators.get(volume);
    if (!r) return;
    this.replicators.delete(volume);
    await r.close();
  }

  returnAddress(): { host: string; port: number } {
    return { host: this.config.advertiseHost, port: this.config.advertisePort || this.port };
  }

  // ================= start and stop =================

  /** Resumes every replication of the node (replicas play what they hold first), then listens. */
  async start(): Promise<number> {
    for (const v of this.host.list()) {
      try {
        const role = this.role(v.name);
        if (role.role === 'primary') this.replicator(v.name);
        if (role.role === 'replica') {
          await this.openReplica(v.name);
          if (role.upstream!.resync && !role.upstream!.resync.registered) resync.keepRegistering(this, v.name);
          if (role.pairs.length > 0) this.replicator(v.name);
        }
        const h = role.state.handover;
        if (h && !h.offered) role.transition({ t: 'handover-aborted', reason: 'the daemon restarted before the replica was offered the handover' });
        else if (h) this.log.warn({ volume: v.name, handover: h }, 'a planned handover was offered before the restart: writes stay held until the replica answers (it took over, or it welcomes this primary again)');
      } catch (e) {
        this.log.error({ volume: v.name, err: (e as Error).message }, 'replication not resumed for this volume');
      }
    }
    this.listener = await this.platform.transport.listen(this.config.host, this.config.port, (c, a) => this.onConnection(c, a), this.gate);
    return this.listener.port;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    const closing = this.listener?.close();
    for (const l of this.links) l.close('daemon stopping');
    await closing;
    for (const r of this.replicators.values()) await r.close();
    for (const rv of this.replicas.values()) await rv.close();
    this.replicators.clear();
    this.replicas.clear();
  }

  get isStopped(): boolean {
    return this.stopped;
  }

  // ================= control API =================

  private shipper(volume: string): VolumeReplicator {
    this.host.require(volume);
    const role = this.role(volume);
    if (role.pairs.length === 0) {
      if (role.role === 'replica') throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is a replica of ${role.upstream!.primaryVolume}, not a primary: run this on the primary's node (or \`deltavol failover ${volume}\` if the primary is gone)`);
      throw new DeltavolError('EINVAL_ARGUMENT', `volume ${volume} has no replicas`);
    }
    return this.replicator(volume);
  }

  async addReplica(volume: string, o: AddReplicaOptions): Promise<PairRecord> {
    const v = this.host.require(volume);
    const role = this.role(volume);
    if (role.role === 'replica' && o.mode === 'sync') throw new DeltavolError('EINVAL_ARGUMENT', `volume ${volume} is a replica of ${role.upstream!.primaryVolume}: it forwards to replicas of its own asynchronously only (a cascade: sync to the middle site, async from there)`);
    if (role.role === 'replica' && role.upstream!.resync) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is being resynced: add its replicas once that is done`);
    if (role.state.fenced) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is fenced (a newer primary exists at ${role.state.fenced.peer}): resync or unfence it first`);
    const config: PairConfig = {
      peerHost: o.peerHost,
      peerPort: o.peerPort,
      remoteVolume: o.remoteVolume ?? volume,
      cutIntervalMs: o.cutIntervalMs ?? L.cutIntervalMsDefault,
      highWaterBytes: o.highWaterBytes ?? L.cutHighWaterBytesDefault,
      retriesBeforeSuspend: o.retriesBeforeSuspend ?? L.retriesBeforeSuspendDefault,
    };
    const mode = o.mode ?? 'async';
    if (mode !== 'async' && mode !== 'sync') throw new DeltavolError('EINVAL_ARGUMENT', `mode must be async or sync, not "${String(mode)}"`);
    if (mode === 'sync') {
      const fence = o.fence ?? 'never';
      if (fence !== 'never' && fence !== 'data') throw new DeltavolError('EINVAL_ARGUMENT', `fence must be never or data, not "${String(fence)}"`);
      const timeout = o.syncTimeoutMs ?? L.syncTimeoutMsDefault;
      if (!(Number.isInteger(timeout) && timeout >= L.syncTimeoutMsMin && timeout < L.replicationSilenceMs)) {
        throw new DeltavolError('EINVAL_ARGUMENT', `the sync timeout must be from ${L.syncTimeoutMsMin} ms to below ${L.replicationSilenceMs} ms (the link's silence limit)`);
      }
      const other = role.pairs.find((p) => p.mode === 'sync');
      if (other) throw new DeltavolError('EINVAL_ARGUMENT', `volume ${volume} already has a sync replica (${other.remoteVolume} at ${other.peerHost}:${other.peerPort}); one sync replica per volume, add others as async`);
      Object.assign(config, { mode, fence, syncTimeoutMs: timeout });
    } else if (o.fence !== undefined || o.syncTimeoutMs !== undefined) {
      throw new DeltavolError('EINVAL_ARGUMENT', 'fence and sync timeout apply to sync pairs only (--mode sync)');
    }
    if (!(config.cutIntervalMs >= 10)) throw new DeltavolError('EINVAL_ARGUMENT', 'the cut interval must be at least 10 ms');
    if (!(config.highWaterBytes >= v.blockBytes)) throw new DeltavolError('EINVAL_ARGUMENT', `the high-water mark must be at least one tracking block (${v.blockBytes} bytes)`);
    if (!(Number.isInteger(config.retriesBeforeSuspend) && config.retriesBeforeSuspend >= 1)) throw new DeltavolError('EINVAL_ARGUMENT', 'retries must be a positive integer');
    return this.replicator(volume).addPair(config);
  }

  async removeReplica(volume: string, pair: string): Promise<void> {
    const r = this.shipper(volume);
    await r.removePair(r.pair(pair).id);
    if (this.role(volume).pairs.length === 0) await this.closeReplicator(volume);
  }

  private pairsOf(volume: string, pair?: string): PairRecord[] {
    const r = this.shipper(volume);
    return pair ? [r.pair(pair)] : [...r.pairs];
  }

  async suspend(volume: string, pair?: string): Promise<PairRecord[]> {
    const r = this.shipper(volume);
    const out: PairRecord[] = [];
    for (const p of this.pairsOf(volume, pair)) out.push(await r.suspend(p.id));
    return out;
  }

  resume(volume: string, pair?: string): PairRecord[] {
    const r = this.shipper(volume);
    return this.pairsOf(volume, pair).map((p) => r.resume(p.id));
  }

  /** Cuts a set now; with a snapshot name, also a snapshot stamped with that set. */
  async cut(volume: string, snapshotName?: string): Promise<{ set: number | null }> {
    const r = this.shipper(volume);
    if (this.role(volume).state.fenced) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is fenced: it ships nothing`);
    if (this.role(volume).state.handover) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is handing over: its last set is cut already`);
    const set = await r.cut({ reason: 'on demand', force: snapshotName !== undefined, ...(snapshotName !== undefined ? { snapshotName } : {}) });
    return { set };
  }

  /** Snapshots of a replica fall between two sets and carry the last one played. */
  createSnapshot(volume: string, name: string): Promise<SnapshotInfo> {
    const rv = this.replicas.get(volume);
    if (rv) return rv.createSnapshot(name);
    return this.host.require(volume).createSnapshot(name, 0);
  }

  /** A volume about to be deleted: its replication goes with it (refused while it has replicas unless force). */
  async forget(volume: string, force: boolean): Promise<void> {
    const role = this.role(volume);
    if (role.pairs.length > 0 && !force) {
      throw new DeltavolError('VOLUME_BUSY', `volume ${volume} has ${role.pairs.length} replica(s): remove them first or use --force`);
    }
    await this.closeReplicator(volume);
    const rv = this.replicas.get(volume);
    if (rv) {
      this.replicas.delete(volume);
      await rv.close();
    }
    this.roles.delete(volume);
  }

  /** Replicated volumes cannot be resized (both sides must agree on the geometry). */
  checkResizable(volume: string): void {
    if (this.role(volume).role !== 'simplex') {
      throw new DeltavolError('VOLUME_BUSY', `volume ${volume} is replicated: it cannot be resized`);
    }
  }

  /** `volume set --read-write` on a replica or a fenced primary: refused, pointing at the command that does it. */
  checkMakeWritable(volume: string): void {
    const role = this.role(volume);
    if (role.role === 'replica') {
      throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is a replica of ${role.upstream!.primaryVolume}: \`deltavol failover ${volume}\` makes it a writable primary (with --sync when the primary is reachable)`);
    }
    if (role.state.fenced && !role.state.fenced.overridden) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is fenced: \`deltavol resync ${volume}\` or \`deltavol unfence ${volume}\``);
  }

  // ================= recovery =================

  failover(volume: string, o: { now?: boolean; force?: boolean; sync?: boolean }) {
    if (o.sync) return handover.takeOver(this, volume, 'failover --sync');
    return failover.failover(this, volume, { now: o.now ?? false, force: o.force ?? false });
  }

  failback(volume: string) {
    return handover.takeOver(this, volume, 'failback');
  }

  resync(volume: string, o: resync.ResyncOptions) {
    return resync.resync(this, volume, o);
  }

  unfence(volume: string, force = false) {
    return handover.unfence(this, volume, force);
  }

  /** Rolls a primary back to its replica's content (seed 003); resolves once the copy started. */
  async restore(volume: string, o: restore.RestoreOptions) {
    if (o.abandon) return { abandoned: restore.abandonRestore(this, volume) };
    const { plan, done } = await restore.restoreFromReplica(this, volume, o);
    void done;
    return plan;
  }

  // ================= status =================

  status(volume?: string) {
    const names = volume ? [this.host.require(volume).name] : this.host.list().map((v) => v.name);
    return names.map((name) => this.volumeStatus(name));
  }

  private volumeStatus(name: string) {
    const role = this.role(name);
    const s = role.state;
    const common = {
      volume: name,
      generation: role.generation,
      fenced: s.fenced,
      handover: s.handover,
      failover: s.failover,
      restore: restore.restoreStatus(this, name),
      history: s.history.slice(-8),
    };
    const rv = this.replicas.get(name);
    if (role.role === 'replica') {
      if (!rv) throw new DeltavolError('ROLE_CONFLICT', `volume ${name}: its replica side is not running (see the daemon log)`);
      // The middle of a cascade also shows the replicas it forwards to.
      const fwd = this.replicators.get(name);
      return { ...common, ...rv.status(), state: rv.stateWord, chain: this.chainOf(name, rv.stateWord), ...(fwd && role.pairs.length > 0 ? this.primaryStatus(fwd) : {}) };
    }
    const r = this.replicators.get(name);
    const state = s.fenced ? (s.fenced.overridden ? 'diverged' : 'fenced') : s.handover ? 'handing-over' : s.restore ? 'restoring' : s.failover && s.failover.kind === 'unplanned' && (s.failover.resyncPairId === null || this.pairCopying(r, s.failover.resyncPairId)) ? 'failed-over' : role.role === 'simplex' ? 'simplex' : 'primary';
    if (!r || role.pairs.length === 0) return { ...common, role: role.role, state, replicas: [] as ReturnType<ReplicationService['primaryStatus']>['replicas'] };
    return { ...common, role: 'primary' as const, state, chain: this.chainOf(name, state), ...this.primaryStatus(r) };
  }

  private pairCopying(r: VolumeReplicator | undefined, id: string): boolean {
    const p = r?.pairs.find((x) => x.id === id);
    return p !== undefined && !p.initialCopy.done;
  }

  private primaryStatus(r: VolumeReplicator) {
    // Blocks of a set being built count as changed: they are not in any set yet.
    const changed = r.volume.unshippedBlockCount();
    const now = this.platform.clock.now();
    return {
      // A cascade: replicas of its replicas, and whether each could be caught up from here.
      distant: r.distant.status(),
      currentSet: r.outbound.lastSet,
      changedBlocksSinceCut: changed,
      outbound: { capacityBytes: r.outbound.capacityBytes, usedBytes: r.outbound.usedBytes, full: r.outboundFull, sets: r.outbound.sets.length, cachedBytes: r.outbound.cachedBytes, chunkFileReads: r.outbound.chunkFileReads, chunkFileSends: r.outbound.chunkFileSends, chunkBuffersAllocated: r.outbound.chunkBuffersAllocated, chunkBuffersReused: r.outbound.chunkBuffersReused },
      replicas: r.pairs.map((p) => {
        const s = r.senders.get(p.id);
        const inflight = new Set(s?.inflightSets.map((i) => i.set) ?? []);
        const pending = r.pendingOf(p.id).count();
        const sets = r.outbound.sets
          .filter((x) => x.set > p.playedSet && !(p.catchUp && x.set < p.catchUp.set && x.set > p.ackedSet))
          .map((x) => ({
            set: x.set,
            createdAt: new Date(x.createdAtMs).toISOString(),
            blocks: x.blocks,
            bytes: x.dataBytes,
            partial: x.partial,
            state: x.set <= p.ackedSet ? 'acknowledged' : inflight.has(x.set) ? 'sent' : 'cut',
          }));
        const atRisk = r.atRiskSinceMs(p);
        return {
          id: p.id,
          peer: `${p.peerHost}:${p.peerPort}`,
          remoteVolume: p.remoteVolume,
          peerIdentity: p.peerIdentity ?? null,
          state: s?.state ?? 'fenced',
          connected: s?.connected ?? false,
          reason: s && (s.state === 'failure-suspend' || !s.connected) ? s.lastError : null,
          reasonCode: s && (s.state === 'failure-suspend' || !s.connected) ? s.lastErrorCode : null,
          generation: r.generation,
          ackedSet: p.ackedSet,
          playedSet: p.playedSet,
          sets,
          lagSeconds: r.lagMs(p) / 1000,
          // What a failover of this replica would lose now (writes it does not hold durably).
          rpo: { atRiskSinceMs: atRisk, seconds: atRisk === null ? 0 : Math.max(0, (now - atRisk) / 1000) },
          // Blocks not yet on the replica: changed since the cut, pending, and in unacked sets.
          bytesDifferent: s?.bytesDifferent() ?? 0,
          pendingBlocks: pending,
          ...(s?.rates() ?? { currentBytesPerSec: 0, averageBytesPerSec: 0 }),
          bytesSent: s?.bytesSent ?? 0,
          initialCopy: s?.initialCopyProgress() ?? null,
          config: { cutIntervalMs: p.cutIntervalMs, highWaterBytes: p.highWaterBytes, retriesBeforeSuspend: p.retriesBeforeSuspend },
          mode: p.mode ?? 'async',
          sync: syncStatus(r.syncStreamOf(p), p, now),
          // A cascade: what this replica reported downstream of it.
          downstream: s?.downstream ?? [],
        };
      }),
    };
  }

  // ================= the replication port =================

  /** Security settings and the counters of the caps on unauthenticated connections (status, metrics). */
  securityStatus() {
    const sec = this.config.security ?? { mode: 'none' as const, identity: null, allow: null, insecure: false, fingerprint: null };
    return { ...sec, unauthenticatedConnections: this.gate.unauthenticated, ...this.gate.counters };
  }

  private onConnection(conn: Conn, admission: Admission): void {
    let target: ReplicaVolume | null = null;
    let session: ((f: Frame) => void) | null = null;
    const early: Frame[] = [];
    let earlyBytes = 0;
    let helloSeen = false;
    const peer = conn.peerIdentity;
    /** The peer is past the caps on unauthenticated connections: its hello was accepted. */
    const accepted = () => {
      admission.release();
      link.frameBytesMax = Infinity;
    };
    const refuse = (e: Error) => {
      const err = e as DeltavolError;
      const wireCode = typeof err.details?.wireCode === 'string' ? err.details.wireCode : (err.code ?? 'ERROR');
      this.gate.counters.hellosRefused++;
      this.gate.note('hello-refused', 'warn', { from: conn.remoteAddress, peer, code: wireCode, why: e.message }, 'replication hello refused');
      link.send({ t: 'refuse', code: wireCode, message: publicRefusal(peer, wireCode, e), generation: typeof err.details?.generation === 'number' ? err.details.generation : 0 });
      link.close(`hello refused: ${e.message}`);
    };
    const link = new Link(conn, this.platform.clock, (f) => {
      if (target) return target.onFrame(link, f);
      if (session) return session(f);
      if (!helloSeen && (f.msg.t === 'hello' || f.msg.t === 'resyncHello' || f.msg.t === 'restoreHello')) {
        helloSeen = true;
        cancelTimer();
        if (f.msg.t === 'resyncHello' || f.msg.t === 'restoreHello') {
          session = f.msg.t === 'resyncHello' ? resync.serveResync(this, link, f.msg) : restore.serveRestore(this, link, f.msg);
          if (!link.closed) accepted();
          return;
        }
        this.onHello(link, f.msg)
          .then((rv) => {
            target = rv;
            if (rv) {
              accepted();
              for (const e of early.splice(0)) rv.onFrame(link, e);
            }
          })
          .catch(refuse);
        return;
      }
      if (!helloSeen) {
        link.close(`expected hello, got ${f.msg.t}`);
        return;
      }
      // Frames sent right behind the hello wait for it to be accepted (bounded: the peer is not yet).
      earlyBytes += f.data?.length ?? 0;
      if (early.length > 1024 || earlyBytes > L.earlyFrameBytesMax) link.close('too many frames before the session started');
      else early.push(f);
    });
    link.frameBytesMax = L.helloFrameBytesMax;
    this.links.add(link);
    link.onClose((reason) => {
      this.links.delete(link);
      admission.release();
      if (link.oversize) {
        this.gate.counters.oversizeBeforeHello++;
        this.gate.note('oversize', 'warn', { from: conn.remoteAddress, peer, maxBytes: L.helloFrameBytesMax }, 'replication connection closed: a frame larger than a hello before the session started');
      }
      this.log.debug({ reason }, 'replication connection closed');
    });
    const cancelTimer = this.platform.clock.after(L.helloTimeoutMs, () => {
      this.gate.counters.helloTimeouts++;
      this.gate.note('hello-timeout', 'info', { from: conn.remoteAddress, peer }, 'replication connection closed: no hello in time');
      link.close('no hello');
    });
  }

  /**
   * A hello: the replica it names is found (or created, for a new pair), checked against
   * the pair bound to it, and its session handed the link. Rules (README "Replication
   * security"): over TLS a pair is bound to the identity that created it and only that
   * identity may open its sessions; a hello raises a replica's generation only for the same
   * pair, while no session of it is up: by one (its primary, the middle of a cascade, took
   * over from its own primary), or by any number while this replica's copy is not done.
   */
  private async onHello(link: Link, hello: Hello): Promise<ReplicaVolume | null> {
    const name = hello.replicaVolume;
    const peer = link.conn.peerIdentity;
    const sec = this.config.security;
    // No TLS: no identity; allowed only on loopback or with --insecure (daemon.ts). With TLS
    // the transport let only verified peers (and those on --repl-allow) this far.
    if (peer === null && sec && sec.mode !== 'none') throw new DeltavolError('PEER_REFUSED', 'unauthenticated peer');
    let v = this.host.get(name);
    if (v) {
      const role = this.role(name);
      if (role.role === 'primary' && !(await handover.completeOnHello(this, name, hello, peer))) {
        // A volume that is a primary here: the hello may come from the primary it replaced.
        throw handover.refusalForOldPrimary(this, name, hello, peer);
      }
      // A replica volume created for this very pair by a daemon killed before it wrote the
      // role record: it holds nothing, so it becomes the replica now.
      const halfMade = role.role === 'simplex' && role.state.history.length === 0 && v.description === replicaDescription(hello.primaryVolume) && !v.hasData() && v.snapshots().length === 0;
      if (halfMade) this.makeReplica(name, hello, peer);
      else if (role.role === 'simplex') throw new DeltavolError('VOLUME_EXISTS', `volume ${name} exists on this node and is not a replica`, { publicMessage: `volume ${name} exists on this node and is not a replica` });
    } else {
      if (!hello.create) throw new DeltavolError('VOLUME_NOT_FOUND', `no replica volume ${name}`, { publicMessage: `no replica volume ${name}` });
      v = await this.host.create({ name, sizeBytes: hello.sizeBytes, blockBytes: hello.blockBytes, description: replicaDescription(hello.primaryVolume) });
      this.makeReplica(name, hello, peer);
      this.log.info({ volume: name, primary: hello.primaryVolume, pair: hello.pairId, peer }, 'replica volume created');
    }
    const role = this.role(name);
    const up = role.upstream!;
    if (up.pairId !== hello.pairId) throw new DeltavolError('VOLUME_EXISTS', `volume ${name} is the replica of another pair`);
    if (peer !== null) {
      const bound = up.peerIdentity ?? null;
      if (bound === null) {
        // A pair made without TLS: the first verified primary binds it (logged: check it is the right one).
        up.peerIdentity = peer;
        role.saveProgress();
        this.log.warn({ volume: name, peer }, 'pair had no bound identity (made without TLS): bound to this peer now');
      } else if (bound !== peer) {
        throw new DeltavolError('PEER_REFUSED', `volume ${name}: its pair is bound to ${bound}, the hello came from ${peer}`);
      }
    }
    if (hello.generation > role.generation) {
      // The pair's own primary may have moved up one generation: it was the middle of a
      // cascade and took over from its primary (failover or handover); its history goes on,
      // and so does this copy of it. Adopted only one step at a time and only while no
      // session of the pair is up, so a hello never replaces the primary's session nor
      // jumps generations (a stolen pair id with 2^32-1 is refused); over TLS the hello came
      // from the identity the pair is bound to (checked above). Otherwise only a resync or a
      // handover raise a replica's generation, through their own messages. A replica whose
      // copy is not done holds nothing usable to protect: it follows its own primary across
      // any number of generations (simulator seed 950231: C, copying from B at generation 4,
      // refused B forever once B had handed over to A and failed back, at generation 6).
      const rv0 = this.replicas.get(name);
      const copying = up.initialCopy?.done === false;
      if ((hello.generation !== role.generation + 1 && !copying) || rv0?.connected) {
        throw new DeltavolError('ROLE_CONFLICT', `volume ${name}: hello with generation ${hello.generation}, newer than this replica's ${role.generation}; a newer generation comes only by a resync or a handover (or from the pair's own primary: one step once the copy is done)`);
      }
      role.transition(
        { t: 'generation-adopted', generation: hello.generation },
        { pair: hello.pairId, primary: hello.primaryVolume, why: copying ? "the pair's primary moved on while this copy was not done" : "the pair's primary took over from its own primary (cascade)" },
      );
    }
    const rv = await this.openReplica(name);
    await rv.accept(link, hello);
    return link.closed ? null : rv;
  }

  private makeReplica(name: string, hello: Hello, peerIdentity: string | null): void {
    const upstream = {
      pairId: hello.pairId,
      peerIdentity,
      primaryVolume: hello.primaryVolume,
      playedSet: 0,
      initialCopy: { done: false, offsetBytes: 0, baseSet: 0 },
      consistent: false,
      split: false,
      createdAt: new Date(this.platform.clock.now()).toISOString(),
      resync: null,
      playedCutAtMs: null,
      lastReport: null,
    };
    this.role(name).transition({ t: 'replica-created', generation: hello.generation, upstream }, { primary: hello.primaryVolume, pair: hello.pairId, peer: peerIdentity });
  }
}

/** A sync pair's stream as status shows it (null for an async pair). */
function syncStatus(st: SyncStream | null, p: PairRecord, now: number) {
  if (st === null) return null;
  return {
    fence: st.fence,
    timeoutMs: p.syncTimeoutMs ?? L.syncTimeoutMsDefault,
    // 'streaming': every write is acknowledged only once the replica has it.
    stream: st.state,
    inSync: st.state === 'streaming',
    streamingSeconds: st.startedAtMs === null ? null : Math.max(0, (now - st.startedAtMs) / 1000),
    afterSet: st.afterSet,
    unacknowledged: st.unacknowledged,
    lastBreak: st.lastBreak === null ? null : { reason: st.lastBreak.reason, at: new Date(st.lastBreak.atMs).toISOString() },
    latency: st.latency(),
    ...st.counters,
  };
}
