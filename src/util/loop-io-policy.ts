// Why: a read or write of a few hundred KiB costs less CPU, and finishes sooner, on the
// event loop than in the threadpool (1 MiB writes on one connection, tmpfs, 2026-12-06:
// 229-253 against 343-355 µs of CPU per MiB, 3636-3703 against 2510-2648 MB/s), but while
// the loop copies a megabyte every other client waits: beside one 1 MiB writer, a 4 KiB
// reader at queue depth 1 went from a p50 of 0.1-0.2 ms to 4 ms. So large writes run on the
// loop only while one client is being served: when no request came from any other
// connection within LONE_CLIENT_WINDOW_MS. Otherwise the configured small limit applies
// (`--sync-io-max`). Large reads never take the lone limit (syncReadBytesMax below).
// Knows nothing of NBD or files: the server reports which client made a request, the file
// store asks for the limit.

import { assert } from './assert.js';

/** How long since another client's last request before one client counts as the only one. */
export const LONE_CLIENT_WINDOW_MS = 250;

export class LoopIoPolicy {
  /** The client of the most recent request, and when. */
  private lastClient: unknown = null;
  private lastAtMs = -Infinity;
  /** The most recent request of any other client. */
  private otherAtMs = -Infinity;

  constructor(
    /** Largest I/O on the loop while several clients are served (`--sync-io-max`). */
    readonly baseBytes: number,
    /** Largest I/O on the loop while one client is (`--sync-io-max-lone`; ≤ base: off). */
    readonly loneBytes: number,
    private readonly nowMs: () => number = Date.now,
  ) {
    assert(Number.isSafeInteger(baseBytes) && baseBytes >= 0 && Number.isSafeInteger(loneBytes) && loneBytes >= 0, 'loop I/O limits are byte counts');
  }

  /** A client (any value that identifies it: its connection) made a request. */
  clientRequest(client: unknown): void {
    const now = this.nowMs();
    if (client !== this.lastClient) {
      this.otherAtMs = this.lastAtMs;
      this.lastClient = client;
    }
    this.lastAtMs = now;
  }

  /**
   * Largest read to do on the event loop: the base limit, with or without other clients.
   * Large replies leave from the threadpool (threadpool-sender.ts), and a read there runs
   * beside the send of the one before it; on the loop it held up the next request instead
   * (1 MiB reads on one connection, tmpfs, 2026-12-07: 2710-3729 MB/s read in the
   * threadpool against 2676-2702 on the loop).
   */
  get syncReadBytesMax(): number {
    return this.baseBytes;
  }

  /** Largest write to do on the event loop now (and read, where syncReadBytesMax is not asked). */
  get syncIoBytesMax(): number {
    if (this.loneBytes <= this.baseBytes) return this.baseBytes;
    return this.nowMs() - this.otherAtMs > LONE_CLIENT_WINDOW_MS ? this.loneBytes : this.baseBytes;
  }
}
