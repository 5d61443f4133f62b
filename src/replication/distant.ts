// Why: in a cascade A → B → C, when B is lost, A must ship to C directly, starting from
// what C already holds — a differential, never a full copy (seed 002's point). A never
// talks to C, so it learns C's position from B (chain reports: "C holds your set a whole")
// and keeps, per such distant replica, the blocks it changed after a position C is known
// to have passed: two bitmaps, `older` (sets fromSet+1..splitSet) and `newer` (sets after
// splitSet), fed at every cut and rotated once C confirms splitSet. Their union covers
// every block A changed after C's position whenever fromSet ≤ C's confirmed set, which the
// rotation keeps true; the memory is bounded by what changed since C's last two
// confirmations. Tracking starts when A first hears of C: a C that has not yet confirmed a
// set of that time or later cannot be caught up this way (a full copy, and status says so).

import type { Logger } from '../util/log.js';
import type { DurableFs } from '../util/durable-fs.js';
import { PagedBitmap, type ReadonlyBitmap } from '../bitmap/paged-bitmap.js';
import type { DistantRecord, RoleRecord } from '../recovery/role-record.js';
import type { ChainHop } from './chain.js';
import type { Runs } from './wire.js';

const fileOf = (pairId: string, which: 'older' | 'newer') => `distant-${pairId}.${which}`;

export class DistantTracker {
  private readonly bits = new Map<string, { older: PagedBitmap; newer: PagedBitmap }>();

  constructor(
    private readonly fsys: DurableFs,
    private readonly role: RoleRecord,
    private readonly blocksTotal: number,
    private readonly log: Logger,
    private readonly now: () => number,
  ) {
    for (const d of this.records) this.bits.set(d.pairId, { older: this.read(d.pairId, 'older'), newer: this.read(d.pairId, 'newer') });
  }

  private get records(): DistantRecord[] {
    return this.role.distant;
  }

  private read(pairId: string, which: 'older' | 'newer'): PagedBitmap {
    const bits = new PagedBitmap(this.blocksTotal);
    const f = this.fsys.readAll(fileOf(pairId, which));
    if (f) for (const [s, c] of JSON.parse(f.toString('utf8')) as Runs) if (s + c <= this.blocksTotal) bits.setRange(s, c);
    return bits;
  }

  private save(pairId: string, which: 'older' | 'newer'): void {
    this.fsys.writeAtomic(fileOf(pairId, which), Buffer.from(JSON.stringify(this.bits.get(pairId)![which].runs())));
  }

  /** What a replica of this volume (via pair viaPairId) reported about its own replicas (depth 1 hops). */
  onReport(viaPairId: string, hops: readonly ChainHop[], lastSet: number): void {
    let changed = false;
    const seen = new Set<string>();
    for (const h of hops) {
      if (h.depth !== 1 || h.pairId === undefined) continue;
      seen.add(h.pairId);
      let d = this.records.find((x) => x.pairId === h.pairId);
      if (!d) {
        d = { viaPairId, pairId: h.pairId, volume: h.volume, peer: h.peer, confirmedSet: 0, fromSet: lastSet, splitSet: lastSet, trackedFrom: lastSet, atMs: this.now() };
        this.records.push(d);
        this.bits.set(d.pairId, { older: new PagedBitmap(this.blocksTotal), newer: new PagedBitmap(this.blocksTotal) });
        this.save(d.pairId, 'older');
        this.save(d.pairId, 'newer');
        this.log.info({ distant: `${h.volume}@${h.peer}`, via: viaPairId, trackedFrom: lastSet }, 'cascade: tracking a replica of a replica (it can later be caught up from here directly)');
        changed = true;
      }
      if (d.viaPairId !== viaPairId || d.peer !== h.peer) {
        d.viaPairId = viaPairId;
        d.peer = h.peer;
        changed = true;
      }
      const u = h.upstreamSet ?? null;
      if (u !== null && u > d.confirmedSet && u <= lastSet) {
        d.confirmedSet = u;
        changed = true;
        if (d.confirmedSet >= d.splitSet && d.splitSet < lastSet) {
          // C passed splitSet: what changed up to it is no longer needed.
          const b = this.bits.get(d.pairId)!;
          b.older = b.newer;
          b.newer = new PagedBitmap(this.blocksTotal);
          d.fromSet = d.splitSet;
          d.splitSet = lastSet;
          this.save(d.pairId, 'older');
          this.save(d.pairId, 'newer');
        }
      }
    }
    // The middle no longer forwards to a replica it reported before: forget it.
    for (const d of this.records.filter((x) => x.viaPairId === viaPairId && !seen.has(x.pairId))) {
      this.forget(d.pairId);
      changed = true;
    }
    if (changed) this.role.saveProgress();
  }

  /** Set n was cut with these blocks: every distant replica may lack them (durable before the set can be released). */
  onSetCut(members: ReadonlyBitmap): void {
    for (const d of this.records) {
      const b = this.bits.get(d.pairId)!;
      members.forEachRun((s, c) => b.newer.setRange(s, c));
      this.save(d.pairId, 'newer');
    }
  }

  /**
   * The blocks to copy to distant replica pairId so that, with the sets that follow, it
   * equals this volume: everything changed after its confirmed set (null: unknown, since
   * tracking began after its position, or no such replica).
   */
  blocksFor(pairId: string): { record: DistantRecord; blocks: PagedBitmap } | { record: DistantRecord | null; blocks: null; why: string } {
    const d = this.records.find((x) => x.pairId === pairId) ?? null;
    if (!d) return { record: null, blocks: null, why: 'this node never heard of that replica through a replica of its own' };
    if (d.confirmedSet < d.trackedFrom) return { record: d, blocks: null, why: `it last confirmed set ${d.confirmedSet}, before this node began tracking it (set ${d.trackedFrom})` };
    const b = this.bits.get(d.pairId)!;
    const blocks = b.older.clone();
    blocks.union(b.newer);
    return { record: d, blocks };
  }

  forget(pairId: string): void {
    const list = this.records;
    const i = list.findIndex((x) => x.pairId === pairId);
    if (i >= 0) list.splice(i, 1);
    this.bits.delete(pairId);
    for (const w of ['older', 'newer'] as const) if (this.fsys.exists(fileOf(pairId, w))) this.fsys.remove(fileOf(pairId, w));
  }

  /** The replica that forwarded to them is gone from this volume's pairs: so are they. */
  forgetVia(viaPairId: string): void {
    for (const d of this.records.filter((x) => x.viaPairId === viaPairId)) this.forget(d.pairId);
  }

  status(): (DistantRecord & { differential: boolean; blocks: number })[] {
    return this.records.map((d) => {
      const b = this.bits.get(d.pairId);
      return { ...d, differential: d.confirmedSet >= d.trackedFrom, blocks: b ? b.older.count() + b.newer.count() : 0 };
    });
  }
}
