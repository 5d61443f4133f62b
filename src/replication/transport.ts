// Why: the replication link is a byte stream between two daemons. Production runs it on
// TCP, or on TLS (tls-transport.ts: the same Conn, with the peer's proven identity); the
// seeded simulator runs it on an in-memory network that delays, cuts, partitions and
// corrupts (TigerBeetle's packet_simulator). Link, sender, replica and
// recovery only see these two interfaces, so the same code runs in both.

import net from 'node:net';
import { DeltavolError } from '../util/errors.js';
import { adoptWithUserBuffer } from '../util/user-buffer-socket.js';
import { ThreadpoolSender, type ThreadpoolSendCounts } from '../util/threadpool-sender.js';
import type { FileRange } from '../util/file-range.js';
import { applyTcpCongestion } from '../util/tcp-congestion.js';
import { linkThreadpoolSendBytesMin, linkThreadpoolSendWaitMs } from './limits.js';

/** One established connection, as the link needs it (a subset of net.Socket). */
export interface Conn {
  /** The peer's address as this side sees it (for a return address). */
  readonly remoteAddress: string;
  /**
   * Who the peer proved to be (tls-transport.ts: `psk:NAME` or `x509:CN`), or null on a
   * link without credentials: such a peer is unauthenticated, whatever it says in a hello.
   */
  readonly peerIdentity: string | null;
  /** Bytes written but not yet taken by the network. */
  readonly writableLength: number;
  /**
   * Queues b; `done` (optional) runs once the connection no longer needs b (written to the
   * kernel, or the connection failed), so its owner may reuse it. It may never run.
   */
  write(b: Buffer, done?: () => void): void;
  /**
   * Optional: queues the pieces of one message (a frame), in order, as write() would one by
   * one; `done` runs once all are taken. Lets a large frame leave in one send (TcpConn).
   */
  writeParts?(parts: Buffer[], done?: () => void): void;
  /**
   * Optional: queues a message that lies whole in a file (a chunk record of the outbound
   * log), sent from there (sendfile), in order with every other write; `done` as for write().
   * False, with nothing queued: this connection cannot now (send the bytes instead).
   */
  writeFile?(file: FileRange, done?: () => void): boolean;
  cork(): void;
  uncork(): void;
  /** Stop or restart delivering data (backpressure on the receiving side). */
  pause(): void;
  resume(): void;
  destroy(): void;
  onData(fn: (chunk: Buffer) => void): void;
  /**
   * Optional: from now on each read goes into the start of the buffer `next()` returns
   * (called before every read), and onData gets a view of what was read into it, valid only
   * during the call (the owner decides when a buffer is read into again). Called before
   * onData; false when this connection cannot (its reads then come in fresh buffers).
   */
  readInto?(next: () => Buffer): boolean;
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

/** A place in the listener's budget for not-yet-authenticated connections (release is idempotent). */
export interface Admission {
  release(): void;
}

/**
 * What a listener asks before it spends anything on a new connection: `admit` returns null
 * when the caps on unauthenticated connections are reached (the socket is closed at once).
 * The admission is released when the connection closes, or earlier by its owner (a hello
 * was accepted: the peer is no longer unauthenticated).
 */
export interface ListenGuard {
  admit(remoteAddress: string): Admission | null;
  /** TLS handshakes taking longer are cut (plain TCP has none). */
  handshakeTimeoutMs: number;
  /** A TLS handshake failed or timed out (counted and logged by the owner). */
  onHandshakeFailed(remoteAddress: string, reason: string, timedOut: boolean): void;
}

export const openGuard: ListenGuard = {
  admit: () => ({ release: () => undefined }),
  handshakeTimeoutMs: 10_000,
  onHandshakeFailed: () => undefined,
};

/** The address of a socket as logs and caps use it (IPv4-mapped IPv6 shown as IPv4). */
export function socketAddress(sock: net.Socket): string {
  return (sock.remoteAddress ?? '').replace(/^::ffff:/, '');
}

export interface Transport {
  /** Resolves with an open connection or rejects with DAEMON_UNREACHABLE (also when aborted). */
  connect(host: string, port: number, timeoutMs: number, signal?: AbortSignal): Promise<Conn>;
  /** `onConn` gets the connection's admission (release it once the peer is authenticated). */
  listen(host: string, port: number, onConn: (c: Conn, admission: Admission) => void, guard?: ListenGuard): Promise<Listener>;
}

/** Reads of an accepted socket before its owner chose buffers (Node's own size). */
const defaultReadBytes = 64 * 1024;

/** Link frames sent from the threadpool since start, and those the socket took only part of. */
const linkPoolSends: ThreadpoolSendCounts = { sends: 0, partial: 0 };

export function linkThreadpoolSendCounts(): ThreadpoolSendCounts {
  return { ...linkPoolSends };
}

const NOTHING = () => {};
/** The (empty) buffer part of a message that lies whole in a file. */
const NO_BYTES = Buffer.alloc(0);

export class TcpConn implements Conn {
  private closed = false;
  private readonly closers: ((reason: string) => void)[] = [];
  private readonly dataFns: ((chunk: Buffer) => void)[] = [];
  private next: (() => Buffer) | null = null;
  /**
   * Large frames leave from the threadpool (../util/threadpool-sender.ts): on a plain TCP
   * socket only (socketFd refuses a TLS socket, whose handle reports the TCP descriptor
   * under it), else null.
   */
  private readonly sender: ThreadpoolSender | null;
  private readonly drainFns = new Set<() => void>();

  /**
   * An accepted socket (paused, nothing read) re-made to read into buffers this connection
   * chooses (../util/user-buffer-socket.ts), so its owner may use readInto(); a socket
   * that cannot be adopted is used as it is.
   */
  static accepted(sock: net.Socket): TcpConn {
    let conn: TcpConn | null = null;
    const adopted = adoptWithUserBuffer(sock, {
      // (Node asks for the first buffer while the socket is made, before `conn` exists.)
      next: () => (conn !== null ? conn.nextReadBuffer() : Buffer.allocUnsafe(defaultReadBytes)),
      received: (n, b) => conn!.received(b.subarray(0, n)),
    });
    conn = new TcpConn(adopted ?? sock, null, adopted !== null);
    return conn;
  }

  constructor(
    private readonly sock: net.Socket,
    readonly peerIdentity: string | null = null,
    /** The socket reads into buffers from nextReadBuffer() (TcpConn.accepted). */
    private readonly userBuffers = false,
  ) {
    sock.setNoDelay(true);
    applyTcpCongestion(sock); // a TLS socket has no descriptor here: TlsConn sets its raw socket's
    this.sender = ThreadpoolSender.forSocket(sock, {
      bytesMin: linkThreadpoolSendBytesMin,
      waitMs: linkThreadpoolSendWaitMs,
      counts: linkPoolSends,
      onSent: () => {
        for (const fn of [...this.drainFns]) fn();
      },
    });
    const end = (reason: string) => {
      this.sender?.close();
      if (this.closed) return;
      this.closed = true;
      for (const f of this.closers.splice(0)) f(reason);
    };
    sock.on('error', (e) => end(`socket error: ${e.message}`));
    sock.on('end', () => end('connection closed by peer'));
    sock.on('close', () => end('connection closed'));
  }
  get remoteAddress(): string {
    return socketAddress(this.sock);
  }
  get writableLength(): number {
    return this.sock.writableLength + (this.sender?.queuedBytes ?? 0);
  }
  write(b: Buffer, done?: () => void): void {
    const sender = this.sender;
    if (sender && (b.length >= linkThreadpoolSendBytesMin || !sender.idle) && sender.offer([b], b.length, done ?? NOTHING)) return;
    if (done) this.sock.write(b, () => done());
    else this.sock.write(b);
  }
  writeFile(file: FileRange, done?: () => void): boolean {
    const sender = this.sender;
    if (sender === null || !sender.takesFiles || this.closed || file.length < linkThreadpoolSendBytesMin) return false;
    return sender.offer([NO_BYTES], file.length, done ?? NOTHING, file);
  }
  writeParts(parts: Buffer[], done?: () => void): void {
    const sender = this.sender;
    if (sender) {
      let bytes = 0;
      for (const p of parts) bytes += p.length;
      if ((bytes >= linkThreadpoolSendBytesMin || !sender.idle) && sender.offer(parts, bytes, done ?? NOTHING)) return;
    }
    this.sock.cork();
    // Writes complete in order: the last one's completion covers the message.
    for (let i = 0; i < parts.length; i++) {
      if (i === parts.length - 1 && done) this.sock.write(parts[i]!, () => done());
      else this.sock.write(parts[i]!);
    }
    this.sock.uncork();
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
    if (!this.userBuffers) {
      this.sock.on('data', fn);
      return;
    }
    this.dataFns.push(fn);
    if (this.dataFns.length === 1) this.sock.resume(); // accepted paused: nothing is lost before a reader
  }
  readInto(next: () => Buffer): boolean {
    if (!this.userBuffers) return false;
    this.next = next;
    return true;
  }
  private nextReadBuffer(): Buffer {
    return this.next !== null ? this.next() : Buffer.allocUnsafe(defaultReadBytes);
  }
  private received(chunk: Buffer): void {
    for (const fn of this.dataFns) fn(chunk);
  }
  onClose(fn: (reason: string) => void): void {
    if (this.closed) fn('connection closed');
    else this.closers.push(fn);
  }
  /** Node's 'drain', or a threadpool send finished (what the sender holds shrank). */
  onDrain(fn: () => void): void {
    this.sock.on('drain', fn);
    this.drainFns.add(fn);
  }
  offDrain(fn: () => void): void {
    this.sock.off('drain', fn);
    this.drainFns.delete(fn);
  }
}

/** How a dial is described in its errors, and what counts as ready. */
export interface DialOptions {
  host: string;
  port: number;
  timeoutMs: number;
  signal?: AbortSignal;
  /** 'connect' for TCP, 'secureConnect' once a TLS handshake is done. */
  readyEvent: 'connect' | 'secureConnect';
  /** Added to the timeout and error messages (" over TLS", " (TCP or TLS handshake)"). */
  timeoutDetail?: string;
  errorDetail?: string;
  /** The message when the peer closes before ready without an error (a TLS refusal). */
  closeWhy?: string;
}

/**
 * Waits, within a deadline and an abort signal, for a dialling socket to become ready;
 * `ready` turns it into a Conn or returns why it is not acceptable. Every failure
 * destroys the socket and rejects with DAEMON_UNREACHABLE.
 */
export function dial<S extends net.Socket>(sock: S, d: DialOptions, ready: (sock: S) => Conn | string): Promise<Conn> {
  return new Promise((resolve, reject) => {
    const where = `${d.host}:${d.port}`;
    const cleanup = () => {
      clearTimeout(t);
      d.signal?.removeEventListener('abort', onAbort);
      sock.off('error', onError);
      sock.off('close', onClose);
    };
    const fail = (why: string) => {
      cleanup();
      sock.destroy();
      reject(new DeltavolError('DAEMON_UNREACHABLE', why));
    };
    const onAbort = () => fail(`connect to ${where} aborted`);
    const onError = (e: Error) => fail(`cannot reach ${where}${d.errorDetail ?? ''}: ${e.message}`);
    const onClose = () => fail(d.closeWhy ?? `${where} closed the connection`);
    const t = setTimeout(() => fail(`connect to ${where} timed out${d.timeoutDetail ?? ''}`), d.timeoutMs);
    if (d.signal?.aborted) return onAbort();
    d.signal?.addEventListener('abort', onAbort, { once: true });
    sock.once(d.readyEvent, () => {
      const conn = ready(sock);
      if (typeof conn === 'string') return fail(conn);
      cleanup();
      resolve(conn);
    });
    sock.once('error', onError);
    sock.once('close', onClose);
  });
}

export const tcpTransport: Transport = {
  connect(host, port, timeoutMs, signal) {
    return dial(net.connect({ host, port }), { host, port, timeoutMs, signal, readyEvent: 'connect' }, (sock) => new TcpConn(sock));
  },
  listen(host, port, onConn, guard = openGuard) {
    const server = net.createServer({ pauseOnConnect: true }, (sock) => {
      const admission = guard.admit(socketAddress(sock));
      if (!admission) return void sock.destroy();
      const conn = TcpConn.accepted(sock);
      conn.onClose(() => admission.release());
      onConn(conn, admission);
    });
    return listenOn(server, host, port);
  },
};

/** Listens and resolves with the bound port (shared with the TLS transport). */
export function listenOn(server: net.Server, host: string, port: number): Promise<Listener> {
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
}
