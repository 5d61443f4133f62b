// Why: one primary volume's side of replication (seed 001 FIG. 5, 7–12): it decides when
// to cut a delta set (timeout, high-water mark, on demand), builds sets into the
// outbound save area, keeps the pairs' durable records (generation, what each replica
// acknowledged, split and catch-up state), frees log space once every pair is past a
// set, and when the log is full lets a stalled pair fall back to a pending bitmap so the
// others keep going. Each pair's connection is a PairSender (pair-sender.ts).
//
// Pair record invariants (replication.json, replaced atomically):
//   - ackedSet is the last set the replica holds durably (its chain head); the log keeps
//     every set after it (or from catchUp.set) until the replica acknowledges it;
//   - a detached pair holds no log space: everything it misses is in its pending file
//     (pair-ID.pending), which is durable before any set it missed is released;
//   - a catch-up set carries the pending blocks (and the replica's split writes) and is
//     sent with catchUpFrom = ackedSet; the pending file is cleared once it is acked.

import { randomBytes } from 'node:crypto';
import type { Logger } from '../util/log.js';
import { assert } from '../util/assert.js';
import { DeltavolError } from '../util/errors.js';
import type { DurableFs } from '../util/durable-fs.js';
import { PagedBitmap } from '../bitmap/paged-bitmap.js';
import { OutboundLog } from './outbound-log.js';
import type { PrimaryPort } from './ports.js';
import type { Runs } from './wire.js';
import { PairSender } from './pair-sender.js';
import * as L from './limits.js';

export const REPLICATION_STATE_FILE = 'replication.json';

export type PairState = 'initial-copy' | 'duplex' | 'duplex-pending' | 'suspending' | 'suspend' | 'failure-suspend';

export interface PairConfig {
  peerHost: string;
  peerPort: number;
  remoteVolume: string;
  cutIntervalMs: number;
  highWaterBytes: number;
  retriesBeforeSuspend: number;
}

export interface PairRecord extends PairConfig {
  id: string;
  createdAt: string;
  ackedSet: number;
  playedSet: number;
  initialCopy: { done: boolean; baseSet: number; baseSnapshot: string | null; validBytes: number };
  operatorSuspended: boolean;
  detached: boolean;
  catchUp: { set: number; from: number } | null;
}

interface StateFile {
  version: 1;
  generation: number;
  pairs: PairRecord[];
}

interface CutRequest {
  snapshotName?: string;
  reason: string;
  /** Cut even with nothing changed (a set with no blocks). */
  force?: boolean;
  /** No set: a snapshot holding every change, and an empty change log (first replica). */
  forget?: boolean;
}

export interface ReplicatorOptions {
  outboundBytes: number;
}

export class VolumeReplicator {
  private state: StateFile;
  readonly log: OutboundLog;
  readonly senders = new Map<string, PairSender>();
  private readonly pending = new Map<string, PagedBitmap>();
  private building: Promise<unknown> | null = null;
  private lastCutMs = Date.now();
  private firstChangeMs: number | null = null;
  private readonly timer: NodeJS.Timeout;
  private closed = false;
  /** Reason the last cut could not happen (outbound full), for status. */
  outboundFull = false;
  setsCut = 0;

  constructor(
    readonly volume: PrimaryPort,
    private readonly fsys: DurableFs,
    private readonly log_: Logger,
    options: ReplicatorOptions,
  ) {
    const raw = fsys.readAll(REPLICATION_STATE_FILE);
    this.state = raw ? (JSON.parse(raw.toString('utf8')) as StateFile) : { version: 1, generation: 1, pairs: [] };
    this.log = OutboundLog.open(fsys, options.outboundBytes);
    for (const p of this.state.pairs) {
      const bits = new PagedBitmap(volume.blocksTotal);
      const f = fsys.readAll(pendingFile(p.id));
      if (f) for (const [s, c] of JSON.parse(f.toString('utf8')) as Runs) bits.setRange(s, c);
      this.pending.set(p.id, bits);
    }
    this.timer = setInterval(() => this.tick(), L.replicatorTickMs);
    this.timer.unref();
  }

  get generation(): number {
    return this.state.generation;
  }
  get pairs(): readonly PairRecord[] {
    return this.state.pairs;
  }
  pair(id: string): PairRecord {
    const p = this.state.pairs.find((x) => x.id === id || x.remoteVolume === id || `${x.peerHost}:${x.peerPort}` === id);
    if (!p) throw new DeltavolError('EINVAL_ARGUMENT', `volume ${this.volume.name} has no replica "${id}"`);
    return p;
  }
  pendingOf(id: string): PagedBitmap {
    return this.pending.get(id)!;
  }

  /** Starts a sender per pair (after a restart, every pair resumes where its record says). */
  start(): void {
    for (const p of this.state.pairs) this.startSender(p);
  }

  private startSender(p: PairRecord): void {
    const s = new PairSender(this, p, this.log_.child({ pair: p.id, peer: `${p.peerHost}:${p.peerPort}` }));
    this.senders.set(p.id, s);
    s.start();
  }

  saveState(): void {
    this.fsys.writeAtomic(REPLICATION_STATE_FILE, Buffer.from(JSON.stringify(this.state, null, 1)));
  }

  private savePending(id: string): void {
    this.fsys.writeAtomic(pendingFile(id), Buffer.from(JSON.stringify(this.pending.get(id)!.runs())));
  }

  // ================= pairs =================

  /**
   * A new replica: cut a set with a base snapshot stamped with its number, then the
   * sender copies the snapshot's valid blocks and continues with the next set.
   */
  async addPair(config: PairConfig): Promise<PairRecord> {
    for (const p of this.state.pairs) {
      if (p.peerHost === config.peerHost && p.peerPort === config.peerPort && p.remoteVolume === config.remoteVolume) {
        throw new DeltavolError('VOLUME_EXISTS', `volume ${this.volume.name} already replicates to ${config.remoteVolume} at ${config.peerHost}:${config.peerPort}`);
      }
    }
    const id = randomBytes(6).toString('hex');
    const baseSnapshot = `repl-base-${id}`;
    // The first replica: the base snapshot holds every change, so the change log starts
    // empty (no set is built). Otherwise the others still need those changes: cut a set.
    const first = this.state.pairs.length === 0;
    const set = await this.cut({ snapshotName: baseSnapshot, reason: 'initial copy', force: true, forget: first });
    if (set === null) throw new DeltavolError('SAVE_AREA_FULL', 'outbound save area full: cannot start an initial copy now');
    const valid = this.volume.snapshotValidBlocks(baseSnapshot).count() * this.volume.blockBytes;
    const p: PairRecord = {
      ...config,
      id,
      createdAt: new Date().toISOString(),
      ackedSet: set,
      playedSet: 0,
      initialCopy: { done: false, baseSet: set, baseSnapshot, validBytes: Math.min(valid, this.volume.sizeBytes) },
      operatorSuspended: false,
      detached: false,
      catchUp: null,
    };
    this.pending.set(id, new PagedBitmap(this.volume.blocksTotal));
    this.state.pairs.push(p);
    this.saveState();
    this.log_.info({ pair: id, peer: `${config.peerHost}:${config.peerPort}`, remoteVolume: config.remoteVolume, baseSet: set }, 'replica added: initial copy starts');
    this.startSender(p);
    this.releaseSets();
    return p;
  }

  async removePair(id: string): Promise<void> {
    const p = this.pair(id);
    await this.senders.get(p.id)?.stop();
    this.senders.delete(p.id);
    this.state.pairs = this.state.pairs.filter((x) => x !== p);
    this.saveState();
    this.fsys.remove(pendingFile(p.id));
    this.pending.delete(p.id);
    if (p.initialCopy.baseSnapshot && this.volume.snapshots().some((s) => s.name === p.initialCopy.baseSnapshot)) {
      await this.volume.deleteSnapshot(p.initialCopy.baseSnapshot, true);
    }
    this.releaseSets();
    this.log_.info({ pair: p.id }, 'replica removed');
  }

  async suspend(id: string): Promise<PairRecord> {
    const p = this.pair(id);
    p.operatorSuspended = true;
    this.saveState();
    await this.senders.get(p.id)!.suspend();
    return p;
  }

  resume(id: string): PairRecord {
    const p = this.pair(id);
    p.operatorSuspended = false;
    this.saveState();
    this.senders.get(p.id)!.resume();
    return p;
  }

  /** The replica acknowledged sets up to `set` and played up to `played`. */
  onAck(p: PairRecord, set: number, played: number): void {
    let changed = false;
    if (set > p.ackedSet) {
      p.ackedSet = set;
      changed = true;
    }
    if (played > p.playedSet) {
      p.playedSet = played;
      changed = true;
    }
    if (p.catchUp && p.ackedSet >= p.catchUp.set) {
      this.log_.info({ pair: p.id, set: p.catchUp.set, from: p.catchUp.from }, 'catch-up set acknowledged');
      p.catchUp = null;
      changed = true;
    }
    if (!changed) return;
    this.saveState();
    this.releaseSets();
  }

  /**
   * The replica has no copy although the pair's record says it had one (its volume was
   * deleted and recreated on the peer): start a new initial copy from a new base snapshot.
   */
  async restartInitialCopy(p: PairRecord): Promise<void> {
    const baseSnapshot = `repl-base-${p.id}-${Date.now().toString(36)}`;
    const set = await this.cut({ snapshotName: baseSnapshot, reason: 'initial copy again', force: true });
    if (set === null) throw new DeltavolError('SAVE_AREA_FULL', 'outbound save area full: cannot start an initial copy now');
    const valid = this.volume.snapshotValidBlocks(baseSnapshot).count() * this.volume.blockBytes;
    p.initialCopy = { done: false, baseSet: set, baseSnapshot, validBytes: Math.min(valid, this.volume.sizeBytes) };
    p.ackedSet = set;
    p.playedSet = 0;
    p.catchUp = null;
    p.detached = false;
    this.pending.get(p.id)!.clearAll();
    this.saveState();
    this.savePending(p.id);
    this.log_.warn({ pair: p.id, baseSet: set }, 'the replica has lost its copy: initial copy starts again');
  }

  /** The initial copy finished and the replica holds the base set. */
  async initialCopyDone(p: PairRecord): Promise<void> {
    p.initialCopy.done = true;
    const base = p.initialCopy.baseSnapshot;
    p.initialCopy.baseSnapshot = null;
    this.saveState();
    if (base && this.volume.snapshots().some((s) => s.name === base)) await this.volume.deleteSnapshot(base, true);
    this.log_.info({ pair: p.id, baseSet: p.initialCopy.baseSet }, 'initial copy complete');
  }

  /** The replica's own writes during a split: they travel in the next (catch-up) set. */
  addSplitWrites(p: PairRecord, runs: Runs): void {
    if (runs.length === 0) return;
    const bits = this.pending.get(p.id)!;
    for (const [s, c] of runs) if (s + c <= bits.bitsTotal) bits.setRange(s, c);
    this.savePending(p.id);
    this.poke();
    this.log_.info({ pair: p.id, blocks: bits.count() }, 'replica was written during the split: those blocks travel again');
  }

  /** Next set this pair must be sent after `sent` (its chain), or null when none is cut yet. */
  nextSetFor(p: PairRecord, after: number): { set: number; from: number } | null {
    if (p.detached) return null; // waits for its catch-up set
    if (p.catchUp && after < p.catchUp.set) return this.log.get(p.catchUp.set) ? { set: p.catchUp.set, from: p.catchUp.from } : null;
    const s = after + 1;
    return this.log.get(s) ? { set: s, from: after } : null;
  }

  /** First set a pair still needs from the log (Infinity when it needs none). */
  private holdFrom(p: PairRecord): number {
    if (p.detached) return Infinity;
    if (p.catchUp && p.ackedSet < p.catchUp.set) return p.catchUp.set;
    return p.ackedSet + 1;
  }

  private releaseSets(): void {
    let hold = Infinity;
    for (const p of this.state.pairs) hold = Math.min(hold, this.holdFrom(p));
    const upTo = hold === Infinity ? this.log.lastSet : hold - 1;
    if (this.log.sets.length > 0 && this.log.sets[0]!.set <= upTo) {
      this.log.release(upTo);
      this.outboundFull = false;
    }
  }

  /**
   * The log is full: pairs that hold its oldest set and are not connected give their
   * place up; what they miss goes to their pending bitmap (durable first).
   */
  private detachStalled(): boolean {
    const oldest = this.log.sets[0]?.set;
    if (oldest === undefined) return false;
    let any = false;
    for (const p of this.state.pairs) {
      if (this.holdFrom(p) !== oldest || this.senders.get(p.id)?.connected) continue;
      const bits = this.pending.get(p.id)!;
      const from = this.holdFrom(p);
      for (const s of this.log.sets) if (s.set >= from) for (const [b, c] of this.log.setBlocks(s)) bits.setRange(b, c);
      this.savePending(p.id);
      p.detached = true;
      p.catchUp = null;
      any = true;
      this.log_.warn({ pair: p.id, pendingBlocks: bits.count() }, 'outbound save area full: stalled pair detached, it will catch up from its pending bitmap');
    }
    if (any) {
      this.saveState();
      this.releaseSets();
    }
    return any;
  }

  // ================= cuts =================

  private tick(): void {
    if (this.closed || this.building || this.state.pairs.length === 0) return;
    const changed = this.volume.changedBlockCount();
    const now = Date.now();
    if (changed > 0 && this.firstChangeMs === null) this.firstChangeMs = now;
    const active = this.state.pairs.filter((p) => !p.operatorSuspended);
    let interval = Infinity;
    let highWater = Infinity;
    for (const p of active.length > 0 ? active : this.state.pairs) {
      interval = Math.min(interval, p.cutIntervalMs);
      highWater = Math.min(highWater, p.highWaterBytes);
    }
    // Nobody would take a set (every pair split, or detached and away): let the change log
    // accumulate; it is cut, in sets of at most setBytesMax, when a pair comes back.
    const consumers = this.state.pairs.filter((p) => !p.operatorSuspended && (!p.detached || this.senders.get(p.id)?.connected));
    if (consumers.length === 0) return;
    const catchUpWanted = this.state.pairs.some((p) => this.senders.get(p.id)?.connected && (p.detached || this.pending.get(p.id)!.count() > 0));
    const due = (changed > 0 && now - this.lastCutMs >= interval) || changed * this.volume.blockBytes >= highWater || catchUpWanted;
    if (!due) return;
    void this.cut({ reason: catchUpWanted ? 'catch-up' : 'trigger' }).then(
      (n) => {
        // A backlog (more than a high-water mark waiting): cut again at once, not at the next tick.
        if (n !== null && this.volume.changedBlockCount() * this.volume.blockBytes >= highWater) this.poke();
      },
      (e: Error) => this.log_.error({ err: e.message }, 'delta set not built'),
    );
  }

  /** Asks for a cut soon (a catch-up is wanted, or space was freed). */
  poke(): void {
    setImmediate(() => this.tick());
  }

  /**
   * Cuts and builds the next set (one at a time). Resolves with its number, or null when
   * there was nothing to cut or no room in the outbound save area.
   */
  cut(options: CutRequest): Promise<number | null> {
    if (options.snapshotName !== undefined && !options.forget) return this.cutRestartPoint(options);
    return this.cutSerial(options);
  }

  private async cutSerial(options: CutRequest): Promise<number | null> {
    while (this.building) await this.building.catch(() => null);
    const p = this.cutOnce(options);
    this.building = p;
    try {
      const n = await p;
      return n === 'not-whole' ? null : n;
    } finally {
      if (this.building === p) this.building = null;
    }
  }

  /**
   * A cut with a snapshot stamped with its set: a restart point, which must mean byte
   * equality (a replica that has played set n equals the snapshot stamped n). So the set
   * must be whole: a backlog larger than one set is cut first, in partial sets, and the
   * snapshot goes with the first cut that carries everything left. Waits (bounded) for
   * outbound space; fails with a code rather than stamping a snapshot with a set that
   * carries only part of the changes before it.
   */
  private async cutRestartPoint(options: CutRequest): Promise<number> {
    const deadline = Date.now() + L.restartPointCutMsMax;
    for (let round = 0; ; round++) {
      while (this.building) await this.building.catch(() => null);
      const p = this.cutOnce({ ...options, whole: true });
      this.building = p;
      let n: number | null | 'not-whole';
      try {
        n = await p;
      } finally {
        if (this.building === p) this.building = null;
      }
      if (typeof n === 'number') return n;
      if (n === 'not-whole') {
        // More than one set's worth waits: ship part of it as an ordinary set first.
        const part = await this.cutSerial({ reason: 'backlog before a restart point' });
        if (part !== null) continue;
      }
      if (Date.now() > deadline) {
        throw new DeltavolError(
          'SAVE_AREA_FULL',
          `no snapshot taken: the outbound save area has no room for the ${this.volume.unshippedBlockCount()} changed blocks a restart point must carry (${round} rounds in ${L.restartPointCutMsMax / 1000} s); is the replica reachable?`,
        );
      }
      await new Promise((r) => setTimeout(r, 100)); // acknowledgements free space
    }
  }

  private async cutOnce(options: CutRequest & { whole?: boolean }): Promise<number | null | 'not-whole'> {
    assert(!this.closed, 'replicator closed');
    // (Another pair may have been added meanwhile: then its sets are needed, cut normally.)
    if (options.forget && this.state.pairs.length === 0) {
      assert(options.snapshotName !== undefined, 'forget only for a base snapshot');
      await this.volume.snapshotAndForget(options.snapshotName, this.log.lastSet);
      this.lastCutMs = Date.now();
      this.firstChangeMs = null;
      return this.log.lastSet;
    }
    const bs = this.volume.blockBytes;
    const blocksTotal = this.volume.blocksTotal;
    const changed = this.volume.changedBlockCount();
    // Connected pairs with blocks to catch up on (after a detach or a split) get them in this set.
    const catchUps = this.state.pairs.filter((p) => this.senders.get(p.id)?.connected && (p.detached || this.pending.get(p.id)!.count() > 0));
    if (changed === 0 && catchUps.length === 0 && !options.force) return null;
    const wanted = new PagedBitmap(blocksTotal);
    for (const p of catchUps) wanted.union(this.pending.get(p.id)!);
    let fit = this.log.blocksThatFit(bs);
    if (fit < wanted.count() + changed && this.detachStalled()) fit = this.log.blocksThatFit(bs);
    const setBlocksMax = Math.max(1, Math.floor(L.setBytesMax / bs));
    const room = Math.min(fit, setBlocksMax);
    if (room < (changed > 0 ? 2 : 1)) {
      this.outboundFull = true;
      return null;
    }
    // Catch-up blocks first (up to half the room when there are new changes too), then
    // as many changed blocks as fit; whatever is left travels in the next sets.
    const extraMax = changed > 0 ? Math.max(1, Math.floor(room / 2)) : room;
    const extra = firstBlocks(wanted, extraMax);
    const blocksMax = room - extra.count();
    const partial = changed > blocksMax || extra.count() < wanted.count();
    if (partial && options.whole) return 'not-whole';
    const n = this.log.lastSet + 1;
    const writer = this.log.beginSet(n, this.state.generation, bs, blocksTotal, partial);
    const before = Date.now();
    await this.volume.buildDeltaSet(n, writer, {
      ...(changed > blocksMax ? { blocksMax } : {}),
      ...(extra.count() > 0 ? { extra } : {}),
      ...(options.snapshotName !== undefined ? { snapshotName: options.snapshotName } : {}),
    });
    this.outboundFull = false;
    this.lastCutMs = before;
    this.firstChangeMs = this.volume.changedBlockCount() > 0 ? before : null;
    this.setsCut++;
    // Record first (a crash after it resends pending blocks: harmless), then shrink the
    // pending bitmaps of the pairs this set catches up, and grow those of detached pairs
    // that miss it (durable before the set can be released).
    const shrink: PairRecord[] = [];
    for (const p of this.state.pairs) {
      if (catchUps.includes(p)) {
        if (p.detached) p.catchUp = { set: n, from: p.ackedSet };
        p.detached = false;
        shrink.push(p);
      }
    }
    this.saveState();
    for (const p of this.state.pairs) {
      const bits = this.pending.get(p.id)!;
      if (shrink.includes(p)) bits.difference(writer.members);
      else if (p.detached) bits.union(writer.members);
      else continue;
      this.savePending(p.id);
    }
    const s = this.log.get(n)!;
    this.log_.debug({ set: n, blocks: s.blocks, bytes: s.dataBytes, partial, reason: options.reason, catchUps: catchUps.map((p) => p.id), ms: Date.now() - before }, 'delta set cut');
    for (const sender of this.senders.values()) sender.wake();
    this.releaseSets();
    return n;
  }

  // ================= status =================

  /** Age of the oldest change not yet played on pair p (the data it would lose now). */
  lagMs(p: PairRecord): number {
    const now = Date.now();
    let oldest: number | null = null;
    if (p.detached) {
      const first = this.log.sets.find((s) => s.set > p.ackedSet);
      oldest = first?.createdAtMs ?? this.lastCutMs;
    } else {
      for (const s of this.log.sets) {
        // (A set at or below the acked chain head but skipped by a catch-up is not this pair's.)
        if (s.set > p.playedSet && (!p.catchUp || s.set > p.ackedSet)) {
          oldest = s.createdAtMs;
          break;
        }
      }
    }
    if (oldest === null && this.volume.unshippedBlockCount() > 0) oldest = this.firstChangeMs ?? this.lastCutMs;
    if (!p.initialCopy.done) oldest = Math.min(oldest ?? now, Date.parse(p.createdAt));
    return oldest === null ? 0 : Math.max(0, now - oldest);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.timer);
    await Promise.all([...this.senders.values()].map((s) => s.stop()));
    while (this.building) await this.building.catch(() => null);
    this.log.close();
  }
}

/** The first `max` set bits of `bits` (block order). */
function firstBlocks(bits: PagedBitmap, max: number): PagedBitmap {
  if (bits.count() <= max) return bits;
  const out = new PagedBitmap(bits.bitsTotal);
  let left = max;
  for (const [s, c] of bits.runs()) {
    const k = Math.min(c, left);
    out.setRange(s, k);
    left -= k;
    if (left === 0) break;
  }
  return out;
}

function pendingFile(id: string): string {
  return `pair-${id}.pending`;
}
