// Why: chunk checksums are computed by the primary and checked by the replica, possibly
// one side with the native three-stream crc32c (fsx.c) and the other with @node-rs/crc32
// (no addon, an older node): the two must agree on every input, split into parts anywhere,
// at every length around the three-stream block sizes (256 and 8192 bytes × 3).
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import crypto from 'node:crypto';
import { crc32c } from '@node-rs/crc32';
import { crc32cNative, crc32cParts } from '../../src/util/crc32c-parts.js';
import { testSeed } from '../helpers/seed.js';

describe('crc32cParts', () => {
  it('uses the native three-stream crc on x86-64 (the addon is built with it)', () => {
    if (process.arch === 'x64') expect(crc32cNative).toBe(true);
  });

  it('equals @node-rs/crc32 on any bytes split anywhere, chained or not', () => {
    const seed = testSeed('crc32c-parts');
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 3000 }), fc.array(fc.nat(3000), { maxLength: 4 }), fc.integer({ min: 0, max: 2 ** 32 - 1 }), fc.nat(7), (data, cuts, prev, pad) => {
        // Unaligned views too (the socket's buffers start anywhere).
        const buf = Buffer.concat([Buffer.alloc(pad), Buffer.from(data)]).subarray(pad);
        const at = [...new Set(cuts.map((c) => Math.min(c, buf.length)))].sort((a, b) => a - b);
        const parts: Buffer[] = [];
        let from = 0;
        for (const c of [...at, buf.length]) {
          parts.push(buf.subarray(from, c));
          from = c;
        }
        expect(crc32cParts(parts)).toBe(crc32c(buf) >>> 0);
        expect(crc32cParts(parts, prev)).toBe(crc32c(buf, prev) >>> 0);
        expect(crc32cParts(buf, prev)).toBe(crc32c(buf, prev) >>> 0);
      }),
      { seed, numRuns: 300 },
    );
  });

  it('equals @node-rs/crc32 at lengths around the stream block sizes, and on a 1 MiB chunk', () => {
    const big = crypto.randomBytes(1024 * 1024 + 13);
    for (const n of [0, 1, 7, 8, 9, 767, 768, 769, 24575, 24576, 24577, 3 * 8192 * 2 + 5, big.length]) {
      for (const off of [0, 3]) {
        const b = big.subarray(off, off + n);
        expect(crc32cParts([b])).toBe(crc32c(b) >>> 0);
      }
    }
    expect(crc32cParts([Buffer.from('1234'), Buffer.from('56789')])).toBe(0xe3069283);
  });
});
