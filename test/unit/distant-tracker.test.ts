// Why: after losing a cascade's middle B, primary A ships to C only the blocks that
// distant.ts says C may lack. If that list misses one block, C ends up different from A
// forever with no error; so the tracker is checked here against a model over random runs
// of cuts, reports of C's position (which only move forward, and lag), restarts of A (the
// tracker reopened from its files), and B dropping C: whenever it claims a differential,
// its blocks cover every block of every set after the one C holds.

import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { DistantTracker } from '../../src/replication/distant.js';
import { PagedBitmap } from '../../src/bitmap/paged-bitmap.js';
import { RoleRecord, type PairRecord } from '../../src/recovery/role-record.js';
import { silentLogger } from '../../src/util/log.js';
import { SimFs } from '../helpers/sim-fs.js';
import { testSeed } from '../helpers/seed.js';

const BLOCKS = 256;
const VIA = 'aaaaaaaaaaaa';
const C = 'cccccccccccc';

type Step = { t: 'cut'; blocks: number[] } | { t: 'report'; ahead: number } | { t: 'restart' } | { t: 'drop' };

const step: fc.Arbitrary<Step> = fc.oneof(
  { weight: 5, arbitrary: fc.record({ t: fc.constant('cut' as const), blocks: fc.array(fc.nat(BLOCKS - 1), { maxLength: 12 }) }) },
  { weight: 3, arbitrary: fc.record({ t: fc.constant('report' as const), ahead: fc.nat(6) }) },
  { weight: 1, arbitrary: fc.constant({ t: 'restart' as const }) },
  { weight: 1, arbitrary: fc.constant({ t: 'drop' as const }) },
);

function primaryRecord(fsys: SimFs): RoleRecord {
  const r = RoleRecord.open(fsys, silentLogger(), () => 0);
  if (r.state.pairs.length === 0) {
    const pair = { id: VIA, createdAt: '', peerHost: 'b', peerPort: 1, remoteVolume: 'v', cutIntervalMs: 1, highWaterBytes: 1, retriesBeforeSuspend: 1, ackedSet: 0, playedSet: 0, initialCopy: { done: true, offsetBytes: 0, totalBytes: 0, baseSet: 0 }, operatorSuspended: false, detached: false, catchUp: null } as unknown as PairRecord;
    r.transition({ t: 'pair-added', pair });
  }
  return r;
}

describe('distant tracker (cascade: what a replica of a replica may lack)', () => {
  it('claims a differential only when its blocks cover every set after the one the replica holds', () => {
    const seed = testSeed('distant-tracker');
    fc.assert(
      fc.property(fc.array(step, { minLength: 1, maxLength: 80 }), (steps) => {
        const fsys = new SimFs();
        let role = primaryRecord(fsys);
        let t = new DistantTracker(fsys, role, BLOCKS, silentLogger(), () => 0);
        const sets: number[][] = [[]]; // sets[n]: blocks of A's set n (set 0: none)
        let held = 0; // the set C really holds (reports lag behind it)
        let reported = 0;
        let dropped = false;
        for (const s of steps) {
          if (s.t === 'cut') {
            sets.push(s.blocks);
            const m = new PagedBitmap(BLOCKS);
            for (const b of s.blocks) m.set(b);
            t.onSetCut(m);
          } else if (s.t === 'report') {
            // C moves on (never past the last set), B reports where it was a little before.
            const last = sets.length - 1;
            held = Math.min(last, held + s.ahead);
            reported = Math.max(reported, Math.max(0, held - (s.ahead % 2)));
            if (!dropped) t.onReport(VIA, [{ depth: 1, volume: 'v', peer: 'c:1', role: 'replica', state: 'duplex', generation: 1, playedSet: null, lagSeconds: null, pairId: C, upstreamSet: reported }], last);
          } else if (s.t === 'restart') {
            role = primaryRecord(fsys);
            t = new DistantTracker(fsys, role, BLOCKS, silentLogger(), () => 0);
          } else if (!dropped) {
            dropped = true;
            t.onReport(VIA, [], sets.length - 1);
          }
          const r = t.blocksFor(C);
          if (dropped) {
            expect(r.record).toBeNull();
            continue;
          }
          if (r.blocks === null) continue;
          // Every block of every set after the confirmed one is listed.
          for (let n = r.record.confirmedSet + 1; n < sets.length; n++) for (const b of sets[n]!) expect(r.blocks.test(b), `block ${b} of set ${n} (confirmed ${r.record.confirmedSet})`).toBe(true);
          expect(r.record.confirmedSet).toBeLessThanOrEqual(held);
        }
      }),
      { seed, numRuns: 300 },
    );
  });

  it('tracks from when it first hears of the replica: an older position means a full copy', () => {
    const fsys = new SimFs();
    const role = primaryRecord(fsys);
    const t = new DistantTracker(fsys, role, BLOCKS, silentLogger(), () => 0);
    const hop = (u: number) => [{ depth: 1, volume: 'v', peer: 'c:1', role: 'replica', state: 'duplex', generation: 1, playedSet: null, lagSeconds: null, pairId: C, upstreamSet: u }];
    t.onReport(VIA, hop(3), 10); // first heard at set 10; C holds 3
    const r = t.blocksFor(C);
    expect(r.blocks).toBeNull();
    expect(r.blocks === null && r.why).toMatch(/before this node began tracking/);
    const m = new PagedBitmap(BLOCKS);
    m.set(7);
    t.onSetCut(m); // set 11
    t.onReport(VIA, hop(10), 11);
    const r2 = t.blocksFor(C);
    expect(r2.blocks?.test(7)).toBe(true);
    expect(t.status()[0]).toMatchObject({ confirmedSet: 10, trackedFrom: 10, differential: true, blocks: 1 });
  });
});
