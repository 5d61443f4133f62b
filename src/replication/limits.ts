// Why: the replication limits and defaults in one place, named with their units, with
// the relations between them asserted at load (as src/util/limits.ts does for NBD).

import { assert } from '../util/assert.js';

/** Default TCP port of the replication listener. */
export const replicationPortDefault = 10811;
/** A ping is sent this often on an idle link. */
export const replicationHeartbeatMs = 1000;
/** A link that hears nothing for this long is declared dead. */
export const replicationSilenceMs = 6000;
/** A replica whose primary was silent this long may fail over without --force (it pings every heartbeat). */
export const primaryAliveMs = 2500;
/** Connect attempts time out after this long. */
export const replicationConnectTimeoutMs = 5000;
/** Reconnect back-off: first delay, doubled per failure up to the max. */
export const reconnectDelayMsMin = 200;
export const reconnectDelayMsMax = 5000;
/** Consecutive failed attempts before a pair goes to failure-suspend (default). */
export const retriesBeforeSuspendDefault = 5;

/** Cut triggers (defaults, per pair): a timeout and a high-water mark of changed bytes. */
export const cutIntervalMsDefault = 5000;
export const cutHighWaterBytesDefault = 64 * 1024 * 1024;
/** A set never holds more than this (a big backlog travels as several partial sets). */
export const setBytesMax = 64 * 1024 * 1024;
/** Outbound save area size (default; per volume). */
export const outboundBytesDefault = 1024 * 1024 * 1024;
/** Unacknowledged set data in flight per pair. */
export const sendWindowBytes = 256 * 1024 * 1024;
/** Socket queue the sender keeps filled (more waits for 'drain'). */
export const socketQueueBytesMax = 8 * 1024 * 1024;
/** Recent outbound chunk records kept in memory for the senders (a cache of the outbound log file). */
export const outboundCacheBytesMax = 96 * 1024 * 1024;
/**
 * Automatic cuts wait while every shipping sender still has this much of committed sets
 * to send: with one set being built besides, what a sender sends next is still cached.
 */
export const buildAheadBytesMax = 32 * 1024 * 1024;
/** A cut with a restart-point snapshot waits this long at most for outbound room for its backlog. */
export const restartPointCutMsMax = 45_000;
/** The replicator checks its cut triggers this often. */
export const replicatorTickMs = 100;

/** Sync pairs: a write the replica has not acknowledged within this long stops the stream (default). */
export const syncTimeoutMsDefault = 2000;
export const syncTimeoutMsMin = 100;
/**
 * A stream starts behind a cut, and writes made after that cut wait until its set is on the
 * replica: so it starts only when less than this is left to cut; a larger backlog ships as
 * ordinary sets first (writes answered meanwhile), each smaller than the last.
 */
export const syncStartBacklogBytesMax = 4 * 1024 * 1024;
/** Planned handover of an async pair: how long it streams first (seed 004), at most, before it holds writes anyway. */
export const handoverStreamWaitMsMax = 10_000;
/** Sync pairs: the replica acknowledges at least every this many stream items under a steady stream. */
export const syncAckEveryItems = 8;

/** A replica writes the primary's progress report down at least this often (and at every change). */
export const reportPersistMs = 10_000;
/** Replica: stop reading the link while the inbound save area holds this much. */
export const inboundBytesMaxDefault = 1024 * 1024 * 1024;
/** Initial copy: bytes per init frame, and durable progress acknowledged this often. */
export const initRunBytesMax = 1024 * 1024;
export const initAckEveryBytes = 64 * 1024 * 1024;

/**
 * Unauthenticated connections (TLS handshake not finished, or no hello accepted yet): at
 * most this many per daemon and per remote address; the rest are closed at once.
 */
export const unauthConnectionsMax = 64;
export const unauthConnectionsPerAddressMax = 32;
/** A connection may buffer at most this much of a frame before its hello is accepted (a hello is ~200 bytes). */
export const helloFrameBytesMax = 64 * 1024;
/**
 * A link that reads frames' data into buffers of its own (transport.ts Conn.readInto) takes
 * them from a pool (../util/buffer-pool.ts) and keeps this much of what frames gave back for
 * the next ones: eight 1 MiB chunks, more than a replica has in hand at once. Without it a
 * replica receiving 1 GiB read it into 16384 fresh 64 KiB buffers, page faults and major
 * GCs included (~20% of its CPU, perf 2026-12-07).
 */
export const linkIdlePayloadBytesMax = 8 * 1024 * 1024;
/** Data smaller than this comes in Node's small buffers (not pooled). */
export const linkPooledPayloadBytesMin = 4096;
/**
 * Link frames this large or larger are handed to the socket from a threadpool thread
 * (../util/threadpool-sender.ts): a replicating primary's loop spent ~10% in the link's
 * socket sends of 1 MiB chunk frames (perf, 1 MiB NBD writes in duplex).
 */
export const linkThreadpoolSendBytesMin = 256 * 1024;
/**
 * How long such a send waits in its thread for room in a full socket before Node's loop
 * sends the rest: the replica reads more slowly than the primary writes, and a send that
 * returned at once left 60% of frames to the loop. One link holds one of four threads.
 */
export const linkThreadpoolSendWaitMs = 20;
/** Frames that arrive behind a hello before it is accepted are held up to this many bytes. */
export const earlyFrameBytesMax = 4 * 1024 * 1024;
/** A TLS handshake on the replication port must finish within this time. */
export const tlsHandshakeTimeoutMs = 10_000;
/** A connection must say hello within this time (after its TLS handshake). */
export const helloTimeoutMs = 10_000;

assert(unauthConnectionsPerAddressMax <= unauthConnectionsMax, 'the per-address cap fits the daemon cap');
assert(helloFrameBytesMax * unauthConnectionsMax <= 16 * 1024 * 1024, 'unauthenticated peers hold at most 16 MiB of frame buffers');
assert(reconnectDelayMsMin <= reconnectDelayMsMax, 'back-off bounds');
assert(syncTimeoutMsDefault < replicationSilenceMs, 'a sync pair gives up on a silent replica before the link does');
assert(replicationHeartbeatMs * 3 <= replicationSilenceMs, 'several heartbeats fit in the silence window');
assert(replicationHeartbeatMs * 2 <= primaryAliveMs && primaryAliveMs < replicationSilenceMs, 'a live primary is heard twice in the alive window');
assert(setBytesMax < outboundBytesDefault, 'a full set fits the default outbound area');
assert(buildAheadBytesMax + setBytesMax <= outboundCacheBytesMax, 'what a paced sender has yet to send stays in the outbound cache');
assert(sendWindowBytes >= 2 * setBytesMax, 'the window holds several sets (the link stays busy while one is acknowledged)');

/** A restore from the replica asks for at most this many bytes of blocks per request... */
export const restoreReadBytesMax = 4 * 1024 * 1024;
/** ...and keeps this many requests in flight (the link stays busy while blocks are written). */
export const restoreReadsInFlight = 4;
/** The replica ends a restore session that sent nothing for this long. */
export const restoreIdleMsMax = 120_000;

/** A cut on a cascade's middle waits at most this long for a consistent point (between two played sets). */
export const cutGateWaitMsMax = 30_000;
/** A cascade's middle taking over cuts what it played for its replicas for at most this long (then: pending blocks). */
export const forwardCutMsMax = 5_000;

/**
 * Playback writes runs up to this size several at once, in one call into the file
 * (replica.ts; 4 KiB random writes: one call per block cost the replica more than the
 * pwrites themselves); larger runs are written alone, where the volume decides how.
 */
export const playbackBatchRunBytesMax = 64 * 1024;
/** ...and at most this many runs per call. */
export const playbackBatchRunsMax = 1024;
