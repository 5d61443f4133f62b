// Why: where metadata syncs run decides the cost of every cold scattered write (sync-mode.ts):
// a lone slow sync must not send them all through the threadpool, a slow disk must.
import { describe, expect, it } from 'vitest';
import { SyncMode, syncFastNs, syncProbeMs, syncSlowStreak } from '../../src/util/sync-mode.js';

describe('SyncMode', () => {
  it('stays on the loop after slow syncs that are not in a row', () => {
    const m = new SyncMode();
    for (let i = 0; i < 100; i++) {
      m.record(i % syncSlowStreak === 0 ? 5 * syncFastNs : syncFastNs / 10, i);
      expect(m.inPool(i)).toBe(false);
    }
    expect(m.switches).toBe(0);
  });

  it('moves to the threadpool after a streak of slow syncs, and probes the loop again later', () => {
    const m = new SyncMode();
    for (let i = 0; i < syncSlowStreak - 1; i++) m.record(10 * syncFastNs, 1000);
    expect(m.inPool(1000)).toBe(false);
    m.record(10 * syncFastNs, 1000);
    expect(m.inPool(1000)).toBe(true);
    expect(m.inPool(1000 + syncProbeMs - 1)).toBe(true);
    expect(m.inPool(1000 + syncProbeMs)).toBe(false);
    expect(m.switches).toBe(1);
  });
});
