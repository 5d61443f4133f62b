// Why: Node writes every socket buffer on its one event loop, and on loopback a send of
// 1 MiB also runs the receiver's TCP work: `perf` of 1 MiB NBD reads on four connections put
// 75% of the loop in `writev` while the other core sat half idle. This sends large messages
// from libuv's threadpool instead: a queue in src/native/sockx.c (through native-send.ts)
// that one threadpool job at a time drains, so a message queued while another is being sent
// leaves without a trip through the loop. It keeps the one rule that makes that safe: the
// bytes of two messages never interleave on the socket. While the queue holds messages, or
// after a stop (the socket stayed full) until Node's own queue is empty, every later message
// waits in order behind them. Used by the NBD connections (replies) and the replication link
// (frames); plain sockets only.

import type { Socket } from 'node:net';
import { loadSockx, nativeSendBuffersMax, socketFd, type SenderHandle, type Sockx } from './native-send.js';
import type { FileRange } from './file-range.js';

/** A message handed to offer(): `done` runs once the socket took all of it, or it was dropped. */
interface Pending {
  buffers: Buffer[];
  /** Bytes of the buffers and of the file part. */
  bytes: number;
  done: () => void;
  /** The message's end, sent from a file (sendfile), or null. */
  file: FileRange | null;
}

/** Threadpool sends since start, and those the socket took only part of (Node sent the rest). */
export interface ThreadpoolSendCounts {
  sends: number;
  partial: number;
  /** File parts whose rest Node sent after a stop (read into memory first). */
  fileRestReads?: number;
}

const NO_BYTES = Buffer.alloc(0);

/** Indexes into the addon's state array (senderState). */
const SENT_MESSAGES = 0;
const SENDMSG_CALLS = 1;
const STOPPED = 2;
const HEAD_SENT_BYTES = 3;
const RUNNING = 4;

export class ThreadpoolSender {
  /** Handed to the addon's queue, in order, not yet counted sent. */
  private inQueue: Pending[] = [];
  private inQueueBytes = 0;
  /** Waiting for Node's queue to empty (after a stop, or behind small writes), in order. */
  private waiting: Pending[] = [];
  private waitingBytes = 0;
  /** The addon's counters as last read. */
  private readonly state = new Float64Array(5);
  private sentMessagesSeen = 0;
  private sendmsgCallsSeen = 0;
  /** senderClose was called and the addon still runs a job: its messages wait for notify(true). */
  private closingInAddon = false;
  /** An empty write is queued in Node to tell when its queue is empty (whenNodeQueueEmpty). */
  private watchingNodeQueue = false;
  private idleWaiters: (() => void)[] = [];
  /** The addon's queue, or null once closed. */
  private handle: SenderHandle | null;

  /**
   * A sender for `socket`, or null when it has no descriptor (TLS) or the addon is missing.
   * `onSent` runs whenever messages have left (the owner's queue shrank: it may read or send
   * again). Messages of `bytesMin` or more go to the threadpool (smaller ones only behind them).
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
    /** Our own duplicate of the socket's descriptor (a descriptor Node closes is never reused under a send); the addon closes it. */
    fd: number,
    private readonly bytesMin: number,
    /**
     * How long a send may wait for room in a full socket, holding a threadpool thread: 0
     * for NBD (many connections share four threads), a little for the one replication link.
     */
    waitMs: number,
    private readonly counts: ThreadpoolSendCounts,
    private readonly onSent: () => void,
  ) {
    this.handle = sockx.senderOpen(fd, waitMs, (closed) => (closed ? this.addonClosed() : this.progress()));
  }

  /**
   * Takes the message (true): into the threadpool queue now, or in line behind what waits.
   * False: the caller writes it to Node's socket itself (it is small and nothing waits here,
   * or the sender is closed). `bytes` counts the buffers and the file part, if any: `file`'s
   * bytes follow the buffers, sent from the file (see takesFiles).
   */
  offer(buffers: Buffer[], bytes: number, done: () => void, file: FileRange | null = null): boolean {
    const p: Pending = { buffers, bytes, done, file };
    if (this.waiting.length > 0) {
      this.wait(p);
      return true;
    }
    if (this.inQueue.length > 0) {
      if (!this.push(p)) this.wait(p); // stopped: progress() took the queue back
      return true;
    }
    if (bytes < this.bytesMin || this.handle === null || buffers.length > nativeSendBuffersMax) return false;
    if (this.socket.writableLength > 0 || !this.push(p)) {
      this.wait(p);
      this.whenNodeQueueEmpty();
    }
    return true;
  }

  /** Whether a message with a file part is taken now (false once closed: send its bytes instead). */
  get takesFiles(): boolean {
    return this.handle !== null;
  }

  /** Bytes being sent or waiting here (they are not in the socket's writableLength). */
  get queuedBytes(): number {
    return this.inQueueBytes + this.waitingBytes;
  }

  /** Nothing is being sent or waiting. */
  get idle(): boolean {
    return this.inQueue.length === 0 && this.waiting.length === 0;
  }

  /** Runs fn once idle (at once if it is): closing the socket must wait for what waits here. */
  whenIdle(fn: () => void): void {
    if (this.idle) fn();
    else this.idleWaiters.push(fn);
  }

  /**
   * The socket ended or is gone: once it is destroyed, drops what waits (their `done` runs)
   * and frees the addon's queue (closing the descriptor) as soon as no send runs; before
   * that, only sends what waits.
   */
  close(): void {
    this.settle();
  }

  private wait(p: Pending): void {
    this.waiting.push(p);
    this.waitingBytes += p.bytes;
  }

  /** Into the addon's queue (false: refused, it stopped; progress() has taken the queue back). */
  private push(p: Pending): boolean {
    if (this.handle === null || p.buffers.length > nativeSendBuffersMax) return false;
    const f = p.file;
    if (!(f === null ? this.sockx.senderPush(this.handle, p.buffers) : this.sockx.senderPush(this.handle, p.buffers, f.fd, f.offset, f.length))) {
      this.progress();
      return false;
    }
    this.inQueue.push(p);
    this.inQueueBytes += p.bytes;
    return true;
  }

  /** The addon has news: messages sent, or a stop (full socket or failure). */
  private progress(): void {
    const handle = this.handle;
    if (handle === null) return;
    const error = this.sockx.senderState(handle, this.state);
    this.counts.sends += this.state[SENDMSG_CALLS]! - this.sendmsgCallsSeen;
    this.sendmsgCallsSeen = this.state[SENDMSG_CALLS]!;
    const sentCount = this.state[SENT_MESSAGES]! - this.sentMessagesSeen;
    this.sentMessagesSeen = this.state[SENT_MESSAGES]!;
    const sent = this.inQueue.splice(0, sentCount);
    for (const p of sent) this.inQueueBytes -= p.bytes;
    const stopped = this.state[STOPPED] === 1 && this.state[RUNNING] === 0;
    this.socket.cork();
    if (stopped) {
      // Everything not sent comes back, in order, before any `done` can lead to a new message.
      this.counts.partial++;
      const back = this.inQueue;
      this.inQueue = [];
      this.inQueueBytes = 0;
      this.sockx.senderResume(handle);
      if (error !== null) {
        this.socket.destroy(new Error(`socket send failed (${error})`));
        for (const p of back) p.done();
      } else if (back.length > 0) {
        this.writeRest(back[0]!, this.state[HEAD_SENT_BYTES]!);
        for (let i = back.length - 1; i >= 1; i--) this.waitingBytes += back[i]!.bytes;
        this.waiting = [...back.slice(1), ...this.waiting];
      }
    }
    for (const p of sent) p.done();
    this.socket.uncork();
    if (sent.length > 0) this.onSent();
    if (this.inQueue.length === 0) this.settle();
  }

  /** The addon freed the queue after senderClose: what it held is no longer read. */
  private addonClosed(): void {
    this.closingInAddon = false;
    const dropped = this.inQueue;
    this.inQueue = [];
    this.inQueueBytes = 0;
    for (const p of dropped) p.done();
    this.settle();
  }

  /**
   * Nothing in the addon's queue: what waits goes there once Node's queue is empty (else
   * whenNodeQueueEmpty calls again). Everything is dropped if the socket is gone.
   */
  private settle(): void {
    if (this.inQueue.length > 0 && !this.socket.destroyed) return;
    if (this.socket.destroyed) {
      if (this.handle !== null) {
        const handle = this.handle;
        this.handle = null;
        if (!this.sockx.senderClose(handle)) {
          this.closingInAddon = true; // addonClosed() drops inQueue when the job has ended
        } else {
          const dropped = this.inQueue;
          this.inQueue = [];
          this.inQueueBytes = 0;
          for (const p of dropped) p.done();
        }
      }
      const dropped = this.waiting;
      this.waiting = [];
      this.waitingBytes = 0;
      for (const p of dropped) p.done();
      if (this.closingInAddon) return;
    } else if (this.waiting.length > 0) {
      if (this.socket.writableLength > 0) {
        this.whenNodeQueueEmpty();
        return;
      }
      while (this.waiting.length > 0) {
        const p = this.waiting[0]!;
        if (p.buffers.length > nativeSendBuffersMax && this.inQueue.length === 0) {
          // One message of more buffers than the addon takes: through Node, then the rest.
          this.waiting.shift();
          this.waitingBytes -= p.bytes;
          this.writeRest(p, 0);
          this.whenNodeQueueEmpty();
          return;
        }
        if (p.buffers.length > nativeSendBuffersMax || !this.push(p)) return; // behind the queue / stopped
        this.waiting.shift();
        this.waitingBytes -= p.bytes;
      }
      return;
    }
    if (!this.idle) return;
    for (const fn of this.idleWaiters.splice(0)) fn();
    this.onSent();
  }

  /** The part of a message past `skipBytes`, through Node's socket (a file part read into memory first). */
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
    if (p.file !== null && skip < p.file.length) {
      this.counts.fileRestReads = (this.counts.fileRestReads ?? 0) + 1;
      try {
        rest.push(p.file.read(skip, p.file.length - skip));
      } catch (e) {
        // The bytes cannot be had: the message cannot be finished, nor another sent after it.
        this.socket.destroy(new Error(`reply data could not be read for the socket (${(e as Error).message})`));
        p.done();
        return;
      }
    }
    if (rest.length === 0) {
      p.done();
      return;
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
