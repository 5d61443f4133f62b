// Why: the transmission phase as a pure push parser: bytes in, complete requests out.
// A WRITE's payload is handed over as views of the received chunks (never joined).
// A WRITE whose payload is larger than we accept is still consumed, streaming and
// without buffering, so the stream stays in sync and the request gets an error
// reply; only a bad magic (a broken frame) ends the connection. A WRITE larger than
// one buffer may instead be streamed: its payload is handed over in pieces, each asked
// for before it is received (so the host can reserve it and stop reading between them).
// A host that reads the socket into buffers it chooses may instead give a large WRITE one
// buffer of its own (payloadBuffer): the framer then copies only the bytes already queued
// into it and tells the host where the rest goes (fillRegion), so the kernel copies the
// remaining payload straight into that buffer, in reads as large as the payload.
// Or the host may take a large WRITE's payload outside the framer (payloadOutside): the
// framer hands it the bytes already queued, the host receives the rest itself (into a kernel
// pipe) and reports them (outsideReceived); the request then comes with no payload views.

import { ByteQueue } from '../util/byte-queue.js';
import { assert } from '../util/assert.js';
import { directPayloadBytesMin } from '../util/limits.js';
import { CMD_WRITE, REQUEST_HEADER_BYTES, REQUEST_MAGIC } from './constants.js';

export interface RequestHeader {
  flags: number;
  type: number;
  /** The client's 64-bit cookie (handle), as two halves, echoed in the reply. */
  cookieHi: number;
  cookieLo: number;
  /** Exact when < 2^53; larger offsets come out inexact but always beyond any export. */
  offset: number;
  length: number;
  /** True when a WRITE payload was larger than the framer accepts and was discarded. */
  payloadDiscarded: boolean;
  /** Gives the payload's own buffer (from FramerSink.payloadBuffer) back; null when there is none. */
  releasePayload?: (() => void) | null;
  /** The host received this WRITE's payload itself (FramerSink.payloadOutside). */
  payloadOutside?: boolean;
}

export interface FramerSink {
  /** A complete request. `payload` holds the WRITE data (views), empty for other commands. */
  request(header: RequestHeader, payload: Buffer[]): void;
  /**
   * Asked before each request is handled, with its command and length (so the host can
   * reserve the memory it will hold): false stops parsing until `parse` is called again
   * (backpressure); the header is kept and asked about again then.
   */
  accepting(type: number, length: number): boolean;
  /**
   * A WRITE longer than payloadBytesMax: true to take its payload in pieces (writePiece),
   * false (or absent) to have it discarded and then passed to `request` with payloadDiscarded.
   */
  streamWrite?(header: RequestHeader): boolean;
  /** Asked before each piece of a streamed WRITE is received, with its length: false stops parsing like accepting(). */
  pieceAccepting?(length: number): boolean;
  /** The next piece of a streamed WRITE's payload (views), in order; `last` on the final one. */
  writePiece?(header: RequestHeader, payload: Buffer[], last: boolean): void;
  /**
   * An accepted WRITE of `length` bytes (≤ payloadBytesMax) is about to be received: a
   * buffer of exactly that length to assemble it in (then `fillRegion` says where the
   * next bytes go), or null to take it as views of the received chunks.
   */
  payloadBuffer?(length: number): Buffer | null;
  /**
   * The function that gives a buffer from payloadBuffer back, once its request is done with
   * it (it becomes RequestHeader.releasePayload). Asked right after payloadBuffer, so a host
   * may return one function per buffer it carves slices from, not a closure per request.
   */
  payloadRelease?(buffer: Buffer): () => void;
  /**
   * An accepted WRITE (≤ payloadBytesMax) is about to be received: true to take its payload
   * outside the framer. The framer then passes the payload bytes it has queued to
   * outsideBytes (to be consumed before it returns) and waits for outsideReceived.
   */
  payloadOutside?(header: RequestHeader): boolean;
  outsideBytes?(views: Buffer[]): void;
}

export type FramerError = { kind: 'bad-magic'; magic: number };

/**
 * The rest of a small payload (< directPayloadBytesMin) shorter than this is not offered as a
 * region of its own: it comes through the queue with the requests behind it (a copy of a few
 * KiB, not one more read).
 */
const fillRegionBytesMin = 16 * 1024;

export class RequestFramer {
  private pending: RequestHeader | null = null;
  private discardLeft = 0;
  /** A header taken from the queue that the sink did not accept yet. */
  private held: Buffer | null = null;
  /** A WRITE being streamed: bytes still to come, and the length of the piece accepted and not yet delivered. */
  private stream: { h: RequestHeader; leftBytes: number; pieceBytes: number } | null = null;
  /** A WRITE being assembled in its own buffer: `filled` bytes of `target` are there. */
  private fill: { h: RequestHeader; target: Buffer; filled: number } | null = null;
  /** A WRITE whose payload the host receives outside the framer: `left` bytes still to come. */
  private outside: { h: RequestHeader; left: number } | null = null;
  /** Payload bytes handed out as views of received chunks (the host must not reuse those chunks). */
  viewedBytes = 0;
  constructor(
    readonly queue: ByteQueue,
    private readonly sink: FramerSink,
    private readonly payloadBytesMax: number,
    /** Piece length for streamed WRITEs. */
    private readonly pieceBytesMax: number = payloadBytesMax,
  ) {}

  /** True while a WRITE's payload is being received (or discarded). */
  get awaitingPayload(): boolean {
    return this.pending !== null || this.stream !== null || this.fill !== null || this.outside !== null;
  }

  /** Payload bytes the host still has to receive outside the framer (0 when none). */
  get outsideLeft(): number {
    return this.outside ? this.outside.left : 0;
  }

  /** `n` bytes of the outside payload arrived (outside the framer); parses on. */
  outsideReceived(n: number): FramerError | null {
    const o = this.outside;
    assert(o !== null && n >= 0 && n <= o.left, 'outside payload bytes not asked for');
    o.left -= n;
    return this.parse();
  }

  /**
   * The outside payload goes on in a buffer of its own after all: its first `filled` bytes
   * are already in `target` (the host put them there), the rest arrive as for payloadBuffer.
   */
  outsideToFill(target: Buffer, release: (() => void) | null): void {
    const o = this.outside;
    assert(o !== null && target.length === o.h.length, 'an outside payload moves to a buffer of its length');
    this.outside = null;
    o.h.payloadOutside = false;
    o.h.releasePayload = release;
    this.fill = { h: o.h, target, filled: o.h.length - o.left };
  }

  /** Bytes accepted for a WRITE payload and not yet handed over (0 when none, or when it is discarded). */
  get pendingWriteBytes(): number {
    if (this.stream) return this.stream.pieceBytes;
    if (this.fill) return this.fill.h.length;
    if (this.outside) return this.outside.h.length;
    return this.pending && !this.pending.payloadDiscarded ? this.pending.length : 0;
  }

  /** Whether the framer still refers to received bytes (queued, or a header waiting to be accepted). */
  get holdsInput(): boolean {
    return this.queue.length > 0 || this.held !== null;
  }

  /**
   * Where the next received bytes should go: the rest of the WRITE payload being assembled
   * in its own buffer (nothing else is queued), else null (any buffer; then `push`).
   */
  fillRegion(): Buffer | null {
    const f = this.fill;
    if (!f || this.queue.length > 0) return null;
    // (A large payload's rest is always read in place: after a large WRITE the host reads
    // headers in short reads, and a few KiB left would take several of them.)
    if (f.target.length < directPayloadBytesMin && f.target.length - f.filled < fillRegionBytesMin) return null;
    return f.target.subarray(f.filled);
  }

  /** `n` bytes were received into the start of the last fillRegion(); parses on. */
  filled(n: number): FramerError | null {
    const f = this.fill;
    assert(f !== null && this.queue.length === 0 && n > 0 && f.filled + n <= f.target.length, 'bytes received into a payload buffer not asked for');
    f.filled += n;
    return this.parse();
  }

  /** Adds bytes and parses what is complete. Returns an error when the stream is broken. */
  push(chunk: Buffer): FramerError | null {
    this.queue.push(chunk);
    return this.parse();
  }

  /** Parses complete requests already queued (after backpressure lifts). */
  parse(): FramerError | null {
    const q = this.queue;
    for (;;) {
      const o = this.outside;
      if (o) {
        // Queued bytes are the payload's first ones: the host takes them (a copy) before the rest.
        const n = Math.min(q.length, o.left);
        if (n > 0) {
          o.left -= n;
          this.sink.outsideBytes!(q.takeViews(n));
          continue;
        }
        if (o.left > 0) return null;
        this.outside = null;
        this.sink.request(o.h, []);
        continue;
      }
      const f = this.fill;
      if (f) {
        const n = Math.min(q.length, f.target.length - f.filled);
        if (n > 0) {
          q.copyOut(f.target, f.filled, n);
          f.filled += n;
        }
        if (f.filled < f.target.length) return null;
        this.fill = null;
        this.sink.request(f.h, [f.target]);
        continue;
      }
      const s = this.stream;
      if (s) {
        if (s.pieceBytes === 0) {
          const n = Math.min(this.pieceBytesMax, s.leftBytes);
          if (!this.sink.pieceAccepting!(n)) return null;
          s.pieceBytes = n;
        }
        if (q.length < s.pieceBytes) return null;
        this.viewedBytes += s.pieceBytes;
        const views = q.takeViews(s.pieceBytes);
        s.leftBytes -= s.pieceBytes;
        s.pieceBytes = 0;
        const last = s.leftBytes === 0;
        if (last) this.stream = null;
        this.sink.writePiece!(s.h, views, last);
        continue;
      }
      if (this.discardLeft > 0) {
        this.discardLeft -= q.skip(this.discardLeft);
        if (this.discardLeft > 0) return null;
        const h = this.pending!;
        this.pending = null;
        this.sink.request(h, []);
        continue;
      }
      if (this.pending) {
        const h = this.pending;
        if (q.length < h.length) return null;
        this.pending = null;
        this.viewedBytes += h.length;
        this.sink.request(h, q.takeViews(h.length));
        continue;
      }
      let b = this.held;
      if (!b) {
        if (q.length < REQUEST_HEADER_BYTES) return null;
        b = q.take(REQUEST_HEADER_BYTES);
        const magic = b.readUInt32BE(0);
        if (magic !== REQUEST_MAGIC) return { kind: 'bad-magic', magic };
      }
      if (!this.sink.accepting(b.readUInt16BE(6), b.readUInt32BE(24))) {
        this.held = b;
        return null;
      }
      this.held = null;
      const h: RequestHeader = {
        flags: b.readUInt16BE(4),
        type: b.readUInt16BE(6),
        cookieHi: b.readUInt32BE(8),
        cookieLo: b.readUInt32BE(12),
        offset: b.readUInt32BE(16) * 4294967296 + b.readUInt32BE(20),
        length: b.readUInt32BE(24),
        payloadDiscarded: false,
        releasePayload: null,
      };
      if (h.type !== CMD_WRITE || h.length === 0) {
        this.sink.request(h, []);
      } else if (h.length > this.payloadBytesMax) {
        if (this.sink.streamWrite?.(h)) {
          this.stream = { h, leftBytes: h.length, pieceBytes: 0 };
          continue;
        }
        h.payloadDiscarded = true;
        this.pending = h;
        this.discardLeft = h.length;
      } else if (this.sink.payloadOutside?.(h)) {
        h.payloadOutside = true;
        this.outside = { h, left: h.length };
      } else {
        const target = this.sink.payloadBuffer?.(h.length) ?? null;
        if (target) {
          assert(target.length === h.length, 'a payload buffer of the payload length');
          h.releasePayload = this.sink.payloadRelease?.(target) ?? null;
          this.fill = { h, target, filled: 0 };
        } else {
          this.pending = h;
        }
      }
    }
  }
}
