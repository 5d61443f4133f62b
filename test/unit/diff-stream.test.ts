// Why: a differential is applied to another volume only if it arrives whole and intact;
// the decoder must accept any chunking of a good stream and refuse every damaged one.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { DiffDecoder, DiffEncoder, type DiffRun } from '../../src/snapshot/diff-stream.js';
import { testSeed } from '../helpers/seed.js';

const HEADER = { volume: 'v', from: 'L', to: 'M', blockBytes: 4096, sizeBytes: 1 << 20, createdAt: '2026-01-01T00:00:00Z' };

function encode(runs: DiffRun[]): Buffer {
  const e = new DiffEncoder();
  const parts = [e.header(HEADER)];
  for (const r of runs) parts.push(...e.run(r));
  parts.push(e.trailer());
  return Buffer.concat(parts);
}

function decode(bytes: Buffer, chunk = bytes.length): DiffRun[] {
  const out: DiffRun[] = [];
  const d = new DiffDecoder((r) => out.push(r));
  for (let i = 0; i < bytes.length; i += chunk) d.push(bytes.subarray(i, i + chunk));
  d.end();
  return out;
}

const RUNS: DiffRun[] = [
  { offsetBytes: 0, lengthBytes: 8192, data: Buffer.alloc(8192, 7) },
  { offsetBytes: 65536, lengthBytes: 40960, data: null },
  { offsetBytes: 1048576 - 4096, lengthBytes: 4096, data: Buffer.alloc(4096, 9) },
];

describe('differential stream', () => {
  it('round-trips runs under any chunking (property)', () => {
    const bytes = encode(RUNS);
    const seed = testSeed('diff chunking');
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 5000 }), (chunk) => {
        const got = decode(bytes, chunk);
        expect(got.map((r) => [r.offsetBytes, r.lengthBytes, r.data?.toString('hex') ?? null])).toEqual(
          RUNS.map((r) => [r.offsetBytes, r.lengthBytes, r.data?.toString('hex') ?? null]),
        );
      }),
      { seed, numRuns: 200 },
    );
  });

  it('refuses a stream with any single bit flipped (property)', () => {
    const bytes = encode(RUNS);
    const seed = testSeed('diff bit flips');
    fc.assert(
      fc.property(fc.integer({ min: 0, max: bytes.length * 8 - 1 }), (bit) => {
        const bad = Buffer.from(bytes);
        bad[bit >> 3] ^= 1 << (bit & 7);
        expect(() => decode(bad)).toThrow(/differential stream/);
      }),
      { seed, numRuns: 400 },
    );
  });

  it('refuses a truncated stream and bytes after the trailer', () => {
    const bytes = encode(RUNS);
    for (const cut of [0, 5, 12, 40, bytes.length - 1]) expect(() => decode(bytes.subarray(0, cut))).toThrow(/truncated|differential/);
    expect(() => decode(Buffer.concat([bytes, Buffer.from([0])]))).toThrow(/after the trailer/);
  });

  it('refuses overlapping or out-of-bounds records', () => {
    expect(() => decode(encode([RUNS[1]!, RUNS[0]!]))).toThrow(/bad record/);
    expect(() => decode(encode([{ offsetBytes: 1 << 20, lengthBytes: 4096, data: null }]))).toThrow(/bad record/);
  });
});
