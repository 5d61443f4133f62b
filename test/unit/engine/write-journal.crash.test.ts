// Why: the write journal is the only record of blocks written by cold scattered writes
// whose bitmap bits are not durable yet, so after any crash (tearing a batch of slots
// being written, losing unsynced ones, on top of regions reused many times) and after any
// failed fsync or failed checkpoint, reopening must name every block whose writer set its
// bits since the last checkpoint that covered it. This drives the journal as the engine
// does (log, wait until durable, set the bits, done(); checkpoints free draining regions)
// with tiny regions, so regions fill, switch and are reused all the time.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { WriteJournal, journalSlotBytes } from '../../../src/bitmap/write-journal.js';
import { SimFs } from '../../helpers/sim-fs.js';
import { prng, testSeed } from '../../helpers/seed.js';

const BLOCKS = 5000;
const NAME = 'wj';
const RUNS = Number(process.env.DELTAVOL_RUNS ?? 150);

type Op =
  | { k: 'write'; first: number; count: number; delay: number }
  | { k: 'burst'; n: number }
  | { k: 'checkpoint' }
  | { k: 'tick'; turns: number }
  | { k: 'settle' }
  | { k: 'crash' };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 8, arbitrary: fc.record({ k: fc.constant('write' as const), first: fc.nat(BLOCKS - 1), count: fc.integer({ min: 1, max: 3 }), delay: fc.integer({ min: 0, max: 3 }) }) },
  { weight: 3, arbitrary: fc.record({ k: fc.constant('burst' as const), n: fc.integer({ min: 2, max: 140 }) }) },
  { weight: 2, arbitrary: fc.constant({ k: 'checkpoint' as const }) },
  { weight: 3, arbitrary: fc.record({ k: fc.constant('tick' as const), turns: fc.integer({ min: 1, max: 4 }) }) },
  { weight: 2, arbitrary: fc.constant({ k: 'settle' as const }) },
  { weight: 2, arbitrary: fc.constant({ k: 'crash' as const }) },
);

const tick = () => new Promise<void>((r) => setImmediate(r));

interface Faults {
  syncFail: number;
  checkpointFail: number;
}

async function runSequence(ops: Op[], crashSeed: number, regionSlots: number, faults: Faults): Promise<{ switches: number; crashes: number }> {
  const rng = prng(crashSeed);
  const regionBytes = regionSlots * journalSlotBytes;
  let boot = 0;
  let clock = 0;
  /** Block → time its bits were set by a writer whose data may be on disk, not yet covered by a checkpoint. */
  const needed = new Map<number, number>();
  let writers: Promise<void>[] = [];
  let checkpoints: Promise<void>[] = [];
  let switches = 0;
  let crashes = 0;

  let fsys = new SimFs();
  const withFaults = (f: SimFs): SimFs => {
    f.syncFaults = { fails: () => rng() < faults.syncFail, rng };
    return f;
  };

  // The engine's checkpoint: takes the dirty pages (every bit set so far) at its start,
  // then the bitmaps' fsync, which may fail.
  const checkpoint = (j: WriteJournal, me: number): Promise<void> => {
    const started = clock;
    const covering = j.checkpointStarting();
    const run = (async () => {
      await tick();
      if (boot !== me) return;
      if (rng() < faults.checkpointFail) {
        j.checkpointed(covering, false);
        return;
      }
      for (const [b, t] of needed) if (t < started) needed.delete(b);
      j.checkpointed(covering, true);
    })();
    checkpoints.push(run);
    return run;
  };

  const open = (me: number): { journal: WriteJournal; ranges: number[] } => {
    let j: WriteJournal | null = null;
    const r = WriteJournal.open(fsys, NAME, {
      regionBytes,
      wantCheckpoint: () => {
        switches++;
        void checkpoint(j!, me);
      },
    });
    j = r.journal;
    return r;
  };

  let { journal } = open(boot);
  await journal.reset();
  withFaults(fsys);

  // The engine's cold write: journal it, wait until durable, later set its bits, done().
  const writer = async (j: WriteJournal, me: number, first: number, last: number, delay: number): Promise<void> => {
    const t = j.log(first, last);
    if (t === null) return; // the engine would use the activity log
    try {
      await t.durable;
    } catch {
      j.done(t);
      return; // the write fails: its data is never issued
    }
    for (let i = 0; i < delay; i++) await tick(); // e.g. waiting at the engine's gate
    if (boot !== me) return;
    for (let b = first; b <= last; b++) needed.set(b, clock++);
    j.done(t);
  };

  const crash = async (): Promise<void> => {
    boot++;
    crashes++;
    fsys = fsys.crash(rng);
    writers = [];
    checkpoints = [];
    const r = open(boot);
    const named = new Set<number>();
    for (let i = 0; i < r.ranges.length; i += 2) for (let b = r.ranges[i]!; b <= r.ranges[i + 1]!; b++) named.add(b);
    for (const b of needed.keys()) expect(named.has(b), `block ${b} set since its last checkpoint`).toBe(true);
    // Recovery marks them and checkpoints: nothing is needed any more.
    needed.clear();
    journal = r.journal;
    await journal.reset(); // no fault injected on the fresh file system yet
    withFaults(fsys);
  };

  for (const o of ops) {
    const me = boot;
    if (o.k === 'write') {
      writers.push(writer(journal, me, o.first, Math.min(BLOCKS - 1, o.first + o.count - 1), o.delay));
    } else if (o.k === 'burst') {
      for (let i = 0; i < o.n; i++) {
        const b = Math.floor(rng() * BLOCKS);
        writers.push(writer(journal, me, b, b, Math.floor(rng() * 3)));
      }
    } else if (o.k === 'checkpoint') {
      void checkpoint(journal, me);
    } else if (o.k === 'tick') {
      for (let i = 0; i < o.turns; i++) await tick();
    } else if (o.k === 'settle') {
      await Promise.all(writers);
      await Promise.all(checkpoints);
      writers = [];
      checkpoints = [];
      if (!journal.failed) journal.invariants();
    } else {
      await crash();
    }
  }
  await crash();
  return { switches, crashes };
}

describe('WriteJournal crash safety', () => {
  const ops = fc.array(opArb, { minLength: 20, maxLength: 80 });
  const regionSlots = fc.constantFrom(4, 5, 8, 64);

  it('names every block set since its covering checkpoint, across crashes, region switches and reuse', async () => {
    const seed = testSeed('write-journal crash');
    let switches = 0;
    await fc.assert(
      fc.asyncProperty(ops, fc.integer(), regionSlots, async (o, crashSeed, slots) => {
        switches += (await runSequence(o, crashSeed, slots, { syncFail: 0, checkpointFail: 0 })).switches;
      }),
      { seed, numRuns: RUNS },
    );
    expect(switches, 'regions filled and switched').toBeGreaterThan(RUNS / 2);
  });

  it('stays safe when fsyncs of the journal and checkpoints fail', async () => {
    const seed = testSeed('write-journal crash with failed syncs');
    await fc.assert(
      fc.asyncProperty(ops, fc.integer(), regionSlots, (o, crashSeed, slots) => runSequence(o, crashSeed, slots, { syncFail: 0.1, checkpointFail: 0.15 }).then(() => undefined)),
      { seed, numRuns: RUNS },
    );
  });
});

describe('WriteJournal', () => {
  it('replays nothing after reset() or a clean close, and takes no entry after a failed fsync', async () => {
    const fsys = new SimFs();
    let { journal } = WriteJournal.open(fsys, NAME, { regionBytes: 4 * journalSlotBytes });
    await journal.reset();
    const t = journal.log(10, 12)!;
    await t.durable;
    journal.done(t);
    expect(WriteJournal.open(fsys.crash(() => 0.9), NAME, { regionBytes: 4 * journalSlotBytes }).ranges).toEqual([10, 12]);
    await journal.closeClean();
    expect(WriteJournal.open(fsys.crash(() => 0.9), NAME, { regionBytes: 4 * journalSlotBytes }).ranges).toEqual([]);

    ({ journal } = WriteJournal.open(fsys, NAME, { regionBytes: 4 * journalSlotBytes }));
    await journal.reset();
    fsys.syncFaults = { fails: () => true, rng: () => 0.9 };
    const bad = journal.log(20, 20)!;
    await expect(bad.durable).rejects.toThrow(/EIO/);
    journal.done(bad);
    expect(journal.failed).toBe(true);
    expect(journal.log(21, 21)).toBeNull();
  });

  it('refuses entries while both regions are full, and takes them again once a checkpoint freed one', async () => {
    const fsys = new SimFs();
    let wanted = 0;
    const { journal } = WriteJournal.open(fsys, NAME, { regionBytes: 4 * journalSlotBytes, wantCheckpoint: () => void wanted++ });
    await journal.reset(); // the reset takes slot 0 of the first region
    const tickets = [];
    // One entry per batch: one slot each. 3 slots left in the first region, 4 in the second.
    for (let i = 0; i < 7; i++) {
      const t = journal.log(i, i);
      expect(t, `entry ${i}`).not.toBeNull();
      await t!.durable;
      tickets.push(t!);
    }
    expect(wanted).toBe(1);
    expect(journal.log(100, 100), 'both regions full').toBeNull();
    // A checkpoint while a writer of the draining region has not set its bits covers nothing.
    let covering = journal.checkpointStarting();
    expect(covering).toEqual([]);
    for (const t of tickets) journal.done(t);
    covering = journal.checkpointStarting();
    expect(covering).toEqual([0]);
    journal.checkpointed(covering, true);
    const again = journal.log(100, 100);
    expect(again).not.toBeNull();
    await again!.durable;
    journal.done(again!);
    expect(wanted).toBe(2);
    journal.invariants();
    // The blocks of the region still draining and of the active one are named; the freed one's are not.
    const { ranges } = WriteJournal.open(fsys.crash(() => 0.9), NAME, { regionBytes: 4 * journalSlotBytes });
    const named = new Set<number>();
    for (let i = 0; i < ranges.length; i += 2) for (let b = ranges[i]!; b <= ranges[i + 1]!; b++) named.add(b);
    for (const b of [3, 4, 5, 6, 100]) expect(named.has(b), `block ${b}`).toBe(true);
    for (const b of [0, 1, 2]) expect(named.has(b), `block ${b} (covered, its region reused)`).toBe(false);
  });
});
