// Why: Node writes every socket buffer on its one event loop, and on loopback a send of
// 1 MiB also runs the receiver's TCP work: `perf` of 1 MiB NBD reads on four connections put
// 75% of the loop in `writev` while the other core sat half idle. This sends large messages
// from libuv's threadpool instead (src/native/sockx.c through native-send.ts), and keeps the
// one rule that makes that safe: the bytes of two messages never interleave on the socket.
// While a threadpool send runs, or after a partial one until Node's own queue is empty,
// every later message waits here in order and leaves with the next threadpool send. Used by
// the NBD connections (replies) and the replication link (frames); plain sockets only.

import type { Socket } from 'node:net';
import { loadSockx, nativeSendBuffersMax, socketFd, type Sockx } from './native-send.js';

/** A message handed to offer(): `done` runs once the socket took all of it, or it was dropped. */
interface Pending {
  buffers: Buffer[];
  bytes: number;
  done: () => void;
}

/** Threadpool sends since start, and those the socket took only part of (Node sent the rest). */
export interface ThreadpoolSendCounts {
  sends: number;
  partial: number;
}

const NO_BYTES = Buffer.alloc(0);
/**
 * A threadpool send takes queued messages up to this many bytes (at least one message):
 * a socket takes a few MiB at a time, and what a send holds is memory the owner's
 * queue limits must see (queuedBytes).
 */
const batchBytesMax = 4 * 1024 * 1024;

export class ThreadpoolSender {
  /** A threadpool send is running: nothing else is written to the socket until it returns. */
  private sending = false;
  /** Bytes of the send running now. */
  private sendingBytes = 0;
  private waiting: Pending[] = [];
  /** An empty write is queued in Node to tell when its queue is empty (whenNodeQueueEmpty). */
  private watchingNodeQueue = false;
  private idleWaiters: (() => void)[] = [];

  /**
   * A sender for `socket`, or null when it has no descriptor (TLS) or the addon is missing.
   * `onSent` runs after each threadpool send, and when the last waiting message has left
   * (the owner's queue shrank: it may read or send again).
   * Messages of `bytesMin` or more go to the threadpool (smaller ones only behind them).
   */
  static forSocket(socket: Socket, opts: { bytesMin: number; waitMs: number; counts: ThreadpoolSendCounts; onSent?: () => void }): ThreadpoolSender | null {
    const sockx = loadSockx();
    const fd = sockx ? socketFd(socket) : -1;
    if (!sockx || fd < 0) return null;
    let dup: number;
    try {
      dup = sockx.dupFd(fd);
    } catch {
      return null;
    }
    return new ThreadpoolSender(socket, sockx, dup, opts.bytesMin, opts.waitMs, opts.counts, opts.onSent ?? (() => {}));
  }

  private constructor(
    private readonly socket: Socket,
    private readonly sockx: Sockx,
    /** Our own duplicate of the socket's descriptor (a descriptor Node closes is never reused under a send), or -1 once released. */
    private fd: number,
    private readonly bytesMin: number,
    /**
     * How long a send may wait for room in a full socket, holding a threadpool thread: 0
     * for NBD (many connections share four threads), a little for the one replication link.
     */
    private readonly waitMs: number,
    private readonly counts: ThreadpoolSendCounts,
    private readonly onSent: () => void,
  ) {}

  /**
   * Takes the message (true): into a threadpool send now, or in line behind one. False: the
   * caller writes it to Node's socket itself (it is small and nothing waits here).
   */
  offer(buffers: Buffer[], bytes: number, done: () => void): boolean {
    if (this.sending || this.waiting.length > 0) {
      this.waiting.push({ buffers, bytes, done });
      return true;
    }
    if (bytes < this.bytesMin || this.fd < 0 || buffers.length > nativeSendBuffersMax) return false;
    if (this.socket.writableLength === 0) this.send([{ buffers, bytes, done }]);
    else {
      this.waiting.push({ buffers, bytes, done });
      this.whenNodeQueueEmpty();
    }
    return true;
  }

  /** Bytes being sent or waiting here (they are not in the socket's writableLength). */
  get queuedBytes(): number {
    let bytes = this.sendingBytes;
    for (const p of this.waiting) bytes += p.bytes;
    return bytes;
  }

  /** Nothing is being sent or waiting. */
  get idle(): boolean {
    return !this.sending && this.waiting.length === 0;
  }

  /** Runs fn once idle (at once if it is): closing the socket must wait for what waits here. */
  whenIdle(fn: () => void): void {
    if (this.idle) fn();
    else this.idleWaiters.push(fn);
  }

  /**
   * The socket ended or is gone: once it is destroyed, drops what waits (their `done` runs)
   * and closes the descriptor as soon as no send runs; before that, only sends what waits.
   */
  close(): void {
    this.settle();
  }

  private send(batch: Pending[]): void {
    this.sending = true;
    this.counts.sends++;
    for (const p of batch) this.sendingBytes += p.bytes;
    const buffers = batch.length === 1 ? batch[0]!.buffers : batch.flatMap((p) => p.buffers);
    this.sockx.sendv(this.fd, buffers, this.waitMs, (error, sentBytes) => {
      // `sending` stays set while the batch is accounted for: a message that a `done` leads
      // to (a resumed parse) waits behind it.
      if (error !== null) this.socket.destroy(new Error(`socket send failed (${error})`));
      let i = 0;
      if (error === null && !this.socket.destroyed) {
        this.socket.cork();
        let left = sentBytes;
        for (; i < batch.length && left >= batch[i]!.bytes; i++) {
          left -= batch[i]!.bytes;
          batch[i]!.done();
        }
        if (i < batch.length) this.counts.partial++;
        if (i < batch.length && left > 0) this.writeRest(batch[i++]!, left);
        this.socket.uncork();
      }
      this.sending = false;
      this.sendingBytes = 0;
      if (i < batch.length) this.waiting = [...batch.slice(i), ...this.waiting];
      this.settle();
      this.onSent(); // the queue shrank (settle also calls it once nothing is left)
    });
  }

  /**
   * What waits leaves as one threadpool send when Node's queue is empty, else once it is
   * (whenNodeQueueEmpty). Everything is dropped if the socket is gone.
   */
  private settle(): void {
    if (this.sending) return;
    if (this.socket.destroyed || this.fd < 0) {
      const dropped = this.waiting;
      this.waiting = [];
      for (const p of dropped) p.done();
      if (this.fd >= 0) {
        this.sockx.closeFd(this.fd);
        this.fd = -1;
      }
    } else if (this.waiting.length > 0) {
      if (this.socket.writableLength > 0) {
        this.whenNodeQueueEmpty();
        return;
      }
      let buffers = 0;
      let bytes = 0;
      let j = 0;
      for (; j < this.waiting.length && buffers + this.waiting[j]!.buffers.length <= nativeSendBuffersMax && (j === 0 || bytes + this.waiting[j]!.bytes <= batchBytesMax); j++) {
        buffers += this.waiting[j]!.buffers.length;
        bytes += this.waiting[j]!.bytes;
      }
      if (j === 0) {
        // One message of more buffers than a send takes: through Node, then the rest.
        this.writeRest(this.waiting.shift()!, 0);
        this.whenNodeQueueEmpty();
        return;
      }
      const batch = this.waiting.slice(0, j);
      this.waiting = this.waiting.slice(j);
      this.send(batch);
      return;
    }
    for (const fn of this.idleWaiters.splice(0)) fn();
    this.onSent();
  }

  /** The part of a message past `skipBytes`, through Node's socket. */
  private writeRest(p: Pending, skipBytes: number): void {
    const rest: Buffer[] = [];
    let skip = skipBytes;
    for (const b of p.buffers) {
      if (skip >= b.length) skip -= b.length;
      else {
        rest.push(skip > 0 ? b.subarray(skip) : b);
        skip = 0;
      }
    }
    const last = rest.length - 1;
    for (let i = 0; i < last; i++) this.socket.write(rest[i]!);
    this.socket.write(rest[last]!, () => p.done());
  }

  /** Calls settle() once Node has written everything queued now (an empty write's callback runs after the writes before it). */
  private whenNodeQueueEmpty(): void {
    if (this.watchingNodeQueue) return;
    this.watchingNodeQueue = true;
    this.socket.write(NO_BYTES, () => {
      this.watchingNodeQueue = false;
      this.settle();
    });
  }
}
