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
