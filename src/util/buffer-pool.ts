// Why: large I/O buffers (64 KiB–32 MiB) are mmap'd by malloc, so a fresh one per
// request costs page faults and zeroing in the kernel, and freed ones linger until a GC.
// Reusing them by power-of-two size class keeps 1 MiB reads cheap and memory flat.
// Small buffers are left to Node's own pool. The idle cap must cover what is in flight at
// once (4 connections × 8 × 1 MiB reads = 32 MiB): below it, every burst of completions
// drops buffers that the next burst allocates again (a fifth of the loop went to GC).

import { assert } from './assert.js';

export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooledBytes = 0;
  /** Pooled-size buffers handed out since start (an owner tells a quiet pool by it not moving). */
  acquires = 0;

  constructor(
    /** Requests smaller than this are not pooled. */
    readonly sizeBytesMin: number,
    /** At most this many bytes sit idle in the pool; more are dropped for the GC. */
    readonly pooledBytesMax: number,
  ) {
    assert((sizeBytesMin & (sizeBytesMin - 1)) === 0, 'pool minimum must be a power of two');
  }

  private classOf(size: number): number {
    let c = this.sizeBytesMin;
    while (c < size) c *= 2;
    return c;
  }

  /** A buffer of exactly `size` bytes (a view of a pooled, larger-or-equal one); contents undefined. */
  acquire(size: number): Buffer {
    if (size < this.sizeBytesMin) return Buffer.allocUnsafe(size);
    this.acquires++;
    const cls = this.classOf(size);
    const list = this.free.get(cls);
    const b = list?.pop();
    if (b) {
      this.pooledBytes -= cls;
      return b.subarray(0, size);
    }
    return Buffer.allocUnsafeSlow(cls).subarray(0, size);
  }

  /** Gives a buffer from acquire() back; the caller must not touch it afterwards. */
  release(view: Buffer): void {
    const cls = view.buffer.byteLength;
    if (view.length < this.sizeBytesMin || view.byteOffset !== 0 || cls !== this.classOf(cls)) return;
    if (this.pooledBytes + cls > this.pooledBytesMax) return;
    let list = this.free.get(cls);
    if (!list) this.free.set(cls, (list = []));
    list.push(Buffer.from(view.buffer, 0, cls));
    this.pooledBytes += cls;
  }

  /** Bytes sitting idle in the pool. */
  get idleBytes(): number {
    return this.pooledBytes;
  }

  /** Drops idle buffers (largest classes first) until at most keepBytes stay; the GC frees them. */
  trim(keepBytes: number): void {
    const classes = [...this.free.keys()].sort((a, b) => b - a);
    for (const cls of classes) {
      const list = this.free.get(cls)!;
      while (list.length > 0 && this.pooledBytes > keepBytes) {
        list.pop();
        this.pooledBytes -= cls;
      }
    }
  }
}
