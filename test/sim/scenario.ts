// Why: one simulated run of two (or three) deltavol nodes (TigerBeetle's VOPR loop, for
// replication and disaster recovery). Its seed picks the options (options.ts) and every
// step, each chosen among those that make sense for the roles the nodes hold now: client
// writes (sequential, acknowledged after write + flush), cuts, snapshots, link faults,
// crashes at any instant and restarts, and the operator's recovery commands (failover,
// --now, --force, --sync, failback, resync, unfence). Role changes are observed from the
// durable role records and checked against models of acknowledged writes (model.ts):
//   (a) a node that stays primary across its own crashes loses no acknowledged write;
//   (b) after an unplanned failover the new primary equals the old one at a prefix of its
//       writes, holding every write acknowledged before the report's atRiskSinceMs;
//   (c) a planned takeover (failover --sync, failback) loses nothing;
//   (d) a resync keeps the old primary's content in its before-resync snapshot;
//   continuous: primaries equal their model, replicas show a state their primary had,
//   snapshots keep their content; and
//   (e) liveness: faults off, every node up, the pair converges (duplex, nothing
//       outstanding) and both volumes equal the primary's model byte for byte.
// A run's trace (steps, role changes, results) is hashed: same seed, same hash.

import crypto from 'node:crypto';
import type { RoleState } from '../../src/recovery/role-record.js';
import type { ReplicationService } from '../../src/replication/service.js';
import { prng } from '../helpers/seed.js';
import { replicationSilenceMs, replicatorTickMs } from '../../src/replication/limits.js';
import { SimTime, simEpochMs, simSleep } from './time.js';
import { SimNetwork } from './network.js';
import { SimNode, replPort, type Incarnation } from './node.js';
import type { CrashMode } from './disk.js';
import { decode, diffSectors, GARBAGE, SECTOR, Timeline, writeData } from './model.js';
import { BLOCK_BYTES, pickOptions, type ScenarioOptions, type StepWeights } from './options.js';

/** Virtual time a setup or a command may take before the run is declared stuck (ms). */
const setupMsMax = 120_000;
/** Liveness: virtual time the pair has to converge once faults are off (ms). */
const livenessMsMax = 900_000;
/** Writes one run issues at most. */
const writesMax = 20_000;
/** Events one run fires at most (a runaway is a failure, not a hang). */
const eventsMax = 600_000;
/** A resync not registered this long after the fault-free phase began is retried by the operator (ms). */
const reregisterAfterMs = 30_000;

export interface RunFlags {
  /** Production log lines in the trace (slow). */
  logs?: boolean;
  /**
   * Failure classes already reported (see KNOWN_ISSUES): counted and logged, but the run
   * goes on instead of failing, so a soak keeps looking for new ones.
   */
  known?: ReadonlySet<string>;
}

/**
 * Failure classes the simulator recognises: production bugs it found, what each means, and
 * the commit that fixed it (a fixed class is a regression again: never tolerated).
 */
export const KNOWN_ISSUES: Record<string, { what: string; fixedIn?: string }> = {
  'report-after-last-report': {
    what: 'failover report: writes the old primary acknowledged after its last progress report (or, since a86d714, with no report received at all: after a planned takeover, before the first heartbeat) are lost, but the report says nothing (or less) was at risk (failover.ts lossReport: no report → atRiskSinceMs null; seed 5300991, fixed in 68f3f44: a --now failover that dropped only sets received after the last report set that report aside too)',
    fixedIn: '687b92a',
  },
  'report-restart': {
    what: 'failover report: writes the old primary acknowledged before a restart of it and never shipped are lost, but the report puts the start of the risk at the restart. Since a86d714 only when no set was committed since the pair\'s base: the first pair\'s cut (cutOnce with forget: snapshotAndForget) sets lastCutMs in memory but not outbound.json\'s lastCutAtMs, so the restarted replicator dates the changes from its start (seeds 60052, 60492)',
    fixedIn: '4e2cac2',
  },
  'no-resync-after-planned': {
    what: 'an old primary that diverged after a planned takeover (unfenced while its handover was offered and the replica had committed) can never be resynced: the new primary refuses "did not fail over from another primary" (resync.ts offer() accepts only an unplanned failover record)',
    fixedIn: '5c77102',
  },
  'activity-log-livelock': {
    what: 'activity log livelock: concurrent writers that together need more extents than the hot set holds, each needing one hot and one cold extent, evict each other forever (activity-log.ts commitExtents evicts the hot half of every waiting writer)',
    fixedIn: '6cbaf41',
  },
  'inbound-pause-deadlock': {
    what: 'replica flow-control deadlock: a replica holding complete sets it cannot play (the set before them is missing) above inboundBytesMax stops reading the link for good, so the missing set never arrives and its own heartbeat closes every session as "peer silent" (replica.ts onFrame pause/resume; only reachable when inboundBytesMax is below what the send window lets through)',
    fixedIn: '687b92a',
  },
  'failover-halt-race': {
    what: 'failover: ReplicaVolume.halt() races the background playback (startPlaying\'s finally kicks the next set while halt iterates): a set can be played twice at once, and one can still be playing when halt returns, so the restart snapshot is taken mid-set and playback writes land on the volume after it became the primary',
    fixedIn: '687b92a',
  },
  'unfence-offered-handover': {
    what: 'unfence calls off a handover the primary had already offered: the primary takes writes again while the offer is still on its way, the replica commits the takeover later and becomes the primary without those writes, reporting lostWrites 0 (handover.ts unfence() on an offered handover; the old primary then cannot be resynced either, see no-resync-after-planned)',
    fixedIn: '5c77102',
  },
  'frame-length-stall': {
    what: 'a flipped bit in a frame\'s length field stalls the link: the prefix checksum is checked only once msgBytes (up to 1 MiB) or dataBytes (up to 16 MiB) bytes arrived (wire.ts FrameDecoder), and the heartbeat counts raw bytes as life (link.ts), so the peer\'s pings keep the dead stream "alive" while nothing is decoded, acknowledged or played for many minutes (seed 201761: msgBytes 262168)',
    fixedIn: '5c77102',
  },
  'equal-generation-split': {
    what: 'two replicas of one primary that fail over independently (three nodes) both become generation g+1: neither is newer and they share no pair, so neither fences the other (generations carry no tiebreaker; since 5c77102 the operator can resync one from the other, by a full copy, instead of deleting it)',
  },
  'resync-target-moved': {
    what: 'a replica whose resync the primary recorded, then lost by being a replica itself in between (three nodes), waits for a pair its primary no longer holds; the primary is at a newer generation by then, which the replica refuses in a hello (only a resync or handover raise it), so running the resync again cannot complete it: the operator replaces the copy (resync.ts registers once per resync; a re-registration that adopts the newer generation is not built)',
  },
  'report-tick': {
    what: 'failover report: the oldest unshipped write is up to one replicator tick (100 ms) older than the reported atRiskSinceMs (replicator.ts tick() notes the first change when it sees it)',
    fixedIn: 'a86d714',
  },
};

/** Classes still open (what `--known all` and the test run tolerate). */
export const OPEN_ISSUES: readonly string[] = Object.keys(KNOWN_ISSUES).filter((k) => !KNOWN_ISSUES[k]!.fixedIn);

export interface ScenarioStats {
  virtualMs: number;
  events: number;
  settleRounds: number;
  writesIssued: number;
  writesAcked: number;
  writesRefused: number;
  crashes: number;
  failovers: number;
  takeovers: number;
  resyncs: number;
  fullResyncs: number;
  /** `cut --snapshot` refused (e.g. SAVE_AREA_FULL): each checked to leave no snapshot. */
  cutSnapshotsRefused: number;
  unfences: number;
  checks: number;
  flips: number;
  converged: boolean;
}

export interface ScenarioResult {
  seed: number;
  ok: boolean;
  failures: string[];
  trace: string[];
  traceHash: string;
  options: ScenarioOptions;
  stats: ScenarioStats;
  /** Known simulator limits this run ran into (see the report), not failures. */
  gaps: string[];
  /** Known failure classes hit (tolerated or not). */
  known: Record<string, number>;
}

interface Op {
  kind: string;
  inc: Incarnation;
  startedMs: number;
}

interface Inflight {
  node: string;
  id: number;
  first: number;
  count: number;
  inc: Incarnation;
  /** Sector values before the write was issued (null until it is). */
  before: Int32Array | null;
}

interface ExpectedSnapshot {
  vec: Int32Array;
  what: string;
}

let runCounter = 0;

class StopRun extends Error {}

export class Scenario {
  readonly o: ScenarioOptions;
  readonly time = new SimTime();
  readonly net: SimNetwork;
  readonly nodes: SimNode[];
  private readonly rStep: () => number;
  private readonly rWrite: () => number;
  private readonly prefix: string;
  readonly trace: string[] = [];
  readonly failures: string[] = [];
  readonly gaps: string[] = [];
  private readonly models = new Map<string, Timeline | null>();
  /** Pair id → the timeline of the primary that ships it. */
  private readonly pairTimelines = new Map<string, Timeline>();
  /**
   * Cascade pairs of a middle that took over: its replica may still show a state of the
   * old primary's timeline from before the takeover (it lags): that timeline and how many
   * of its states came before the fork. Such states count as earlier than any of the new.
   */
  private readonly pairParents = new Map<string, { t: Timeline; before: number }>();
  private readonly roles = new Map<string, RoleState | null>();
  private readonly dirty = new Set<string>();
  private readonly expected = new Map<string, Map<string, ExpectedSnapshot>>();
  private readonly replicaCursor = new Map<string, number>();
  private readonly ops = new Map<string, Op>();
  private readonly downUntil = new Map<string, number>();
  private readonly starting = new Set<string>();
  /** Per node: the in-flight write when it crashed (until it is up again and checked). */
  private readonly crashInflight = new Map<string, Inflight | null>();
  /**
   * Writes issued and then failed (a sync pair's stream lost with fence data: EIO after the
   * local write), by node, since its last acknowledged (write + flush) write: never made
   * durable, so a crash may lose or tear them like the write in flight.
   */
  private readonly failedIssued = new Map<string, Inflight[]>();
  private readonly resyncIssuedMs = new Map<string, number>();
  /** Nodes whose resync the newest primary refused: the operator deletes and re-adds them. */
  private readonly unresyncable = new Set<string>();
  /** Nodes whose offered handover the operator called off with unfence (time). */
  private readonly unfencedOffered = new Map<string, number>();
  /** When each node's incarnations came up (a replicator's notion of time restarts there). */
  private readonly boots = new Map<string, number[]>();
  /** Known failure classes hit (class → occurrences). */
  readonly knownHits = new Map<string, number>();
  private readonly knownSet: ReadonlySet<string>;
  private inflight: Inflight | null = null;
  private writeId = 0;
  private writerStopped = false;
  private writerDone: Promise<void> = Promise.resolve();
  private snapCounter = 0;
  private stopped = false;
  private faultsOff = false;
  readonly stats: ScenarioStats = {
    virtualMs: 0,
    events: 0,
    settleRounds: 0,
    writesIssued: 0,
    writesAcked: 0,
    writesRefused: 0,
    crashes: 0,
    failovers: 0,
    takeovers: 0,
    resyncs: 0,
    fullResyncs: 0,
    cutSnapshotsRefused: 0,
    unfences: 0,
    checks: 0,
    flips: 0,
    converged: false,
  };

  constructor(
    seed: number,
    flags: RunFlags = {},
  ) {
    this.o = pickOptions(seed);
    this.knownSet = flags.known ?? new Set();
    const o = this.o;
    this.rStep = prng((seed ^ 0x0005_7e95) >>> 0);
    this.rWrite = prng((seed ^ 0x0077_1e55) >>> 0);
    const rNet = prng((seed ^ 0x00ae_7000) >>> 0);
    const rDisk = prng((seed ^ 0x00d1_5c00) >>> 0);
    // Volume names differ per node and per run in this process (fixed width, so sizes on
    // the wire do not depend on the counter), so no state keyed by name can leak between
    // nodes or runs (src/recovery kept such maps at module level until 402d615).
    this.prefix = `s${(seed >>> 0).toString(16).padStart(8, '0')}r${(runCounter++ & 0xfff).toString(16).padStart(3, '0')}`;
    this.net = new SimNetwork(this.time, rNet, o.net, (l) => this.log(l));
    const logSink = flags.logs ? (line: string) => this.trace.push(`      ${line}`) : null;
    const env = {
      time: this.time,
      net: this.net,
      rng: rDisk,
      disk: o.disk,
      tuning: o.tuning,
      config: { outboundBytes: o.outboundBytes, playbackDelayMs: o.playbackDelayMs, inboundBytesMax: o.inboundBytesMax },
      logSink,
      hooks: (node: SimNode) => ({
        onRoleWrite: () => this.dirty.add(node.name),
        warn: (m: string, f: Record<string, unknown>) => this.log(`${node.name}: engine warning: ${m} ${JSON.stringify(f)}`),
      }),
    };
    this.nodes = ['A', 'B', 'C'].slice(0, o.nodes).map((n) => new SimNode(n, env));
    for (const n of this.nodes) {
      this.models.set(n.name, null);
      this.roles.set(n.name, null);
      this.expected.set(n.name, new Map());
    }
    this.time.afterEvent = () => this.observe();
  }

  // ================= plumbing =================

  private get now(): number {
    return this.time.nowMs;
  }

  private log(line: string): void {
    // Volume names carry this process's run counter: the trace shows them as 'a' and 'b'.
    this.trace.push(`${((this.time.nowMs - simEpochMs) / 1000).toFixed(3)} ${line.split(this.prefix).join('')}`);
  }

  private fail(message: string): void {
    if (this.failures.length < 10) this.failures.push(`${((this.now - simEpochMs) / 1000).toFixed(3)}s ${message}`);
    this.log(`FAILURE: ${message}`);
    this.stopped = true;
  }

  /** A failure of a known class: fails the run unless that class is tolerated. */
  private issue(cls: string, message: string): void {
    this.knownHits.set(cls, (this.knownHits.get(cls) ?? 0) + 1);
    const fixed = KNOWN_ISSUES[cls]?.fixedIn;
    if (this.knownSet.has(cls) && !fixed) this.log(`known issue [${cls}]: ${message}`);
    else this.fail(`[${cls}${fixed ? `, fixed in ${fixed}: a regression` : ''}] ${message}`);
  }

  /** A known issue after which the pair cannot converge: the run ends here. */
  private blocking(cls: string, message: string): void {
    this.issue(cls, message);
    if (!this.stopped) {
      this.log(`run ends: known issue ${cls} blocks convergence`);
      this.stopped = true;
    }
  }


  vol(node: SimNode | string): string {
    const name = typeof node === 'string' ? node : node.name;
    return `${this.prefix}${name.toLowerCase()}`;
  }

  private node(name: string): SimNode {
    return this.nodes.find((n) => n.name === name)!;
  }

  /** The node holding volume `name` (each node's copy has its own name). */
  private nodeOfVolume(name: string | undefined): SimNode | undefined {
    return this.nodes.find((x) => this.vol(x) === name);
  }

  /** The primary a replica (as its role record says) receives from. */
  private primaryOf(s: RoleState | null | undefined): SimNode | undefined {
    return this.nodeOfVolume(s?.upstream?.primaryVolume);
  }

  /**
   * The timeline a replica's pair ships (the primary's model when that pair was made; a
   * replica left behind by a primary that moved on still follows that old timeline).
   */
  private timelineOf(s: RoleState | null | undefined): Timeline | undefined {
    const id = s?.upstream?.pairId;
    return id === undefined ? undefined : this.pairTimelines.get(id);
  }

  /**
   * Index of v among the states the replica's pair ships (-1: none of them); states of the
   * timeline before a cascade middle's takeover get negative indices (they come first).
   */
  private stateIndex(s: RoleState, t: Timeline, v: Int32Array): number {
    const k = t.prefixIndex(v);
    if (k >= 0) return k;
    const parent = this.pairParents.get(s.upstream?.pairId ?? '');
    if (!parent) return -1;
    const j = parent.t.prefixIndex(v);
    return j >= 0 && j < parent.before ? j - parent.before - 2 : -1;
  }

  /** The primary (not a replica) of the highest generation other than n, if any. */
  private newestPrimary(except?: SimNode): SimNode | undefined {
    let best: SimNode | undefined;
    for (const x of this.nodes) {
      const s = this.roles.get(x.name);
      if (x === except || !s || s.role === 'replica') continue;
      if (!best || s.generation > this.roles.get(best.name)!.generation) best = x;
    }
    return best;
  }

  private get sizeBytes(): number {
    return this.o.blocks * BLOCK_BYTES + this.o.tailSectors * SECTOR;
  }

  /** Advances virtual time by ms (events fire, role changes are observed). */
  private async advance(ms: number): Promise<void> {
    await this.quiesce();
    await this.time.runUntil(this.now + ms, () => this.stopped);
    this.guard();
  }

  /** Runs the world until cond() or maxMs passed; true if cond() held. */
  private async until(cond: () => boolean, maxMs: number): Promise<boolean> {
    const deadline = this.now + maxMs;
    await this.quiesce();
    while (!cond()) {
      if (this.stopped) return false;
      if (!(await this.time.step(deadline))) {
        this.time.nowMs = Math.max(this.now, deadline);
        return cond();
      }
      this.guard();
    }
    return true;
  }

  /** Lets what the simulator itself just started (a command, a boot) run to its first wait. */
  private async quiesce(): Promise<void> {
    await this.time.settle();
    this.observe();
    this.guard();
  }

  /** Runs the world until p settles (or maxMs); returns its value, or throws what it threw. */
  private async settle<T>(p: Promise<T>, maxMs: number, what: string): Promise<T> {
    let done = false;
    let value: T | undefined;
    let error: unknown = null;
    p.then(
      (v) => {
        done = true;
        value = v;
      },
      (e: unknown) => {
        done = true;
        error = e ?? new Error('rejected');
      },
    );
    if (!(await this.until(() => done, maxMs))) {
      if (!this.stopped) this.fail(`${what} did not finish within ${maxMs / 1000} virtual s`);
      throw new StopRun(what);
    }
    if (error !== null) throw error;
    return value as T;
  }

  private guard(): void {
    if (this.time.errors.length > 0) {
      const e = this.time.errors.splice(0)[0]!;
      this.fail(`uncaught exception in a callback: ${e.stack ?? e.message}`);
    }
    if (this.time.eventsFired > eventsMax) this.fail(`more than ${eventsMax} events: runaway: ${this.describe()}`);
  }

  /** Races a promise of an incarnation with its death (a dead node's promises may never settle). */
  private alive<T>(inc: Incarnation, p: Promise<T>): Promise<{ dead: true } | { dead: false; value: T }> {
    return Promise.race([p.then((value) => ({ dead: inc.dead, value }) as { dead: false; value: T }), inc.died.then(() => ({ dead: true }) as const)]).then((r) => (inc.dead ? { dead: true } : r));
  }

  // ================= roles =================

  private readRole(n: SimNode): RoleState | null {
    const inc = n.inc;
    if (!inc || inc.dead) return this.roles.get(n.name) ?? null;
    let raw: Buffer | null;
    try {
      raw = inc.host.stateFs(this.vol(n)).readAll('role.json');
    } catch {
      return null;
    }
    return raw ? (JSON.parse(raw.toString('utf8')) as RoleState) : null;
  }

  role(n: SimNode): RoleState | null {
    return this.roles.get(n.name) ?? null;
  }

  /** After every event: role records that were replaced are compared with the last ones seen. */
  private observe(): void {
    if (this.dirty.size === 0) return;
    const names = [...this.dirty];
    this.dirty.clear();
    for (const name of names) {
      const n = this.node(name);
      const next = this.readRole(n);
      const prev = this.roles.get(name) ?? null;
      this.roles.set(name, next);
      if (!next) continue;
      try {
        this.onRole(n, prev, next);
      } catch (e) {
        if (!(e instanceof StopRun)) this.fail(`checker error: ${(e as Error).stack}`);
      }
      const t = this.models.get(name);
      if (t && next.role === 'primary') for (const pair of next.pairs) if (!this.pairTimelines.has(pair.id)) this.pairTimelines.set(pair.id, t);
      // A cascade's middle forwards what it plays: its replica shows states of its primary's timeline.
      const up = next.role === 'replica' ? this.timelineOf(next) : undefined;
      if (up) for (const pair of next.pairs) if (!this.pairTimelines.has(pair.id)) this.pairTimelines.set(pair.id, up);
    }
  }

  private roleWord(s: RoleState | null): string {
    if (!s) return 'none';
    const extra = [s.fenced ? (s.fenced.overridden ? 'diverged' : 'fenced') : '', s.handover ? `handover${s.handover.offered ? '(offered)' : ''}` : '', s.failover ? `failover:${s.failover.kind}` : '', s.upstream?.resync ? `resync${s.upstream.resync.registered ? '' : '(unregistered)'}${s.upstream.resync.full ? '(full)' : ''}` : '']
      .filter(Boolean)
      .join(',');
    return `${s.role}/g${s.generation}${extra ? `[${extra}]` : ''}`;
  }

  private onRole(n: SimNode, prev: RoleState | null, next: RoleState): void {
    const moved = !prev || prev.role !== next.role || prev.generation !== next.generation || !!prev.fenced !== !!next.fenced || !!prev.fenced?.overridden !== !!next.fenced?.overridden || !!prev.handover !== !!next.handover || prev.handover?.offered !== next.handover?.offered || !!prev.failover !== !!next.failover || !!prev.upstream?.resync !== !!next.upstream?.resync || prev.upstream?.resync?.registered !== next.upstream?.resync?.registered;
    if (!moved) return;
    const last = next.history[next.history.length - 1];
    this.log(`${n.name}: role ${this.roleWord(prev)} -> ${this.roleWord(next)}${last ? ` (${last.event})` : ''}`);
    // Became a primary by taking over.
    if (prev?.role === 'replica' && next.role === 'primary' && next.failover) {
      const old = this.primaryOf(prev);
      const t = this.timelineOf(prev);
      if (!old) this.log(`${n.name}: took over from ${prev.upstream?.primaryVolume}, which no node holds: not checked`);
      else if (next.failover.kind === 'unplanned') this.checkUnplannedFailover(n, old, t, next, prev);
      else this.checkPlannedTakeover(n, old, t);
      // A cascade's middle: its replicas follow it now, on its new timeline (lagging ones still on the old).
      const mine = this.models.get(n.name);
      for (const pair of prev.pairs) {
        if (!mine) continue;
        const was = this.pairTimelines.get(pair.id);
        this.pairTimelines.set(pair.id, mine);
        if (!was) continue;
        this.pairParents.set(pair.id, { t: was, before: was.stateCount });
        // Its replica's position moves into the new numbering (the old states come first).
        for (const x of this.nodes) {
          const c = this.replicaCursor.get(x.name);
          if (this.roles.get(x.name)?.upstream?.pairId === pair.id && c !== undefined && c >= 0) this.replicaCursor.set(x.name, c - was.stateCount - 2);
        }
      }
      return;
    }
    // Became a replica.
    if (next.role === 'replica' && prev?.role !== 'replica') {
      if (next.upstream?.resync) this.checkResyncStart(n, next);
      else if (prev && prev.role !== 'simplex') this.checkHandedOver(n);
      this.models.set(n.name, null);
      this.replicaCursor.delete(n.name);
      return;
    }
    // A resync's copy finished: the old primary equals the new one's base.
    if (prev?.upstream?.resync && next.role === 'replica' && !next.upstream?.resync && next.upstream?.initialCopy.done) {
      this.checkReplicaState(n, 'resync copy done');
    }
    if (prev?.failover && !next.failover && prev.failover.restartSnapshot) this.expected.get(n.name)!.delete(prev.failover.restartSnapshot);
  }

  // ================= checks =================

  private read(n: SimNode): Int32Array | null {
    const v = n.inc && !n.inc.dead ? n.inc.volume(this.vol(n)) : undefined;
    if (!v) return null;
    const vec = decode(v.readAll());
    this.stats.checks++;
    const g = vec.indexOf(GARBAGE);
    if (g >= 0) {
      this.fail(`${n.name}: sector ${g} holds neither zeroes nor a well-formed write of that sector (corruption or a misplaced block)`);
      throw new StopRun('garbage');
    }
    return vec;
  }

  private readSnapshot(n: SimNode, name: string): Int32Array | null {
    const v = n.inc && !n.inc.dead ? n.inc.volume(this.vol(n)) : undefined;
    if (!v) return null;
    const vec = decode(v.readSnapshotAll(name));
    const g = vec.indexOf(GARBAGE);
    if (g >= 0) {
      this.fail(`${n.name}: snapshot ${name}: sector ${g} is garbage`);
      throw new StopRun('garbage');
    }
    return vec;
  }

  /** (b): the new primary holds the old one's state at a prefix of its writes, losing only what the report admits. */
  private checkUnplannedFailover(n: SimNode, old: SimNode, t: Timeline | undefined, s: RoleState, before: RoleState): void {
    this.stats.failovers++;
    const f = s.failover!;
    const v = this.read(n);
    if (!v) return;
    const r = f.report;
    this.log(`${n.name}: failover report: atRiskSince ${r?.atRiskSinceMs === null || !r ? 'none' : ((r.atRiskSinceMs - simEpochMs) / 1000).toFixed(3)}, lastContact ${r?.lastContactMs ? ((r.lastContactMs - simEpochMs) / 1000).toFixed(3) : 'none'}, consistent ${r?.consistent}, setsNotHere ${r?.setsNotHere.length ?? 0}, dropped ${r?.setsDropped.length ?? 0}, restart ${f.restartSnapshot}@${f.restartSet}`);
    if (!t) {
      this.log(`${n.name}: no model of the old primary ${old.name} (it was not a primary in the model): loss not checked`);
    } else if (f.restartSnapshot === null) {
      this.log(`${n.name}: forced failover before the initial copy finished: loss not checked`);
    } else {
      const since = r ? r.atRiskSinceMs : null;
      const consistent = r?.consistent ?? true;
      let why = t.explain(v, t.ackedBefore(since), consistent);
      // The end of a cascade whose middle took over: it may still be at a state of the
      // middle's primary from before that takeover (it lags): then every write acknowledged
      // before `since` must be there, and none of the middle's own writes may be required.
      const parent = this.pairParents.get(before.upstream?.pairId ?? '');
      if (why && parent && t.ackedBefore(since).length === 0) {
        const older = parent.t.ackedBefore(since).filter((w) => w.index < parent.before);
        if (parent.t.explain(v, older, consistent) === null) {
          this.log(`${n.name}: failover ok: at a state of ${parent.t.label} from before ${old.name} took over; all ${older.length} writes acknowledged before the report's time are here`);
          why = null;
        }
      }
      if (why) this.classifyLoss(n, old, t, v, since, consistent, before, why);
      if (this.stopped) return;
      const acked = t.ackedBefore(null);
      const lost = acked.filter((w) => t.explain(v, [w], consistent) !== null).length;
      this.log(`${n.name}: failover ok: ${acked.length - lost}/${acked.length} acknowledged writes of ${old.name} here, ${lost} lost within the report`);
      const snap = this.readSnapshot(n, f.restartSnapshot);
      if (snap && diffSectors(snap, v)) this.issue('failover-halt-race', `${n.name}: restart snapshot ${f.restartSnapshot} (stamped set ${f.restartSet}) differs from the volume at the failover: ${diffSectors(snap, v)}`);
      else if (snap) this.expected.get(n.name)!.set(f.restartSnapshot, { vec: v.slice(), what: 'restart point' });
    }
    this.models.set(n.name, new Timeline(`${n.name}/g${s.generation}`, v, this.now));
  }

  /**
   * A failover lost acknowledged writes its report did not admit. Sorted into the known
   * causes (each a production bug, see KNOWN_ISSUES) by the oldest write lost; anything
   * else is a new failure.
   */
  private classifyLoss(n: SimNode, old: SimNode, t: Timeline, v: Int32Array, since: number | null, consistent: boolean, before: RoleState, why: string): void {
    const lost = t.ackedBefore(null).filter((w) => t.explain(v, [w], consistent) !== null);
    const oldest = Math.min(...lost.map((w) => w.ackedAtMs!));
    const at = (ms: number | null | undefined) => (ms === null || ms === undefined ? 'none' : ((ms - simEpochMs) / 1000).toFixed(3));
    const report = before.upstream?.lastReport ?? null;
    // A report is computed by the primary before the replica receives it: at most this much before.
    const reportAgeMaxMs = replicationSilenceMs + this.o.net.latencyMs + this.o.net.jitterMs + this.net.maxSpikeMs + 2;
    const what = `failover on ${n.name} lost ${lost.length} acknowledged write(s) of ${old.name}, the oldest acked at ${at(oldest)}; the report says at risk since ${at(since)} (last progress report received ${at(report?.atMs)}, last contact ${at(this.roles.get(n.name)?.failover?.report?.lastContactMs)}): ${why}`;
    const boots = (this.boots.get(old.name) ?? []).filter((b) => b > oldest && (since === null || b <= since));
    if (since !== null && oldest >= since - replicatorTickMs - 1) return this.issue('report-tick', what);
    if (boots.length > 0 && since !== null) return this.issue('report-restart', `${what} (${old.name} restarted at ${boots.map(at).join(', ')})`);
    if (!report || (oldest >= report.atMs - reportAgeMaxMs && (since === null || since > report.atMs - reportAgeMaxMs))) return this.issue('report-after-last-report', what);
    this.fail(`unplanned ${what}`);
  }

  /** (c): a planned takeover loses nothing. */
  private checkPlannedTakeover(n: SimNode, old: SimNode, t: Timeline | undefined): void {
    this.stats.takeovers++;
    const v = this.read(n);
    if (!v) return;
    if (!t) {
      this.log(`${n.name}: no model of the old primary ${old.name}: takeover not checked`);
    } else if (diffSectors(v, t.current)) {
      const acked = t.ackedBefore(null);
      const what = `planned takeover on ${n.name} does not hold everything ${old.name} wrote (${acked.length} acknowledged): ${t.explain(v, acked, true) ?? 'differs from the last state'}: ${diffSectors(v, t.current)}`;
      const unfencedAt = this.unfencedOffered.get(old.name);
      if (unfencedAt !== undefined) this.issue('unfence-offered-handover', `${what} (${old.name}'s offered handover was called off by unfence at ${((unfencedAt - simEpochMs) / 1000).toFixed(3)})`);
      else this.fail(what);
      if (this.stopped) return;
    }
    const role = this.roles.get(n.name)!;
    this.models.set(n.name, new Timeline(`${n.name}/g${role.generation}`, v, this.now));
  }

  /** A primary that handed over has not changed since (writes were held). */
  private checkHandedOver(n: SimNode): void {
    const t = this.models.get(n.name);
    const v = this.read(n);
    if (!t || !v) return;
    if (diffSectors(v, t.current)) this.fail(`${n.name} handed over but its volume moved from its model: ${diffSectors(v, t.current)}`);
  }

  /** (d) first half: the old primary's content is kept in its before-resync snapshot. */
  private checkResyncStart(n: SimNode, s: RoleState): void {
    this.stats.resyncs++;
    const rs = s.upstream!.resync!;
    if (rs.full) this.stats.fullResyncs++;
    this.log(`${n.name}: resync started: full ${rs.full} (${rs.reason}), divergent ${rs.divergentBlocks}, snapshot ${rs.beforeSnapshot}, restart set ${rs.restartSet}`);
    const t = this.models.get(n.name);
    if (!t || !rs.beforeSnapshot) return;
    const snap = this.readSnapshot(n, rs.beforeSnapshot);
    if (!snap) return;
    const why = t.explain(snap, t.ackedBefore(null), true);
    if (why) {
      this.fail(`${n.name}: before-resync snapshot ${rs.beforeSnapshot} does not hold every write the volume acknowledged: ${why}`);
      return;
    }
    this.expected.get(n.name)!.set(rs.beforeSnapshot, { vec: snap, what: 'before resync' });
  }

  /** A replica at a point in time shows a state its primary had, never going back. */
  private checkReplicaState(n: SimNode, why: string): void {
    const s = this.roles.get(n.name);
    const t = this.timelineOf(s);
    if (!s || s.role !== 'replica' || !t) return;
    const p = { name: t.label };
    const v = this.read(n);
    if (!v) return;
    const k = this.stateIndex(s, t, v);
    if (k === -1) {
      this.fail(`${n.name} (replica, ${why}) shows a state its primary ${p.name} never had: ${t.describeDiff(v)}`);
      return;
    }
    const before = this.replicaCursor.get(n.name) ?? -Infinity;
    if (k < before) this.fail(`${n.name} (replica, ${why}) went back from state ${before} to ${k} of ${p.name}`);
    this.replicaCursor.set(n.name, k);
  }

  /** Continuous checks of every node that is up. */
  private checkAll(what: string): void {
    for (const n of this.nodes) {
      if (n.state !== 'up' || this.stopped) continue;
      const t = this.models.get(n.name);
      const s = this.roles.get(n.name);
      const v = n.inc!.volume(this.vol(n));
      if (!v || !s) continue;
      if (t) {
        const got = this.read(n)!;
        const w = this.inflight;
        if (diffSectors(got, t.current)) {
          // Only the write in flight may be missing (issued, its data not yet in the volume).
          const ok = w && w.node === n.name && w.before !== null && got.every((x, i) => x === t.current[i] || (i >= w.first && i < w.first + w.count && x === w.before![i - w.first]));
          if (!ok) this.fail(`${n.name} (primary) differs from its model (${what}): ${diffSectors(got, t.current)}`);
        }
      } else if (s.role === 'replica' && s.upstream && s.upstream.initialCopy.done && s.upstream.consistent && !s.upstream.resync && !s.upstream.split && !v.overlayActive) {
        this.checkReplicaState(n, what);
      }
      for (const [name, e] of this.expected.get(n.name)!) {
        if (!v.snapshots().some((x) => x.name === name)) {
          this.fail(`${n.name}: snapshot ${name} (${e.what}) is gone`);
          continue;
        }
        const got = this.readSnapshot(n, name);
        if (got && diffSectors(got, e.vec)) this.fail(`${n.name}: snapshot ${name} (${e.what}) changed: ${diffSectors(got, e.vec)}`);
      }
    }
  }

  // ================= nodes =================

  private startNode(n: SimNode): void {
    if (n.state !== 'down' || this.starting.has(n.name)) return;
    this.starting.add(n.name);
    this.log(`${n.name}: booting (incarnation ${n.incarnations + 1})`);
    const p = n.start();
    p.then(
      () => {
        this.starting.delete(n.name);
        if (n.state !== 'up') return;
        this.dirty.add(n.name);
        this.boots.set(n.name, [...(this.boots.get(n.name) ?? []), this.now]);
        this.log(`${n.name}: up`);
        this.afterRecovery(n);
      },
      (e: Error) => {
        this.starting.delete(n.name);
        if (n.inc && !n.inc.dead) this.fail(`${n.name}: start failed: ${e.stack ?? e.message}`);
      },
    );
  }

  /** (a): a primary that crashed holds every write it acknowledged; the write in flight may be there, torn or not. */
  private afterRecovery(n: SimNode): void {
    const t = this.models.get(n.name);
    if (!this.crashInflight.has(n.name)) return;
    const w = this.crashInflight.get(n.name) ?? null;
    this.crashInflight.delete(n.name);
    if (!t) return;
    let v: Int32Array | null;
    try {
      v = this.read(n);
    } catch {
      return;
    }
    if (!v) return;
    for (let s = 0; s < v.length; s++) {
      if (v[s] === t.current[s]) continue;
      if (w && w.before && s >= w.first && s < w.first + w.count && v[s] === w.before[s - w.first]) continue; // the unacknowledged write, lost or torn
      if ((this.failedIssued.get(n.name) ?? []).some((f) => f.before && s >= f.first && s < f.first + f.count && v[s] === f.before[s - f.first])) continue; // issued, failed, never flushed
      const rec = t.byId.get(t.current[s]!);
      this.fail(`${n.name} (primary) lost an acknowledged write in a crash: sector ${s} holds ${v[s]} instead of ${t.current[s]}${rec ? ` (acked at ${rec.ackedAtMs === null ? 'never' : ((rec.ackedAtMs - simEpochMs) / 1000).toFixed(3)})` : ''}`);
      return;
    }
    this.failedIssued.delete(n.name);
    if (diffSectors(v, t.current)) {
      t.rebase(v);
      if (w && w.before) this.log(`${n.name}: write ${w.id} in flight at the crash is ${v.slice(w.first, w.first + w.count).every((x, i) => x === w.before![i]) ? 'lost' : 'torn'}`);
      else this.log(`${n.name}: writes that failed after they were issued are lost or torn by the crash`);
    }
  }

  private crash(n: SimNode, mode: CrashMode): void {
    this.stats.crashes++;
    const op = this.ops.get(n.name);
    if (!this.crashInflight.has(n.name)) this.crashInflight.set(n.name, this.inflight?.node === n.name ? this.inflight : null);
    this.log(`${n.name}: CRASH (${mode})${op ? ` during ${op.kind}` : ''}${this.inflight?.node === n.name ? ` with write ${this.inflight.id} in flight` : ''}`);
    n.crash(mode);
    this.ops.delete(n.name);
    this.starting.delete(n.name);
    this.downUntil.set(n.name, this.now + Math.floor(this.rStep() * this.o.downMsMax));
  }

  // ================= the client =================

  private writable(n: SimNode): boolean {
    const s = this.roles.get(n.name);
    return n.state === 'up' && !!s && s.role !== 'replica' && (!s.fenced || !!s.fenced.overridden);
  }

  private async writer(): Promise<void> {
    const o = this.o;
    const sectors = Math.floor(this.sizeBytes / SECTOR);
    let burst = 0;
    for (let i = 0; i < writesMax && !this.writerStopped && !this.stopped; i++) {
      if (burst === 0 && this.rWrite() < o.burstProbability) burst = 1 + Math.floor(this.rWrite() * 8);
      await simSleep(this.time, burst > 0 ? Math.floor(this.rWrite() * 3) : Math.floor(this.rWrite() * o.writeGapMsMax));
      if (burst > 0) burst--;
      if (this.writerStopped || this.stopped) return;
      const ups = this.nodes.filter((n) => n.state === 'up');
      const good = ups.filter((n) => this.writable(n));
      const bad = ups.filter((n) => !this.writable(n));
      const offTarget = bad.length > 0 && this.rWrite() < o.offTargetProbability;
      const pool = offTarget ? bad : good;
      if (pool.length === 0) continue;
      const n = pool[Math.floor(this.rWrite() * pool.length)]!;
      const inc = n.inc!;
      const v = inc.volume(this.vol(n));
      if (!v) continue;
      let first: number;
      let count: number;
      if (this.rWrite() < o.alignedWriteProbability) {
        const per = BLOCK_BYTES / SECTOR;
        const b = Math.floor(this.rWrite() * o.blocks);
        first = b * per;
        count = per * Math.min(o.blocks - b, 1 + Math.floor(this.rWrite() * 2));
      } else {
        first = Math.floor(this.rWrite() * sectors);
        count = Math.min(sectors - first, 1 + Math.floor(this.rWrite() * 16));
      }
      const id = ++this.writeId;
      const w: Inflight = { node: n.name, id, first, count, inc, before: null };
      this.inflight = w;
      const write = v.clientWrite(first * SECTOR, writeData(id, first, count), () => {
        const t = this.models.get(n.name);
        const s = this.roles.get(n.name);
        // What the role record says right now (the observed copy may lag by one event).
        const live = inc.service?.role(this.vol(n)).state;
        if (live && ((live.role === 'replica' && !live.upstream?.split) || (live.fenced && !live.fenced.overridden) || live.handover)) {
          this.fail(`${n.name} issued client write ${id} although its role record says ${this.roleWord(live as RoleState)} (writes must be refused or held)`);
          return;
        }
        if (!t) {
          this.fail(`${n.name} accepted client write ${id} although it is ${this.roleWord(s ?? null)} (the model has it as no writable primary)`);
          return;
        }
        w.before = t.current.slice(first, first + count);
        t.issue(id, first, count, this.now);
        this.stats.writesIssued++;
      });
      const r = await this.alive(inc, write.then(() => v.flush()).then(() => 'ok' as const, (e: Error & { code?: string }) => e));
      if (this.inflight === w) this.inflight = null;
      if (r.dead) continue;
      if (r.value === 'ok') {
        const t = this.models.get(n.name);
        const rec = t?.byId.get(id);
        if (rec) {
          rec.ackedAtMs = this.now;
          this.stats.writesAcked++;
        }
        this.failedIssued.delete(n.name); // its flush made every earlier write durable
        continue;
      }
      const e = r.value;
      if (e.code === 'EPERM') {
        this.stats.writesRefused++;
        if (!offTarget && this.writable(n) && this.roles.get(n.name)?.role !== 'replica' && !this.roles.get(n.name)?.fenced) this.log(`${n.name}: write ${id} refused: ${e.message}`);
      } else if (e.code === 'EIO' || e.code === 'ESHUTDOWN') {
        this.log(`${n.name}: write ${id} failed: ${e.code}: ${e.message}`);
        if (w.before !== null) this.failedIssued.set(n.name, [...(this.failedIssued.get(n.name) ?? []), w]);
      } else {
        this.fail(`${n.name}: client write ${id} failed unexpectedly: ${e.stack ?? e.message}`);
      }
    }
  }

  // ================= operator commands =================

  private startOp(
    n: SimNode,
    kind: string,
    run: (svc: ReplicationService) => Promise<unknown> | unknown,
    done?: (r: unknown) => void,
    failed?: (code: string) => void,
  ): void {
    const svc = n.service;
    const inc = n.inc;
    if (!svc || !inc || this.ops.has(n.name)) return;
    const op: Op = { kind, inc, startedMs: this.now };
    this.ops.set(n.name, op);
    this.log(`${n.name}: ${kind}`);
    let p: Promise<unknown>;
    try {
      p = Promise.resolve(run(svc));
    } catch (e) {
      p = Promise.reject(e);
    }
    void this.alive(inc, p.then((v) => ({ ok: true as const, v }), (e: unknown) => ({ ok: false as const, e: e as Error & { code?: string } }))).then((r) => {
      if (this.ops.get(n.name) === op) this.ops.delete(n.name);
      if (r.dead) return;
      const x = r.value;
      if (x.ok) {
        this.log(`${n.name}: ${kind} -> ${summarize(x.v)}`);
        try {
          done?.(x.v);
        } catch (e) {
          if (!(e instanceof StopRun)) this.fail(`checker error: ${(e as Error).stack}`);
        }
        return;
      }
      const e = x.e;
      const code = e?.code ?? (e as Error)?.name;
      this.log(`${n.name}: ${kind} failed: ${code}: ${e?.message}`);
      if (failed && e && typeof e.code === 'string') failed(e.code);
      if (kind === 'resync' && e?.message?.includes('did not fail over from another primary')) {
        const target = this.newestPrimary(n);
        const ps = target ? this.roles.get(target.name) : null;
        if (ps?.failover?.kind === 'planned') this.issue('no-resync-after-planned', `${n.name} (${this.roleWord(this.roles.get(n.name) ?? null)}) cannot be resynced from ${target!.name} (${this.roleWord(ps)}): ${e.message}`);
        this.unresyncable.add(n.name);
      } else if (!(e && typeof e.code === 'string')) this.fail(`${n.name}: ${kind} threw ${e?.name}: ${e?.stack ?? e}`);
    });
  }

  private snapshotName(): string {
    return `sim-${++this.snapCounter}`;
  }

  /** A snapshot the sim took: its content now, checked against the model, kept for later. */
  private expectSnapshot(n: SimNode, name: string, what: string, sinceMs: number): void {
    if (n.state !== 'up') return;
    const snap = this.readSnapshot(n, name);
    if (!snap) return;
    const t = this.models.get(n.name);
    const s = this.roles.get(n.name);
    if (t) {
      const why = t.explain(snap, t.ackedBefore(sinceMs), true);
      if (why) return this.fail(`${n.name}: snapshot ${name} (${what}) is not a state of the volume holding every write acknowledged before it was asked for: ${why}`);
    } else if (s?.role === 'replica' && s.upstream?.consistent && s.upstream.initialCopy.done && !s.upstream.resync) {
      const p = this.timelineOf(s);
      if (p && p.prefixIndex(snap) < 0 && this.stateIndex(s, p, snap) === -1) return this.fail(`${n.name}: replica snapshot ${name} is no state of its primary: ${p.describeDiff(snap)}`);
    }
    this.expected.get(n.name)!.set(name, { vec: snap, what });
  }

  // ================= steps =================

  private choose(): [string, () => void] | null {
    const w: StepWeights = this.o.weights;
    const options: [number, string, () => void][] = [];
    const add = (weight: number, label: string, f: () => void) => {
      if (weight > 0) options.push([weight, label, f]);
    };
    const r = this.rStep;
    add(w.idle, 'idle', () => undefined);
    add(w.check, 'check', () => this.checkAll('step'));
    for (const n of this.nodes) {
      const s = this.roles.get(n.name);
      const up = n.state === 'up';
      const svcFree = up && !this.ops.has(n.name);
      const newest = this.newestPrimary(n);
      const os = newest ? this.roles.get(newest.name) : null;
      if (n.state !== 'down') add(w.crash, `crash ${n.name}`, () => this.crash(n, r() < this.o.powercutProbability ? 'powercut' : 'kill9'));
      if (up && !this.ops.has(n.name)) add(w.cleanRestart, `restart ${n.name}`, () => this.cleanRestart(n));
      if (!up || !s) continue;
      if (svcFree && s.role === 'primary' && !s.fenced && s.pairs.length > 0) {
        add(w.cut, `cut ${n.name}`, () => this.startOp(n, 'cut', (svc) => svc.cut(this.vol(n))));
        add(w.cutSnapshot, `cut+snapshot ${n.name}`, () => {
          const name = this.snapshotName();
          const since = this.now;
          this.startOp(
            n,
            `cut --snapshot ${name}`,
            (svc) => svc.cut(this.vol(n), name),
            () => this.expectSnapshot(n, name, 'cut snapshot', since),
            // The operator asked for a restart point: a refusal must not leave one behind
            // (a snapshot stamped with a set that does not carry everything before it).
            (code) => {
              this.stats.cutSnapshotsRefused++;
              const v = n.inc && !n.inc.dead ? n.inc.volume(this.vol(n)) : undefined;
              if (v?.snapshots().some((x) => x.name === name)) this.fail(`${n.name}: cut --snapshot ${name} failed (${code}) yet left the snapshot behind`);
            },
          );
        });
      }
      if (svcFree) {
        add(w.snapshot, `snapshot ${n.name}`, () => {
          const name = this.snapshotName();
          const since = this.now;
          this.startOp(n, `snapshot ${name}`, (svc) => svc.createSnapshot(this.vol(n), name), () => this.expectSnapshot(n, name, 'snapshot', since));
        });
      }
      if (svcFree && s.role === 'replica') {
        const connected = n.service!.replica(this.vol(n))?.connected ?? false;
        const force = connected && r() < this.o.failoverForceProbability;
        const now = r() < this.o.failoverNowProbability;
        // Mostly when the primary is gone or cut off (what failover is for).
        const o = this.primaryOf(s);
        const primaryAway = !o || o.state !== 'up' || this.net.partitioned(n.name, o.name) || !connected;
        add(w.failover * (primaryAway ? 1 : 0.15), `failover ${n.name}`, () => this.startOp(n, `failover${now ? ' --now' : ''}${force ? ' --force' : ''}`, (svc) => svc.failover(this.vol(n), { now, force })));
        add(w.failoverSync, `failover --sync ${n.name}`, () => this.startOp(n, 'failover-sync', (svc) => svc.failover(this.vol(n), { sync: true })));
        add(w.failback, `failback ${n.name}`, () => this.startOp(n, 'failback', (svc) => svc.failback(this.vol(n))));
        if (s.upstream?.resync && !s.upstream.resync.registered) add(w.resync, `resync ${n.name} (register)`, () => this.resync(n));
      }
      if (svcFree && s.role !== 'replica') {
        const stale = !!os && os.generation > s.generation;
        add(w.resync * (stale || s.fenced ? 1 : 0.1), `resync ${n.name}`, () => this.resync(n));
      }
      if (svcFree && ((s.fenced && !s.fenced.overridden) || s.handover)) add(w.unfence, `unfence ${n.name}`, () => this.unfence(n));
    }
    if (!this.faultsOff) {
      const i = Math.floor(r() * this.nodes.length);
      const a = this.nodes[i]!.name;
      const b = this.nodes[(i + 1 + Math.floor(r() * (this.nodes.length - 1))) % this.nodes.length]!.name;
      if (this.net.partitioned(a, b)) add(w.partition, 'heal', () => this.net.heal(a, b));
      else
        add(w.partition, 'partition', () => {
          this.net.partition(a, b);
          const ms = Math.floor(r() * this.o.partitionMsMax);
          this.log(`net: partition ${a}|${b} for ${ms} ms`);
          this.time.schedule(ms, () => {
            if (!this.net.partitioned(a, b)) return;
            this.net.heal(a, b);
            this.log('net: partition healed');
          });
        });
      add(w.reset, 'reset', () => this.log(`net: reset ${this.net.reset(a, b)} connection(s)`));
      add(w.spike, 'spike', () => {
        const extra = 200 + Math.floor(r() * 9000);
        const dur = 500 + Math.floor(r() * 15_000);
        this.net.spike(a, b, extra, dur);
        this.log(`net: delay +${extra} ms for ${dur} ms`);
      });
      add(w.flip, 'flip', () => {
        const p = [0.01, 0.1, 0.5][Math.floor(r() * 3)]!;
        const dur = 200 + Math.floor(r() * 5000);
        this.net.flipProbability = p;
        this.log(`net: bit flips p=${p} for ${dur} ms`);
        this.time.schedule(dur, () => {
          this.net.flipProbability = 0;
        });
      });
    }
    let total = 0;
    for (const [weight] of options) total += weight;
    let x = r() * total;
    for (const [weight, label, f] of options) {
      x -= weight;
      if (x < 0) return [label, f];
    }
    return null;
  }

  private unfence(n: SimNode): void {
    const offered = !!this.roles.get(n.name)?.handover?.offered;
    this.startOp(n, 'unfence', (svc) => svc.unfence(this.vol(n)), () => {
      if (offered) this.unfencedOffered.set(n.name, this.now);
    });
  }

  /** resync of n from the newest primary (a replica whose registration is pending: registers again). */
  private resync(n: SimNode): void {
    const s = this.roles.get(n.name);
    const o = s?.role === 'replica' ? this.primaryOf(s) : this.newestPrimary(n);
    if (!o) return;
    this.resyncIssuedMs.set(n.name, this.now);
    this.startOp(n, 'resync', (svc) => svc.resync(this.vol(n), { peerHost: o.name, peerPort: replPort, peerVolume: this.vol(o) }));
  }

  private cleanRestart(n: SimNode): void {
    const inc = n.inc;
    if (!inc) return;
    this.log(`${n.name}: clean restart`);
    if (!this.crashInflight.has(n.name)) this.crashInflight.set(n.name, this.inflight?.node === n.name ? this.inflight : null);
    void this.alive(inc, n.stop()).then(
      (r) => {
        if (r.dead || n.state !== 'down') return;
        this.downUntil.set(n.name, this.now);
        this.startNode(n);
      },
      (e: Error) => this.fail(`${n.name}: clean stop failed: ${e.stack ?? e.message}`),
    );
  }

  private async safetyStep(i: number): Promise<void> {
    await this.advance(Math.floor(this.rStep() * this.o.stepGapMsMax));
    if (this.stopped) return;
    this.watchStuckWrite();
    if (this.stopped) return;
    for (const n of this.nodes) if (n.state === 'down' && (this.downUntil.get(n.name) ?? 0) <= this.now) this.startNode(n);
    const c = this.choose();
    if (!c) return;
    this.log(`step ${i}: ${c[0]}`);
    c[1]();
    await this.quiesce();
  }

  // ================= the run =================

  private stuckWrite: { id: number; sinceMs: number; commits: number } | null = null;

  /** The client's write has waited 30 s on an up node whose activity log keeps committing: the livelock. */
  private watchStuckWrite(): void {
    const w = this.inflight;
    const n = w ? this.node(w.node) : null;
    const e = n && n.state === 'up' && w!.before !== null ? n.inc!.host.get(this.vol(n))?.engine : undefined;
    if (!w || !e) {
      this.stuckWrite = null;
      return;
    }
    if (!this.stuckWrite || this.stuckWrite.id !== w.id) this.stuckWrite = { id: w.id, sinceMs: this.now, commits: e.activityCommits };
    else if (this.now - this.stuckWrite.sinceMs > 30_000 && e.activityCommits - this.stuckWrite.commits > 300) {
      this.blocking('activity-log-livelock', `${w.node}: client write ${w.id} issued ${(this.now - this.stuckWrite.sinceMs) / 1000} s ago is not done; ${e.activityCommits - this.stuckWrite.commits} activity-log records since (hot max ${this.o.tuning.activityHotMax}, extent ${this.o.tuning.activityExtentBlocks} blocks)`);
    }
  }

  private async setup(): Promise<void> {
    const a = this.nodes[0]!;
    for (const n of this.nodes) this.startNode(n);
    await this.until(() => this.nodes.every((n) => n.state === 'up'), setupMsMax);
    if (!this.nodes.every((n) => n.state === 'up')) return this.fail('nodes did not start');
    const inc = a.inc!;
    await this.settle(inc.host.create({ name: this.vol(a), sizeBytes: this.sizeBytes, blockBytes: BLOCK_BYTES, description: 'sim' }), setupMsMax, 'volume create');
    this.models.set(a.name, new Timeline(`${a.name}/g1`, new Int32Array(Math.floor(this.sizeBytes / SECTOR)), this.now));
    if (this.o.cascade && this.nodes.length === 3) {
      // Seed 002's three sites: A → B (sync when the seed says so), B → C async.
      const [, b, c] = this.nodes as [SimNode, SimNode, SimNode];
      await this.settle(a.service!.addReplica(this.vol(a), { ...this.pairOptions(b), ...this.syncOptions() }), setupMsMax, 'replica add');
      await this.until(() => b.service?.replica(this.vol(b))?.info.initialCopy.done === true, setupMsMax);
      await this.settle(b.service!.addReplica(this.vol(b), this.pairOptions(c)), setupMsMax, 'replica add (cascade)');
      this.log(`setup: ${this.vol(a)} on ${a.name} (${this.sizeBytes} bytes) replicates to ${this.vol(b)} on ${b.name}, which forwards to ${this.vol(c)} on ${c.name} (cascade)`);
    } else {
      for (const b of this.nodes.slice(1)) await this.settle(a.service!.addReplica(this.vol(a), this.pairOptions(b)), setupMsMax, 'replica add');
      this.log(`setup: ${this.vol(a)} on ${a.name} (${this.sizeBytes} bytes) replicates to ${this.nodes.slice(1).map((b) => `${this.vol(b)} on ${b.name}`).join(', ')}`);
    }
    this.writerDone = this.writer().catch((e: Error) => {
      if (!(e instanceof StopRun)) this.fail(`writer: ${e.stack}`);
    });
  }

  /** The seed's sync settings as pair options (none when it has none). */
  private syncOptions() {
    return this.o.sync !== null ? { mode: 'sync' as const, fence: this.o.sync.fence, syncTimeoutMs: this.o.sync.timeoutMs } : {};
  }

  private pairOptions(b: SimNode) {
    // (One sync replica per volume: three-node runs stay async, but a cascade's first pair.)
    const sync = this.o.nodes === 2 ? this.syncOptions() : {};
    return { peerHost: b.name, peerPort: replPort, remoteVolume: this.vol(b), cutIntervalMs: this.o.cutIntervalMs, highWaterBytes: this.o.highWaterBytes, retriesBeforeSuspend: this.o.retriesBeforeSuspend, ...sync };
  }

  /**
   * The operator's last resort for a node that cannot rejoin (a replica of a pair nobody
   * ships any more, a diverged primary the newest one refuses to resync): delete its copy
   * and add it again as a new replica of p (a full initial copy).
   */
  private reattach(x: SimNode, p: SimNode): void {
    const pv = this.vol(p);
    const xv = this.vol(x);
    this.log(`${x.name}: the operator deletes ${xv} and adds it again as a replica of ${p.name}`);
    this.startOp(x, 'delete volume', async (svc) => {
      await svc.forget(xv, true);
      x.inc!.host.deleteVolume(xv);
    }, () => {
      this.models.set(x.name, null);
      this.roles.set(x.name, null);
      this.expected.get(x.name)!.clear();
      this.replicaCursor.delete(x.name);
      this.unresyncable.delete(x.name);
      this.startOp(p, 'replica add', async (svc) => {
        for (const pair of this.roles.get(p.name)?.pairs ?? []) if (pair.remoteVolume === xv && pair.peerHost === x.name) await svc.removeReplica(pv, pair.id);
        return svc.addReplica(pv, this.pairOptions(x));
      });
    });
  }

  /** Faults off, every node up, the operator finishes what is pending: the pair must converge. */
  private async liveness(): Promise<void> {
    this.faultsOff = true;
    this.log('liveness: faults off');
    this.net.healAll();
    this.writerStopped = true;
    const deadline = this.now + livenessMsMax;
    await this.until(() => this.inflight === null, 120_000);
    const since = this.now;
    let lastCut = 0;
    const lastResyncAt = new Map<string, number>();
    const orphanSince = new Map<string, number>();
    let handoverSeen = -1;
    const commits = new Map<string, { atMs: number; n: number; inc: number; writes: number }>();
    let starvedSinceMs = -1;
    const midFrame = new Map<object, { key: string; sinceMs: number }>();
    for (let round = 0; round < 10_000 && this.now < deadline && !this.stopped; round++) {
      for (const n of this.nodes) if (n.state === 'down') this.startNode(n);
      await this.advance(500);
      if (this.stopped) return;
      // With no new write of any source (client, playback, copy), an activity log that
      // keeps committing is spinning; a replica catching up on hundreds of small sets
      // after a restart commits as often, legitimately.
      for (const n of this.nodes) {
        // (A node still starting counts: a replica plays what it holds before it listens.)
        const e = n.inc && !n.inc.dead ? n.inc.host.get(this.vol(n))?.engine : undefined;
        if (!e) continue;
        const c = commits.get(n.name);
        if (!c || c.inc !== n.incarnations) commits.set(n.name, { atMs: this.now, n: e.activityCommits, inc: n.incarnations, writes: e.stats.writes });
        else if (this.now - c.atMs >= 5000) {
          if (e.activityCommits - c.n > 150 && e.stats.writes === c.writes) return this.blocking('activity-log-livelock', `${n.name}: ${e.activityCommits - c.n} activity-log records in ${(this.now - c.atMs) / 1000} s without a new write (hot max ${this.o.tuning.activityHotMax}, extent ${this.o.tuning.activityExtentBlocks} blocks): ${this.describe()}`);
          commits.set(n.name, { atMs: this.now, n: e.activityCommits, inc: n.incarnations, writes: e.stats.writes });
        }
      }
      // A link whose decoder sits in one frame for 30 s while bytes keep coming: a bogus length.
      for (const n of this.nodes) {
        const svc = n.service as unknown as { links?: Set<{ closed: boolean; decoder: { state: string; msgBytes: number; dataBytes: number; pendingBytes: number } }>; replicators?: Map<string, { senders: Map<string, { link: unknown }> }> } | null;
        if (!svc) continue;
        const links = [...(svc.links ?? [])];
        for (const r of svc.replicators?.values() ?? []) for (const snd of r.senders.values()) if (snd.link) links.push(snd.link as (typeof links)[number]);
        for (const l of links) {
          const d = l.decoder;
          if (l.closed || d.state === 'prefix') {
            midFrame.delete(l);
            continue;
          }
          const key = `${d.state}/${d.msgBytes}/${d.dataBytes}`;
          const m = midFrame.get(l);
          if (!m || m.key !== key) midFrame.set(l, { key, sinceMs: this.now });
          else if (this.now - m.sinceMs > 30_000) return this.blocking('frame-length-stall', `${n.name}: a link decoder has waited ${(this.now - m.sinceMs) / 1000} s inside one frame (${key}, ${d.pendingBytes} bytes held) while the link counts as alive`);
        }
      }
      // A replica that holds more than it may but nothing it can play, for 60 s: starved.
      const starving = this.nodes.find((n) => {
        const rv = n.service?.replica(this.vol(n));
        if (!rv) return false;
        const st = rv.status();
        return st.inboundBytes > this.o.inboundBytesMax && !st.setsHeld.some((x) => x.set === st.playedSet + 1);
      });
      if (!starving) starvedSinceMs = -1;
      else if (starvedSinceMs < 0) starvedSinceMs = this.now;
      else if (this.now - starvedSinceMs > 60_000) {
        const st = starving.service!.replica(this.vol(starving))!.status();
        return this.blocking('inbound-pause-deadlock', `${starving.name} holds sets ${st.setsHeld.map((x) => x.set).join(',')} (${st.inboundBytes} bytes > inboundBytesMax ${this.o.inboundBytesMax}) but has played only ${st.playedSet}, for ${(this.now - starvedSinceMs) / 1000} s`);
      }
      if (this.nodes.some((n) => n.state !== 'up') || this.ops.size > 0) continue;
      const primaries = this.nodes.filter((n) => this.roles.get(n.name) && this.roles.get(n.name)!.role !== 'replica');
      if (primaries.length === 0) {
        if (this.now - since > 60_000) return this.fail(`liveness: every node is a replica (${this.nodes.map((n) => this.roleWord(this.roles.get(n.name) ?? null)).join(' / ')})`);
        continue;
      }
      const p = this.newestPrimary()!;
      const ps = this.roles.get(p.name)!;
      const ties = primaries.filter((x) => x !== p && this.roles.get(x.name)!.generation === ps.generation);
      if (ties.length > 0 && this.nodes.length === 2) return this.fail(`liveness: two primaries at generation ${ps.generation} (${this.describe()})`);
      let acted = false;
      for (const x of this.nodes) {
        if (x === p || acted) continue;
        const xs = this.roles.get(x.name);
        if (!xs) {
          // No copy (deleted by the operator): its primary's hello creates it, once the pair exists.
          if (!ps.pairs.some((pair) => pair.peerHost === x.name)) this.startOp(p, 'replica add', (svc) => svc.addReplica(this.vol(p), this.pairOptions(x)));
          acted = true;
          continue;
        }
        if (xs.role !== 'replica') {
          // A stale primary: resync it; when the newest primary refuses (or the generations tie), replace its copy.
          if (ties.includes(x)) this.issue('equal-generation-split', `${p.name} and ${x.name} are both primaries of generation ${ps.generation}: the operator deletes ${x.name}'s copy and adds it again`);
          if (ties.includes(x) || this.unresyncable.has(x.name)) this.reattach(x, p);
          else if (this.now - (lastResyncAt.get(x.name) ?? -Infinity) > 10_000) {
            lastResyncAt.set(x.name, this.now);
            this.resync(x);
          }
          acted = true;
          continue;
        }
        // A cascade: x follows a replica of p that forwards to it (the middle holds its pair).
        if (this.middleOf(p, xs)) {
          orphanSince.delete(x.name);
          continue;
        }
        const mine = ps.pairs.some((pair) => pair.id === xs.upstream?.pairId);
        const follows = this.primaryOf(xs) === p;
        if (follows && xs.upstream?.resync?.registered && !mine && this.now - since > reregisterAfterMs) {
          // Registered with a primary that has since lost the pair (it was a replica in
          // between, which drops its outgoing pairs, and is at a newer generation now).
          this.issue('resync-target-moved', `${x.name}'s resync (generation ${xs.generation}) is registered with ${p.name}, which no longer holds the pair (generation ${ps.generation})`);
          this.reattach(x, p);
          acted = true;
        } else if (follows && xs.upstream?.resync && !xs.upstream.resync.registered && this.now - since > reregisterAfterMs && this.now - (lastResyncAt.get(x.name) ?? -Infinity) > 10_000) {
          this.log(`liveness: ${x.name}'s resync is still not registered after ${(this.now - since) / 1000} s: the operator runs it again`);
          lastResyncAt.set(x.name, this.now);
          this.resync(x);
          acted = true;
        } else if (!follows || (!mine && !xs.upstream?.resync)) {
          // The replica of another node, or of a pair the newest primary does not have (its primary was replaced).
          if (!orphanSince.has(x.name)) orphanSince.set(x.name, this.now);
          if (this.now - orphanSince.get(x.name)! > 30_000) {
            orphanSince.delete(x.name);
            this.reattach(x, p);
            acted = true;
          }
        } else orphanSince.delete(x.name);
      }
      if (acted) continue;
      if (ps.handover) {
        if (handoverSeen < 0) handoverSeen = this.now;
        if (this.now - handoverSeen > 60_000) {
          this.log(`liveness: ${p.name} stuck handing over for 60 s: the operator calls it off`);
          this.unfence(p);
          handoverSeen = -1;
        }
        continue;
      }
      if (ps.fenced && !ps.fenced.overridden) {
        if (this.now - since > 60_000) {
          this.log(`liveness: ${p.name} is fenced although it is the newest primary: the operator unfences it`);
          this.unfence(p);
        }
        continue;
      }
      // Pairs to nodes that are not its replicas any more go (a replaced copy was added
      // again), on p and on a cascade's middle.
      let removed = false;
      for (const m of [p, ...this.nodes.filter((x) => x !== p && this.primaryOf(this.roles.get(x.name)) === p)]) {
        const ms = this.roles.get(m.name);
        const stale = ms?.pairs.find((pair) => {
          const x = this.nodes.find((n) => n.name === pair.peerHost);
          return !x || this.roles.get(x.name)?.upstream?.pairId !== pair.id;
        });
        if (stale && this.now - since > 60_000 && !this.ops.has(m.name)) {
          this.log(`liveness: ${m.name} still ships to pair ${stale.id} (${stale.peerHost}), which is nobody's upstream: the operator removes it`);
          this.startOp(m, 'replica remove', (svc) => svc.removeReplica(this.vol(m), stale.id));
          removed = true;
          break;
        }
      }
      if (removed) continue;
      if (this.now - lastCut > 3000 && ps.pairs.length > 0) {
        lastCut = this.now;
        this.startOp(p, 'cut', (svc) => svc.cut(this.vol(p)));
        continue;
      }
      const replicas = this.nodes.filter((x) => x !== p);
      if (replicas.every((r) => this.converged(p, r))) {
        this.stats.converged = true;
        this.log(`liveness: converged after ${((this.now - since) / 1000).toFixed(1)} s: ${p.name} ${this.roleWord(ps)} -> ${replicas.map((r) => `${r.name} ${this.roleWord(this.roles.get(r.name)!)}`).join(', ')}`);
        this.finalCheck(p, replicas);
        return;
      }
    }
    if (!this.stopped) this.fail(`liveness: no convergence within ${livenessMsMax / 1000} virtual s: ${this.describe()}`);
  }

  /** The replica of p that forwards to the replica with role xs (a cascade's middle), if any. */
  private middleOf(p: SimNode, xs: RoleState | null | undefined): SimNode | undefined {
    const m = this.primaryOf(xs);
    if (!m || m === p || !xs?.upstream || xs.upstream.resync) return undefined;
    const ms = this.roles.get(m.name);
    if (ms?.role !== 'replica' || this.primaryOf(ms) !== p || !ms.pairs.some((pr) => pr.id === xs.upstream!.pairId)) return undefined;
    return m;
  }

  private converged(p: SimNode, r: SimNode): boolean {
    const ps = this.roles.get(p.name)!;
    const rs = this.roles.get(r.name);
    // Every other node is p's replica, or the replica of a cascade's middle that is.
    let pairs = ps.pairs.length;
    for (const x of this.nodes) if (x !== p && this.primaryOf(this.roles.get(x.name)) === p) pairs += this.roles.get(x.name)!.pairs.length;
    if (!rs || ps.role !== 'primary' || ps.fenced || ps.handover || pairs !== this.nodes.length - 1) return false;
    // Its pair is p's, or its middle's (then that middle's status says how far it is).
    const owner = ps.pairs.some((x) => x.id === rs.upstream?.pairId) ? p : this.middleOf(p, rs);
    if (!owner) return false;
    const pair = this.roles.get(owner.name)!.pairs.find((x) => x.id === rs.upstream?.pairId);
    if (!pair || rs.role !== 'replica' || !rs.upstream!.initialCopy.done || rs.upstream!.resync) return false;
    const st = owner.service!.status(this.vol(owner))[0] as unknown as {
      currentSet: number;
      changedBlocksSinceCut: number;
      replicas: { id: string; state: string; connected: boolean; ackedSet: number; playedSet: number; bytesDifferent: number; pendingBlocks: number; initialCopy: unknown }[];
    };
    const x = st.replicas?.find((y) => y.id === pair.id);
    if (!x || x.state !== 'duplex' || !x.connected || st.changedBlocksSinceCut !== 0 || x.bytesDifferent !== 0 || x.pendingBlocks !== 0 || x.initialCopy !== null) return false;
    if (x.ackedSet !== st.currentSet || x.playedSet !== st.currentSet) return false;
    const rst = r.service!.status(this.vol(r))[0] as unknown as { playedSet: number; setsHeld: unknown[]; state: string };
    return rst.playedSet === st.currentSet && rst.setsHeld.length === 0 && rst.state === 'duplex';
  }

  /** (e): both volumes equal the primary's model byte for byte; every snapshot kept its content. */
  private finalCheck(p: SimNode, replicas: SimNode[]): void {
    const t = this.models.get(p.name);
    const vp = p.inc!.volume(this.vol(p))!.readAll();
    if (!t) return this.fail(`liveness: the primary ${p.name} has no model (the checker lost track of it)`);
    const dp = this.read(p)!;
    if (diffSectors(dp, t.current)) return this.fail(`liveness: primary ${p.name} differs from its model: ${t.explain(dp, t.ackedBefore(null), true)} / ${diffSectors(dp, t.current)}`);
    for (const r of replicas) {
      const vr = r.inc!.volume(this.vol(r))!.readAll();
      if (!vp.equals(vr)) return this.fail(`liveness: replica ${r.name} differs from primary ${p.name}: ${diffSectors(decode(vr), dp)}`);
    }
    this.checkAll('final');
    this.log(`final: ${t.writes.length} writes on ${t.label}, ${t.ackedBefore(null).length} acknowledged; volumes equal (${vp.length} bytes)`);
  }

  private describe(): string {
    const parts: string[] = [];
    for (const n of this.nodes) {
      const s = this.roles.get(n.name) ?? null;
      let st = '';
      try {
        st = n.service ? JSON.stringify(n.service.status(this.vol(n))[0]).slice(0, 1500) : n.state;
      } catch (e) {
        st = `status failed: ${(e as Error).message}`;
      }
      parts.push(`${n.name} ${n.state} ${this.roleWord(s)} ${st}`);
    }
    return parts.join(' || ');
  }

  async run(): Promise<ScenarioResult> {
    const o = this.o;
    this.log(`seed ${o.seed}: ${JSON.stringify({ ...o, seed: undefined })}`);
    try {
      await this.setup();
      for (let i = 0; i < o.steps && !this.stopped; i++) await this.safetyStep(i);
      if (!this.stopped) await this.liveness();
    } catch (e) {
      const spinning = this.nodes.find((n) => (n.inc && !n.inc.dead ? (n.inc.host.get(this.vol(n))?.engine.activityCommits ?? 0) : 0) > 20_000);
      if ((e as Error).message?.startsWith('livelock') && spinning) this.blocking('activity-log-livelock', `${spinning.name}: ${(e as Error).message.slice(0, 80)}; ${spinning.inc!.host.get(this.vol(spinning))!.engine.activityCommits} activity-log records (zero disk latency: all at one instant)`);
      else if (!(e instanceof StopRun)) this.fail(`simulator error: ${(e as Error).stack}`);
    }
    this.stopped = true;
    this.writerStopped = true;
    for (const n of this.nodes) if (n.state !== 'down') n.crash('kill9');
    // (The writer may be asleep on a virtual timer that will never fire now: not awaited.)
    void this.writerDone;
    this.stats.virtualMs = this.now - simEpochMs;
    this.stats.events = this.time.eventsFired;
    this.stats.settleRounds = this.time.settleRounds;
    this.stats.flips = this.net.stats.flips;
    const traceHash = crypto.createHash('sha256').update(this.trace.filter((l) => !l.startsWith('      ')).join('\n')).digest('hex').slice(0, 16);
    return { seed: o.seed, ok: this.failures.length === 0, failures: this.failures, trace: this.trace, traceHash, options: o, stats: this.stats, gaps: this.gaps, known: Object.fromEntries(this.knownHits) };
  }
}

function summarize(v: unknown): string {
  if (v === undefined) return 'ok';
  const s = JSON.stringify(v, (k, x: unknown) => (k === 'history' || k === 'warnings' ? undefined : x));
  return s.length > 400 ? `${s.slice(0, 400)}…` : s;
}

export async function runScenario(seed: number, flags: RunFlags = {}): Promise<ScenarioResult> {
  return new Scenario(seed, flags).run();
}
