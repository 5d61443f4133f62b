// Why: a synchronous replica must see every write the volume issues, in the order the
// engine issues it, and a client's reply must wait until the replica has it; a cut of a
// delta set must be a point in that same order. So the engine calls a mirror at the
// moment it issues data (not when a request arrives: a request may wait at the gate or
// the activity log, and then land after a cut), and at every cut. The volume layer knows
// nothing of what is behind the mirror: replication's sync stream implements it.

/** What the engine tells a mirror. Promises returned here are what a client reply waits on. */
export interface WriteMirror {
  /** Called before a write or zeroing changes anything: throws (EIO) when writes must be refused now. */
  admit(): void;
  /**
   * A write issued now. The chunks stay untouched until the returned promise settles (the
   * caller's buffers are reused after the reply). Undefined: nothing to wait for.
   */
  write(offset: number, chunks: Buffer[]): Promise<void> | undefined;
  /** A zeroing (TRIM, WRITE_ZEROES) issued now. */
  zero(offset: number, length: number, keepAllocated: boolean): Promise<void> | undefined;
  /** A flush: resolves when every write mirrored before it is durable on the mirror too. */
  flush(): Promise<void> | undefined;
  /** Delta set `setNumber` was cut now: no engine write is in flight, none is issued until this returns. */
  cut(setNumber: number): void;
  /**
   * Set `setNumber` is durable at the source (its number will not be used again, even after
   * a crash): what the mirror learnt of it at the cut may now reach the other side.
   */
  committed(setNumber: number): void;
  /** Building set `setNumber` failed: its number will be cut again, so the mirror forgets its cut. */
  aborted(setNumber: number): void;
}

/** One promise for a local and a mirrored part (undefined when neither waits). */
export function bothDone(local: void | Promise<void>, remote: Promise<void> | undefined): void | Promise<void> {
  if (remote === undefined) return local;
  if (!(local instanceof Promise)) return remote;
  // Both settle before the reply; the first failure is the answer.
  return Promise.allSettled([local, remote]).then(([l, r]) => {
    if (l.status === 'rejected') throw l.reason;
    if (r.status === 'rejected') throw r.reason;
  });
}

/**
 * One mirror for several (a primary with two sync pairs, or a sync pair and another pair's
 * handover stream): each hears every write and cut, in the same order. The engine holds one
 * mirror; when the replicator set only the newest stream, the older one never saw a cut and
 * stayed 'starting', cutting an empty set per turn (simulator seed 1619600543: 49 000 sets in
 * 140 virtual seconds). Null for none, the mirror itself for one.
 */
export function fanOut(mirrors: readonly WriteMirror[]): WriteMirror | null {
  if (mirrors.length === 0) return null;
  if (mirrors.length === 1) return mirrors[0]!;
  const all = [...mirrors];
  const settle = (results: (Promise<void> | undefined)[]): Promise<void> | undefined => {
    const waits = results.filter((r): r is Promise<void> => r !== undefined);
    if (waits.length === 0) return undefined;
    // Every one settles before the reply (the caller's buffers are reused after it); the first failure is the answer.
    return Promise.allSettled(waits).then((rs) => {
      for (const r of rs) if (r.status === 'rejected') throw r.reason;
    });
  };
  return {
    admit: () => {
      for (const m of all) m.admit();
    },
    write: (offset, chunks) => settle(all.map((m) => m.write(offset, chunks))),
    zero: (offset, length, keepAllocated) => settle(all.map((m) => m.zero(offset, length, keepAllocated))),
    flush: () => settle(all.map((m) => m.flush())),
    cut: (setNumber) => {
      for (const m of all) m.cut(setNumber);
    },
    committed: (setNumber) => {
      for (const m of all) m.committed(setNumber);
    },
    aborted: (setNumber) => {
      for (const m of all) m.aborted(setNumber);
    },
  };
}
