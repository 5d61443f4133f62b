// Why: the primary and the replica talk over one TCP link, and everything that crosses it
// (handshake, initial copy, delta-set chunks, acks) must arrive whole, intact and
// unambiguous, or not at all. This file is the framing only: pure, no sockets, testable
// with bytes alone. Format (all integers big-endian):
//   prefix: u32 magic 'DVR2' | u32 msgBytes | u32 dataBytes | u32 crc32c(prefix[0..12])
//           | u32 crc32c(msg)
//   msg:    msgBytes of msgpack (one plain object with a string `t`)
//   data:   dataBytes of raw block data, outside the msgpack so it is never copied into it
// The prefix is checked on its own as soon as it arrives: a damaged length is refused at
// once instead of waiting for megabytes that never belonged to the frame (the peer's pings
// would fill them for many minutes). The frame checksums cover the prefix and the message
// but not the data: block data is covered end to end by chunkChecksum / the init crc
// (computed where the data is read and checked where it is written), which also catches a
// block landing at the wrong address. Frames of version 0.1 ('DVR1': a 16-byte prefix whose
// one checksum covers prefix and message) are still read: an outbound log may hold them.
// Any broken frame (bad magic, over a limit, checksum mismatch, malformed message) throws
// BAD_STREAM and the link is closed; there is no resynchronising inside a stream.

import { crc32c } from '@node-rs/crc32';
import { Packr } from 'msgpackr';
import { ByteQueue } from '../util/byte-queue.js';
import type { BufferPool } from '../util/buffer-pool.js';
import { crc32cParts } from '../util/crc32c-parts.js';
import { assert } from '../util/assert.js';
import { DeltavolError } from '../util/errors.js';
import { helloFrameBytesMax } from './limits.js';

export const FRAME_MAGIC = 0x44565232; // 'DVR2'
export const framePrefixBytes = 20;
/** 0.1's frames: read, never written. */
export const FRAME_MAGIC_V1 = 0x44565231; // 'DVR1'
const framePrefixBytesV1 = 16;
/** Largest msgpack part of one frame (runs of a chunk are the biggest message). */
export const replicationMsgBytesMax = 1024 * 1024;
/** Largest data part of one frame (one delta-set chunk or one initial-copy piece). */
export const replicationDataBytesMax = 16 * 1024 * 1024;

/** Block runs: [first block, number of blocks], count ≥ 1. */
export type Runs = [block: number, count: number][];

export type ReplMessage =
  | {
      t: 'hello';
      protocol: 2;
      pairId: string;
      primaryVolume: string;
      replicaVolume: string;
      generation: number;
      sizeBytes: number;
      blockBytes: number;
      create: boolean;
      description: string;
      /** Where the sender's own replication port listens (host '' = the address the peer sees). */
      returnHost: string;
      returnPort: number;
    }
  | {
      t: 'welcome';
      generation: number;
      ackedSet: number;
      playedSet: number;
      initialCopy: { done: boolean; offsetBytes: number };
      splitWrites: Runs;
    }
  /** generation: the refusing side's generation when it matters (a newer one fences the sender), else 0. */
  | { t: 'refuse'; code: string; message: string; generation: number }
  /** Carries lengthBytes of data unless `zero`. */
  | { t: 'init'; generation: number; offsetBytes: number; lengthBytes: number; zero: boolean; crc: number }
  /** From the replica: everything below offsetBytes is durable. */
  | { t: 'initAck'; offsetBytes: number }
  /** baseCutAtMs: when the base was cut (the primary's clock; 0: unknown): every write acknowledged before is in the copy. */
  | { t: 'initDone'; generation: number; baseSet: number; baseCutAtMs: number }
  /** Before a copy's first range: what it moves in all (for the replica's progress). */
  | { t: 'initStart'; generation: number; kind: string; totalBytes: number; baseSet: number }
  /** Carries the runs' blocks concatenated as data. */
  | { t: 'chunk'; generation: number; set: number; chunk: number; runs: Runs; crc: number }
  | {
      t: 'trailer';
      generation: number;
      set: number;
      chunks: number;
      blocks: number;
      dataBytes: number;
      dataCrc: number;
      catchUpFrom: number;
      createdAtMs: number;
      /** Only some of the changed blocks: after it the replica is not at a point in time of the primary. */
      partial: boolean;
      trailerCrc: number;
    }
  | { t: 'ack'; set: number; playedSet: number }
  /** Operator split (seed 003): the replica records its own writes until the next hello. */
  | { t: 'split'; generation: number }
  | { t: 'nak'; set: number; chunk: number; reason: string }
  | { t: 'ping'; atMs: number }
  | { t: 'pong'; atMs: number }
  /**
   * Primary → replica, every heartbeat: the last set cut, and since when writes the
   * replica does not hold durably were made (0: none), so the replica can say what a
   * failover would lose even after the primary is gone.
   */
  | { t: 'progress'; generation: number; lastSet: number; atRiskSinceMs: number; bytesDifferent: number; atMs: number }
  /** Replica → primary: a planned takeover (failover --sync, failback); baseSet: where the replica's own sets will start. */
  | { t: 'takeover'; generation: number; baseSet: number }
  /** Primary → replica: writes held, every set up to lastSet shipped; the replica may take over as `generation`. */
  | { t: 'handover'; generation: number; lastSet: number; newPairId: string; returnHost: string; returnPort: number }
  /**
   * Replica → primary: the takeover is durable here (at atMs, its clock: its writes come
   * after); the old primary becomes the replica of newPairId.
   */
  | { t: 'handoverCommit'; generation: number; newPairId: string; atMs: number }
  | { t: 'handoverAbort'; reason: string }
  /**
   * Old primary → new primary (a connection of its own): make me your replica again. pairId
   * is the old pair ('' when this node lost its history: a full copy).
   */
  | {
      t: 'resyncHello';
      protocol: 2;
      pairId: string;
      primaryVolume: string;
      replicaVolume: string;
      generation: number;
      sizeBytes: number;
      blockBytes: number;
      returnHost: string;
      returnPort: number;
    }
  /** New primary → old primary: the restart point and what this node already knows. */
  | { t: 'resyncOffer'; generation: number; restartSet: number; knownUpTo: number; pairId: string; generationBefore: number; fromPairId: string }
  /**
   * Old primary → new primary: blocks it may have changed since the restart point (several
   * frames). With digestBytes 16, the data part holds a 16-byte digest of each block's
   * content, in run order: blocks whose digest equals the restart point's need not travel
   * (a crash marks whole extents as changed; most of them are not).
   */
  | { t: 'resyncBlocks'; runs: Runs; digestBytes: number }
  | { t: 'resyncCommit'; pairId: string; full: boolean; reason: string; divergentBlocks: number }
  | { t: 'resyncAccepted'; pairId: string; baseSet: number }
  /**
   * Sync stream (a pair in mode sync), primary → replica, in the order the primary's
   * engine issued the writes. It starts behind set afterSet on the same link: nothing of
   * it is applied before that set is played. seq numbers the stream's items from here on.
   */
  | { t: 'sstart'; generation: number; seq: number; afterSet: number; fence: string; timeoutMs: number }
  /** A write (its data is the frame's data part, crc its crc32c) or, with zero, a zeroing. */
  | { t: 'swrite'; generation: number; seq: number; offsetBytes: number; lengthBytes: number; zero: boolean; keepAllocated: boolean; crc: number }
  /** A flush on the primary: its ack means every item before it is durable on the replica. */
  | { t: 'sflush'; generation: number; seq: number }
  /** Set `set` was cut at this point of the stream: the replica makes it durable and acknowledges the set. */
  | { t: 'sbarrier'; generation: number; seq: number; set: number; createdAtMs: number }
  /** Replica → primary: every stream item up to seq is applied (and durable where it was a flush or barrier). */
  | { t: 'sack'; seq: number }
  /**
   * Restore from the replica (seed 003), on a connection of its own from the primary: roll
   * the primary back to the replica's snapshot (snapshot '': its current state, in a
   * snapshot taken now at a set boundary). The pair and generation must be the replica's.
   */
  | { t: 'restoreHello'; protocol: 2; pairId: string; primaryVolume: string; replicaVolume: string; generation: number; snapshot: string }
  /** Replica → primary: blocks it changed since the snapshot (several frames), then the offer. */
  | { t: 'restoreRuns'; runs: Runs }
  /** The snapshot restored (set: the last set it holds), whether it is a temporary one, how many blocks were listed. */
  | { t: 'restoreOffer'; snapshot: string; set: number; temporary: boolean; changedBlocks: number; sizeBytes: number; blockBytes: number }
  /** Primary → replica: the snapshot's content of these blocks, please (id: the answer's). */
  | { t: 'restoreRead'; id: number; runs: Runs }
  /**
   * Replica → primary: the requested blocks: those in `holes` held no data in the
   * snapshot and read as zeroes; the data part is every other block, in run order.
   */
  | { t: 'restoreData'; id: number; runs: Runs; holes: Runs; crc: number }
  /** Primary → replica: done (a temporary snapshot goes). */
  | { t: 'restoreDone' }
  /** Cascade (chain.ts): a primary that is itself a replica tells its replicas what is upstream (JSON hops). */
  | { t: 'chainUp'; hops: string }
  /** Cascade: a replica with replicas of its own tells its primary what is downstream (JSON hops). */
  | { t: 'chainDown'; hops: string };

export type ReplMessageType = ReplMessage['t'];

/** A chunk's 'nak' with this chunk number asks for the whole set again. */
export const WHOLE_SET = 0xffffffff;
type Trailer = Extract<ReplMessage, { t: 'trailer' }>;

export interface Frame {
  msg: ReplMessage;
  /**
   * The data part as the socket delivered it: views of the received chunks, never copied
   * (empty when the frame has none). Receive paths that can take pieces use these.
   */
  readonly parts: readonly Buffer[];
  /** The data part as one buffer (null when none): joined with one copy, on first use, if it spans chunks. */
  readonly data: Buffer | null;
  /**
   * The receiver is done with the frame: its data may be reused for a later frame (when it
   * came into a pooled buffer: ../util/buffer-pool.ts). Whoever dispatches frames calls it once the
   * handler returned; a frame never released is left to the garbage collector.
   */
  release(): void;
  /**
   * Keeps the data valid past release() (a write still in flight from it); call the
   * function returned once done with it.
   */
  hold(): () => void;
}

const noop = (): void => undefined;

/** A decoded frame; `data` joins its parts only when someone asks for one buffer. */
class DecodedFrame implements Frame {
  private joined: Buffer | null | undefined;
  /** References to the pooled buffer: the dispatcher's, plus one per hold(). */
  private refs = 1;
  constructor(
    readonly msg: ReplMessage,
    readonly parts: readonly Buffer[],
    /** The pooled buffer the data sits in (null: views of socket reads, left to the GC). */
    private readonly pooled: { buffer: Buffer; pool: BufferPool } | null = null,
  ) {}
  get data(): Buffer | null {
    if (this.joined === undefined) this.joined = this.parts.length === 0 ? null : this.parts.length === 1 ? this.parts[0]! : Buffer.concat(this.parts as Buffer[]);
    return this.joined;
  }
  private released = false;
  release(): void {
    if (this.released) return;
    this.released = true;
    this.unref();
  }
  hold(): () => void {
    if (this.pooled === null) return noop;
    assert(this.refs > 0, 'Frame.hold after the data was given back');
    this.refs++;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.unref();
    };
  }
  private unref(): void {
    if (--this.refs === 0 && this.pooled !== null) this.pooled.pool.release(this.pooled.buffer);
  }
}

// useRecords: false so plain objects round-trip as maps (no shared structures to keep in
// sync between peers); mapsAsObjects then defaults to true.
const packr = new Packr({ useRecords: false });

// ---------------------------------------------------------------------------------------
// Message validation: one table keyed by `t`, each field with its kind. Unknown fields
// are refused too, so a sender bug shows up at once instead of being silently ignored.

type FieldKind = 'uint' | 'u32' | 'string' | 'boolean' | 'runs' | 'protocol' | 'initialCopy';

const MESSAGE_FIELDS: Record<ReplMessageType, Record<string, FieldKind>> = {
  hello: {
    protocol: 'protocol',
    pairId: 'string',
    primaryVolume: 'string',
    replicaVolume: 'string',
    generation: 'u32',
    sizeBytes: 'uint',
    blockBytes: 'uint',
    create: 'boolean',
    description: 'string',
    returnHost: 'string',
    returnPort: 'uint',
  },
  welcome: { generation: 'u32', ackedSet: 'uint', playedSet: 'uint', initialCopy: 'initialCopy', splitWrites: 'runs' },
  refuse: { code: 'string', message: 'string', generation: 'u32' },
  init: { generation: 'u32', offsetBytes: 'uint', lengthBytes: 'uint', zero: 'boolean', crc: 'u32' },
  initAck: { offsetBytes: 'uint' },
  initDone: { generation: 'u32', baseSet: 'uint', baseCutAtMs: 'uint' },
  initStart: { generation: 'u32', kind: 'string', totalBytes: 'uint', baseSet: 'uint' },
  chunk: { generation: 'u32', set: 'uint', chunk: 'u32', runs: 'runs', crc: 'u32' },
  trailer: {
    generation: 'u32',
    set: 'uint',
    chunks: 'u32',
    blocks: 'uint',
    dataBytes: 'uint',
    dataCrc: 'u32',
    catchUpFrom: 'uint',
    createdAtMs: 'uint',
    partial: 'boolean',
    trailerCrc: 'u32',
  },
  ack: { set: 'uint', playedSet: 'uint' },
  split: { generation: 'u32' },
  nak: { set: 'uint', chunk: 'u32', reason: 'string' },
  ping: { atMs: 'uint' },
  pong: { atMs: 'uint' },
  progress: { generation: 'u32', lastSet: 'uint', atRiskSinceMs: 'uint', bytesDifferent: 'uint', atMs: 'uint' },
  takeover: { generation: 'u32', baseSet: 'uint' },
  handover: { generation: 'u32', lastSet: 'uint', newPairId: 'string', returnHost: 'string', returnPort: 'uint' },
  handoverCommit: { generation: 'u32', newPairId: 'string', atMs: 'uint' },
  handoverAbort: { reason: 'string' },
  resyncHello: {
    protocol: 'protocol',
    pairId: 'string',
    primaryVolume: 'string',
    replicaVolume: 'string',
    generation: 'u32',
    sizeBytes: 'uint',
    blockBytes: 'uint',
    returnHost: 'string',
    returnPort: 'uint',
  },
  resyncOffer: { generation: 'u32', restartSet: 'uint', knownUpTo: 'uint', pairId: 'string', generationBefore: 'u32', fromPairId: 'string' },
  resyncBlocks: { runs: 'runs', digestBytes: 'uint' },
  resyncCommit: { pairId: 'string', full: 'boolean', reason: 'string', divergentBlocks: 'uint' },
  resyncAccepted: { pairId: 'string', baseSet: 'uint' },
  sstart: { generation: 'u32', seq: 'uint', afterSet: 'uint', fence: 'string', timeoutMs: 'uint' },
  swrite: { generation: 'u32', seq: 'uint', offsetBytes: 'uint', lengthBytes: 'uint', zero: 'boolean', keepAllocated: 'boolean', crc: 'u32' },
  sflush: { generation: 'u32', seq: 'uint' },
  sbarrier: { generation: 'u32', seq: 'uint', set: 'uint', createdAtMs: 'uint' },
  sack: { seq: 'uint' },
  restoreHello: { protocol: 'protocol', pairId: 'string', primaryVolume: 'string', replicaVolume: 'string', generation: 'u32', snapshot: 'string' },
  restoreRuns: { runs: 'runs' },
  restoreOffer: { snapshot: 'string', set: 'uint', temporary: 'boolean', changedBlocks: 'uint', sizeBytes: 'uint', blockBytes: 'uint' },
  restoreRead: { id: 'uint', runs: 'runs' },
  restoreData: { id: 'uint', runs: 'runs', holes: 'runs', crc: 'u32' },
  restoreDone: {},
  chainUp: { hops: 'string' },
  chainDown: { hops: 'string' },
};

/** Version 2: return addresses, progress reports, planned handover, resync (restore: new messages, refused by older peers as unknown). */
export const PROTOCOL_VERSION = 2;

function isUint(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

function isU32(v: unknown): v is number {
  return isUint(v) && v <= 0xffffffff;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return false;
  const proto = Object.getPrototypeOf(v) as unknown;
  return proto === Object.prototype || proto === null;
}

/** Total blocks of the runs, or null when they are malformed. */
function runsBlocks(v: unknown): number | null {
  if (!Array.isArray(v)) return null;
  let blocks = 0;
  for (const r of v as unknown[]) {
    if (!Array.isArray(r) || r.length !== 2 || !isUint(r[0]) || !isUint(r[1]) || r[1] < 1) return null;
    if (!Number.isSafeInteger(r[0] + r[1])) return null;
    blocks += r[1];
  }
  return Number.isSafeInteger(blocks) ? blocks : null;
}

function fieldProblem(kind: FieldKind, v: unknown): boolean {
  switch (kind) {
    case 'uint':
      return !isUint(v);
    case 'u32':
      return !isU32(v);
    case 'string':
      return typeof v !== 'string';
    case 'boolean':
      return typeof v !== 'boolean';
    case 'runs':
      return runsBlocks(v) === null;
    case 'protocol':
      return v !== PROTOCOL_VERSION;
    case 'initialCopy': {
      if (!isPlainObject(v)) return true;
      const keys = Object.keys(v);
      return keys.length !== 2 || typeof v.done !== 'boolean' || !isUint(v.offsetBytes);
    }
  }
}

/** Why `v` is not a valid message carrying `dataBytes` of data, or null when it is. */
function messageProblem(v: unknown, dataBytes: number): string | null {
  if (!isPlainObject(v)) return 'message is not an object';
  const t = v.t;
  if (typeof t !== 'string' || !Object.hasOwn(MESSAGE_FIELDS, t)) return `unknown message type ${JSON.stringify(t)}`;
  const fields = MESSAGE_FIELDS[t as ReplMessageType];
  for (const [name, kind] of Object.entries(fields)) {
    if (!Object.hasOwn(v, name)) return `${t}: missing field ${name}`;
    if (fieldProblem(kind, v[name])) return `${t}: bad field ${name}`;
  }
  for (const name of Object.keys(v)) {
    if (name !== 't' && !Object.hasOwn(fields, name)) return `${t}: unknown field ${name}`;
  }
  // Which messages carry data, and how much.
  if (t === 'init' || t === 'swrite') {
    const want = v.zero ? 0 : (v.lengthBytes as number);
    if (dataBytes !== want) return `${t}: ${dataBytes} data bytes for ${v.zero ? 'a zero range' : `${want} bytes`}`;
  } else if (t === 'chunk') {
    // The block size is the volume's, unknown here; the data must still be a whole,
    // non-zero number of bytes per block of the runs.
    const blocks = runsBlocks(v.runs)!;
    if (blocks === 0) return 'chunk: no runs';
    if (dataBytes === 0 || dataBytes % blocks !== 0) return `chunk: ${dataBytes} data bytes for ${blocks} blocks`;
  } else if (t === 'resyncBlocks') {
    const want = (v.digestBytes as number) * runsBlocks(v.runs)!;
    if (v.digestBytes !== 0 && v.digestBytes !== 16) return `resyncBlocks: digests of ${String(v.digestBytes)} bytes`;
    if (dataBytes !== want) return `resyncBlocks: ${dataBytes} data bytes for ${want} bytes of digests`;
  } else if (t === 'restoreData') {
    // Whole blocks (of the volume's size, unknown here) for every block that is not a hole.
    const blocks = runsBlocks(v.runs)! - runsBlocks(v.holes)!;
    if (blocks < 0 || (blocks === 0) !== (dataBytes === 0) || (blocks > 0 && dataBytes % blocks !== 0)) return `restoreData: ${dataBytes} data bytes for ${blocks} blocks`;
  } else if (dataBytes !== 0) {
    return `${t}: carries no data, got ${dataBytes} bytes`;
  }
  return null;
}

// ---------------------------------------------------------------------------------------
// Encoding

/**
 * One frame as pieces for socket.cork()/write or writev: the prefix and message in one
 * buffer, then the data buffers exactly as given (never copied). A message that does not
 * validate is a bug in the caller (assertion).
 */
export function encodeFrame(msg: ReplMessage, data: Buffer[] = []): Buffer[] {
  let dataBytes = 0;
  for (const d of data) dataBytes += d.length;
  const problem = messageProblem(msg, dataBytes);
  assert(problem === null, `encodeFrame: ${problem}`);
  assert(dataBytes <= replicationDataBytesMax, `encodeFrame: ${dataBytes} data bytes > ${replicationDataBytesMax}`);
  const body = packr.pack(msg); // a view of the packer's reused buffer: copy it out now
  assert(body.length <= replicationMsgBytesMax, `encodeFrame: ${body.length} message bytes > ${replicationMsgBytesMax}`);
  const head = Buffer.allocUnsafe(framePrefixBytes + body.length);
  head.writeUInt32BE(FRAME_MAGIC, 0);
  head.writeUInt32BE(body.length, 4);
  head.writeUInt32BE(dataBytes, 8);
  head.writeUInt32BE(crc32c(head.subarray(0, 12)) >>> 0, 12);
  body.copy(head, framePrefixBytes);
  head.writeUInt32BE(crc32c(head.subarray(framePrefixBytes)) >>> 0, 16);
  return [head, ...data];
}

// ---------------------------------------------------------------------------------------
// Decoding

type DecoderState = 'prefix' | 'msgCrc' | 'msg' | 'data';

/**
 * Push parser: feed socket chunks of any size, whole frames come out through onFrame.
 * Data comes as views of the pushed chunks (Frame.parts); Frame.data joins them on demand.
 *
 * With a pool (usePool, for a connection that reads where it is told: Conn.readInto), the
 * decoder also says where each read should go (readBuffer): a frame's data is read
 * straight into a buffer of the pool, which comes back when the frame is released, and
 * everything else into one reused staging buffer (so nothing pushed may be kept: leftovers
 * of a frame's start are copied out after each push).
 *
 * Any exception out of push (a broken frame, or one thrown by onFrame) leaves the decoder
 * unusable: the link must be closed.
 */
export class FrameDecoder {
  private readonly queue = new ByteQueue();
  private state: DecoderState = 'prefix';
  private msgBytes = 0;
  private dataBytes = 0;
  private crcWanted = 0;
  private crcPrefix = 0;
  private msg: ReplMessage | null = null;
  private closed: 'failed' | 'ended' | null = null;
  private pushing = false;
  private pool: BufferPool | null = null;
  /** Pooled mode: the reused buffer reads go into when they are not a frame's data. */
  private staging: Buffer | null = null;
  /** Pooled mode: the data buffer of the frame being received, and how much of it is filled. */
  private dest: Buffer | null = null;
  private filled = 0;
  /** The region readBuffer() last offered for data read in place (null: staging). */
  private direct: Buffer | null = null;
  /** The last frame had data read in place: the next read into staging is kept short. */
  private afterLargeData = false;
  private frameLimit = Infinity;

  constructor(private readonly onFrame: (f: Frame) => void) {}

  private prefixBytes = framePrefixBytes;

  /**
   * Pooled mode: a frame larger than this gets no pooled buffer (its bytes are kept in the
   * queue, so pendingBytes shows them and the owner can refuse it: Link.frameBytesMax).
   * While it is at most a hello's (limits.ts helloFrameBytesMax: a peer not yet accepted),
   * reads go into a small staging buffer (headerReadBytes): 200 connections that each sent
   * most of a 1 MiB "hello" left 64 KiB each of garbage behind, and RSS grew by up to 50 MiB
   * (security test).
   */
  get frameBytesMax(): number {
    return this.frameLimit;
  }
  set frameBytesMax(bytes: number) {
    this.frameLimit = bytes;
    // The next readBuffer() takes one of the size this limit wants. Nothing pushed is kept
    // in staging (push copies leftovers out), so dropping it here, even from onFrame, is safe.
    if (this.staging !== null && this.staging.length !== this.stagingBytesWanted()) this.staging = null;
  }

  /** Switches to pooled reads; only before anything was pushed. */
  usePool(pool: BufferPool): void {
    assert(this.state === 'prefix' && this.queue.length === 0 && this.closed === null, 'FrameDecoder.usePool after data');
    this.pool = pool;
  }

  private stagingBytesWanted(): number {
    return this.frameLimit <= helloFrameBytesMax ? headerReadBytes : stagingReadBytes;
  }

  /**
   * Pooled mode: where the next read should go (the caller then pushes a view of its start).
   * A frame's data goes straight into its buffer, at most up to the frame's end.
   */
  readBuffer(): Buffer {
    assert(this.pool !== null, 'FrameDecoder.readBuffer without a pool');
    this.staging ??= Buffer.allocUnsafe(this.stagingBytesWanted());
    const left = this.dataBytes - this.filled;
    if (this.state === 'data' && this.dest !== null && this.queue.length === 0 && left >= directReadBytesMin) {
      this.direct = this.dest.subarray(this.filled, this.dataBytes);
      this.afterLargeData = true;
      return this.direct;
    }
    this.direct = null;
    return this.afterLargeData && this.state === 'prefix' ? this.staging.subarray(0, headerReadBytes) : this.staging;
  }

  /** Bytes buffered that are not yet a whole frame. */
  get pendingBytes(): number {
    const held = this.state === 'msgCrc' ? framePrefixBytesV1 : this.state === 'msg' ? this.prefixBytes : this.state === 'data' ? this.prefixBytes + this.msgBytes + this.filled : 0;
    return held + this.queue.length;
  }

  push(chunk: Buffer): void {
    if (this.closed) this.fail(this.closed === 'failed' ? 'decoder used after an error' : 'push after end');
    assert(!this.pushing, 'FrameDecoder.push re-entered from onFrame');
    this.pushing = true;
    try {
      const direct = this.direct;
      this.direct = null;
      if (direct !== null && chunk.length > 0 && chunk.buffer === direct.buffer && chunk.byteOffset === direct.byteOffset) {
        // Read in place (readBuffer): the bytes are where they belong already.
        assert(chunk.length <= direct.length && this.queue.length === 0, 'a read past the region offered');
        this.filled += chunk.length;
        if (this.filled === this.dataBytes) this.emit();
        return;
      }
      this.queue.push(chunk);
      this.parse();
      // The staging buffer is read into again: what is left of this chunk is copied out
      // (earlier chunks are copies already; copying the whole queue each time made a frame
      // kept in the queue cost the square of its length).
      if (this.pool !== null && this.queue.length > 0) this.queue.ownLast();
    } catch (e) {
      this.closed = 'failed';
      this.queue.clear();
      this.giveBackDest();
      throw e;
    } finally {
      this.pushing = false;
    }
  }

  /** The peer closed the link: throws when it did so inside a frame. */
  end(): void {
    if (this.closed === 'failed') this.fail('decoder used after an error');
    const pending = this.pendingBytes;
    this.closed = 'ended';
    this.giveBackDest();
    if (pending > 0) this.fail(`stream ended inside a frame (${pending} bytes pending, truncated)`);
  }

  private giveBackDest(): void {
    if (this.dest !== null && this.pool !== null) this.pool.release(this.dest);
    this.dest = null;
  }

  private fail(message: string, details?: Record<string, unknown>): never {
    this.closed = 'failed';
    throw new DeltavolError('BAD_STREAM', `replication stream: ${message}`, details);
  }

  /** The frame whose message was parsed is whole: out it goes, and the next one starts. */
  private emit(): void {
    const msg = this.msg!;
    const n = this.dataBytes;
    let frame: DecodedFrame;
    if (this.dest !== null) {
      frame = new DecodedFrame(msg, [this.dest], { buffer: this.dest, pool: this.pool! });
    } else {
      // Views of the received chunks: a 1 MiB chunk arrives in ~16 socket reads, and
      // joining them here would copy every replicated byte once more. (Pooled mode without a
      // buffer, a frame over frameBytesMax: its bytes may be in staging, so they are copied.)
      const views = n === 0 ? [] : this.pool === null ? this.queue.takeViews(n) : [Buffer.from(this.queue.take(n))];
      frame = new DecodedFrame(msg, views);
    }
    this.msg = null;
    this.dest = null;
    this.filled = 0;
    this.dataBytes = 0;
    this.state = 'prefix';
    this.onFrame(frame);
  }

  private parse(): void {
    const q = this.queue;
    for (;;) {
      switch (this.state) {
        case 'prefix': {
          // The first 16 bytes are laid out alike in both versions.
          if (q.length < framePrefixBytesV1) return;
          const p = q.take(framePrefixBytesV1);
          const magic = p.readUInt32BE(0);
          const v1 = magic === FRAME_MAGIC_V1;
          if (magic !== FRAME_MAGIC && !v1) this.fail(`bad frame magic 0x${magic.toString(16).padStart(8, '0')}`, { magic });
          if (!v1 && crc32c(p.subarray(0, 12)) >>> 0 !== p.readUInt32BE(12)) this.fail('frame prefix checksum mismatch');
          this.msgBytes = p.readUInt32BE(4);
          this.dataBytes = p.readUInt32BE(8);
          if (this.msgBytes === 0 || this.msgBytes > replicationMsgBytesMax) {
            this.fail(`message of ${this.msgBytes} bytes (must be 1..${replicationMsgBytesMax})`, { msgBytes: this.msgBytes });
          }
          if (this.dataBytes > replicationDataBytesMax) {
            this.fail(`data of ${this.dataBytes} bytes > ${replicationDataBytesMax}`, { dataBytes: this.dataBytes });
          }
          if (v1) {
            this.prefixBytes = framePrefixBytesV1;
            this.crcWanted = p.readUInt32BE(12);
            this.crcPrefix = crc32c(p.subarray(0, 12));
            this.state = 'msg';
          } else {
            this.prefixBytes = framePrefixBytes;
            this.crcPrefix = 0;
            this.state = 'msgCrc';
          }
          this.afterLargeData = false;
          break;
        }
        case 'msgCrc': {
          if (q.length < 4) return;
          this.crcWanted = q.take(4).readUInt32BE(0);
          this.state = 'msg';
          break;
        }
        case 'msg': {
          if (q.length < this.msgBytes) return;
          const m = q.take(this.msgBytes);
          if (crc32c(m, this.crcPrefix) >>> 0 !== this.crcWanted) this.fail('frame checksum mismatch');
          let v: unknown;
          try {
            v = packr.unpack(m);
          } catch (e) {
            this.fail(`message is not valid msgpack: ${(e as Error).message}`);
          }
          const problem = messageProblem(v, this.dataBytes);
          if (problem !== null) this.fail(problem);
          this.msg = v as ReplMessage;
          this.state = 'data';
          this.filled = 0;
          if (this.pool !== null && this.dataBytes > 0 && this.prefixBytes + this.msgBytes + this.dataBytes <= this.frameBytesMax) {
            this.dest = this.pool.acquire(this.dataBytes); // (exactly dataBytes: a view of a pooled buffer)
          }
          break;
        }
        case 'data': {
          if (this.dest !== null) {
            const k = Math.min(q.length, this.dataBytes - this.filled);
            if (k > 0) q.copyOut(this.dest, this.filled, k);
            this.filled += k;
            if (this.filled < this.dataBytes) return;
          } else if (q.length < this.dataBytes) {
            return;
          }
          this.emit();
          break;
        }
      }
    }
  }
}

/** Pooled mode: the staging buffer (reads of frame starts, and of small frames). */
const stagingReadBytes = 64 * 1024;
/** Pooled mode: after a frame whose data was read in place, the next read takes about a frame start (then the data goes in place again). */
const headerReadBytes = 8 * 1024;
/** Pooled mode: data left to read below this goes through staging (a copy) rather than a read of its own. */
const directReadBytesMin = 16 * 1024;

// ---------------------------------------------------------------------------------------
// Checksums over fixed binary layouts (never over msgpack, whose encoding of a value is
// not unique across versions).

function writeU64(b: Buffer, at: number, v: number): void {
  assert(isUint(v), `u64 field ${v} is not a safe non-negative integer`);
  b.writeUInt32BE(Math.floor(v / 4294967296), at);
  b.writeUInt32BE(v >>> 0, at + 4);
}

function writeU32(b: Buffer, at: number, v: number): void {
  assert(isU32(v), `u32 field ${v} out of range`);
  b.writeUInt32BE(v, at);
}

const TRAILER_LAYOUT_BYTES = 4 + 8 + 4 + 8 + 8 + 4 + 8 + 8 + 1;

/**
 * crc32c over u32 generation | u64 set | u32 chunks | u64 blocks | u64 dataBytes |
 * u32 dataCrc | u64 catchUpFrom | u64 createdAtMs.
 */
export function trailerChecksum(t: Omit<Trailer, 'trailerCrc' | 't'>): number {
  const b = Buffer.allocUnsafe(TRAILER_LAYOUT_BYTES);
  writeU32(b, 0, t.generation);
  writeU64(b, 4, t.set);
  writeU32(b, 12, t.chunks);
  writeU64(b, 16, t.blocks);
  writeU64(b, 24, t.dataBytes);
  writeU32(b, 32, t.dataCrc);
  writeU64(b, 36, t.catchUpFrom);
  writeU64(b, 44, t.createdAtMs);
  b[52] = t.partial ? 1 : 0;
  return crc32c(b) >>> 0;
}

/**
 * crc32c over the data, then u64 set | u32 chunk | u32 runs | per run u64 block, u64 count:
 * a flipped data bit and a block sent to the wrong address are both caught.
 */
export function chunkChecksum(data: Buffer | readonly Buffer[], set: number, chunk: number, runs: Runs): number {
  const crc = crc32cParts(data);
  const b = Buffer.allocUnsafe(16 + 16 * runs.length);
  writeU64(b, 0, set);
  writeU32(b, 8, chunk);
  writeU32(b, 12, runs.length);
  for (let i = 0; i < runs.length; i++) {
    writeU64(b, 16 + 16 * i, runs[i]![0]);
    writeU64(b, 24 + 16 * i, runs[i]![1]);
  }
  return crc32c(b, crc) >>> 0;
}
