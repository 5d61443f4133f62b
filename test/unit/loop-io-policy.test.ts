// Why: large I/O on the event loop is cheaper but makes every other client wait, so the
// daemon allows it only while one client is served. This pins down what "one client" means.
//
// Run: npx vitest run test/unit/loop-io-policy.test.ts

import { describe, expect, it } from 'vitest';
import { LONE_CLIENT_WINDOW_MS, LoopIoPolicy } from '../../src/util/loop-io-policy.js';

const KiB = 1024;

describe('LoopIoPolicy', () => {
  it('gives the large limit with no client or one, the small one while two were served recently', () => {
    let now = 1_000_000;
    const p = new LoopIoPolicy(64 * KiB, 2048 * KiB, () => now);
    const a = {};
    const b = {};
    expect(p.syncIoBytesMax).toBe(2048 * KiB); // nobody yet (a replica's playback, a copy)
    for (let i = 0; i < 100; i++, now += 1) p.clientRequest(a);
    expect(p.syncIoBytesMax).toBe(2048 * KiB); // one client, however busy
    p.clientRequest(b);
    expect(p.syncIoBytesMax).toBe(64 * KiB);
    // b goes quiet: a alone again once b's last request is older than the window.
    for (let t = 0; t < LONE_CLIENT_WINDOW_MS; t += 10, now += 10) {
      p.clientRequest(a);
      expect(p.syncIoBytesMax).toBe(64 * KiB);
    }
    now += 10;
    p.clientRequest(a);
    expect(p.syncIoBytesMax).toBe(2048 * KiB);
    // Two clients taking turns keep it small, and so does a third.
    for (let i = 0; i < 50; i++, now += 5) {
      p.clientRequest(i % 2 === 0 ? b : a);
      expect(p.syncIoBytesMax).toBe(64 * KiB);
    }
    p.clientRequest({});
    expect(p.syncIoBytesMax).toBe(64 * KiB);
  });

  it('never goes below the configured limit, and a lone limit at or below it changes nothing', () => {
    let now = 0;
    const off = new LoopIoPolicy(64 * KiB, 64 * KiB, () => now);
    expect(off.syncIoBytesMax).toBe(64 * KiB);
    const none = new LoopIoPolicy(0, 0, () => now);
    none.clientRequest(1);
    expect(none.syncIoBytesMax).toBe(0);
    const lower = new LoopIoPolicy(256 * KiB, 64 * KiB, () => now);
    lower.clientRequest(1);
    lower.clientRequest(2);
    now += 10 * LONE_CLIENT_WINDOW_MS;
    expect(lower.syncIoBytesMax).toBe(256 * KiB);
  });
});
