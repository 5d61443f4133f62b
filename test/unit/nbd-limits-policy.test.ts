// Why: the memory budget and the admission policy decide who is served when clients
// abuse the NBD port; their rules (per-connection reserve, hogs paused first, wake order,
// eviction only from an address holding at least two more) are checked here without
// sockets, and a seeded random run checks the ceiling and that the account returns to zero.

import { describe, expect, it } from 'vitest';
import { MemoryAccount, MemoryBudget } from '../../src/server/memory-budget.js';
import { Admission, normalizeAddress, type Admitted } from '../../src/server/admission.js';
import { prng, testSeed } from '../helpers/seed.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const RESERVE = 128 * KiB;

/** 4 connections × 128 KiB reserve; 64 MiB shared, of which the last 32 MiB only for light connections. */
function budget(): MemoryBudget {
  return new MemoryBudget({ budgetBytesMax: 64 * MiB + 4 * RESERVE, reserveBytesPerConnection: RESERVE, connectionsMax: 4, hogHeadroomBytes: 32 * MiB });
}

describe('MemoryBudget', () => {
  it('every connection can fill its reserve even when a hog holds the shared part', () => {
    const b = budget();
    const hog = new MemoryAccount(() => {});
    expect(b.tryTake(hog, 32 * MiB, false)).toBe(true);
    expect(b.tryTake(hog, 32 * MiB, false)).toBe(false);
    const small = new MemoryAccount(() => {});
    for (let i = 0; i < 32; i++) expect(b.tryTake(small, 4 * KiB, true)).toBe(true);
    expect(small.heldBytes).toBe(RESERVE);
    expect(b.totalBytes).toBe(32 * MiB + RESERVE);
    expect(b.sharedBytes).toBe(32 * MiB - RESERVE);
  });

  it('hogs, deep pipeliners and clients never seen reading are paused first; a light client still gets a full-size request', () => {
    const b = budget();
    const hog = new MemoryAccount(() => {});
    const pipeliner = new MemoryAccount(() => {});
    const light = new MemoryAccount(() => {});
    const unproven = new MemoryAccount(() => {});
    for (const a of [hog, pipeliner, light]) a.proven = true;
    expect(b.tryTake(hog, 32 * MiB, false)).toBe(true);
    expect(b.tryTake(hog, 1 * MiB, false)).toBe(false); // holds shared memory: no headroom for it
    expect(b.tryTake(pipeliner, 32 * MiB, true)).toBe(false); // more requests queued behind: no headroom
    expect(b.tryTake(unproven, 32 * MiB, false)).toBe(false); // no reply of it was ever written out
    expect(b.tryTake(light, 32 * MiB, false)).toBe(true);
    expect(b.sharedBytes).toBeLessThanOrEqual(b.sharedBytesMax);
    expect(b.waiters.size).toBe(3);
    expect(b.waitsTotal).toBe(3);
  });

  it('requests without a buffer (BLOCK_STATUS, FLUSH) wait too once their connection holds shared memory and the hogs limit is reached', () => {
    const b = budget();
    const hog = new MemoryAccount(() => {});
    const other = new MemoryAccount(() => {});
    expect(b.mayGrow(hog)).toBe(true);
    b.add(hog, 33 * MiB); // replies it does not read
    expect(b.mayGrow(hog)).toBe(false);
    expect(b.mayGrow(other)).toBe(true); // within its reserve
    b.release(hog, 33 * MiB);
    expect(b.mayGrow(hog)).toBe(true);
    expect(b.waiters.size).toBe(0);
  });

  it('releases wake the waiters smallest holding-plus-wanted first', async () => {
    const b = budget();
    const woken: string[] = [];
    const hog = new MemoryAccount(() => woken.push('hog'));
    const pipeliner = new MemoryAccount(() => woken.push('pipeliner'));
    const light = new MemoryAccount(() => woken.push('light'));
    for (const a of [hog, pipeliner, light]) a.proven = true;
    expect(b.tryTake(hog, 32 * MiB, false)).toBe(true);
    expect(b.tryTake(hog, 1 * MiB, false)).toBe(false);
    expect(b.tryTake(pipeliner, 32 * MiB, true)).toBe(false);
    expect(b.tryTake(light, 32 * MiB, false)).toBe(true);
    expect(b.tryTake(light, 1 * MiB, false)).toBe(false);
    const pressure: boolean[] = [];
    b.onPressure = (exhausted) => pressure.push(exhausted);
    b.release(light, 32 * MiB);
    b.release(light, 0);
    expect(woken).toEqual([]); // batched to the next turn
    await new Promise((r) => setImmediate(r));
    expect(woken).toEqual(['light', 'pipeliner', 'hog']);
    // Nobody took anything on wake here (the test's wake does not retry): they still wait.
    expect(b.waiters.size).toBe(3);
    for (const a of [hog, pipeliner, light]) b.close(a);
    expect(pressure).toEqual([false]);
  });

  it('a seeded random run never exceeds the budget and returns to zero', () => {
    const seed = testSeed('memory-budget-random');
    const rand = prng(seed);
    const b = budget();
    const accounts = Array.from({ length: 4 }, (_, i) => Object.assign(new MemoryAccount(() => {}), { proven: i % 2 === 0 }));
    const held: number[][] = accounts.map(() => []);
    for (let step = 0; step < 20_000; step++) {
      const i = Math.floor(rand() * accounts.length);
      const a = accounts[i]!;
      if (rand() < 0.55) {
        const n = rand() < 0.7 ? 4 * KiB * (1 + Math.floor(rand() * 32)) : MiB * (1 + Math.floor(rand() * 32));
        if (b.tryTake(a, n, rand() < 0.5)) held[i]!.push(n);
      } else if (held[i]!.length > 0) {
        b.release(a, held[i]!.splice(Math.floor(rand() * held[i]!.length), 1)[0]!);
      } else {
        b.add(a, 16);
        b.release(a, 16);
      }
      expect(b.totalBytes).toBeLessThanOrEqual(b.budgetBytesMax);
      expect(b.sharedBytes).toBe(accounts.reduce((s, x) => s + Math.max(0, x.heldBytes - RESERVE), 0));
    }
    accounts.forEach((a, i) => held[i]!.forEach((n) => b.release(a, n)));
    expect(b.totalBytes).toBe(0);
    expect(b.sharedBytes).toBe(0);
  });
});

interface Fake extends Admitted {
  name: string;
  lastActiveMs: number;
  busy: boolean;
}

let clock = 0;
function fake(name: string, address: string | null, opts: { lastActiveMs?: number; busy?: boolean } = {}): Fake {
  clock++;
  return { name, address, acceptedMs: clock, lastActiveMs: opts.lastActiveMs ?? clock, busy: opts.busy ?? false };
}

describe('Admission', () => {
  it('caps connections per address; Unix sockets and other addresses are not affected', () => {
    const a = new Admission<Fake>({ connectionsMax: 10, handshakeMax: 10, perAddressMax: 2 });
    a.add(fake('a1', '10.0.0.1'));
    a.add(fake('a2', '10.0.0.1'));
    expect(a.decide('10.0.0.1')).toEqual({ kind: 'refuse', reason: 'per-address', count: 2 });
    expect(a.decide('10.0.0.2')).toEqual({ kind: 'admit' });
    expect(a.decide(null)).toEqual({ kind: 'admit' });
    expect(a.refused['per-address']).toBe(1);
  });

  it('when full, evicts the longest-idle connection of the address holding the most, only for an address holding two fewer', () => {
    const a = new Admission<Fake>({ connectionsMax: 4, handshakeMax: 4, perAddressMax: 64 });
    const busyOld = fake('busy-old', 'A', { lastActiveMs: 1, busy: true });
    const idleOld = fake('idle-old', 'A', { lastActiveMs: 5 });
    const idleNew = fake('idle-new', 'A', { lastActiveMs: 9 });
    const b1 = fake('b1', 'B');
    for (const c of [busyOld, idleOld, idleNew, b1]) {
      a.add(c);
      a.handshakeDone(c);
    }
    const d = a.decide('C');
    expect(d.kind === 'evict' && d.victim.name).toBe('idle-old');
    expect(d.kind === 'evict' && d.pool).toBe('transmission');
    expect(a.decide('B').kind).toBe('evict'); // B holds 1, A holds 3
    expect(a.decide('A')).toMatchObject({ kind: 'refuse', reason: 'connections' });
    a.remove(idleOld);
    a.remove(idleOld); // idempotent
    const b2 = fake('b2', 'B');
    a.add(b2);
    a.handshakeDone(b2);
    // A 2, B 2: a newcomer from C (0) may evict, one from B (2) may not.
    expect(a.decide('C').kind).toBe('evict');
    expect(a.decide('B')).toMatchObject({ kind: 'refuse', reason: 'connections' });
  });

  it('connections in the handshake have their own pool; the oldest of the top address is evicted', () => {
    const a = new Admission<Fake>({ connectionsMax: 10, handshakeMax: 2, perAddressMax: 64 });
    const first = fake('first', 'A');
    a.add(first);
    a.add(fake('second', 'A'));
    expect(a.handshakes).toBe(2);
    const d = a.decide('B');
    expect(d.kind === 'evict' && d.victim.name).toBe('first');
    expect(d.kind === 'evict' && d.pool).toBe('handshake');
    expect(a.decide('A')).toMatchObject({ kind: 'refuse', reason: 'handshakes' });
  });

  it('counts IPv4 clients of a dual-stack listener by their IPv4 address', () => {
    expect(normalizeAddress('::ffff:127.0.0.2')).toBe('127.0.0.2');
    expect(normalizeAddress('::1')).toBe('::1');
    expect(normalizeAddress(undefined)).toBe(null);
  });
});
