// Why: the transmission phase for one connection: validate each request (command,
// flags, range, alignment, read-only) and make exactly one call into the export,
// then encode the reply (simple for clients like the Linux kernel, structured when
// negotiated). Requests run concurrently and reply out of order by cookie. Knows the
// wire, not the storage: everything below is behind NbdExport. READ and WRITE larger
// than one buffer (only from clients that did not agree to block sizes) are streamed in
// pieces, so their memory is bounded by the piece size and not by their length.

import type { WritePayload } from '../util/piped-bytes.js';
import type { FileRange } from '../util/file-range.js';
import * as C from './constants.js';
import type { Extent, MaybePromise, NbdExport } from './export.js';
import type { Negotiated } from './negotiator.js';
import type { RequestHeader } from './request-framer.js';
import * as R from './replies.js';
import { nbdErrorFor } from './errno.js';
import {
  blockSizeMinBytes,
  blockStatusExtentsMax,
  pooledReadBufferBytesMin,
  pooledReadBuffersBytesMax,
  requestEffectBytesMax,
  requestPayloadBytesMax,
  smallBufferSlabBytes,
  smallBufferSparesMax,
  sparseReadBytesMin,
  fileReplyBytesMin,
  streamPieceBytes,
} from '../util/limits.js';
import { BufferPool } from '../util/buffer-pool.js';
import { SliceArena } from '../util/slice-arena.js';
import { zeroBlockScan } from '../util/zero-block-scan.js';
import { assert } from '../util/assert.js';

/** Read buffers shared by every connection of the process (see buffer-pool.ts). */
const readBuffers = new BufferPool(pooledReadBufferBytesMin, pooledReadBuffersBytesMax);
/** Small READ replies (header and data in one slice), shared likewise (slice-arena.ts). */
const smallReplies = new SliceArena(smallBufferSlabBytes, smallBufferSparesMax);

/** After a burst: idle read buffers beyond `keepBytes` are dropped for the GC (the server calls this as its buffers shrink). */
export function trimReadBuffers(keepBytes: number): void {
  readBuffers.trim(keepBytes);
}

/** The read buffer pool's idle bytes and how many buffers it has handed out (nbd-server.ts trims a quiet pool). */
export function readBufferPoolState(): { idleBytes: number; acquires: number } {
  return { idleBytes: readBuffers.idleBytes, acquires: readBuffers.acquires };
}

export interface TransmissionHost {
  /**
   * Queue reply bytes on the connection (the host corks and batches). `sent` runs once
   * the socket no longer needs the buffers (written, or the connection is gone).
   */
  send(buffers: Buffer[], sent?: () => void): void;
  /**
   * Optional: queues a reply whose data, after `buffers`, is sent from `file` (sendfile);
   * `sent` as for send(). False: the host cannot now (nothing was queued; send bytes instead).
   */
  sendFile?(buffers: Buffer[], file: FileRange, sent: () => void): boolean;
  /** One request has completed and its reply is queued. */
  completed(payloadBytes: number): void;
  /** An export call failed in a way the client should hear about; for logs. */
  warn(message: string, fields: Record<string, unknown>): void;
  /** A piece of a streamed WRITE is written (or dropped): its bytes are no longer held. */
  released?(bytes: number): void;
  /** The stream can no longer be kept in sync (a simple READ reply failed after its data began): close it. */
  fatal?(reason: string): void;
}

/**
 * Bytes a request holds while in flight, reserved by the host before it is parsed: a READ
 * its buffer (one piece when streamed), a WRITE its payload (streamed WRITEs reserve each
 * piece as it comes, through pieceAccepting).
 */
export function heldBytesFor(type: number, length: number): number {
  if (type === C.CMD_READ) return length <= requestPayloadBytesMax ? length : streamPieceBytes;
  if (type === C.CMD_WRITE) return length <= requestPayloadBytesMax ? length : 0;
  return 0;
}

const FLAGS_ALLOWED: Record<number, number> = {
  [C.CMD_READ]: C.CMDFLAG_FUA | C.CMDFLAG_DF,
  [C.CMD_WRITE]: C.CMDFLAG_FUA,
  [C.CMD_FLUSH]: C.CMDFLAG_FUA,
  [C.CMD_TRIM]: C.CMDFLAG_FUA,
  [C.CMD_CACHE]: C.CMDFLAG_FUA,
  [C.CMD_WRITE_ZEROES]: C.CMDFLAG_FUA | C.CMDFLAG_NO_HOLE | C.CMDFLAG_FAST_ZERO,
  [C.CMD_BLOCK_STATUS]: C.CMDFLAG_FUA | C.CMDFLAG_REQ_ONE,
  [C.CMD_DISC]: 0,
};

interface Rejection {
  error: number;
  message: string;
}

function isPromise<T>(v: MaybePromise<T>): v is Promise<T> {
  return v !== null && typeof v === 'object' && typeof (v as Promise<T>).then === 'function';
}

export class Transmission {
  /** Requests received and not yet answered. */
  inflight = 0;
  /** Bytes held by requests not yet answered: WRITE payloads and READ buffers. */
  inflightPayloadBytes = 0;
  /** Set when the connection is gone: late completions are dropped. */
  closed = false;
  /** Bytes of pooled READ buffers held by reads not yet sent (readAheadBytesMax bounds them). */
  private pooledReadBytes = 0;
  /** Large READs waiting for pooledReadBytes to fall, in arrival order. */
  private readonly waitingReads: RequestHeader[] = [];
  readonly structured: boolean;
  readonly sizeBytes: number;
  private readonly contexts: string[];
  private readonly alignBytes: number;
  private readonly sparseReads: boolean;
  /** READ / WRITE length accepted: the advertised maximum for clients that agreed to it, else unlimited. */
  private readonly payloadBytesMax: number;

  constructor(
    readonly exp: NbdExport,
    negotiated: Negotiated,
    private readonly host: TransmissionHost,
    /** Bytes of pooled READ buffers this connection fills ahead of its socket (limits.ts readAheadBytesMaxDefault); 0: no limit. */
    private readonly readAheadBytesMax = 0,
  ) {
    this.structured = negotiated.structuredReplies;
    this.contexts = negotiated.metaContexts;
    this.sizeBytes = exp.sizeBytes;
    this.alignBytes = negotiated.blockSizeAgreed ? blockSizeMinBytes : 1;
    this.sparseReads = this.structured;
    this.payloadBytesMax = negotiated.blockSizeAgreed ? requestPayloadBytesMax : requestEffectBytesMax;
  }

  /** Handles one request (not DISC, which the connection handles). */
  handle(h: RequestHeader, payload: WritePayload): void {
    this.inflight++;
    const payloadBytes = h.payloadDiscarded ? 0 : heldBytesFor(h.type, h.length);
    this.inflightPayloadBytes += payloadBytes;
    const rejection = this.validate(h);
    if (rejection) {
      this.replyError(h, rejection.error, rejection.message, payloadBytes);
      return;
    }
    try {
      switch (h.type) {
        case C.CMD_READ:
          this.read(h);
          return;
        case C.CMD_WRITE:
          this.settle(h, this.exp.write(h.offset, payload, (h.flags & C.CMDFLAG_FUA) !== 0), payloadBytes);
          return;
        case C.CMD_FLUSH:
          this.settle(h, this.exp.flush(), 0);
          return;
        case C.CMD_TRIM:
          this.settle(h, this.exp.trim(h.offset, h.length, (h.flags & C.CMDFLAG_FUA) !== 0), 0);
          return;
        case C.CMD_CACHE:
          this.settle(h, this.exp.cache(h.offset, h.length), 0);
          return;
        case C.CMD_WRITE_ZEROES: {
          const options = { noHole: (h.flags & C.CMDFLAG_NO_HOLE) !== 0, fastZero: (h.flags & C.CMDFLAG_FAST_ZERO) !== 0 };
          this.settle(h, this.exp.writeZeroes(h.offset, h.length, options, (h.flags & C.CMDFLAG_FUA) !== 0), 0);
          return;
        }
        case C.CMD_BLOCK_STATUS:
          this.blockStatus(h);
          return;
      }
    } catch (e) {
      this.failed(h, e, payloadBytes);
    }
  }

  private validate(h: RequestHeader): Rejection | null {
    const allowed = FLAGS_ALLOWED[h.type];
    const name = C.COMMAND_NAMES[h.type];
    if (allowed === undefined || name === undefined) return { error: C.NBD_EINVAL, message: `unknown command ${h.type}` };
    if (h.flags & ~allowed) return { error: C.NBD_EINVAL, message: `flags 0x${h.flags.toString(16)} not valid for ${name}` };
    const f = this.exp.features;
    const writes = h.type === C.CMD_WRITE || h.type === C.CMD_TRIM || h.type === C.CMD_WRITE_ZEROES;
    if (writes && f.readOnly) return { error: C.NBD_EPERM, message: 'export is read-only' };
    switch (h.type) {
      case C.CMD_FLUSH:
        if (h.offset !== 0 || h.length !== 0) return { error: C.NBD_EINVAL, message: 'FLUSH offset and length must be 0' };
        return null;
      case C.CMD_READ:
        if (h.flags & C.CMDFLAG_DF && !this.structured) return { error: C.NBD_EINVAL, message: 'DF needs structured replies' };
        if (h.length > this.payloadBytesMax) return { error: C.NBD_EINVAL, message: `READ of ${h.length} bytes exceeds the maximum ${this.payloadBytesMax}` };
        // A streamed read is sent in several chunks; DF asks for one (the spec allows EOVERFLOW).
        if (h.flags & C.CMDFLAG_DF && h.length > requestPayloadBytesMax) return { error: C.NBD_EOVERFLOW, message: `READ of ${h.length} bytes cannot be sent unfragmented` };
        break;
      case C.CMD_WRITE:
        if (h.length > this.payloadBytesMax) return { error: C.NBD_EINVAL, message: `WRITE of ${h.length} bytes exceeds the maximum ${this.payloadBytesMax}` };
        break;
      case C.CMD_TRIM:
        if (!f.trim) return { error: C.NBD_EINVAL, message: 'TRIM not supported' };
        break;
      case C.CMD_CACHE:
        if (!f.cache) return { error: C.NBD_EINVAL, message: 'CACHE not supported' };
        break;
      case C.CMD_WRITE_ZEROES:
        if (!f.writeZeroes) return { error: C.NBD_EINVAL, message: 'WRITE_ZEROES not supported' };
        if (h.flags & C.CMDFLAG_FAST_ZERO && !f.fastZero) return { error: C.NBD_EINVAL, message: 'FAST_ZERO not supported' };
        break;
      case C.CMD_BLOCK_STATUS:
        if (!this.structured || this.contexts.length === 0) {
          return { error: C.NBD_EINVAL, message: 'BLOCK_STATUS needs structured replies and a metadata context' };
        }
        if (h.length === 0) return { error: C.NBD_EINVAL, message: 'BLOCK_STATUS of length 0' };
        break;
    }
    if (h.offset + h.length > this.sizeBytes) {
      const error = h.type === C.CMD_WRITE || h.type === C.CMD_WRITE_ZEROES ? C.NBD_ENOSPC : C.NBD_EINVAL;
      return { error, message: `range ${h.offset}+${h.length} is beyond the export size ${this.sizeBytes}` };
    }
    if (this.alignBytes > 1 && (h.offset % this.alignBytes !== 0 || h.length % this.alignBytes !== 0)) {
      return { error: C.NBD_EINVAL, message: `offset and length must be multiples of ${this.alignBytes}` };
    }
    // Only a WRITE that could not be streamed is discarded; this is a host that does not stream.
    if (h.payloadDiscarded) return { error: C.NBD_EINVAL, message: `WRITE of ${h.length} bytes exceeds the maximum ${requestPayloadBytesMax}` };
    return null;
  }

  private settle(h: RequestHeader, r: MaybePromise<void>, payloadBytes: number): void {
    if (isPromise(r)) {
      r.then(
        () => this.replyOk(h, payloadBytes),
        (e) => this.failed(h, e, payloadBytes),
      );
    } else {
      this.replyOk(h, payloadBytes);
    }
  }

  private failed(h: RequestHeader, e: unknown, payloadBytes: number): void {
    const error = nbdErrorFor(e);
    const message = e instanceof Error ? e.message : String(e);
    if (error !== C.NBD_ENOTSUP) {
      this.host.warn('request failed', { command: C.COMMAND_NAMES[h.type], offset: h.offset, length: h.length, error: message });
    }
    this.replyError(h, error, message, payloadBytes);
  }

  /** The request is done with its WRITE payload: the host may reuse the payload's buffer. */
  private payloadDone(h: RequestHeader): void {
    const release = h.releasePayload;
    if (release) {
      h.releasePayload = null;
      release();
    }
  }

  private replyOk(h: RequestHeader, payloadBytes: number): void {
    this.payloadDone(h);
    this.finish(h.type === C.CMD_READ && this.structured ? [R.noneChunk(h.cookieHi, h.cookieLo)] : [R.simpleReply(0, h.cookieHi, h.cookieLo)], payloadBytes);
  }

  private replyError(h: RequestHeader, error: number, message: string, payloadBytes: number): void {
    this.payloadDone(h);
    const reply = this.structured ? R.errorChunk(error, message, h.cookieHi, h.cookieLo) : R.simpleReply(error, h.cookieHi, h.cookieLo);
    this.finish([reply], payloadBytes);
  }

  /** `done` (optional) runs once the buffers are no longer needed (a pooled buffer goes back). */
  private finish(buffers: Buffer[], payloadBytes: number, done?: () => void): void {
    if (this.simpleStreamActive && !this.closed) {
      // A streamed simple READ reply is on the wire: nothing may come between its pieces.
      this.deferred.push(() => this.finish(buffers, payloadBytes, done));
      return;
    }
    this.inflight--;
    this.inflightPayloadBytes -= payloadBytes;
    if (this.closed) done?.();
    else this.host.send(buffers, done);
    this.host.completed(payloadBytes);
  }

  private read(h: RequestHeader): void {
    if (h.length === 0) {
      // Nothing to read; an OFFSET_DATA chunk must carry at least one byte (doc/proto.md),
      // so a structured reply is just the final NONE chunk.
      this.replyOk(h, 0);
      return;
    }
    if (h.length > requestPayloadBytesMax) {
      this.streamRead(h);
      return;
    }
    // Small reads carry their reply header in front of the data (one buffer, one socket
    // write). Pooled ones get a buffer of exactly the request's length, so a 1 MiB read
    // takes the 1 MiB pool class and not 2 MiB for 28 bytes more; their header goes out as
    // its own small buffer in the same corked write (PERF.md fact 4: measured the same).
    // Small replies are slices of the few slabs of smallReplies (slice-arena.ts).
    const headerBytes = h.length < pooledReadBufferBytesMin ? R.readHeaderBytes(this.structured) : 0;
    const small = headerBytes > 0 && headerBytes + h.length <= smallReplies.sliceBytesMax;
    if (!small && !this.readAheadAllows(h.length)) {
      this.waitingReads.push(h);
      return;
    }
    if (!small && h.length >= fileReplyBytesMin && this.replyFromFile(h)) return;
    const whole = small ? smallReplies.take(headerBytes + h.length) : readBuffers.acquire(headerBytes + h.length);
    if (!small) this.pooledReadBytes += h.length;
    const done = small
      ? smallReplies.lastSlab.release
      : () => {
          readBuffers.release(whole);
          this.pooledReadBytes -= h.length;
          this.startWaitingReads();
        };
    const buf = headerBytes === 0 ? whole : whole.subarray(headerBytes);
    const sparse = this.structured && this.sparseReads && h.length >= sparseReadBytesMin && (h.flags & C.CMDFLAG_DF) === 0;
    // The reader may count the zero blocks where it reads (zero-block-scan.ts); else we scan.
    const scan = sparse ? zeroBlockScan(ZERO_BLOCK_BYTES) : undefined;
    const afterRead = () => {
      if (!this.structured) {
        if (headerBytes === 0) this.finish([R.simpleReply(0, h.cookieHi, h.cookieLo), buf], h.length, done);
        else {
          R.writeSimpleHeader(whole, 0, 0, h.cookieHi, h.cookieLo);
          this.finish([whole], h.length, done);
        }
        return;
      }
      // Large reads send runs of zero blocks as OFFSET_HOLE chunks: fewer bytes on the
      // wire, found by comparing the data itself (asking the file for holes costs more
      // than it saves on some file systems: SEEK_HOLE is linear in the file on tmpfs).
      const runs = scan === undefined || scan.zeroBlocks === 0 ? null
        : scan.zeroBlocks === Math.ceil(h.length / ZERO_BLOCK_BYTES) ? [{ lengthBytes: h.length, flags: C.STATE_HOLE | C.STATE_ZERO }]
        : zeroRuns(buf);
      if (runs && runs.length === 1 && runs[0]!.flags & C.STATE_ZERO) {
        done();
        this.finish([R.offsetHoleChunk(true, h.cookieHi, h.cookieLo, h.offset, h.length)], h.length);
      } else if (runs && runs.length > 1) {
        this.finish(this.sparseChunks(h, buf, runs), h.length, done);
      } else if (headerBytes === 0) {
        const hdr = Buffer.allocUnsafe(R.readHeaderBytes(true));
        R.writeOffsetDataHeader(hdr, 0, true, h.cookieHi, h.cookieLo, h.offset, h.length);
        this.finish([hdr, buf], h.length, done);
      } else {
        R.writeOffsetDataHeader(whole, 0, true, h.cookieHi, h.cookieLo, h.offset, h.length);
        this.finish([whole], h.length, done);
      }
    };
    const failed = (e: unknown) => {
      done();
      this.failed(h, e, h.length);
    };
    let r: MaybePromise<void>;
    try {
      r = this.exp.read(h.offset, h.length, buf, scan);
    } catch (e) {
      failed(e);
      return;
    }
    if (isPromise(r)) r.then(afterRead, failed);
    else afterRead();
  }

  /**
   * A large READ whose bytes the export can name in a file goes out from there (sendfile):
   * its header from memory, its data from the page cache, no copy through a buffer. False:
   * read it into a buffer (the export or the host cannot, or a simple streamed reply holds
   * the wire). It counts against the read-ahead like a pooled buffer, so a client that
   * does not read its replies still holds at most that much queued on this connection.
   */
  private replyFromFile(h: RequestHeader): boolean {
    if (this.host.sendFile === undefined || this.exp.fileRange === undefined || this.simpleStreamActive || this.closed) return false;
    let file: ReturnType<NonNullable<NbdExport['fileRange']>>;
    try {
      file = this.exp.fileRange(h.offset, h.length);
    } catch {
      return false; // the read path reports what is wrong
    }
    if (file === null) return false;
    assert(file.length === h.length, 'a file range covers the whole read');
    let header: Buffer;
    if (this.structured) {
      header = Buffer.allocUnsafe(R.readHeaderBytes(true));
      R.writeOffsetDataHeader(header, 0, true, h.cookieHi, h.cookieLo, h.offset, h.length);
    } else {
      header = R.simpleReply(0, h.cookieHi, h.cookieLo);
    }
    this.pooledReadBytes += h.length;
    const sent = () => {
      this.pooledReadBytes -= h.length;
      this.startWaitingReads();
    };
    if (!this.host.sendFile([header], file, sent)) {
      this.pooledReadBytes -= h.length;
      return false;
    }
    this.inflight--;
    this.inflightPayloadBytes -= h.length;
    this.host.completed(h.length);
    return true;
  }

  /** Whether a large READ of `bytes` may take its buffer now (one always may when none is held). */
  private readAheadAllows(bytes: number): boolean {
    return this.readAheadBytesMax === 0 || this.pooledReadBytes === 0 || this.pooledReadBytes + bytes <= this.readAheadBytesMax;
  }

  /** A reply left (or the connection closed): start the waiting reads that now fit; after a close, answer none. */
  private startWaitingReads(): void {
    while (this.waitingReads.length > 0) {
      const h = this.waitingReads[0]!;
      if (!this.closed && !this.readAheadAllows(h.length)) return;
      this.waitingReads.shift();
      if (this.closed) this.finish([], h.length);
      else this.read(h);
    }
  }

  /** OFFSET_DATA for data extents (views into one buffer), OFFSET_HOLE for zero extents. */
  private sparseChunks(h: RequestHeader, data: Buffer, extents: Extent[], dataOffset = h.offset, final = true): Buffer[] {
    const out: Buffer[] = [];
    let pos = 0;
    for (const e of extents) {
      if (e.flags & C.STATE_ZERO) {
        out.push(R.offsetHoleChunk(false, h.cookieHi, h.cookieLo, dataOffset + pos, e.lengthBytes));
      } else {
        const hdr = Buffer.allocUnsafe(28);
        R.writeOffsetDataHeader(hdr, 0, false, h.cookieHi, h.cookieLo, dataOffset + pos, e.lengthBytes);
        out.push(hdr, data.subarray(pos, pos + e.lengthBytes));
      }
      pos += e.lengthBytes;
    }
    if (final) out.push(R.noneChunk(h.cookieHi, h.cookieLo));
    return out;
  }

  private blockStatus(h: RequestHeader): void {
    const reqOne = (h.flags & C.CMDFLAG_REQ_ONE) !== 0;
    const extentsMax = reqOne ? 1 : blockStatusExtentsMax;
    const length = Math.min(h.length, this.sizeBytes - h.offset);
    const results: Buffer[] = new Array(this.contexts.length);
    let pending = this.contexts.length;
    let failed = false;
    const done = (id: number, extents: Extent[]) => {
      if (failed) return;
      if (extents.length === 0) extents = [{ lengthBytes: length, flags: 0 }];
      if (reqOne) extents = [{ lengthBytes: Math.min(extents[0]!.lengthBytes, h.length), flags: extents[0]!.flags }];
      results[id] = R.blockStatusChunk(false, h.cookieHi, h.cookieLo, id, extents);
      if (--pending === 0) this.finish([...results, R.noneChunk(h.cookieHi, h.cookieLo)], 0);
    };
    const fail = (e: unknown) => {
      if (failed) return;
      failed = true;
      this.failed(h, e, 0);
    };
    this.contexts.forEach((context, id) => {
      try {
        const r = this.exp.blockStatus(context, h.offset, length, extentsMax);
        if (isPromise(r)) r.then((e) => done(id, e), fail);
        else done(id, r);
      } catch (e) {
        fail(e);
      }
    });
  }

  // ---- requests larger than one buffer, streamed in pieces ----
  // Only clients that did not agree to block sizes may send them (the spec lets them
  // assume an unlimited maximum). Memory per request stays at two pieces: one being
  // received or read, one being written to storage or to the socket.

  /** A simple READ reply is being streamed: every other reply waits behind it (deferred). */
  private simpleStreamActive = false;
  private readonly deferred: (() => void)[] = [];
  /** Simple streamed READs waiting for the one on the wire to end. */
  private readonly streamsWaiting: (() => void)[] = [];
  /** Wakes each streamed READ in progress (to notice the connection is gone). */
  private readonly activeReads = new Set<() => void>();
  private streamedWrite: StreamedWrite | null = null;

  /** The connection is gone: late completions are dropped, streams end without replies. */
  close(): void {
    this.closed = true;
    this.startWaitingReads();
    this.abandonPartialRequest();
    for (const poke of [...this.activeReads]) poke();
    this.endSimpleStream();
  }

  /**
   * No more bytes will be read from the client (it half-closed, or the server drains): a
   * WRITE whose payload is only partly received can never be answered; end it silently.
   */
  abandonPartialRequest(): void {
    const w = this.streamedWrite;
    if (!w || w.lastReceived) return;
    w.abandoned = true;
    this.streamedWrite = null;
    this.pumpWrite(w);
  }

  /** A WRITE longer than requestPayloadBytesMax arrived: true to take it in pieces, false to have it discarded (and rejected). */
  streamWrite(h: RequestHeader): boolean {
    if (this.closed || this.streamedWrite || this.validate(h)) return false;
    this.inflight++;
    this.streamedWrite = { h, receivedBytes: 0, heldPieces: 0, queue: [], writing: false, lastReceived: false, abandoned: false, finished: false, error: null };
    return true;
  }

  /** Before a piece of the streamed WRITE is received: at most two held at once; `reserve` takes its memory. */
  acceptPiece(reserve: () => boolean): boolean {
    const w = this.streamedWrite;
    if (!w || w.heldPieces >= 2 || !reserve()) return false;
    w.heldPieces++;
    return true;
  }

  /** The next piece of the streamed WRITE, in order. */
  writePiece(h: RequestHeader, payload: Buffer[], last: boolean): void {
    const w = this.streamedWrite;
    assert(w !== null && w.h === h, 'a WRITE piece without its stream');
    let bytes = 0;
    for (const v of payload) bytes += v.length;
    w.queue.push({ atBytes: w.receivedBytes, bytes, payload });
    w.receivedBytes += bytes;
    if (last) {
      w.lastReceived = true;
      this.streamedWrite = null;
    }
    this.pumpWrite(w);
  }

  /** Writes queued pieces one at a time, in order; replies once all are written (and flushed for FUA). */
  private pumpWrite(w: StreamedWrite): void {
    while (!w.writing && w.queue.length > 0) {
      const p = w.queue.shift()!;
      if (w.error !== null || w.abandoned || this.closed) {
        this.pieceDone(w, p.bytes); // consumed, not written: an error reply follows
        continue;
      }
      w.writing = true;
      let r: MaybePromise<void>;
      try {
        r = this.exp.write(w.h.offset + p.atBytes, p.payload, false);
      } catch (e) {
        r = Promise.reject(e);
      }
      const done = (e: unknown) => {
        w.writing = false;
        if (e !== undefined && w.error === null) w.error = e ?? new Error('write failed');
        this.pieceDone(w, p.bytes);
      };
      if (isPromise(r)) {
        r.then(
          () => {
            done(undefined);
            this.pumpWrite(w);
          },
          (e) => {
            done(e);
            this.pumpWrite(w);
          },
        );
        return;
      }
      done(undefined);
    }
    if (w.writing || w.queue.length > 0 || w.finished || !(w.lastReceived || w.abandoned)) return;
    w.finished = true;
    const h = w.h;
    if (w.abandoned) this.finishWithoutReply(0);
    else if (w.error !== null) this.failed(h, w.error, 0);
    else if (h.flags & C.CMDFLAG_FUA) {
      // Pieces were written without FUA; one flush makes the whole request durable before the reply.
      try {
        this.settle(h, this.exp.flush(), 0);
      } catch (e) {
        this.failed(h, e, 0);
      }
    } else this.replyOk(h, 0);
  }

  private pieceDone(w: StreamedWrite, bytes: number): void {
    w.heldPieces--;
    this.host.released?.(bytes);
  }

  private finishWithoutReply(payloadBytes: number): void {
    this.inflight--;
    this.inflightPayloadBytes -= payloadBytes;
    this.host.completed(payloadBytes);
  }

  /**
   * A READ longer than requestPayloadBytesMax: read and sent a piece at a time. A simple
   * reply is one header and then the data, so it holds the wire until its last piece
   * (other replies wait); a structured one is a series of OFFSET_DATA / OFFSET_HOLE
   * chunks that other replies may come between, and can end with an error chunk.
   */
  private streamRead(h: RequestHeader): void {
    const simple = !this.structured;
    if (simple && this.simpleStreamActive) {
      this.streamsWaiting.push(() => this.streamRead(h));
      return;
    }
    if (simple) this.simpleStreamActive = true;
    const heldBytes = streamPieceBytes;
    let nextBytes = 0; // offset (in the request) of the next piece to read
    let reading = false;
    let ready: { buf: Buffer; atBytes: number } | null = null;
    let onSocket = 0;
    let headerSent = false;
    let ended = false;
    const end = () => {
      ended = true;
      this.activeReads.delete(pump);
      if (ready) readBuffers.release(ready.buf);
      ready = null;
      if (simple) this.endSimpleStream();
    };
    const fail = (e: unknown) => {
      if (ended) return;
      end();
      if (this.closed) this.finishWithoutReply(heldBytes);
      else if (simple && headerSent) {
        // The header already promised success: the only honest way out is to close.
        this.host.warn('request failed', { command: 'READ', offset: h.offset, length: h.length, error: e instanceof Error ? e.message : String(e) });
        this.host.fatal?.(`READ of ${h.length} bytes failed after its reply began`);
        this.finishWithoutReply(heldBytes);
      } else this.failed(h, e, heldBytes);
    };
    const send = (buf: Buffer, atBytes: number) => {
      const sent = () => {
        onSocket--;
        readBuffers.release(buf);
        pump();
      };
      onSocket++;
      const offset = h.offset + atBytes;
      if (simple) {
        headerSent = true;
        this.host.send(atBytes === 0 ? [R.simpleReply(0, h.cookieHi, h.cookieLo), buf] : [buf], sent);
        return;
      }
      const runs = this.sparseReads ? zeroRuns(buf) : null;
      if (runs && runs.length === 1 && runs[0]!.flags & C.STATE_ZERO) {
        this.host.send([R.offsetHoleChunk(false, h.cookieHi, h.cookieLo, offset, buf.length)], sent);
      } else if (runs && runs.length > 1) {
        this.host.send(this.sparseChunks(h, buf, runs, offset, false), sent);
      } else {
        const hdr = Buffer.allocUnsafe(R.readHeaderBytes(true));
        R.writeOffsetDataHeader(hdr, 0, false, h.cookieHi, h.cookieLo, offset, buf.length);
        this.host.send([hdr, buf], sent);
      }
    };
    const pump = (): void => {
      if (ended) return;
      if (this.closed) {
        end();
        this.finishWithoutReply(heldBytes);
        return;
      }
      if (ready && onSocket === 0) {
        const r = ready;
        ready = null;
        send(r.buf, r.atBytes);
        if (ended) return;
      }
      if (!reading && !ready && nextBytes < h.length) {
        const atBytes = nextBytes;
        const n = Math.min(streamPieceBytes, h.length - atBytes);
        nextBytes += n;
        reading = true;
        const buf = readBuffers.acquire(n);
        const ok = () => {
          reading = false;
          if (ended) {
            readBuffers.release(buf);
            return;
          }
          ready = { buf, atBytes };
          pump();
        };
        const bad = (e: unknown) => {
          reading = false;
          readBuffers.release(buf);
          fail(e);
        };
        let r: MaybePromise<void>;
        try {
          r = this.exp.read(h.offset + atBytes, n, buf);
        } catch (e) {
          bad(e);
          return;
        }
        if (isPromise(r)) r.then(ok, bad);
        else ok();
        return;
      }
      if (!reading && !ready && nextBytes >= h.length) {
        // Every piece is queued on the socket, in order: the request is answered.
        end();
        if (simple) this.finishWithoutReply(heldBytes);
        else this.finish([R.noneChunk(h.cookieHi, h.cookieLo)], heldBytes);
      }
    };
    this.activeReads.add(pump);
    pump();
  }

  /** The streamed simple READ reply left the wire: deferred replies go out, then the next waiting stream. */
  private endSimpleStream(): void {
    if (!this.simpleStreamActive) return;
    this.simpleStreamActive = false;
    for (const f of this.deferred.splice(0)) f();
    const next = this.streamsWaiting.shift();
    if (next) next();
    if (this.closed) for (const f of this.streamsWaiting.splice(0)) f();
  }
}

interface StreamedWrite {
  h: RequestHeader;
  receivedBytes: number;
  /** Pieces reserved and not yet written (or dropped): at most two. */
  heldPieces: number;
  queue: { atBytes: number; bytes: number; payload: Buffer[] }[];
  writing: boolean;
  lastReceived: boolean;
  abandoned: boolean;
  finished: boolean;
  error: unknown;
}

const ZERO_BLOCK_BYTES = 4096;
const ZERO_BLOCK = Buffer.alloc(ZERO_BLOCK_BYTES);

/**
 * Splits data into runs of all-zero and other 4 KiB blocks (the last block may be
 * shorter). Random data costs one byte comparison per block; zeroes cost a memcmp.
 */
export function zeroRuns(data: Buffer): Extent[] {
  const runs: Extent[] = [];
  for (let pos = 0; pos < data.length; pos += ZERO_BLOCK_BYTES) {
    const end = Math.min(data.length, pos + ZERO_BLOCK_BYTES);
    const zero = data[pos] === 0 && ZERO_BLOCK.compare(data, pos, end, 0, end - pos) === 0;
    const flags = zero ? C.STATE_HOLE | C.STATE_ZERO : 0;
    const last = runs[runs.length - 1];
    if (last && last.flags === flags) last.lengthBytes += end - pos;
    else runs.push({ lengthBytes: end - pos, flags });
  }
  return runs;
}
