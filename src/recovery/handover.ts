// Why: two things a primary must learn from its replica, and act on before it can do harm.
// (1) Fencing: the replica took over (failover) and holds a newer generation: this side
// stops shipping and refuses writes until an operator resyncs it (never an automatic
// resync that throws one side's writes away). (2) A planned swap (failover --sync,
// failback; seed 001 FIG. 30, 33): the replica asks, the primary holds new writes, ships
// everything it has, and only when the replica has played the last set does the replica
// become the primary, one generation up, and this side its replica: zero loss, and
// replication goes on in the other direction without any copy.
//
// The swap in messages, on the pair's own link:
//   replica → takeover {baseSet}            primary: holds writes, cuts and ships the rest
//   primary → handover {lastSet, newPairId} (after the replica played lastSet; from here
//                                           the primary may not take writes back alone)
//   replica → handoverCommit                replica: durable as primary first, then says so
//   primary: durable as replica of newPairId; the new primary dials in.
// A link lost in between is resolved by the next contact: a replica that never committed
// welcomes the old primary again (the swap is called off); one that did refuses it with
// HANDED_OVER (the old primary completes its side) or dials it as the new pair.

import { DeltavolError } from '../util/errors.js';
import { sleep } from '../util/clock.js';
import type { Link } from '../replication/link.js';
import type { ReplMessage } from '../replication/wire.js';
import * as L from '../replication/limits.js';
import { OutboundLog } from '../replication/outbound-log.js';
import type { RecoveryContext } from './context.js';
import { syncConfigOf, type HandoverRecord, type PairRecord, type UpstreamRecord } from './role-record.js';

type Hello = Extract<ReplMessage, { t: 'hello' }>;
type HandoverMsg = Extract<ReplMessage, { t: 'handover' }>;

/** How long a swap may take from the takeover request to the commit. */
export const handoverMsMax = 30_000;

// ================= fencing =================

/** The replica side of a pair said it holds a newer generation: fence (or finish a swap). */
export function onNewerGeneration(ctx: RecoveryContext, volume: string, p: PairRecord, generation: number, code: string, message: string): void {
  const role = ctx.role(volume);
  if (role.role !== 'primary' || generation <= role.generation) return;
  const h = role.state.handover;
  if (h && code === 'HANDED_OVER' && generation === h.newGeneration) {
    void completeHandover(ctx, volume).catch((e: Error) => ctx.log.error({ volume, err: e.message }, 'completing the handover failed'));
    return;
  }
  if (role.state.fenced && role.state.fenced.generation >= generation) return; // known (or overridden by the operator)
  if (h) role.transition({ t: 'handover-aborted', reason: `the peer holds generation ${generation}` });
  role.transition(
    { t: 'fenced', fence: { generation, peer: `${p.remoteVolume}@${p.peerHost}:${p.peerPort}`, reason: `${code}: ${message}`, atMs: ctx.platform.clock.now() } },
    { pair: p.id, code },
  );
  ctx.log.warn({ volume, generation, peer: `${p.peerHost}:${p.peerPort}` }, `fenced: ${volume} was replaced by a newer primary; writes are refused until \`deltavol resync ${volume}\` (or \`deltavol unfence ${volume}\`)`);
}

/**
 * Operator override: writes again although a newer primary exists, or a stuck swap is
 * called off. A swap already offered to the replica ends only by the replica's answer (it
 * may have taken over): calling it off then needs `force`, for a replica gone for good.
 */
export function unfence(ctx: RecoveryContext, volume: string, force = false): { volume: string; generation: number; was: string } {
  const role = ctx.role(volume);
  const h = role.state.handover;
  if (h) {
    if (h.offered && !force) {
      throw new DeltavolError(
        'ROLE_CONFLICT',
        `volume ${volume} offered its replica the handover (generation ${h.newGeneration}): only the replica's answer ends it — it took over, or it welcomes this primary again when they meet. If the replica is gone for good, \`deltavol unfence ${volume} --force\` (if it did take over, the two diverge)`,
      );
    }
    role.transition({ t: 'handover-aborted', reason: force ? 'operator: unfence --force' : 'operator: unfence' });
    return { volume, generation: role.generation, was: 'handing-over' };
  }
  if (!role.state.fenced || role.state.fenced.overridden) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is neither fenced nor handing over`);
  const f = role.state.fenced;
  role.transition({ t: 'unfenced' }, { newerGeneration: f.generation, peer: f.peer });
  ctx.log.warn({ volume, newerGeneration: f.generation, peer: f.peer }, 'unfenced by the operator: this volume takes writes although a newer primary exists (two primaries now; it ships nothing to that peer)');
  return { volume, generation: role.generation, was: 'fenced' };
}

/**
 * A hello for a volume that is a primary here: it may come from the primary this volume
 * replaced. The refusal carries this side's generation so the sender fences itself (or
 * completes its half of a planned swap).
 */
export function refusalForOldPrimary(ctx: RecoveryContext, volume: string, hello: Hello, peerIdentity: string | null): DeltavolError {
  const role = ctx.role(volume);
  const f = role.state.failover;
  const generation = role.generation;
  // Over TLS, only the old primary itself (the identity bound to the pair) is told.
  const fromOldPrimary = peerIdentity === null || !f?.fromIdentity || f.fromIdentity === peerIdentity;
  if (f && fromOldPrimary && hello.pairId === f.fromPairId && hello.generation < generation) {
    const code = f.kind === 'planned' ? 'HANDED_OVER' : 'FAILED_OVER';
    const why = f.kind === 'planned' ? `took over from it in a planned handover (generation ${generation})` : `failed over (generation ${generation}, restart point set ${f.restartSet})`;
    return new DeltavolError('STALE_GENERATION', `volume ${volume} ${why}: the sender is stale`, { generation, refuseCode: code, wireCode: code });
  }
  return new DeltavolError('VOLUME_EXISTS', `volume ${volume} is a primary on this node`);
}

// ================= the primary's side of a planned swap =================

/** A recovery message on a pair's link, at the primary. */
export function onPrimaryMessage(ctx: RecoveryContext, volume: string, p: PairRecord, m: ReplMessage, link: Link): void {
  if (m.t === 'takeover') {
    void prepareHandover(ctx, volume, p, m.baseSet, link).catch((e: Error) => {
      ctx.log.warn({ volume, pair: p.id, err: e.message }, 'planned handover called off');
      ctx.openedReplicator(volume)?.endHandoverStream(p);
      link.send({ t: 'handoverAbort', reason: e.message });
      const role = ctx.role(volume);
      if (role.state.handover && !role.state.handover.offered) role.transition({ t: 'handover-aborted', reason: e.message });
    });
  } else if (m.t === 'handoverCommit') {
    const h = ctx.role(volume).state.handover;
    if (h && h.offered && m.newPairId === h.newPairId && m.generation === h.newGeneration) {
      void completeHandover(ctx, volume, m.atMs).catch((e: Error) => ctx.log.error({ volume, err: e.message }, 'completing the handover failed'));
    }
  } else if (m.t === 'handoverAbort') {
    const role = ctx.role(volume);
    if (role.state.handover) role.transition({ t: 'handover-aborted', reason: `the replica called it off: ${m.reason}` });
    ctx.openedReplicator(volume)?.endHandoverStream(p);
  }
}

async function prepareHandover(ctx: RecoveryContext, volume: string, p: PairRecord, peerBaseSet: number, link: Link): Promise<void> {
  const role = ctx.role(volume);
  if (role.role !== 'primary') {
    // A cascade's middle: its own replica cannot take over while the primary above writes
    // (two primaries). Refused before anything is held or streamed.
    throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is itself a replica here (the middle of a cascade): a planned takeover is asked of the primary, from its own replica`);
  }
  if (role.state.fenced) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is fenced`);
  if (role.state.handover) throw new DeltavolError('ROLE_CONFLICT', 'a handover is already under way');
  if (role.pairs.length !== 1) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} has ${role.pairs.length} replicas: a planned handover needs exactly one (remove the others first)`);
  if (!p.initialCopy.done) throw new DeltavolError('ROLE_CONFLICT', 'the replica has not finished its initial copy');
  if (p.operatorSuspended) throw new DeltavolError('ROLE_CONFLICT', 'the pair is split: resume it first');
  const r = ctx.replicator(volume);
  const clock = ctx.platform.clock;
  // Seed 004: the backlog ships while writes go on. The pair streams first (an async pair
  // for this handover only), so that holding writes below costs a round trip, not the
  // time to ship everything cut since the last set. Bounded: past it, writes are held anyway.
  const stream = r.streamForHandover(p);
  const streamBy = clock.now() + L.handoverStreamWaitMsMax;
  while (stream.state !== 'streaming' && clock.now() < streamBy && !link.closed && r.shipping) {
    r.senders.get(p.id)?.wake();
    await sleep(clock, 10);
  }
  ctx.log.info({ volume, streaming: stream.state === 'streaming', waitedMs: clock.now() - (streamBy - L.handoverStreamWaitMsMax) }, 'planned handover: holding writes now');
  const deadline = clock.now() + handoverMsMax;
  const handover: HandoverRecord = { pairId: p.id, newPairId: ctx.platform.newId(), newGeneration: role.generation + 1, peerBaseSet, lastSet: 0, offered: false, atMs: clock.now() };
  role.transition({ t: 'handover-prepared', handover }, { pair: p.id, newPairId: handover.newPairId });
  /** The handover now (an abort may end it while this waits). */
  const live = (): HandoverRecord | null => role.state.handover;
  // Writes are held from here (those already running finish first): ship everything written before.
  await ctx.host.require(volume).writesIdle();
  const lastSet = await r.cutEverything('planned handover');
  while (p.playedSet < lastSet || p.ackedSet < lastSet) {
    if (live()?.newPairId !== handover.newPairId) throw new DeltavolError('PEER_REFUSED', 'the handover was called off meanwhile');
    if (link.closed) throw new DeltavolError('PEER_UNREACHABLE', `the link to the replica went down before it played set ${lastSet}`);
    if (clock.now() > deadline) throw new DeltavolError('PEER_UNREACHABLE', `the replica did not play set ${lastSet} within ${handoverMsMax / 1000} s`);
    r.senders.get(p.id)?.wake();
    await sleep(clock, 20);
  }
  const h = live();
  if (h?.newPairId !== handover.newPairId) throw new DeltavolError('PEER_REFUSED', 'the handover was called off meanwhile');
  if (r.volume.unshippedBlockCount() > 0) throw new DeltavolError('DELTA_SET_BUSY', 'changes arrived while writes were held (a bug)');
  h.lastSet = lastSet;
  h.offered = true;
  role.saveProgress(); // durable before the offer: from now on only the replica's answer ends it
  const back = ctx.returnAddress();
  link.send({ t: 'handover', generation: h.newGeneration, lastSet, newPairId: h.newPairId, returnHost: back.host, returnPort: back.port });
  ctx.log.info({ volume, lastSet, newGeneration: h.newGeneration }, 'handover offered: every write is on the replica');
}

/**
 * The replica committed (or the next contact said so): this side becomes its replica.
 * takenOverAtMs: when the new primary took over (its clock), when it said so: every write
 * it acknowledges comes after (else this node's own clock, which no later write of it precedes).
 */
async function completeHandover(ctx: RecoveryContext, volume: string, takenOverAtMs?: number): Promise<void> {
  const role = ctx.role(volume);
  const h = role.state.handover;
  // (The commit and the new primary's hello may both say so: the first one does it, the
  // second waits for it.)
  let busy = completing.get(ctx);
  if (!busy) completing.set(ctx, (busy = new Map()));
  const running = busy.get(volume);
  if (running) return running;
  if (!h) return;
  const p = completeHandoverOnce(ctx, volume, h, takenOverAtMs).finally(() => busy.delete(volume));
  busy.set(volume, p);
  return p;
}

/** Handovers being completed, per node and volume. */
const completing = new WeakMap<RecoveryContext, Map<string, Promise<void>>>();

async function completeHandoverOnce(ctx: RecoveryContext, volume: string, h: HandoverRecord, takenOverAtMs: number | undefined): Promise<void> {
  const role = ctx.role(volume);
  const pair = role.pairs.find((x) => x.id === h.pairId)!;
  const upstream: UpstreamRecord = {
    pairId: h.newPairId,
    // The new primary is the replica this pair was bound to.
    peerIdentity: pair.peerIdentity ?? null,
    primaryVolume: pair.remoteVolume,
    playedSet: h.peerBaseSet,
    initialCopy: { done: true, offsetBytes: ctx.host.require(volume).sizeBytes, baseSet: h.peerBaseSet },
    consistent: true,
    split: false,
    createdAt: new Date(ctx.platform.clock.now()).toISOString(),
    resync: null,
    playedCutAtMs: takenOverAtMs ?? h.atMs,
    wholeCutAtMs: takenOverAtMs ?? h.atMs,
    lastReport: null,
  };
  const r = ctx.openedReplicator(volume);
  await r?.stopSenders();
  r?.outbound.releaseAll();
  role.transition({ t: 'handed-over', upstream }, { newPair: h.newPairId, lastSet: h.lastSet });
  await ctx.closeReplicator(volume);
  await ctx.host.require(volume).discardChanges();
  await ctx.openReplica(volume);
  ctx.log.info({ volume, generation: role.generation, primaryVolume: pair.remoteVolume }, 'handed over: this volume is now the replica of its former replica');
}

/** The pair's link went down: a swap not yet offered is called off (writes resume). */
export function onLinkDown(ctx: RecoveryContext, volume: string, p: PairRecord): void {
  const role = ctx.role(volume);
  const h = role.state.handover;
  if (h && h.pairId === p.id && !h.offered) role.transition({ t: 'handover-aborted', reason: 'the link to the replica went down' });
}

/**
 * A pair's session came up (the replica welcomed this primary). If a swap this side
 * offered was pending, the replica never committed: the swap is off and writes resume.
 * If this primary took over in a planned swap and this is the pair to the old primary,
 * the old primary has joined as the replica: the record of the swap is closed.
 */
export function onSessionUp(ctx: RecoveryContext, volume: string, p: PairRecord): void {
  const role = ctx.role(volume);
  if (role.state.handover?.offered && role.state.handover.pairId === p.id) {
    role.transition({ t: 'handover-aborted', reason: 'the replica welcomed this primary again: it did not take over' });
  }
  const f = role.state.failover;
  if (f && f.kind === 'planned' && f.resyncPairId === p.id) role.transition({ t: 'failover-closed' }, { pair: p.id });
}

/**
 * A hello for a volume that is a primary here, from the pair a swap this side offered
 * names: the replica committed and dials in as the new primary. Returns true when this
 * side completed its half (the volume is a replica now and may accept the hello).
 */
export async function completeOnHello(ctx: RecoveryContext, volume: string, hello: Hello, peerIdentity: string | null): Promise<boolean> {
  const h = ctx.role(volume).state.handover;
  if (!h || !h.offered || hello.pairId !== h.newPairId || hello.generation !== h.newGeneration) return false;
  // Only the replica the swap was offered to may complete it (TLS: the identity bound to its pair).
  const bound = ctx.role(volume).pairs.find((p) => p.id === h.pairId)?.peerIdentity ?? null;
  if (peerIdentity !== null && bound !== null && peerIdentity !== bound) {
    ctx.log.warn({ volume, peer: peerIdentity, bound }, 'a hello completing the planned handover came from another identity than the replica it was offered to: refused');
    return false;
  }
  await completeHandover(ctx, volume);
  return true;
}

// ================= the replica's side =================

interface Waiting {
  resolve: (m: HandoverMsg) => void;
  reject: (e: Error) => void;
}
/** Takeovers waiting for their primary's answer, per node (several nodes may share a process: the simulator). */
const waitingByNode = new WeakMap<RecoveryContext, Map<string, Waiting>>();
function waitingOf(ctx: RecoveryContext): Map<string, Waiting> {
  let m = waitingByNode.get(ctx);
  if (!m) waitingByNode.set(ctx, (m = new Map()));
  return m;
}

/** A recovery message from the primary on a replica's link. */
export function onReplicaMessage(ctx: RecoveryContext, volume: string, m: ReplMessage, _link: Link): void {
  const w = waitingOf(ctx).get(volume);
  if (!w) return;
  if (m.t === 'handover') w.resolve(m);
  else if (m.t === 'handoverAbort') w.reject(new DeltavolError('PEER_REFUSED', `the primary called the handover off: ${m.reason}`));
}

export interface TakeoverResult {
  volume: string;
  generation: number;
  previousGeneration: number;
  lastSet: number;
  /** From the command to a writable primary. */
  rtoMs: number;
  /** Acknowledged writes lost: a planned swap loses none. */
  lostWrites: 0;
  how: string;
}

/** failover --sync and failback: this replica takes over from its reachable primary, losing nothing. */
export async function takeOver(ctx: RecoveryContext, volume: string, how: string): Promise<TakeoverResult> {
  const started = ctx.platform.clock.now();
  const role = ctx.role(volume);
  if (role.role !== 'replica') {
    throw new DeltavolError('ROLE_CONFLICT', role.role === 'primary' ? `volume ${volume} is already the primary here: run \`deltavol ${how}\` on its replica's node` : `volume ${volume} is not a replica`);
  }
  const rv = ctx.replica(volume);
  const link = rv?.currentLink;
  if (!rv || !link) throw new DeltavolError('PEER_UNREACHABLE', `the primary of ${volume} is not connected: a ${how} needs it (when it is gone, \`deltavol failover ${volume}\` takes over with the loss it reports)`);
  const up = role.upstream!;
  if (!up.initialCopy.done) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} has not finished its ${up.resync ? 'resync' : 'initial copy'}`);
  if (up.split) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is split from its primary: resume the pair first`);
  const waiting = waitingOf(ctx);
  if (waiting.has(volume)) throw new DeltavolError('ROLE_CONFLICT', `a takeover of ${volume} is already under way`);
  const generationBefore = role.generation;
  // The middle of a cascade cuts no more sets of its own from here: the new pair to the old
  // primary starts at its last set (the old primary holds everything up to it), and what it
  // plays until the swap goes to its own replicas as pending blocks (forwardEverything).
  const fwd = ctx.openedReplicator(volume);
  fwd?.holdCuts(true);
  // (Whatever calls the takeover off lets the middle cut and release sets again.)
  try {
    while (fwd?.cutting) await sleep(ctx.platform.clock, 10);
    const baseSet = fwd ? fwd.outbound.lastSet : OutboundLog.lastSetIn(ctx.stateFs(volume));
    const answer = new Promise<HandoverMsg>((resolve, reject) => waiting.set(volume, { resolve, reject }));
    const timer = ctx.platform.clock.after(handoverMsMax, () => waiting.get(volume)?.reject(new DeltavolError('PEER_UNREACHABLE', `no handover from the primary within ${handoverMsMax / 1000} s`)));
    link.onClose((reason) => waiting.get(volume)?.reject(new DeltavolError('PEER_UNREACHABLE', `the link to the primary went down: ${reason}`)));
    let m: HandoverMsg;
    try {
      link.send({ t: 'takeover', generation: generationBefore, baseSet });
      m = await answer;
    } catch (e) {
      if (!link.closed) link.send({ t: 'handoverAbort', reason: (e as Error).message });
      throw e;
    } finally {
      timer();
      waiting.delete(volume);
    }
    if (m.generation !== generationBefore + 1) throw new DeltavolError('PEER_REFUSED', `the primary offered generation ${m.generation}, expected ${generationBefore + 1}`);
    // Every set up to lastSet must be played here before this side may take writes.
    const { played } = await rv.halt(false);
    let takenOverAtMs = 0;
    try {
      if (up.playedSet !== m.lastSet || !up.consistent) throw new DeltavolError('IO', `set ${m.lastSet} is not played here (played ${up.playedSet}): handover called off`);
      const v = ctx.host.require(volume);
      await ctx.forwardEverything(volume, 'takeover: what this node played goes to its own replicas first');
      await v.discardChanges(); // the change log held the primary's playback; the new primary's starts empty
      const now = ctx.platform.clock.now();
      takenOverAtMs = now;
      const pair: PairRecord = {
        id: m.newPairId,
        peerHost: m.returnHost || link.remoteAddress,
        peerPort: m.returnPort,
        remoteVolume: up.primaryVolume,
        cutIntervalMs: L.cutIntervalMsDefault,
        highWaterBytes: L.cutHighWaterBytesDefault,
        retriesBeforeSuspend: L.retriesBeforeSuspendDefault,
        // The old primary becomes this pair's replica: the identity it proved stays bound.
        peerIdentity: up.peerIdentity ?? null,
        // A sync pair stays sync in the other direction.
        ...syncConfigOf(up.sync),
        createdAt: new Date(now).toISOString(),
        ackedSet: baseSet,
        playedSet: baseSet,
        initialCopy: { done: true, baseSet, baseSnapshot: null, totalBytes: 0, kind: 'full' },
        operatorSuspended: false,
        detached: false,
        catchUp: null,
      };
      const report = { atRiskSinceMs: null, lastContactMs: now, seconds: 0, setsNotHere: [], setsDropped: [], bytesAtMost: 0, consistent: true };
      role.transition(
        {
          t: 'took-over',
          generation: generationBefore + 1,
          pair,
          failover: { kind: 'planned', fromPairId: up.pairId, fromVolume: up.primaryVolume, fromIdentity: up.peerIdentity ?? null, generationBefore, atMs: now, restartSnapshot: null, restartSet: m.lastSet, knownUpTo: m.lastSet, unplayedBlocks: 0, resyncPairId: m.newPairId, report, sync: up.sync ?? null },
        },
        { how, lastSet: m.lastSet, newPair: m.newPairId },
      );
    } catch (e) {
      if (role.role === 'replica') {
        rv.resumeAfterHalt();
        if (!link.closed) link.send({ t: 'handoverAbort', reason: (e as Error).message });
      }
      throw e;
    }
    const rtoMs = ctx.platform.clock.now() - started;
    if (!link.closed) link.send({ t: 'handoverCommit', generation: role.generation, newPairId: m.newPairId, atMs: takenOverAtMs });
    await ctx.closeReplica(volume);
    const r = ctx.replicator(volume);
    r.start(); // its sender dials the old primary as the new pair (a cascade's middle had a replicator already)
    r.holdCuts(false); // (the new pair holds what it needs from here)
    ctx.log.info({ volume, generation: role.generation, lastSet: m.lastSet, rtoMs, setsPlayed: played.length, how }, `${how}: this volume is now the primary, nothing lost`);
    return { volume, generation: role.generation, previousGeneration: generationBefore, lastSet: m.lastSet, rtoMs, lostWrites: 0, how };
  } catch (e) {
    fwd?.holdCuts(false);
    throw e;
  }
}
