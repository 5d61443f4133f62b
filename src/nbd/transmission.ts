// Why: the transmission phase for one connection: validate each request (command,
// flags, range, alignment, read-only) and make exactly one call into the export,
// then encode the reply (simple for clients like the Linux kernel, structured when
// negotiated). Requests run concurrently and reply out of order by cookie. Knows the
// wire, not the storage: everything below is behind NbdExport.

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
  requestPayloadBytesMax,
  sparseReadBytesMin,
} from '../util/limits.js';
import { BufferPool } from '../util/buffer-pool.js';

/** Read buffers shared by every connection of the process (see buffer-pool.ts). */
const readBuffers = new BufferPool(pooledReadBufferBytesMin, pooledReadBuffersBytesMax);

export interface TransmissionHost {
  /**
   * Queue reply bytes on the connection (the host corks and batches). `sent` runs once
   * the socket no longer needs the buffers (written, or the connection is gone).
   */
  send(buffers: Buffer[], sent?: () => void): void;
  /** One request has completed and its reply is queued. */
  completed(payloadBytes: number): void;
  /** An export call failed in a way the client should hear about; for logs. */
  warn(message: string, fields: Record<string, unknown>): void;
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
  readonly structured: boolean;
  readonly sizeBytes: number;
  private readonly contexts: string[];
  private readonly alignBytes: number;
  private readonly sparseReads: boolean;

  constructor(
    readonly exp: NbdExport,
    negotiated: Negotiated,
    private readonly host: TransmissionHost,
  ) {
    this.structured = negotiated.structuredReplies;
    this.contexts = negotiated.metaContexts;
    this.sizeBytes = exp.sizeBytes;
    this.alignBytes = negotiated.blockSizeAgreed ? blockSizeMinBytes : 1;
    this.sparseReads = this.structured;
  }

  /** Handles one request (not DISC, which the connection handles). */
  handle(h: RequestHeader, payload: Buffer[]): void {
    this.inflight++;
    const payloadBytes = (h.type === C.CMD_WRITE && !h.payloadDiscarded) || h.type === C.CMD_READ ? h.length : 0;
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
        if (h.length > requestPayloadBytesMax) return { error: C.NBD_EINVAL, message: `READ of ${h.length} bytes exceeds the maximum ${requestPayloadBytesMax}` };
        break;
      case C.CMD_WRITE:
        if (h.payloadDiscarded) return { error: C.NBD_EINVAL, message: `WRITE of ${h.length} bytes exceeds the maximum ${requestPayloadBytesMax}` };
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

  private replyOk(h: RequestHeader, payloadBytes: number): void {
    this.finish(h.type === C.CMD_READ && this.structured ? [R.noneChunk(h.cookieHi, h.cookieLo)] : [R.simpleReply(0, h.cookieHi, h.cookieLo)], payloadBytes);
  }

  private replyError(h: RequestHeader, error: number, message: string, payloadBytes: number): void {
    const reply = this.structured ? R.errorChunk(error, message, h.cookieHi, h.cookieLo) : R.simpleReply(error, h.cookieHi, h.cookieLo);
    this.finish([reply], payloadBytes);
  }

  private finish(buffers: Buffer[], payloadBytes: number, pooled?: Buffer): void {
    this.inflight--;
    this.inflightPayloadBytes -= payloadBytes;
    if (this.closed) {
      if (pooled) readBuffers.release(pooled);
    } else {
      this.host.send(buffers, pooled ? () => readBuffers.release(pooled) : undefined);
    }
    this.host.completed(payloadBytes);
  }

  private read(h: RequestHeader): void {
    if (h.length === 0) {
      // Nothing to read; an OFFSET_DATA chunk must carry at least one byte (doc/proto.md),
      // so a structured reply is just the final NONE chunk.
      this.replyOk(h, 0);
      return;
    }
    const headerBytes = R.readHeaderBytes(this.structured);
    const buf = readBuffers.acquire(headerBytes + h.length);
    const data = buf.subarray(headerBytes);
    const afterRead = () => {
      if (!this.structured) {
        R.writeSimpleHeader(buf, 0, 0, h.cookieHi, h.cookieLo);
        this.finish([buf], h.length, buf);
        return;
      }
      // Large reads send runs of zero blocks as OFFSET_HOLE chunks: fewer bytes on the
      // wire, found by comparing the data itself (asking the file for holes costs more
      // than it saves on some file systems: SEEK_HOLE is linear in the file on tmpfs).
      const runs = this.sparseReads && h.length >= sparseReadBytesMin && (h.flags & C.CMDFLAG_DF) === 0 ? zeroRuns(data) : null;
      if (runs && runs.length === 1 && runs[0]!.flags & C.STATE_ZERO) {
        readBuffers.release(buf);
        this.finish([R.offsetHoleChunk(true, h.cookieHi, h.cookieLo, h.offset, h.length)], h.length);
      } else if (runs && runs.length > 1) {
        this.finish(this.sparseChunks(h, data, runs), h.length, buf);
      } else {
        R.writeOffsetDataHeader(buf, 0, true, h.cookieHi, h.cookieLo, h.offset, h.length);
        this.finish([buf], h.length, buf);
      }
    };
    const failed = (e: unknown) => {
      readBuffers.release(buf);
      this.failed(h, e, h.length);
    };
    let r: MaybePromise<void>;
    try {
      r = this.exp.read(h.offset, h.length, data);
    } catch (e) {
      failed(e);
      return;
    }
    if (isPromise(r)) r.then(afterRead, failed);
    else afterRead();
  }

  /** OFFSET_DATA for data extents (views into one buffer), OFFSET_HOLE for zero extents. */
  private sparseChunks(h: RequestHeader, data: Buffer, extents: Extent[]): Buffer[] {
    const out: Buffer[] = [];
    let pos = 0;
    for (const e of extents) {
      if (e.flags & C.STATE_ZERO) {
        out.push(R.offsetHoleChunk(false, h.cookieHi, h.cookieLo, h.offset + pos, e.lengthBytes));
      } else {
        const hdr = Buffer.allocUnsafe(28);
        R.writeOffsetDataHeader(hdr, 0, false, h.cookieHi, h.cookieLo, h.offset + pos, e.lengthBytes);
        out.push(hdr, data.subarray(pos, pos + e.lengthBytes));
      }
      pos += e.lengthBytes;
    }
    out.push(R.noneChunk(h.cookieHi, h.cookieLo));
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
