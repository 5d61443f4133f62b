// Why: whether a client write may change a volume is decided outside the volume (by its
// replication role) and enforced inside it: open, held for a moment (a planned handover),
// or refused with a reason (a replica, a fenced old primary); and a handover must know when
// the writes already running are done. Volume and the simulator's volume both use this one
// class, so what the simulator checks is what the daemon does. Time is a parameter.

import { systemError } from '../util/errors.js';

/**
 * What clients may do with the volume's data: write, wait (a planned handover holds writes
 * for a moment), or get EPERM with a reason.
 */
export type WriteAccess = { mode: 'open' } | { mode: 'hold'; reason: string } | { mode: 'refuse'; code: string; reason: string };

/** A held write fails with EIO after this long (the hold was never lifted). */
export const writeHoldMsMax = 60_000;

const OPEN: WriteAccess = { mode: 'open' };

/** Runs fn after ms; returns a function that cancels it. */
export type After = (ms: number, fn: () => void) => () => void;

const realAfter: After = (ms, fn) => {
  const t = setTimeout(fn, ms);
  t.unref();
  return () => clearTimeout(t);
};

export class WriteGate {
  private access: WriteAccess = OPEN;
  private readonly waiters: (() => void)[] = [];
  /** Client writes still running (asynchronous ones). */
  private running = 0;
  private readonly idleWaiters: (() => void)[] = [];

  constructor(
    private readonly volume: string,
    private readonly after: After = realAfter,
  ) {}

  get current(): WriteAccess {
    return this.access;
  }
  get refusing(): boolean {
    return this.access.mode === 'refuse';
  }

  /**
   * Whether a client write may go now: undefined when it may, a promise to wait on when
   * writes are held (then check again); throws EPERM when they are refused.
   */
  check(): Promise<void> | undefined {
    const a = this.access;
    if (a === OPEN) return undefined;
    if (a.mode === 'refuse') throw systemError('EPERM', `volume ${this.volume} is read-only: ${a.reason}`);
    if (a.mode === 'hold') {
      return new Promise<void>((resolve, reject) => {
        const cancel = this.after(writeHoldMsMax, () => reject(systemError('EIO', `volume ${this.volume}: write held for ${writeHoldMsMax / 1000} s (${a.reason})`)));
        this.waiters.push(() => {
          cancel();
          resolve();
        });
      });
    }
    return undefined;
  }

  /** Sets what clients may do. Held writes go on, or fail, at once. */
  set(a: WriteAccess): void {
    this.access = a.mode === 'open' ? OPEN : a;
    for (const w of this.waiters.splice(0)) w();
  }

  /** Counts a client write until it completes (writesIdle waits for it). */
  track(r: void | Promise<void>): void | Promise<void> {
    if (!(r instanceof Promise)) return r;
    this.running++;
    return r.finally(() => {
      if (--this.running === 0) for (const w of this.idleWaiters.splice(0)) w();
    });
  }

  /** Resolves when no client write is running (held and refused ones do not count). */
  idle(): Promise<void> {
    if (this.running === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }
}
