// Why: received data arrives as a list of socket buffers, and both the replica's playback
// (a chunk's block runs) and the sync stream (a write larger than one frame) cut such a list
// into consecutive byte ranges. Views only: no byte is copied.

import { assert } from './assert.js';

/** Consecutive byte ranges of a list of buffers, as views (a chunk's runs, in order). */
export class PartsCursor {
  private i = 0;
  private at = 0;
  constructor(private readonly parts: readonly Buffer[]) {}

  /** The next `n` bytes as views of the parts (at least one view, possibly empty). */
  take(n: number): Buffer[] {
    const out: Buffer[] = [];
    while (n > 0) {
      assert(this.i < this.parts.length, 'PartsCursor: past the end');
      const p = this.parts[this.i]!;
      const k = Math.min(n, p.length - this.at);
      out.push(p.subarray(this.at, this.at + k));
      this.advance(k);
      n -= k;
    }
    if (out.length === 0) out.push(Buffer.alloc(0));
    return out;
  }

  skip(n: number): void {
    while (n > 0) {
      assert(this.i < this.parts.length, 'PartsCursor: past the end');
      const k = Math.min(n, this.parts[this.i]!.length - this.at);
      this.advance(k);
      n -= k;
    }
  }

  private advance(k: number): void {
    this.at += k;
    if (this.at === this.parts[this.i]!.length) {
      this.i++;
      this.at = 0;
    }
  }
}
