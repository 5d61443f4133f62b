// Why: a failover's report is what an operator reads to learn what was lost. Its bound
// comes from the primary's last progress report, which is void once a set it counted as
// held here is dropped (failover --now). Simulator seed 5300991 found the bound set aside for
// sets the report had never counted (received after it), leaving none at all: the report
// said nothing was at risk while 30 acknowledged writes were lost. When no bound holds, the
// cut of the last whole set played is the fallback. Pure function, no I/O.
import { describe, expect, it } from 'vitest';
import { lossReport } from '../../src/recovery/failover.js';
import type { PrimaryReport, ReplicaVolume } from '../../src/replication/replica.js';

const T0 = 1_700_000_000_000;

function replica(report: PrimaryReport | null, consistent: boolean, chainHeadSet: number): ReplicaVolume {
  return { lastReport: report, lastContactMs: report?.atMs ?? null, chainHeadSet, info: { consistent } } as unknown as ReplicaVolume;
}

const report = (heldSet: number | undefined): PrimaryReport => ({
  lastSet: 2,
  atRiskSinceMs: T0 + 804,
  bytesDifferent: 65536,
  atMs: T0 + 7619,
  primaryAtMs: T0 + 7619,
  ...(heldSet !== undefined ? { heldSet } : {}),
});

describe('failover loss report', () => {
  it('keeps the primary\'s bound when the dropped sets arrived after its report (seed 5300991)', () => {
    const r = lossReport(replica(report(1), false, 3), [2, 3], 135168, null, T0 + 8096);
    expect(r.atRiskSinceMs).toBe(T0 + 804);
    expect(r.seconds).toBeGreaterThan(0);
    expect(r.bytesAtMost).toBe(65536 + 135168);
  });

  it('sets the bound aside when a dropped set may have been counted as held', () => {
    // Consistent replica: the cut of the last set played is the bound left.
    const r = lossReport(replica(report(2), true, 3), [2, 3], 135168, T0 + 516, T0 + 8096);
    expect(r.atRiskSinceMs).toBe(T0 + 516);
    // A report kept by an older version says nothing of what it counted: the same.
    expect(lossReport(replica(report(undefined), true, 3), [3], 69632, T0 + 516, T0 + 8096).atRiskSinceMs).toBe(T0 + 516);
  });

  it('falls back on the cut of the last whole set played when the report is void and the replica not at a point in time', () => {
    const r = lossReport(replica(report(2), false, 3), [2, 3], 135168, T0 + 7000, T0 + 8096, null, T0 + 516);
    // (The last set played was partial: its cut at 7.000 is no bound; the whole one's at 0.516 is.)
    expect(r.atRiskSinceMs).toBe(T0 + 516);
    expect(r.seconds).toBeGreaterThan(7);
    // Only as a fallback: a bound that holds is not replaced by the older whole cut.
    expect(lossReport(replica(report(1), false, 3), [2, 3], 135168, null, T0 + 8096, null, T0 + 516).atRiskSinceMs).toBe(T0 + 804);
    // A split still caps it.
    expect(lossReport(replica(report(2), false, 3), [2], 65536, null, T0 + 8096, T0 + 300, T0 + 516).atRiskSinceMs).toBe(T0 + 300);
  });

  it('uses the later of the two bounds when both hold, and the report alone when nothing was dropped', () => {
    expect(lossReport(replica(report(1), true, 1), [], 0, T0 + 516, T0 + 8096).atRiskSinceMs).toBe(T0 + 804);
    expect(lossReport(replica(report(undefined), false, 1), [], 0, null, T0 + 8096).atRiskSinceMs).toBe(T0 + 804);
  });
});
