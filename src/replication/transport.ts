// Why: the replication link is a byte stream between two daemons. Production runs it on
// TCP; the seeded simulator runs it on an in-memory network that delays, cuts,
// partitions and corrupts (TigerBeetle's packet_simulator). Link, sender, replica and
// recovery only see these two interfaces, so the same code runs in both.

import net from 'node:net';
import { DeltavolError } from '../util/errors.js';

/** One established connection, as the link needs it (a subset of net.Socket). */
export interface Conn {
  /** The peer's address as this side sees it (for a return address). */
  readonly remoteAddress: string;
  /** Bytes written but not yet taken by the network. */
  readonly writableLength: number;
  write(b: Buffer): void;
  cork(): void;
  uncork(): void;
  /** Stop or restart delivering data (backpressure on the receiving side). */
  pause(): void;
  resume(): void;
  destroy(): void;
  onData(fn: (chunk: Buffer) => void): void;
  /** Called once, however the connection ends (error, peer close, destroy). */
  onClose(fn: (reason: string) => void): void;
  /** Called when writableLength drops after a full queue. */
  onDrain(fn: () => void): void;
  offDrain(fn: () => void): void;
}

export interface Listener {
  readonly port: number;
  close(): Promise<void>;
}

export interface Transport {
  /** Resolves with an open connection or rejects with DAEMON_UNREACHABLE (also when aborted). */
  connect(host: string, port: number, timeoutMs: number, signal?: AbortSignal): Promise<Conn>;
  listen(host: string, port: number, onConn: (c: Conn) => void): Promise<Listener>;
}

class TcpConn implements Conn {
  private closed = false;
  private readonly closers: ((reason: string) => void)[] = [];

  constructor(private readonly sock: net.Socket) {
    sock.setNoDelay(true);
    const end = (reason: string) => {
      if (this.closed) return;
      this.closed = true;
      for (const f of this.closers.splice(0)) f(reason);
    };
    sock.on('error', (e) => end(`socket error: ${e.message}`));
    sock.on('end', () => end('connection closed by peer'));
    sock.on('close', () => end('connection closed'));
  }
  get remoteAddress(): string {
    return (this.sock.remoteAddress ?? '').replace(/^::ffff:/, '');
  }
  get writableLength(): number {
    return this.sock.writableLength;
  }
  write(b: Buffer): void {
    this.sock.write(b);
  }
  cork(): void {
    this.sock.cork();
  }
  uncork(): void {
    this.sock.uncork();
  }
  pause(): void {
    this.sock.pause();
  }
  resume(): void {
    this.sock.resume();
  }
  destroy(): void {
    this.sock.destroy();
  }
  onData(fn: (chunk: Buffer) => void): void {
    this.sock.on('data', fn);
  }
  onClose(fn: (reason: string) => void): void {
    if (this.closed) fn('connection closed');
    else this.closers.push(fn);
  }
  onDrain(fn: () => void): void {
    this.sock.on('drain', fn);
  }
  offDrain(fn: () => void): void {
    this.sock.off('drain', fn);
  }
}

export const tcpTransport: Transport = {
  connect(host, port, timeoutMs, signal) {
    return new Promise((resolve, reject) => {
      const sock = net.connect({ host, port });
      const fail = (why: string) => {
        clearTimeout(t);
        signal?.removeEventListener('abort', onAbort);
        sock.destroy();
        reject(new DeltavolError('DAEMON_UNREACHABLE', why));
      };
      const onAbort = () => fail(`connect to ${host}:${port} aborted`);
      const t = setTimeout(() => fail(`connect to ${host}:${port} timed out`), timeoutMs);
      if (signal?.aborted) return onAbort();
      signal?.addEventListener('abort', onAbort, { once: true });
      sock.once('connect', () => {
        clearTimeout(t);
        signal?.removeEventListener('abort', onAbort);
        sock.removeAllListeners('error');
        resolve(new TcpConn(sock));
      });
      sock.once('error', (e) => fail(`cannot reach ${host}:${port}: ${e.message}`));
    });
  },
  listen(host, port, onConn) {
    const server = net.createServer((sock) => onConn(new TcpConn(sock)));
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve({
          port: (server.address() as net.AddressInfo).port,
          close: () => new Promise<void>((r) => server.close(() => r())),
        });
      });
    });
  },
};
