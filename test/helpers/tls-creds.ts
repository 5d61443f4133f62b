// Why: NBD TLS tests need credentials made the way operators make them (GnuTLS's
// certtool and psktool), laid out the way the clients look for them: libnbd's
// tls-certificates=DIR and qemu's tls-creds-x509 dir= read ca-cert.pem, client-cert.pem,
// client-key.pem; the server side uses server-cert.pem / server-key.pem (nbdkit's layout);
// qemu's tls-creds-psk dir= reads keys.psk. Everything goes into a fresh temp directory.

import fs from 'node:fs';
import path from 'node:path';
import { run } from './daemon.js';

export interface TlsCreds {
  root: string;
  /** ca-cert.pem, server-cert.pem, server-key.pem. */
  serverDir: string;
  /** Client directories by name; each has ca-cert.pem, client-cert.pem, client-key.pem. */
  clientDirs: Record<string, string>;
  /** A PSK file with identity "alice" and one with the same identity and another key (also keys.psk in pskDir / wrongPskDir, for qemu). */
  pskFile: string;
  wrongPskFile: string;
  pskDir: string;
  wrongPskDir: string;
}

function template(dir: string, name: string, lines: string[]): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, lines.join('\n') + '\n');
  return f;
}

function privkey(file: string): void {
  // ECDSA P-256: a few milliseconds, where RSA 3072 takes a second per key.
  run('certtool', ['--generate-privkey', '--key-type=ecdsa', '--outfile', file], { timeoutMs: 30_000 });
  fs.chmodSync(file, 0o600);
}

function ca(dir: string, cn: string): { cert: string; key: string } {
  const key = path.join(dir, `${cn}-key.pem`);
  const cert = path.join(dir, `${cn}-cert.pem`);
  privkey(key);
  const t = template(dir, `${cn}.info`, [`cn = ${cn}`, 'ca', 'cert_signing_key', 'expiration_days = 3']);
  run('certtool', ['--generate-self-signed', '--load-privkey', key, '--template', t, '--outfile', cert], { timeoutMs: 30_000 });
  return { cert, key };
}

function signed(dir: string, issuer: { cert: string; key: string }, certFile: string, keyFile: string, lines: string[]): void {
  privkey(keyFile);
  const t = template(dir, `${path.basename(certFile)}.info`, [...lines, 'expiration_days = 3']);
  run(
    'certtool',
    ['--generate-certificate', '--load-privkey', keyFile, '--load-ca-certificate', issuer.cert, '--load-ca-privkey', issuer.key, '--template', t, '--outfile', certFile],
    { timeoutMs: 30_000 },
  );
}

/** Makes a CA, a server certificate for localhost/127.0.0.1, client certificates, and PSK files. */
export function makeTlsCreds(root: string, clients: { name: string; cn: string; rogue?: boolean }[]): TlsCreds {
  const work = path.join(root, 'work');
  fs.mkdirSync(work, { recursive: true });
  const theCa = ca(work, 'deltavol-test-ca');
  const rogueCa = ca(work, 'rogue-ca');
  const serverDir = path.join(root, 'server');
  fs.mkdirSync(serverDir);
  fs.copyFileSync(theCa.cert, path.join(serverDir, 'ca-cert.pem'));
  signed(work, theCa, path.join(serverDir, 'server-cert.pem'), path.join(serverDir, 'server-key.pem'), [
    'organization = deltavol test',
    'cn = localhost',
    'dns_name = localhost',
    'ip_address = 127.0.0.1',
    'tls_www_server',
    'signing_key',
  ]);
  const clientDirs: Record<string, string> = {};
  for (const c of clients) {
    const dir = path.join(root, `client-${c.name}`);
    fs.mkdirSync(dir);
    // The CA the client trusts for the server is always the real one.
    fs.copyFileSync(theCa.cert, path.join(dir, 'ca-cert.pem'));
    signed(work, c.rogue ? rogueCa : theCa, path.join(dir, 'client-cert.pem'), path.join(dir, 'client-key.pem'), [
      'country = GB',
      'organization = deltavol test',
      `cn = ${c.cn}`,
      'tls_www_client',
      'signing_key',
    ]);
    clientDirs[c.name] = dir;
  }
  const pskDir = path.join(root, 'psk');
  const wrongPskDir = path.join(root, 'psk-wrong');
  for (const d of [pskDir, wrongPskDir]) {
    fs.mkdirSync(d, { mode: 0o700 });
    run('psktool', ['-u', 'alice', '-p', path.join(d, 'keys.psk')], { timeoutMs: 30_000 });
    fs.chmodSync(path.join(d, 'keys.psk'), 0o600);
  }
  return {
    root,
    serverDir,
    clientDirs,
    pskFile: path.join(pskDir, 'keys.psk'),
    wrongPskFile: path.join(wrongPskDir, 'keys.psk'),
    pskDir,
    wrongPskDir,
  };
}
