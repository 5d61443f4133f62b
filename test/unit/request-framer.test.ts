// Why: the framer must turn any chunking of the same byte stream into the same
// requests, keep WRITE payloads intact, consume oversize payloads, and stop only on a
// broken frame.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { ByteQueue } from '../../src/util/byte-queue.js';
import { RequestFramer, type RequestHeader } from '../../src/nbd/request-framer.js';
import * as C from '../../src/nbd/constants.js';
import { request } from '../helpers/wire.js';
import { testSeed } from '../helpers/seed.js';

interface Got {
  h: RequestHeader;
  payload: Buffer;
}

function framer(payloadMax = 1 << 20, accepting = () => true) {
  const got: Got[] = [];
  const f = new RequestFramer(new ByteQueue(), { request: (h, p) => got.push({ h, payload: Buffer.concat(p) }), accepting }, payloadMax);
  return { f, got };
}

function stream(): { bytes: Buffer; expected: { type: number; cookie: number; offset: number; length: number; payload: Buffer }[] } {
  const parts: Buffer[] = [];
  const expected = [];
  const w = Buffer.from('hello, block device!'.repeat(10));
  parts.push(request(C.CMD_WRITE, { cookie: 7, offset: 4096, length: w.length }), w);
  expected.push({ type: C.CMD_WRITE, cookie: 7, offset: 4096, length: w.length, payload: w });
  parts.push(request(C.CMD_READ, { cookie: 8, offset: 2 ** 40, length: 512 }));
  expected.push({ type: C.CMD_READ, cookie: 8, offset: 2 ** 40, length: 512, payload: Buffer.alloc(0) });
  parts.push(request(C.CMD_FLUSH, { cookie: 9 }));
  expected.push({ type: C.CMD_FLUSH, cookie: 9, offset: 0, length: 0, payload: Buffer.alloc(0) });
  const w2 = Buffer.alloc(3000, 0x5a);
  parts.push(request(C.CMD_WRITE, { cookie: 10, offset: 0, length: w2.length, flags: C.CMDFLAG_FUA }), w2);
  expected.push({ type: C.CMD_WRITE, cookie: 10, offset: 0, length: w2.length, payload: w2 });
  return { bytes: Buffer.concat(parts), expected };
}

function check(got: Got[], expected: ReturnType<typeof stream>['expected']) {
  // Payloads compared as base64 strings: deep equality on Buffers is slow byte by byte.
  const norm = (x: { type: number; cookie: number; offset: number; length: number; payload: Buffer }) =>
    `${x.type}/${x.cookie}/${x.offset}/${x.length}/${x.payload.toString('base64')}`;
  expect(got.map((g) => norm({ type: g.h.type, cookie: g.h.cookieLo, offset: g.h.offset, length: g.h.length, payload: g.payload }))).toEqual(
    expected.map(norm),
  );
}

describe('RequestFramer', () => {
  it('parses the same requests when the stream is split at every byte boundary', () => {
    const { bytes, expected } = stream();
    for (let cut = 0; cut <= bytes.length; cut++) {
      const { f, got } = framer();
      expect(f.push(bytes.subarray(0, cut))).toBeNull();
      expect(f.push(bytes.subarray(cut))).toBeNull();
      check(got, expected);
    }
  });

  it('parses the same requests one byte at a time', () => {
    const { bytes, expected } = stream();
    const { f, got } = framer();
    for (let i = 0; i < bytes.length; i++) expect(f.push(bytes.subarray(i, i + 1))).toBeNull();
    check(got, expected);
  });

  it('parses the same requests under random chunkings (property)', () => {
    const { bytes, expected } = stream();
    const seed = testSeed('framer chunking');
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 1, max: 200 }), { minLength: 1, maxLength: 50 }), (sizes) => {
        const { f, got } = framer();
        let pos = 0;
        let i = 0;
        while (pos < bytes.length) {
          const n = sizes[i++ % sizes.length]!;
          f.push(bytes.subarray(pos, pos + n));
          pos += n;
        }
        check(got, expected);
      }),
      { seed, numRuns: 300 },
    );
  });

  it('assembles large WRITEs in buffers the host gives, reading into fillRegion, under random chunkings (property)', () => {
    // Writes around the 1000-byte cut-off, mixed with other commands; a host that reads
    // into fillRegion() when it offers one and pushes random chunks otherwise.
    const parts: Buffer[] = [];
    const expected: { type: number; cookie: number; offset: number; length: number; payload: Buffer }[] = [];
    let cookie = 0;
    for (const length of [999, 1000, 1001, 5000, 20, 70_000, 1000]) {
      const payload = Buffer.alloc(length);
      for (let i = 0; i < length; i++) payload[i] = (i * 7 + length) & 0xff;
      cookie++;
      parts.push(request(C.CMD_WRITE, { cookie, offset: cookie * 4096, length }), payload);
      expected.push({ type: C.CMD_WRITE, cookie, offset: cookie * 4096, length, payload });
      cookie++;
      parts.push(request(C.CMD_READ, { cookie, offset: 0, length: 512 }));
      expected.push({ type: C.CMD_READ, cookie, offset: 0, length: 512, payload: Buffer.alloc(0) });
    }
    const bytes = Buffer.concat(parts);
    const seed = testSeed('framer payload buffers');
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 1, max: 9000 }), { minLength: 1, maxLength: 50 }), (sizes) => {
        const given = new Set<Buffer>();
        const released: Buffer[] = [];
        const got: { h: RequestHeader; payload: Buffer; own: boolean }[] = [];
        const f = new RequestFramer(
          new ByteQueue(),
          {
            request: (h, p) => {
              got.push({ h, payload: Buffer.concat(p), own: p.length === 1 && given.has(p[0]!) });
              h.releasePayload?.();
            },
            accepting: () => true,
            payloadBuffer: (length) => {
              if (length < 1000) return null;
              const b = Buffer.alloc(length, 0xee);
              given.add(b);
              return b;
            },
            payloadRelease: (b) => () => released.push(b),
          },
          1 << 20,
        );
        let pos = 0;
        let i = 0;
        let direct = 0;
        while (pos < bytes.length) {
          const n = Math.min(sizes[i++ % sizes.length]!, bytes.length - pos);
          const region = f.fillRegion();
          if (region) {
            const k = Math.min(n, region.length);
            bytes.copy(region, 0, pos, pos + k);
            direct += k;
            expect(f.filled(k)).toBeNull();
            pos += k;
          } else {
            expect(f.push(bytes.subarray(pos, pos + n))).toBeNull();
            pos += n;
          }
        }
        check(got, expected);
        // Every WRITE of 1000 bytes or more came in its own buffer, and was given back.
        for (const g of got) expect(g.own).toBe(g.h.type === C.CMD_WRITE && g.h.length >= 1000);
        expect(released.length).toBe(given.size);
        expect(f.holdsInput).toBe(false);
        // Most of the large payloads' bytes went straight into their buffers, not through the queue.
        if (sizes.every((x) => x < 1000)) expect(direct).toBeGreaterThan(70_000 / 2);
      }),
      { seed, numRuns: 200 },
    );
  });

  it('hands large WRITE payloads to a host that receives them outside, some moved to a buffer midway, under random chunkings (property)', () => {
    // The host takes WRITEs of 1000 bytes or more outside the framer (as the connection does
    // with a pipe): the queued bytes through outsideBytes, the rest straight from the stream
    // while outsideLeft > 0. Some payloads go on in a buffer midway (a full pipe).
    const parts: Buffer[] = [];
    const expected: { type: number; cookie: number; offset: number; length: number; payload: Buffer }[] = [];
    let cookie = 0;
    for (const length of [999, 1000, 1001, 5000, 20, 70_000, 1000, 3]) {
      const payload = Buffer.alloc(length);
      for (let i = 0; i < length; i++) payload[i] = (i * 13 + length) & 0xff;
      cookie++;
      parts.push(request(C.CMD_WRITE, { cookie, offset: cookie * 4096, length }), payload);
      expected.push({ type: C.CMD_WRITE, cookie, offset: cookie * 4096, length, payload });
      cookie++;
      parts.push(request(C.CMD_FLUSH, { cookie }));
      expected.push({ type: C.CMD_FLUSH, cookie, offset: 0, length: 0, payload: Buffer.alloc(0) });
    }
    const bytes = Buffer.concat(parts);
    const seed = testSeed('framer outside payloads');
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 1, max: 9000 }), { minLength: 1, maxLength: 50 }), fc.array(fc.boolean(), { minLength: 1, maxLength: 7 }), (sizes, toBuffer) => {
        let outside: Buffer[] = [];
        let outsideCount = 0;
        const got: Got[] = [];
        let f: RequestFramer | null = null;
        f = new RequestFramer(
          new ByteQueue(),
          {
            request: (h, p) => {
              if (h.payloadOutside) {
                expect(p).toEqual([]);
                got.push({ h, payload: Buffer.concat(outside) });
                outside = [];
              } else {
                got.push({ h, payload: Buffer.concat(p) });
              }
            },
            accepting: () => true,
            payloadOutside: (h) => h.length >= 1000,
            outsideBytes: (views) => {
              for (const v of views) outside.push(Buffer.from(v));
            },
          },
          1 << 20,
        );
        let pos = 0;
        let i = 0;
        while (pos < bytes.length) {
          const n = Math.min(sizes[i++ % sizes.length]!, bytes.length - pos);
          const left = f.outsideLeft;
          if (left > 0 && !toBuffer[outsideCount++ % toBuffer.length]) {
            const k = Math.min(n, left);
            outside.push(Buffer.from(bytes.subarray(pos, pos + k)));
            expect(f.outsideReceived(k)).toBeNull();
            pos += k;
            continue;
          }
          if (left > 0) {
            // Move what arrived so far to a buffer of the payload's length; the rest is read as usual.
            const have = Buffer.concat(outside);
            const target = Buffer.alloc(have.length + left, 0xee);
            have.copy(target);
            outside = [];
            f.outsideToFill(target, null);
          }
          const region = f.fillRegion();
          if (region) {
            const k = Math.min(n, region.length);
            bytes.copy(region, 0, pos, pos + k);
            expect(f.filled(k)).toBeNull();
            pos += k;
          } else {
            expect(f.push(bytes.subarray(pos, pos + n))).toBeNull();
            pos += n;
          }
        }
        expect(f.outsideLeft).toBe(0);
        expect(f.awaitingPayload).toBe(false);
        check(got, expected);
      }),
      { seed, numRuns: 300 },
    );
  });

  it('consumes an oversize WRITE payload without buffering it and stays in sync', () => {
    const { f, got } = framer(1024);
    const big = 1024 * 1024;
    f.push(request(C.CMD_WRITE, { cookie: 1, length: big }));
    for (let i = 0; i < big / 4096; i++) expect(f.push(Buffer.alloc(4096, 1))).toBeNull();
    expect(f.queue.length).toBe(0);
    f.push(request(C.CMD_READ, { cookie: 2, length: 512 }));
    expect(got.map((g) => [g.h.cookieLo, g.h.payloadDiscarded, g.payload.length])).toEqual([
      [1, true, 0],
      [2, false, 0],
    ]);
  });

  it('reports a bad magic as a broken frame', () => {
    const { f } = framer();
    const r = request(C.CMD_READ);
    r.writeUInt32BE(0xdeadbeef, 0);
    expect(f.push(r)).toEqual({ kind: 'bad-magic', magic: 0xdeadbeef });
  });

  it('never throws on random bytes (property)', () => {
    const seed = testSeed('framer random bytes');
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 400 }), fc.boolean(), (bytes, validMagic) => {
        const b = Buffer.from(bytes);
        if (validMagic && b.length >= 4) b.writeUInt32BE(C.REQUEST_MAGIC, 0);
        const { f } = framer(4096);
        const r = f.push(b);
        expect(r === null || r.kind === 'bad-magic').toBe(true);
      }),
      { seed, numRuns: 500 },
    );
  });

  it('stops parsing while the sink is not accepting and resumes after', () => {
    let open = false;
    const { f, got } = framer(1 << 20, () => open);
    f.push(Buffer.concat([request(C.CMD_READ, { cookie: 1, length: 512 }), request(C.CMD_READ, { cookie: 2, length: 512 })]));
    expect(got).toHaveLength(0);
    open = true;
    f.parse();
    expect(got.map((g) => g.h.cookieLo)).toEqual([1, 2]);
  });
});
