// Why: READ and WRITE above the 32 MiB maximum (from clients that did not agree to it)
// are moved in pieces. These tests pin the rules that make that safe: the framer hands a
// WRITE's payload over in order and only as fast as the host accepts pieces; a simple
// READ reply stays contiguous on the wire even when other replies complete meanwhile; a
// structured one is several chunks; a failed piece still consumes the rest and answers
// with an error; FUA flushes before the reply; clients held to the maximum get EINVAL.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { ByteQueue } from '../../src/util/byte-queue.js';
import { RequestFramer, type RequestHeader } from '../../src/nbd/request-framer.js';
import { Transmission } from '../../src/nbd/transmission.js';
import type { Negotiated } from '../../src/nbd/negotiator.js';
import * as C from '../../src/nbd/constants.js';
import { requestPayloadBytesMax, streamPieceBytes } from '../../src/util/limits.js';
import { request } from '../helpers/wire.js';
import { testSeed } from '../helpers/seed.js';
import { MemoryExport } from '../helpers/memory-export.js';

const MiB = 1024 * 1024;

describe('RequestFramer: streamed WRITE payloads', () => {
  it('hands a WRITE above the maximum over in ordered pieces, pausing while pieces are refused (property)', () => {
    const payload = Buffer.from(Array.from({ length: 3000 }, (_, i) => (i * 7) & 255));
    const bytes = Buffer.concat([
      request(C.CMD_WRITE, { cookie: 1, offset: 5, length: payload.length }),
      payload,
      request(C.CMD_READ, { cookie: 2, length: 512 }),
    ]);
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 1, max: 700 }), { minLength: 1, maxLength: 20 }), fc.array(fc.boolean(), { minLength: 1, maxLength: 9 }), (sizes, refusals) => {
        const pieces: { bytes: Buffer; last: boolean }[] = [];
        const requests: number[] = [];
        let asked = 0;
        let refusedLast = false;
        const f = new RequestFramer(
          new ByteQueue(),
          {
            request: (h) => requests.push(h.cookieLo),
            accepting: () => true,
            streamWrite: (h) => h.cookieLo === 1,
            pieceAccepting: (n) => {
              expect(n).toBeLessThanOrEqual(256);
              // Refused at times, never twice running (the host resumes once memory is back).
              refusedLast = !refusedLast && refusals[asked++ % refusals.length]!;
              return !refusedLast;
            },
            writePiece: (_h, p, last) => pieces.push({ bytes: Buffer.concat(p), last }),
          },
          1024,
          256,
        );
        let pos = 0;
        let i = 0;
        let rounds = 0;
        while (pos < bytes.length || f.awaitingPayload || requests.length < 1) {
          if (pos < bytes.length) {
            const n = sizes[i++ % sizes.length]!;
            f.push(bytes.subarray(pos, pos + n));
            pos += n;
          } else f.parse(); // the host resumes after a refusal
          if (++rounds > 10_000) throw new Error('no progress');
        }
        expect(Buffer.concat(pieces.map((p) => p.bytes)).equals(payload)).toBe(true);
        expect(pieces.every((p) => p.bytes.length <= 256)).toBe(true);
        expect(pieces.map((p) => p.last)).toEqual(pieces.map((_, k) => k === pieces.length - 1));
        expect(requests).toEqual([2]);
        expect(f.pendingWriteBytes).toBe(0);
      }),
      { seed: testSeed('streamed write framing'), numRuns: 200 },
    );
  });

  it('reports the accepted, not yet delivered piece as pending (released by the host on close)', () => {
    const f = new RequestFramer(
      new ByteQueue(),
      { request: () => undefined, accepting: () => true, streamWrite: () => true, pieceAccepting: () => true, writePiece: () => undefined },
      1024,
      256,
    );
    f.push(request(C.CMD_WRITE, { cookie: 1, length: 4096 }));
    expect(f.awaitingPayload).toBe(true);
    expect(f.pendingWriteBytes).toBe(256);
  });
});

function setup(opts: { structured?: boolean; agreed?: boolean; async?: boolean } = {}) {
  const exp = new MemoryExport('m', 80 * MiB);
  exp.async = opts.async ?? true;
  const sent: Buffer[] = [];
  const completed: number[] = [];
  const released: number[] = [];
  const fatal: string[] = [];
  const neg: Negotiated = {
    export: exp,
    structuredReplies: opts.structured ?? false,
    metaContexts: opts.structured ? [C.CONTEXT_BASE_ALLOCATION] : [],
    blockSizeAgreed: opts.agreed ?? false,
    transmissionFlags: 0,
    tls: false,
  };
  const tx = new Transmission(exp, neg, {
    // Like a socket: the buffers are taken a little later.
    send: (b, done) => {
      sent.push(Buffer.concat(b));
      if (done) setImmediate(done);
    },
    completed: (n) => completed.push(n),
    warn: () => undefined,
    released: (n) => released.push(n),
    fatal: (r) => fatal.push(r),
  });
  const header = (type: number, o: Partial<RequestHeader> = {}): RequestHeader => ({
    flags: 0,
    type,
    cookieHi: 0,
    cookieLo: 1,
    offset: 0,
    length: 0,
    payloadDiscarded: false,
    ...o,
  });
  /** Waits (loop turns) until cond() is true; cond is called until then and not after (it may take something). */
  const until = async (cond: () => boolean) => {
    let ok = cond();
    for (let i = 0; i < 2000 && !ok; i++) {
      await new Promise((r) => setImmediate(r));
      ok = cond();
    }
    expect(ok).toBe(true);
  };
  /** Feeds a streamed WRITE the way the framer does: a piece whenever one is accepted. */
  const streamWrite = async (h: RequestHeader, data: Buffer) => {
    expect(tx.streamWrite(h)).toBe(true);
    for (let pos = 0; pos < data.length; pos += streamPieceBytes) {
      await until(() => tx.acceptPiece(() => true));
      const end = Math.min(data.length, pos + streamPieceBytes);
      tx.writePiece(h, [data.subarray(pos, end)], end === data.length);
    }
  };
  return { exp, tx, sent, completed, released, fatal, header, until, streamWrite };
}

const BIG = requestPayloadBytesMax + 3 * MiB + 5; // not a multiple of the piece

describe('Transmission: streamed requests', () => {
  it('simple READ above the maximum: one header, the data, and no other reply in between', async () => {
    const t = setup();
    for (let i = 0; i < BIG; i += 4096) t.exp.data[i] = (i / 4096) & 255;
    t.tx.handle(t.header(C.CMD_READ, { cookieLo: 1, offset: 7, length: BIG }), []);
    // Small requests completing while the big reply is on the wire.
    for (let k = 0; k < 5; k++) t.tx.handle(t.header(C.CMD_READ, { cookieLo: 10 + k, offset: 4096 * k, length: 4096 }), []);
    await t.until(() => t.tx.inflight === 0);
    const wire = Buffer.concat(t.sent);
    expect(wire.readUInt32BE(0)).toBe(C.SIMPLE_REPLY_MAGIC);
    expect([wire.readUInt32BE(4), wire.readUInt32BE(12)]).toEqual([0, 1]);
    expect(wire.subarray(16, 16 + BIG).equals(t.exp.data.subarray(7, 7 + BIG))).toBe(true);
    let pos = 16 + BIG;
    const cookies: number[] = [];
    while (pos < wire.length) {
      expect(wire.readUInt32BE(pos)).toBe(C.SIMPLE_REPLY_MAGIC);
      cookies.push(wire.readUInt32BE(pos + 12));
      pos += 16 + 4096;
    }
    expect(cookies.sort()).toEqual([10, 11, 12, 13, 14]);
    expect(t.sent.length).toBeGreaterThan(2); // sent in pieces, not as one buffer
    expect(t.completed).toContain(streamPieceBytes); // it held one piece, not its length
    expect(t.completed).not.toContain(BIG);
  });

  it('structured READ above the maximum: several chunks that cover it, then NONE', async () => {
    const t = setup({ structured: true });
    t.exp.data.fill(0x5a, 0, 10 * MiB); // data, then holes
    t.tx.handle(t.header(C.CMD_READ, { cookieLo: 3, offset: 1, length: BIG }), []);
    await t.until(() => t.tx.inflight === 0);
    const wire = Buffer.concat(t.sent);
    const got = Buffer.alloc(BIG, 0xee);
    let pos = 0;
    const types: number[] = [];
    while (pos < wire.length) {
      const type = wire.readUInt16BE(pos + 6);
      const len = wire.readUInt32BE(pos + 16);
      const p = wire.subarray(pos + 20, pos + 20 + len);
      types.push(type);
      if (type === C.REPLY_TYPE_OFFSET_DATA) p.copy(got, Number(p.readBigUInt64BE(0)) - 1, 8);
      if (type === C.REPLY_TYPE_OFFSET_HOLE) got.fill(0, Number(p.readBigUInt64BE(0)) - 1, Number(p.readBigUInt64BE(0)) - 1 + p.readUInt32BE(8));
      pos += 20 + len;
    }
    expect(got.equals(t.exp.data.subarray(1, 1 + BIG))).toBe(true);
    expect(types.at(-1)).toBe(C.REPLY_TYPE_NONE);
    expect(types.filter((x) => x === C.REPLY_TYPE_OFFSET_DATA).length).toBeGreaterThanOrEqual(3);
    expect(types).toContain(C.REPLY_TYPE_OFFSET_HOLE);
  });

  it('structured READ above the maximum with DF → EOVERFLOW (it cannot be one chunk)', () => {
    const t = setup({ structured: true });
    t.tx.handle(t.header(C.CMD_READ, { flags: C.CMDFLAG_DF, length: BIG }), []);
    expect(t.sent[0]!.readUInt16BE(6)).toBe(C.REPLY_TYPE_ERROR);
    expect(t.sent[0]!.readUInt32BE(20)).toBe(C.NBD_EOVERFLOW);
    expect(t.exp.calls).toEqual([]);
  });

  it('clients that agreed to block sizes: READ and WRITE above the maximum → EINVAL, WRITE not streamed', () => {
    const t = setup({ agreed: true, async: false });
    expect(t.tx.streamWrite(t.header(C.CMD_WRITE, { length: BIG }))).toBe(false);
    t.tx.handle(t.header(C.CMD_WRITE, { length: BIG, payloadDiscarded: true }), []);
    t.tx.handle(t.header(C.CMD_READ, { length: BIG, cookieLo: 2 }), []);
    expect(t.sent.map((b) => b.readUInt32BE(4))).toEqual([C.NBD_EINVAL, C.NBD_EINVAL]);
    expect(t.exp.calls).toEqual([]);
  });

  it('a streamed WRITE is rejected up front when invalid (read-only rules, range) so its payload is discarded', () => {
    const t = setup();
    expect(t.tx.streamWrite(t.header(C.CMD_WRITE, { offset: 60 * MiB, length: BIG }))).toBe(false);
    t.tx.handle(t.header(C.CMD_WRITE, { offset: 60 * MiB, length: BIG, payloadDiscarded: true }), []);
    expect(t.sent[0]!.readUInt32BE(4)).toBe(C.NBD_ENOSPC);
  });

  it('streamed WRITE: pieces written in order, at most two held, FUA flushes before the one reply', async () => {
    const t = setup();
    const data = Buffer.alloc(BIG);
    for (let i = 0; i < BIG; i += 512) data[i] = (i / 512) & 255;
    const h = t.header(C.CMD_WRITE, { cookieLo: 9, offset: 3, length: BIG, flags: C.CMDFLAG_FUA });
    expect(t.tx.streamWrite(h)).toBe(true);
    expect(t.tx.acceptPiece(() => true)).toBe(true);
    expect(t.tx.acceptPiece(() => true)).toBe(true);
    expect(t.tx.acceptPiece(() => true)).toBe(false); // a third piece waits
    expect(t.tx.acceptPiece(() => false)).toBe(false);
    t.tx.writePiece(h, [data.subarray(0, streamPieceBytes)], false);
    t.tx.writePiece(h, [data.subarray(streamPieceBytes, 2 * streamPieceBytes)], false);
    for (let pos = 2 * streamPieceBytes; pos < BIG; pos += streamPieceBytes) {
      await t.until(() => t.tx.acceptPiece(() => true));
      const end = Math.min(BIG, pos + streamPieceBytes);
      t.tx.writePiece(h, [data.subarray(pos, end)], end === BIG);
    }
    await t.until(() => t.tx.inflight === 0);
    expect(t.sent).toHaveLength(1);
    expect([t.sent[0]!.readUInt32BE(4), t.sent[0]!.readUInt32BE(12)]).toEqual([0, 9]);
    expect(t.exp.data.subarray(3, 3 + BIG).equals(data)).toBe(true);
    const pieces = Math.ceil(BIG / streamPieceBytes);
    expect(t.exp.calls).toEqual([...Array(pieces).fill('write'), 'flush']);
    expect(t.released.reduce((a, b) => a + b, 0)).toBe(BIG);
  });

  it('streamed WRITE: a failed piece consumes the rest without writing it, then one error reply', async () => {
    const t = setup();
    const h = t.header(C.CMD_WRITE, { cookieLo: 4, length: BIG });
    t.exp.failNext = { op: 'write', code: 'EIO' };
    await t.streamWrite(h, Buffer.alloc(BIG, 1));
    await t.until(() => t.tx.inflight === 0);
    expect(t.sent).toHaveLength(1);
    expect(t.sent[0]!.readUInt32BE(4)).toBe(C.NBD_EIO);
    expect(t.exp.calls).toEqual(['write']);
    expect(t.released.reduce((a, b) => a + b, 0)).toBe(BIG);
  });

  it('streamed WRITE cut off by the connection closing: no reply, nothing left in flight', async () => {
    const t = setup();
    const h = t.header(C.CMD_WRITE, { length: BIG });
    expect(t.tx.streamWrite(h)).toBe(true);
    expect(t.tx.acceptPiece(() => true)).toBe(true);
    t.tx.writePiece(h, [Buffer.alloc(streamPieceBytes)], false);
    t.tx.close();
    await t.until(() => t.tx.inflight === 0);
    expect(t.sent).toHaveLength(0);
    expect(t.completed).toEqual([0]);
  });

  it('simple READ that fails after its header went out closes the connection (nothing else can keep the stream in sync)', async () => {
    const t = setup();
    let reads = 0;
    const read = t.exp.read.bind(t.exp);
    t.exp.read = (o, l, b) => (++reads === 3 ? Promise.reject(Object.assign(new Error('bad sector'), { code: 'EIO' })) : read(o, l, b));
    t.tx.handle(t.header(C.CMD_READ, { length: BIG }), []);
    await t.until(() => t.tx.inflight === 0);
    expect(t.fatal).toHaveLength(1);
    expect(t.sent[0]!.readUInt32BE(4)).toBe(0);
  });

  it('simple READ that fails on its first piece gets an ordinary error reply', async () => {
    const t = setup();
    t.exp.failNext = { op: 'read', code: 'EIO' };
    t.tx.handle(t.header(C.CMD_READ, { length: BIG }), []);
    await t.until(() => t.tx.inflight === 0);
    expect(t.fatal).toHaveLength(0);
    expect(t.sent.map((b) => [b.length, b.readUInt32BE(4)])).toEqual([[16, C.NBD_EIO]]);
  });
});
