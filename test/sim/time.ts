// Why: a deterministic simulation needs time that moves only when the simulator says
// so (TigerBeetle's testing/time.zig). SimTime is one event queue in virtual
// milliseconds for the whole simulated world (nodes, network, disks, clients); each node
// incarnation sees it through a NodeClock (the Clock that src/ takes), and a crash kills
// that facade: every timer it holds is cancelled and new ones never fire, so no timer
// callback of a dead incarnation runs again. Production code also waits on promise
// chains and setImmediate (SimFs.sync, SimVolumeData.flush, the engine's copy-out, the
// activity log); after every event the loop settles them with a bounded number of
// setImmediate rounds, stopping once the I/O facades report no activity, so the
// interleaving is a function of the seed alone.

import type { Cancel, Clock } from '../../src/util/clock.js';

/** Virtual time starts here (ms since the epoch), so dates in records look plausible. */
export const simEpochMs = 1_700_000_000_000;
/** setImmediate rounds after one event at most (a runaway chain is reported, not waited for). */
const settleRoundsMax = 2000;
/** Rounds without any I/O activity that end a settle. */
const quietRoundsToStop = 2;
/** Events at one virtual millisecond before the loop calls it a livelock. */
const eventsPerInstantMax = 30_000;

export interface SimEvent {
  at: number;
  seq: number;
  fn: () => void;
  cancelled: boolean;
}

/** Where events were scheduled from (SIM_DEBUG_STACKS=1 only). */
export const eventSites = new Map<string, number>();

const immediate = () => new Promise<void>((r) => setImmediate(r));

export class SimTime {
  nowMs = simEpochMs;
  private heap: SimEvent[] = [];
  private seq = 0;
  /** Bumped by every I/O facade call (disk, network): a settle ends when it stops moving. */
  activity = 0;
  /** Facade operations waiting on a real setImmediate (SimFs.sync, SimVolumeData.flush). */
  pendingIo = 0;
  eventsFired = 0;
  settleRounds = 0;
  settleOverruns = 0;
  /** Errors thrown by event callbacks (an uncaught exception would kill a real daemon). */
  readonly errors: Error[] = [];
  private instantAt = -1;
  private instantEvents = 0;
  /** Runs after every event once it settled (the simulator observes role changes here). */
  afterEvent: (() => void) | null = null;

  schedule(delayMs: number, fn: () => void): SimEvent {
    const ev: SimEvent = { at: this.nowMs + Math.max(0, Math.ceil(delayMs)), seq: this.seq++, fn, cancelled: false };
    if (process.env.SIM_DEBUG_STACKS) {
      const where = new Error().stack!.split('\n').slice(2, 6).map((l) => l.trim().replace(/\(.*\//, '(')).join(' < ');
      (fn as { where?: string }).where = where;
      eventSites.set(where, (eventSites.get(where) ?? 0) + 1);
    }
    this.push(ev);
    return ev;
  }

  cancel(ev: SimEvent): void {
    ev.cancelled = true;
  }

  get pendingEvents(): number {
    return this.heap.length;
  }

  /** Fires every event due up to `untilMs` (each followed by a settle), then sets the clock there. */
  async runUntil(untilMs: number, stop?: () => boolean): Promise<void> {
    while (!stop?.() && (await this.step(untilMs)));
    if (untilMs > this.nowMs && !stop?.()) this.nowMs = untilMs;
  }

  /** Fires the next event if it is due by `untilMs`; false when there is none. */
  async step(untilMs: number): Promise<boolean> {
    for (;;) {
      const top = this.heap[0];
      if (!top || top.at > untilMs) return false;
      this.pop();
      if (top.cancelled) continue;
      if (top.at !== this.instantAt) {
        this.instantAt = top.at;
        this.instantEvents = 0;
      }
      if (++this.instantEvents > eventsPerInstantMax) throw new Error(`livelock: more than ${eventsPerInstantMax} events at virtual ms ${top.at - simEpochMs}; the last one: ${top.fn.toString().slice(0, 300)} ${(top.fn as { where?: string }).where ?? ''}`);
      this.nowMs = top.at;
      this.eventsFired++;
      try {
        top.fn();
      } catch (e) {
        this.errors.push(e as Error);
      }
      await this.settle();
      this.afterEvent?.();
      return true;
    }
  }

  /** Lets promise chains and setImmediate work started by the last event run to their next wait. */
  async settle(): Promise<void> {
    let quiet = 0;
    for (let i = 0; i < settleRoundsMax; i++) {
      const a = this.activity;
      await immediate();
      this.settleRounds++;
      if (this.activity === a && this.pendingIo === 0) {
        if (++quiet >= quietRoundsToStop) return;
      } else quiet = 0;
    }
    this.settleOverruns++;
  }

  private push(ev: SimEvent): void {
    const h = this.heap;
    h.push(ev);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!before(h[i]!, h[p]!)) break;
      [h[i], h[p]] = [h[p]!, h[i]!];
      i = p;
    }
  }

  private pop(): void {
    const h = this.heap;
    const last = h.pop()!;
    if (h.length === 0) return;
    h[0] = last;
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < h.length && before(h[l]!, h[m]!)) m = l;
      if (r < h.length && before(h[r]!, h[m]!)) m = r;
      if (m === i) break;
      [h[i], h[m]] = [h[m]!, h[i]!];
      i = m;
    }
  }
}

function before(a: SimEvent, b: SimEvent): boolean {
  return a.at < b.at || (a.at === b.at && a.seq < b.seq);
}

/** One node incarnation's view of SimTime. kill() cancels its timers for good. */
export class NodeClock implements Clock {
  private readonly timers = new Set<SimEvent>();
  private dead = false;

  constructor(private readonly time: SimTime) {}

  get alive(): boolean {
    return !this.dead;
  }

  now(): number {
    return this.time.nowMs;
  }

  after(ms: number, fn: () => void): Cancel {
    if (this.dead) return () => undefined;
    const ev = this.time.schedule(ms, () => {
      this.timers.delete(ev);
      fn();
    });
    this.timers.add(ev);
    return () => {
      this.time.cancel(ev);
      this.timers.delete(ev);
    };
  }

  every(ms: number, fn: () => void): Cancel {
    const period = Math.max(1, ms);
    let ev: SimEvent | null = null;
    let cancelled = false;
    const arm = () => {
      if (this.dead || cancelled) return;
      const e = this.time.schedule(period, () => {
        this.timers.delete(e);
        arm();
        fn();
      });
      ev = e;
      this.timers.add(e);
    };
    arm();
    return () => {
      cancelled = true;
      if (ev) {
        this.time.cancel(ev);
        this.timers.delete(ev);
      }
    };
  }

  kill(): void {
    this.dead = true;
    for (const ev of this.timers) this.time.cancel(ev);
    this.timers.clear();
  }
}

/** Sleeps on SimTime directly (the simulator's own actors, which no crash kills). */
export function simSleep(time: SimTime, ms: number): Promise<void> {
  return new Promise((r) => time.schedule(ms, r));
}
