// Why: the pieces of control-API safety that need no daemon: what the CLI prints for a
// hostile string, which Host headers name a listener, and where the CLI looks for the token
// (and which places it refuses to trust).

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { escapeOutput, escapeText, table } from '../../src/cli/format.js';
import { hostMatcher } from '../../src/daemon/control-api.js';
import { isLoopbackHost as isLoopbackAddress } from '../../src/util/loopback.js';
import { findToken, generateToken, isWellFormedToken, loadOrCreateToken, tokensEqual } from '../../src/daemon/control-token.js';

const dirs: string[] = [];
const tmp = () => {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'dvctl-unit-'));
  dirs.push(d);
  return d;
};
afterAll(() => {
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

describe('CLI output escaping', () => {
  it('escapes C0, DEL, C1 and bidi controls; keeps printable text, Unicode and backslashes', () => {
    expect(escapeText('a\x1b[2Jb')).toBe('a\\x1b[2Jb');
    expect(escapeText('l1\nl2\r\t')).toBe('l1\\nl2\\r\\t');
    expect(escapeText('\x00\x07\x7f\x9b')).toBe('\\x00\\x07\\x7f\\x9b');
    expect(escapeText('x\u202ey\u2066z\u2028')).toBe('x\\u202ey\\u2066z\\u2028');
    expect(escapeText('café ☕ C:\\dir')).toBe('café ☕ C:\\dir');
    expect(escapeOutput('row1\nrow2\x1b[H')).toBe('row1\nrow2\\x1b[H');
  });

  it('a table cell cannot add lines or escape sequences', () => {
    const t = table(['NAME', 'DESCRIPTION'], [['v', 'x\n\x1b[31mforged']]);
    expect(t.split('\n')).toHaveLength(2);
    expect(t).not.toContain('\x1b');
    expect(t).toContain('x\\n\\x1b[31mforged');
  });
});

describe('Host header matching', () => {
  it('loopback listener: its address and the loopback names with the port, nothing else', () => {
    const ok = hostMatcher('127.0.0.1', 10810);
    for (const h of ['127.0.0.1:10810', 'localhost:10810', 'LocalHost:10810', '[::1]:10810']) expect(ok(h), h).toBe(true);
    for (const h of [undefined, '', '127.0.0.1', '127.0.0.1:10811', 'evil.example:10810', '10.0.0.1:10810', os.hostname() + ':10810', 'localhost.evil:10810']) expect(ok(h), String(h)).toBe(false);
  });

  it('wildcard listener: any IP literal (any port), loopback names and the host name with the port; never another name', () => {
    const ok = hostMatcher('0.0.0.0', 10810);
    for (const h of ['10.1.2.3:20810', '[fe80::1]:10810', 'localhost:10810', `${os.hostname()}:10810`]) expect(ok(h), h).toBe(true);
    for (const h of ['evil.example:10810', '10.1.2.3', '999.1.1.1:10810', 'localhost:1', '1.2.3.4:0']) expect(ok(h), h).toBe(false);
    expect(isLoopbackAddress('127.0.0.5')).toBe(true);
    expect(isLoopbackAddress('::1')).toBe(true);
    expect(isLoopbackAddress('0.0.0.0')).toBe(false);
    expect(isLoopbackAddress('::')).toBe(false);
  });
});

describe('control token', () => {
  it('is 32 random bytes in base64url, compared whole', () => {
    const a = generateToken();
    expect(isWellFormedToken(a)).toBe(true);
    expect(Buffer.from(a, 'base64url')).toHaveLength(32);
    expect(generateToken()).not.toBe(a);
    expect(tokensEqual(a, a)).toBe(true);
    expect(tokensEqual(a, a.slice(0, -1))).toBe(false);
    expect(tokensEqual('', a)).toBe(false);
    expect(isWellFormedToken('short')).toBe(false);
  });

  it('is made once with mode 0600, reused, and a readable-by-others file is tightened', () => {
    const dir = tmp();
    const warnings: string[] = [];
    const t = loadOrCreateToken(dir, (m) => warnings.push(m));
    expect(fs.statSync(path.join(dir, 'control.token')).mode & 0o777).toBe(0o600);
    expect(loadOrCreateToken(dir, (m) => warnings.push(m))).toBe(t);
    expect(warnings).toEqual([]);
    fs.chmodSync(path.join(dir, 'control.token'), 0o644);
    expect(loadOrCreateToken(dir, (m) => warnings.push(m))).toBe(t);
    expect(fs.statSync(path.join(dir, 'control.token')).mode & 0o777).toBe(0o600);
    expect(warnings).toHaveLength(1);
    fs.writeFileSync(path.join(dir, 'control.token'), 'garbage\n');
    expect(() => loadOrCreateToken(dir, () => {})).toThrow(/does not hold a valid token/);
  });

  it('the CLI search: explicit sources first, then --data-dir, then the runtime copy; DELTAVOL_TOKEN must look like a token', () => {
    const dir = tmp();
    const t = loadOrCreateToken(dir, () => {});
    const other = tmp();
    const t2 = loadOrCreateToken(other, () => {});
    const none = { XDG_RUNTIME_DIR: '/nonexistent', TMPDIR: '/nonexistent' } as NodeJS.ProcessEnv;
    expect(findToken({ tokenFile: path.join(other, 'control.token'), dataDir: dir, port: 1, env: { ...none, DELTAVOL_TOKEN: t } }).token).toBe(t2);
    expect(findToken({ dataDir: dir, port: 1, env: { ...none, DELTAVOL_TOKEN: t2 } }).token).toBe(t2);
    expect(findToken({ dataDir: dir, port: 1, env: { ...none, DELTAVOL_TOKEN_FILE: path.join(other, 'control.token') } }).token).toBe(t2);
    expect(findToken({ dataDir: dir, port: 1, env: none }).token).toBe(t);
    expect(() => findToken({ port: 1, env: { DELTAVOL_TOKEN: 'x' } })).toThrow(/DELTAVOL_TOKEN/);
    expect(() => findToken({ tokenFile: path.join(dir, 'missing'), port: 1, env: none })).toThrow(/ENOENT/);
  });
});
