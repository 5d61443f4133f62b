// Why: a replica receives ~1 GB/s of chunk data. Read the way Node reads a socket, every
// 64 KiB lands in a fresh buffer: 16 new buffers per MiB that the kernel faults in page by
// page and V8 counts as external memory, which triggers a full mark-compact every few
// hundred MiB (perf of a replica receiving 1 GiB, 2026-12-07: ~20% of its CPU in major GC).
// A link that reads into buffers of its own choosing (transport.ts Conn.readInto) takes
// each frame's data buffer from this pool and gives it back once the frame is released,
// so the same few buffers carry the whole stream. Pure: no sockets, no files.

import { assert } from '../util/assert.js';

/** The smallest buffer handed out (smaller data takes a buffer of this size). */
const classBytesMin = 4096;

export class PayloadPool {
  /** Idle buffers by capacity (a power of two). */
  private readonly idle = new Map<number, Buffer[]>();
  private idleBytes = 0;
  /** Buffers made (not taken from the pool), and taken from it (status, tests). */
  allocated = 0;
  reused = 0;

  /** `idleBytesMax`: buffers given back past this are left to the garbage collector. */
  constructor(private readonly idleBytesMax: number) {}

  /** A buffer of at least `bytes` (its length is its size class: use a subarray). */
  take(bytes: number): Buffer {
    assert(Number.isSafeInteger(bytes) && bytes > 0, `PayloadPool.take(${bytes})`);
    const cap = classOf(bytes);
    const list = this.idle.get(cap);
    const b = list?.pop();
    if (b !== undefined) {
      this.idleBytes -= cap;
      this.reused++;
      return b;
    }
    this.allocated++;
    return Buffer.allocUnsafeSlow(cap); // (never a slice of Node's shared slab: its own memory, whole)
  }

  /** `b` (from take(), whole) is no longer referred to by anyone. */
  give(b: Buffer): void {
    assert(b.length === classOf(b.length) && b.byteOffset === 0, `PayloadPool.give: not a buffer of this pool (${b.length} bytes at ${b.byteOffset})`);
    if (this.idleBytes + b.length > this.idleBytesMax) return;
    let list = this.idle.get(b.length);
    if (!list) this.idle.set(b.length, (list = []));
    list.push(b);
    this.idleBytes += b.length;
  }

  /** Bytes held by idle buffers. */
  get idleBytesHeld(): number {
    return this.idleBytes;
  }
}

function classOf(bytes: number): number {
  let c = classBytesMin;
  while (c < bytes) c *= 2;
  return c;
}
