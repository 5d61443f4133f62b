// Why: the sync stream (src/replication/sync-stream.ts) decides when a client's write may
// be answered and when writes are refused; its states and fence policies are checked here
// with a fake link and a hand-driven clock, and its splitting of large writes into frames
// with seeded random buffer lists (every byte kept, in order, no group over the limit).
//
// Replay: DELTAVOL_SEED=<printed seed> npx vitest run test/unit/sync-stream.test.ts

import { describe, expect, it } from 'vitest';
import { splitParts, SyncStream, type SyncFence } from '../../src/replication/sync-stream.js';
import type { Link } from '../../src/replication/link.js';
import type { ReplMessage } from '../../src/replication/wire.js';
import type { Clock } from '../../src/util/clock.js';
import { prng, testSeed } from '../helpers/seed.js';

/** A clock that moves only when told, with its timers. */
function manualClock(): Clock & { advance(ms: number): void } {
  let now = 1_000_000;
  const timers: { at: number; every: number; fn: () => void; live: boolean }[] = [];
  return {
    now: () => now,
    after(ms, fn) {
      const t = { at: now + ms, every: 0, fn, live: true };
      timers.push(t);
      return () => void (t.live = false);
    },
    every(ms, fn) {
      const t = { at: now + ms, every: ms, fn, live: true };
      timers.push(t);
      return () => void (t.live = false);
    },
    advance(ms) {
      const end = now + ms;
      for (;;) {
        const due = timers.filter((t) => t.live && t.at <= end).sort((a, b) => a.at - b.at)[0];
        if (!due) break;
        now = due.at;
        if (due.every > 0) due.at += due.every;
        else due.live = false;
        due.fn();
      }
      now = end;
    },
  };
}

/** What the stream sent on a link, and whether it was closed. */
function fakeLink() {
  const sent: { msg: ReplMessage; bytes: number }[] = [];
  let closed: string | null = null;
  const link = {
    send(msg: ReplMessage, data?: Buffer[]) {
      if (closed === null) sent.push({ msg, bytes: (data ?? []).reduce((n, d) => n + d.length, 0) });
    },
    corkForTick() {},
    close(reason: string) {
      closed ??= reason;
    },
  } as unknown as Link;
  return { link, sent, closedReason: () => closed };
}

const noLog = { info() {}, warn() {}, error() {}, debug() {}, child() { return noLog; } } as never;

function stream(fence: SyncFence, clock = manualClock()) {
  const s = new SyncStream({ volume: 'v', fence, timeoutMs: 500, generation: () => 1, clock, log: noLog });
  return { s, clock };
}

const settled = async (p: Promise<void> | undefined) => {
  let state = 'pending';
  p?.then(
    () => (state = 'resolved'),
    () => (state = 'rejected'),
  );
  await new Promise((r) => setImmediate(r));
  return p === undefined ? 'none' : state;
};

describe('sync stream', () => {
  it('starts at a cut, holds writes until the set is on the link, then answers them on acknowledgement', async () => {
    const { s } = stream('never');
    const l = fakeLink();
    expect(s.write(0, [Buffer.alloc(4096)])).toBeUndefined(); // off: nothing to wait for
    s.requestStart(l.link);
    expect(s.state).toBe('starting');
    s.cut(7);
    expect(s.state).toBe('holding');
    const w1 = s.write(4096, [Buffer.alloc(4096, 1)]);
    expect(l.sent).toHaveLength(0); // held behind set 7
    expect(s.covers(7)).toBe(false);
    expect(s.covers(8)).toBe(true);
    s.release(l.link, 7);
    expect(s.state).toBe('streaming');
    expect(l.sent.map((x) => x.msg.t)).toEqual(['sstart', 'swrite']);
    expect(l.sent[0]!.msg).toMatchObject({ t: 'sstart', afterSet: 7, seq: 1, fence: 'never' });
    const w2 = s.write(8192, [Buffer.alloc(4096, 2)]);
    const f = s.flush();
    s.cut(8); // a barrier in the stream: it and what follows wait until set 8 is durable here
    const w3 = s.write(12288, [Buffer.alloc(4096, 3)]);
    expect(l.sent.map((x) => x.msg.t)).toEqual(['sstart', 'swrite', 'swrite', 'sflush']);
    s.committed(8);
    expect(l.sent.map((x) => x.msg.t)).toEqual(['sstart', 'swrite', 'swrite', 'sflush', 'sbarrier', 'swrite']);
    // A cut whose set then fails to build: its barrier never goes (the number is cut again).
    s.cut(9);
    const w4 = s.write(16384, [Buffer.alloc(4096, 4)]);
    s.aborted(9);
    expect(l.sent.map((x) => x.msg.t)).toEqual(['sstart', 'swrite', 'swrite', 'sflush', 'sbarrier', 'swrite', 'sflush', 'swrite']);
    expect(l.sent.map((x) => (x.msg as { seq?: number }).seq)).toEqual([1, 1, 2, 3, 4, 5, 6, 7]); // no gap
    expect(await settled(w1)).toBe('pending');
    s.onAck(1);
    expect(await settled(w1)).toBe('resolved');
    expect(await settled(w2)).toBe('pending');
    expect(s.unackedBytes).toBe(3 * 4096);
    s.onAck(7); // cumulative: the writes, the flush and the barrier (seq 6 was the aborted barrier's)
    expect(await settled(w2)).toBe('resolved');
    expect(await settled(f)).toBe('resolved');
    expect(await settled(w3)).toBe('resolved');
    expect(await settled(w4)).toBe('resolved');
    expect(s.unacknowledged).toBe(0);
    expect(s.unackedBytes).toBe(0);
  });

  it('fence never: a replica silent past the timeout releases the writes waiting and closes the link', async () => {
    const { s, clock } = stream('never');
    const l = fakeLink();
    s.requestStart(l.link);
    s.cut(1);
    s.release(l.link, 1);
    const w = s.write(0, [Buffer.alloc(512)]);
    clock.advance(400);
    expect(await settled(w)).toBe('pending');
    clock.advance(300);
    expect(await settled(w)).toBe('resolved');
    expect(l.closedReason()).toMatch(/did not acknowledge within 500 ms/);
    expect(s.state).toBe('off');
    expect(s.counters.released).toBe(1);
    s.admit(); // never refuses
    expect(s.write(0, [Buffer.alloc(512)])).toBeUndefined();
    expect(s.flush()).toBeUndefined();
  });

  it('fence data: writes waiting fail with EIO, later ones are refused before they change anything', async () => {
    const { s } = stream('data');
    const l = fakeLink();
    expect(() => s.admit()).toThrow(/fence policy is data/); // not in sync yet
    s.requestStart(l.link);
    expect(() => s.admit()).toThrow(); // starting: not yet
    s.cut(1);
    s.release(l.link, 1);
    s.admit();
    const w = s.write(0, [Buffer.alloc(512)]);
    s.stop('link down');
    expect(await settled(w)).toBe('rejected');
    await expect(w).rejects.toMatchObject({ code: 'EIO' });
    expect(() => s.admit()).toThrow(/EIO|fence policy is data/);
    await expect(s.flush()).rejects.toMatchObject({ code: 'EIO' });
    expect(s.counters.failed).toBe(1);
    expect(s.lastBreak?.reason).toBe('link down');
  });

  it('a write larger than a frame travels as several items, answered by the last one', async () => {
    const { s } = stream('never');
    const l = fakeLink();
    s.requestStart(l.link);
    s.cut(1);
    s.release(l.link, 1);
    const big = Buffer.alloc(20 * 1024 * 1024);
    const w = s.write(1 << 20, [big.subarray(0, 3 << 20), big.subarray(3 << 20)]);
    const items = l.sent.filter((x) => x.msg.t === 'swrite').map((x) => x.msg as Extract<ReplMessage, { t: 'swrite' }>);
    expect(items.map((x) => x.lengthBytes)).toEqual([8 << 20, 8 << 20, 4 << 20]);
    expect(items.map((x) => x.offsetBytes)).toEqual([1 << 20, 9 << 20, 17 << 20]);
    s.onAck(items[1]!.seq);
    expect(await settled(w)).toBe('pending');
    s.onAck(items[2]!.seq);
    expect(await settled(w)).toBe('resolved');
  });

  it('splitParts keeps every byte in order, in groups of at most the limit (seeded)', () => {
    const seed = testSeed('sync-split');
    const rnd = prng(seed);
    for (let round = 0; round < 300; round++) {
      const chunks: Buffer[] = [];
      const n = 1 + Math.floor(rnd() * 6);
      let total = 0;
      for (let i = 0; i < n; i++) {
        const b = Buffer.alloc(Math.floor(rnd() * 5000));
        for (let j = 0; j < b.length; j++) b[j] = (total + j) & 0xff;
        total += b.length;
        chunks.push(b);
      }
      const max = 1 + Math.floor(rnd() * 4096);
      const groups = splitParts(chunks, max);
      const sizes = groups.map((g) => g.reduce((k, b) => k + b.length, 0));
      expect(Buffer.concat(groups.flat()).equals(Buffer.concat(chunks)), `seed ${seed} round ${round}`).toBe(true);
      for (let i = 0; i < sizes.length; i++) {
        expect(sizes[i]!).toBeLessThanOrEqual(max);
        if (i < sizes.length - 1) expect(sizes[i]).toBe(max);
      }
    }
  });
});
