// Why: small READ replies are slices of reused slabs (slice-arena.ts); a slab reused while a
// slice of it is still queued on a socket would send another request's bytes. This checks,
// under random interleavings of takes and out-of-order releases, that no two live slices
// share a byte, and that memory is in fact reused.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { SliceArena, type Slab } from '../../src/util/slice-arena.js';
import { testSeed } from '../helpers/seed.js';

describe('SliceArena', () => {
  it('live slices never overlap, whatever the order of releases (property); slabs are reused', () => {
    const seed = testSeed('slice arena: live slices never overlap');
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.boolean(), fc.integer({ min: 1, max: 4096 }), fc.nat()), { minLength: 1, maxLength: 400 }), (ops) => {
        const arena = new SliceArena(16 * 1024, 2);
        const live: { slice: Buffer; slab: Slab; tag: number }[] = [];
        let tag = 0;
        for (const [take, n, pick] of ops) {
          if (take || live.length === 0) {
            const slice = arena.take(n);
            expect(slice.length).toBe(n);
            // No live slice shares a byte with the new one.
            for (const l of live) {
              if (l.slice.buffer !== slice.buffer) continue;
              const a0 = l.slice.byteOffset, a1 = a0 + l.slice.length, b0 = slice.byteOffset, b1 = b0 + n;
              expect(a1 <= b0 || b1 <= a0).toBe(true);
            }
            slice.fill(++tag & 0xff);
            live.push({ slice, slab: arena.lastSlab, tag });
          } else {
            const [l] = live.splice(pick % live.length, 1);
            // Its bytes were not overwritten by a later slice while it was live.
            expect(l!.slice.every((b) => b === (l!.tag & 0xff))).toBe(true);
            l!.slab.release();
          }
        }
        for (const l of live) expect(l.slice.every((b) => b === (l.tag & 0xff))).toBe(true);
      }),
      { seed, numRuns: 300 },
    );
  });

  it('a steady stream of written replies runs on one slab; a slice released twice is a bug', () => {
    const arena = new SliceArena(256 * 1024, 8);
    for (let i = 0; i < 100_000; i++) {
      arena.take(4124);
      arena.lastSlab.release();
    }
    expect(arena.slabsMade).toBe(1);
    // Replies held while more are taken: a few slabs, then reused.
    const held: Slab[] = [];
    for (let i = 0; i < 10_000; i++) {
      arena.take(4124);
      held.push(arena.lastSlab);
      if (held.length > 200) held.shift()!.release();
    }
    expect(arena.slabsMade).toBeLessThanOrEqual(6);
    const s = arena.lastSlab;
    arena.take(100);
    s.release();
    expect(() => {
      for (let i = 0; i < 1000; i++) s.release();
    }).toThrow(/released twice/);
  });
});
