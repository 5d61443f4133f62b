// Why: when the primary site is gone, its replica must become the primary with a known,
// small loss (seed 001 FIG. 21–23, 32; seed 000 claims 1, 12–14; seed 002's data-loss
// report). In order: stop taking the old primary's session; play every complete set
// received (unless --now); take the restart-point snapshot stamped with the last set
// played and start a fresh change log from it (both at one consistent point); record the
// blocks of sets held but not played (a resync needs them); then, in one durable
// transition, become a writable primary one generation up. The report says what may be
// lost: the sets the old primary had cut that never completed here, the writes it made
// since the oldest one this node does not hold, and whether the volume is at a point in time.
//
// Crash safety: everything before the transition is repeatable (a crash leaves a replica
// that a second `failover` finishes); the transition is the commit point.

import { DeltavolError } from '../util/errors.js';
import { PagedBitmap } from '../bitmap/paged-bitmap.js';
import { ReplicaVolume, heldBeforeMs } from '../replication/replica.js';
import type { RecoveryContext } from './context.js';
import type { FailoverRecord, LossReport } from './role-record.js';

export const UNPLAYED_FILE = 'failover-unplayed.json';

export interface FailoverOptions {
  /** Skip the playback of sets received but not played (fastest; they count as lost). */
  now: boolean;
  /** Take over although the primary is connected, or the initial copy is not done. */
  force: boolean;
}

export interface FailoverResult {
  volume: string;
  generation: number;
  previousGeneration: number;
  restartPoint: { snapshot: string | null; set: number };
  setsPlayed: number[];
  report: LossReport;
  /** From the command to a writable primary. */
  rtoMs: number;
  warnings: string[];
  /**
   * The middle of a cascade: its own replicas and what each lacks of this volume as it
   * takes over (they catch up from it by themselves; nothing of theirs is lost).
   */
  downstream: { volume: string; peer: string; connected: boolean; playedSet: number; lastSet: number; bytesDifferent: number; lagSeconds: number }[];
}

export function restartSnapshotName(generation: number): string {
  return `restart-g${generation}`;
}

export async function failover(ctx: RecoveryContext, volume: string, o: FailoverOptions): Promise<FailoverResult> {
  const started = ctx.platform.clock.now();
  const role = ctx.role(volume);
  if (role.role !== 'replica') {
    throw new DeltavolError('ROLE_CONFLICT', role.role === 'primary' ? `volume ${volume} is already a primary (generation ${role.generation})` : `volume ${volume} is not a replica: nothing to fail over`);
  }
  const rv = ctx.replica(volume);
  if (!rv) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume}: its replica side is not running`);
  const up = role.upstream!;
  const warnings: string[] = [];
  if (rv.primaryAlive && !o.force) {
    throw new DeltavolError(
      'ROLE_CONFLICT',
      `the primary ${up.primaryVolume} is connected: \`deltavol failover ${volume} --sync\` takes over without loss; --force takes over anyway (the old primary is fenced when it next reaches this node)`,
    );
  }
  if (up.split && !o.force) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is split from its primary (written here since): --force takes over with those writes`);
  if (!up.initialCopy.done) {
    if (!o.force) {
      throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} has not finished its initial copy (${up.initialCopy.offsetBytes} of ${rv.port.sizeBytes} bytes): it is not a usable copy; --force takes it over anyway`);
    }
    warnings.push('the initial copy was not done: the volume is not a usable copy of the primary, and a resync of the old primary will copy everything');
  }
  if (rv.primaryAlive) warnings.push('the primary was connected: it is fenced when it next reaches this node, and its writes since the restart point are kept aside at its resync');

  // 1. No more session with the old primary; play what is complete (or not, with --now).
  rv.endSession('failover');
  const generationBefore = role.generation;
  const { played, dropped } = await rv.halt(o.now);
  const report = lossReport(rv, dropped.map((s) => s.set), o.now ? dropped.reduce((n, s) => n + s.dataBytes, 0) : 0, up.playedCutAtMs, ctx.platform.clock.now(), up.split ? (up.splitAtMs ?? null) : null, up.wholeCutAtMs ?? null);
  if (!up.consistent) warnings.push('the last set played was partial: the volume is between two points in time of the primary and may not be crash-consistent (run fsck)');

  // 2. The restart point and a fresh change log, at one consistent point. (The middle of a
  // cascade first cuts what it played for its own replicas: they keep following it.)
  await ctx.forwardEverything(volume, 'failover: what this node played goes to its own replicas first');
  const fwd = ctx.openedReplicator(volume);
  const downstream = (fwd?.pairs ?? []).map((p) => {
    const snd = fwd!.senders.get(p.id);
    return { volume: p.remoteVolume, peer: `${p.peerHost}:${p.peerPort}`, connected: snd?.connected ?? false, playedSet: p.playedSet, lastSet: fwd!.outbound.lastSet, bytesDifferent: snd?.bytesDifferent() ?? 0, lagSeconds: fwd!.lagMs(p) / 1000 };
  });
  const v = ctx.host.require(volume);
  const restart = up.initialCopy.done ? restartSnapshotName(generationBefore + 1) : null;
  if (restart && v.snapshots().some((s) => s.name === restart)) await v.deleteSnapshot(restart, true); // a failover that crashed before its commit
  if (restart) await v.snapshotAndForget(restart, up.playedSet);
  else await v.discardChanges();

  // 3. What was held but not played travels at the resync (durable before the commit).
  const unplayed = ReplicaVolume.blocksOf(dropped);
  const bits = new PagedBitmap(v.blocksTotal);
  for (const [b, c] of unplayed) if (b + c <= v.blocksTotal) bits.setRange(b, c);
  ctx.stateFs(volume).writeAtomic(UNPLAYED_FILE, Buffer.from(JSON.stringify(bits.runs())));

  // 4. The commit point.
  const record: FailoverRecord = {
    kind: 'unplanned',
    fromPairId: up.pairId,
    fromVolume: up.primaryVolume,
    fromIdentity: up.peerIdentity ?? null,
    generationBefore,
    atMs: ctx.platform.clock.now(),
    restartSnapshot: restart,
    restartSet: up.playedSet,
    knownUpTo: rv.chainHeadSet,
    unplayedBlocks: bits.count(),
    resyncPairId: null,
    report,
    sync: up.sync ?? null,
  };
  role.transition({ t: 'failed-over', failover: record }, { restartSet: record.restartSet, now: o.now, report });
  const rtoMs = ctx.platform.clock.now() - started;

  // 5. Tidy up: the replica side goes, the primary side opens (no pairs yet).
  await ctx.closeReplica(volume);
  ctx.replicator(volume);
  ctx.log.warn({ volume, generation: role.generation, restartSnapshot: restart, restartSet: record.restartSet, rtoMs, lostSeconds: report.seconds, setsNotHere: report.setsNotHere, setsDropped: report.setsDropped }, 'failover: this volume is now the primary');
  return {
    volume,
    generation: role.generation,
    previousGeneration: generationBefore,
    restartPoint: { snapshot: restart, set: record.restartSet },
    setsPlayed: played,
    report,
    rtoMs,
    warnings,
    downstream,
  };
}

/**
 * What a failover now loses: the writes the old primary acknowledged after atRiskSinceMs
 * (every one before is here; at the latest its last report's time, since what it did
 * after is unknown here; null: nothing is known), the sets it had cut that never
 * completed here, and the sets dropped unplayed (--now).
 */
export function lossReport(rv: ReplicaVolume, dropped: number[], droppedBytes: number, playedCutAtMs: number | null, nowMs: number, splitAtMs: number | null = null, wholeCutAtMs: number | null = null): LossReport {
  const r = rv.lastReport;
  const lastContact = rv.lastContactMs;
  const head = rv.chainHeadSet;
  const setsNotHere: number[] = [];
  if (r) for (let s = Math.max(head, ...dropped) + 1; s <= r.lastSet && setsNotHere.length < 1000; s++) setsNotHere.push(s);
  // The primary's last report holds unless sets it may have counted as held were dropped:
  // only sets acknowledged here when it arrived. Simulator seed 5300991: a replica whose
  // sync stream a restart had cut (not consistent) dropped two sets it received after the
  // last report; the report, which had not counted them, was set aside, no bound was left,
  // and the failover said nothing was at risk while 30 acknowledged writes were lost.
  const reportHolds = r !== null && dropped.every((s) => r.heldSet !== undefined && s > r.heldSet);
  let since = heldBeforeMs(reportHolds ? r : null, { consistent: rv.info.consistent, playedCutAtMs, wholeCutAtMs });
  // A split pair: every write of the primary since the split is not here.
  if (splitAtMs !== null && since !== null) since = Math.min(since, splitAtMs);
  const until = lastContact ?? nowMs;
  return {
    atRiskSinceMs: since,
    lastContactMs: lastContact,
    seconds: since === null ? 0 : Math.max(0, (until - since) / 1000),
    setsNotHere,
    setsDropped: dropped,
    bytesAtMost: (since === null ? 0 : (r?.bytesDifferent ?? 0)) + droppedBytes,
    consistent: rv.info.consistent,
  };
}
