// Why: an fdatasync of the engine's metadata costs a few µs on tmpfs or a write-back cache,
// less than a threadpool round trip, and milliseconds on a disk, where it must not stall
// the event loop. So syncs run on the loop while they are fast and in the threadpool once
// they are slow. One slow sync used to decide that for 30 s; on a busy 2-core VM a tmpfs
// sync is now and then preempted past the threshold, and that single sample sent every
// metadata sync (the write journal's: one per group of scattered writes) through the
// threadpool for the next 30 s: 9.3 against 3.8-5.1 µs of CPU per scattered write in
// process, and most of the run-to-run spread of `scripts/bench scale`. Now it takes
// syncSlowStreak slow syncs in a row.
//
// States: loop (sync on the event loop; each slow one counts, a fast one resets the count)
// → pool for syncProbeMs once syncSlowStreak in a row were slow → loop again (a probe: on
// slow storage the loop then waits for syncSlowStreak syncs per syncProbeMs).

/** A sync on the loop slower than this counts as slow (a threadpool round trip costs about this). */
export const syncFastNs = 100_000;
/** Slow syncs in a row that move syncs to the threadpool. */
export const syncSlowStreak = 3;
/** How long syncs stay in the threadpool before the loop is tried again. */
export const syncProbeMs = 30_000;

export class SyncMode {
  private slowInRow = 0;
  private poolSinceMs = -Infinity;
  /** Times the mode moved to the threadpool (tests, status). */
  switches = 0;

  /** Whether the next sync goes to the threadpool. */
  inPool(nowMs: number): boolean {
    return nowMs - this.poolSinceMs < syncProbeMs;
  }

  /** A sync on the loop took `ns`. */
  record(ns: number, nowMs: number): void {
    if (ns <= syncFastNs) {
      this.slowInRow = 0;
      return;
    }
    if (++this.slowInRow < syncSlowStreak) return;
    this.slowInRow = 0;
    this.poolSinceMs = nowMs;
    this.switches++;
  }
}
