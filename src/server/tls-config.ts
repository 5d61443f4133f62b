// Why: NBD TLS credentials come from files an operator makes with certtool/openssl or
// psktool, and a mistake there (a key that does not match its certificate, a PSK line
// without a colon, a client allow-list with no CA to check against) must stop the daemon
// at start with a message naming the file and the flag, not fail every client later.
// This turns `serve` flags into one checked, ready-to-use server configuration: the TLS
// options Node's tls needs, the PSK identities, and the client-name allow-list.

import fs from 'node:fs';
import tls from 'node:tls';
import type { X509Certificate } from 'node:crypto';
import { DeltavolError } from '../util/errors.js';
import type { TlsMode } from '../nbd/negotiator.js';
import { pskFileBytesMax, pskKeyBytesMin } from '../util/limits.js';

/** What `deltavol serve` was told (paths as given). */
export interface TlsSettings {
  mode: TlsMode;
  certFile?: string;
  keyFile?: string;
  caFile?: string;
  /** Ask every client for a certificate signed by --tls-ca, and refuse those without one. */
  verifyPeer?: boolean;
  /** Allowed client names: a CN, or a whole subject DN in RFC 4514 order (has a '='). */
  authz?: string[];
  pskFile?: string;
}

export type TlsCredentials = 'x509' | 'psk';

export interface TlsServerConfig {
  mode: Exclude<TlsMode, 'off'>;
  credentials: TlsCredentials;
  verifyPeer: boolean;
  /** Empty: every client that passes the TLS handshake (and peer verification, if on). */
  authz: string[];
  /** Options for a Node tls server (one per upgrade; see tls-upgrade.ts). */
  options: tls.TlsOptions;
  pskIdentities: number;
  /** Things worth a log line (a key file others may read). */
  warnings: string[];
}

/** For status and daemon.json: the mode and how clients authenticate. */
export interface TlsSummary {
  mode: TlsMode;
  credentials: TlsCredentials | null;
  verifyPeer: boolean;
  authz: string[];
}

// GnuTLS clients (libnbd, qemu) with a PSK offer TLS 1.3 and, for TLS 1.2, the
// (EC)DHE-PSK suites. OpenSSL's PSK server callback (what Node uses) can serve TLS 1.3
// only with a SHA-256 suite, so those come first and the server's order wins; the TLS
// 1.2 suites are the ECDHE-PSK ones OpenSSL has (forward secrecy, no certificate).
const PSK_CIPHERS = [
  'TLS_AES_128_GCM_SHA256',
  'TLS_CHACHA20_POLY1305_SHA256',
  'ECDHE-PSK-CHACHA20-POLY1305',
  'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256',
].join(':');

function fail(message: string): never {
  throw new DeltavolError('TLS_CONFIG', message);
}

function readFile(file: string, flag: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (e) {
    return fail(`cannot read ${flag} ${file}: ${(e as Error).message}`);
  }
}

function othersCanRead(file: string): boolean {
  try {
    return (fs.statSync(file).mode & 0o044) !== 0;
  } catch {
    return false;
  }
}

/**
 * Parses a psktool file: one `identity:hexkey` per line (blank lines ignored). Throws
 * TLS_CONFIG naming the line for anything else, a repeated identity or a short key.
 */
export function parsePskFile(text: string, file = 'the PSK file'): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!;
    if (line.trim() === '') continue;
    const colon = line.lastIndexOf(':');
    const where = `${file} line ${i + 1}`;
    if (colon <= 0) fail(`${where}: expected IDENTITY:HEXKEY (the psktool format)`);
    const identity = line.slice(0, colon);
    const hex = line.slice(colon + 1).trim();
    if (!/^(?:[0-9a-fA-F]{2})+$/.test(hex)) fail(`${where}: the key of "${identity}" is not an even number of hex digits`);
    const key = Buffer.from(hex, 'hex');
    if (key.length < pskKeyBytesMin) fail(`${where}: the key of "${identity}" has ${key.length} bytes; at least ${pskKeyBytesMin} are needed (psktool makes 32)`);
    if (keys.has(identity)) fail(`${where}: identity "${identity}" appears twice`);
    keys.set(identity, key);
  }
  if (keys.size === 0) fail(`${file} holds no IDENTITY:HEXKEY line`);
  return keys;
}

/** Checks the settings and loads the files; null for --tls off. Throws TLS_CONFIG. */
export function loadTlsConfig(s: TlsSettings): TlsServerConfig | null {
  const authz = (s.authz ?? []).map((n) => n.trim()).filter((n) => n !== '');
  const given = [
    s.certFile && '--tls-cert',
    s.keyFile && '--tls-key',
    s.caFile && '--tls-ca',
    s.verifyPeer && '--tls-verify-peer',
    authz.length > 0 && '--tls-authz',
    s.pskFile && '--tls-psk',
  ].filter(Boolean);
  if (s.mode === 'off') {
    if (given.length > 0) fail(`${given.join(', ')} given but --tls is off: add --tls on or --tls require`);
    return null;
  }
  const x509 = Boolean(s.certFile || s.keyFile);
  if (x509 && s.pskFile) fail('give either --tls-cert/--tls-key (X.509) or --tls-psk, not both');
  if (!x509 && !s.pskFile) fail(`--tls ${s.mode} needs credentials: --tls-cert FILE --tls-key FILE, or --tls-psk FILE`);
  const warnings: string[] = [];
  const base: tls.TlsOptions = { minVersion: 'TLSv1.2' };

  if (s.pskFile) {
    if (s.caFile || s.verifyPeer || authz.length > 0) {
      fail('--tls-ca, --tls-verify-peer and --tls-authz are for X.509 client certificates; with --tls-psk the PSK file is the list of allowed identities');
    }
    const bytes = readFile(s.pskFile, '--tls-psk');
    if (bytes.length > pskFileBytesMax) fail(`--tls-psk ${s.pskFile} is larger than ${pskFileBytesMax} bytes`);
    const keys = parsePskFile(bytes.toString('utf8'), s.pskFile);
    if (othersCanRead(s.pskFile)) warnings.push(`--tls-psk ${s.pskFile} is readable by group or others (chmod 600 it)`);
    if (s.mode === 'on') warnings.push('--tls on: keys are checked only for clients that start TLS; plain clients are served without one (use --tls require)');
    return {
      mode: s.mode,
      credentials: 'psk',
      verifyPeer: false,
      authz: [],
      options: {
        ...base,
        ciphers: PSK_CIPHERS,
        honorCipherOrder: true,
        // An unknown identity gets null, so the client hears "unknown PSK identity" (a
        // clear error); identities are names, the keys are the secret.
        pskCallback: (_socket, identity) => keys.get(identity) ?? null,
      },
      pskIdentities: keys.size,
      warnings,
    };
  }

  if (!s.certFile) fail('--tls-key needs --tls-cert (the server certificate)');
  if (!s.keyFile) fail('--tls-cert needs --tls-key (the private key of the server certificate)');
  // Naming clients only means something if their certificates are checked.
  const verifyPeer = Boolean(s.verifyPeer) || authz.length > 0;
  if (verifyPeer && !s.caFile) fail(`${s.verifyPeer ? '--tls-verify-peer' : '--tls-authz'} needs --tls-ca FILE (the CA that signs client certificates)`);
  const cert = readFile(s.certFile, '--tls-cert');
  const key = readFile(s.keyFile, '--tls-key');
  const ca = s.caFile ? readFile(s.caFile, '--tls-ca') : undefined;
  if (othersCanRead(s.keyFile)) warnings.push(`--tls-key ${s.keyFile} is readable by group or others (chmod 600 it)`);
  if (verifyPeer && s.mode === 'on') warnings.push('--tls on: client certificates are checked only for clients that start TLS; plain clients skip the check (use --tls require)');
  const options: tls.TlsOptions = {
    ...base,
    cert,
    key,
    ...(ca ? { ca } : {}),
    // Verification is done after the handshake (tls-upgrade.ts) so a refusal is logged
    // with its reason; no NBD byte is exchanged before it.
    requestCert: verifyPeer,
    rejectUnauthorized: false,
  };
  try {
    tls.createSecureContext(options);
  } catch (e) {
    fail(`--tls-cert ${s.certFile} / --tls-key ${s.keyFile}${ca ? ` / --tls-ca ${s.caFile}` : ''}: ${(e as Error).message}`);
  }
  return { mode: s.mode, credentials: 'x509', verifyPeer, authz, options, pskIdentities: 0, warnings };
}

export function tlsSummary(mode: TlsMode, cfg: TlsServerConfig | null): TlsSummary {
  return { mode, credentials: cfg?.credentials ?? null, verifyPeer: cfg?.verifyPeer ?? false, authz: cfg?.authz ?? [] };
}

/**
 * A certificate subject in RFC 4514 order (most specific first, as GnuTLS and qemu's
 * authz print it): "CN=alice,O=Example,C=GB". Node lists the RDNs one a line in
 * certificate order with RFC 2253 escaping already applied.
 */
export function subjectDn(cert: X509Certificate): string {
  return cert.subject.split('\n').filter(Boolean).reverse().join(',');
}

/** The most specific CN of the subject, or null. */
export function subjectCn(cert: X509Certificate): string | null {
  const cns = cert.subject.split('\n').filter((l) => l.startsWith('CN='));
  return cns.length ? cns[cns.length - 1]!.slice(3) : null;
}

/**
 * The allow-list entry a client certificate matches, or null: an entry with '=' must
 * equal the whole subject DN (RFC 4514 order), any other entry the subject's CN.
 * Exact, case-sensitive comparisons: no wildcards, no prefixes.
 */
export function authorizedName(cert: X509Certificate, authz: readonly string[]): string | null {
  const dn = subjectDn(cert);
  const cn = subjectCn(cert);
  for (const name of authz) {
    if (name.includes('=') ? name === dn : name === cn) return name;
  }
  return null;
}

export { isLoopbackHost } from '../util/loopback.js';
