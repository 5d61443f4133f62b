// Why: request validation decides what reaches storage. Each case here is a request a
// client may send and the exact reply the spec asks for, with sync and async exports,
// simple and structured replies.
import { describe, expect, it } from 'vitest';
import { Transmission } from '../../src/nbd/transmission.js';
import type { Negotiated } from '../../src/nbd/negotiator.js';
import type { RequestHeader } from '../../src/nbd/request-framer.js';
import * as C from '../../src/nbd/constants.js';
import { MemoryExport } from '../helpers/memory-export.js';
import type { ZeroBlockScan } from '../../src/util/zero-block-scan.js';

interface Chunk {
  type: number;
  flags: number;
  cookie: number;
  payload: Buffer;
}

function parseStructured(buf: Buffer): Chunk[] {
  const out: Chunk[] = [];
  let pos = 0;
  while (pos < buf.length) {
    expect(buf.readUInt32BE(pos)).toBe(C.STRUCTURED_REPLY_MAGIC);
    const len = buf.readUInt32BE(pos + 16);
    out.push({ flags: buf.readUInt16BE(pos + 4), type: buf.readUInt16BE(pos + 6), cookie: buf.readUInt32BE(pos + 12), payload: buf.subarray(pos + 20, pos + 20 + len) });
    pos += 20 + len;
  }
  return out;
}

function setup(opts: { structured?: boolean; agreed?: boolean; readOnly?: boolean; async?: boolean; contexts?: string[] } = {}) {
  const exp = new MemoryExport('m', 1 << 20, {
    readOnly: opts.readOnly ?? false, flush: true, fua: true, trim: true, writeZeroes: true, fastZero: false, cache: true, multiConn: true,
  });
  exp.async = opts.async ?? false;
  const sent: Buffer[] = [];
  let completed = 0;
  const neg: Negotiated = {
    export: exp,
    structuredReplies: opts.structured ?? false,
    metaContexts: opts.contexts ?? (opts.structured ? [C.CONTEXT_BASE_ALLOCATION] : []),
    blockSizeAgreed: opts.agreed ?? true,
    transmissionFlags: 0,
    tls: false,
  };
  const tx = new Transmission(exp, neg, { send: (b) => sent.push(Buffer.concat(b)), completed: () => completed++, warn: () => undefined });
  const req = (type: number, o: Partial<RequestHeader> = {}, payload: Buffer[] = []) =>
    tx.handle({ flags: 0, type, cookieHi: 0, cookieLo: o.cookieLo ?? 1, offset: 0, length: 0, payloadDiscarded: false, ...o }, payload);
  const simpleError = (i = sent.length - 1) => {
    expect(sent[i]!.readUInt32BE(0)).toBe(C.SIMPLE_REPLY_MAGIC);
    return sent[i]!.readUInt32BE(4);
  };
  const settle = () => new Promise((r) => setTimeout(r, 5));
  return { exp, tx, sent, req, simpleError, settle, completedCount: () => completed };
}

describe('Transmission validation (simple replies)', () => {
  const cases: [string, number, Partial<RequestHeader>, number][] = [
    ['unknown command', 42, {}, C.NBD_EINVAL],
    ['unknown flag on READ', C.CMD_READ, { flags: 1 << 9, length: 512 }, C.NBD_EINVAL],
    ['NO_HOLE on WRITE', C.CMD_WRITE, { flags: C.CMDFLAG_NO_HOLE, length: 0 }, C.NBD_EINVAL],
    ['DF without structured replies', C.CMD_READ, { flags: C.CMDFLAG_DF, length: 512 }, C.NBD_EINVAL],
    ['READ past the end', C.CMD_READ, { offset: (1 << 20) - 512, length: 1024 }, C.NBD_EINVAL],
    ['READ at a huge offset', C.CMD_READ, { offset: 2 ** 63, length: 512 }, C.NBD_EINVAL],
    ['TRIM past the end', C.CMD_TRIM, { offset: 1 << 20, length: 512 }, C.NBD_EINVAL],
    ['CACHE past the end', C.CMD_CACHE, { offset: 1 << 20, length: 512 }, C.NBD_EINVAL],
    ['WRITE_ZEROES past the end', C.CMD_WRITE_ZEROES, { offset: 1 << 20, length: 512 }, C.NBD_ENOSPC],
    ['FLUSH with a length', C.CMD_FLUSH, { length: 512 }, C.NBD_EINVAL],
    ['FAST_ZERO when not advertised', C.CMD_WRITE_ZEROES, { flags: C.CMDFLAG_FAST_ZERO, length: 512 }, C.NBD_EINVAL],
    ['BLOCK_STATUS without contexts', C.CMD_BLOCK_STATUS, { length: 512 }, C.NBD_EINVAL],
    ['READ larger than the max payload', C.CMD_READ, { length: 64 * 1024 * 1024 }, C.NBD_EINVAL],
  ];
  for (const [name, type, h, errno] of cases) {
    it(`${name} → ${errno}`, () => {
      const t = setup();
      t.req(type, h);
      expect(t.simpleError()).toBe(errno);
      expect(t.exp.calls).toEqual([]);
      expect(t.tx.inflight).toBe(0);
    });
  }

  it('WRITE past the end → ENOSPC; oversize discarded WRITE → EINVAL', () => {
    const t = setup();
    t.req(C.CMD_WRITE, { offset: 1 << 20, length: 512 }, [Buffer.alloc(512)]);
    expect(t.simpleError()).toBe(C.NBD_ENOSPC);
    t.req(C.CMD_WRITE, { offset: 0, length: 64 * 1024 * 1024, payloadDiscarded: true });
    expect(t.simpleError()).toBe(C.NBD_EINVAL);
  });

  it('write-type commands on a read-only export → EPERM', () => {
    const t = setup({ readOnly: true });
    t.req(C.CMD_WRITE, { length: 512 }, [Buffer.alloc(512)]);
    t.req(C.CMD_TRIM, { length: 512 });
    t.req(C.CMD_WRITE_ZEROES, { length: 512 });
    expect([0, 1, 2].map((i) => t.simpleError(i))).toEqual([C.NBD_EPERM, C.NBD_EPERM, C.NBD_EPERM]);
    t.req(C.CMD_READ, { length: 512 });
    expect(t.simpleError()).toBe(0);
  });

  for (const agreed of [false, true]) {
    it(`unaligned requests are fine for clients that ${agreed ? 'agreed to the minimum block size of 1' : 'did not agree to a block size'}`, () => {
      const t = setup({ agreed });
      t.req(C.CMD_WRITE, { offset: 3, length: 5 }, [Buffer.from('hello')]);
      t.req(C.CMD_READ, { offset: 100, length: 7 });
      t.req(C.CMD_TRIM, { offset: 1001, length: 100 });
      expect([0, 1, 2].map((i) => t.simpleError(i))).toEqual([0, 0, 0]);
      expect(t.exp.data.subarray(3, 8).toString()).toBe('hello');
    });
  }

  it('READ reply carries the data right after the 16-byte header', () => {
    const t = setup();
    t.exp.data.write('abcdefgh', 512);
    t.req(C.CMD_READ, { offset: 512, length: 512, cookieLo: 77 });
    const r = t.sent[0]!;
    expect(r.length).toBe(16 + 512);
    expect(r.readUInt32BE(12)).toBe(77);
    expect(r.subarray(16, 24).toString()).toBe('abcdefgh');
  });

  it('storage errors map to NBD errors (ENOSPC, EIO for the unknown)', async () => {
    for (const async of [false, true]) {
      const t = setup({ async });
      t.exp.failNext = { op: 'write', code: 'EDQUOT' };
      t.req(C.CMD_WRITE, { length: 512 }, [Buffer.alloc(512)]);
      t.exp.failNext = { op: 'flush', code: 'EWHATEVER' };
      t.req(C.CMD_FLUSH, { cookieLo: 2 });
      await t.settle();
      expect([t.simpleError(0), t.simpleError(1)]).toEqual([C.NBD_ENOSPC, C.NBD_EIO]);
      expect(t.completedCount()).toBe(2);
    }
  });

  it('async completions reply out of order by cookie', async () => {
    const t = setup({ async: true });
    t.req(C.CMD_READ, { length: 512, cookieLo: 1 });
    t.req(C.CMD_FLUSH, { cookieLo: 2 });
    expect(t.tx.inflight).toBe(2);
    await t.settle();
    expect(t.sent.map((b) => b.readUInt32BE(12)).sort()).toEqual([1, 2]);
    expect(t.tx.inflight).toBe(0);
  });

  it('replies are dropped (not sent) once the connection is closed', async () => {
    const t = setup({ async: true });
    t.req(C.CMD_READ, { length: 512 });
    t.tx.closed = true;
    await t.settle();
    expect(t.sent).toHaveLength(0);
    expect(t.completedCount()).toBe(1);
  });
});

describe('Transmission with structured replies', () => {
  it('READ: one OFFSET_DATA chunk with DONE', () => {
    const t = setup({ structured: true });
    t.exp.data.fill(7, 0, 4096);
    t.req(C.CMD_READ, { length: 4096 });
    const chunks = parseStructured(t.sent[0]!);
    expect(chunks).toHaveLength(1);
    expect(chunks[0]!.type).toBe(C.REPLY_TYPE_OFFSET_DATA);
    expect(chunks[0]!.flags & C.REPLY_FLAG_DONE).toBeTruthy();
    expect(chunks[0]!.payload.length).toBe(8 + 4096);
    expect(chunks[0]!.payload[8]).toBe(7);
  });

  it('large sparse READ: holes as OFFSET_HOLE, data as OFFSET_DATA, then NONE', () => {
    const t = setup({ structured: true });
    t.exp.data.fill(1, 8192, 12288);
    t.req(C.CMD_READ, { length: 65536 });
    const chunks = parseStructured(t.sent[0]!);
    expect(chunks.map((c) => c.type)).toEqual([C.REPLY_TYPE_OFFSET_HOLE, C.REPLY_TYPE_OFFSET_DATA, C.REPLY_TYPE_OFFSET_HOLE, C.REPLY_TYPE_NONE]);
    expect(chunks[0]!.payload.readUInt32BE(8)).toBe(8192);
    expect(Number(chunks[1]!.payload.readBigUInt64BE(0))).toBe(8192);
    expect(chunks[1]!.payload.length - 8).toBe(4096);
    expect(chunks[2]!.payload.readUInt32BE(8)).toBe(65536 - 12288);
  });

  it('a READ of only zeroes is one OFFSET_HOLE chunk with DONE', () => {
    const t = setup({ structured: true });
    t.req(C.CMD_READ, { length: 65536 });
    const chunks = parseStructured(t.sent[0]!);
    expect(chunks.map((c) => c.type)).toEqual([C.REPLY_TYPE_OFFSET_HOLE]);
    expect(chunks[0]!.flags & C.REPLY_FLAG_DONE).toBeTruthy();
    expect(chunks[0]!.payload.readUInt32BE(8)).toBe(65536);
  });

  it('zero detection: a trailing partial block and a zero block with a non-zero last byte', () => {
    const t = setup({ structured: true });
    t.exp.data[8191] = 9; // block 1 is not zero although its first byte is
    t.req(C.CMD_READ, { offset: 0, length: 65536 + 512 });
    const chunks = parseStructured(t.sent[0]!);
    expect(chunks.map((c) => c.type)).toEqual([C.REPLY_TYPE_OFFSET_HOLE, C.REPLY_TYPE_OFFSET_DATA, C.REPLY_TYPE_OFFSET_HOLE, C.REPLY_TYPE_NONE]);
    expect(chunks[1]!.payload.length - 8).toBe(4096);
    expect(chunks[1]!.payload[8 + 4095]).toBe(9);
    expect(chunks[2]!.payload.readUInt32BE(8)).toBe(65536 + 512 - 8192);
  });

  it('a reader that counts zero blocks decides the reply: none → one data chunk, all → one hole, some → scanned', async () => {
    // The counts below are what a file store reports (fsx.preadScan); the layout has data
    // in block 2 of 16, so only the "some" answer and the scan see its real shape.
    const cases: [number, number[]][] = [
      [0, [C.REPLY_TYPE_OFFSET_DATA]],
      [16, [C.REPLY_TYPE_OFFSET_HOLE]],
      [15, [C.REPLY_TYPE_OFFSET_HOLE, C.REPLY_TYPE_OFFSET_DATA, C.REPLY_TYPE_OFFSET_HOLE, C.REPLY_TYPE_NONE]],
      [-1, [C.REPLY_TYPE_OFFSET_HOLE, C.REPLY_TYPE_OFFSET_DATA, C.REPLY_TYPE_OFFSET_HOLE, C.REPLY_TYPE_NONE]],
    ];
    for (const [count, types] of cases) {
      const t = setup({ structured: true, async: true });
      t.exp.data.fill(1, 8192, 12288);
      const read = t.exp.read.bind(t.exp);
      const asked: (number | undefined)[] = [];
      t.exp.read = (offset: number, length: number, target: Buffer, scan?: ZeroBlockScan) => {
        asked.push(scan?.blockBytes);
        if (scan && count >= 0) scan.zeroBlocks = count;
        return read(offset, length, target);
      };
      t.req(C.CMD_READ, { length: 65536 });
      await t.settle();
      const chunks = parseStructured(t.sent[0]!);
      expect(chunks.map((c) => c.type), `count ${count}`).toEqual(types);
      expect(chunks.at(-1)!.flags & C.REPLY_FLAG_DONE).toBeTruthy();
      if (count === 0) expect(chunks[0]!.payload.subarray(8).equals(t.exp.data.subarray(0, 65536))).toBe(true);
      expect(asked).toEqual([4096]);
    }
    // Below the sparse size and with DF nothing is asked.
    const t = setup({ structured: true });
    const asked: (number | undefined)[] = [];
    const read = t.exp.read.bind(t.exp);
    t.exp.read = (offset: number, length: number, target: Buffer, scan?: ZeroBlockScan) => {
      asked.push(scan?.blockBytes);
      return read(offset, length, target);
    };
    t.req(C.CMD_READ, { length: 4096 });
    t.req(C.CMD_READ, { length: 65536, flags: C.CMDFLAG_DF });
    expect(asked).toEqual([undefined, undefined]);
  });

  it('DF: one content chunk even when the range has holes', () => {
    const t = setup({ structured: true });
    t.exp.data.fill(1, 8192, 12288);
    t.req(C.CMD_READ, { length: 65536, flags: C.CMDFLAG_DF });
    const chunks = parseStructured(t.sent[0]!);
    expect(chunks.map((c) => c.type)).toEqual([C.REPLY_TYPE_OFFSET_DATA]);
  });

  it('READ errors are structured ERROR chunks with a message', () => {
    const t = setup({ structured: true });
    t.req(C.CMD_READ, { offset: 1 << 20, length: 512 });
    const chunks = parseStructured(t.sent[0]!);
    expect(chunks[0]!.type).toBe(C.REPLY_TYPE_ERROR);
    expect(chunks[0]!.payload.readUInt32BE(0)).toBe(C.NBD_EINVAL);
    const msgLen = chunks[0]!.payload.readUInt16BE(4);
    expect(chunks[0]!.payload.subarray(6, 6 + msgLen).toString()).toMatch(/beyond the export size/);
  });

  it('BLOCK_STATUS: extents cover the range; REQ_ONE gives exactly one within the length', () => {
    const t = setup({ structured: true });
    t.exp.data.fill(1, 4096, 8192);
    t.req(C.CMD_BLOCK_STATUS, { length: 16384 });
    let chunks = parseStructured(t.sent[0]!);
    expect(chunks.map((c) => c.type)).toEqual([C.REPLY_TYPE_BLOCK_STATUS, C.REPLY_TYPE_NONE]);
    const p = chunks[0]!.payload;
    const ext = [];
    for (let i = 4; i < p.length; i += 8) ext.push([p.readUInt32BE(i), p.readUInt32BE(i + 4)]);
    expect(ext).toEqual([[4096, 3], [4096, 0], [8192, 3]]);
    t.req(C.CMD_BLOCK_STATUS, { length: 1024, flags: C.CMDFLAG_REQ_ONE, cookieLo: 2 });
    chunks = parseStructured(t.sent[1]!);
    expect(chunks[0]!.payload.length).toBe(4 + 8);
    expect(chunks[0]!.payload.readUInt32BE(4)).toBe(1024);
  });
});

describe('READ replies sent from a file (sendfile)', () => {
  const MiB = 1024 * 1024;
  function fileSetup(structured: boolean, hostTakes: boolean) {
    const exp = new MemoryExport('m', 8 * MiB, { readOnly: false, flush: true, fua: true, trim: true, writeZeroes: true, fastZero: false, cache: true, multiConn: true });
    for (let i = 0; i < exp.data.length; i++) exp.data[i] = (i * 7 + (i >> 9)) & 0xff;
    const asked: [number, number][] = [];
    const fileRange = (offset: number, length: number) => {
      asked.push([offset, length]);
      return { fd: 99, offset: offset + 4096, length, read: (from: number, n: number) => exp.data.subarray(offset + from, offset + from + n) };
    };
    (exp as unknown as { fileRange: typeof fileRange }).fileRange = fileRange;
    const viaFile: { header: Buffer; file: { fd: number; offset: number; length: number }; sent: () => void }[] = [];
    const sent: Buffer[] = [];
    const neg: Negotiated = { export: exp, structuredReplies: structured, metaContexts: structured ? [C.CONTEXT_BASE_ALLOCATION] : [], blockSizeAgreed: true, transmissionFlags: 0, tls: false };
    const tx = new Transmission(exp, neg, {
      send: (b) => sent.push(Buffer.concat(b)),
      sendFile: (b, file, s) => {
        if (!hostTakes) return false;
        viaFile.push({ header: Buffer.concat(b), file, sent: s });
        return true;
      },
      completed: () => undefined,
      warn: () => undefined,
    }, 3 * MiB);
    const read = (cookieLo: number, offset: number, length: number) =>
      tx.handle({ flags: 0, type: C.CMD_READ, cookieHi: 0, cookieLo, offset, length, payloadDiscarded: false }, []);
    return { exp, tx, viaFile, sent, asked, read };
  }

  it('structured: one OFFSET_DATA header in memory, the data named in the file; small reads are read', () => {
    const t = fileSetup(true, true);
    t.read(1, MiB, MiB);
    t.read(2, 0, 64 * 1024);
    expect(t.viaFile).toHaveLength(1);
    const h = t.viaFile[0]!.header;
    expect(h.length).toBe(20 + 8);
    expect(h.readUInt32BE(0)).toBe(C.STRUCTURED_REPLY_MAGIC);
    expect(h.readUInt16BE(4)).toBe(C.REPLY_FLAG_DONE);
    expect(h.readUInt16BE(6)).toBe(C.REPLY_TYPE_OFFSET_DATA);
    expect(h.readUInt32BE(12)).toBe(1);
    expect(h.readUInt32BE(16)).toBe(8 + MiB);
    expect(Number(h.readBigUInt64BE(20))).toBe(MiB);
    expect(t.viaFile[0]!.file).toMatchObject({ fd: 99, offset: MiB + 4096, length: MiB });
    expect(t.sent).toHaveLength(1); // the 64 KiB read went through memory
    expect(t.asked).toEqual([[MiB, MiB]]);
  });

  it('simple: the 16-byte reply header, then the file', () => {
    const t = fileSetup(false, true);
    t.read(5, 2 * MiB, 512 * 1024);
    expect(t.viaFile).toHaveLength(1);
    const h = t.viaFile[0]!.header;
    expect(h.length).toBe(16);
    expect(h.readUInt32BE(0)).toBe(C.SIMPLE_REPLY_MAGIC);
    expect(h.readUInt32BE(4)).toBe(0);
    expect(h.readUInt32BE(12)).toBe(5);
  });

  it('counts against the read-ahead until sent, so a client that reads nothing holds at most that much', () => {
    const t = fileSetup(true, true);
    for (let i = 1; i <= 5; i++) t.read(i, (i - 1) * MiB, MiB);
    expect(t.viaFile).toHaveLength(3); // 3 MiB of read-ahead
    t.viaFile[0]!.sent();
    expect(t.viaFile).toHaveLength(4);
    t.viaFile[1]!.sent();
    t.viaFile[2]!.sent();
    expect(t.viaFile).toHaveLength(5);
  });

  it('a host that cannot send from the file gets the bytes read into a buffer instead', () => {
    const t = fileSetup(false, false);
    t.read(7, 3 * MiB, MiB);
    expect(t.viaFile).toHaveLength(0);
    expect(t.sent).toHaveLength(1);
    expect(t.sent[0]!.subarray(16).equals(t.exp.data.subarray(3 * MiB, 4 * MiB))).toBe(true);
  });
});
