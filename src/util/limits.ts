// Why: every limit of the server in one place, named with its unit last, with the
// relations between them asserted when the module loads (a wrong edit fails at start,
// not under load). Settings that operators may change are defaults here, overridable
// by `deltavol serve` flags.

import { assert } from './assert.js';

/** Handshake: options a client may send before it must choose an export, besides the per-export allowance. */
export const handshakeOptionsMax = 64;
/**
 * Handshake: more options allowed per export in the catalog. A listing client (nbdinfo
 * --list, qemu-img, nbdsh) sends NBD_OPT_LIST and then INFO and SET/LIST_META_CONTEXT for
 * each export on one connection, so a fixed cap broke listings of 32 exports or more.
 */
export const handshakeOptionsPerExportMax = 4;
/** Handshake: bytes of one option's data (names are ≤ 4 KiB by the spec; lists of queries more). */
export const handshakeOptionBytesMax = 64 * 1024;
/**
 * Handshake: a client must finish its next option (or reach transmission) within this
 * time; each answered option restarts it, so a long listing that makes progress is never
 * cut, while the option cap above still bounds the whole handshake.
 */
export const handshakeTimeoutMs = 30_000;
/** NBD strings (export names, context names) may be at most 4 KiB. */
export const nbdStringBytesMax = 4096;

/**
 * Minimum block size advertised in NBD_INFO_BLOCK_SIZE: 1, as nbdkit, qemu-nbd and
 * nbd-server do. The volume engine copies whole tracking blocks on any partial write,
 * so byte-granular requests are correct; advertising 512 only made libnbd refuse them.
 */
export const blockSizeMinBytes = 1;
/** Preferred block size advertised (page size: no read-modify-write below it). */
export const blockSizePreferredBytes = 4096;
/**
 * Largest READ / WRITE payload advertised (NBD_INFO_BLOCK_SIZE maximum) and held in one
 * piece. Clients that asked for block sizes are held to it (EINVAL above); clients that
 * did not (NBD_OPT_EXPORT_NAME, GO without NBD_INFO_BLOCK_SIZE) may send any length, as
 * the spec asks, and are served in pieces of streamPieceBytes.
 */
export const requestPayloadBytesMax = 32 * 1024 * 1024;
/** Larger READ / WRITE requests are moved in pieces of this size: one being filled, one on its way (memory per request is 2 pieces, not its length). */
export const streamPieceBytes = 4 * 1024 * 1024;
/** Largest effect length of TRIM / WRITE_ZEROES / CACHE / BLOCK_STATUS in one request (no payload, so larger is fine). */
export const requestEffectBytesMax = 2 ** 32 - 1;

/** Requests in flight per connection; reading stops at this count (backpressure). */
export const inflightRequestsMax = 128;
/** Bytes held per connection by requests in flight (WRITE payloads, READ buffers) before reading stops (plus at most one request). */
export const inflightPayloadBytesMax = 64 * 1024 * 1024;
/** Bytes queued on the socket (unsent replies) before reading stops until 'drain'. */
export const socketQueuedBytesMax = 32 * 1024 * 1024;

/** Reads and writes up to this size are done synchronously on the event loop (see PERF.md). */
export const syncIoBytesMaxDefault = 64 * 1024;
/** Reads/writes up to this size run on the event loop while one client is served (util/loop-io-policy.ts). */
export const syncIoLoneBytesMaxDefault = 2 * 1024 * 1024;
/**
 * Bytes of pooled READ buffers (reads of pooledReadBufferBytesMin or more) one connection
 * fills ahead of its socket; later large reads wait until a reply leaves. Every buffer in
 * flight is cold memory to the next pread: 1 MiB preads from one thread cost 64-70 us with up
 * to 8 buffers in rotation, 96 with 32 and 115-124 with 64 (2026-12-07), and 4 connections
 * at queue depth 8 kept 32+ in flight. With 3 MiB per connection, 1 MiB reads on 4
 * connections cost 253-325 against 285-329 us of CPU each (daemons alternating, lower in all
 * 5 pairs, the last by 1%), and in scripts/bench --ab 278 against 317 us with 1.09x the
 * throughput; one connection 264 against 308 us. 0 = no limit (`--nbd-read-ahead`).
 */
export const readAheadBytesMaxDefault = 3 * 1024 * 1024;
/** Structured reads at least this large send runs of zero 4 KiB blocks as OFFSET_HOLE chunks. */
export const sparseReadBytesMin = 64 * 1024;
/** READ buffers at least this large are reused from a pool instead of allocated per request. */
export const pooledReadBufferBytesMin = 64 * 1024;
/**
 * Smaller READ replies, and WRITE payloads below directPayloadBytesMin, are slices of slabs
 * of this size, reused once every slice of one is done with (util/slice-arena.ts; one arena
 * for each). Slices are at most a quarter of a slab: every such reply or payload but a few
 * bytes.
 */
export const smallBufferSlabBytes = 256 * 1024;
/** Idle slabs each of those arenas keeps (per process): 2 MiB. */
export const smallBufferSparesMax = 8;
/**
 * Idle bytes the read-buffer pool keeps for reuse (per process): what 4 connections × 8
 * × 1 MiB READs hold at once, plus a margin. It never adds to the peak (a buffer is only
 * pooled after its request held it), and it is dropped when the NBD buffers shrink after
 * a burst (nbd-server.ts).
 */
export const pooledReadBuffersBytesMax = 40 * 1024 * 1024;
/** Plain sockets read headers and small WRITE payloads into a reused arena of this size... */
export const receiveScratchBytes = 256 * 1024;
/** ...replaced by a new one when less than this is left at its end (the most one read takes there). */
export const receiveReadBytesMin = 64 * 1024;
/**
 * NBD replies this large or larger are handed to the socket from a threadpool thread
 * (native-send.ts); smaller ones cost less through Node's corked writes than the hop.
 */
export const threadpoolSendBytesMin = 256 * 1024;
/**
 * READs this large or larger whose bytes lie in the volume's file are answered from the page
 * cache (sendfile, from the threadpool sender) when the connection can: 1 MiB from tmpfs to a
 * loopback reader cost 155 us of sender CPU against 251-296 us for pread + write (CUBIC).
 */
export const fileReplyBytesMin = 256 * 1024;
/** WRITE payloads this large or larger are read straight into a pooled buffer of their own. */
export const directPayloadBytesMin = 64 * 1024;
/**
 * After a large WRITE, the next read into the arena takes at most this much (the next
 * header and the start of its payload; the rest goes straight to the payload's buffer).
 */
export const headerReadBytes = 4096;
/**
 * At most this many bytes of WRITE payload buffers sit idle in their pool: what 4
 * connections × 8 × 1 MiB WRITEs hold at once (16 MiB dropped half of each burst's
 * buffers for the GC); dropped when the NBD buffers shrink after a burst (nbd-server.ts).
 */
export const pooledWritePayloadBytesMax = 32 * 1024 * 1024;
/**
 * WRITE payloads from this many bytes (to pipedPayloadBytesMax) are spliced from a plain
 * socket into a kernel pipe and from there into the volume's file (socket-pipe.ts): one
 * copy instead of two. Smaller ones cost as much or less read into a buffer: each spliced
 * payload also stops and restarts Node's reads and arms a poll (fio random writes on one
 * connection, 2026-12-08, server CPU per write spliced / buffered: 128 KiB 84-140 / 54-100
 * µs, 256 KiB 81-84 / 85-109, 512 KiB 126-129 / 134-144).
 */
export const pipedPayloadBytesMin = 256 * 1024;
/**
 * Spliced payloads are at most this long. A pipe counts slots, not bytes: splice from TCP
 * puts one received fragment in a slot, however short, so a 1 MiB pipe (256 slots,
 * fs.pipe-max-size by default) took every one of 100 fio 2 MiB WRITEs on loopback without
 * filling (2026-12-08). A client that sends in tiny pieces can still fill one: its payload
 * then goes on in a buffer (test/interop/piped-writes.test.ts).
 */
export const pipedPayloadBytesMax = 2 * 1024 * 1024;
/**
 * A payload pipe's nominal size: this, or fs.pipe-max-size where that is lower (larger ones
 * need CAP_SYS_RESOURCE, which containers seldom have).
 */
export const payloadPipeBytes = 4 * 1024 * 1024;
/**
 * At most this many payload pipes are open in the process (two descriptors each). 32 of
 * 1 MiB are half of the default fs.pipe-user-pages-soft (16384 pages per user); 4
 * connections × 8 large WRITEs in flight need 32.
 */
export const payloadPipesMax = 32;
/** BLOCK_STATUS: extents in one reply chunk (the spec asks for at most 2^20). */
export const blockStatusExtentsMax = 65536;
/** Zero buffer used when a file system cannot punch or zero a range. */
export const zeroBufferBytes = 1024 * 1024;

/** Concurrent NBD connections per daemon, in handshake or transmission (`--connections-max`). */
export const connectionsMax = 1024;
/** NBD connections still in the handshake (each has handshakeTimeoutMs to finish; `--handshake-connections-max`). */
export const handshakeConnectionsMaxDefault = 128;
/** NBD connections from one remote address (`--connections-per-address-max`; Unix sockets are exempt). */
export const connectionsPerAddressMaxDefault = 64;
/**
 * Memory the NBD server may hold for requests and replies across all connections: READ
 * buffers in flight, WRITE payloads held, reply bytes queued on sockets (`--nbd-buffer-bytes-max`).
 * Sized with the read-buffer pool and the baseline so the daemon stays under ~400 MiB RSS.
 */
export const nbdBufferBytesMaxDefault = 256 * 1024 * 1024;
/**
 * Every connection may hold this much without asking the shared part of the budget, so
 * small I/O (the kernel client's 4–128 KiB requests) never waits behind clients that hog it.
 * connectionsMax × this is set aside from nbdBufferBytesMax.
 */
export const nbdBufferReserveBytesPerConnection = 128 * 1024;
/** A connection holding replies the client does not read (or a WRITE payload it stopped sending) for this long, while others wait for memory, is closed (`--nbd-stall-timeout`). */
export const nbdStallTimeoutMsDefault = 10_000;
/** Clean shutdown waits this long for in-flight requests before closing sockets. */
export const shutdownDrainMs = 10_000;

/** NBD TLS: the largest --tls-psk file read (a line is ~100 bytes; this is thousands of identities). */
export const pskFileBytesMax = 1024 * 1024;
/** NBD TLS: shortest pre-shared key accepted (128 bits; psktool makes 256). */
export const pskKeyBytesMin = 16;

/** Volume names: what may appear in an export name and a directory name. */
export const volumeNameBytesMax = 128;
/** Volume descriptions (sent to NBD clients in NBD_INFO_DESCRIPTION, a 4 KiB NBD string). */
export const volumeDescriptionBytesMax = 4096;

/** Control API: random bytes in the bearer token (base64url in DATA_DIR/control.token). */
export const controlTokenBytes = 32;
/** Control API: largest JSON request body (binary differential uploads are streamed, not bounded by this). */
export const controlBodyBytesMax = 1024 * 1024;

assert(blockSizeMinBytes <= blockSizePreferredBytes, 'min block ≤ preferred block');
assert(blockSizePreferredBytes <= requestPayloadBytesMax, 'preferred block ≤ max payload');
assert(requestPayloadBytesMax >= 2 ** 20, 'the spec asks for a max payload of at least 1 MiB');
assert(streamPieceBytes <= requestPayloadBytesMax, 'a streamed piece is no larger than an ordinary request');
assert(streamPieceBytes % blockSizePreferredBytes === 0, 'streamed pieces keep preferred-block alignment');
assert(inflightPayloadBytesMax >= requestPayloadBytesMax, 'a full-size write must fit the inflight budget');
assert(
  nbdBufferBytesMaxDefault >= connectionsMax * nbdBufferReserveBytesPerConnection + 2 * (requestPayloadBytesMax + 4096),
  'the default NBD buffer budget holds every connection reserve and two full-size requests',
);
assert(handshakeConnectionsMaxDefault <= connectionsMax, 'handshake connections are part of all connections');
assert(receiveReadBytesMin <= receiveScratchBytes, 'a read fits the receive arena');
assert((directPayloadBytesMin & (directPayloadBytesMin - 1)) === 0, 'payload buffers are pooled by power-of-two size');
assert(directPayloadBytesMin <= requestPayloadBytesMax, 'payloads that fit one request can be read into their own buffer');
assert(sparseReadBytesMin >= blockSizePreferredBytes, 'sparse reads only pay off above a block');
assert(fileReplyBytesMin >= threadpoolSendBytesMin, 'file replies leave from the threadpool sender');
assert(pooledReadBuffersBytesMax <= nbdBufferBytesMaxDefault / 4, 'idle read buffers stay a small part of the NBD buffer budget');
assert(pooledWritePayloadBytesMax <= nbdBufferBytesMaxDefault / 4, 'idle WRITE payload buffers stay a small part of the NBD buffer budget');
assert(headerReadBytes >= 28 && headerReadBytes <= receiveReadBytesMin, 'a short read still holds a request header and fits the arena');
