// Why: a restore from the replica (seed 003) closes a primary to client writes until it
// ends, and must survive a crash in that state; the role record is the one owner of that
// (role-record.ts). These tests hold its transition rules for restores: who may start
// one, what it blocks (a handover, removing its pair), what clients get, and that the
// record reads back the same after a restart.

import { describe, expect, it } from 'vitest';
import { emptyRoleState, nextRoleState, writeAccessOf, RoleRecord, type PairRecord, type RoleState } from '../../src/recovery/role-record.js';
import { SimFs } from '../helpers/sim-fs.js';
import { silentLogger } from '../../src/util/log.js';

function pair(id: string): PairRecord {
  return {
    id,
    createdAt: new Date(0).toISOString(),
    peerHost: '127.0.0.1',
    peerPort: 1,
    remoteVolume: 'v',
    cutIntervalMs: 5000,
    highWaterBytes: 1 << 26,
    retriesBeforeSuspend: 5,
    ackedSet: 0,
    playedSet: 0,
    initialCopy: { done: true, offsetBytes: 0, totalBytes: 0, baseSet: 0 },
    operatorSuspended: false,
    detached: false,
    catchUp: null,
  } as unknown as PairRecord;
}

function primary(): RoleState {
  return nextRoleState(emptyRoleState(), { t: 'pair-added', pair: pair('aaaaaaaaaaaa') });
}

const restore = { pairId: 'aaaaaaaaaaaa', snapshot: 'clean', beforeSnapshot: 'before-restore-x', atMs: 1 };

describe('role record: restore from the replica', () => {
  it('refuses client writes while it runs, and opens them again when it ends', () => {
    const s = nextRoleState(primary(), { t: 'restore-started', restore });
    const a = writeAccessOf(s);
    expect(a.mode).toBe('refuse');
    expect(a.mode === 'refuse' && a.code).toBe('RESTORING');
    const done = nextRoleState(s, { t: 'restore-finished' });
    expect(writeAccessOf(done).mode).toBe('open');
    expect(done.restore).toBeNull();
  });

  it('only an unfenced primary with that pair is restored; one restore at a time', () => {
    expect(() => nextRoleState(emptyRoleState(), { t: 'restore-started', restore })).toThrow(/only an unfenced primary/);
    expect(() => nextRoleState(primary(), { t: 'restore-started', restore: { ...restore, pairId: 'bbbbbbbbbbbb' } })).toThrow(/no pair/);
    const fenced = nextRoleState(primary(), { t: 'fenced', fence: { generation: 2, peer: 'x', reason: 'test', atMs: 1 } });
    expect(() => nextRoleState(fenced, { t: 'restore-started', restore })).toThrow(/only an unfenced primary/);
    const s = nextRoleState(nextRoleState(primary(), { t: 'pair-added', pair: pair('bbbbbbbbbbbb') }), { t: 'restore-started', restore });
    expect(() => nextRoleState(s, { t: 'restore-started', restore: { ...restore, pairId: 'bbbbbbbbbbbb' } })).toThrow(/under way/);
    expect(() => nextRoleState(primary(), { t: 'restore-finished' })).toThrow(/no restore/);
  });

  it('blocks a planned handover and the removal of its pair, not of another pair', () => {
    const two = nextRoleState(primary(), { t: 'pair-added', pair: pair('bbbbbbbbbbbb') });
    const s = nextRoleState(two, { t: 'restore-started', restore });
    expect(() => nextRoleState(s, { t: 'handover-prepared', handover: { pairId: 'aaaaaaaaaaaa', newPairId: 'c', newGeneration: 2, peerBaseSet: 0, lastSet: 0, offered: false, atMs: 1 } })).toThrow(/restore/);
    expect(() => nextRoleState(s, { t: 'pair-removed', pairId: 'aaaaaaaaaaaa' })).toThrow(/restore/);
    expect(nextRoleState(s, { t: 'pair-removed', pairId: 'bbbbbbbbbbbb' }).pairs.map((p) => p.id)).toEqual(['aaaaaaaaaaaa']);
  });

  it('is durable: a record reopened after a crash still refuses writes, and an old record without the field reads as none', () => {
    const fsys = new SimFs();
    const log = silentLogger();
    const r = RoleRecord.open(fsys, log, () => 5);
    r.transition({ t: 'pair-added', pair: pair('aaaaaaaaaaaa') });
    r.transition({ t: 'restore-started', restore });
    const again = RoleRecord.open(fsys, log, () => 6);
    expect(again.state.restore).toEqual(restore);
    expect(again.writeAccess.mode).toBe('refuse');
    const old = JSON.parse(JSON.stringify(primary())) as Record<string, unknown>;
    delete old.restore;
    expect(writeAccessOf(old as unknown as RoleState).mode).toBe('open');
  });
});
