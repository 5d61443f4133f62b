// Why: a replica's playback writes small runs in batches whose bytes must lie back to back
// in the chunk's buffer (playback-plan.ts). The simulator found runs out of block order with
// the volume's short last block in the middle of a chunk (seed 3740383): the runs after it
// were written from the wrong bytes. Here every plan, for runs in any order, any sizes, the
// short last block anywhere and small limits, must write exactly what writing each run alone
// from its place in the buffer writes.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { planPlayback, type PlaybackStep } from '../../src/replication/playback-plan.js';
import type { Runs } from '../../src/replication/wire.js';
import { testSeed } from '../helpers/seed.js';

const BS = 512;

/** The volume after playing `runs` from `data` with the plan (and the number of batched runs). */
function play(runs: Runs, size: number, data: Buffer, limits: { runBytesMax: number; runsMax: number }): { vol: Buffer; steps: PlaybackStep[]; batchedRuns: number } {
  const vol = Buffer.alloc(size, 0xee);
  const ranges = new Float64Array(2 * limits.runsMax);
  const steps: PlaybackStep[] = [];
  let batchedRuns = 0;
  planPlayback(runs, BS, size, ranges, limits, (s) => {
    steps.push(s);
    if (s.batch) {
      let at = s.sourceOffset;
      for (let i = 0; i < s.count; i++) {
        const off = ranges[2 * i]!;
        const len = ranges[2 * i + 1]!;
        data.copy(vol, off, at, at + len);
        at += len;
      }
      batchedRuns += s.count;
    } else {
      data.copy(vol, s.offset, s.sourceOffset, s.sourceOffset + s.length);
    }
  });
  return { vol, steps, batchedRuns };
}

/** Each run alone from its place in the buffer: what playback must amount to. */
function expected(runs: Runs, size: number, data: Buffer): Buffer {
  const vol = Buffer.alloc(size, 0xee);
  let at = 0;
  for (const [b, n] of runs) {
    const len = Math.min(n * BS, size - b * BS);
    data.copy(vol, b * BS, at, at + len);
    at += n * BS;
  }
  return vol;
}

const pattern = (n: number) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 31 + (i >> 9) * 7 + 1) & 255));

describe('playback plan', () => {
  it('the short last block in the middle of a chunk ends its batch (simulator seed 3740383)', () => {
    // 21 blocks of 4 KiB for an 84992-byte volume: block 20 holds 3072 bytes. Runs as the
    // simulator's cascade sent them: blocks 5..20, then 0..4.
    const size = 84992;
    const runs: Runs = [[5, 16], [0, 5]];
    const data = pattern(21 * 4096);
    const ranges = new Float64Array(2 * 8);
    const steps: PlaybackStep[] = [];
    planPlayback(runs, 4096, size, ranges, { runBytesMax: 64 * 1024, runsMax: 8 }, (s) => steps.push(s));
    expect(steps).toEqual([
      { batch: false, offset: 5 * 4096, length: size - 5 * 4096, sourceOffset: 0 },
      { batch: true, count: 1, sourceOffset: 16 * 4096 },
    ]);
  });

  it('writes what each run alone would, for runs in any order and any limits', () => {
    const seed = testSeed('playback plan');
    const blocks = 40;
    const arb = fc.record({
      tail: fc.integer({ min: 1, max: BS }),
      runs: fc.uniqueArray(fc.tuple(fc.nat(blocks - 1), fc.integer({ min: 1, max: 6 })), { minLength: 1, maxLength: 12, selector: ([b]) => b }),
      runBytesMax: fc.integer({ min: BS, max: 8 * BS }),
      runsMax: fc.integer({ min: 1, max: 5 }),
    });
    let sawBatch = false;
    fc.assert(
      fc.property(arb, ({ tail, runs: raw, runBytesMax, runsMax }) => {
        const size = (blocks - 1) * BS + tail;
        // Distinct blocks, runs cut at the next run's start and at the volume's end, in drawn order.
        const starts = raw.map(([b]) => b).sort((x, y) => x - y);
        const runs: Runs = raw.map(([b, n]) => {
          const next = starts.find((s) => s > b) ?? blocks;
          return [b, Math.min(n, next - b)];
        });
        const bufferBytes = runs.reduce((s, [, n]) => s + n * BS, 0);
        const data = pattern(bufferBytes);
        const got = play(runs, size, data, { runBytesMax, runsMax });
        if (got.batchedRuns > 0) sawBatch = true;
        expect(got.vol.equals(expected(runs, size, data))).toBe(true);
        for (const s of got.steps) if (s.batch) expect(s.count).toBeLessThanOrEqual(runsMax);
      }),
      { seed, numRuns: 500 },
    );
    expect(sawBatch).toBe(true);
  });
});
