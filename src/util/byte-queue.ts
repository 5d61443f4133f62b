// Why: a socket delivers bytes in chunks of any size (the kernel client sends its
// handshake in 4 small writes; a 1 MiB WRITE arrives in ~16 pieces). Both protocol
// phases parse from this queue, which hands out views of complete frames and copies
// only when a small field straddles two chunks. Pure: no sockets here.

import { assert } from '../util/assert.js';

export class ByteQueue {
  private chunks: Buffer[] = [];
  private first = 0; // index of the first live chunk
  private head = 0; // bytes of chunks[first] already consumed
  length = 0;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** n bytes as one buffer: a view when they lie in one chunk, else a copy. */
  take(n: number): Buffer {
    assert(n <= this.length, 'take past end of queue');
    if (n === 0) return Buffer.alloc(0);
    const c = this.chunks[this.first]!;
    if (c.length - this.head >= n) {
      const view = c.subarray(this.head, this.head + n);
      this.advance(n);
      return view;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    for (const v of this.takeViews(n)) {
      v.copy(out, filled);
      filled += v.length;
    }
    return out;
  }

  /** n bytes as views of the received chunks, never copied (write payloads). */
  takeViews(n: number): Buffer[] {
    assert(n <= this.length, 'take past end of queue');
    const views: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const c = this.chunks[this.first]!;
      const avail = c.length - this.head;
      const k = Math.min(avail, left);
      views.push(c.subarray(this.head, this.head + k));
      this.advance(k);
      left -= k;
    }
    return views;
  }

  /**
   * The last chunk pushed gets a copy of its own (its buffer is about to be read into again);
   * earlier chunks stay as they are. Only what is left of it is copied.
   */
  ownLast(): void {
    const i = this.chunks.length - 1;
    if (i < this.first) return;
    const start = i === this.first ? this.head : 0;
    const c = this.chunks[i]!;
    const copy = Buffer.allocUnsafe(c.length - start);
    c.copy(copy, 0, start);
    this.chunks[i] = copy;
    if (i === this.first) this.head = 0;
  }

  /** Copies the next n bytes into target at targetOffset and drops them from the queue. */
  copyOut(target: Buffer, targetOffset: number, n: number): void {
    assert(n <= this.length, 'copy past end of queue');
    let at = targetOffset;
    let left = n;
    while (left > 0) {
      const c = this.chunks[this.first]!;
      const k = Math.min(c.length - this.head, left);
      c.copy(target, at, this.head, this.head + k);
      this.advance(k);
      at += k;
      left -= k;
    }
  }

  /** Drops up to n bytes; returns how many were dropped. */
  skip(n: number): number {
    const k = Math.min(n, this.length);
    let left = k;
    while (left > 0) {
      const avail = this.chunks[this.first]!.length - this.head;
      const d = Math.min(avail, left);
      this.advance(d);
      left -= d;
    }
    return k;
  }

  clear(): void {
    this.chunks = [];
    this.first = 0;
    this.head = 0;
    this.length = 0;
  }

  private advance(n: number): void {
    this.head += n;
    this.length -= n;
    if (this.head === this.chunks[this.first]!.length) {
      this.first++;
      this.head = 0;
      if (this.first === this.chunks.length) {
        this.chunks.length = 0;
        this.first = 0;
      } else if (this.first >= 64) {
        this.chunks = this.chunks.slice(this.first);
        this.first = 0;
      }
    }
  }
}
