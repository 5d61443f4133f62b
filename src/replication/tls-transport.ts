// Why: the replication port takes orders that create volumes, overwrite blocks and move
// generations; CRC32C stops accidents, not people. So peers prove who they are before a
// single replication byte is read, and the link is encrypted: TLS with a pre-shared key
// (psktool's `identity:hexkey` file, TLS 1.2 PSK suites with ECDHE/DHE forward secrecy)
// or X.509 verified both ways against one CA. The proven identity travels on the
// connection (`Conn.peerIdentity`: `psk:NAME` or `x509:CN`) so the replication service
// can bind it to a pair; link, sender, replica and recovery see the same Conn as on TCP.
//
// One mode per daemon (PSK or X.509, not both): one set of credentials to reason about.
// PSK: the server proves it knows the key of the identity the client presented; it names
// itself in the PSK identity hint (what the client records as the peer's identity). Give
// each node its own key and put it only in the files of nodes that trust it.
// X.509: both sides verify the chain against --repl-tls-ca; host names are not checked
// (peers are dialled by address), the certificate's subject CN is the identity.

import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import { DeltavolError } from '../util/errors.js';
import { applyTcpCongestion } from '../util/tcp-congestion.js';
import { dial, listenOn, socketAddress, openGuard, TcpConn, type Conn, type Transport } from './transport.js';

export type ReplTlsMode = 'psk' | 'x509';

export interface ReplTlsOptions {
  pskFile?: string;
  /** The identity we present (default: the file's first line). */
  pskIdentity?: string;
  certFile?: string;
  keyFile?: string;
  caFile?: string;
  /** Peers allowed to connect (identities with or without their `psk:`/`x509:` prefix). */
  allow?: string[];
}

export interface ReplTls {
  mode: ReplTlsMode;
  /** Who we are to peers (`psk:NAME` or `x509:CN`). */
  identity: string;
  /** SHA-256 of our certificate (X.509 only). */
  fingerprint: string | null;
  allow: string[] | null;
  transport: Transport;
  /** Things the operator should fix (a key file others can read), for the start log. */
  warnings: string[];
}

/** A secret file readable by group or others is worth a warning (the key is the identity). */
function secretFileWarnings(file: string, what: string): string[] {
  try {
    const mode = fs.statSync(file).mode & 0o777;
    return mode & 0o077 ? [`${what} ${file} is readable by others (mode ${mode.toString(8)}): chmod 600 it`] : [];
  } catch {
    return [];
  }
}

/** TLS 1.2 PSK suites with an ephemeral key exchange first (forward secrecy), all AEAD. */
const PSK_CIPHERS = 'ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES128-GCM-SHA256';
const pskKeyBytesMin = 16;

/** Parses a psktool file: `identity:hexkey` per line (blank lines and # comments skipped). */
export function parsePskFile(text: string, file = 'PSK file'): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const at = line.lastIndexOf(':');
    const id = line.slice(0, at);
    const hex = line.slice(at + 1);
    if (at <= 0 || !/^[0-9a-fA-F]+$/.test(hex) || hex.length % 2 !== 0) throw new DeltavolError('EINVAL_ARGUMENT', `${file} line ${i + 1}: expected identity:hexkey (as psktool writes)`);
    if (hex.length / 2 < pskKeyBytesMin) throw new DeltavolError('EINVAL_ARGUMENT', `${file} line ${i + 1}: the key of ${id} is ${hex.length / 2} bytes; at least ${pskKeyBytesMin} are needed (psktool makes 32)`);
    if (keys.has(id)) throw new DeltavolError('EINVAL_ARGUMENT', `${file} line ${i + 1}: identity ${id} appears twice`);
    keys.set(id, Buffer.from(hex, 'hex'));
  });
  if (keys.size === 0) throw new DeltavolError('EINVAL_ARGUMENT', `${file}: no identity:hexkey line`);
  return keys;
}

function readFile(file: string, what: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (e) {
    throw new DeltavolError('EINVAL_ARGUMENT', `cannot read ${what} ${file}: ${(e as Error).message}`);
  }
}

/** Whether `identity` (`psk:NAME`/`x509:CN`) is on the allow-list (entries may omit the prefix). */
export function allowed(allow: string[] | null, identity: string): boolean {
  if (!allow) return true;
  const bare = identity.slice(identity.indexOf(':') + 1);
  return allow.some((a) => a === identity || a === bare);
}

/** Loads and checks the credentials; throws EINVAL_ARGUMENT with what is wrong. */
export function loadReplTls(o: ReplTlsOptions): ReplTls {
  const x509 = o.certFile !== undefined || o.keyFile !== undefined || o.caFile !== undefined;
  if (o.pskFile !== undefined && x509) throw new DeltavolError('EINVAL_ARGUMENT', 'give either --repl-tls-psk or --repl-tls-cert/--repl-tls-key/--repl-tls-ca, not both');
  const allow = o.allow && o.allow.length > 0 ? o.allow : null;
  if (o.pskFile !== undefined) {
    const keys = parsePskFile(readFile(o.pskFile, 'PSK file').toString('utf8'), o.pskFile);
    const name = o.pskIdentity ?? [...keys.keys()][0]!;
    const ours = keys.get(name);
    if (!ours) throw new DeltavolError('EINVAL_ARGUMENT', `${o.pskFile} has no key for identity ${name}`);
    return { mode: 'psk', identity: `psk:${name}`, fingerprint: null, allow, transport: pskTransport(name, ours, keys, allow), warnings: secretFileWarnings(o.pskFile, 'PSK file') };
  }
  if (x509) {
    if (o.certFile === undefined || o.keyFile === undefined || o.caFile === undefined) throw new DeltavolError('EINVAL_ARGUMENT', 'X.509 needs all of --repl-tls-cert, --repl-tls-key and --repl-tls-ca (peers are verified both ways)');
    const cert = readFile(o.certFile, 'certificate');
    const key = readFile(o.keyFile, 'private key');
    const ca = readFile(o.caFile, 'CA certificate');
    let context: tls.SecureContext;
    let x: crypto.X509Certificate;
    try {
      context = tls.createSecureContext({ cert, key, ca, minVersion: 'TLSv1.2' });
      x = new crypto.X509Certificate(cert);
    } catch (e) {
      throw new DeltavolError('EINVAL_ARGUMENT', `bad X.509 credentials: ${(e as Error).message}`);
    }
    const cn = /(?:^|\n)CN=([^\n]*)/.exec(x.subject)?.[1];
    if (!cn) throw new DeltavolError('EINVAL_ARGUMENT', `${o.certFile}: the certificate has no subject CN (the CN is this node's replication identity)`);
    const caCert = new crypto.X509Certificate(ca);
    if (caCert.subject === caCert.issuer && !x.checkIssued(caCert)) {
      throw new DeltavolError('EINVAL_ARGUMENT', `${o.certFile} is not issued by ${o.caFile}: peers would refuse it`);
    }
    return { mode: 'x509', identity: `x509:${cn}`, fingerprint: x.fingerprint256, allow, transport: x509Transport(context, allow), warnings: secretFileWarnings(o.keyFile, 'private key') };
  }
  throw new DeltavolError('EINVAL_ARGUMENT', 'no replication credentials given');
}

/** A TLS socket as a Conn, with the identity its handshake proved. */
class TlsConn extends TcpConn implements Conn {
  constructor(
    sock: tls.TLSSocket,
    peerIdentity: string,
    private readonly raw: net.Socket | null,
  ) {
    super(sock, peerIdentity);
    raw?.setNoDelay(true);
    if (raw) applyTcpCongestion(raw);
  }
  override get remoteAddress(): string {
    return this.raw ? socketAddress(this.raw) : super.remoteAddress;
  }
}

function x509Identity(sock: tls.TLSSocket): string | null {
  const cn = sock.getPeerCertificate()?.subject?.CN;
  return typeof cn === 'string' && cn !== '' ? `x509:${cn}` : null;
}

/** Shared by both modes: dial with a deadline, then wait for the handshake and the peer's identity. */
function connectTls(host: string, port: number, timeoutMs: number, signal: AbortSignal | undefined, options: tls.ConnectionOptions, identityOf: (s: tls.TLSSocket) => string | null): Promise<Conn> {
  const sock = tls.connect({ host, port, ...options, checkServerIdentity: () => undefined });
  return dial(
    sock,
    {
      host,
      port,
      timeoutMs,
      signal,
      readyEvent: 'secureConnect',
      timeoutDetail: ' (TCP or TLS handshake)',
      errorDetail: ' over TLS',
      // A server that closes during the handshake (wrong key, not allowed) sends no error here.
      closeWhy: `${host}:${port} closed the connection during the TLS handshake (wrong key or certificate, or not allowed there)`,
    },
    (s) => {
      const id = identityOf(s);
      return id ? new TlsConn(s, id, null) : `${host}:${port}: the peer presented no identity`;
    },
  );
}

/**
 * The server side for both modes: admission first (caps on unauthenticated connections),
 * then the handshake within its deadline; only a verified peer reaches onConn.
 */
function tlsListen(makeSocket: (raw: net.Socket, identity: { value: string | null }) => tls.TLSSocket, identityAfter: (s: tls.TLSSocket, identity: { value: string | null }) => string | null, allow: string[] | null): Transport['listen'] {
  return (host, port, onConn, guard = openGuard) => {
    const server = net.createServer((raw) => {
      const address = socketAddress(raw);
      const admission = guard.admit(address);
      if (!admission) return void raw.destroy();
      raw.once('close', () => admission.release());
      raw.on('error', () => undefined); // reported through the TLS socket
      const identity = { value: null as string | null };
      const sock = makeSocket(raw, identity);
      let done = false;
      const failed = (why: string, timedOut: boolean) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        guard.onHandshakeFailed(address, why, timedOut);
        sock.destroy();
        raw.destroy();
      };
      const timer = setTimeout(() => failed(`TLS handshake not finished within ${guard.handshakeTimeoutMs} ms`, true), guard.handshakeTimeoutMs);
      const onError = (e: Error) => failed(`TLS handshake failed: ${e.message}`, false);
      const onClose = () => failed('closed during the TLS handshake', false);
      sock.on('error', onError);
      sock.once('close', onClose);
      sock.once('secure', () => {
        const id = identityAfter(sock, identity);
        if (!id) return failed('the peer presented no verified identity', false);
        if (!allowed(allow, id)) return failed(`peer ${id} is not on --repl-allow`, false);
        done = true;
        clearTimeout(timer);
        sock.off('error', onError);
        sock.off('close', onClose);
        onConn(new TlsConn(sock, id, raw), admission);
      });
    });
    return listenOn(server, host, port);
  };
}

function pskTransport(name: string, ours: Buffer, keys: Map<string, Buffer>, allow: string[] | null): Transport {
  const common = { ciphers: PSK_CIPHERS, minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' } as const;
  return {
    connect: (host, port, timeoutMs, signal) => {
      // The server proved it knows our key; it names itself in its identity hint.
      let hint = '';
      const pskCallback = (h: string | null) => {
        hint = h ?? '';
        return { psk: ours, identity: name };
      };
      return connectTls(host, port, timeoutMs, signal, { ...common, pskCallback }, () => (hint !== '' ? `psk:${hint}` : null));
    },
    listen: tlsListen(
      (raw, identity) =>
        new tls.TLSSocket(raw, {
          isServer: true,
          ...common,
          pskIdentityHint: name,
          pskCallback: (_s: tls.TLSSocket, id: string) => {
            const key = keys.get(id);
            if (!key || !allowed(allow, `psk:${id}`)) return null;
            identity.value = `psk:${id}`;
            return key;
          },
        } as tls.TLSSocketOptions),
      (_s, identity) => identity.value,
      allow,
    ),
  };
}

/**
 * Whether the client's certificate chain verified. A TLSSocket made outside a tls.Server
 * does not set `authorized`; the verification result is read from the handle, and a
 * handle without it counts as not verified (fail closed).
 */
function clientVerified(s: tls.TLSSocket): boolean {
  const handle = (s as unknown as { _handle?: { verifyError?: () => Error | null } })._handle;
  if (typeof handle?.verifyError !== 'function') return false;
  return handle.verifyError() === null && s.getPeerCertificate() !== null && Object.keys(s.getPeerCertificate()).length > 0;
}

function x509Transport(context: tls.SecureContext, allow: string[] | null): Transport {
  return {
    connect: (host, port, timeoutMs, signal) => connectTls(host, port, timeoutMs, signal, { secureContext: context, rejectUnauthorized: true, minVersion: 'TLSv1.2' }, x509Identity),
    listen: tlsListen(
      (raw) => new tls.TLSSocket(raw, { isServer: true, secureContext: context, requestCert: true, rejectUnauthorized: true }),
      (s) => (clientVerified(s) ? x509Identity(s) : null),
      allow,
    ),
  };
}
