// Why: both ends of a replication connection need the same things from a connection:
// frames in and out with backpressure, a heartbeat that notices a silent peer (a cut cable
// or a DROP rule sends no RST; TCP alone would wait for many minutes), and one place where
// the connection ends with a reason. Knows nothing of sets or volumes; the connection and
// the clock are passed in (transport.ts, clock.ts) so the simulator can drive it.

import type { FileRange } from '../util/file-range.js';
import type { Clock, Cancel } from '../util/clock.js';
import type { Conn } from './transport.js';
import { encodeFrame, FrameDecoder, type Frame, type ReplMessage } from './wire.js';
import { linkIdlePayloadBytesMax, linkPooledPayloadBytesMin, replicationHeartbeatMs, replicationSilenceMs } from './limits.js';
import { BufferPool } from '../util/buffer-pool.js';

export class Link {
  private closedReason: string | null = null;
  private readonly decoder: FrameDecoder;
  private lastHeardMs: number;
  private readonly stopTimer: Cancel;
  private readonly closeHandlers: ((reason: string) => void)[] = [];
  bytesSent = 0;
  bytesReceived = 0;
  /**
   * Bytes of an unfinished frame this link may buffer (the owner lowers it until the
   * peer's hello is accepted: limits.ts helloFrameBytesMax); over it the link closes.
   */
  get frameBytesMax(): number {
    return this.decoder.frameBytesMax;
  }
  set frameBytesMax(bytes: number) {
    this.decoder.frameBytesMax = bytes;
  }
  /** The link closed because a frame grew past frameBytesMax. */
  oversize = false;

  constructor(
    readonly conn: Conn,
    private readonly clock: Clock,
    private readonly onFrame: (f: Frame) => void,
    heartbeatMs = replicationHeartbeatMs,
    silenceMs = replicationSilenceMs,
  ) {
    this.lastHeardMs = clock.now();
    this.decoder = new FrameDecoder((f) => {
      if (f.msg.t === 'ping') {
        this.send({ t: 'pong', atMs: f.msg.atMs });
        return;
      }
      if (f.msg.t === 'pong') return;
      this.onFrame(f);
    });
    // Where the connection allows it, frames' data is read straight into pooled buffers.
    if (conn.readInto?.(() => this.decoder.readBuffer())) this.decoder.usePool(new BufferPool(linkPooledPayloadBytesMin, linkIdlePayloadBytesMax));
    conn.onData((chunk: Buffer) => {
      this.lastHeardMs = this.clock.now();
      this.bytesReceived += chunk.length;
      if (this.closedReason !== null) return;
      try {
        this.decoder.push(chunk);
      } catch (e) {
        this.close(`bad frame from peer: ${(e as Error).message}`);
        return;
      }
      if (this.decoder.pendingBytes > this.frameBytesMax && this.closedReason === null) {
        this.oversize = true;
        this.close(`a frame of more than ${this.frameBytesMax} bytes before the session started`);
      }
    });
    conn.onClose((reason) => this.close(reason === 'connection closed' ? 'connection closed by peer' : reason));
    this.stopTimer = clock.every(heartbeatMs, () => {
      if (this.clock.now() - this.lastHeardMs > silenceMs) this.close(`peer silent for ${silenceMs} ms`);
      else this.send({ t: 'ping', atMs: this.clock.now() });
    });
  }

  get closed(): boolean {
    return this.closedReason !== null;
  }
  get reason(): string | null {
    return this.closedReason;
  }
  /** When the peer was last heard from (ms since the epoch). */
  get lastHeardAtMs(): number {
    return this.lastHeardMs;
  }
  get remoteAddress(): string {
    return this.conn.remoteAddress;
  }

  /** Bytes written but not yet taken by the network. */
  get queuedBytes(): number {
    return this.conn.writableLength;
  }

  onClose(fn: (reason: string) => void): void {
    if (this.closedReason !== null) fn(this.closedReason);
    else this.closeHandlers.push(fn);
  }

  send(msg: ReplMessage, data?: Buffer[]): void {
    if (this.closedReason !== null) return;
    this.sendEncoded(encodeFrame(msg, data));
  }

  /**
   * A frame already encoded (a chunk record read from the outbound log), in pieces.
   * `done` (optional) runs once the connection no longer holds the pieces (or never).
   */
  sendEncoded(frame: Buffer[], done?: () => void): void {
    if (this.closedReason !== null) {
      done?.();
      return;
    }
    if (frame.length === 1) this.write(frame[0]!, done);
    else if (this.conn.writeParts) {
      for (const p of frame) this.bytesSent += p.length;
      this.conn.writeParts(frame, done);
    } else {
      this.conn.cork();
      // Writes complete in order: the last one's completion covers the frame.
      for (let i = 0; i < frame.length; i++) this.write(frame[i]!, i === frame.length - 1 ? done : undefined);
      this.conn.uncork();
    }
  }

  /**
   * A frame that lies whole in a file (a chunk record of the outbound log), sent from there
   * when the connection can (Conn.writeFile); false: send its bytes instead.
   */
  sendFileFrame(file: FileRange, done?: () => void): boolean {
    if (this.closedReason !== null || !this.conn.writeFile?.(file, done)) return false;
    this.bytesSent += file.length;
    return true;
  }

  private corkedForTick = false;

  /**
   * Holds what is sent until the current tick ends, then writes it with one system call
   * (a sync stream sends one small frame per client write: many arrive in one tick).
   */
  corkForTick(): void {
    if (this.corkedForTick || this.closedReason !== null) return;
    this.corkedForTick = true;
    this.conn.cork();
    process.nextTick(() => {
      this.corkedForTick = false;
      this.conn.uncork();
    });
  }

  private write(b: Buffer, done?: () => void): void {
    this.bytesSent += b.length;
    this.conn.write(b, done);
  }

  /** Resolves once the connection's queue is below `bytes` (or the link closed). */
  async drainBelow(bytes: number): Promise<void> {
    while (this.closedReason === null && this.conn.writableLength > bytes) {
      await new Promise<void>((r) => {
        const done = () => {
          this.conn.offDrain(done);
          cancel();
          r();
        };
        const cancel = this.clock.after(1000, done);
        this.conn.onDrain(done);
      });
    }
  }

  /** Stop reading (the receiver is full) or read again. */
  pause(): void {
    this.conn.pause();
  }
  resume(): void {
    this.conn.resume();
  }

  close(reason: string): void {
    if (this.closedReason !== null) return;
    this.closedReason = reason;
    this.stopTimer();
    this.conn.destroy();
    for (const h of this.closeHandlers.splice(0)) h(reason);
  }
}
