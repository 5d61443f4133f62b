// Why: the NBD TLS settings are where a typo becomes a hole or an outage: a PSK line
// misread, an allow-list entry that matches more than it says, a bind address taken for
// loopback when it is not. These check the parsing and matching rules on their own.
import fs from 'node:fs';
import path from 'node:path';
import { X509Certificate } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { authorizedName, isLoopbackHost, loadTlsConfig, parsePskFile, subjectCn, subjectDn } from '../../src/server/tls-config.js';
import { isDeltavolError } from '../../src/util/errors.js';
import { have } from '../helpers/daemon.js';
import { tempDir } from '../helpers/images.js';
import { makeTlsCreds } from '../helpers/tls-creds.js';

const KEY = 'ab'.repeat(32);
const dirs: string[] = [];
afterAll(() => dirs.forEach((d) => fs.rmSync(d, { recursive: true, force: true })));

function code(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    return isDeltavolError(e) ? `${e.code}: ${e.message}` : `other: ${(e as Error).message}`;
  }
  return 'no error';
}

describe('parsePskFile (psktool format)', () => {
  it('reads identity:hexkey lines, skipping blank ones; identities may contain colons', () => {
    const keys = parsePskFile(`alice:${KEY}\n\nbob:x:${'CD'.repeat(16)}\r\n`);
    expect([...keys.keys()]).toEqual(['alice', 'bob:x']);
    expect(keys.get('alice')!.toString('hex')).toBe(KEY);
    expect(keys.get('bob:x')!.length).toBe(16);
  });

  it.each([
    ['no colon', 'alice', /line 1: expected IDENTITY:HEXKEY/],
    ['empty identity', `:${KEY}`, /line 1: expected IDENTITY:HEXKEY/],
    ['odd hex', `alice:${KEY}a`, /not an even number of hex digits/],
    ['not hex', `alice:${'zz'.repeat(32)}`, /not an even number of hex digits/],
    ['short key', `alice:${'ab'.repeat(8)}`, /has 8 bytes; at least 16/],
    ['repeated identity', `alice:${KEY}\nalice:${KEY}`, /line 2: identity "alice" appears twice/],
    ['empty file', '\n\n', /holds no IDENTITY:HEXKEY line/],
  ])('refuses %s with TLS_CONFIG', (_what, text, message) => {
    const r = code(() => parsePskFile(text, 'keys.psk'));
    expect(r).toMatch(/^TLS_CONFIG: /);
    expect(r).toMatch(message);
  });
});

describe('loadTlsConfig', () => {
  it('off needs no files and refuses TLS flags', () => {
    expect(loadTlsConfig({ mode: 'off' })).toBeNull();
    expect(code(() => loadTlsConfig({ mode: 'off', authz: ['alice'] }))).toMatch(/TLS_CONFIG: --tls-authz given but --tls is off/);
  });

  it('a PSK config offers TLS 1.3 SHA-256 suites first and looks identities up', () => {
    const dir = tempDir('tls-config');
    dirs.push(dir);
    const f = path.join(dir, 'keys.psk');
    fs.writeFileSync(f, `alice:${KEY}\n`, { mode: 0o644 });
    const cfg = loadTlsConfig({ mode: 'require', pskFile: f })!;
    expect(cfg.credentials).toBe('psk');
    expect(String(cfg.options.ciphers).split(':')[0]).toBe('TLS_AES_128_GCM_SHA256');
    expect(cfg.options.minVersion).toBe('TLSv1.2');
    const cb = cfg.options.pskCallback!;
    expect(Buffer.from(cb(null as never, 'alice') as Uint8Array).toString('hex')).toBe(KEY);
    expect(cb(null as never, 'mallory')).toBeNull();
    expect(cfg.warnings.join()).toMatch(/readable by group or others/);
    expect(code(() => loadTlsConfig({ mode: 'on', pskFile: f, authz: ['alice'] }))).toMatch(/the PSK file is the list of allowed identities/);
  });
});

describe('isLoopbackHost', () => {
  it.each([
    ['127.0.0.1', true],
    ['127.1.2.3', true],
    ['localhost', true],
    ['::1', true],
    ['[::1]', true],
    ['0.0.0.0', false],
    ['::', false],
    ['10.0.0.1', false],
    ['127.0.0.1.example.com', false],
  ])('%s → %s', (host, want) => expect(isLoopbackHost(host)).toBe(want));
});

describe.skipIf(!have('certtool') || !have('psktool'))('--tls-authz matching (certtool certificates)', () => {
  let cert: X509Certificate;
  beforeAll(() => {
    const dir = tempDir('tls-authz');
    dirs.push(dir);
    const creds = makeTlsCreds(dir, [{ name: 'alice', cn: 'alice' }]);
    cert = new X509Certificate(fs.readFileSync(path.join(creds.clientDirs.alice!, 'client-cert.pem')));
  });

  it('renders the subject most specific first, as GnuTLS and qemu do', () => {
    expect(subjectDn(cert)).toBe('CN=alice,O=deltavol test,C=GB');
    expect(subjectCn(cert)).toBe('alice');
  });

  it('a name matches the CN exactly; an entry with "=" must equal the whole DN', () => {
    expect(authorizedName(cert, ['bob', 'alice'])).toBe('alice');
    expect(authorizedName(cert, ['CN=alice,O=deltavol test,C=GB'])).toBe('CN=alice,O=deltavol test,C=GB');
    for (const miss of ['ali', 'Alice', 'alice ', 'CN=alice', 'C=GB,O=deltavol test,CN=alice', 'deltavol test', '*']) {
      expect(authorizedName(cert, [miss]), miss).toBeNull();
    }
  });
});
