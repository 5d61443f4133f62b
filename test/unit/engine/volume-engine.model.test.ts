// Why: issue 4's first test: random sequences of writes (aligned and unaligned), trims,
// zeroes, snapshot create/delete/restore, delta-set cuts (some failing, some with writes
// racing the copy-out) and crashes; after every step the volume and every snapshot read
// exactly as a plain in-memory model says, every delta set turns the replica into the
// volume as of its cut, and a differential L→M applied to a copy of L yields M. After a
// crash: snapshots are still exact, every block that differs from the replica is pending,
// every block holding data is valid.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { VolumeEngine, type DeltaSink, type EngineOptions } from '../../../src/volume/volume-engine.js';
import { isDeltavolError } from '../../../src/util/errors.js';
import { SimFs } from '../../helpers/sim-fs.js';
import { SimVolumeData, memoryPiped } from '../../helpers/sim-volume-data.js';

/** Writes given as piped payloads (memoryPiped): the engine passes some on, takes others into memory. */
let pipedGiven = 0;
/** Piped payloads whose write copied or saved blocks first (the engine's slow path). */
let pipedSlow = 0;
import { prng, testSeed } from '../../helpers/seed.js';

const BS = 4096;
const BLOCKS_WHOLE = 40;
const SIZE = BLOCKS_WHOLE * BS + 1536; // a partial last tracking block
const BLOCKS = Math.ceil(SIZE / BS);
/** Runs per property (DELTAVOL_RUNS raises it for a long soak). */
const RUNS = Number(process.env.DELTAVOL_RUNS ?? 100);

type Op =
  | { k: 'write'; offset: number; length: number }
  | { k: 'zero'; offset: number; length: number }
  | { k: 'snap' }
  | { k: 'delete'; i: number }
  | { k: 'restore'; i: number }
  | { k: 'cutBegin'; fail: boolean }
  | { k: 'cutEnd' }
  | { k: 'diff'; l: number; m: number }
  | { k: 'crash'; during: 'none' | 'write' | 'restore' | 'snap'; turns: number; pick: number }
  | { k: 'reopen' }
  | { k: 'burst'; parts: { block: number; from: number; length: number; zero: boolean }[] }
  | { k: 'runs'; skip: number; parts: { block: number; from: number; length: number }[] };

const aligned = fc
  .tuple(fc.integer({ min: 0, max: BLOCKS_WHOLE - 1 }), fc.integer({ min: 1, max: 4 }))
  .map(([b, n]) => ({ offset: b * BS, length: Math.min(n * BS, SIZE - b * BS) }));
const unaligned = fc
  .tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: 3 * BS }))
  .map(([o, n]) => ({ offset: o, length: Math.min(n, SIZE - o) }));
const sector = fc
  .tuple(fc.integer({ min: 0, max: SIZE / 512 - 1 }), fc.integer({ min: 1, max: 12 }))
  .map(([s, n]) => ({ offset: s * 512, length: Math.min(n * 512, SIZE - s * 512) }));
const range = fc.oneof(aligned, unaligned, sector);

const op: fc.Arbitrary<Op> = fc.oneof(
  { weight: 10, arbitrary: range.map((r) => ({ k: 'write' as const, ...r })) },
  { weight: 3, arbitrary: range.map((r) => ({ k: 'zero' as const, ...r })) },
  { weight: 3, arbitrary: fc.constant({ k: 'snap' as const }) },
  { weight: 2, arbitrary: fc.nat(20).map((i) => ({ k: 'delete' as const, i })) },
  { weight: 1, arbitrary: fc.nat(20).map((i) => ({ k: 'restore' as const, i })) },
  { weight: 2, arbitrary: fc.boolean().map((fail) => ({ k: 'cutBegin' as const, fail })) },
  { weight: 2, arbitrary: fc.constant({ k: 'cutEnd' as const }) },
  { weight: 2, arbitrary: fc.tuple(fc.nat(20), fc.nat(21)).map(([l, m]) => ({ k: 'diff' as const, l, m })) },
  {
    // The machine dies while a write, a restore or a snapshot creation is under way.
    weight: 3,
    arbitrary: fc.record({ k: fc.constant('crash' as const), during: fc.constantFrom('none' as const, 'write' as const, 'restore' as const, 'snap' as const), turns: fc.nat(6), pick: fc.nat(20) }),
  },
  { weight: 1, arbitrary: fc.constant({ k: 'reopen' as const }) },
  {
    // Writes and zeroes in flight together (distinct blocks, so the model's order is free).
    weight: 3,
    arbitrary: fc
      .uniqueArray(
        fc.record({ block: fc.nat(BLOCKS_WHOLE - 1), from: fc.nat(BS - 1), length: fc.integer({ min: 1, max: BS }), zero: fc.boolean() }),
        { minLength: 2, maxLength: 6, selector: (p) => p.block },
      )
      .map((parts) => ({ k: 'burst' as const, parts: parts.map((p) => ({ ...p, length: Math.min(p.length, BS - p.from) })) })),
  },
  {
    // A replica's playback: many runs in one call (writeRuns), their bytes back to back in one buffer.
    weight: 3,
    arbitrary: fc
      .record({
        skip: fc.nat(100),
        parts: fc.uniqueArray(fc.record({ block: fc.nat(BLOCKS - 1), from: fc.nat(BS - 1), length: fc.integer({ min: 0, max: 2 * BS }) }), { minLength: 1, maxLength: 8, selector: (p) => p.block }),
      })
      .map(({ skip, parts }) => ({
        k: 'runs' as const,
        skip,
        // Distinct blocks (the model's order is free); a run may cover two blocks, or none.
        parts: parts
          .sort((a, b) => a.block - b.block)
          .map((p, i, all) => {
            const end = Math.min(SIZE, i + 1 < all.length ? all[i + 1]!.block * BS : SIZE);
            const at = Math.min(p.block * BS + p.from, SIZE);
            return { ...p, length: Math.max(0, Math.min(p.length, end - at)) };
          }),
      })),
  },
);

interface ModelSnap {
  name: string;
  content: Buffer;
  valid: boolean;
}

interface Build {
  done: Promise<unknown>;
  asOfCut: Buffer;
  fail: boolean;
  setNumber: number;
}

function pattern(tag: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (tag * 31 + i * 7 + 1) & 255 || 1;
  return b;
}

function blockOf(buf: Buffer, b: number): Buffer {
  return buf.subarray(b * BS, Math.min(SIZE, (b + 1) * BS));
}

/**
 * Volume data that reads many ranges per call (as the native preadRanges does): past the
 * end of the volume reads as zeroes. Counts calls so the test can see the batched path ran.
 */
let rangeCallsTotal = 0;
let writeRangeCallsTotal = 0;
class RangesVolumeData extends SimVolumeData {
  writeRangesSync(ranges: Float64Array, count: number, source: Buffer, sourceOffset: number): void {
    writeRangeCallsTotal++;
    let at = sourceOffset;
    for (let i = 0; i < count; i++) {
      const len = ranges[2 * i + 1]!;
      this.write(ranges[2 * i]!, [source.subarray(at, at + len)]);
      at += len;
    }
  }
  readRangesSync(ranges: Float64Array, count: number, target: Buffer, targetOffset: number): void {
    rangeCallsTotal++;
    let at = targetOffset;
    for (let i = 0; i < count; i++) {
      const off = ranges[2 * i]!;
      const len = ranges[2 * i + 1]!;
      const n = Math.max(0, Math.min(len, this.sizeBytes - off));
      this.current.copy(target, at, off, off + n);
      target.fill(0, at + n, at + len);
      at += len;
    }
  }
}

/** Blocks per chunk of the batched sink (small, so runs straddle chunks). */
const SINK_CHUNK_BLOCKS = 5;

async function runSequence(ops: Op[], crashSeed: number, options: EngineOptions, batched = false): Promise<void> {
  const rng = prng(crashSeed);
  let fsys = new SimFs();
  const newData = (from?: Buffer): SimVolumeData => (batched ? new RangesVolumeData(SIZE, from) : new SimVolumeData(SIZE, from));
  let data = newData();
  let engine = await VolumeEngine.create(fsys, data, options);
  const model = { vol: Buffer.alloc(SIZE), snaps: [] as ModelSnap[], replica: Buffer.alloc(SIZE) };
  let build: Build | null = null;
  let tag = 0;
  let setNumber = 0;
  let snapSeq = 0;

  const readAll = (name: string | null): Buffer => {
    const out = Buffer.alloc(SIZE);
    if (name === null) engine.read(0, SIZE, out);
    else engine.readSnapshot(name, 0, SIZE, out);
    return out;
  };

  const syncValidity = () => {
    const listed = engine.listSnapshots();
    expect(listed.map((s) => s.name)).toEqual(model.snaps.map((s) => s.name));
    listed.forEach((s, i) => {
      if (!s.valid) model.snaps[i]!.valid = false;
      expect(s.valid).toBe(model.snaps[i]!.valid);
    });
  };

  const check = () => {
    engine.invariants();
    syncValidity();
    expect(readAll(null).equals(model.vol)).toBe(true);
    for (const s of model.snaps) if (s.valid) expect(readAll(s.name).equals(s.content), `snapshot ${s.name}`).toBe(true);
    // Every block holding data is valid (validity may over-mark, never under-mark).
    const valid = engine.validBlocks();
    for (let b = 0; b < BLOCKS; b++) if (blockOf(model.vol, b).some((x) => x !== 0)) expect(valid.test(b), `block ${b} valid`).toBe(true);
  };

  const finishBuild = async () => {
    if (!build) return;
    const b = build;
    build = null;
    let failed = false;
    await b.done.catch((e) => {
      failed = true;
      if (!b.fail) throw e;
    });
    expect(failed).toBe(b.fail);
  };

  const startBuild = (fail: boolean) => {
    const asOfCut = Buffer.from(model.vol);
    const puts = new Map<number, Buffer>();
    const n = ++setNumber;
    const put = (block: number, d: Buffer) => {
      expect(puts.has(block)).toBe(false);
      puts.set(block, Buffer.from(d.subarray(0, Math.min(BS, SIZE - block * BS))));
      if (block * BS + BS > SIZE) expect(d.subarray(SIZE - block * BS, BS).every((x) => x === 0), `block ${block} zero past the end`).toBe(true);
    };
    // The batched variant gives the engine room in its own chunk buffer (as SetWriter does).
    let chunk: Buffer | null = null;
    let fill = 0;
    const sink: DeltaSink = {
      put,
      ...(batched
        ? {
            room(blocks: number) {
              chunk ??= Buffer.alloc(SINK_CHUNK_BLOCKS * BS, 0xee);
              return { buffer: chunk, offset: fill * BS, blocks: Math.min(blocks, SINK_CHUNK_BLOCKS - fill) };
            },
            filled(block: number, count: number) {
              for (let i = 0; i < count; i++) put(block + i, chunk!.subarray((fill + i) * BS, (fill + i + 1) * BS));
              fill += count;
              if (fill === SINK_CHUNK_BLOCKS) {
                chunk = null;
                fill = 0;
              }
            },
          }
        : {}),
      async commit() {
        if (fail) throw new Error('sink failed');
        // Exactly the volume as of the cut, and complete: the replica becomes it.
        for (const [block, d] of puts) expect(d.equals(blockOf(asOfCut, block)), `set ${n} block ${block}`).toBe(true);
        for (const [block, d] of puts) d.copy(model.replica, block * BS);
        expect(model.replica.equals(asOfCut), `replica after set ${n}`).toBe(true);
      },
    };
    const done = engine.buildDeltaSet(n, sink);
    done.catch(() => undefined); // awaited (and checked) at cutEnd
    build = { done, asOfCut, fail, setNumber: n };
  };

  const restore = async (s: ModelSnap) => {
    if (!s.valid) {
      await expect(engine.restoreSnapshot(s.name)).rejects.toSatisfy((e) => isDeltavolError(e, 'SNAPSHOT_INVALID'));
      return;
    }
    try {
      await engine.restoreSnapshot(s.name);
      s.content.copy(model.vol);
    } catch (e) {
      // Its own save area (or the tail's, cascading) filled during the restore: it became
      // invalid midway. Every write went through the engine, so the volume is whatever
      // the engine now reads; the other snapshots are checked as usual.
      if (!isDeltavolError(e, 'SNAPSHOT_INVALID')) throw e;
      syncValidity();
      expect(s.valid).toBe(false);
      engine.read(0, SIZE, model.vol);
    }
  };

  for (const o of ops) {
    switch (o.k) {
      case 'write': {
        const p = pattern(++tag, o.length);
        // Split some writes into several chunks, as sockets deliver them; give some as bytes
        // waiting in a pipe (the engine passes those on, or takes them into memory first).
        const chunks = o.length > 1000 && tag % 2 === 0 ? [p.subarray(0, 777), p.subarray(777)] : [p];
        const piped = tag % 3 === 0;
        if (piped) pipedGiven++;
        const copiesBefore = engine.stats.priorityCopies + engine.stats.beforeImagesSaved;
        await engine.write(o.offset, piped ? memoryPiped(p) : chunks);
        if (piped && engine.stats.priorityCopies + engine.stats.beforeImagesSaved > copiesBefore) pipedSlow++;
        p.copy(model.vol, o.offset);
        break;
      }
      case 'burst': {
        const inFlight: Promise<void>[] = [];
        for (const p of o.parts) {
          const at = p.block * BS + p.from;
          if (p.zero) {
            inFlight.push(Promise.resolve(engine.zero(at, p.length)));
            model.vol.fill(0, at, at + p.length);
          } else {
            const d = pattern(++tag, p.length);
            inFlight.push(Promise.resolve(engine.write(at, [d])));
            d.copy(model.vol, at);
          }
        }
        await Promise.all(inFlight);
        break;
      }
      case 'runs': {
        const ranges = new Float64Array(2 * o.parts.length);
        const datas = o.parts.map((p) => pattern(++tag, p.length));
        const source = Buffer.concat([Buffer.alloc(o.skip, 0xee), ...datas, Buffer.alloc(7, 0xee)]);
        o.parts.forEach((p, i) => {
          ranges[2 * i] = Math.min(p.block * BS + p.from, SIZE);
          ranges[2 * i + 1] = p.length;
        });
        await engine.writeRuns(ranges, o.parts.length, source, o.skip);
        o.parts.forEach((p, i) => datas[i]!.copy(model.vol, ranges[2 * i]!));
        break;
      }
      case 'zero':
        await engine.zero(o.offset, o.length);
        model.vol.fill(0, o.offset, o.offset + o.length);
        break;
      case 'snap': {
        const name = `s${++snapSeq}`;
        await engine.createSnapshot(name);
        model.snaps.push({ name, content: Buffer.from(model.vol), valid: true });
        break;
      }
      case 'delete': {
        if (model.snaps.length === 0) break;
        const i = o.i % model.snaps.length;
        await engine.deleteSnapshot(model.snaps[i]!.name);
        model.snaps.splice(i, 1);
        break;
      }
      case 'restore': {
        if (model.snaps.length === 0) break;
        await restore(model.snaps[o.i % model.snaps.length]!);
        break;
      }
      case 'cutBegin':
        if (build) await finishBuild();
        startBuild(o.fail);
        break;
      case 'cutEnd':
        await finishBuild();
        break;
      case 'diff': {
        const valid = model.snaps.filter((s) => s.valid);
        if (valid.length === 0) break;
        const l = valid[o.l % valid.length]!;
        const li = valid.indexOf(l);
        const mi = li + 1 + (o.m % (valid.length - li)); // valid.length means "the volume now"
        const m = mi < valid.length ? valid[mi]! : null;
        const copy = Buffer.from(l.content);
        const target = m ? m.content : model.vol;
        let lastEnd = -1;
        for (const run of engine.differentialStream(l.name, m?.name ?? null, 3)) {
          expect(run.block).toBeGreaterThanOrEqual(lastEnd); // block order
          lastEnd = run.block + run.count;
          if (run.data) run.data.copy(copy, run.offsetBytes);
          else copy.fill(0, run.offsetBytes, run.offsetBytes + run.lengthBytes);
        }
        if (!m) {
          // qemu:dirty-bitmap:L: every byte that differs from L lies in a dirty extent.
          let pos = 0;
          for (const ex of engine.dirtyExtents(l.name, 0, SIZE, 1000)) {
            if (!ex.dirty) expect(model.vol.subarray(pos, pos + ex.lengthBytes).equals(l.content.subarray(pos, pos + ex.lengthBytes)), `clean extent at ${pos}`).toBe(true);
            pos += ex.lengthBytes;
          }
          expect(pos).toBe(SIZE);
        }
        // Snapshot holes as BLOCK_STATUS reports them: a hole reads as zeroes.
        if (m) {
          let pos = 0;
          for (const ex of engine.snapshotExtents(m.name, 0, SIZE, 1000)) {
            if (ex.hole) expect(m.content.subarray(pos, pos + ex.lengthBytes).every((x) => x === 0)).toBe(true);
            pos += ex.lengthBytes;
          }
          expect(pos).toBe(SIZE);
        }
        expect(copy.equals(target), `differential ${l.name}→${m?.name ?? 'now'}`).toBe(true);
        break;
      }
      case 'crash': {
        let restoring: ModelSnap | null = null;
        let creating: string | null = null;
        const before = Buffer.from(model.vol);
        if (o.during === 'write') {
          // Prefer a block whose first write must save a before-image: the ordering under test.
          const p = pattern(++tag, BS);
          const needing: number[] = [];
          for (let b = 0; b < BLOCKS_WHOLE; b++) if (engine.snapshots.needsSave(b)) needing.push(b);
          const b = needing.length > 0 ? needing[o.pick % needing.length]! : o.pick % BLOCKS_WHOLE;
          const r = engine.write(b * BS, [p]);
          if (r instanceof Promise) r.catch(() => undefined);
        } else if (o.during === 'restore') {
          const valid = model.snaps.filter((x) => x.valid);
          if (valid.length > 0) {
            restoring = valid[o.pick % valid.length]!;
            engine.restoreSnapshot(restoring.name).catch(() => undefined);
          }
        } else if (o.during === 'snap') {
          creating = `s${++snapSeq}`;
          engine.createSnapshot(creating).catch(() => undefined);
        }
        for (let i = 0; i < o.turns; i++) await new Promise((r) => setImmediate(r));
        if (build) {
          build.done.catch(() => undefined);
          build = null;
        }
        fsys = fsys.crash(rng);
        data = newData(data.crash(rng).current);
        engine = await VolumeEngine.open(fsys, data, options);
        model.vol = Buffer.from(data.current); // any mix of unflushed writes may survive
        if (creating !== null && engine.listSnapshots().some((x) => x.name === creating)) {
          // Listed means its creation completed: it holds the volume as it was then.
          model.snaps.push({ name: creating, content: before, valid: true });
        }
        // Nothing that differs from the replica may be forgotten by the change log.
        const pending = engine.changeLog.pending();
        for (let b = 0; b < BLOCKS; b++) {
          if (!blockOf(model.vol, b).equals(blockOf(model.replica, b))) expect(pending.test(b), `block ${b} pending after crash`).toBe(true);
        }
        check();
        if (restoring !== null) {
          // A restore cut short is finished by running it again.
          await restore(restoring);
        }
        break;
      }
      case 'reopen': {
        await finishBuild();
        await engine.close();
        engine = await VolumeEngine.open(fsys, data, options);
        break;
      }
    }
    check();
  }
  await finishBuild();
}

describe('volume engine against an in-memory model', () => {
  const base: EngineOptions = { blockBytes: BS, saveAreaBytesMax: 1 << 30, activityExtentBytes: 4 * BS, activityHotMax: 3, copyBlocksPerTurn: 3, journalRegionBytes: 2048, journalRecentExtents: 1, checkpointPagesPerTurn: 1 };

  it('snapshots, delta sets, differentials and crashes agree with the model', async () => {
    const seed = testSeed('engine model');
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 10, maxLength: 60 }), fc.integer(), (ops, crashSeed) => runSequence(ops, crashSeed, base)),
      { seed, numRuns: RUNS, timeout: 10_000, endOnFailure: process.env.DELTAVOL_NO_SHRINK === '1' },
    );
    // Without a mirror every piped payload goes to the data from its pipe, also the ones that
    // copied or saved blocks first (the slow path keeps the pipe through its wait).
    expect(pipedSlow).toBeGreaterThan(0);
    expect(SimVolumeData.pipedWritesTotal).toBe(pipedGiven);
  });

  it('delta sets built with batched range reads into the sink\'s buffer agree with the model', async () => {
    const seed = testSeed('engine model, batched set reads');
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 10, maxLength: 60 }), fc.integer(), (ops, crashSeed) => runSequence(ops, crashSeed, { ...base, copyBlocksPerTurn: 7 }, true)),
      { seed, numRuns: Math.ceil(RUNS / 2), timeout: 10_000, endOnFailure: process.env.DELTAVOL_NO_SHRINK === '1' },
    );
  });

  it('the batched paths run: writeRuns of runs in hot extents in one call, a cut\'s set read in ranges', async () => {
    // The property above may draw no sequence that takes them (CI seed 380689687 drew none
    // for writeRuns): this one does, and is checked against the model the same way.
    const rangesBefore = rangeCallsTotal;
    const writesBefore = writeRangeCallsTotal;
    const ops: Op[] = [
      // A first write to an extent goes to the journal; the second makes the extent hot.
      { k: 'write', offset: 0, length: 4 * BS },
      { k: 'write', offset: BS, length: BS },
      { k: 'runs', skip: 3, parts: [{ block: 0, from: 5, length: 100 }, { block: 2, from: 0, length: BS }, { block: 3, from: 7, length: 0 }] },
      { k: 'cutBegin', fail: false },
      { k: 'cutEnd' },
    ];
    await runSequence(ops, 1, { ...base, copyBlocksPerTurn: 7 }, true);
    expect(writeRangeCallsTotal - writesBefore, 'writeRuns took the batched path').toBe(1);
    expect(rangeCallsTotal - rangesBefore, 'the set was read in ranges').toBeGreaterThan(0);
  });

  it('a full save area invalidates only its snapshot', async () => {
    const seed = testSeed('engine model, small save areas');
    const small = { ...base, saveAreaBytesMax: 6 * (BS + 32) };
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 10, maxLength: 60 }), fc.integer(), (ops, crashSeed) => runSequence(ops, crashSeed, small)),
      { seed, numRuns: Math.ceil(RUNS / 2), timeout: 10_000, endOnFailure: process.env.DELTAVOL_NO_SHRINK === '1' },
    );
  });
});
