// Why: the crash test must decide, after a SIGKILL at an arbitrary instant, whether what a
// volume (or a snapshot) reads is allowed. This is that model: per byte, the values a
// history of writes/zeroes (each with when it was issued, acknowledged and made durable)
// permits. Kept apart from the test so it can be read and reasoned about on its own.
//
// Rule (per byte x): a "definite" op is one that must be visible (durable ops for a crash,
// ops acknowledged before the snapshot started for a snapshot). cutoff(x) = the latest
// issue time of a definite op covering x. A candidate op C covering x is allowed when it
// was not acknowledged before cutoff(x) (else the definite op overwrote it for sure), and
// for a snapshot, when it was issued before the snapshot completed (never newer data).
// The epoch's starting content is allowed only where no definite op covers x.

export interface ModelOp {
  /** Position in the model's byte space (not the volume's). */
  start: number;
  length: number;
  /** null: the op zeroes (TRIM / WRITE_ZEROES). */
  data: Buffer | null;
  issue: number;
  /** Infinity while unacknowledged (in flight at the kill). */
  ack: number;
  /** FUA, or acknowledged before a completed FLUSH (or snapshot) was issued. */
  durable: boolean;
}

export interface Mismatch {
  at: number;
  actual: number;
  base: number;
  /** The latest ops covering the byte (at most 6). */
  candidates: { issue: number; ack: number; durable: boolean; value: number }[];
}

/**
 * Bytes of `actual` the history does not allow (at most `limit` reported).
 * definite(op): must be visible; candidate(op): may be visible.
 */
export function checkAgainstModel(
  base: Buffer,
  ops: ModelOp[],
  actual: Buffer,
  definite: (op: ModelOp) => boolean,
  candidate: (op: ModelOp) => boolean,
  limit = 3,
): { bad: number; mismatches: Mismatch[] } {
  const n = base.length;
  if (actual.length !== n) throw new Error(`actual is ${actual.length} bytes, model ${n}`);
  const cutoff = new Int32Array(n).fill(-1);
  for (const op of ops) {
    if (!definite(op)) continue;
    const end = op.start + op.length;
    for (let x = op.start; x < end; x++) if (cutoff[x]! < op.issue) cutoff[x] = op.issue;
  }
  const ok = new Uint8Array(n);
  for (let x = 0; x < n; x++) if (cutoff[x] === -1 && actual[x] === base[x]) ok[x] = 1;
  for (const op of ops) {
    if (!candidate(op) && !definite(op)) continue;
    const end = op.start + op.length;
    const d = op.data;
    for (let x = op.start; x < end; x++) {
      if (ok[x] || op.ack < cutoff[x]!) continue;
      const v = d === null ? 0 : d[x - op.start]!;
      if (actual[x] === v) ok[x] = 1;
    }
  }
  let bad = 0;
  const mismatches: Mismatch[] = [];
  for (let x = 0; x < n; x++) {
    if (ok[x]) continue;
    bad++;
    if (mismatches.length < limit) {
      const candidates = ops
        .filter((op) => x >= op.start && x < op.start + op.length)
        .slice(-6) // the latest few: enough to see which write the byte came from
        .map((op) => ({ issue: op.issue, ack: op.ack, durable: op.durable, value: op.data === null ? 0 : op.data[x - op.start]! }));
      mismatches.push({ at: x, actual: actual[x]!, base: base[x]!, candidates });
    }
  }
  return { bad, mismatches };
}
