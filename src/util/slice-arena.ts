// Why: a 4 KiB READ reply (header and data in one buffer) came from Node's buffer pool,
// which hands out slices of a fresh 64 KiB slab each time one fills: at 62k reads a second
// that is 250 MB/s of new external memory, and V8 answers with a full mark-compact every
// ~75 ms (--trace-gc: 185 in 17 s, "GC in old space requested"; perf: ~8% of the loop and
// a share of the other core). Here the slices come from a few slabs that are reused once
// every slice of one was released (its reply written), so the same memory carries them.
// Small WRITE payloads use an arena of their own the same way (server/connection.ts).
// Releases come in any order; a slab still referred to when it fills is simply replaced
// (the last release of a retired slab makes it a spare, or leaves it to the collector).

import { assert } from './assert.js';

export interface Slab {
  readonly buf: Buffer;
  /** Bytes handed out from the start of buf. */
  used: number;
  /** Slices not yet released. */
  outstanding: number;
  /** Releases one slice of this slab (bound once per slab: no closure per slice). */
  readonly release: () => void;
}

export class SliceArena {
  private cur: Slab;
  private readonly spares: Slab[] = [];
  /** Slabs made since start (status, tests). */
  slabsMade = 0;

  constructor(
    /** Size of one slab; slices are at most a quarter of it. */
    readonly slabBytes: number,
    /** Idle slabs kept for reuse. */
    private readonly sparesMax: number,
  ) {
    this.cur = this.makeSlab();
  }

  /** The slab of the last slice taken (give its `release` to whoever ends the slice's use). */
  get lastSlab(): Slab {
    return this.cur;
  }

  /** The largest slice this arena hands out. */
  get sliceBytesMax(): number {
    return this.slabBytes >>> 2;
  }

  /** A slice of `n` bytes (contents undefined); release it with `lastSlab.release` once unused. */
  take(n: number): Buffer {
    assert(n > 0 && n <= this.sliceBytesMax, `SliceArena.take(${n})`);
    let s = this.cur;
    if (s.used + n > this.slabBytes) {
      if (s.outstanding === 0) s.used = 0;
      else s = this.cur = this.spares.pop() ?? this.makeSlab();
    }
    const slice = s.buf.subarray(s.used, s.used + n);
    s.used += n;
    s.outstanding++;
    return slice;
  }

  private makeSlab(): Slab {
    this.slabsMade++;
    const slab: Slab = {
      buf: Buffer.allocUnsafeSlow(this.slabBytes),
      used: 0,
      outstanding: 0,
      release: () => {
        assert(slab.outstanding > 0, 'SliceArena: a slice released twice');
        if (--slab.outstanding > 0) return;
        if (slab === this.cur) slab.used = 0; // (nothing refers to it: start it over)
        else if (this.spares.length < this.sparesMax) {
          slab.used = 0;
          this.spares.push(slab);
        }
      },
    };
    return slab;
  }
}
