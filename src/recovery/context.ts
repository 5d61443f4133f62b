// Why: failover, resync and handover change what a volume is on this node: they close a
// replica and open a primary, stop a replicator, register a pair. They do it through this
// small interface, which the replication service implements, so recovery depends on
// neither the daemon nor the service's insides (and the simulator drives the same code).

import type { Logger } from '../util/log.js';
import type { DurableFs } from '../util/durable-fs.js';
import type { VolumeHost } from '../replication/ports.js';
import type { ReplicationPlatform } from '../replication/platform.js';
import type { ReplicaVolume } from '../replication/replica.js';
import type { VolumeReplicator } from '../replication/replicator.js';
import type { RoleRecord } from './role-record.js';

export interface RecoveryContext {
  readonly host: VolumeHost;
  readonly platform: ReplicationPlatform;
  readonly log: Logger;
  role(volume: string): RoleRecord;
  stateFs(volume: string): DurableFs;
  /** The volume's replica side, when it is a replica here. */
  replica(volume: string): ReplicaVolume | undefined;
  /** The volume's primary side (opened when missing; its senders start). */
  replicator(volume: string): VolumeReplicator;
  /** The replicator if one is open (no side effects). */
  openedReplicator(volume: string): VolumeReplicator | undefined;
  /** The volume stopped being a replica: its replica side closes and its inbound sets go. */
  closeReplica(volume: string): Promise<void>;
  /** The volume stopped shipping: its senders stop and its outbound sets are released. */
  closeReplicator(volume: string): Promise<void>;
  /** The volume became a replica: its replica side opens (and accepts its primary's hello). */
  openReplica(volume: string): Promise<ReplicaVolume>;
  /** The middle of a cascade about to empty its change log: what it played goes to its own replicas first. */
  forwardEverything(volume: string, reason: string): Promise<void>;
  /** Where this node's replication port listens, for peers that must dial back. */
  returnAddress(): { host: string; port: number };
  /** The node is shutting down: background recovery work ends. */
  readonly isStopped: boolean;
}
