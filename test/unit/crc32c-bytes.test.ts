// Why: save-area records written by the native crc32c must still validate when their
// headers are checked in JS (and the other way round): the two must agree on every input.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { crc32c } from '@node-rs/crc32';
import { crc32cBytes } from '../../src/util/crc32c-bytes.js';
import { testSeed } from '../helpers/seed.js';

describe('crc32cBytes', () => {
  it('equals the native crc32c on any bytes, at any offset, chained or not', () => {
    const seed = testSeed('crc32c-bytes');
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.nat(40), fc.nat(40), fc.integer({ min: 0, max: 2 ** 32 - 1 }), (data, cut, pad, prev) => {
        const buf = Buffer.concat([Buffer.alloc(pad, 0xa5), Buffer.from(data)]);
        expect(crc32cBytes(buf, pad, data.length)).toBe(crc32c(Buffer.from(data)));
        expect(crc32cBytes(buf, pad, data.length, prev)).toBe(crc32c(Buffer.from(data), prev));
        const at = Math.min(cut, data.length);
        const head = crc32cBytes(buf, pad, at);
        expect(crc32c(Buffer.from(data.subarray(at)), head)).toBe(crc32c(Buffer.from(data)));
      }),
      { seed, numRuns: 500 },
    );
  });

  it('matches the CRC-32C check value', () => {
    expect(crc32cBytes(Buffer.from('123456789'), 0, 9)).toBe(0xe3069283);
  });
});
