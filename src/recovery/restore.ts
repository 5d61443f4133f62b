// Why: a primary damaged by its own clients (ransomware, a bad script, a broken file system)
// must be rolled back to its replica's content — its current state or one of its snapshots
// — moving only the blocks that differ, never the whole volume (seed 003). What differs:
//   - blocks the replica changed since the snapshot S (its differential S → now), and the
//     blocks of sets it holds whole but has not played yet;
//   - blocks this primary changed that the replica may not have: its change log (with a
//     set being built), its pairs' pending bitmaps and every set still in its outbound log.
// Everything else is equal on both sides (the replica played this primary's sets up to
// S's set; later ones are in one of the two lists). The primary's side is read before the
// replica's, with client writes refused, so a set released between the two is on the
// replica's list (it was acknowledged whole there).
//
// The blocks come from the replica's snapshot over a connection of its own (restoreRead /
// restoreData, checksummed, a few requests in flight) and are written through this
// volume's engine like any write: the change log records them, so the next delta sets
// carry them back to the replica, and the local snapshot VOLUME@before-restore-… taken
// first keeps what they overwrite. Client writes are refused (EPERM) from the start to the
// end; the role record holds the restore, so after a crash the volume stays closed to
// writes until `deltavol restore` runs again and finishes (it recomputes the list: blocks
// already restored are in this side's change log and travel again, harmlessly).
//
// In messages, primary P → replica R:
//   P → restoreHello {pair, generation, snapshot}   R: checks the pair; snapshot '' → one now
//   R → restoreRuns… restoreOffer {snapshot, set}   P: the union above; then for each batch
//   P → restoreRead {id, runs}   R → restoreData {id, runs, holes, crc} + blocks
//   P → restoreDone                                  R: drops a temporary snapshot

import { DeltavolError } from '../util/errors.js';
import { PagedBitmap } from '../bitmap/paged-bitmap.js';
import { crc32cParts } from '../util/crc32c-parts.js';
import { publicRefusal } from '../replication/refusal.js';
import type { Link } from '../replication/link.js';
import { PROTOCOL_VERSION, type Frame, type ReplMessage, type Runs } from '../replication/wire.js';
import * as L from '../replication/limits.js';
import type { HostedVolume } from '../replication/ports.js';
import type { RecoveryContext } from './context.js';
import type { PairRecord } from './role-record.js';
import { Session } from './session.js';

/** Runs per restoreRuns / restoreRead frame (well under the message limit). */
const runsPerFrame = 20_000;
/** Waiting for the replica's offer (it may take a snapshot at the next barrier first). */
const offerMsMax = 60_000;
/** Waiting for one batch of blocks. */
const dataMsMax = 60_000;
const TEMPORARY_PREFIX = 'restore-point-';

type RestoreHello = Extract<ReplMessage, { t: 'restoreHello' }>;

export interface RestoreOptions {
  /** The replica's snapshot to restore (absent: its current state). */
  snapshot?: string;
  /** Restore although clients are connected (they see the blocks change under them). */
  force?: boolean;
  /** The pair of the replica to restore from (needed when the volume has several). */
  peerHost?: string;
  peerPort?: number;
  /** End an interrupted restore without finishing it (the volume stays as it is, mixed). */
  abandon?: boolean;
}

export interface RestorePlan {
  volume: string;
  peer: string;
  pairId: string;
  /** The replica's snapshot restored (for its current state: a temporary one, dropped at the end). */
  snapshot: string;
  temporary: boolean;
  /** The last of this volume's sets the snapshot holds. */
  replicaSet: number;
  /** This volume's state before the restore. */
  beforeSnapshot: string;
  /** An interrupted restore is being finished. */
  resumed: boolean;
  /** Blocks the replica changed since the snapshot (or holds unplayed). */
  blocksChangedOnReplica: number;
  /** Blocks this volume changed that the replica may not have. */
  blocksChangedHere: number;
  /** The blocks that travel (the union), and the volume's blocks, to compare. */
  blocksToCopy: number;
  blocksTotal: number;
  blockBytes: number;
}

export interface RestoreProgress extends RestorePlan {
  state: 'copying' | 'done' | 'failed';
  blocksDone: number;
  /** Block data received from the replica. */
  bytesFetched: number;
  /** Bytes zeroed here (blocks that held no data in the snapshot: they do not travel). */
  bytesZeroed: number;
  startedAt: string;
  seconds: number;
  error: string | null;
}

/** Restores per node and volume: the one running, or the last one (status). */
const restoresByNode = new WeakMap<RecoveryContext, Map<string, RestoreProgress>>();

function restores(ctx: RecoveryContext): Map<string, RestoreProgress> {
  let m = restoresByNode.get(ctx);
  if (!m) restoresByNode.set(ctx, (m = new Map()));
  return m;
}

/**
 * What status shows of a volume's restore: the running or last one here, or one recorded
 * but not running (interrupted by a crash: run it again).
 */
export function restoreStatus(ctx: RecoveryContext, volume: string): (Omit<Partial<RestoreProgress>, 'state'> & { state: string }) | null {
  const p = restores(ctx).get(volume);
  if (p) return { ...p };
  const rec = ctx.role(volume).state.restore ?? null;
  if (!rec) return null;
  return { state: 'interrupted', snapshot: rec.snapshot ?? undefined, beforeSnapshot: rec.beforeSnapshot, pairId: rec.pairId };
}

export function beforeRestoreSnapshotName(atMs: number): string {
  return `before-restore-${new Date(atMs).toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z')}`;
}

/** `deltavol restore VOLUME --abandon`: end an interrupted restore without finishing it. */
export function abandonRestore(ctx: RecoveryContext, volume: string): { volume: string; beforeSnapshot: string } {
  const role = ctx.role(volume);
  ctx.host.require(volume);
  const prior = role.state.restore ?? null;
  if (!prior) throw new DeltavolError('EINVAL_ARGUMENT', `volume ${volume} has no restore under way`);
  if (restores(ctx).get(volume)?.state === 'copying') throw new DeltavolError('VOLUME_BUSY', `the restore of ${volume} is running: wait for it to end`);
  role.transition({ t: 'restore-finished' }, { abandoned: true, beforeSnapshot: prior.beforeSnapshot });
  ctx.log.warn({ volume, beforeSnapshot: prior.beforeSnapshot }, 'restore abandoned: the volume takes writes again, only part restored (its state before is the before-restore snapshot)');
  return { volume, beforeSnapshot: prior.beforeSnapshot };
}

/**
 * `deltavol restore VOLUME --from-replica [--snapshot S]` on the primary. Resolves with
 * the plan once the copy has started; the copy goes on in the background (restoreStatus)
 * and `done` resolves when it ends (failed or not: see its state).
 */
export async function restoreFromReplica(ctx: RecoveryContext, volume: string, o: RestoreOptions): Promise<{ plan: RestorePlan; done: Promise<RestoreProgress> }> {
  const role = ctx.role(volume);
  const v = ctx.host.require(volume);
  const running = restores(ctx).get(volume);
  if (running?.state === 'copying') throw new DeltavolError('VOLUME_BUSY', `volume ${volume} is being restored already (${running.blocksDone} of ${running.blocksToCopy} blocks)`);
  const prior = role.state.restore ?? null;
  if (role.role === 'replica') throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is a replica: restore its primary, or fail over first`);
  if (role.state.fenced) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is fenced (a newer primary exists at ${role.state.fenced.peer}): resync it instead`);
  if (role.state.handover) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is in a planned handover`);
  const pair = pickPair(volume, role.pairs as PairRecord[], prior?.pairId ?? null, o);
  if (!pair.initialCopy.done) throw new DeltavolError('ROLE_CONFLICT', `the replica ${pair.remoteVolume} at ${pair.peerHost}:${pair.peerPort} has not finished its initial copy: it holds no whole state to restore`);
  const wanted = o.snapshot ?? null;
  if (wanted !== null && (wanted === '' || wanted.startsWith(TEMPORARY_PREFIX))) throw new DeltavolError('EINVAL_ARGUMENT', `bad snapshot name ${JSON.stringify(wanted)}`);
  if (prior && prior.snapshot !== wanted) {
    throw new DeltavolError('EINVAL_ARGUMENT', `an interrupted restore of ${volume} from ${prior.snapshot === null ? "the replica's current state" : `snapshot ${prior.snapshot}`} must be finished first (run it again with the same --snapshot, or --abandon it)`);
  }
  const clients = v.clientCount();
  if (clients > 0 && !o.force) {
    throw new DeltavolError('VOLUME_BUSY', `volume ${volume} has ${clients} connected client(s): disconnect them (their caches would be wrong after the restore) or use --force`);
  }

  const s = await Session.open(ctx, pair.peerHost, pair.peerPort, 'the replica');
  let handedOff = false;
  /** This call recorded the restore and nothing was written yet: a refusal undoes the record. */
  let startedHere = false;
  try {
    // The replica's content is about to become this volume's: over TLS it must be the
    // identity the pair is bound to.
    if (s.peerIdentity !== null && pair.peerIdentity && pair.peerIdentity !== s.peerIdentity) {
      throw new DeltavolError('PEER_REFUSED', `${pair.peerHost}:${pair.peerPort} is ${s.peerIdentity}, but the pair of ${volume} is bound to ${pair.peerIdentity}: not restoring from it`);
    }
    // From here clients may not write (durable: after a crash the volume stays closed to writes).
    const now = ctx.platform.clock.now();
    const beforeSnapshot = prior?.beforeSnapshot ?? beforeRestoreSnapshotName(now);
    if (!prior) {
      if (v.snapshots().some((x) => x.name === beforeSnapshot)) throw new DeltavolError('SNAPSHOT_EXISTS', `snapshot ${volume}@${beforeSnapshot} exists already: try again in a second`);
      role.transition({ t: 'restore-started', restore: { pairId: pair.id, snapshot: wanted, beforeSnapshot, atMs: now } }, { peer: `${pair.peerHost}:${pair.peerPort}`, snapshot: wanted });
      startedHere = true;
    }
    await v.writesIdle();
    // This side's changes the replica may lack, read before the replica's list (see the top).
    const here = changedHere(ctx, volume, v);
    s.send({ t: 'restoreHello', protocol: PROTOCOL_VERSION, pairId: pair.id, primaryVolume: volume, replicaVolume: pair.remoteVolume, generation: role.generation, snapshot: wanted ?? '' });
    const there = new PagedBitmap(v.blocksTotal);
    let offer: Extract<ReplMessage, { t: 'restoreOffer' }>;
    for (;;) {
      const f = await s.nextFrame(ctx, ['restoreRuns', 'restoreOffer'], offerMsMax);
      if (f.msg.t === 'restoreOffer') {
        offer = f.msg;
        break;
      }
      if (f.msg.t !== 'restoreRuns') continue;
      for (const [b, c] of f.msg.runs) {
        if (b + c > v.blocksTotal) throw new DeltavolError('PEER_REFUSED', `the replica listed blocks ${b}+${c}, past the volume's ${v.blocksTotal}`);
        there.setRange(b, c);
      }
    }
    if (offer.sizeBytes !== v.sizeBytes || offer.blockBytes !== v.blockBytes) {
      throw new DeltavolError('GEOMETRY', `the replica's snapshot is ${offer.sizeBytes} bytes in ${offer.blockBytes}-byte blocks; ${volume} is ${v.sizeBytes} in ${v.blockBytes}`);
    }
    if (offer.changedBlocks !== there.count()) throw new DeltavolError('PEER_REFUSED', `the replica announced ${offer.changedBlocks} changed blocks and listed ${there.count()}`);
    const blocks = here.clone();
    blocks.union(there);
    // Keep what the restore overwrites (an interrupted restore made it already, before any write).
    if (!v.snapshots().some((x) => x.name === beforeSnapshot)) await v.createSnapshot(beforeSnapshot, 0);
    const plan: RestorePlan = {
      volume,
      peer: `${pair.peerHost}:${pair.peerPort}`,
      pairId: pair.id,
      snapshot: offer.snapshot,
      temporary: offer.temporary,
      replicaSet: offer.set,
      beforeSnapshot,
      resumed: prior !== null,
      blocksChangedOnReplica: there.count(),
      blocksChangedHere: here.count(),
      blocksToCopy: blocks.count(),
      blocksTotal: v.blocksTotal,
      blockBytes: v.blockBytes,
    };
    const progress: RestoreProgress = { ...plan, state: 'copying', blocksDone: 0, bytesFetched: 0, bytesZeroed: 0, startedAt: new Date(now).toISOString(), seconds: 0, error: null };
    restores(ctx).set(volume, progress);
    ctx.log.info({ ...plan }, 'restore from the replica: copying the blocks that differ');
    handedOff = true;
    const done = copyBlocks(ctx, v, s, blocks, progress).finally(() => s.close('restore session over'));
    return { plan, done };
  } catch (e) {
    // Refused or cut off before any block was written: the volume is as it was.
    if (startedHere && role.state.restore) role.transition({ t: 'restore-finished' }, { refused: (e as Error).message });
    throw e;
  } finally {
    if (!handedOff) s.close('restore session over');
  }
}

/** Fetches the blocks from the replica and writes them here; ends the restore. Never throws. */
async function copyBlocks(ctx: RecoveryContext, v: HostedVolume, s: Session, blocks: PagedBitmap, p: RestoreProgress): Promise<RestoreProgress> {
  const started = ctx.platform.clock.now();
  const bs = v.blockBytes;
  const perRequest = Math.max(1, Math.floor(L.restoreReadBytesMax / bs));
  try {
    const requests = batches(blocks, perRequest);
    const inFlight: { id: number; blocks: number }[] = [];
    let id = 0;
    for (let more = true; more || inFlight.length > 0; ) {
      while (more && inFlight.length < L.restoreReadsInFlight) {
        const next = requests.next();
        if (next.done) {
          more = false;
          break;
        }
        const runs = next.value;
        s.send({ t: 'restoreRead', id: ++id, runs });
        let n = 0;
        for (const [, c] of runs) n += c;
        inFlight.push({ id, blocks: n });
      }
      const want = inFlight.shift();
      if (!want) break;
      const f = await s.nextFrame(ctx, 'restoreData', dataMsMax);
      const m = f.msg as Extract<ReplMessage, { t: 'restoreData' }>;
      if (m.id !== want.id) throw new DeltavolError('PEER_REFUSED', `restore data ${m.id} arrived, ${want.id} was next`);
      await applyData(v, m, f.parts, p);
      p.blocksDone += want.blocks;
      p.seconds = (ctx.platform.clock.now() - started) / 1000;
    }
    await v.flush();
    s.send({ t: 'restoreDone' });
    ctx.role(p.volume).transition({ t: 'restore-finished' }, { blocks: p.blocksDone, bytesFetched: p.bytesFetched, bytesZeroed: p.bytesZeroed });
    // The restored blocks are changes like any: ship them to the replicas soon.
    ctx.openedReplicator(p.volume)?.cutSoon('restored from the replica');
    p.state = 'done';
    p.seconds = (ctx.platform.clock.now() - started) / 1000;
    ctx.log.info({ volume: p.volume, blocks: p.blocksDone, bytesFetched: p.bytesFetched, bytesZeroed: p.bytesZeroed, seconds: p.seconds }, 'restore from the replica done');
  } catch (e) {
    p.state = 'failed';
    p.error = (e as Error).message;
    p.seconds = (ctx.platform.clock.now() - started) / 1000;
    ctx.log.error({ volume: p.volume, err: p.error, blocksDone: p.blocksDone }, 'restore from the replica failed: writes stay refused; run `deltavol restore` again to finish it');
  }
  return p;
}

/** The runs of `blocks` in batches of at most `perBatch` blocks and runsPerFrame runs. */
function* batches(blocks: PagedBitmap, perBatch: number): Generator<Runs> {
  let runs: Runs = [];
  let n = 0;
  for (let at = blocks.nextSet(0); at >= 0; ) {
    const end = blocks.nextClear(at);
    const stop = end < 0 ? blocks.bitsTotal : end;
    for (let b = at; b < stop; ) {
      const c = Math.min(stop - b, perBatch - n);
      runs.push([b, c]);
      n += c;
      b += c;
      if (n === perBatch || runs.length === runsPerFrame) {
        yield runs;
        runs = [];
        n = 0;
      }
    }
    at = stop >= blocks.bitsTotal ? -1 : blocks.nextSet(stop);
  }
  if (runs.length > 0) yield runs;
}

/** Writes one restoreData answer: its blocks from the data part, its holes as zeroes. */
async function applyData(v: HostedVolume, m: Extract<ReplMessage, { t: 'restoreData' }>, parts: readonly Buffer[], p: RestoreProgress): Promise<void> {
  const bs = v.blockBytes;
  const data = parts.length === 1 ? parts[0]! : Buffer.concat(parts as Buffer[]);
  let holeBlocks = 0;
  let all = 0;
  for (const [, c] of m.holes) holeBlocks += c;
  for (const [, c] of m.runs) all += c;
  if (data.length !== (all - holeBlocks) * bs) throw new DeltavolError('PEER_REFUSED', `restore data ${m.id}: ${data.length} bytes for ${all - holeBlocks} blocks of ${bs}`);
  if (crc32cParts(parts) !== m.crc) throw new DeltavolError('BAD_STREAM', `restore data ${m.id}: checksum mismatch`);
  const size = v.sizeBytes;
  let at = 0;
  let hi = 0;
  const holes = m.holes;
  for (const [b, n] of m.runs) {
    const end = b + n;
    for (let x = b; x < end; ) {
      while (hi < holes.length && holes[hi]![0] + holes[hi]![1] <= x) hi++;
      const h = holes[hi];
      const inHole = h !== undefined && h[0] <= x;
      const e = inHole ? Math.min(end, h[0] + h[1]) : Math.min(end, h ? h[0] : end);
      const off = x * bs;
      const len = Math.min(e * bs, size) - off;
      if (inHole) {
        await v.playbackZero(off, len);
        p.bytesZeroed += len;
      } else {
        await v.playbackWrite(off, [data.subarray(at, at + len)]);
        at += (e - x) * bs;
        p.bytesFetched += (e - x) * bs;
      }
      x = e;
    }
  }
}

function pickPair(volume: string, pairs: PairRecord[], priorId: string | null, o: RestoreOptions): PairRecord {
  if (priorId !== null) {
    const p = pairs.find((x) => x.id === priorId);
    if (!p) throw new DeltavolError('ROLE_CONFLICT', `the pair ${priorId} of the interrupted restore is gone`);
    if (o.peerHost !== undefined && (p.peerHost !== o.peerHost || p.peerPort !== o.peerPort)) throw new DeltavolError('EINVAL_ARGUMENT', `an interrupted restore from ${p.peerHost}:${p.peerPort} must be finished first`);
    return p;
  }
  if (pairs.length === 0) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} has no replica to restore from`);
  if (o.peerHost !== undefined) {
    const p = pairs.find((x) => x.peerHost === o.peerHost && x.peerPort === o.peerPort);
    if (!p) throw new DeltavolError('EINVAL_ARGUMENT', `volume ${volume} has no pair with ${o.peerHost}:${o.peerPort}`);
    return p;
  }
  if (pairs.length > 1) throw new DeltavolError('EINVAL_ARGUMENT', `volume ${volume} has ${pairs.length} replicas: give --peer HOST:PORT of the one to restore from`);
  return pairs[0]!;
}

/** Blocks this volume changed that its replicas may not hold: uncut, pending, in outbound sets. */
function changedHere(ctx: RecoveryContext, volume: string, v: HostedVolume): PagedBitmap {
  const bits = v.changedBlocks();
  const r = ctx.openedReplicator(volume);
  if (r) {
    for (const p of ctx.role(volume).pairs) bits.union(r.pendingOf(p.id));
    for (const set of r.outbound.sets) for (const [b, c] of r.outbound.setBlocks(set)) if (b + c <= v.blocksTotal) bits.setRange(b, c);
  }
  return bits;
}

// ================= the replica's side =================

interface Serving {
  volume: HostedVolume;
  snapshot: string;
  temporary: boolean;
  /** Blocks that held data in the snapshot (the others travel as holes). */
  valid: PagedBitmap;
}

/** A restoreHello arrived on the replication port: the frame handler for the rest of that session. */
export function serveRestore(ctx: RecoveryContext, link: Link, hello: RestoreHello): (f: Frame) => void {
  let serving: Serving | null = null;
  let dropped = false;
  const refuse = (e: Error) => {
    if (link.closed) return;
    const err = e as DeltavolError;
    ctx.log.warn({ volume: hello.replicaVolume, from: link.remoteAddress, peer: link.conn.peerIdentity, code: err.code, err: e.message }, 'restore request refused');
    link.send({ t: 'refuse', code: err.code ?? 'ERROR', message: publicRefusal(link.conn.peerIdentity, err.code ?? 'ERROR', e), generation: 0 });
    link.close(`restore refused: ${e.message}`);
  };
  const dropTemporary = async () => {
    const sv = serving;
    if (!sv?.temporary || dropped) return;
    dropped = true;
    await sv.volume.deleteSnapshot(sv.snapshot, true).catch((e: Error) => ctx.log.warn({ volume: sv.volume.name, snapshot: sv.snapshot, err: e.message }, 'could not drop the restore-point snapshot'));
  };
  let cancelIdle = ctx.platform.clock.after(L.restoreIdleMsMax, () => link.close('restore session idle'));
  link.onClose(() => {
    cancelIdle();
    void queue.then(dropTemporary);
  });
  // Frames are handled one at a time, in order, behind the offer.
  let queue: Promise<void> = offerRestore(ctx, link, hello).then(
    (sv) => {
      serving = sv;
    },
    refuse,
  );
  return (f) => {
    if (link.closed) return;
    cancelIdle();
    cancelIdle = ctx.platform.clock.after(L.restoreIdleMsMax, () => link.close('restore session idle'));
    const m = f.msg;
    if (m.t === 'restoreRead') {
      queue = queue.then(() => (serving && !link.closed ? serveRead(link, serving, m) : undefined)).catch(refuse);
      return;
    }
    if (m.t === 'restoreDone') {
      queue = queue.then(dropTemporary).then(() => link.close('restore done'));
      return;
    }
    refuse(new DeltavolError('PEER_REFUSED', `unexpected ${m.t} in a restore session`));
  };
}

async function offerRestore(ctx: RecoveryContext, link: Link, hello: RestoreHello): Promise<Serving> {
  const name = hello.replicaVolume;
  const v = ctx.host.get(name);
  if (!v) throw new DeltavolError('VOLUME_NOT_FOUND', `no volume ${name} on this node`);
  const role = ctx.role(name);
  const up = role.upstream;
  if (role.role !== 'replica' || !up) throw new DeltavolError('ROLE_CONFLICT', `volume ${name} is not a replica on this node`);
  if (up.pairId !== hello.pairId) throw new DeltavolError('ROLE_CONFLICT', `volume ${name} is the replica of pair ${up.pairId}, not ${hello.pairId}`);
  // Its content goes only to the primary the pair is bound to (over TLS: that identity).
  const peer = link.conn.peerIdentity;
  if (up.peerIdentity && peer !== up.peerIdentity) throw new DeltavolError('PEER_REFUSED', `volume ${name}: its pair is bound to ${up.peerIdentity}, the restore came from ${peer ?? 'an unauthenticated peer'}`);
  if (hello.generation !== role.generation) throw new DeltavolError('ROLE_CONFLICT', `volume ${name} is at generation ${role.generation}, the primary at ${hello.generation}`);
  if (!up.initialCopy.done || up.resync) throw new DeltavolError('ROLE_CONFLICT', `volume ${name} has not finished its initial copy: it holds no whole state`);
  const rv = ctx.replica(name);
  if (!rv) throw new DeltavolError('ROLE_CONFLICT', `volume ${name}: its replica side is not running`);
  let snapshot = hello.snapshot;
  let temporary = false;
  if (snapshot === '') {
    if (!up.consistent) throw new DeltavolError('ROLE_CONFLICT', `volume ${name} is between two points in time of its primary (a partial set or a stream cut short): wait until it caught up, or name a snapshot`);
    // Restore points of sessions that ended without dropping theirs (a crash) go first.
    for (const x of v.snapshots()) if (x.name.startsWith(TEMPORARY_PREFIX)) await v.deleteSnapshot(x.name, true);
    snapshot = TEMPORARY_PREFIX + ctx.platform.newId();
    await rv.createSnapshot(snapshot);
    temporary = true;
  }
  const info = v.snapshots().find((x) => x.name === snapshot);
  if (!info) throw new DeltavolError('SNAPSHOT_NOT_FOUND', `volume ${name} has no snapshot ${snapshot}`);
  if (!info.valid) throw new DeltavolError('SNAPSHOT_INVALID', `snapshot ${name}@${snapshot} is invalid (its save area filled)`);
  if (info.sizeBytes !== v.sizeBytes) throw new DeltavolError('GEOMETRY', `snapshot ${name}@${snapshot} is ${info.sizeBytes} bytes, the volume ${v.sizeBytes} now`);
  const serving: Serving = { volume: v, snapshot, temporary, valid: v.snapshotValidBlocks(snapshot) };
  try {
    // Changed here since the snapshot, and held whole but not played (the primary may have released those sets).
    const d = v.differenceBlocks(snapshot, null);
    const changed = d.data;
    changed.union(d.zero);
    changed.union(rv.heldBlocks());
    let runs: Runs = [];
    for (const r of changed.runs()) {
      runs.push(r);
      if (runs.length === runsPerFrame) {
        link.send({ t: 'restoreRuns', runs });
        runs = [];
        await link.drainBelow(L.socketQueueBytesMax);
      }
    }
    if (runs.length > 0) link.send({ t: 'restoreRuns', runs });
    link.send({ t: 'restoreOffer', snapshot, set: info.deltaSetNumber, temporary, changedBlocks: changed.count(), sizeBytes: v.sizeBytes, blockBytes: v.blockBytes });
    ctx.log.info({ volume: name, primary: hello.primaryVolume, from: link.remoteAddress, snapshot, temporary, set: info.deltaSetNumber, changedBlocks: changed.count() }, 'restore of the primary from this replica');
    return serving;
  } catch (e) {
    if (temporary) await v.deleteSnapshot(snapshot, true).catch(() => undefined);
    throw e;
  }
}

/** Answers one restoreRead with the snapshot's blocks (holes as runs, not bytes). */
async function serveRead(link: Link, sv: Serving, m: Extract<ReplMessage, { t: 'restoreRead' }>): Promise<void> {
  const v = sv.volume;
  const bs = v.blockBytes;
  const perRequest = Math.max(1, Math.floor(L.restoreReadBytesMax / bs));
  let total = 0;
  for (const [b, c] of m.runs) {
    if (b + c > v.blocksTotal) throw new DeltavolError('EINVAL_ARGUMENT', `blocks ${b}+${c} are past the volume's ${v.blocksTotal}`);
    total += c;
  }
  if (total > perRequest || m.runs.length > runsPerFrame) throw new DeltavolError('EINVAL_ARGUMENT', `a restore read of ${total} blocks in ${m.runs.length} runs (at most ${perRequest} in ${runsPerFrame})`);
  const holes: Runs = [];
  const spans: [number, number][] = [];
  let dataBlocks = 0;
  for (const [b, c] of m.runs) {
    for (let x = b; x < b + c; ) {
      const valid = sv.valid.test(x);
      let e = valid ? sv.valid.nextClear(x) : sv.valid.nextSet(x);
      if (e < 0 || e > b + c) e = b + c;
      if (valid) {
        spans.push([x, e - x]);
        dataBlocks += e - x;
      } else holes.push([x, e - x]);
      x = e;
    }
  }
  const data = Buffer.alloc(dataBlocks * bs);
  let at = 0;
  for (const [b, c] of spans) {
    const len = Math.min((b + c) * bs, v.sizeBytes) - b * bs;
    v.readSnapshot(sv.snapshot, b * bs, len, data.subarray(at, at + len));
    at += c * bs;
  }
  link.send({ t: 'restoreData', id: m.id, runs: m.runs, holes, crc: crc32cParts(data.length > 0 ? [data] : []) }, data.length > 0 ? [data] : []);
  await link.drainBelow(L.socketQueueBytesMax);
}
