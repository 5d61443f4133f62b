// Why: operators scrape numbers, not tables. Renders the daemon's counters in the
// Prometheus text exposition format for GET /metrics on the control API.

import type { Volume } from '../volume/volume.js';
import type { Connection } from '../server/connection.js';
import type { NbdLimitsSnapshot } from '../server/nbd-server.js';

/** One sample line of the Prometheus text format (label values escaped). */
export function line(name: string, labels: Record<string, string>, value: number): string {
  const l = Object.entries(labels)
    .map(([k, v]) => `${k}="${v.replace(/["\\\n]/g, '_')}"`)
    .join(',');
  return `${name}${l ? `{${l}}` : ''} ${value}`;
}

/** A metric's HELP and TYPE lines and its samples, appended to `out`. */
function metricLines(out: string[], name: string, type: 'gauge' | 'counter', help: string, samples: [Record<string, string>, number][]): void {
  out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
  for (const [labels, v] of samples) out.push(line(name, labels, v));
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
  // Work a write did before its data could go (why writes slow down while a set is built or a snapshot is young).
  out.push('# HELP deltavol_volume_copy_first_blocks_total Tracking blocks a write copied into the delta set being built before overwriting them.');
  out.push('# TYPE deltavol_volume_copy_first_blocks_total counter');
  for (const v of volumes) out.push(line('deltavol_volume_copy_first_blocks_total', { volume: v.name }, v.engine.stats.priorityCopies));
  out.push('# HELP deltavol_volume_before_images_total Tracking blocks a write saved for a snapshot before overwriting them.');
  out.push('# TYPE deltavol_volume_before_images_total counter');
  for (const v of volumes) out.push(line('deltavol_volume_before_images_total', { volume: v.name }, v.engine.stats.beforeImagesSaved));
  const totals = { requests: 0, bytesRead: 0, bytesWritten: 0 };
  for (const c of connections) {
    totals.requests += c.stats.requests;
    totals.bytesRead += c.stats.bytesRead;
    totals.bytesWritten += c.stats.bytesWritten;
  }
  out.push('# HELP deltavol_nbd_open_connection_requests Requests received on currently open connections.');
  out.push('# TYPE deltavol_nbd_open_connection_requests gauge');
  out.push(line('deltavol_nbd_open_connection_requests', {}, totals.requests));
  out.push(...processMemoryLines());
  return out.join('\n') + '\n';
}

/**
 * Where the daemon's memory is (process.memoryUsage): resident set, the V8 heap, and
 * memory outside it (Buffers: I/O buffers and pools). An RSS that stays high after a
 * burst shows here as external bytes (buffers kept) or as RSS above all three (freed
 * memory the allocator has not returned).
 */
export function processMemoryLines(): string[] {
  const m = process.memoryUsage();
  const out: string[] = [];
  const gauge = (name: string, help: string, v: number) => out.push(`# HELP ${name} ${help}`, `# TYPE ${name} gauge`, line(name, {}, v));
  gauge('deltavol_process_resident_bytes', 'Resident set size of the daemon process.', m.rss);
  gauge('deltavol_process_heap_total_bytes', 'V8 heap reserved (JavaScript objects).', m.heapTotal);
  gauge('deltavol_process_heap_used_bytes', 'V8 heap in use.', m.heapUsed);
  gauge('deltavol_process_external_bytes', 'Memory outside the V8 heap owned by JavaScript objects (Buffers).', m.external);
  gauge('deltavol_process_array_buffers_bytes', 'Of the external memory, Buffers and ArrayBuffers.', m.arrayBuffers);
  return out;
}

/** Replication link frames sent from the threadpool (util/threadpool-sender.ts), all links together. */
export function renderLinkSendMetrics(c: { sends: number; partial: number }): string {
  const out: string[] = [];
  metricLines(out, 'deltavol_repl_link_threadpool_sends_total', 'counter', 'Large replication frames handed to the socket from a threadpool thread (plain TCP links).', [[{}, c.sends]]);
  metricLines(out, 'deltavol_repl_link_threadpool_sends_partial_total', 'counter', 'Link threadpool sends the socket took only part of; Node sent the rest.', [[{}, c.partial]]);
  return out.join('\n') + '\n';
}

/** The NBD server's limits under abuse (README "Limits under abuse"). */
export function renderNbdLimitMetrics(s: NbdLimitsSnapshot): string {
  const out: string[] = [];
  const metric = (name: string, type: 'gauge' | 'counter', help: string, samples: [Record<string, string>, number][]) => metricLines(out, name, type, help, samples);
  metric('deltavol_nbd_buffer_bytes', 'gauge', 'Bytes the NBD server holds for requests and unsent replies (READ buffers, WRITE payloads, queued replies).', [[{}, s.bufferBytes]]);
  metric('deltavol_nbd_buffer_bytes_max', 'gauge', 'The NBD buffer budget (--nbd-buffer-bytes-max).', [[{}, s.limits.bufferBytesMax]]);
  metric('deltavol_nbd_buffer_shared_bytes', 'gauge', 'Part of the NBD buffers held above the per-connection reserves.', [[{}, s.bufferSharedBytes]]);
  metric('deltavol_nbd_buffer_peak_bytes', 'gauge', 'Highest NBD buffer bytes held since start.', [[{}, s.bufferPeakBytes]]);
  metric('deltavol_nbd_connections_waiting_for_memory', 'gauge', 'NBD connections not read from because the buffer budget is exhausted.', [[{}, s.waitingForMemory]]);
  metric('deltavol_nbd_memory_waits_total', 'counter', 'Times an NBD connection had to wait for buffer memory.', [[{}, s.memoryWaitsTotal]]);
  metric('deltavol_nbd_stalled_connections_closed_total', 'counter', 'NBD connections closed for holding memory they did not read while others waited.', [[{}, s.stalledClosedTotal]]);
  metric('deltavol_nbd_threadpool_sends_total', 'counter', 'Large NBD replies handed to the socket from a threadpool thread (--nbd-sends threadpool).', [[{}, s.threadpoolSends.sends]]);
  metric('deltavol_nbd_threadpool_sends_partial_total', 'counter', 'Threadpool sends the socket took only part of (it was full); Node sent the rest.', [[{}, s.threadpoolSends.partial]]);
  metric('deltavol_nbd_piped_writes_total', 'counter', 'Large NBD WRITE payloads spliced from the socket into a pipe and from there to the file (--nbd-writes splice).', [[{}, s.pipedWrites.piped]]);
  metric('deltavol_nbd_piped_writes_to_buffer_total', 'counter', 'Spliced WRITE payloads moved to a buffer midway (the pipe was full).', [[{}, s.pipedWrites.toBuffer]]);
  metric('deltavol_nbd_file_replies_total', 'counter', 'Large NBD READ replies whose data left from the volume\'s file with sendfile (--nbd-reads sendfile).', [[{}, s.fileReplies.replies]]);
  metric('deltavol_nbd_file_reply_rest_reads_total', 'counter', 'File replies the socket took only part of: their rest was read into memory and sent by Node.', [[{}, s.fileReplies.restReads]]);
  metric('deltavol_nbd_payload_pipes', 'gauge', 'Kernel pipes open for spliced WRITE payloads.', [[{}, s.pipedWrites.pipesOpen]]);
  metric('deltavol_nbd_pool_idle_bytes', 'gauge', 'Large READ buffers and WRITE payload buffers kept for reuse, by pool; a pool that hands out nothing for 1 s is emptied.', [[{ pool: 'read' }, s.poolIdleBytes.read], [{ pool: 'write' }, s.poolIdleBytes.write]]);
  metric('deltavol_nbd_handshake_connections', 'gauge', 'NBD connections still in the handshake.', [[{}, s.handshakeConnections]]);
  metric('deltavol_nbd_connections_max', 'gauge', 'Cap on NBD connections (--connections-max).', [[{}, s.limits.connectionsMax]]);
  metric('deltavol_nbd_connections_per_address_max', 'gauge', 'Cap on NBD connections from one address (--connections-per-address-max).', [[{}, s.limits.connectionsPerAddressMax]]);
  metric(
    'deltavol_nbd_connections_refused_total',
    'counter',
    'NBD connections refused, by the cap that refused them.',
    Object.entries(s.refusedTotal).map(([reason, v]) => [{ reason }, v]),
  );
  metric(
    'deltavol_nbd_connections_evicted_total',
    'counter',
    'NBD connections closed to admit one from an address holding fewer, by pool.',
    Object.entries(s.evictedTotal).map(([pool, v]) => [{ pool }, v]),
  );
  return out.join('\n') + '\n';
}
