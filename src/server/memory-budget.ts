// Why: per-connection caps bound what one client can make the daemon hold, not what 32
// or 1024 of them can (32 clients pipelining 32 MiB reads and never reading the replies
// took the daemon to 2.1 GiB and an OOM kill). This is the daemon-wide account of the
// bytes the NBD server holds for requests and replies — READ buffers in flight, WRITE
// payloads held, reply bytes queued on sockets — with a hard ceiling.
//
// The budget has two parts. Every connection may hold up to `reserveBytesPerConnection`
// without asking anyone (set aside for connectionsMax connections), so small I/O is never
// starved by hogs. Above its reserve a connection draws on the shared part; the last
// `hogHeadroomBytes` of it only go to "light" connections: those that have shown they read
// (a reply of theirs was written out), hold no more than their reserve, and have no further
// request queued behind the one asking. So clients that sit on shared memory (typically: do
// not read their replies), pipeline deeply, or never read at all are paused first, and a
// well-behaved client can still get a full-size (32 MiB) request through. A connection refused memory waits (the server stops reading from it) and is
// woken, smallest holding-plus-wanted first, as memory is released. Taking and releasing are a few
// integer operations: this runs on every request.

import { assert } from '../util/assert.js';

/** One connection's share of the budget. */
export class MemoryAccount {
  /** Bytes this connection holds (in flight and queued). */
  heldBytes = 0;
  /** Set once a reply of this connection was written out: it reads what it is sent. */
  proven = false;
  /** What it asked for when it was last refused (orders the wake-ups). */
  wantBytes = 0;
  waiting = false;
  constructor(
    /** Called (at most once per wake pass) when memory was released and the account waits for some. */
    readonly wake: () => void,
  ) {}
}

export interface MemoryBudgetOptions {
  budgetBytesMax: number;
  reserveBytesPerConnection: number;
  connectionsMax: number;
  hogHeadroomBytes: number;
}

export class MemoryBudget {
  /** Bytes held by all connections. */
  totalBytes = 0;
  /** Bytes held above the connections' reserves. */
  sharedBytes = 0;
  readonly sharedBytesMax: number;
  readonly reserveBytes: number;
  readonly budgetBytesMax: number;
  private readonly hogHeadroomBytes: number;
  readonly waiters = new Set<MemoryAccount>();
  /** Times a connection was refused memory and had to wait (a counter). */
  waitsTotal = 0;
  /** Highest totalBytes seen. */
  peakBytes = 0;
  private wakeScheduled = false;
  /** Above this, a later fall below lowWaterBytes calls onShrunk (memory to give back). */
  private readonly highWaterBytes: number;
  private readonly lowWaterBytes: number;
  private wasHigh = false;
  /** Told when the buffers fell below a sixteenth of the budget after holding more than a quarter. */
  onShrunk: () => void = () => {};
  /** Told when the first connection starts waiting (true) and when none waits any more (false). */
  onPressure: (exhausted: boolean, waiting: number) => void = () => {};

  constructor(o: MemoryBudgetOptions) {
    this.budgetBytesMax = o.budgetBytesMax;
    this.reserveBytes = o.reserveBytesPerConnection;
    this.sharedBytesMax = o.budgetBytesMax - o.connectionsMax * o.reserveBytesPerConnection;
    this.hogHeadroomBytes = Math.min(o.hogHeadroomBytes, Math.max(0, this.sharedBytesMax));
    this.highWaterBytes = o.budgetBytesMax / 4;
    this.lowWaterBytes = o.budgetBytesMax / 16;
    assert(this.sharedBytesMax >= 0, 'the budget must hold every connection reserve');
  }

  /** Bytes of `held` above the reserve: what it takes from the shared part. */
  private over(held: number): number {
    return held > this.reserveBytes ? held - this.reserveBytes : 0;
  }

  /**
   * Takes n bytes for a (new) request, or registers the account as waiting and returns
   * false. `pipelined`: more requests from this connection are already queued behind it.
   */
  tryTake(a: MemoryAccount, n: number, pipelined: boolean): boolean {
    const h = a.heldBytes;
    const extra = this.over(h + n) - this.over(h);
    if (extra > 0) {
      const light = a.proven && h <= this.reserveBytes && !pipelined;
      const limit = light ? this.sharedBytesMax : this.sharedBytesMax - this.hogHeadroomBytes;
      // A request larger than the whole shared part can only ever run alone.
      if (this.sharedBytes + extra > limit && !(this.sharedBytes === 0 && extra > limit)) {
        this.wait(a, n);
        return false;
      }
      this.sharedBytes += extra;
    }
    a.heldBytes = h + n;
    this.totalBytes += n;
    if (this.totalBytes > this.peakBytes) this.peakBytes = this.totalBytes;
    if (this.totalBytes > this.highWaterBytes) this.wasHigh = true;
    if (a.waiting) this.unwait(a);
    return true;
  }

  /**
   * For a request that needs no buffer up front but will queue a reply of unknown size
   * (BLOCK_STATUS, FLUSH, ...): refused, like a hog's take, when the connection already holds
   * more than its reserve and the shared part is at the hogs' limit. So a client that
   * pipelines such requests without reading overshoots by at most one reply.
   */
  mayGrow(a: MemoryAccount): boolean {
    if (a.heldBytes <= this.reserveBytes || this.sharedBytes < this.sharedBytesMax - this.hogHeadroomBytes) {
      if (a.waiting) this.unwait(a);
      return true;
    }
    this.wait(a, 0);
    return false;
  }

  /** The connection is refused memory: it waits (and stops being read) until woken. */
  private wait(a: MemoryAccount, wantBytes: number): void {
    a.wantBytes = wantBytes;
    if (a.waiting) return;
    a.waiting = true;
    this.waiters.add(a);
    this.waitsTotal++;
    if (this.waiters.size === 1) this.onPressure(true, 1);
  }

  /** Adds bytes that already exist and cannot be refused (a reply being queued). */
  add(a: MemoryAccount, n: number): void {
    const h = a.heldBytes;
    this.sharedBytes += this.over(h + n) - this.over(h);
    a.heldBytes = h + n;
    this.totalBytes += n;
    if (this.totalBytes > this.peakBytes) this.peakBytes = this.totalBytes;
    if (this.totalBytes > this.highWaterBytes) this.wasHigh = true;
  }

  release(a: MemoryAccount, n: number): void {
    const h = a.heldBytes;
    assert(n <= h, 'released more than held');
    this.sharedBytes -= this.over(h) - this.over(h - n);
    a.heldBytes = h - n;
    this.totalBytes -= n;
    if (this.wasHigh && this.totalBytes < this.lowWaterBytes) {
      this.wasHigh = false;
      this.onShrunk();
    }
    if (this.waiters.size > 0 && !this.wakeScheduled) {
      // Batch: many releases in one loop turn make one pass over the waiters.
      this.wakeScheduled = true;
      setImmediate(() => this.wakeWaiters());
    }
  }

  /** The connection is gone: it no longer waits (what it holds is released by the caller). */
  close(a: MemoryAccount): void {
    if (a.waiting) this.unwait(a);
  }

  private unwait(a: MemoryAccount): void {
    a.waiting = false;
    this.waiters.delete(a);
    if (this.waiters.size === 0) this.onPressure(false, 0);
  }

  private wakeWaiters(): void {
    this.wakeScheduled = false;
    // Smallest first: connections that sit on memory, or want much, are served last.
    const order = [...this.waiters].sort((x, y) => x.heldBytes + x.wantBytes - (y.heldBytes + y.wantBytes));
    for (const a of order) {
      if (!a.waiting) continue;
      a.wake();
    }
  }
}
