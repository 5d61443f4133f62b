// Why: replication and recovery decide things by time (heartbeats, back-off, cut
// intervals, lag) and must run unchanged inside a seeded simulator whose clock only
// moves when the simulator says so (TigerBeetle's testing/time.zig). So time is a
// parameter: production passes systemClock, the simulator a virtual one.

export interface Cancel {
  (): void;
}

export interface Clock {
  /** Milliseconds since the epoch (wall clock: it goes into records people read). */
  now(): number;
  /** Runs fn once after ms; the returned function cancels it. Never keeps a process alive. */
  after(ms: number, fn: () => void): Cancel;
  /** Runs fn every ms until cancelled. Never keeps a process alive. */
  every(ms: number, fn: () => void): Cancel;
}

export function sleep(clock: Clock, ms: number): Promise<void> {
  return new Promise((r) => clock.after(ms, r));
}

export const systemClock: Clock = {
  now: () => Date.now(),
  after(ms, fn) {
    const t = setTimeout(fn, ms);
    t.unref();
    return () => clearTimeout(t);
  },
  every(ms, fn) {
    const t = setInterval(fn, ms);
    t.unref();
    return () => clearInterval(t);
  },
};
