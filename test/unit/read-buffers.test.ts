// Why: 1 MiB READs must reuse their buffers. With 4 connections at queue depth 8, 32 of
// them are in flight; when the pool kept less than that, or a 28-byte header in front of
// the data doubled each buffer's size class, most reads took a fresh mmap'd buffer and
// the event loop spent a fifth of its time in the GC. These tests pin the buffer sizes
// and the reuse, and that the bytes on the wire stay the same.
import { describe, expect, it } from 'vitest';
import { randomFillSync } from 'node:crypto';
import { Transmission } from '../../src/nbd/transmission.js';
import type { Negotiated } from '../../src/nbd/negotiator.js';
import { BufferPool } from '../../src/util/buffer-pool.js';
import * as C from '../../src/nbd/constants.js';
import { MemoryExport } from '../helpers/memory-export.js';

const MiB = 1024 * 1024;

function setup(structured: boolean, readAheadBytesMax = 0) {
  const exp = new MemoryExport('m', 64 * MiB);
  randomFillSync(exp.data);
  exp.async = true;
  const replies: { buffers: Buffer[]; sent?: () => void }[] = [];
  const neg: Negotiated = {
    export: exp,
    structuredReplies: structured,
    metaContexts: structured ? [C.CONTEXT_BASE_ALLOCATION] : [],
    blockSizeAgreed: true,
    transmissionFlags: 0,
    tls: false,
  };
  let completed = 0;
  const tx = new Transmission(exp, neg, { send: (buffers, sent) => replies.push({ buffers, sent }), completed: () => completed++, warn: () => undefined }, readAheadBytesMax);
  let cookie = 0;
  const read = (offset: number, length: number) =>
    tx.handle({ flags: 0, type: C.CMD_READ, cookieHi: 0, cookieLo: ++cookie, offset, length, payloadDiscarded: false }, []);
  const settle = () => new Promise((r) => setTimeout(r, 20));
  return { exp, tx, replies, read, settle, completed: () => completed };
}

/** The buffers of a reply that carry read data (the 1 MiB ones). */
function dataBuffers(buffers: Buffer[]): Buffer[] {
  return buffers.filter((b) => b.length >= MiB);
}

describe('READ buffers', () => {
  for (const structured of [false, true]) {
    it(`32 reads of 1 MiB in flight take 1 MiB buffers, and the next 32 reuse them (${structured ? 'structured' : 'simple'} replies)`, async () => {
      const t = setup(structured);
      for (let i = 0; i < 32; i++) t.read(i * MiB, MiB);
      await t.settle();
      expect(t.replies).toHaveLength(32);
      const first = new Set<ArrayBufferLike>();
      t.replies.forEach((r, i) => {
        const wire = Buffer.concat(r.buffers);
        const headerBytes = structured ? 28 : 16;
        expect(wire.length).toBe(headerBytes + MiB);
        expect(wire.readUInt32BE(0)).toBe(structured ? C.STRUCTURED_REPLY_MAGIC : C.SIMPLE_REPLY_MAGIC);
        expect(wire.subarray(headerBytes).equals(t.exp.data.subarray(i * MiB, (i + 1) * MiB))).toBe(true);
        const [data] = dataBuffers(r.buffers);
        // The size class is the request's length, not the next power of two above it plus a header.
        expect(data!.buffer.byteLength).toBe(MiB);
        first.add(data!.buffer);
      });
      expect(first.size).toBe(32);
      // The socket wrote them all (a burst of completions): every buffer goes back to the pool.
      for (const r of t.replies.splice(0)) r.sent?.();
      for (let i = 0; i < 32; i++) t.read((32 + i) * MiB, MiB);
      await t.settle();
      expect(t.replies).toHaveLength(32);
      const reused = t.replies.filter((r) => first.has(dataBuffers(r.buffers)[0]!.buffer)).length;
      expect(reused).toBe(32);
      t.replies.forEach((r, i) => {
        expect(Buffer.concat(dataBuffers(r.buffers)).equals(t.exp.data.subarray((32 + i) * MiB, (33 + i) * MiB))).toBe(true);
      });
      for (const r of t.replies.splice(0)) r.sent?.();
    });
  }

  it('a buffer is not reused while the socket still holds it', async () => {
    const t = setup(true);
    t.read(0, MiB);
    await t.settle();
    const held = dataBuffers(t.replies[0]!.buffers)[0]!;
    const before = Buffer.from(held);
    for (let i = 1; i <= 8; i++) t.read(i * MiB, MiB);
    await t.settle();
    expect(held.equals(before)).toBe(true);
    for (const r of t.replies.splice(0)) r.sent?.();
  });
});

describe('BufferPool', () => {
  it('keeps released buffers up to its cap and trims them on request', () => {
    const pool = new BufferPool(64 * 1024, 3 * MiB);
    const bufs = [pool.acquire(MiB), pool.acquire(MiB), pool.acquire(MiB), pool.acquire(MiB)];
    for (const b of bufs) pool.release(b);
    expect(pool.idleBytes).toBe(3 * MiB); // the fourth went over the cap
    pool.trim(MiB);
    expect(pool.idleBytes).toBe(MiB);
    const again = pool.acquire(MiB);
    expect(bufs.slice(0, 3).some((b) => b.buffer === again.buffer)).toBe(true);
    expect(pool.idleBytes).toBe(0);
  });
});

describe('READ read-ahead (Transmission readAheadBytesMax)', () => {
  it('a connection holds at most 3 MiB of large read buffers; the rest wait, in order, for replies to leave', async () => {
    const t = setup(true, 3 * MiB);
    for (let i = 0; i < 8; i++) t.read(i * MiB, MiB);
    await t.settle();
    expect(t.replies).toHaveLength(3); // the others have not even been read
    expect(t.tx.inflight).toBe(5); // a request leaves the count when its reply is queued
    const order: number[] = [];
    for (let round = 0; round < 8 && t.replies.length > 0; round++) {
      const r = t.replies.shift()!;
      const wire = Buffer.concat(r.buffers);
      const offset = Number(wire.readBigUInt64BE(20));
      order.push(offset / MiB);
      expect(wire.subarray(28, 28 + MiB).equals(t.exp.data.subarray(offset, offset + MiB))).toBe(true);
      r.sent?.(); // its buffer is free: the next waiting read starts
      await t.settle();
      expect(t.replies.length).toBeLessThanOrEqual(3);
    }
    expect(order).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    expect(t.tx.inflight).toBe(0);
  });

  it('a read larger than the limit still runs when the connection holds no other', async () => {
    const t = setup(true, MiB);
    t.read(0, 4 * MiB);
    t.read(4 * MiB, 64 * 1024);
    await t.settle();
    expect(t.replies).toHaveLength(1);
    t.replies.shift()!.sent?.();
    await t.settle();
    expect(t.replies).toHaveLength(1);
    expect(Buffer.concat(t.replies[0]!.buffers).subarray(28, 28 + 65536).equals(t.exp.data.subarray(4 * MiB, 4 * MiB + 65536))).toBe(true);
    t.replies.shift()!.sent?.();
    expect(t.tx.inflight).toBe(0);
  });

  it('small reads do not wait behind large ones, and closing ends the waiting reads without replies', async () => {
    const t = setup(true, 2 * MiB);
    for (let i = 0; i < 4; i++) t.read(i * MiB, MiB);
    t.read(10 * MiB, 4096);
    await t.settle();
    expect(t.replies).toHaveLength(3); // two large, and the small one
    const before = t.completed();
    t.tx.close();
    expect(t.tx.inflight).toBe(0); // the two waiting ones end without a reply
    expect(t.completed()).toBe(before + 2);
    for (const r of t.replies.splice(0)) r.sent?.();
    await t.settle();
    expect(t.replies).toHaveLength(0);
  });
});
