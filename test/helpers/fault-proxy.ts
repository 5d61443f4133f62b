// Why: replication must survive a network that flips bits, duplicates, reorders and cuts
// frames, and a test must be able to replay the exact same bad network from a seed. This
// proxy sits between the primary and the replica, understands just enough of the frame
// prefix (magic, msgBytes, dataBytes; see src/replication/wire.ts) to act on whole frames
// in the client→server direction, and draws every decision from a per-connection seeded
// PRNG. Server→client bytes pass through, optionally with seeded byte-level bit flips.

import net from 'node:net';
import { ByteQueue } from '../../src/util/byte-queue.js';
import { FRAME_MAGIC, framePrefixBytes, replicationDataBytesMax, replicationMsgBytesMax } from '../../src/replication/wire.js';
import { prng } from './seed.js';

/** Probabilities are per frame (client→server) unless said otherwise; all optional. */
export interface Faults {
  /** Flip one random bit inside the data part of a frame that has data. */
  flipBitInData?: number;
  /** Flip one random bit anywhere in the frame (prefix, message or data). */
  flipBitAnywhere?: number;
  /** Send the frame twice. */
  duplicate?: number;
  /** Hold the frame and send it after the next one (or after reorderHoldMs without one). */
  reorder?: number;
  /** After a random number of frames in [min, max] per connection, send half of the next frame and cut the connection. */
  truncateAfterFrames?: { min: number; max: number };
  /** Cut the connection instead of sending the frame (frames already sent still arrive). */
  dropConnection?: number;
  /** Per byte, server→client: flip one random bit of the byte. */
  flipServerBits?: number;
  /** A held (reordered) frame is sent anyway after this long without a next frame (default 50 ms), so stop-and-wait senders do not hang. */
  reorderHoldMs?: number;
}

export interface FaultStats {
  /** Whole frames seen client→server. */
  frames: number;
  flipped: number;
  duplicated: number;
  reordered: number;
  truncated: number;
  dropped: number;
  connections: number;
  /** Bits flipped server→client. */
  serverFlipped: number;
  /** Connections that sent bytes that are not frames (forwarded raw from then on). */
  unframed: number;
}

export interface FaultProxy {
  port: number;
  stats: FaultStats;
  /** Replaces the faults for every later decision on every connection (e.g. {} to let the link heal). */
  setFaults(f: Faults): void;
  close(): Promise<void>;
}

export interface FaultProxyOptions {
  targetHost: string;
  targetPort: number;
  seed: number;
  faults?: Faults;
  /** Connections open at once; more are refused (default 64). */
  connectionsMax?: number;
  /** Listen on this port (default: any free port); a test restarts a "link" on the same port. */
  listenPort?: number;
}

const reorderHoldMsDefault = 50;
const connectionsMaxDefault = 64;
/** After a cut, how long to wait for the server to close its side before closing ours. */
const cutLingerMs = 1000;

export async function startFaultProxy(opts: FaultProxyOptions): Promise<FaultProxy> {
  let faults: Faults = { ...(opts.faults ?? {}) };
  const stats: FaultStats = {
    frames: 0,
    flipped: 0,
    duplicated: 0,
    reordered: 0,
    truncated: 0,
    dropped: 0,
    connections: 0,
    serverFlipped: 0,
    unframed: 0,
  };
  const live = new Set<ProxiedConnection>();
  let connectionIndex = 0;
  const connectionsMax = opts.connectionsMax ?? connectionsMaxDefault;

  // allowHalfOpen: a client that has finished sending still gets the server's replies.
  const server = net.createServer({ allowHalfOpen: true }, (client) => {
    if (live.size >= connectionsMax) {
      client.destroy();
      return;
    }
    stats.connections++;
    const c = new ProxiedConnection(client, opts, connectionIndex++, () => faults, stats, () => live.delete(c));
    live.add(c);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.listenPort ?? 0, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const port = (server.address() as net.AddressInfo).port;

  return {
    port,
    stats,
    setFaults(f: Faults) {
      faults = { ...f };
    },
    async close() {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const c of [...live]) c.destroy();
      await closed;
    },
  };
}

class ProxiedConnection {
  private readonly upstream: net.Socket;
  private readonly queue = new ByteQueue();
  private readonly rand: () => number;
  private readonly randServer: () => number;
  /** Prefix of the frame being gathered, null while waiting for one. */
  private prefix: Buffer | null = null;
  private msgBytes = 0;
  private dataBytes = 0;
  /** Bytes that are not frames were seen: forward raw from then on. */
  private unframed = false;
  private framesSeen = 0;
  private truncateAt: number | null = null;
  private held: Buffer[] | null = null;
  private holdTimer: NodeJS.Timeout | null = null;
  private lingerTimer: NodeJS.Timeout | null = null;
  private serverOffset = 0;
  private nextServerFlip: number | null = null;
  /** No more bytes are forwarded client→server. */
  private dead = false;
  private cutting = false;
  /** Backpressure: a side is paused until the other drains. */
  private upstreamFull = false;
  private clientFull = false;
  private gone = false;

  constructor(
    private readonly client: net.Socket,
    opts: FaultProxyOptions,
    index: number,
    private readonly faults: () => Faults,
    private readonly stats: FaultStats,
    private readonly onGone: () => void,
  ) {
    // One stream of decisions per connection and direction, so neither the interleaving of
    // connections nor the timing of server replies changes the client-direction faults.
    this.rand = prng((opts.seed + Math.imul(index + 1, 0x9e3779b1)) >>> 0);
    this.randServer = prng(((opts.seed ^ 0x5bd1e995) + Math.imul(index + 1, 0x85ebca6b)) >>> 0);
    client.setNoDelay(true);
    this.upstream = net.connect({ host: opts.targetHost, port: opts.targetPort, allowHalfOpen: true });
    this.upstream.setNoDelay(true);

    client.on('data', (chunk: Buffer) => this.fromClient(chunk));
    client.on('end', () => {
      if (this.dead) return;
      this.releaseHeld();
      if (this.prefix) this.send(this.prefix);
      if (this.queue.length > 0) this.send(this.queue.take(this.queue.length));
      this.prefix = null;
      this.upstream.end();
    });
    this.upstream.on('data', (chunk: Buffer) => this.fromServer(chunk));
    this.upstream.on('end', () => {
      if (this.cutting) this.destroy();
      else if (!this.dead) this.client.end();
    });
    // While a cut is under way the client side is already gone; the upstream side closes
    // once the last bytes are flushed.
    client.on('error', () => this.cutting || this.destroy());
    client.on('close', () => this.cutting || this.destroy());
    this.upstream.on('error', () => this.destroy());
    this.upstream.on('close', () => this.destroy());
  }

  destroy(): void {
    if (this.gone) return;
    this.gone = true;
    if (this.lingerTimer) clearTimeout(this.lingerTimer);
    if (this.holdTimer) clearTimeout(this.holdTimer);
    this.holdTimer = null;
    this.held = null;
    this.dead = true;
    this.queue.clear();
    this.client.destroy();
    this.upstream.destroy();
    this.onGone();
  }

  private chance(p: number | undefined): boolean {
    return p !== undefined && p > 0 && this.rand() < p;
  }

  private randInt(n: number): number {
    return Math.floor(this.rand() * n);
  }

  /** Writes to the server, pausing the client while the server side is backed up. */
  private send(b: Buffer): void {
    if (this.dead || this.upstream.destroyed) return;
    if (!this.upstream.write(b) && !this.upstreamFull) {
      this.upstreamFull = true;
      this.client.pause();
      this.upstream.once('drain', () => {
        this.upstreamFull = false;
        this.client.resume();
      });
    }
  }

  /** Sends what was written so far, then cuts both sides (data already sent still arrives). */
  private cut(last?: Buffer): void {
    this.dead = true;
    this.cutting = true;
    this.queue.clear();
    if (this.holdTimer) clearTimeout(this.holdTimer);
    this.holdTimer = null;
    this.client.destroy();
    // Closing the socket as soon as the bytes are flushed would reset the connection if
    // the server's replies are still arriving, and a reset may discard the bytes we sent.
    // So send FIN and close when the server closes its side (bounded by cutLingerMs).
    this.upstream.end(last ?? Buffer.alloc(0));
    this.lingerTimer = setTimeout(() => this.destroy(), cutLingerMs);
  }

  private fromClient(chunk: Buffer): void {
    if (this.dead) return;
    if (this.unframed) {
      this.send(chunk);
      return;
    }
    this.queue.push(chunk);
    for (;;) {
      if (this.dead) return;
      if (!this.prefix) {
        if (this.queue.length < framePrefixBytes) return;
        const p = Buffer.from(this.queue.take(framePrefixBytes));
        this.msgBytes = p.readUInt32BE(4);
        this.dataBytes = p.readUInt32BE(8);
        if (p.readUInt32BE(0) !== FRAME_MAGIC || this.msgBytes > replicationMsgBytesMax || this.dataBytes > replicationDataBytesMax) {
          // Not a frame: the receiver will refuse it; pass it on untouched.
          this.unframed = true;
          this.stats.unframed++;
          this.releaseHeld();
          this.send(p);
          if (this.queue.length > 0) this.send(this.queue.take(this.queue.length));
          return;
        }
        this.prefix = p;
      }
      const rest = this.msgBytes + this.dataBytes;
      if (this.queue.length < rest) return;
      const frame = Buffer.concat([this.prefix, this.queue.take(rest)]);
      this.prefix = null;
      this.onFrame(frame, this.msgBytes, this.dataBytes);
    }
  }

  private onFrame(frame: Buffer, msgBytes: number, dataBytes: number): void {
    const f = this.faults();
    const index = this.framesSeen++;
    this.stats.frames++;

    if (this.chance(f.dropConnection)) {
      this.stats.dropped++;
      this.releaseHeld();
      this.cut();
      return;
    }
    if (f.truncateAfterFrames) {
      const { min, max } = f.truncateAfterFrames;
      if (this.truncateAt === null) this.truncateAt = index + min + this.randInt(max - min + 1);
      if (index >= this.truncateAt) {
        this.stats.truncated++;
        this.releaseHeld();
        this.cut(frame.subarray(0, frame.length >> 1));
        return;
      }
    } else {
      this.truncateAt = null;
    }
    if (dataBytes > 0 && this.chance(f.flipBitInData)) {
      const bit = this.randInt(dataBytes * 8);
      frame[framePrefixBytes + msgBytes + (bit >> 3)]! ^= 1 << (bit & 7);
      this.stats.flipped++;
    }
    if (this.chance(f.flipBitAnywhere)) {
      const bit = this.randInt(frame.length * 8);
      frame[bit >> 3]! ^= 1 << (bit & 7);
      this.stats.flipped++;
    }
    const copies = [frame];
    if (this.chance(f.duplicate)) {
      copies.push(frame);
      this.stats.duplicated++;
    }
    if (this.held) {
      const held = this.held;
      this.held = null;
      if (this.holdTimer) clearTimeout(this.holdTimer);
      this.holdTimer = null;
      for (const b of copies) this.send(b);
      for (const b of held) this.send(b);
    } else if (this.chance(f.reorder)) {
      this.held = copies;
      this.stats.reordered++;
      this.holdTimer = setTimeout(() => {
        this.holdTimer = null;
        this.releaseHeld();
      }, f.reorderHoldMs ?? reorderHoldMsDefault);
    } else {
      for (const b of copies) this.send(b);
    }
  }

  private releaseHeld(): void {
    if (this.holdTimer) clearTimeout(this.holdTimer);
    this.holdTimer = null;
    const held = this.held;
    this.held = null;
    if (held) for (const b of held) this.send(b);
  }

  /** Distance to the next flipped byte: geometric, so flips land at the same stream offsets however the bytes are chunked. */
  private serverGap(p: number): number {
    if (p >= 1) return 0;
    return Math.floor(Math.log(1 - this.randServer()) / Math.log(1 - p));
  }

  private fromServer(chunk: Buffer): void {
    if (this.dead) return;
    const p = this.faults().flipServerBits;
    if (p !== undefined && p > 0) {
      if (this.nextServerFlip === null) this.nextServerFlip = this.serverOffset + this.serverGap(p);
      const end = this.serverOffset + chunk.length;
      while (this.nextServerFlip < end) {
        chunk[this.nextServerFlip - this.serverOffset]! ^= 1 << Math.floor(this.randServer() * 8);
        this.stats.serverFlipped++;
        this.nextServerFlip += 1 + this.serverGap(p);
      }
    } else {
      this.nextServerFlip = null;
    }
    this.serverOffset += chunk.length;
    if (this.client.destroyed) return;
    if (!this.client.write(chunk) && !this.clientFull) {
      this.clientFull = true;
      this.upstream.pause();
      this.client.once('drain', () => {
        this.clientFull = false;
        this.upstream.resume();
      });
    }
  }
}
