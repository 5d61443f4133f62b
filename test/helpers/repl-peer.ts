// Why: the replication attacks of issue 10 were made with a hand-made client speaking the
// public wire format; the tests that keep them refused need the same client, over plain
// TCP or over TLS (PSK or X.509) with whatever credentials the attacker holds. It never
// keeps a socket past its test: every wait is bounded, and destroy() ends it.

import net from 'node:net';
import tls from 'node:tls';
import { chunkChecksum, encodeFrame, FrameDecoder, trailerChecksum, type ReplMessage, type Runs } from '../../src/replication/wire.js';
import { setDataChecksum } from '../../src/replication/outbound-log.js';

export type PeerCreds = { psk: { identity: string; key: Buffer } } | { x509: { cert: Buffer; key: Buffer; ca: Buffer } };

const PSK_CIPHERS = 'ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:PSK-AES256-GCM-SHA384';

export class RawPeer {
  readonly msgs: ReplMessage[] = [];
  closed = false;
  /** Why the connection or its handshake failed, if it did. */
  error: string | null = null;
  private waiters: (() => void)[] = [];

  private constructor(readonly sock: net.Socket) {
    const d = new FrameDecoder((f) => {
      this.msgs.push(f.msg);
      this.wake();
    });
    sock.on('data', (c: Buffer) => {
      try {
        d.push(c);
      } catch (e) {
        this.error = (e as Error).message;
        sock.destroy();
      }
    });
    sock.on('error', (e) => {
      this.error ??= e.message;
    });
    sock.on('close', () => {
      this.closed = true;
      this.wake();
    });
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  /** Connects (and finishes the TLS handshake); resolves with the peer even if that failed (see closed/error). */
  static open(port: number, creds?: PeerCreds, host = '127.0.0.1', timeoutMs = 5000): Promise<RawPeer> {
    return new Promise((resolve) => {
      let sock: net.Socket;
      let event = 'connect';
      if (!creds) sock = net.connect(port, host);
      else if ('psk' in creds) {
        event = 'secureConnect';
        sock = tls.connect({ port, host, ciphers: PSK_CIPHERS, maxVersion: 'TLSv1.2', checkServerIdentity: () => undefined, pskCallback: () => ({ psk: creds.psk.key, identity: creds.psk.identity }) });
      } else {
        event = 'secureConnect';
        sock = tls.connect({ port, host, cert: creds.x509.cert, key: creds.x509.key, ca: creds.x509.ca, checkServerIdentity: () => undefined });
      }
      const p = new RawPeer(sock);
      const t = setTimeout(() => {
        p.error ??= 'connect/handshake timed out';
        sock.destroy();
        resolve(p);
      }, timeoutMs);
      sock.once(event, () => {
        clearTimeout(t);
        resolve(p);
      });
      sock.once('close', () => {
        clearTimeout(t);
        resolve(p);
      });
    });
  }

  send(msg: ReplMessage, data?: Buffer[]): void {
    if (this.closed) return;
    for (const b of encodeFrame(msg, data)) this.sock.write(b);
  }

  /** A chunk of `set` with the right checksum (anyone can compute it) and its trailer. */
  sendSet(generation: number, set: number, runs: Runs, data: Buffer, catchUpFrom: number): void {
    const crc = chunkChecksum(data, set, 0, runs);
    this.send({ t: 'chunk', generation, set, chunk: 0, runs, crc }, [data]);
    const blocks = runs.reduce((n, [, c]) => n + c, 0);
    const fields = { generation, set, chunks: 1, blocks, dataBytes: data.length, dataCrc: setDataChecksum([crc]), catchUpFrom, createdAtMs: Date.now(), partial: false };
    this.send({ t: 'trailer', ...fields, trailerCrc: trailerChecksum(fields) });
  }

  /** The first message matching `pred` (null if none within the time or the connection closed first). */
  async wait(pred: (m: ReplMessage) => boolean, timeoutMs = 5000): Promise<ReplMessage | null> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = this.msgs.find(pred);
      if (m) return m;
      const left = deadline - Date.now();
      if (this.closed || left <= 0) return null;
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
  }

  /** The first message that is not a ping (the daemon's heartbeat). */
  answer(timeoutMs = 5000): Promise<ReplMessage | null> {
    return this.wait((m) => m.t !== 'ping', timeoutMs);
  }

  async waitClosed(timeoutMs = 5000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    return this.closed;
  }

  destroy(): void {
    this.sock.destroy();
  }
}

export function helloFor(o: { pairId: string; primaryVolume: string; replicaVolume: string; generation: number; sizeBytes: number; blockBytes?: number; create?: boolean; description?: string }): ReplMessage {
  return {
    t: 'hello',
    protocol: 2,
    pairId: o.pairId,
    primaryVolume: o.primaryVolume,
    replicaVolume: o.replicaVolume,
    generation: o.generation,
    sizeBytes: o.sizeBytes,
    blockBytes: o.blockBytes ?? 4096,
    create: o.create ?? true,
    description: o.description ?? '',
    returnHost: '',
    returnPort: 0,
  };
}
