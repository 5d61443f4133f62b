// Why: NBD starts TLS inside a connection (NBD_OPT_STARTTLS, then the TLS handshake on
// the same socket), so the listener cannot be a tls.Server. This upgrades one accepted
// socket after the STARTTLS ACK has been sent: the handshake, Node's own verification of
// the client certificate, and the allow-list of client names, before any NBD byte flows
// over TLS. Kept apart from connection.ts so the socket swap is one call there.

import tls from 'node:tls';
import type { Socket } from 'node:net';
import type { TlsServerConfig } from './tls-config.js';
import { authorizedName, subjectDn } from './tls-config.js';

export interface TlsPeer {
  socket: tls.TLSSocket;
  protocol: string;
  cipher: string;
  /** The authenticated client: its PSK identity, its certificate subject DN, or null (no client authentication). */
  client: string | null;
}

/** A refusal after (or during) the handshake; the socket is already destroyed. */
export class TlsRefused extends Error {
  override readonly name = 'TlsRefused';
}

/**
 * Runs the server side of the TLS handshake on `raw` (paused, the ACK already written)
 * and checks the client. Resolves with the TLS socket, or rejects with TlsRefused after
 * destroying it.
 */
export function upgradeToTls(raw: Socket, cfg: TlsServerConfig): Promise<TlsPeer> {
  return new Promise((resolve, reject) => {
    // A tls.Server that never listens: fed this one socket, it applies every server
    // option (PSK callback, client-certificate request and verification) exactly as a
    // listening one would, and reports on this socket only.
    let pskIdentity: string | null = null;
    const lookup = cfg.options.pskCallback;
    const server = tls.createServer(
      lookup
        ? {
            ...cfg.options,
            pskCallback: (socket, identity) => {
              pskIdentity = identity;
              return lookup(socket, identity);
            },
          }
        : cfg.options,
    );
    let settled = false;
    const refuse = (socket: tls.TLSSocket | Socket, reason: string) => {
      socket.destroy();
      if (!settled) {
        settled = true;
        reject(new TlsRefused(reason));
      }
    };
    server.on('tlsClientError', (err, socket) => refuse(socket, `TLS handshake failed: ${err.message}`));
    server.on('secureConnection', (socket: tls.TLSSocket) => {
      const protocol = socket.getProtocol() ?? '?';
      const cipher = socket.getCipher()?.name ?? '?';
      let client: string | null = null;
      if (cfg.credentials === 'psk') {
        client = pskIdentity;
      } else if (cfg.verifyPeer) {
        const cert = socket.getPeerX509Certificate();
        if (!cert) return refuse(socket, 'the client sent no certificate (--tls-verify-peer; clients send one only if a CA in --tls-ca signed it)');
        if (!socket.authorized) return refuse(socket, `client certificate "${subjectDn(cert)}" refused: ${String(socket.authorizationError)}`);
        client = subjectDn(cert);
        if (cfg.authz.length > 0 && authorizedName(cert, cfg.authz) === null) {
          return refuse(socket, `client certificate "${client}" is not in --tls-authz`);
        }
      }
      settled = true;
      resolve({ socket, protocol, cipher, client });
    });
    server.emit('connection', raw);
  });
}
