// Why: set building reads a delta set's scattered blocks with one native call
// (fsx.preadRanges); it must place each range one after the other, read past the end of
// the file as zeroes, and refuse ranges that do not fit the target instead of writing
// past it. A replica plays such a set with its mirror (fsx.pwriteRanges): each range's
// bytes come from the source one after the other, and nothing is read past the source.
import { describe, expect, it } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadFsx } from '../../src/storage/native.js';

describe('fsx.preadRanges', () => {
  it('reads ranges back to back, zeroes past the end, refuses what does not fit', () => {
    const fsx = loadFsx();
    expect(fsx?.preadRanges, 'the addon (npm run build) has preadRanges').toBeTypeOf('function');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fsx-ranges-'));
    try {
      const file = path.join(dir, 'f');
      const content = Buffer.from(Array.from({ length: 10_000 }, (_, i) => (i * 7 + 3) & 255));
      fs.writeFileSync(file, content);
      const fd = fs.openSync(file, 'r');
      try {
        const target = Buffer.alloc(9000, 0xaa);
        const ranges = new Float64Array([4096, 4096, 0, 100, 9_000, 2_000, 5, 0]);
        const n = fsx!.preadRanges!(fd, target, 10, ranges, 4);
        expect(n).toBe(4096 + 100 + 2000);
        expect(target.subarray(0, 10).every((x) => x === 0xaa)).toBe(true);
        expect(target.subarray(10, 10 + 4096).equals(content.subarray(4096, 8192))).toBe(true);
        expect(target.subarray(4106, 4206).equals(content.subarray(0, 100))).toBe(true);
        expect(target.subarray(4206, 4206 + 1000).equals(content.subarray(9000, 10_000))).toBe(true);
        expect(target.subarray(5206, 6206).every((x) => x === 0)).toBe(true); // past the end
        expect(target.subarray(6206).every((x) => x === 0xaa)).toBe(true);
        // Only `count` ranges are read.
        const one = Buffer.alloc(8);
        expect(fsx!.preadRanges!(fd, one, 0, new Float64Array([0, 8, 0, 1_000_000]), 1)).toBe(8);
        expect(() => fsx!.preadRanges!(fd, target, 8_000, new Float64Array([0, 2_000]), 1)).toThrow(/does not fit/);
        expect(() => fsx!.preadRanges!(fd, target, 0, new Float64Array([0, 8]), 2)).toThrow(/Float64Array/);
      } finally {
        fs.closeSync(fd);
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('fsx.pwriteRanges', () => {
  it('reads ranges a few KiB apart with one preadv: the bytes between them land nowhere, and the end of the file still reads as zeroes', () => {
    const fsx = loadFsx()!;
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fsx-ranges-'));
    try {
      const file = path.join(dir, 'f');
      const content = Buffer.from(Array.from({ length: 200_000 }, (_, i) => (i * 13 + (i >> 8)) & 255));
      fs.writeFileSync(file, content);
      const fd = fs.openSync(file, 'r');
      try {
        // Ascending with gaps of 0, 1, 4096 and 16384 bytes (one group), then 16385 (a new
        // group), then a range that runs past the end of the file (short: read alone).
        const pairs: [number, number][] = [[100, 4096], [4196, 10], [4207, 4096], [12399, 512], [29295, 3000], [48680, 7], [199_000, 5000]];
        const ranges = new Float64Array(pairs.flat());
        const total = pairs.reduce((n, [, l]) => n + l, 0);
        const target = Buffer.alloc(total + 20, 0xaa);
        expect(fsx.preadRanges!(fd, target, 10, ranges, pairs.length)).toBe(total);
        let at = 10;
        for (const [o, l] of pairs) {
          const want = Buffer.alloc(l);
          content.copy(want, 0, o, Math.min(o + l, content.length));
          expect(target.subarray(at, at + l).equals(want), `range ${o}+${l}`).toBe(true);
          at += l;
        }
        expect(target.subarray(0, 10).every((x) => x === 0xaa) && target.subarray(at).every((x) => x === 0xaa)).toBe(true);
      } finally {
        fs.closeSync(fd);
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('writes ranges from back-to-back source bytes, grows the file past its end, refuses a source too short', () => {
    const fsx = loadFsx();
    expect(fsx?.pwriteRanges, 'the addon (npm run build) has pwriteRanges').toBeTypeOf('function');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fsx-wranges-'));
    try {
      const file = path.join(dir, 'f');
      const before = Buffer.alloc(10_000, 0x11);
      fs.writeFileSync(file, before);
      const fd = fs.openSync(file, 'r+');
      try {
        const source = Buffer.from(Array.from({ length: 7000 }, (_, i) => (i * 13 + 5) & 255));
        const ranges = new Float64Array([4096, 4096, 0, 100, 9_500, 1_000, 5, 0]);
        const n = fsx!.pwriteRanges!(fd, source, 10, ranges, 4);
        expect(n).toBe(4096 + 100 + 1000);
        const after = fs.readFileSync(file);
        const want = Buffer.alloc(10_500, 0x11);
        source.copy(want, 4096, 10, 10 + 4096);
        source.copy(want, 0, 4106, 4206);
        source.copy(want, 9_500, 4206, 5206);
        expect(after.equals(want)).toBe(true);
        // Only `count` ranges are written; a range whose bytes are not all in the source is refused before any byte.
        expect(fsx!.pwriteRanges!(fd, source, 0, new Float64Array([0, 8, 0, 1_000_000]), 1)).toBe(8);
        expect(() => fsx!.pwriteRanges!(fd, source, 6_000, new Float64Array([100, 8, 0, 2_000]), 2)).toThrow(/pwriteRanges: a range is negative or does not fit/);
        expect(() => fsx!.pwriteRanges!(fd, source, 0, new Float64Array([0, 8]), 2)).toThrow(/Float64Array/);
        expect(fs.readFileSync(file).subarray(8).equals(want.subarray(8))).toBe(true);
      } finally {
        fs.closeSync(fd);
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
