// Why: the replication numbers `status` shows (pair state, sets, lag, rates, bytes
// different) as Prometheus gauges and counters on GET /metrics, so an operator can alert
// on lag (the RPO they would lose now) without parsing tables.

import type { ReplicationService } from '../replication/service.js';
import { line } from './metrics.js';

type Status = ReturnType<ReplicationService['status']>[number];

const PAIR_STATES = ['initial-copy', 'duplex', 'duplex-pending', 'suspending', 'suspend', 'failure-suspend'] as const;

function metric(out: string[], name: string, type: 'gauge' | 'counter', help: string, rows: [Record<string, string>, number][]): void {
  out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
  for (const [labels, value] of rows) out.push(line(name, labels, value));
}

export function renderReplicationMetrics(volumes: Status[]): string {
  const out: string[] = [];
  const pairs: [Record<string, string>, Extract<Status, { role: 'primary' }>['replicas'][number], Extract<Status, { role: 'primary' }>][] = [];
  const replicas: Extract<Status, { role: 'replica' }>[] = [];
  for (const v of volumes) {
    if (v.role === 'primary') for (const p of v.replicas) pairs.push([{ volume: v.volume, pair: p.id, peer: p.peer, remote_volume: p.remoteVolume }, p, v]);
    else if (v.role === 'replica') replicas.push(v);
  }
  metric(out, 'deltavol_replication_pair_state', 'gauge', 'Pair state (1 for the current state).', pairs.flatMap(([l, p]) => PAIR_STATES.map((s): [Record<string, string>, number] => [{ ...l, state: s }, p.state === s ? 1 : 0])));
  metric(out, 'deltavol_replication_lag_seconds', 'gauge', 'Age of the oldest change not yet played on the replica (data at risk now).', pairs.map(([l, p]) => [l, p.lagSeconds]));
  metric(out, 'deltavol_replication_current_set', 'gauge', 'Last delta set cut on the primary.', pairs.map(([l, , v]) => [l, v.currentSet]));
  metric(out, 'deltavol_replication_acked_set', 'gauge', 'Last delta set the replica holds durably.', pairs.map(([l, p]) => [l, p.ackedSet]));
  metric(out, 'deltavol_replication_played_set', 'gauge', 'Last delta set played on the replica.', pairs.map(([l, p]) => [l, p.playedSet]));
  metric(out, 'deltavol_replication_bytes_different', 'gauge', 'Bytes that may differ between primary and replica.', pairs.map(([l, p]) => [l, p.bytesDifferent]));
  metric(out, 'deltavol_replication_sent_bytes_total', 'counter', 'Bytes sent to the replica since the daemon started.', pairs.map(([l, p]) => [l, p.bytesSent]));
  metric(out, 'deltavol_replication_rate_bytes_per_second', 'gauge', 'Transfer rate over the last seconds.', pairs.map(([l, p]) => [l, p.currentBytesPerSec]));
  metric(out, 'deltavol_replication_generation', 'gauge', 'Generation count of the pair.', pairs.map(([l, p]) => [l, p.generation]));
  const prim = volumes.filter((v): v is Extract<Status, { role: 'primary' }> => v.role === 'primary');
  metric(out, 'deltavol_replication_outbound_used_bytes', 'gauge', 'Bytes of the outbound save area in use.', prim.map((v) => [{ volume: v.volume }, v.outbound.usedBytes]));
  metric(out, 'deltavol_replication_outbound_capacity_bytes', 'gauge', 'Size of the outbound save area.', prim.map((v) => [{ volume: v.volume }, v.outbound.capacityBytes]));
  metric(out, 'deltavol_replica_played_set', 'gauge', 'Last delta set played on this replica.', replicas.map((r) => [{ volume: r.volume, primary_volume: r.primaryVolume }, r.playedSet]));
  metric(out, 'deltavol_replica_acked_set', 'gauge', 'Last delta set this replica holds durably.', replicas.map((r) => [{ volume: r.volume, primary_volume: r.primaryVolume }, r.ackedSet]));
  metric(out, 'deltavol_replica_lag_seconds', 'gauge', 'Age of the oldest complete set not yet played here.', replicas.map((r) => [{ volume: r.volume, primary_volume: r.primaryVolume }, r.lagSeconds]));
  metric(out, 'deltavol_replica_inbound_bytes', 'gauge', 'Bytes held in the inbound save area.', replicas.map((r) => [{ volume: r.volume, primary_volume: r.primaryVolume }, r.inboundBytes]));
  return out.join('\n') + '\n';
}
