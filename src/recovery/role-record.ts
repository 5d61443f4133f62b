// Why: what a volume is in a replication topology — simplex, primary or replica, at which
// generation, fenced or not, taken over from whom — decides whether a byte may change
// and which side's data wins. A split owner is how data gets lost (two files that
// disagree about the generation, a read-only flag anyone can flip). So this file is the
// one owner of that state per volume: one durable record (role.json, replaced atomically)
// and one transition function that checks the move is legal, persists it and logs it.
// Everything else — NBD write access, status, metrics, the replication link — reads it.
//
// Roles and states (DESIGN.md "Pair states", "Disaster recovery"):
//   simplex  no pairs.
//   primary  ships to `pairs`; `fenced` when it learned that a newer generation of its
//            volume exists elsewhere (it ships nothing, and refuses writes until an operator
//            resyncs it, or unfences it: `overridden`, two primaries that diverge);
//            `handover` while a planned swap is under way (writes held);
//            `failover` while the old primary it replaced has not been resynced;
//            `restore` while it is rolled back to its replica's content (writes refused).
//   replica  receives from `upstream` (read-only to clients, but during an operator split);
//            with `pairs` of its own it is the middle of a cascade (seed 002: A → B → C),
//            forwarding what it plays in delta sets of its own, asynchronously.
// Generation: starts at 1, moves only forward: +1 at a failover or a planned takeover,
// adopted from the peer when this node becomes its replica. Every change is appended to
// `history` (the generation history, as DRBD keeps one).
//
// Progress (sets acknowledged and played, initial-copy offsets, the primary's last report)
// lives in the same record but is not a role change: its owners (replicator, replica)
// change those fields in place and call saveProgress(), which checks the invariants again.

import { assert } from '../util/assert.js';
import { DeltavolError } from '../util/errors.js';
import type { DurableFs } from '../util/durable-fs.js';
import type { Logger } from '../util/log.js';
import type { WriteAccess } from '../volume/volume.js';

export type { WriteAccess };

export const ROLE_FILE = 'role.json';
const HISTORY_MAX = 32;

export type Role = 'simplex' | 'primary' | 'replica';

export interface PairConfig {
  peerHost: string;
  peerPort: number;
  remoteVolume: string;
  cutIntervalMs: number;
  highWaterBytes: number;
  retriesBeforeSuspend: number;
  /**
   * The replica's proven identity (TLS: `psk:NAME` or `x509:CN`), bound to the pair at
   * its first session (or at its creation by a resync or a takeover); later sessions and
   * the recovery messages of the pair must come from it. Absent/null: never seen over TLS.
   */
  peerIdentity?: string | null;
  /**
   * 'sync': a client's write is acknowledged only once the replica has it, a flush only
   * once it is durable there (sync-stream.ts). Absent: 'async' (delta sets only).
   */
  mode?: 'async' | 'sync';
  /** Sync pairs, replica out of reach: 'never' keeps serving (the pair degrades to sets), 'data' fails writes with EIO. */
  fence?: 'never' | 'data';
  /** Sync pairs: a write not acknowledged by the replica within this long stops the stream. */
  syncTimeoutMs?: number;
}

export interface InitialCopyRecord {
  done: boolean;
  baseSet: number;
  baseSnapshot: string | null;
  /** Bytes the copy moves (valid blocks of the base, or the differential's blocks). */
  totalBytes: number;
  /**
   * 'full': every valid block of the base (a fresh replica, all zeroes). 'differential':
   * only the blocks of the pair's copy file (a resync), invalid ones sent as zeroes.
   * 'everything': every block, invalid ones as zeroes (a full resync of a used volume).
   */
  kind: 'full' | 'differential' | 'everything';
  /** When the base was cut (this node's clock): the replica's writes are all here before it. */
  baseCutAtMs?: number;
}

/** One pair this primary ships to: identity, settings and progress. */
export interface PairRecord extends PairConfig {
  id: string;
  createdAt: string;
  /** Last set the replica holds durably (its chain head); the log keeps every later one. */
  ackedSet: number;
  playedSet: number;
  initialCopy: InitialCopyRecord;
  operatorSuspended: boolean;
  /** Holds no log space: everything it misses is in its pending bitmap. */
  detached: boolean;
  catchUp: { set: number; from: number } | null;
  /**
   * The middle of a cascade: the last set of its own primary that this replica holds whole
   * (the upstream set the last whole set it played covered); reported upstream so the
   * primary can later ship to it directly from there (seed 002). Absent: unknown.
   */
  upstreamPlayed?: number;
  /** When that upstream set was cut on its primary (that primary's clock; null: unknown). */
  upstreamPlayedCutAtMs?: number | null;
  /** The oldest change among its pending blocks (they are at risk since then); absent or null: none known. */
  pendingSinceMs?: number | null;
}

/** The pair this replica receives from. */
export interface UpstreamRecord {
  pairId: string;
  /**
   * The primary's proven identity, bound when the pair was created here: later hellos of
   * the pair are accepted only from it (absent/null: created without TLS, bound at the
   * first authenticated session).
   */
  peerIdentity?: string | null;
  primaryVolume: string;
  playedSet: number;
  initialCopy: { done: boolean; offsetBytes: number; baseSet: number };
  /** Equals the primary at a point in time (false during a copy and after a partial set). */
  consistent: boolean;
  /** Operator split (seed 003): writable, its own writes recorded for the next hello. */
  split: boolean;
  /**
   * A sync stream was applying writes (sync-stream.ts): until it ends cleanly, a crash may
   * leave writes after the last barrier torn, so a restart finds the volume not consistent.
   */
  streaming?: boolean;
  /** The pair is sync (its primary said so when a stream started): a role swap keeps it sync. */
  sync?: PairSyncSettings | null;
  /** When the current split began (the primary's writes since are not here). */
  splitAtMs?: number | null;
  createdAt: string;
  /** Set while this replica is a resynced old primary whose differential copy is not done. */
  resync: ResyncRecord | null;
  /** When the last set played was cut on the primary (writes after it are not here). */
  playedCutAtMs: number | null;
  /**
   * When the last whole set played here (or stream barrier, or the initial copy's base) was
   * cut on the primary: every write acknowledged before it is here, whatever was played or
   * lost after it (a partial set, a sync stream cut by a restart). Absent in older records.
   */
  wholeCutAtMs?: number | null;
  /** The primary's last progress report (kept so a failover after a restart can still say what it loses). */
  lastReport: { lastSet: number; atRiskSinceMs: number | null; bytesDifferent: number; atMs: number; primaryAtMs: number; heldSet?: number } | null;
}

export interface ResyncRecord {
  /** The new primary's replication address (where this node registers the resync). */
  peerHost: string;
  peerPort: number;
  /** The pair this node shipped to before (the new primary took over from it; '' when forgotten). */
  fromPairId: string;
  /** The new primary accepted the registration (it now dials this node). */
  registered: boolean;
  /** Every block is copied (this node's history since the restart point is gone). */
  full: boolean;
  reason: string;
  /** Blocks this node had changed since the restart point (kept in beforeSnapshot). */
  divergentBlocks: number;
  beforeSnapshot: string | null;
  restartSet: number;
  startedAtMs: number;
}

/** How this primary came to be one by taking over (kept until its old primary is resynced). */
/** What makes a pair sync, carried over when the roles swap (failover, failback, handover). */
export interface PairSyncSettings {
  fence: 'never' | 'data';
  timeoutMs: number;
}

/** The sync settings as a pair's config (empty for an async pair). */
export function syncConfigOf(s: PairSyncSettings | null | undefined): Pick<PairConfig, 'mode' | 'fence' | 'syncTimeoutMs'> {
  return s ? { mode: 'sync', fence: s.fence, syncTimeoutMs: s.timeoutMs } : {};
}

export interface FailoverRecord {
  kind: 'unplanned' | 'planned';
  /** The pair (and volume) this node was the replica of. */
  fromPairId: string;
  fromVolume: string;
  /** The old primary's proven identity (its resync is accepted only from it; absent/null: unknown). */
  fromIdentity?: string | null;
  generationBefore: number;
  atMs: number;
  /** Restart point: a snapshot equal to the old primary as of set `restartSet` (null: none). */
  restartSnapshot: string | null;
  restartSet: number;
  /** Last set this node held whole (it acknowledged up to here). */
  knownUpTo: number;
  /** Blocks of sets held but not played (failover --now): they travel at resync. */
  unplayedBlocks: number;
  /** The pair made for the old primary when it resynced (null until then). */
  resyncPairId: string | null;
  /** What may have been lost (the data-loss report shown at failover). */
  report: LossReport | null;
  /** The pair was sync: the pair to the old primary (resync) is too. */
  sync?: PairSyncSettings | null;
}

export interface LossReport {
  /**
   * Every write the old primary acknowledged before this time (its clock) is here; later
   * ones may be missing. At the latest the time of its last progress report, since what it
   * did after that is unknown here. Null: it never reported (nothing is known).
   */
  atRiskSinceMs: number | null;
  /** Last time the old primary was heard from. */
  lastContactMs: number | null;
  /** atRisk window in seconds (lastContact - atRiskSince), 0 when nothing was at risk. */
  seconds: number;
  /** Sets the old primary had cut that never completed here. */
  setsNotHere: number[];
  /** Sets received whole but not played (failover --now). */
  setsDropped: number[];
  /** At most this many bytes differ from the old primary at its last report. */
  bytesAtMost: number;
  /** The volume equals the old primary at a point in time (no partial set in the middle). */
  consistent: boolean;
}

export interface FenceRecord {
  /** The newer generation this volume learned of, and where. */
  generation: number;
  peer: string;
  reason: string;
  atMs: number;
  /** The operator unfenced it: it takes writes (two primaries now) but still ships nothing. */
  overridden?: boolean;
}

/** A planned swap under way on the primary (writes held until it commits or aborts). */
export interface HandoverRecord {
  pairId: string;
  newPairId: string;
  newGeneration: number;
  /** The replica's set number its new pair starts from (it becomes this node's playedSet). */
  peerBaseSet: number;
  /** Last set shipped before the swap (the replica has played it when the swap commits). */
  lastSet: number;
  /** The replica was told it may take over: from here only its answer ends the handover. */
  offered: boolean;
  atMs: number;
}

/**
 * A restore of this primary from its replica under way (seed 003): its blocks are being
 * overwritten with the replica's, so clients may not write until it ends. Kept across a
 * crash: running the restore again finishes it (the same replica snapshot, the same local
 * snapshot of the state before).
 */
export interface RestoreRecord {
  pairId: string;
  /** The replica's snapshot restored (null: its current state, in a snapshot of the moment). */
  snapshot: string | null;
  /** This volume's state before the restore, kept here. */
  beforeSnapshot: string;
  atMs: number;
}

/**
 * A replica of one of this volume's replicas (a cascade A → B → C, seen from A): where C
 * is, as B reported, and from which of A's sets A can ship to C directly if B is lost
 * (replication/distant.ts keeps the blocks changed since, in bitmap files).
 */
export interface DistantRecord {
  /** A's pair to the middle (B) that forwards to it. */
  viaPairId: string;
  /** B's pair to it (its upstream pair id on C). */
  pairId: string;
  volume: string;
  /** Its replication address as B reaches it. */
  peer: string;
  /** The last of A's sets it holds whole, as B last reported. */
  confirmedSet: number;
  /** The bitmaps hold every block A changed after set fromSet (older: up to splitSet). */
  fromSet: number;
  splitSet: number;
  /** A began tracking it at this set: a position before it cannot be caught up from here. */
  trackedFrom: number;
  atMs: number;
}

export interface RoleHistoryEntry {
  generation: number;
  role: Role;
  event: string;
  atMs: number;
}

export interface RoleState {
  version: 1;
  role: Role;
  generation: number;
  history: RoleHistoryEntry[];
  pairs: PairRecord[];
  upstream: UpstreamRecord | null;
  fenced: FenceRecord | null;
  handover: HandoverRecord | null;
  failover: FailoverRecord | null;
  /** Absent in records written before restores existed: none. */
  restore?: RestoreRecord | null;
  /** Replicas of this volume's replicas (cascade), kept in place by the replicator. Absent: none. */
  distant?: DistantRecord[];
}

export type RoleEvent =
  | { t: 'pair-added'; pair: PairRecord }
  | { t: 'pair-removed'; pairId: string }
  | { t: 'replica-created'; upstream: UpstreamRecord; generation: number }
  | { t: 'generation-adopted'; generation: number }
  | { t: 'split-started'; atMs: number }
  | { t: 'split-ended' }
  | { t: 'failed-over'; failover: FailoverRecord }
  | { t: 'fenced'; fence: FenceRecord }
  | { t: 'unfenced' }
  | { t: 'resync-started'; upstream: UpstreamRecord; generation: number; reparent?: boolean }
  | { t: 'resync-registered' }
  | { t: 'resync-finished' }
  | { t: 'failover-pair-set'; pairId: string }
  | { t: 'failover-closed' }
  | { t: 'handover-prepared'; handover: HandoverRecord }
  | { t: 'handover-aborted'; reason: string }
  | { t: 'handed-over'; upstream: UpstreamRecord }
  | { t: 'took-over'; pair: PairRecord; failover: FailoverRecord; generation: number }
  | { t: 'restore-started'; restore: RestoreRecord }
  | { t: 'restore-finished' };


export function emptyRoleState(): RoleState {
  return { version: 1, role: 'simplex', generation: 1, history: [], pairs: [], upstream: null, fenced: null, handover: null, failover: null, restore: null };
}

function fail(message: string): never {
  throw new DeltavolError('ROLE_CONFLICT', message);
}

/**
 * The next record after `e`, or a ROLE_CONFLICT error when the move is not legal from
 * `s`. Pure: persistence and logging are the caller's (RoleRecord.transition).
 */
export function nextRoleState(s: RoleState, e: RoleEvent): RoleState {
  const n: RoleState = structuredClone(s);
  switch (e.t) {
    case 'pair-added':
      if (s.fenced) fail('a fenced volume cannot get new replicas: resync it first');
      if (s.handover) fail('a planned handover is under way');
      if (s.role === 'replica' && s.upstream!.resync) fail('a replica being resynced cannot get replicas of its own yet');
      if (s.role === 'replica' && e.pair.mode === 'sync') fail('a replica forwards to its own replicas asynchronously only (a cascade: sync to the middle site, async from there)');
      assert(!s.pairs.some((p) => p.id === e.pair.id), 'pair ids are unique');
      // A replica with pairs of its own is the middle of a cascade: it stays a replica.
      if (s.role !== 'replica') n.role = 'primary';
      n.pairs.push(e.pair);
      break;
    case 'pair-removed':
      assert(s.pairs.some((p) => p.id === e.pairId), `no pair ${e.pairId}`);
      if (s.restore?.pairId === e.pairId) fail('a restore from this pair is under way: finish it (`deltavol restore` again) or abandon it (`--abandon`) first');
      n.pairs = n.pairs.filter((p) => p.id !== e.pairId);
      if (n.pairs.length === 0 && !n.failover && !n.fenced && s.role === 'primary') n.role = 'simplex';
      break;
    case 'replica-created':
      if (s.role !== 'simplex' || s.pairs.length > 0) fail('only a volume without pairs can become a replica');
      n.role = 'replica';
      n.upstream = e.upstream;
      n.generation = Math.max(s.generation, e.generation);
      break;
    case 'generation-adopted':
      if (s.role !== 'replica') fail('only a replica adopts its primary\'s generation');
      if (e.generation < s.generation) fail(`generation ${e.generation} is older than ${s.generation}`);
      n.generation = e.generation;
      break;
    case 'split-started':
    case 'split-ended':
      if (s.role !== 'replica' || !s.upstream) fail('only a replica can be split');
      n.upstream!.split = e.t === 'split-started';
      n.upstream!.splitAtMs = e.t === 'split-started' ? e.atMs : null;
      break;
    case 'failed-over':
      if (s.role !== 'replica' || !s.upstream) fail('only a replica can fail over');
      n.role = 'primary';
      n.generation = s.generation + 1;
      n.upstream = null;
      n.failover = e.failover;
      // (A cascade's middle keeps its own replicas: they follow it as the new primary.)
      break;
    case 'fenced':
      if (s.role !== 'primary') fail('only a primary is fenced');
      if (e.fence.generation <= s.generation) fail(`generation ${e.fence.generation} is not newer than ${s.generation}`);
      n.fenced = e.fence;
      break;
    case 'unfenced':
      if (!s.fenced || s.fenced.overridden) fail('the volume is not fenced');
      n.fenced = { ...s.fenced, overridden: true };
      break;
    case 'resync-started':
      // (A replica may move to another primary: the end of a cascade whose middle was lost.)
      if (s.role === 'replica' && !e.reparent) fail('the volume is already a replica');
      if (e.reparent && (s.role !== 'replica' || s.upstream!.split || s.upstream!.resync || s.pairs.length > 0)) fail('only a replica that is not split, not resyncing and forwards to nobody moves to another primary');
      n.restore = null; // (the resync overwrites this side anyway: its before-snapshot keeps it)
      // (Equal: two copies that failed over independently; the operator chose the survivor.)
      if (e.generation < s.generation) fail(`the new primary's generation ${e.generation} is older than this volume's ${s.generation}`);
      n.role = 'replica';
      n.generation = e.generation;
      n.upstream = e.upstream;
      n.pairs = [];
      n.fenced = null;
      n.failover = null;
      n.handover = null;
      break;
    case 'resync-registered':
      if (!s.upstream?.resync) fail('no resync under way');
      n.upstream!.resync!.registered = true;
      break;
    case 'resync-finished':
      if (!s.upstream?.resync) fail('no resync under way');
      n.upstream!.resync = null;
      break;
    case 'failover-pair-set':
      if (!s.failover) fail('this volume did not take over from another');
      n.failover!.resyncPairId = e.pairId;
      break;
    case 'failover-closed':
      if (!s.failover) fail('this volume did not take over from another');
      n.failover = null;
      if (n.pairs.length === 0) n.role = 'simplex';
      break;
    case 'handover-prepared':
      if (s.role !== 'primary' || s.fenced) fail('only an unfenced primary can hand over');
      if (s.restore) fail('a restore from the replica is under way: run it again to finish it first');
      if (s.handover) fail('a handover is already under way');
      if (e.handover.newGeneration !== s.generation + 1) fail('a handover moves the generation by one');
      n.handover = e.handover;
      break;
    case 'handover-aborted':
      if (!s.handover) fail('no handover under way');
      n.handover = null;
      break;
    case 'handed-over':
      if (!s.handover) fail('no handover under way');
      n.role = 'replica';
      n.generation = s.handover.newGeneration;
      n.upstream = e.upstream;
      n.pairs = [];
      n.handover = null;
      n.failover = null;
      break;
    case 'took-over':
      if (s.role !== 'replica' || !s.upstream) fail('only a replica can take over');
      if (e.generation !== s.generation + 1) fail('a takeover moves the generation by one');
      n.role = 'primary';
      n.generation = e.generation;
      n.upstream = null;
      n.pairs = [...s.pairs, e.pair];
      n.failover = e.failover;
      break;
    case 'restore-started':
      if (s.role !== 'primary' || s.fenced) fail('only an unfenced primary is restored from its replica');
      if (s.handover) fail('a planned handover is under way');
      if (s.restore && s.restore.pairId !== e.restore.pairId) fail(`a restore from pair ${s.restore.pairId} is under way: finish it first`);
      if (!s.pairs.some((p) => p.id === e.restore.pairId)) fail(`no pair ${e.restore.pairId}`);
      n.restore = e.restore;
      break;
    case 'restore-finished':
      if (!s.restore) fail('no restore under way');
      n.restore = null;
      break;
  }
  if (n.role !== s.role || n.generation !== s.generation || e.t === 'fenced' || e.t === 'unfenced') {
    n.history.push({ generation: n.generation, role: n.role, event: e.t, atMs: historyTime(e) });
    if (n.history.length > HISTORY_MAX) n.history.splice(0, n.history.length - HISTORY_MAX);
  }
  roleInvariants(n);
  return n;
}

function historyTime(e: RoleEvent): number {
  switch (e.t) {
    case 'failed-over':
      return e.failover.atMs;
    case 'fenced':
      return e.fence.atMs;
    case 'took-over':
      return e.failover.atMs;
    default:
      return 0; // filled in by RoleRecord with its clock
  }
}

export function roleInvariants(s: RoleState): void {
  assert(s.version === 1, 'role record version');
  assert(Number.isSafeInteger(s.generation) && s.generation >= 1, 'generation ≥ 1');
  assert((s.role === 'replica') === (s.upstream !== null), 'a replica, and only a replica, has an upstream pair');
  assert(s.role !== 'replica' || s.pairs.every((p) => p.mode !== 'sync'), 'a replica forwards asynchronously only');
  assert(s.role !== 'simplex' || (s.pairs.length === 0 && s.failover === null && s.fenced === null), 'a simplex volume has no pairs, failover or fence');
  assert(s.fenced === null || s.role === 'primary', 'only a primary is fenced');
  assert(s.handover === null || (s.role === 'primary' && s.pairs.some((p) => p.id === s.handover!.pairId)), 'a handover belongs to a pair of a primary');
  assert(!s.restore || s.role === 'primary', 'only a primary is restored from its replica');
  assert(new Set(s.pairs.map((p) => p.id)).size === s.pairs.length, 'pair ids are unique');
  for (let i = 1; i < s.history.length; i++) assert(s.history[i]!.generation >= s.history[i - 1]!.generation, 'generations only move forward');
}

/** Write access clients get, from the record alone. */
export function writeAccessOf(s: RoleState): WriteAccess {
  if (s.role === 'replica') {
    if (s.upstream!.split) return { mode: 'open' };
    return { mode: 'refuse', code: 'REPLICA', reason: `it is a replica of ${s.upstream!.primaryVolume} (generation ${s.generation}); \`deltavol failover\` makes it a primary` };
  }
  if (s.fenced && !s.fenced.overridden) {
    return {
      mode: 'refuse',
      code: 'FENCED',
      reason: `it was replaced by a newer primary (generation ${s.fenced.generation} at ${s.fenced.peer}); \`deltavol resync\` makes it that primary's replica, \`deltavol unfence\` writes anyway`,
    };
  }
  if (s.handover) return { mode: 'hold', reason: `a planned handover to generation ${s.handover.newGeneration} is under way` };
  if (s.restore) return { mode: 'refuse', code: 'RESTORING', reason: `it is being restored from its replica (\`deltavol restore\` finishes it)` };
  return { mode: 'open' };
}

/**
 * The one owner of a volume's role record. Listeners (the volume's write access, the
 * replication service) are told after every transition, once it is durable.
 */
export class RoleRecord {
  private listeners: ((s: Readonly<RoleState>, e: RoleEvent | null) => void)[] = [];

  private constructor(
    private readonly fsys: DurableFs,
    private s: RoleState,
    private readonly log: Logger,
    private readonly now: () => number,
  ) {}

  /** Opens the record (an empty simplex one when the volume never had one). */
  static open(fsys: DurableFs, log: Logger, now: () => number): RoleRecord {
    const raw = fsys.readAll(ROLE_FILE);
    let s: RoleState;
    if (raw === null) s = emptyRoleState();
    else {
      try {
        s = JSON.parse(raw.toString('utf8')) as RoleState;
      } catch (e) {
        throw new DeltavolError('METADATA_CORRUPT', `${ROLE_FILE}: ${(e as Error).message}`);
      }
      if (s.version !== 1) throw new DeltavolError('METADATA_CORRUPT', `${ROLE_FILE}: unknown version ${String(s.version)}`);
      roleInvariants(s);
    }
    return new RoleRecord(fsys, s, log, now);
  }

  get state(): Readonly<RoleState> {
    return this.s;
  }
  get role(): Role {
    return this.s.role;
  }
  get generation(): number {
    return this.s.generation;
  }
  get writeAccess(): WriteAccess {
    return writeAccessOf(this.s);
  }
  /** The pair records, to update progress in place (then saveProgress()). */
  get pairs(): PairRecord[] {
    return this.s.pairs;
  }
  get upstream(): UpstreamRecord | null {
    return this.s.upstream;
  }
  /** Replicas of replicas (cascade), to update in place (then saveProgress()). */
  get distant(): DistantRecord[] {
    return (this.s.distant ??= []);
  }

  onChange(fn: (s: Readonly<RoleState>, e: RoleEvent | null) => void): void {
    this.listeners.push(fn);
  }

  /** The one way role, generation, fence, handover and failover change. */
  transition(e: RoleEvent, fields: Record<string, unknown> = {}): Readonly<RoleState> {
    const before = this.s;
    const next = nextRoleState(before, e);
    const last = next.history[next.history.length - 1];
    if (last && last.atMs === 0) last.atMs = this.now();
    // Senders hold their pair's record: a transition keeps each surviving record's identity.
    next.pairs = next.pairs.map((p) => {
      const held = before.pairs.find((x) => x.id === p.id);
      return held ? Object.assign(held, p) : p;
    });
    if (next.upstream && before.upstream && next.upstream.pairId === before.upstream.pairId) next.upstream = Object.assign(before.upstream, next.upstream);
    this.persist(next);
    this.s = next;
    const level = e.t === 'fenced' || e.t === 'failed-over' || e.t === 'handover-aborted' ? 'warn' : 'info';
    this.log[level](
      { event: e.t, role: next.role, generation: next.generation, ...(before.role !== next.role ? { from: before.role } : {}), ...(before.generation !== next.generation ? { fromGeneration: before.generation } : {}), ...fields },
      `role: ${e.t}`,
    );
    for (const l of this.listeners) l(next, e);
    return next;
  }

  /** Progress fields changed in place (acks, plays, copy offsets): make them durable. */
  saveProgress(): void {
    roleInvariants(this.s);
    this.persist(this.s);
  }

  private persist(s: RoleState): void {
    this.fsys.writeAtomic(ROLE_FILE, Buffer.from(JSON.stringify(s, null, 1)));
  }
}
