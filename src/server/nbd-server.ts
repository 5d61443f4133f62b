// Why: the listeners (TCP with TCP_NODELAY, Unix sockets) and the set of live
// connections, with a cap on how many, and a shutdown that stops accepting, drains
// in-flight requests and closes every socket. TLS, when configured, is started per
// connection by NBD_OPT_STARTTLS (connection.ts), not by the listener.

import net from 'node:net';
import fs from 'node:fs';
import type { Logger } from '../util/log.js';
import type { ExportCatalog } from '../nbd/export.js';
import { Connection } from './connection.js';
import type { TlsServerConfig } from './tls-config.js';
import { connectionsMax } from '../util/limits.js';

export class NbdServer {
  private readonly servers: net.Server[] = [];
  readonly connections = new Set<Connection>();
  private nextId = 1;
  private closing = false;

  constructor(
    private readonly catalog: ExportCatalog,
    private readonly log: Logger,
    private readonly tls: TlsServerConfig | null = null,
  ) {}

  private accept(socket: net.Socket): void {
    if (this.closing || this.connections.size >= connectionsMax) {
      this.log.warn({ connections: this.connections.size }, 'refusing connection');
      socket.destroy();
      return;
    }
    const id = this.nextId++;
    const log = this.log.child({ conn: id, peer: socket.remoteAddress ?? 'unix' });
    const c = new Connection(socket, this.catalog, log, (closed) => this.connections.delete(closed), this.tls);
    this.connections.add(c);
  }

  listenTcp(port: number, host: string): Promise<number> {
    return new Promise((resolve, reject) => {
      const server = net.createServer({ noDelay: true }, (s) => this.accept(s));
      server.once('error', reject);
      server.listen({ port, host }, () => {
        server.off('error', reject);
        server.on('error', (e) => this.log.error({ err: e.message }, 'NBD listener error'));
        this.servers.push(server);
        resolve((server.address() as net.AddressInfo).port);
      });
    });
  }

  listenUnix(path: string): Promise<void> {
    // A socket file left by a crashed daemon would block the bind; refuse to remove
    // anything that is not a socket.
    try {
      if (fs.lstatSync(path).isSocket()) fs.unlinkSync(path);
    } catch {
      // absent
    }
    return new Promise((resolve, reject) => {
      const server = net.createServer((s) => this.accept(s));
      server.once('error', reject);
      server.listen(path, () => {
        server.off('error', reject);
        this.servers.push(server);
        resolve();
      });
    });
  }

  async close(drainMs: number): Promise<void> {
    this.closing = true;
    const closed = this.servers.map((s) => new Promise<void>((r) => s.close(() => r())));
    await Promise.all([...this.connections].map((c) => c.shutdown(drainMs)));
    // Sockets were ended after their last reply; a client that never closes its side
    // gets a short grace, then a hard close, so shutdown is bounded.
    if (this.connections.size > 0) {
      await new Promise((r) => setTimeout(r, 500));
      for (const c of this.connections) c.destroy();
    }
    await Promise.all(closed);
  }
}
