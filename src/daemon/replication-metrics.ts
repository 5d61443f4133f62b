// Why: the replication numbers `status` shows (role, state, generation, pair state, sets,
// lag, what a failover would lose now, bytes different, rates) as Prometheus gauges and
// counters on GET /metrics, so an operator can alert on a fenced volume or on the RPO
// without parsing tables. The same state words as status (one word per state).

import type { ReplicationService } from '../replication/service.js';
import { line } from './metrics.js';

type Status = ReturnType<ReplicationService['status']>[number];
type PrimaryStatus = Extract<Status, { currentSet: number }>;
type Pair = PrimaryStatus['replicas'][number];
type ReplicaStatus = Extract<Status, { role: 'replica' }>;

const PAIR_STATES = ['initial-copy', 'resyncing', 'duplex', 'duplex-pending', 'disconnected', 'suspending', 'suspend', 'failure-suspend', 'fenced'] as const;
const VOLUME_STATES = ['simplex', 'primary', 'failed-over', 'fenced', 'diverged', 'handing-over', 'restoring', 'initial-copy', 'resyncing', 'duplex', 'disconnected', 'suspend'] as const;

function metric(out: string[], name: string, type: 'gauge' | 'counter', help: string, rows: [Record<string, string>, number][]): void {
  out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
  for (const [labels, value] of rows) out.push(line(name, labels, value));
}

/** The replication port's protection and the caps on unauthenticated connections. */
export function renderReplicationSecurityMetrics(s: ReturnType<ReplicationService['securityStatus']>): string {
  const out: string[] = [];
  metric(out, 'deltavol_replication_tls', 'gauge', 'How the replication port is protected (1 for the current mode).', (['none', 'psk', 'x509'] as const).map((m) => [{ mode: m }, s.mode === m ? 1 : 0]));
  metric(out, 'deltavol_replication_unauthenticated_connections', 'gauge', 'Replication connections without an accepted hello (TLS handshake or hello pending).', [[{}, s.unauthenticatedConnections]]);
  const refused: [Record<string, string>, number][] = [
    [{ reason: 'daemon_cap' }, s.refusedDaemonCap],
    [{ reason: 'address_cap' }, s.refusedAddressCap],
    [{ reason: 'handshake_failed' }, s.handshakeFailures],
    [{ reason: 'handshake_timeout' }, s.handshakeTimeouts],
    [{ reason: 'oversize_before_hello' }, s.oversizeBeforeHello],
    [{ reason: 'hello_timeout' }, s.helloTimeouts],
    [{ reason: 'hello_refused' }, s.hellosRefused],
  ];
  metric(out, 'deltavol_replication_connections_refused_total', 'counter', 'Replication connections refused or closed before their session started, by reason.', refused);
  return out.join('\n') + '\n';
}

export function renderReplicationMetrics(volumes: Status[]): string {
  const out: string[] = [];
  const pairs: [Record<string, string>, Pair, PrimaryStatus][] = [];
  const replicas: ReplicaStatus[] = [];
  const primaries: PrimaryStatus[] = [];
  for (const v of volumes) {
    // (The middle of a cascade is both: a replica with pairs of its own.)
    const shipping = v as Partial<PrimaryStatus>;
    if (shipping.currentSet !== undefined && shipping.replicas) {
      const ps = v as PrimaryStatus;
      primaries.push(ps);
      for (const p of ps.replicas) pairs.push([{ volume: v.volume, pair: p.id, peer: p.peer, remote_volume: p.remoteVolume }, p, ps]);
    }
    if (v.role === 'replica') replicas.push(v as ReplicaStatus);
  }
  metric(out, 'deltavol_volume_state', 'gauge', 'Replication state of the volume (1 for the current state, with its role).', volumes.flatMap((v) => VOLUME_STATES.map((s): [Record<string, string>, number] => [{ volume: v.volume, role: v.role, state: s }, v.state === s ? 1 : 0])));
  metric(out, 'deltavol_volume_generation', 'gauge', 'Generation of the volume on this node (moves at every failover or takeover).', volumes.map((v) => [{ volume: v.volume }, v.generation]));
  metric(out, 'deltavol_volume_fenced', 'gauge', '1 when a newer primary of this volume exists elsewhere and writes are refused (0 once unfenced: see state diverged).', volumes.map((v) => [{ volume: v.volume }, v.fenced && !v.fenced.overridden ? 1 : 0]));
  metric(out, 'deltavol_replication_pair_state', 'gauge', 'Pair state (1 for the current state).', pairs.flatMap(([l, p]) => PAIR_STATES.map((s): [Record<string, string>, number] => [{ ...l, state: s }, p.state === s ? 1 : 0])));
  metric(out, 'deltavol_replication_lag_seconds', 'gauge', 'Age of the oldest change not yet played on the replica.', pairs.map(([l, p]) => [l, p.lagSeconds]));
  metric(out, 'deltavol_replication_rpo_seconds', 'gauge', 'Age of the oldest write the replica does not hold durably (what a failover would lose now).', pairs.map(([l, p]) => [l, p.rpo.seconds]));
  metric(out, 'deltavol_replication_current_set', 'gauge', 'Last delta set cut on the primary.', pairs.map(([l, , v]) => [l, v.currentSet]));
  metric(out, 'deltavol_replication_acked_set', 'gauge', 'Last delta set the replica holds durably.', pairs.map(([l, p]) => [l, p.ackedSet]));
  metric(out, 'deltavol_replication_played_set', 'gauge', 'Last delta set played on the replica.', pairs.map(([l, p]) => [l, p.playedSet]));
  metric(out, 'deltavol_replication_bytes_different', 'gauge', 'Bytes that may differ between primary and replica.', pairs.map(([l, p]) => [l, p.bytesDifferent]));
  metric(out, 'deltavol_replication_sent_bytes_total', 'counter', 'Bytes sent to the replica since the daemon started.', pairs.map(([l, p]) => [l, p.bytesSent]));
  metric(out, 'deltavol_replication_rate_bytes_per_second', 'gauge', 'Transfer rate over the last seconds.', pairs.map(([l, p]) => [l, p.currentBytesPerSec]));
  metric(out, 'deltavol_replication_generation', 'gauge', 'Generation count of the pair.', pairs.map(([l, p]) => [l, p.generation]));
  // Sync pairs only (mode sync): whether writes wait for the replica now, and what the stream did.
  const sync = pairs.filter(([, p]) => p.sync !== null);
  metric(out, 'deltavol_replication_sync_in_sync', 'gauge', 'Sync pairs: 1 while every write waits for the replica (stream up), 0 while out of sync.', sync.map(([l, p]) => [{ ...l, fence: p.sync!.fence }, p.sync!.inSync ? 1 : 0]));
  metric(out, 'deltavol_replication_sync_writes_total', 'counter', 'Sync pairs: writes sent in the stream.', sync.map(([l, p]) => [l, p.sync!.writes]));
  metric(out, 'deltavol_replication_sync_breaks_total', 'counter', 'Sync pairs: times the stream stopped (replica lost or too slow to acknowledge).', sync.map(([l, p]) => [l, p.sync!.breaks]));
  metric(out, 'deltavol_replication_sync_released_total', 'counter', 'Sync pairs, fence never: writes answered without the replica when the stream stopped.', sync.map(([l, p]) => [l, p.sync!.released]));
  metric(out, 'deltavol_replication_sync_refused_total', 'counter', 'Sync pairs, fence data: writes and flushes failed with EIO while out of sync.', sync.map(([l, p]) => [l, p.sync!.refused + p.sync!.failed]));
  metric(out, 'deltavol_replication_sync_round_trip_seconds', 'gauge', 'Sync pairs: replica round trip of the last acknowledged writes (quantile 0.5 and 0.99).', sync.flatMap(([l, p]): [Record<string, string>, number][] => (p.sync!.latency ? [[{ ...l, quantile: '0.5' }, p.sync!.latency.p50Us / 1e6], [{ ...l, quantile: '0.99' }, p.sync!.latency.p99Us / 1e6]] : [])));
  metric(out, 'deltavol_replication_outbound_used_bytes', 'gauge', 'Bytes of the outbound save area in use.', primaries.map((v) => [{ volume: v.volume }, v.outbound.usedBytes]));
  metric(out, 'deltavol_replication_outbound_capacity_bytes', 'gauge', 'Size of the outbound save area.', primaries.map((v) => [{ volume: v.volume }, v.outbound.capacityBytes]));
  const rl = (r: ReplicaStatus) => ({ volume: r.volume, primary_volume: r.primaryVolume });
  metric(out, 'deltavol_replica_played_set', 'gauge', 'Last delta set played on this replica.', replicas.map((r) => [rl(r), r.playedSet]));
  metric(out, 'deltavol_replica_acked_set', 'gauge', 'Last delta set this replica holds durably.', replicas.map((r) => [rl(r), r.ackedSet]));
  metric(out, 'deltavol_replica_lag_seconds', 'gauge', 'Age of the oldest complete set not yet played here.', replicas.map((r) => [rl(r), r.lagSeconds]));
  metric(out, 'deltavol_replica_rpo_seconds', 'gauge', "What a failover here would lose now, from the primary's last report (seconds of its writes).", replicas.map((r) => [rl(r), r.rpo.seconds]));
  metric(out, 'deltavol_replica_inbound_bytes', 'gauge', 'Bytes held in the inbound save area.', replicas.map((r) => [rl(r), r.inboundBytes]));
  return out.join('\n') + '\n';
}
