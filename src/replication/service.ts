// Why: the daemon's replication, in one object: it listens for primaries on the
// replication port, finds (or creates) the replica volume a hello names, keeps a
// VolumeReplicator for every volume that has replicas and a ReplicaVolume for every
// volume that is one, resumes them all after a restart, and answers the control API
// (add, remove, suspend, resume, cut, status). It sees volumes only through the
// registry and the ports of ports.ts.

import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { Logger } from '../util/log.js';
import { DeltavolError } from '../util/errors.js';
import { nodeDurableFs } from '../util/durable-fs.js';
import type { VolumeRegistry } from '../volume/registry.js';
import type { Volume } from '../volume/volume.js';
import type { SnapshotInfo } from '../snapshot/snapshot-queue.js';
import { Link } from './link.js';
import type { Frame, ReplMessage } from './wire.js';
import { REPLICATION_STATE_FILE, VolumeReplicator, type PairConfig, type PairRecord } from './replicator.js';
import { ReplicaVolume } from './replica.js';
import * as L from './limits.js';

const PRIMARY_DIR = 'replication';
/** A connection must say hello within this time. */
const helloTimeoutMs = 10_000;

type Hello = Extract<ReplMessage, { t: 'hello' }>;

export interface ReplicationConfig {
  host: string;
  port: number;
  outboundBytes: number;
  playbackDelayMs: number;
  inboundBytesMax: number;
}

export interface AddReplicaOptions {
  peerHost: string;
  peerPort: number;
  remoteVolume?: string;
  cutIntervalMs?: number;
  highWaterBytes?: number;
  retriesBeforeSuspend?: number;
}

export class ReplicationService {
  private readonly replicators = new Map<string, VolumeReplicator>();
  private readonly replicas = new Map<string, ReplicaVolume>();
  private readonly server: net.Server;
  private readonly links = new Set<Link>();
  private boundPort = 0;

  constructor(
    private readonly registry: VolumeRegistry,
    private readonly config: ReplicationConfig,
    private readonly log: Logger,
  ) {
    this.server = net.createServer((sock) => this.onConnection(sock));
  }

  get port(): number {
    return this.boundPort;
  }

  /** Resumes every replication of the data directory (replicas play what they hold first). */
  async start(): Promise<number> {
    for (const v of this.registry.list()) {
      try {
        if (fs.existsSync(path.join(v.dir, PRIMARY_DIR, REPLICATION_STATE_FILE))) this.openReplicator(v).start();
        if (ReplicaVolume.exists(v.dir)) {
          const rv = ReplicaVolume.open(v, v.dir, this.log.child({ replica: v.name }), this.replicaOptions());
          this.replicas.set(v.name, rv);
          await rv.recover();
        }
      } catch (e) {
        this.log.error({ volume: v.name, err: (e as Error).message }, 'replication not resumed for this volume');
      }
    }
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.config.port, this.config.host, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
    this.boundPort = (this.server.address() as net.AddressInfo).port;
    return this.boundPort;
  }

  private replicaOptions() {
    return { playbackDelayMs: this.config.playbackDelayMs, inboundBytesMax: this.config.inboundBytesMax };
  }

  private openReplicator(v: Volume): VolumeReplicator {
    let r = this.replicators.get(v.name);
    if (r) return r;
    const dir = path.join(v.dir, PRIMARY_DIR);
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    r = new VolumeReplicator(v, nodeDurableFs(dir), this.log.child({ volume: v.name }), { outboundBytes: this.config.outboundBytes });
    this.replicators.set(v.name, r);
    return r;
  }

  private replicator(volume: string): VolumeReplicator {
    this.registry.require(volume);
    const r = this.replicators.get(volume);
    if (!r || r.pairs.length === 0) throw new DeltavolError('EINVAL_ARGUMENT', `volume ${volume} has no replicas`);
    return r;
  }

  // ================= control API =================

  async addReplica(volume: string, o: AddReplicaOptions): Promise<PairRecord> {
    const v = this.registry.require(volume);
    if (this.replicas.has(volume)) throw new DeltavolError('VOLUME_READ_ONLY', `volume ${volume} is itself a replica`);
    const config: PairConfig = {
      peerHost: o.peerHost,
      peerPort: o.peerPort,
      remoteVolume: o.remoteVolume ?? volume,
      cutIntervalMs: o.cutIntervalMs ?? L.cutIntervalMsDefault,
      highWaterBytes: o.highWaterBytes ?? L.cutHighWaterBytesDefault,
      retriesBeforeSuspend: o.retriesBeforeSuspend ?? L.retriesBeforeSuspendDefault,
    };
    if (!(config.cutIntervalMs >= 10)) throw new DeltavolError('EINVAL_ARGUMENT', 'the cut interval must be at least 10 ms');
    if (!(config.highWaterBytes >= v.blockBytes)) throw new DeltavolError('EINVAL_ARGUMENT', `the high-water mark must be at least one tracking block (${v.blockBytes} bytes)`);
    if (!(Number.isInteger(config.retriesBeforeSuspend) && config.retriesBeforeSuspend >= 1)) throw new DeltavolError('EINVAL_ARGUMENT', 'retries must be a positive integer');
    return this.openReplicator(v).addPair(config);
  }

  async removeReplica(volume: string, pair: string): Promise<void> {
    await this.replicator(volume).removePair(pair);
  }

  private pairsOf(volume: string, pair?: string): PairRecord[] {
    const r = this.replicator(volume);
    return pair ? [r.pair(pair)] : [...r.pairs];
  }

  async suspend(volume: string, pair?: string): Promise<PairRecord[]> {
    const r = this.replicator(volume);
    const out: PairRecord[] = [];
    for (const p of this.pairsOf(volume, pair)) out.push(await r.suspend(p.id));
    return out;
  }

  resume(volume: string, pair?: string): PairRecord[] {
    const r = this.replicator(volume);
    return this.pairsOf(volume, pair).map((p) => r.resume(p.id));
  }

  /** Cuts a set now; with a snapshot name, also a snapshot stamped with that set. */
  async cut(volume: string, snapshotName?: string): Promise<{ set: number | null }> {
    const r = this.replicator(volume);
    const set = await r.cut({ reason: 'on demand', force: snapshotName !== undefined, ...(snapshotName !== undefined ? { snapshotName } : {}) });
    return { set };
  }

  /** Snapshots of a replica fall between two sets and carry the last one played. */
  createSnapshot(volume: string, name: string): Promise<SnapshotInfo> {
    const rv = this.replicas.get(volume);
    if (rv) return rv.createSnapshot(name);
    return this.registry.require(volume).createSnapshot(name);
  }

  /** A volume about to be deleted: its replication goes with it (refused while it has replicas unless force). */
  async forget(volume: string, force: boolean): Promise<void> {
    const r = this.replicators.get(volume);
    if (r && r.pairs.length > 0 && !force) {
      throw new DeltavolError('VOLUME_BUSY', `volume ${volume} has ${r.pairs.length} replica(s): remove them first or use --force`);
    }
    if (r) {
      await r.close();
      this.replicators.delete(volume);
    }
    const rv = this.replicas.get(volume);
    if (rv) {
      await rv.close();
      this.replicas.delete(volume);
    }
  }

  /** Replicated volumes cannot be resized (both sides must agree on the geometry). */
  checkResizable(volume: string): void {
    if ((this.replicators.get(volume)?.pairs.length ?? 0) > 0 || this.replicas.has(volume)) {
      throw new DeltavolError('VOLUME_BUSY', `volume ${volume} is replicated: it cannot be resized`);
    }
  }

  status(volume?: string) {
    const names = volume ? [this.registry.require(volume).name] : this.registry.list().map((v) => v.name);
    return names.map((name) => {
      const rv = this.replicas.get(name);
      if (rv) return { volume: name, ...rv.status() };
      const r = this.replicators.get(name);
      if (!r || r.pairs.length === 0) return { volume: name, role: 'simplex' as const, state: 'simplex' };
      return { volume: name, role: 'primary' as const, ...this.primaryStatus(r) };
    });
  }

  private primaryStatus(r: VolumeReplicator) {
    const bs = r.volume.blockBytes;
    // Blocks of a set being built count as changed: they are not in any set yet.
    const changed = r.volume.unshippedBlockCount();
    return {
      generation: r.generation,
      currentSet: r.log.lastSet,
      changedBlocksSinceCut: changed,
      outbound: { capacityBytes: r.log.capacityBytes, usedBytes: r.log.usedBytes, full: r.outboundFull, sets: r.log.sets.length },
      replicas: r.pairs.map((p) => {
        const s = r.senders.get(p.id)!;
        const inflight = new Set(s.inflightSets.map((i) => i.set));
        const pending = r.pendingOf(p.id).count();
        let outstandingBytes = 0;
        const sets = r.log.sets
          .filter((x) => x.set > p.playedSet && !(p.catchUp && x.set < p.catchUp.set && x.set > p.ackedSet))
          .map((x) => {
            if (x.set > p.ackedSet) outstandingBytes += x.dataBytes;
            return {
              set: x.set,
              createdAt: new Date(x.createdAtMs).toISOString(),
              blocks: x.blocks,
              bytes: x.dataBytes,
              partial: x.partial,
              state: x.set <= p.ackedSet ? 'acknowledged' : inflight.has(x.set) ? 'sent' : 'cut',
            };
          });
        return {
          id: p.id,
          peer: `${p.peerHost}:${p.peerPort}`,
          remoteVolume: p.remoteVolume,
          state: s.state,
          connected: s.connected,
          reason: s.state === 'failure-suspend' || !s.connected ? s.lastError : null,
          generation: r.generation,
          ackedSet: p.ackedSet,
          playedSet: p.playedSet,
          sets,
          lagSeconds: r.lagMs(p) / 1000,
          // Blocks not yet on the replica: changed since the cut, pending, and in unacked sets.
          bytesDifferent: (changed + pending) * bs + outstandingBytes,
          pendingBlocks: pending,
          ...s.rates(),
          bytesSent: s.bytesSent,
          initialCopy: s.initialCopyProgress(),
          config: { cutIntervalMs: p.cutIntervalMs, highWaterBytes: p.highWaterBytes, retriesBeforeSuspend: p.retriesBeforeSuspend },
        };
      }),
    };
  }

  // ================= the replication port =================

  private onConnection(sock: net.Socket): void {
    let target: ReplicaVolume | null = null;
    const early: Frame[] = [];
    let helloSeen = false;
    const link = new Link(sock, (f) => {
      if (target) return target.onFrame(link, f);
      if (!helloSeen && f.msg.t === 'hello') {
        helloSeen = true;
        clearTimeout(timer);
        this.onHello(link, f.msg)
          .then((rv) => {
            target = rv;
            if (rv) for (const e of early.splice(0)) rv.onFrame(link, e);
          })
          .catch((e: Error) => {
            link.send({ t: 'refuse', code: (e as DeltavolError).code ?? 'ERROR', message: e.message });
            link.close(`hello refused: ${e.message}`);
          });
        return;
      }
      if (!helloSeen) {
        link.close(`expected hello, got ${f.msg.t}`);
        return;
      }
      if (early.length > 1024) link.close('too many frames before the session started');
      else early.push(f);
    });
    this.links.add(link);
    link.onClose((reason) => {
      this.links.delete(link);
      this.log.debug({ reason }, 'replication connection closed');
    });
    const timer = setTimeout(() => link.close('no hello'), helloTimeoutMs);
    timer.unref();
  }

  private async onHello(link: Link, hello: Hello): Promise<ReplicaVolume | null> {
    const name = hello.replicaVolume;
    let rv = this.replicas.get(name);
    if (!rv) {
      if (this.replicators.get(name)?.pairs.length) throw new DeltavolError('VOLUME_EXISTS', `volume ${name} is a primary on this node`);
      let v = this.registry.get(name);
      if (v && !ReplicaVolume.exists(v.dir)) throw new DeltavolError('VOLUME_EXISTS', `volume ${name} exists on this node and is not a replica`);
      if (!v) {
        if (!hello.create) throw new DeltavolError('VOLUME_NOT_FOUND', `no replica volume ${name}`);
        v = await this.registry.create({ name, sizeBytes: hello.sizeBytes, trackingBlockBytes: hello.blockBytes, readOnly: true, description: hello.description });
        this.log.info({ volume: name, primary: hello.primaryVolume, pair: hello.pairId }, 'replica volume created');
      }
      rv = ReplicaVolume.exists(v.dir)
        ? ReplicaVolume.open(v, v.dir, this.log.child({ replica: name }), this.replicaOptions())
        : ReplicaVolume.create(v, v.dir, hello, this.log.child({ replica: name }), this.replicaOptions());
      this.replicas.set(name, rv);
    }
    if (rv.pairId !== hello.pairId) throw new DeltavolError('VOLUME_EXISTS', `volume ${name} is the replica of another pair (${rv.pairId})`);
    await rv.accept(link, hello);
    return link.closed ? null : rv;
  }

  async stop(): Promise<void> {
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    for (const l of this.links) l.close('daemon stopping');
    await closed;
    for (const r of this.replicators.values()) await r.close();
    for (const rv of this.replicas.values()) await rv.close();
    this.replicators.clear();
    this.replicas.clear();
  }
}
