// Why: an old primary that comes back after a failover must become the new primary's
// replica by moving only what differs (seed 001 FIG. 28–29, seed 000 claims 4, 11),
// never by a full copy when its history is there, and never by destroying its own
// acknowledged writes without a way back (what DRBD's discard-my-data and Ceph's resync
// do). What differs since the restart point R (the last set the new primary played):
//   - blocks the old primary changed after R: its sets after R still in its outbound
//     save area, its change log, its pending bitmaps;
//   - blocks of sets the new primary held but did not play (failover --now);
//   - blocks the new primary changed since R (the differential R → base snapshot);
// only those travel, with the new primary's content as of its base snapshot (blocks that
// hold no data there are zeroed), then delta sets follow as for any pair. Before anything
// is overwritten, the old primary keeps its own version in a local snapshot
// (VOLUME@before-resync-gGEN). When its history is gone (no pair record, a gap in its
// sets, another generation), every block is copied, with a warning and the reason.
//
// In messages, on a connection of its own from the old primary A to the new primary B:
//   A → resyncHello {old pair, generation}     B: checks it took over from that pair
//   B → resyncOffer {restartSet, knownUpTo}    A: computes its blocks, keeps its snapshot,
//                                                 becomes B's replica (durable), then
//   A → resyncBlocks… resyncCommit {pairId}    B: registers the pair A recorded (durable)
//   B → resyncAccepted                         B's sender dials A and copies.
// Every step is repeatable: A retries the registration until B has the pair (B answers
// an id it already holds with the same acceptance), and both copy and sets resume after
// a crash of either side.

import crypto from 'node:crypto';
import { DeltavolError } from '../util/errors.js';
import { sleep } from '../util/clock.js';
import { PagedBitmap } from '../bitmap/paged-bitmap.js';
import { publicRefusal } from '../replication/refusal.js';
import type { Link } from '../replication/link.js';
import { PROTOCOL_VERSION, type Frame, type ReplMessage, type Runs } from '../replication/wire.js';
import { Session } from './session.js';
import * as L from '../replication/limits.js';
import type { RecoveryContext } from './context.js';
import { syncConfigOf, type PairConfig, type PairRecord } from './role-record.js';
import { UNPLAYED_FILE } from './failover.js';

const DIVERGENT_FILE = 'resync-divergent.json';
/** Runs per resyncBlocks frame (well under the message limit), and blocks (their digests are its data). */
const runsPerFrame = 20_000;
const blocksPerFrame = 262_144;
const DIGEST_BYTES = 16;
/** The old primary reads the blocks it hashes this much at a time. */
const digestReadBytes = 1024 * 1024;
/** One registration exchange may take this long. */
const sessionMsMax = 60_000;

type Offer = Extract<ReplMessage, { t: 'resyncOffer' }>;
type ResyncHello = Extract<ReplMessage, { t: 'resyncHello' }>;

export interface ResyncOptions {
  /** The new primary's replication address (default: the pair's peer). */
  peerHost?: string;
  peerPort?: number;
  /** The volume's name on the new primary (default: the pair's remote volume, else the same name). */
  peerVolume?: string;
}

export interface ResyncResult {
  volume: string;
  generation: number;
  peer: string;
  full: boolean;
  reason: string;
  /** Blocks this volume had changed since the restart point (kept in beforeSnapshot). */
  divergentBlocks: number;
  beforeSnapshot: string | null;
  restartSet: number;
  /** The new primary recorded the pair (it dials in and copies); false: retried in the background. */
  registered: boolean;
}

export function beforeResyncSnapshotName(generation: number): string {
  return `before-resync-g${generation}`;
}

// ================= the old primary's side =================

/** `deltavol resync VOLUME` on the old primary: become the new primary's replica, moving only what differs. */
export async function resync(ctx: RecoveryContext, volume: string, o: ResyncOptions): Promise<ResyncResult> {
  const role = ctx.role(volume);
  const v = ctx.host.require(volume);
  if (role.role === 'replica') {
    const rs = role.upstream!.resync;
    // The end of a cascade whose middle is lost: move to the middle's primary (--peer).
    if (!rs && o.peerHost !== undefined) return reparent(ctx, volume, o);
    if (!rs) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is already a replica of ${role.upstream!.primaryVolume}: nothing to resync (to move it to another primary, give that primary's --peer HOST:PORT)`);
    // A resync that started but was not yet recorded by the new primary: try again now.
    const registered = rs.registered || (await registerOnce(ctx, volume).then(() => true, () => false));
    if (!registered) keepRegistering(ctx, volume);
    return { volume, generation: role.generation, peer: `${rs.peerHost}:${rs.peerPort}`, full: rs.full, reason: rs.reason, divergentBlocks: rs.divergentBlocks, beforeSnapshot: rs.beforeSnapshot, restartSet: rs.restartSet, registered };
  }
  if (role.state.handover) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is in a planned handover`);
  let pair: PairRecord | undefined;
  if (o.peerHost !== undefined) pair = role.pairs.find((p) => p.peerHost === o.peerHost && p.peerPort === o.peerPort);
  else if (role.pairs.length === 1) pair = role.pairs[0];
  else if (role.pairs.length > 1) throw new DeltavolError('EINVAL_ARGUMENT', `volume ${volume} has ${role.pairs.length} pairs: give --peer HOST:PORT of the one that took over`);
  const peerHost = o.peerHost ?? pair?.peerHost;
  const peerPort = o.peerPort ?? pair?.peerPort;
  if (peerHost === undefined || peerPort === undefined) throw new DeltavolError('EINVAL_ARGUMENT', `volume ${volume} has no pair: give --peer HOST:PORT of the primary to resync from`);
  const peerVolume = o.peerVolume ?? pair?.remoteVolume ?? volume;
  const back = ctx.returnAddress();

  const s = await Session.open(ctx, peerHost, peerPort, 'the new primary');
  try {
    // The volume is about to give up its changes to whoever answers: over TLS, when the
    // pair is bound to an identity, the new primary must be that very replica.
    const peerIdentity = s.peerIdentity;
    if (peerIdentity !== null && pair?.peerIdentity && pair.peerIdentity !== peerIdentity) {
      throw new DeltavolError('PEER_REFUSED', `${peerHost}:${peerPort} is ${peerIdentity}, but the pair of ${volume} is bound to ${pair.peerIdentity}: not resyncing from it`);
    }
    s.send({
      t: 'resyncHello',
      protocol: PROTOCOL_VERSION,
      pairId: pair?.id ?? '',
      primaryVolume: peerVolume,
      replicaVolume: volume,
      generation: role.generation,
      sizeBytes: v.sizeBytes,
      blockBytes: v.blockBytes,
      returnHost: back.host,
      returnPort: back.port,
    });
    const offer = await s.next(ctx, 'resyncOffer', sessionMsMax);
    if (offer.generation < role.generation) {
      throw new DeltavolError('PEER_REFUSED', `${peerVolume} at ${peerHost}:${peerPort} has generation ${offer.generation}, older than this volume's ${role.generation}: resync it from this volume instead`);
    }
    // From here this volume must not change: fence it (if it did not learn of the new
    // primary by itself) and let the writes already running finish.
    if (role.role === 'primary' && (!role.state.fenced || role.state.fenced.overridden)) {
      role.transition({ t: 'fenced', fence: { generation: offer.generation, peer: `${peerVolume}@${peerHost}:${peerPort}`, reason: 'resync requested by the operator', atMs: ctx.platform.clock.now() } });
    }
    await v.writesIdle();
    const { blocks, full, reason } = divergentSince(ctx, volume, pair, offer);
    // Keep this side's version of everything that will be overwritten.
    const before = beforeResyncSnapshotName(offer.generation);
    if (v.snapshots().some((x) => x.name === before)) await v.deleteSnapshot(before, true); // a resync that crashed before its commit
    await v.createSnapshot(before, 0);
    const fsys = ctx.stateFs(volume);
    fsys.writeAtomic(DIVERGENT_FILE, Buffer.from(JSON.stringify(full ? [] : blocks.runs())));
    // Stop shipping: this volume's sets and pending blocks are in the list now.
    const r = ctx.openedReplicator(volume);
    if (r) {
      await r.stopSenders();
      r.outbound.releaseAll();
    }
    const divergentBlocks = full ? v.blocksTotal : blocks.count();
    role.transition(
      {
        t: 'resync-started',
        generation: offer.generation,
        upstream: {
          pairId: offer.pairId,
          peerIdentity,
          primaryVolume: peerVolume,
          playedSet: 0,
          initialCopy: { done: false, offsetBytes: 0, baseSet: 0 },
          consistent: false,
          split: false,
          createdAt: new Date(ctx.platform.clock.now()).toISOString(),
          resync: { peerHost, peerPort, fromPairId: pair?.id ?? '', registered: false, full, reason, divergentBlocks, beforeSnapshot: before, restartSet: offer.restartSet, startedAtMs: ctx.platform.clock.now() },
          playedCutAtMs: null,
          lastReport: null,
        },
      },
      { peer: `${peerHost}:${peerPort}`, full, reason, divergentBlocks, beforeSnapshot: before },
    );
    if (full) ctx.log.warn({ volume, reason, peer: `${peerHost}:${peerPort}` }, `resync needs a FULL copy: ${reason}`);
    await ctx.closeReplicator(volume);
    for (const name of fsys.list()) if (/^pair-.*\.(pending|copy)$/.test(name)) fsys.remove(name);
    await v.discardChanges();
    const registered = await openAndRegister(ctx, volume, s);
    return { volume, generation: role.generation, peer: `${peerHost}:${peerPort}`, full, reason, divergentBlocks, beforeSnapshot: before, restartSet: offer.restartSet, registered };
  } finally {
    s.close('resync session over');
  }
}

/** The volume is a replica of the new primary now (durable): its replica side opens and the new primary records the pair (retried in the background if not now). */
async function openAndRegister(ctx: RecoveryContext, volume: string, s: Session): Promise<boolean> {
  await ctx.openReplica(volume);
  try {
    await register(ctx, volume, s);
    return true;
  } catch (e) {
    ctx.log.warn({ volume, err: (e as Error).message }, 'resync not yet recorded by the new primary: retrying in the background');
    keepRegistering(ctx, volume);
    return false;
  }
}

/**
 * A replica whose primary was the middle of a cascade (A → B → C, B lost) becomes the
 * replica of B's primary A. A kept, from B's reports, which of its sets C holds and the
 * blocks it changed since: only those travel (seed 002). C keeps its data and holds no
 * writes of its own, so nothing is kept aside; without that history A copies everything.
 */
async function reparent(ctx: RecoveryContext, volume: string, o: ResyncOptions): Promise<ResyncResult> {
  const role = ctx.role(volume);
  const v = ctx.host.require(volume);
  const up = role.upstream!;
  if (up.split) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is split (written here): resume its pair or fail it over instead`);
  if (role.pairs.length > 0) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} forwards to replicas of its own: remove them first`);
  const rv = ctx.replica(volume);
  if (rv?.primaryAlive) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume}'s primary ${up.primaryVolume} is connected: it is not lost`);
  const peerHost = o.peerHost!;
  const peerPort = o.peerPort!;
  const peerVolume = o.peerVolume ?? up.primaryVolume;
  const back = ctx.returnAddress();
  const s = await Session.open(ctx, peerHost, peerPort, 'the new primary');
  try {
    s.send({ t: 'resyncHello', protocol: PROTOCOL_VERSION, pairId: up.pairId, primaryVolume: peerVolume, replicaVolume: volume, generation: role.generation, sizeBytes: v.sizeBytes, blockBytes: v.blockBytes, returnHost: back.host, returnPort: back.port });
    const offer = await s.next(ctx, 'resyncOffer', sessionMsMax);
    if (offer.generation < role.generation) throw new DeltavolError('PEER_REFUSED', `${peerVolume} at ${peerHost}:${peerPort} has generation ${offer.generation}, older than this replica's ${role.generation}`);
    const full = offer.fromPairId !== up.pairId;
    const reason = full ? `${peerVolume} at ${peerHost}:${peerPort} does not know where this replica stands (it never tracked it through ${up.primaryVolume}, or not from early enough)` : `only what ${peerVolume} changed after its set ${offer.restartSet}, which this replica holds`;
    // Nothing of the old primary plays any more here.
    rv?.endSession('moving to another primary');
    await ctx.closeReplica(volume);
    ctx.stateFs(volume).writeAtomic(DIVERGENT_FILE, Buffer.from('[]'));
    role.transition(
      {
        t: 'resync-started',
        reparent: true,
        generation: offer.generation,
        upstream: {
          pairId: offer.pairId,
          peerIdentity: s.peerIdentity,
          primaryVolume: peerVolume,
          playedSet: 0,
          initialCopy: { done: false, offsetBytes: 0, baseSet: 0 },
          consistent: false,
          split: false,
          createdAt: new Date(ctx.platform.clock.now()).toISOString(),
          resync: { peerHost, peerPort, fromPairId: up.pairId, registered: false, full, reason, divergentBlocks: 0, beforeSnapshot: null, restartSet: offer.restartSet, startedAtMs: ctx.platform.clock.now() },
          playedCutAtMs: null,
          lastReport: null,
        },
      },
      { peer: `${peerHost}:${peerPort}`, full, reason, from: `${up.primaryVolume} (pair ${up.pairId})` },
    );
    if (full) ctx.log.warn({ volume, reason, peer: `${peerHost}:${peerPort}` }, `moving to another primary needs a FULL copy: ${reason}`);
    await v.discardChanges();
    const registered = await openAndRegister(ctx, volume, s);
    return { volume, generation: role.generation, peer: `${peerHost}:${peerPort}`, full, reason, divergentBlocks: 0, beforeSnapshot: null, restartSet: offer.restartSet, registered };
  } finally {
    s.close('resync session over');
  }
}

/**
 * Blocks this volume changed since the offer's restart point, and whether they can be
 * known at all (else: every block, and why).
 */
function divergentSince(ctx: RecoveryContext, volume: string, pair: PairRecord | undefined, offer: Offer): { blocks: PagedBitmap; full: boolean; reason: string } {
  const v = ctx.host.require(volume);
  const role = ctx.role(volume);
  const full = (reason: string) => ({ blocks: new PagedBitmap(v.blocksTotal), full: true, reason });
  if (!pair) return full('this volume has no replication pair any more (its history is gone)');
  if (offer.fromPairId === '') return full('the new primary has no usable restart point (its initial copy was not done, or the restart snapshot is gone)');
  if (offer.fromPairId !== pair.id) return full(`the new primary took over from pair ${offer.fromPairId}, not from this volume's pair ${pair.id}`);
  if (offer.generationBefore !== role.generation) return full(`the new primary took over from generation ${offer.generationBefore}; this volume is at ${role.generation}`);
  const r = ctx.replicator(volume);
  const restart = offer.restartSet;
  if (r.outbound.lastSet < restart) return full(`this volume never cut set ${restart} (its outbound save area was replaced)`);
  const blocks = v.changedBlocks();
  for (const p of role.pairs) blocks.union(r.pendingOf(p.id));
  for (const s of r.outbound.sets) {
    if (s.set <= restart) continue;
    for (const [b, c] of r.outbound.setBlocks(s)) if (b + c <= v.blocksTotal) blocks.setRange(b, c);
  }
  // Every set after the restart point must be known here or by the new primary.
  const firstHeld = r.outbound.sets[0]?.set ?? r.outbound.lastSet + 1;
  const from = Math.max(restart, offer.knownUpTo) + 1;
  if (firstHeld - from > 1_000_000) return full(`sets ${from}..${firstHeld - 1} are gone from this volume's outbound save area`);
  for (let s = from; s < firstHeld; s++) {
    if (pair.detached && s > pair.ackedSet) continue; // their blocks are in the pending bitmap
    const c = pair.catchUp;
    if (c && s > c.from && s < c.set && (r.outbound.get(c.set) || c.set <= offer.knownUpTo)) continue; // folded into the catch-up set
    return full(`set ${s} (after the restart point ${restart}) is gone from this volume's outbound save area and was never complete on the new primary`);
  }
  return { blocks, full: false, reason: `${blocks.count()} blocks changed here since set ${restart}` };
}

/** A block's digest for the resync compare: SHA-256 truncated to 128 bits (no accidental or crafted match). */
export function blockDigest(block: Buffer): Buffer {
  return crypto.hash('sha256', block, 'buffer').subarray(0, DIGEST_BYTES);
}

/**
 * Sends the divergent blocks with a digest of each (this volume is not written until the
 * new primary has the pair, so they are its content now), then the commit; resolves once
 * the new primary recorded the pair.
 */
async function register(ctx: RecoveryContext, volume: string, s: Session): Promise<void> {
  const role = ctx.role(volume);
  const up = role.upstream!;
  const rs = up.resync!;
  const raw = ctx.stateFs(volume).readAll(DIVERGENT_FILE);
  if (!raw) throw new DeltavolError('METADATA_CORRUPT', `volume ${volume}: ${DIVERGENT_FILE} is missing (run the resync again)`);
  const v = ctx.host.require(volume);
  const bs = v.blockBytes;
  const buf = Buffer.alloc(Math.max(bs, Math.floor(digestReadBytes / bs) * bs));
  let frameRuns: Runs = [];
  let digests: Buffer[] = [];
  let frameBlocks = 0;
  const flush = async () => {
    if (frameRuns.length === 0) return;
    s.link.send({ t: 'resyncBlocks', runs: frameRuns, digestBytes: DIGEST_BYTES }, digests);
    frameRuns = [];
    digests = [];
    frameBlocks = 0;
    await s.link.drainBelow(L.socketQueueBytesMax);
  };
  for (const [start, count] of JSON.parse(raw.toString('utf8')) as Runs) {
    for (let b = start; b < start + count; ) {
      const n = Math.min(start + count - b, buf.length / bs, blocksPerFrame - frameBlocks);
      const len = Math.min(n * bs, v.sizeBytes - b * bs);
      buf.fill(0, 0, n * bs);
      await v.read(b * bs, len, buf);
      for (let i = 0; i < n; i++) digests.push(blockDigest(buf.subarray(i * bs, (i + 1) * bs)));
      frameRuns.push([b, n]);
      frameBlocks += n;
      b += n;
      if (frameBlocks >= blocksPerFrame || frameRuns.length >= runsPerFrame) await flush();
    }
  }
  await flush();
  s.send({ t: 'resyncCommit', pairId: up.pairId, full: rs.full, reason: rs.reason, divergentBlocks: rs.divergentBlocks });
  const ok = await s.next(ctx, 'resyncAccepted', sessionMsMax);
  if (ok.pairId !== up.pairId) throw new DeltavolError('PEER_REFUSED', `the new primary accepted pair ${ok.pairId}, not ${up.pairId}`);
  if (ctx.role(volume).upstream?.resync && !ctx.role(volume).upstream!.resync!.registered) role.transition({ t: 'resync-registered' }, { baseSet: ok.baseSet });
}

/** One more registration attempt (after a crash or a lost link between commit and acceptance). */
async function registerOnce(ctx: RecoveryContext, volume: string): Promise<void> {
  const role = ctx.role(volume);
  const up = role.upstream!;
  const rs = up.resync!;
  const v = ctx.host.require(volume);
  const back = ctx.returnAddress();
  const s = await Session.open(ctx, rs.peerHost, rs.peerPort, 'the new primary');
  try {
    // The block digests go only to the new primary this resync is bound to.
    const bound = up.peerIdentity ?? null;
    if (s.peerIdentity !== null && bound !== null && s.peerIdentity !== bound) {
      throw new DeltavolError('PEER_REFUSED', `${rs.peerHost}:${rs.peerPort} is ${s.peerIdentity}, but this resync is bound to ${bound}`);
    }
    s.send({
      t: 'resyncHello',
      protocol: PROTOCOL_VERSION,
      pairId: rs.fromPairId,
      primaryVolume: up.primaryVolume,
      replicaVolume: volume,
      generation: Math.max(1, role.generation - 1),
      sizeBytes: v.sizeBytes,
      blockBytes: v.blockBytes,
      returnHost: back.host,
      returnPort: back.port,
    });
    await s.next(ctx, 'resyncOffer', sessionMsMax);
    await register(ctx, volume, s);
  } finally {
    s.close('resync registration over');
  }
}

/** Volumes whose registration is being retried, per node (nodes may share a process: the simulator). */
const registeringByNode = new WeakMap<RecoveryContext, Set<string>>();

/** Retries the registration in the background until the new primary has the pair. */
export function keepRegistering(ctx: RecoveryContext, volume: string): void {
  let registering = registeringByNode.get(ctx);
  if (!registering) registeringByNode.set(ctx, (registering = new Set()));
  const key = volume;
  if (registering.has(key)) return;
  registering.add(key);
  void (async () => {
    let delay = 1000;
    try {
      for (let attempt = 0; attempt < 100_000; attempt++) {
        const rs = ctx.role(volume).upstream?.resync;
        if (!rs || rs.registered || ctx.isStopped) return;
        try {
          await registerOnce(ctx, volume);
          return;
        } catch (e) {
          ctx.log.info({ volume, err: (e as Error).message, attempt }, 'resync registration failed: retrying');
        }
        await sleep(ctx.platform.clock, delay);
        delay = Math.min(delay * 2, 10_000);
      }
    } catch (e) {
      ctx.log.error({ volume, err: (e as Error).message }, 'resync registration stopped');
    } finally {
      registering!.delete(key);
    }
  })();
}

// ================= the new primary's side =================

/** Resync registrations being served, per node and volume (one at a time per volume). */
const servingByNode = new WeakMap<RecoveryContext, Map<string, Promise<unknown>>>();

/** A resyncHello arrived on the replication port: the frame handler for the rest of that session. */
export function serveResync(ctx: RecoveryContext, link: Link, hello: ResyncHello): (f: Frame) => void {
  const blocks: { runs: Runs; digests: Buffer | null }[] = [];
  let blockCount = 0;
  let offered: { restartOk: boolean; volume: string; distantPairId: string | null } | null = null;
  const refuse = (e: Error) => {
    const err = e as DeltavolError;
    ctx.log.warn({ from: link.remoteAddress, peer: link.conn.peerIdentity, code: err.code, err: e.message }, 'resync request refused');
    link.send({ t: 'refuse', code: err.code ?? 'ERROR', message: publicRefusal(link.conn.peerIdentity, err.code ?? 'ERROR', e), generation: 0 });
    link.close(`resync refused: ${e.message}`);
  };
  try {
    offered = offer(ctx, link, hello);
  } catch (e) {
    refuse(e as Error);
  }
  const stop = ctx.platform.clock.after(sessionMsMax, () => link.close('resync session too long'));
  link.onClose(() => stop());
  return (f) => {
    const o = offered;
    if (!o || link.closed) return;
    const m = f.msg;
    if (m.t === 'resyncBlocks') {
      for (const [, c] of m.runs) blockCount += c;
      const v = ctx.host.get(o.volume);
      if (!v || blockCount > v.blocksTotal) return refuse(new DeltavolError('EINVAL_ARGUMENT', 'more divergent blocks than the volume has'));
      blocks.push({ runs: m.runs, digests: m.digestBytes > 0 ? f.data : null });
      return;
    }
    if (m.t !== 'resyncCommit') return refuse(new DeltavolError('PEER_REFUSED', `unexpected ${m.t} in a resync session`));
    // One registration per volume at a time.
    let serving = servingByNode.get(ctx);
    if (!serving) servingByNode.set(ctx, (serving = new Map()));
    const prev = serving.get(o.volume) ?? Promise.resolve();
    const next = prev
      .catch(() => undefined)
      .then(() => (o.distantPairId !== null ? acceptDistant(ctx, link, hello, o.volume, o.restartOk, o.distantPairId, m) : acceptResync(ctx, link, hello, o.volume, o.restartOk, m, blocks)))
      .then((ok) => link.send({ t: 'resyncAccepted', ...ok }), refuse);
    serving.set(o.volume, next);
  };
}

function offer(ctx: RecoveryContext, link: Link, hello: ResyncHello): { restartOk: boolean; volume: string; distantPairId: string | null } {
  const name = hello.primaryVolume;
  const v = ctx.host.get(name);
  if (!v) throw new DeltavolError('VOLUME_NOT_FOUND', `no volume ${name} on this node`);
  // Serving a resync makes a new pair here and changes nothing else (no role, no generation):
  // like a replica add, any verified peer (and --repl-allow) may ask. Any older copy may rejoin,
  // also one that was never paired with this node (another replica of the old primary). The
  // requester checks that this node is the identity its pair was bound to (resync()).
  const role = ctx.role(name);
  if (role.role !== 'primary' || role.state.fenced) throw new DeltavolError('ROLE_CONFLICT', `volume ${name} is not an active primary on this node`);
  if (hello.sizeBytes !== v.sizeBytes || hello.blockBytes !== v.blockBytes) {
    throw new DeltavolError('GEOMETRY', `volume ${name} is ${v.sizeBytes} bytes in ${v.blockBytes}-byte blocks; the old primary is ${hello.sizeBytes} in ${hello.blockBytes}`);
  }
  // Any older copy of this volume may rejoin (one of the same generation too: two sides
  // that failed over independently; the operator chose this one as the survivor). Without
  // a restart point of the unplanned failover it came from, everything is copied.
  const f = role.state.failover;
  if (hello.generation > role.generation) throw new DeltavolError('ROLE_CONFLICT', `the requester's generation ${hello.generation} is newer than ${role.generation} here: resync this volume from it instead`);
  if (hello.returnPort === 0) throw new DeltavolError('EINVAL_ARGUMENT', 'the old primary gave no replication port to dial back');
  // A replica of one of this volume's replicas (a cascade whose middle is lost): from where it stands.
  const distant = ctx.openedReplicator(name)?.distant.blocksFor(hello.pairId);
  if (distant?.record) {
    const ok = distant.blocks !== null;
    link.send({ t: 'resyncOffer', generation: role.generation, restartSet: distant.record.confirmedSet, knownUpTo: distant.record.confirmedSet, pairId: ctx.platform.newId(), generationBefore: role.generation, fromPairId: ok ? hello.pairId : '' });
    ctx.log.info({ volume: name, from: `${hello.replicaVolume}@${link.remoteAddress}`, confirmedSet: distant.record.confirmedSet, differential: ok, why: distant.blocks === null ? distant.why : null }, 'a replica of a replica moves here (cascade middle lost)');
    return { restartOk: ok, volume: name, distantPairId: hello.pairId };
  }
  const restartOk = f !== null && f.kind === 'unplanned' && f.restartSnapshot !== null && v.snapshots().some((s) => s.name === f.restartSnapshot && s.valid);
  link.send({
    t: 'resyncOffer',
    generation: role.generation,
    restartSet: f?.restartSet ?? 0,
    knownUpTo: f?.knownUpTo ?? 0,
    pairId: ctx.platform.newId(),
    generationBefore: f?.generationBefore ?? 0,
    fromPairId: restartOk ? f.fromPairId : '',
  });
  ctx.log.info({ volume: name, from: `${hello.replicaVolume}@${link.remoteAddress}`, restartSet: f?.restartSet ?? null, restartOk }, 'resync requested by an older copy');
  return { restartOk, volume: name, distantPairId: null };
}

/**
 * The old primary's blocks that differ from the restart point: those whose digest differs
 * from the restart snapshot's block (or that came without a digest).
 */
async function differingFromRestart(ctx: RecoveryContext, volume: string, restart: string, sent: { runs: Runs; digests: Buffer | null }[]): Promise<{ bits: PagedBitmap; same: number }> {
  const v = ctx.host.require(volume);
  const bs = v.blockBytes;
  const bits = new PagedBitmap(v.blocksTotal);
  const block = Buffer.alloc(bs);
  let same = 0;
  let n = 0;
  for (const { runs, digests } of sent) {
    let at = 0;
    for (const [start, count] of runs) {
      for (let b = start; b < start + count && b < v.blocksTotal; b++, at += DIGEST_BYTES) {
        if (digests) {
          block.fill(0);
          v.readSnapshot(restart, b * bs, Math.min(bs, v.sizeBytes - b * bs), block);
          if (blockDigest(block).equals(digests.subarray(at, at + DIGEST_BYTES))) {
            same++;
            continue;
          }
        }
        bits.set(b);
        if (++n % 4096 === 0) await sleep(ctx.platform.clock, 0); // let other work run
      }
    }
  }
  return { bits, same };
}

async function acceptResync(ctx: RecoveryContext, link: Link, hello: ResyncHello, volume: string, restartOk: boolean, commit: Extract<ReplMessage, { t: 'resyncCommit' }>, sent: { runs: Runs; digests: Buffer | null }[]): Promise<{ pairId: string; baseSet: number }> {
  const role = ctx.role(volume);
  const existing = role.pairs.find((p) => p.id === commit.pairId);
  if (existing) return { pairId: existing.id, baseSet: existing.initialCopy.baseSet };
  if (!/^[0-9a-f]{12}$/.test(commit.pairId)) throw new DeltavolError('EINVAL_ARGUMENT', 'bad pair id');
  const f = role.state.failover;
  if (role.role !== 'primary' || role.state.fenced) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is no longer an active primary here`);
  const v = ctx.host.require(volume);
  const full = commit.full || !restartOk || f === null;
  const differing = full ? null : await differingFromRestart(ctx, volume, f.restartSnapshot!, sent);
  if (differing) ctx.log.info({ volume, sent: commit.divergentBlocks, differ: differing.bits.count(), sameAsRestartPoint: differing.same }, 'resync: blocks the old primary may have changed, compared with the restart point');
  const r = ctx.replicator(volume);
  const pair = await r.addPair(
    {
      ...pairToRequester(link, hello),
      // The pair was sync before the roles swapped: it stays sync.
      ...syncConfigOf(f?.sync),
    },
    {
      id: commit.pairId,
      copy: full
        ? { kind: 'everything' }
        : {
            kind: 'differential',
            blocks: (base) => {
              // The old primary's blocks, what this node held unplayed, and what it changed since R.
              const bits = differing!.bits;
              const raw = ctx.stateFs(volume).readAll(UNPLAYED_FILE);
              if (raw) for (const [b, c] of JSON.parse(raw.toString('utf8')) as Runs) if (b + c <= v.blocksTotal) bits.setRange(b, c);
              const d = v.differenceBlocks(f!.restartSnapshot!, base);
              bits.union(d.data);
              bits.union(d.zero);
              return bits;
            },
          },
    },
  );
  if (f && f.kind === 'unplanned') role.transition({ t: 'failover-pair-set', pairId: pair.id }, { pair: pair.id, full, copyBytes: pair.initialCopy.totalBytes, divergentBlocks: commit.divergentBlocks });
  ctx.log.info({ volume, pair: pair.id, peer: `${pair.peerHost}:${pair.peerPort}`, full, reason: commit.reason, copyBytes: pair.initialCopy.totalBytes }, full ? 'resync: the old primary gets a full copy' : 'resync: the old primary gets the blocks that differ');
  return { pairId: pair.id, baseSet: pair.initialCopy.baseSet };
}

/** The new pair's settings: back to the volume that asked, as it gave its address, bound to the identity it proved. */
function pairToRequester(link: Link, hello: ResyncHello): PairConfig {
  return {
    peerHost: hello.returnHost || link.remoteAddress,
    peerPort: hello.returnPort,
    remoteVolume: hello.replicaVolume,
    cutIntervalMs: L.cutIntervalMsDefault,
    highWaterBytes: L.cutHighWaterBytesDefault,
    retriesBeforeSuspend: L.retriesBeforeSuspendDefault,
    peerIdentity: link.conn.peerIdentity,
  };
}

/**
 * A replica of one of this volume's replicas registers as its own replica (its middle is
 * lost): a pair whose copy moves the blocks changed since the set it holds, or everything.
 */
async function acceptDistant(ctx: RecoveryContext, link: Link, hello: ResyncHello, volume: string, ok: boolean, distantPairId: string, commit: Extract<ReplMessage, { t: 'resyncCommit' }>): Promise<{ pairId: string; baseSet: number }> {
  const role = ctx.role(volume);
  const existing = role.pairs.find((p) => p.id === commit.pairId);
  if (existing) return { pairId: existing.id, baseSet: existing.initialCopy.baseSet };
  if (!/^[0-9a-f]{12}$/.test(commit.pairId)) throw new DeltavolError('EINVAL_ARGUMENT', 'bad pair id');
  if (role.role !== 'primary' || role.state.fenced) throw new DeltavolError('ROLE_CONFLICT', `volume ${volume} is no longer an active primary here`);
  const r = ctx.replicator(volume);
  const full = commit.full || !ok;
  const record = r.distant.blocksFor(distantPairId).record;
  const pair = await r.addPair(
    pairToRequester(link, hello),
    {
      id: commit.pairId,
      copy: full
        ? { kind: 'everything' }
        : {
            kind: 'differential',
            // Everything changed here after the set the replica holds, up to the base (its sets are in the bitmaps by now).
            blocks: () => {
              const d = r.distant.blocksFor(distantPairId);
              if (d.blocks === null) throw new DeltavolError('ROLE_CONFLICT', `the history of ${hello.replicaVolume} is gone: ${d.why}`);
              return d.blocks;
            },
          },
    },
  );
  r.distant.forget(distantPairId);
  role.saveProgress();
  ctx.log.info({ volume, pair: pair.id, peer: `${pair.peerHost}:${pair.peerPort}`, full, fromSet: record?.confirmedSet ?? null, copyBytes: pair.initialCopy.totalBytes }, full ? 'cascade: the distant replica gets a full copy' : 'cascade: the distant replica gets the blocks changed since the set it holds');
  return { pairId: pair.id, baseSet: pair.initialCopy.baseSet };
}

/** A pair's copy finished: if it was the resync of the primary this volume replaced, the failover is closed. */
export async function onCopyDone(ctx: RecoveryContext, volume: string, p: PairRecord): Promise<void> {
  const role = ctx.role(volume);
  const f = role.state.failover;
  if (!f || f.resyncPairId !== p.id || f.kind !== 'unplanned') return;
  const v = ctx.host.require(volume);
  if (f.restartSnapshot && v.snapshots().some((s) => s.name === f.restartSnapshot)) await v.deleteSnapshot(f.restartSnapshot, true);
  const fsys = ctx.stateFs(volume);
  if (fsys.exists(UNPLAYED_FILE)) fsys.remove(UNPLAYED_FILE);
  role.transition({ t: 'failover-closed' }, { pair: p.id });
  ctx.log.info({ volume, pair: p.id, oldPrimary: `${p.remoteVolume}@${p.peerHost}:${p.peerPort}` }, 'resync complete: the old primary is this volume\'s replica again');
}
