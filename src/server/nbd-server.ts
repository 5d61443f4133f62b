// Why: the listeners (TCP with TCP_NODELAY, Unix sockets) and the set of live
// connections, with the limits that keep one client from starving the rest (admission:
// total, handshake and per-address caps with eviction of the longest-idle connection of
// the address holding the most; the daemon-wide memory budget and the closing of
// connections that sit on it without reading), and a shutdown that stops accepting,
// drains in-flight requests and closes every socket. TLS, when configured, is started per
// connection by NBD_OPT_STARTTLS (connection.ts), not by the listener.

import net from 'node:net';
import fs from 'node:fs';
import type { Logger } from '../util/log.js';
import type { ExportCatalog } from '../nbd/export.js';
import type { TlsServerConfig } from './tls-config.js';
import { Connection, threadpoolSendCounts, pipedWriteCounts, fileReplyCounts, trimWritePayloadBuffers, writePayloadPoolState, type ConnectionLimits } from './connection.js';
import { Admission, normalizeAddress } from './admission.js';
import { MemoryBudget } from './memory-budget.js';
import { DeltavolError } from '../util/errors.js';
import { formatBytes } from '../util/units.js';
import { collectGarbage } from '../util/gc.js';
import { readBufferPoolState, trimReadBuffers } from '../nbd/transmission.js';
import { applyTcpCongestion } from '../util/tcp-congestion.js';
import {
  connectionsMax,
  connectionsPerAddressMaxDefault,
  handshakeConnectionsMaxDefault,
  nbdBufferBytesMaxDefault,
  nbdBufferReserveBytesPerConnection,
  nbdStallTimeoutMsDefault,
  requestPayloadBytesMax,
  readAheadBytesMaxDefault,
} from '../util/limits.js';

/** The NBD server's limits under abuse (`deltavol serve` flags; README "Limits under abuse"). */
export interface NbdLimits {
  connectionsMax: number;
  handshakeConnectionsMax: number;
  connectionsPerAddressMax: number;
  bufferBytesMax: number;
  stallTimeoutMs: number;
}

export const nbdLimitsDefault: NbdLimits = {
  connectionsMax,
  handshakeConnectionsMax: handshakeConnectionsMaxDefault,
  connectionsPerAddressMax: connectionsPerAddressMaxDefault,
  bufferBytesMax: nbdBufferBytesMaxDefault,
  stallTimeoutMs: nbdStallTimeoutMsDefault,
};

/** Checks a set of limits against each other; throws EINVAL_ARGUMENT naming the flag. */
export function checkNbdLimits(l: NbdLimits): void {
  const positive = (n: number, flag: string) => {
    if (!Number.isSafeInteger(n) || n < 1) throw new DeltavolError('EINVAL_ARGUMENT', `${flag} must be a positive integer`);
  };
  positive(l.connectionsMax, '--connections-max');
  positive(l.handshakeConnectionsMax, '--handshake-connections-max');
  positive(l.connectionsPerAddressMax, '--connections-per-address-max');
  positive(l.stallTimeoutMs, '--nbd-stall-timeout');
  const bufferMin = l.connectionsMax * nbdBufferReserveBytesPerConnection + requestPayloadBytesMax + 4096;
  if (!(l.bufferBytesMax >= bufferMin)) {
    throw new DeltavolError(
      'EINVAL_ARGUMENT',
      `--nbd-buffer-bytes-max must be at least ${formatBytes(bufferMin)} (${formatBytes(nbdBufferReserveBytesPerConnection)} for each of --connections-max ${l.connectionsMax}, plus one ${formatBytes(requestPayloadBytesMax)} request)`,
    );
  }
}

/** A collection after a burst waits this long (requests finishing together release together)… */
const GC_DELAY_MS = 200;
/** …and runs at most this often. */
const GC_INTERVAL_MS = 5000;
/**
 * Pooled large buffers are dropped once their pools handed out none for this long (a
 * burst of 1 MiB requests is over): they would otherwise keep the daemon at its peak RSS
 * through the small-I/O work that follows (measured: 155 MiB kept after 4 × 1 MiB writes).
 */
const POOL_IDLE_MS = 1000;
/**
 * The freed memory is given back once more this long after the collection: V8 frees dead
 * buffers' memory on a helper thread after gc() returns, so a trim right after it can miss
 * most of it (2026-12-07: 60 dead 1 MiB buffers, RSS 126 → 91 MiB by the first trim, 44 by a
 * second one a second later; the memory-after-burst test once saw 125 → 122 under load).
 */
const TRIM_AGAIN_MS = 1000;
/** How often connections are checked for stalls while some wait for memory. */
const STALL_CHECK_INTERVAL_MS = 250;

export class NbdServer {
  private readonly servers: net.Server[] = [];
  readonly connections = new Set<Connection>();
  private nextId = 1;
  private closing = false;
  readonly limits: NbdLimits;
  readonly budget: MemoryBudget;
  readonly admission: Admission<Connection>;
  private readonly connLimits: ConnectionLimits;
  private stallTimer: NodeJS.Timeout | null = null;
  private gcTimer: NodeJS.Timeout | null = null;
  private lastGcMs = 0;
  private readonly poolTimer: NodeJS.Timeout;
  /** Each pool's hand-outs at the last idle check (unchanged over POOL_IDLE_MS: that pool is quiet). */
  private readAcquiresSeen = -1;
  private writeAcquiresSeen = -1;
  /** Connections closed because they held memory without reading while others waited. */
  stalledClosedTotal = 0;

  constructor(
    private readonly catalog: ExportCatalog,
    private readonly log: Logger,
    private readonly tls: TlsServerConfig | null = null,
    limits: Partial<NbdLimits> = {},
    /**
     * Socket I/O choices for plain (non-TLS) sockets: read into the connection's own buffers
     * (`--nbd-read-buffers own`, default) and send large replies from the threadpool
     * (`--nbd-sends threadpool`, default; native-send.ts), and splice large WRITE payloads
     * into pipes (`--nbd-writes splice`, default; socket-pipe.ts). False keeps Node's way.
     */
    io: { ownReadBuffers?: boolean; threadpoolSends?: boolean; pipedWrites?: boolean; fileReplies?: boolean; readAheadBytesMax?: number } = {},
    /** After a collection that freed buffers: give the freed memory back to the kernel (the daemon passes malloc_trim). */
    private readonly returnFreedMemory: () => void = () => {},
    /** Each request, with the connection that made it (the daemon's LoopIoPolicy). */
    requestFrom?: (client: unknown) => void,
  ) {
    this.limits = { ...nbdLimitsDefault, ...limits };
    checkNbdLimits(this.limits);
    this.budget = new MemoryBudget({
      budgetBytesMax: this.limits.bufferBytesMax,
      reserveBytesPerConnection: nbdBufferReserveBytesPerConnection,
      connectionsMax: this.limits.connectionsMax,
      hogHeadroomBytes: requestPayloadBytesMax + 4096,
    });
    this.budget.onPressure = (exhausted) => this.onMemoryPressure(exhausted);
    this.budget.onShrunk = () => this.giveMemoryBack();
    this.poolTimer = setInterval(() => this.trimQuietPools(), POOL_IDLE_MS);
    this.poolTimer.unref();
    this.admission = new Admission<Connection>({
      connectionsMax: this.limits.connectionsMax,
      handshakeMax: this.limits.handshakeConnectionsMax,
      perAddressMax: this.limits.connectionsPerAddressMax,
    });
    this.connLimits = { budget: this.budget, enteredTransmission: (c) => this.admission.handshakeDone(c), ownReadBuffers: io.ownReadBuffers ?? true, threadpoolSends: io.threadpoolSends ?? true, pipedWrites: io.pipedWrites ?? true, fileReplies: io.fileReplies ?? true, readAheadBytesMax: io.readAheadBytesMax ?? readAheadBytesMaxDefault, ...(requestFrom ? { requestFrom } : {}) };
  }

  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    const address = normalizeAddress(socket.remoteAddress);
    const peer = address ?? 'unix';
    const decision = this.admission.decide(address);
    if (decision.kind === 'refuse') {
      const caps = { 'per-address': this.limits.connectionsPerAddressMax, handshakes: this.limits.handshakeConnectionsMax, connections: this.limits.connectionsMax };
      this.log.warn({ peer, reason: decision.reason, count: decision.count, cap: caps[decision.reason] }, `refusing NBD connection: ${decision.reason} cap reached`);
      socket.destroy();
      return;
    }
    if (decision.kind === 'evict') {
      const v = decision.victim;
      this.log.warn(
        { peer, victimPeer: v.address, victimPool: decision.pool, victimIdleMs: Date.now() - v.lastActiveMs, victimBusy: v.busy },
        `evicting the longest-idle ${decision.pool} connection of the address holding the most, for a connection from an address holding fewer`,
      );
      this.admission.remove(v);
      v.destroy();
    }
    const id = this.nextId++;
    const log = this.log.child({ conn: id, peer });
    applyTcpCongestion(socket); // before any byte: replies are what it paces
    const c = new Connection(
      socket,
      this.catalog,
      log,
      (closed) => {
        this.connections.delete(closed);
        this.admission.remove(closed);
      },
      this.connLimits,
      address,
      this.tls,
    );
    this.connections.add(c);
    this.admission.add(c);
  }

  /**
   * A pool that handed out nothing for POOL_IDLE_MS drops its idle buffers, even while the
   * other one is busy: after 1 MiB writes on four connections, the WRITE payload pool kept
   * 32 MiB through the reads that followed (RSS 183-190 MiB with both pools full, measured
   * 2026-12-07 with jobs back to back). Then the dead buffers are collected (see util/gc.ts),
   * off the request path and at most every GC_INTERVAL_MS.
   */
  private trimQuietPools(): void {
    const read = readBufferPoolState();
    const write = writePayloadPoolState();
    const readQuiet = read.acquires === this.readAcquiresSeen && read.idleBytes > 0;
    const writeQuiet = write.acquires === this.writeAcquiresSeen && write.idleBytes > 0;
    this.readAcquiresSeen = read.acquires;
    this.writeAcquiresSeen = write.acquires;
    if (readQuiet || writeQuiet) this.giveMemoryBack(readQuiet, writeQuiet);
  }

  /** Drops the idle buffers of the pools named (both when the buffer budget shrank) and collects. */
  private giveMemoryBack(readPool = true, writePool = true): void {
    if (this.gcTimer) return;
    const wait = Math.max(GC_DELAY_MS, this.lastGcMs + GC_INTERVAL_MS - Date.now());
    this.gcTimer = setTimeout(() => {
      this.gcTimer = null;
      this.lastGcMs = Date.now();
      const before = process.memoryUsage.rss();
      if (readPool) trimReadBuffers(0);
      if (writePool) trimWritePayloadBuffers(0);
      if (!collectGarbage()) return;
      this.returnFreedMemory();
      setTimeout(this.returnFreedMemory, TRIM_AGAIN_MS).unref();
      const after = process.memoryUsage.rss();
      this.log.info({ rssBytesBefore: before, rssBytesAfter: after, bufferBytes: this.budget.totalBytes }, 'NBD buffers shrank after a burst: garbage collected');
    }, wait);
    this.gcTimer.unref();
  }

  private onMemoryPressure(exhausted: boolean): void {
    const b = this.budget;
    const fields = { heldBytes: b.totalBytes, sharedBytes: b.sharedBytes, budgetBytes: b.budgetBytesMax, waiting: b.waiters.size };
    if (exhausted) {
      this.log.warn(fields, 'NBD buffer budget exhausted: pausing reads from connections that need more memory (those holding the most wait longest)');
      if (!this.stallTimer) {
        this.stallTimer = setInterval(() => this.closeStalled(), STALL_CHECK_INTERVAL_MS);
        this.stallTimer.unref();
      }
    } else {
      this.log.info(fields, 'NBD buffer budget available again: no connection waits for memory');
      if (this.stallTimer) clearInterval(this.stallTimer);
      this.stallTimer = null;
    }
  }

  /**
   * While connections wait for memory, one that holds memory above its reserve and has
   * not moved it (unread replies, an unfinished WRITE payload) for the stall timeout is
   * closed: pausing it alone would keep its memory from everyone else for good.
   */
  private closeStalled(): void {
    if (this.budget.waiters.size === 0) return;
    const now = Date.now();
    for (const c of this.connections) {
      const stalled = c.stalledMs(now);
      if (stalled < this.limits.stallTimeoutMs || c.heldBytes <= this.budget.reserveBytes) continue;
      this.stalledClosedTotal++;
      c.log.warn(
        { heldBytes: c.heldBytes, stalledMs: stalled, waiting: this.budget.waiters.size },
        'closing NBD connection: it holds memory it does not read (or send) while other connections wait for memory',
      );
      c.destroy();
    }
  }

  /** Numbers for /metrics. */
  limitsSnapshot(): NbdLimitsSnapshot {
    const b = this.budget;
    return {
      limits: this.limits,
      bufferBytes: b.totalBytes,
      bufferSharedBytes: b.sharedBytes,
      bufferPeakBytes: b.peakBytes,
      waitingForMemory: b.waiters.size,
      memoryWaitsTotal: b.waitsTotal,
      stalledClosedTotal: this.stalledClosedTotal,
      threadpoolSends: threadpoolSendCounts(),
      pipedWrites: pipedWriteCounts(),
      fileReplies: fileReplyCounts(),
      poolIdleBytes: { read: readBufferPoolState().idleBytes, write: writePayloadPoolState().idleBytes },
      handshakeConnections: this.admission.handshakes,
      refusedTotal: { ...this.admission.refused },
      evictedTotal: { ...this.admission.evicted },
    };
  }

  listenTcp(port: number, host: string): Promise<number> {
    return new Promise((resolve, reject) => {
      const server = net.createServer({ noDelay: true, pauseOnConnect: true }, (s) => this.accept(s));
      server.once('error', reject);
      server.listen({ port, host }, () => {
        server.off('error', reject);
        server.on('error', (e) => this.log.error({ err: e.message }, 'NBD listener error'));
        this.servers.push(server);
        resolve((server.address() as net.AddressInfo).port);
      });
    });
  }

  listenUnix(path: string): Promise<void> {
    // A socket file left by a crashed daemon would block the bind; refuse to remove
    // anything that is not a socket.
    try {
      if (fs.lstatSync(path).isSocket()) fs.unlinkSync(path);
    } catch {
      // absent
    }
    return new Promise((resolve, reject) => {
      const server = net.createServer({ pauseOnConnect: true }, (s) => this.accept(s));
      server.once('error', reject);
      server.listen(path, () => {
        server.off('error', reject);
        this.servers.push(server);
        resolve();
      });
    });
  }

  async close(drainMs: number): Promise<void> {
    this.closing = true;
    clearInterval(this.poolTimer);
    if (this.stallTimer) clearInterval(this.stallTimer);
    this.stallTimer = null;
    if (this.gcTimer) clearTimeout(this.gcTimer);
    this.gcTimer = null;
    const closed = this.servers.map((s) => new Promise<void>((r) => s.close(() => r())));
    await Promise.all([...this.connections].map((c) => c.shutdown(drainMs)));
    // Sockets were ended after their last reply; a client that never closes its side
    // gets a short grace, then a hard close, so shutdown is bounded.
    if (this.connections.size > 0) {
      await new Promise((r) => setTimeout(r, 500));
      for (const c of this.connections) c.destroy();
    }
    await Promise.all(closed);
  }
}

export interface NbdLimitsSnapshot {
  limits: NbdLimits;
  bufferBytes: number;
  bufferSharedBytes: number;
  bufferPeakBytes: number;
  waitingForMemory: number;
  memoryWaitsTotal: number;
  stalledClosedTotal: number;
  /** Replies sent from the threadpool (native-send.ts), and those the socket took only part of. */
  threadpoolSends: { sends: number; partial: number };
  /** WRITE payloads spliced into pipes (socket-pipe.ts), those moved to a buffer after all (a full pipe), the pipes open, and why the last pipe could not be made. */
  pipedWrites: { piped: number; toBuffer: number; pipesOpen: number; pipeError: string | null };
  /** READ replies sent from the volume's file, and those whose rest went through memory after a full socket. */
  fileReplies: { replies: number; restReads: number };
  /** Bytes of large READ buffers and WRITE payload buffers waiting in their pools for reuse. */
  poolIdleBytes: { read: number; write: number };
  handshakeConnections: number;
  refusedTotal: Record<'per-address' | 'handshakes' | 'connections', number>;
  evictedTotal: Record<'handshake' | 'transmission', number>;
}
