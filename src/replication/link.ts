// Why: both ends of a replication connection need the same things from a socket: frames
// in and out with backpressure, a heartbeat that notices a silent peer (a cut cable or a
// DROP rule sends no RST; TCP alone would wait for many minutes), and one place where the
// connection ends with a reason. Knows nothing of sets or volumes.

import type { Socket } from 'node:net';
import { encodeFrame, FrameDecoder, type Frame, type ReplMessage } from './wire.js';
import { replicationHeartbeatMs, replicationSilenceMs } from './limits.js';

export class Link {
  private closedReason: string | null = null;
  private readonly decoder: FrameDecoder;
  private lastHeardMs = Date.now();
  private readonly timer: NodeJS.Timeout;
  private readonly closeHandlers: ((reason: string) => void)[] = [];
  bytesSent = 0;
  bytesReceived = 0;

  constructor(
    readonly socket: Socket,
    private readonly onFrame: (f: Frame) => void,
    heartbeatMs = replicationHeartbeatMs,
    silenceMs = replicationSilenceMs,
  ) {
    socket.setNoDelay(true);
    this.decoder = new FrameDecoder((f) => {
      if (f.msg.t === 'ping') {
        this.send({ t: 'pong', atMs: f.msg.atMs });
        return;
      }
      if (f.msg.t === 'pong') return;
      this.onFrame(f);
    });
    socket.on('data', (chunk: Buffer) => {
      this.lastHeardMs = Date.now();
      this.bytesReceived += chunk.length;
      if (this.closedReason !== null) return;
      try {
        this.decoder.push(chunk);
      } catch (e) {
        this.close(`bad frame from peer: ${(e as Error).message}`);
      }
    });
    socket.on('error', (e) => this.close(`socket error: ${e.message}`));
    socket.on('close', () => this.close('connection closed by peer'));
    socket.on('end', () => this.close('connection closed by peer'));
    this.timer = setInterval(() => {
      if (Date.now() - this.lastHeardMs > silenceMs) this.close(`peer silent for ${silenceMs} ms`);
      else this.send({ t: 'ping', atMs: Date.now() });
    }, heartbeatMs);
    this.timer.unref();
  }

  get closed(): boolean {
    return this.closedReason !== null;
  }
  get reason(): string | null {
    return this.closedReason;
  }

  /** Bytes written but not yet taken by the kernel. */
  get queuedBytes(): number {
    return this.socket.writableLength;
  }

  onClose(fn: (reason: string) => void): void {
    if (this.closedReason !== null) fn(this.closedReason);
    else this.closeHandlers.push(fn);
  }

  send(msg: ReplMessage, data?: Buffer[]): void {
    if (this.closedReason !== null) return;
    this.sendEncoded(encodeFrame(msg, data));
  }

  /** A frame already encoded (a chunk record read from the outbound log), in pieces. */
  sendEncoded(frame: Buffer[]): void {
    if (this.closedReason !== null) return;
    if (frame.length === 1) this.write(frame[0]!);
    else {
      this.socket.cork();
      for (const p of frame) this.write(p);
      this.socket.uncork();
    }
  }

  private write(b: Buffer): void {
    this.bytesSent += b.length;
    this.socket.write(b);
  }

  /** Resolves once the socket's queue is below `bytes` (or the link closed). */
  async drainBelow(bytes: number): Promise<void> {
    while (this.closedReason === null && this.socket.writableLength > bytes) {
      await new Promise<void>((r) => {
        const done = () => {
          this.socket.off('drain', done);
          clearTimeout(t);
          r();
        };
        const t = setTimeout(done, 1000);
        this.socket.once('drain', done);
      });
    }
  }

  /** Stop reading (the receiver is full) or read again. */
  pause(): void {
    this.socket.pause();
  }
  resume(): void {
    this.socket.resume();
  }

  close(reason: string): void {
    if (this.closedReason !== null) return;
    this.closedReason = reason;
    clearInterval(this.timer);
    this.socket.destroy();
    for (const h of this.closeHandlers.splice(0)) h(reason);
  }
}
