// Why: the record arena replaces a Map of Buffers in every bitmap file; compaction writes
// what it holds, so it must hold exactly the latest bytes of every key through any mix of
// sets, replacements, deletes, repacks and growth (checked against a Map of copies).

import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { RecordArena } from '../../../src/bitmap/record-arena.js';
import { testSeed } from '../../helpers/seed.js';

const op = fc.oneof(
  fc.record({ kind: fc.constant('set' as const), key: fc.integer({ min: 0, max: 300 }), first: fc.integer({ min: 0, max: 255 }), bytes: fc.oneof(fc.uint8Array({ maxLength: 40 }), fc.uint8Array({ minLength: 4000, maxLength: 4096 })) }),
  fc.record({ kind: fc.constant('delete' as const), key: fc.integer({ min: 0, max: 300 }) }),
);

describe('RecordArena', () => {
  it('holds the latest bytes of every key, as a Map of copies would', () => {
    fc.assert(
      fc.property(fc.array(op, { maxLength: 600 }), (ops) => {
        const arena = new RecordArena(150);
        let keysTotal = 150;
        const model = new Map<number, Buffer>();
        for (const o of ops) {
          if (o.key >= keysTotal) {
            keysTotal = 301;
            arena.grow(keysTotal); // a volume that grew: more pages
          }
          if (o.kind === 'set') {
            const src = Buffer.concat([Buffer.from([7, 7]), Buffer.from(o.bytes), Buffer.from([9])]);
            arena.set(o.key, o.first, src, 2, 2 + o.bytes.length);
            model.set(o.key, Buffer.concat([Buffer.from([o.first]), Buffer.from(o.bytes)]));
          } else {
            arena.delete(o.key);
            model.delete(o.key);
          }
          expect(arena.size).toBe(model.size);
        }
        for (const [k, v] of model) expect(arena.get(k)?.equals(v)).toBe(true);
        const seen: number[] = [];
        arena.forEach((k, bytes, from, to) => {
          seen.push(k);
          expect(bytes.subarray(from, to).equals(model.get(k)!)).toBe(true);
        });
        expect(seen.sort((a, b) => a - b)).toEqual([...model.keys()].sort((a, b) => a - b));
        // Dead bytes never outweigh live ones by much: the arena stays near 2× what it holds.
        let live = 0;
        for (const v of model.values()) live += v.length;
        expect(arena.bytesHeld).toBeLessThanOrEqual(Math.max(64 * 1024, 4 * (live + 4097)) + 10 * 4096);
      }),
      { seed: testSeed('record-arena model'), numRuns: 200 },
    );
  });
});
