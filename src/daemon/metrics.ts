// Why: operators scrape numbers, not tables. Renders the daemon's counters in the
// Prometheus text exposition format for GET /metrics on the control API.

import type { Volume } from '../volume/volume.js';
import type { Connection } from '../server/connection.js';

/** One sample line of the Prometheus text format (label values escaped). */
export function line(name: string, labels: Record<string, string>, value: number): string {
  const l = Object.entries(labels)
    .map(([k, v]) => `${k}="${v.replace(/["\\\n]/g, '_')}"`)
    .join(',');
  return `${name}${l ? `{${l}}` : ''} ${value}`;
}

export function renderMetrics(volumes: Volume[], connections: Connection[], startedMs: number): string {
  const out: string[] = [];
  out.push('# HELP deltavol_uptime_seconds Seconds since the daemon started.');
  out.push('# TYPE deltavol_uptime_seconds gauge');
  out.push(line('deltavol_uptime_seconds', {}, Math.round((Date.now() - startedMs) / 1000)));
  out.push('# HELP deltavol_nbd_connections Open NBD connections.');
  out.push('# TYPE deltavol_nbd_connections gauge');
  out.push(line('deltavol_nbd_connections', {}, connections.length));
  out.push('# HELP deltavol_volume_size_bytes Volume size.');
  out.push('# TYPE deltavol_volume_size_bytes gauge');
  for (const v of volumes) out.push(line('deltavol_volume_size_bytes', { volume: v.name }, v.sizeBytes));
  out.push('# HELP deltavol_volume_allocated_bytes Bytes the volume occupies on disk.');
  out.push('# TYPE deltavol_volume_allocated_bytes gauge');
  for (const v of volumes) out.push(line('deltavol_volume_allocated_bytes', { volume: v.name }, v.allocatedBytes()));
  out.push('# HELP deltavol_volume_connections NBD connections per volume.');
  out.push('# TYPE deltavol_volume_connections gauge');
  for (const v of volumes) out.push(line('deltavol_volume_connections', { volume: v.name }, v.users));
  const totals = { requests: 0, bytesRead: 0, bytesWritten: 0 };
  for (const c of connections) {
    totals.requests += c.stats.requests;
    totals.bytesRead += c.stats.bytesRead;
    totals.bytesWritten += c.stats.bytesWritten;
  }
  out.push('# HELP deltavol_nbd_open_connection_requests Requests received on currently open connections.');
  out.push('# TYPE deltavol_nbd_open_connection_requests gauge');
  out.push(line('deltavol_nbd_open_connection_requests', {}, totals.requests));
  return out.join('\n') + '\n';
}
