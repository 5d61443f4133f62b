// Why: durability barriers (fsync) are the expensive part of every ordering rule in the
// engine; many callers must share one. While a sync runs, later callers wait for the
// next one, which starts when the current one ends (their writes may not be covered by
// the running one). At most one sync runs and one is queued, whatever the callers.

export class GroupCommit {
  private running: Promise<void> | null = null;
  private queued: Promise<void> | null = null;
  /** Syncs actually started: the cost callers shared. */
  syncs = 0;

  constructor(private readonly syncOnce: () => Promise<void>) {}

  /** Resolves once every write issued before this call is durable. */
  sync(): Promise<void> {
    if (!this.running) return this.start();
    if (!this.queued) {
      this.queued = this.running.catch(() => undefined).then(() => {
        this.queued = null;
        return this.start();
      });
    }
    return this.queued;
  }

  private start(): Promise<void> {
    this.syncs++;
    const p = this.syncOnce().finally(() => {
      if (this.running === p) this.running = null;
    });
    this.running = p;
    return p;
  }
}
