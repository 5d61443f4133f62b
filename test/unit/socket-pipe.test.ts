// Why: a payload pipe is reused only when it is known to be empty; one that still holds
// bytes (a rejected WRITE), or whose move failed midway, must be closed, or the next
// payload would be written after another request's bytes. Also pins the moves themselves:
// into a file at an offset (on the loop and in the threadpool), and into memory.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { PayloadPipePool } from '../../src/util/socket-pipe.js';

const available = PayloadPipePool.available;
const KiB = 1024;

function bytes(n: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) & 255;
  return b;
}

describe.skipIf(!available)('payload pipes', () => {
  const released: Buffer[] = [];
  const pool = new PayloadPipePool({ acquire: (n) => Buffer.alloc(n), release: (b) => released.push(b) });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'deltavol-pipe-'));
  afterEach(() => {
    released.length = 0;
  });

  it('moves a payload into a file at an offset, on this thread and in the threadpool, and reuses the emptied pipe', async () => {
    const file = path.join(dir, 'f');
    fs.writeFileSync(file, Buffer.alloc(1024 * KiB));
    const fd = fs.openSync(file, 'r+');
    try {
      const p = pool.acquire()!;
      expect(p).not.toBeNull();
      p.length = 300 * KiB;
      expect(p.put([bytes(100 * KiB, 1), bytes(200 * KiB, 2)])).toBe(300 * KiB);
      p.moveToFileSync(fd, 7);
      pool.release(p);
      const q = pool.acquire()!;
      expect(q, 'the emptied pipe comes back').toBe(p);
      q.length = 64 * KiB;
      q.put([bytes(64 * KiB, 3)]);
      await q.moveToFile(fd, 500 * KiB);
      pool.release(q);
      const got = fs.readFileSync(file);
      expect(got.subarray(7, 7 + 300 * KiB).equals(Buffer.concat([bytes(100 * KiB, 1), bytes(200 * KiB, 2)]))).toBe(true);
      expect(got.subarray(500 * KiB, 564 * KiB).equals(bytes(64 * KiB, 3))).toBe(true);
      expect(got[6]).toBe(0);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('gives a payload in memory once, and its buffer back when the pipe is released', () => {
    const p = pool.acquire()!;
    p.length = 10 * KiB;
    p.put([bytes(10 * KiB, 4)]);
    const b = p.take();
    expect(b.equals(bytes(10 * KiB, 4))).toBe(true);
    expect(p.take()).toBe(b);
    pool.release(p);
    expect(released).toEqual([b]);
    expect(pool.acquire(), 'an emptied pipe is reused').toBe(p);
    pool.release(p);
  });

  it('closes a pipe that still holds bytes, or whose move failed, instead of reusing it', async () => {
    const p = pool.acquire()!;
    const open = pool.openPipes;
    p.length = 8 * KiB;
    p.put([bytes(8 * KiB, 5)]);
    pool.release(p); // a rejected WRITE: never consumed
    expect(pool.openPipes, 'closed, not kept').toBe(open - 1);
    const q = pool.acquire()!;
    expect(q).not.toBe(p);
    q.length = 8 * KiB;
    q.put([bytes(8 * KiB, 6)]);
    await expect(q.moveToFile(1_000_000, 0)).rejects.toMatchObject({ code: 'EBADF' });
    pool.release(q);
    expect(pool.acquire()).not.toBe(q);
  });

  it('puts what fits, in order, when the pipe fills (then the payload goes on elsewhere)', () => {
    const p = pool.acquire()!;
    const views = Array.from({ length: 150 }, (_, i) => bytes(20 * KiB, i));
    const all = Buffer.concat(views);
    p.length = all.length;
    const took = p.put(views);
    expect(took).toBeGreaterThan(0);
    expect(took).toBeLessThan(all.length);
    const back = Buffer.alloc(all.length);
    expect(p.drainInto(back, 0)).toBe(took);
    expect(back.subarray(0, took).equals(all.subarray(0, took))).toBe(true);
    expect(p.inPipe).toBe(0);
    pool.release(p);
  });

  it('refuses to move a payload that is not all in the pipe', () => {
    const p = pool.acquire()!;
    p.length = 8 * KiB;
    p.put([bytes(4 * KiB, 7)]);
    expect(() => p.moveToFileSync(0, 0)).toThrow(/holds 4096 of its payload's 8192 bytes/);
    pool.release(p);
  });
});
