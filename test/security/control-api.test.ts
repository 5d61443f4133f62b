// Why: the control API can delete volumes, roll them back and copy them out. Each attack of
// issue 10 against it is kept here as a test that failed on the old code: a web page's
// cross-site request (text/plain, Origin), a DNS-rebinding request (foreign Host), a request
// without the owner's token, a local user who is not the owner, malformed requests that
// answered 500, a control API on a non-loopback address without a warning, and a
// description whose escape sequences reached the terminal of whoever ran `volume list`.

import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, have, run, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { prng, testSeed } from '../helpers/seed.js';

const MiB = 1024 * 1024;
let d: TestDaemon;

interface Answer {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
  json: { error?: { code?: string; message?: string; details?: Record<string, unknown> } } & Record<string, unknown>;
}

/** A raw request (node:http, so Host and every header are ours to forge); body chunks are sent as given. */
function raw(port: number, method: string, urlPath: string, opts: { headers?: Record<string, string>; body?: string | Buffer | Buffer[] } = {}): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: urlPath, headers: opts.headers ?? {}, timeout: 20_000, agent: false }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (text += c));
      res.on('end', () => {
        let json = {};
        try {
          json = JSON.parse(text);
        } catch {
          // not JSON (metrics)
        }
        resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json });
      });
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${urlPath}: no answer`)));
    // A server that refuses before reading the body may close while we still send it.
    req.on('error', reject);
    const body = opts.body;
    if (Array.isArray(body)) {
      for (const b of body) req.write(b);
      req.end();
    } else req.end(body);
  });
}

const auth = () => ({ authorization: `Bearer ${d.token}` });
const volumeNames = async () => (await d.api<{ volumes: { name: string }[] }>('GET', '/v1/volumes')).volumes.map((v) => v.name).sort();
const replicationOf = async (v: string) => (await d.api<{ volumes: { role: string; replicas?: unknown[] }[] }>('GET', `/v1/replication?volume=${v}`)).volumes[0]!;

function cliAs(args: string[], env: Record<string, string> = {}) {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 30_000, env: { ...process.env, ...env } });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

beforeAll(async () => {
  d = await startDaemon({
    volumes: [
      { name: 'victim', size: '4M' },
      { name: 'target', size: '4M' },
    ],
  });
  expect(d.cli(['snapshot', 'create', 'victim', 's1']).status).toBe(0);
});

/** Data directories a restarted daemon took over from the helper that made them. */
const leftDirs: string[] = [];

afterAll(async () => {
  await d?.dispose();
  for (const dir of leftDirs) fs.rmSync(dir, { recursive: true, force: true });
});

describe('control API: the owner\'s token', () => {
  it('is made at first start: 32+ random bytes, base64url, in a 0600 file of the data directory, and a 0600 per-port copy in a 0700 runtime directory', () => {
    const file = path.join(d.dataDir, 'control.token');
    const st = fs.statSync(file);
    expect(st.mode & 0o777).toBe(0o600);
    expect(d.token).toMatch(/^[A-Za-z0-9_-]{43,}$/);
    expect(Buffer.from(d.token, 'base64url').length).toBeGreaterThanOrEqual(32);
    const info = JSON.parse(fs.readFileSync(path.join(d.dataDir, 'daemon.json'), 'utf8')) as { controlTokenFile: string; controlRuntimeTokenFile: string | null };
    expect(info.controlTokenFile).toBe(file);
    expect(info.controlRuntimeTokenFile).not.toBeNull();
    const copy = info.controlRuntimeTokenFile!;
    expect(path.basename(copy)).toBe(`control-${d.controlPort}.token`);
    expect(fs.statSync(copy).mode & 0o777).toBe(0o600);
    expect(fs.statSync(path.dirname(copy)).mode & 0o777).toBe(0o700);
    expect(fs.statSync(path.dirname(copy)).uid).toBe(process.getuid!());
    expect(fs.readFileSync(copy, 'utf8').trim()).toBe(d.token);
  });

  it('no token, a wrong token, or another scheme: 401 UNAUTHORIZED on every method and route, /metrics included, and nothing changes', async () => {
    const wrong = Buffer.from(d.token, 'base64url');
    wrong[0] = wrong[0]! ^ 1;
    const variants: Record<string, string>[] = [
      {},
      { authorization: `Bearer ${wrong.toString('base64url')}` },
      { authorization: `Bearer ${d.token}x` },
      { authorization: `Basic ${Buffer.from(`root:${d.token}`).toString('base64')}` },
      { authorization: 'Bearer' },
    ];
    const json = { 'content-type': 'application/json' };
    const requests: [string, string, Record<string, string>, string | undefined][] = [
      ['GET', '/v1/status', {}, undefined],
      ['GET', '/v1/volumes', {}, undefined],
      ['GET', '/v1/volumes/victim', {}, undefined],
      ['GET', '/metrics', {}, undefined],
      ['GET', '/v1/volumes/victim/differential?from=s1&to=s1', {}, undefined],
      ['POST', '/v1/volumes', json, JSON.stringify({ name: 'planted', sizeBytes: MiB })],
      ['PATCH', '/v1/volumes/victim', json, JSON.stringify({ readOnly: true })],
      ['DELETE', '/v1/volumes/victim?force=1', {}, undefined],
      ['POST', '/v1/volumes/victim/snapshots/s1/restore?force=1', {}, undefined],
      ['POST', '/v1/volumes/victim/replicas', json, JSON.stringify({ peer: '127.0.0.1:9' })],
      ['PUT', '/v1/volumes/victim', {}, undefined],
    ];
    for (const [method, urlPath, headers, body] of requests) {
      for (const v of variants) {
        const r = await raw(d.controlPort, method, urlPath, { headers: { ...headers, ...v }, body });
        expect.soft(r.status, `${method} ${urlPath} with ${JSON.stringify(v)}`).toBe(401);
        expect.soft(r.json.error?.code).toBe('UNAUTHORIZED');
        expect.soft(r.headers['www-authenticate']).toBe('Bearer');
        // The refusal tells nothing about volumes, routes or the token.
        expect.soft(r.text).not.toMatch(/victim|planted|route|token file|control\.token/);
      }
    }
    expect(await volumeNames()).toEqual(['target', 'victim']);
    expect((await d.api<{ readOnly: boolean }>('GET', '/v1/volumes/victim')).readOnly).toBe(false);
    expect((await replicationOf('victim')).role).toBe('simplex');
  });

  it('the right token is accepted, /metrics included; refusals are counted there and logged at most once a second', async () => {
    expect((await raw(d.controlPort, 'GET', '/v1/volumes', { headers: auth() })).status).toBe(200);
    const m = await raw(d.controlPort, 'GET', '/metrics', { headers: auth() });
    expect(m.status).toBe(200);
    const refused = Number(/^deltavol_control_refused_requests_total (\d+)$/m.exec(m.text)?.[1]);
    expect(refused).toBeGreaterThanOrEqual(55); // the 11 × 5 refusals of the test before
    await new Promise((r) => setTimeout(r, 300)); // pino writes asynchronously
    const logged = d.log().split('\n').filter((l) => l.includes('"msg":"control request refused"')).length;
    expect(logged).toBeGreaterThanOrEqual(1);
    expect(logged).toBeLessThan(refused); // 55 refusals in well under 55 s
  });
});

describe('control API: requests a web page can make', () => {
  // What a page can send to 127.0.0.1 without a CORS preflight: a "simple" POST, text/plain.
  const crossSite = (extra: Record<string, string> = {}) => ({ 'content-type': 'text/plain;charset=UTF-8', origin: 'http://attacker.example', ...extra });

  it('cross-site POSTs (text/plain, foreign Origin) are refused with 403, token or not, and nothing changes', async () => {
    const attacks: [string, string | undefined][] = [
      ['/v1/volumes/victim/replicas', JSON.stringify({ peer: '127.0.0.1:9', as: 'stolen' })],
      ['/v1/volumes/victim/differential', 'DVDIFF'.padEnd(154, '\0')],
      ['/v1/volumes/victim/snapshots/s1/restore?force=1', undefined],
      ['/v1/volumes', JSON.stringify({ name: 'planted', sizeBytes: MiB })],
    ];
    for (const [urlPath, body] of attacks) {
      for (const withToken of [false, true]) {
        const r = await raw(d.controlPort, 'POST', urlPath, { headers: crossSite(withToken ? auth() : {}), body });
        expect.soft(r.status, `POST ${urlPath} token=${withToken}`).toBe(403);
        expect.soft(r.json.error?.code).toBe('FORBIDDEN');
      }
    }
    // Same-origin fetch metadata without an Origin header (some browsers' GETs) is refused too.
    const meta = await raw(d.controlPort, 'GET', '/v1/volumes', { headers: { ...auth(), 'sec-fetch-site': 'cross-site' } });
    expect(meta.status).toBe(403);
    expect(await volumeNames()).toEqual(['target', 'victim']);
    expect((await replicationOf('victim')).role).toBe('simplex');
  });

  it('a text/plain body is refused with 415 even with the token and no Origin (JSON routes take application/json only)', async () => {
    const r = await raw(d.controlPort, 'POST', '/v1/volumes', { headers: { ...auth(), 'content-type': 'text/plain' }, body: JSON.stringify({ name: 'planted', sizeBytes: MiB }) });
    expect(r.status).toBe(415);
    expect(r.json.error?.code).toBe('UNSUPPORTED_MEDIA_TYPE');
    const octet = await raw(d.controlPort, 'POST', '/v1/volumes', { headers: { ...auth(), 'content-type': 'application/octet-stream' }, body: JSON.stringify({ name: 'planted', sizeBytes: MiB }) });
    expect(octet.status).toBe(415);
    const noType = await raw(d.controlPort, 'POST', '/v1/volumes', { headers: auth(), body: JSON.stringify({ name: 'planted', sizeBytes: MiB }) });
    expect(noType.status).toBe(415);
    // The binary upload takes application/octet-stream only.
    const jsonDiff = await raw(d.controlPort, 'POST', '/v1/volumes/target/differential', { headers: { ...auth(), 'content-type': 'application/json' }, body: '{}' });
    expect(jsonDiff.status).toBe(415);
    expect(await volumeNames()).toEqual(['target', 'victim']);
  });

  it('a DNS-rebinding DELETE (Host: a name the attacker controls) is refused, token or not; the volume stays', async () => {
    for (const host of [`rebind.attacker.example:${d.controlPort}`, 'rebind.attacker.example', `127.0.0.1.nip.io:${d.controlPort}`, `127.0.0.1:${d.controlPort + 1 > 65535 ? 1 : d.controlPort + 1}`]) {
      for (const withToken of [false, true]) {
        const r = await raw(d.controlPort, 'DELETE', '/v1/volumes/victim?force=1', { headers: { host, ...(withToken ? auth() : {}) } });
        expect.soft(r.status, `Host ${host} token=${withToken}`).toBe(403);
        expect.soft(r.json.error?.code).toBe('FORBIDDEN');
      }
    }
    expect(await volumeNames()).toEqual(['target', 'victim']);
    // The names of this listener are accepted.
    for (const host of [`127.0.0.1:${d.controlPort}`, `localhost:${d.controlPort}`, `LOCALHOST:${d.controlPort}`, `[::1]:${d.controlPort}`]) {
      expect((await raw(d.controlPort, 'GET', '/v1/volumes', { headers: { host, ...auth() } })).status, host).toBe(200);
    }
  });
});

describe('control API: a local user who is not the owner', () => {
  const asNobody = (cmd: string, args: string[]) =>
    run('setpriv', ['--reuid=nobody', '--regid=nogroup', '--clear-groups', '--', cmd, ...args], { allowFail: true, timeoutMs: 30_000 });

  it.runIf(have('setpriv') && process.getuid?.() === 0)('cannot read the token (data directory or runtime copy), is refused by the API and the CLI, and the volume stays', async () => {
    const info = JSON.parse(fs.readFileSync(path.join(d.dataDir, 'daemon.json'), 'utf8')) as { controlRuntimeTokenFile: string };
    for (const file of [path.join(d.dataDir, 'control.token'), info.controlRuntimeTokenFile]) {
      const r = asNobody('cat', [file]);
      expect(r.status, file).not.toBe(0);
      expect(r.stderr).toMatch(/Permission denied/);
      expect(r.stdout).not.toContain(d.token);
    }
    // Straight at the API, as the issue's attacker did.
    const script = `fetch('http://127.0.0.1:${d.controlPort}/v1/volumes/victim?force=1', { method: 'DELETE' }).then(async (r) => console.log(r.status, await r.text()))`;
    const api = asNobody(process.execPath, ['-e', script]);
    expect(api.stdout).toMatch(/^401 .*UNAUTHORIZED/);
    // Through the CLI: exit 7 and a message that says how to fix it.
    const cli = asNobody(process.execPath, [CLI, '--control', `127.0.0.1:${d.controlPort}`, 'volume', 'delete', 'victim', '--force']);
    expect(cli.status).toBe(7);
    expect(cli.stderr).toMatch(/needs its control token/);
    expect(cli.stderr).toMatch(/--data-dir DIR/);
    expect(cli.stderr).toMatch(/--token-file/);
    const explicit = asNobody(process.execPath, [CLI, '--control', `127.0.0.1:${d.controlPort}`, '--data-dir', d.dataDir, 'volume', 'delete', 'victim', '--force']);
    expect(explicit.status).toBe(7);
    expect(await volumeNames()).toEqual(['target', 'victim']);
  });
});

describe('control API: how the CLI finds the token', () => {
  it('from the runtime copy (--control only), --data-dir, --token-file, DELTAVOL_TOKEN_FILE and DELTAVOL_TOKEN', () => {
    const ctl = ['--control', `127.0.0.1:${d.controlPort}`];
    expect(cliAs([...ctl, 'volume', 'list']).status).toBe(0);
    expect(cliAs(['--data-dir', d.dataDir, 'volume', 'list']).status).toBe(0);
    const tokenFile = path.join(d.dataDir, 'control.token');
    // An empty runtime directory: only the explicit sources can help.
    const elsewhere = { XDG_RUNTIME_DIR: '/nonexistent' };
    expect(cliAs([...ctl, '--token-file', tokenFile, 'volume', 'list']).status).toBe(0);
    expect(cliAs([...ctl, 'volume', 'list'], { DELTAVOL_TOKEN_FILE: tokenFile, ...elsewhere }).status).toBe(0);
    expect(cliAs([...ctl, 'volume', 'list'], { DELTAVOL_TOKEN: d.token }).status).toBe(0);
  });

  it('a wrong token is refused with exit 7 and a hint; an unreadable --token-file is named', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dvctl-token-'));
    try {
      const other = path.join(dir, 'other.token');
      fs.writeFileSync(other, Buffer.alloc(32, 7).toString('base64url') + '\n', { mode: 0o600 });
      const r = cliAs(['--control', `127.0.0.1:${d.controlPort}`, '--token-file', other, 'volume', 'list']);
      expect(r.status).toBe(7);
      expect(r.stderr).toContain(`refused the control token from ${other}`);
      expect(r.stderr).toMatch(/--data-dir DIR/);
      const missing = cliAs(['--control', `127.0.0.1:${d.controlPort}`, '--token-file', path.join(dir, 'missing'), 'volume', 'list']);
      expect(missing.status).toBe(7);
      expect(missing.stderr).toMatch(/cannot use the control token in .*missing.*ENOENT/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('control API: malformed requests get a coded 4xx, never a 500', () => {
  const json = (body: string | Buffer | Buffer[], extra: Record<string, string> = {}) => ({ headers: { ...auth(), 'content-type': 'application/json', ...extra }, body });

  it('bodies that are not JSON objects, fields of the wrong type, bad paths, sizes past what the file system allows', async () => {
    const cases: [string, string, ReturnType<typeof json> | { headers: Record<string, string> }, string][] = [
      ['POST', '/v1/volumes', json('null'), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json('[]'), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json('"victim"'), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json('42'), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json('{"name":'), 'EINVAL_ARGUMENT'],
      ['PATCH', '/v1/volumes/victim', json('null'), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes/victim/snapshots', json('null'), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes/victim/replicas', json('null'), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes/victim/replicas/suspend', json('true'), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes/victim/failover', json('null'), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes/victim/resync', json('[1]'), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/default-export', json('null'), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json(JSON.stringify({ name: 'x', sizeBytes: '1M' })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json(JSON.stringify({ name: 'x', sizeBytes: 1.5 })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json(JSON.stringify({ name: 'x', sizeBytes: -512 })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json('{"name":"x","sizeBytes":1e400}'), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json(JSON.stringify({ name: 'x', sizeBytes: 2 ** 53 })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json(JSON.stringify({ name: 5, sizeBytes: MiB })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json(JSON.stringify({ name: ['x'], sizeBytes: MiB })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json(JSON.stringify({ name: 'x', sizeBytes: MiB, readOnly: 'yes' })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json(JSON.stringify({ name: 'x', sizeBytes: MiB, description: { a: 1 } })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json(JSON.stringify({ name: 'x', sizeBytes: MiB, trackingBlockBytes: null })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json(JSON.stringify({ name: 'x', sizeBytes: MiB, description: 'd'.repeat(5000) })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes', json(JSON.stringify({ name: '../../etc', sizeBytes: MiB })), 'BAD_NAME'],
      ['PATCH', '/v1/volumes/victim', json(JSON.stringify({ sizeBytes: 'big' })), 'EINVAL_ARGUMENT'],
      ['PATCH', '/v1/volumes/victim', json(JSON.stringify({ readOnly: 0 })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes/victim/replicas', json(JSON.stringify({ peer: 5 })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes/victim/replicas', json(JSON.stringify({ peer: 'nowhere' })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes/victim/replicas', json(JSON.stringify({ peer: '127.0.0.1:9', cutIntervalMs: 2 ** 40 })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes/victim/replicas', json(JSON.stringify({ peer: '127.0.0.1:9', retries: 'many' })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes/victim/failover', json(JSON.stringify({ force: 'yes' })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes/victim/snapshots', json(JSON.stringify({ name: 7 })), 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes/victim/cut', json(JSON.stringify({ snapshot: false })), 'EINVAL_ARGUMENT'],
      ['GET', '/v1/volumes/%ZZ', { headers: auth() }, 'EINVAL_ARGUMENT'],
      ['DELETE', '/v1/volumes/%E0%A4%A', { headers: auth() }, 'EINVAL_ARGUMENT'],
      ['GET', '/v1/volumes/victim/snapshots/%', { headers: auth() }, 'NOT_FOUND'],
      ['DELETE', '/v1/volumes/victim/snapshots/%ZZ', { headers: auth() }, 'EINVAL_ARGUMENT'],
      ['GET', '/v1/volumes/victim/differential', { headers: auth() }, 'EINVAL_ARGUMENT'],
      ['POST', '/v1/volumes/target/differential', { headers: { ...auth(), 'content-type': 'application/octet-stream' }, body: Buffer.alloc(64, 0xff) } as ReturnType<typeof json>, 'BAD_STREAM'],
    ];
    for (const [method, urlPath, opts, code] of cases) {
      const r = await raw(d.controlPort, method, urlPath, opts);
      const what = `${method} ${urlPath} ${'body' in opts ? String(opts.body).slice(0, 60) : ''}`;
      expect.soft(r.status, `${what}: ${r.text}`).toBeGreaterThanOrEqual(400);
      expect.soft(r.status, `${what}: ${r.text}`).toBeLessThan(500);
      expect.soft(r.json.error?.code, what).toBe(code);
    }
    expect(await volumeNames()).toEqual(['target', 'victim']);
  });

  it('a size of 2^53-512 (a safe integer the file system cannot hold) is 400 BAD_SIZE with the limit; growing to it too', async () => {
    const size = 2 ** 53 - 512;
    const created = await raw(d.controlPort, 'POST', '/v1/volumes', json(JSON.stringify({ name: 'huge', sizeBytes: size })));
    expect(created.status, created.text).toBe(400);
    expect(created.json.error?.code).toBe('BAD_SIZE');
    const max = created.json.error?.details?.sizeBytesMax as number;
    expect(Number.isSafeInteger(max) && max > 0 && max < size).toBe(true);
    expect(created.json.error?.message).toContain(String(max));
    const grown = await raw(d.controlPort, 'PATCH', '/v1/volumes/target', json(JSON.stringify({ sizeBytes: size })));
    expect(grown.status, grown.text).toBe(400);
    expect(grown.json.error?.code).toBe('BAD_SIZE');
    expect(await volumeNames()).toEqual(['target', 'victim']);
    expect((await d.api<{ sizeBytes: number }>('GET', '/v1/volumes/target')).sizeBytes).toBe(4 * MiB);
    expect(fs.readdirSync(path.join(d.dataDir, 'volumes')).filter((n) => n.includes('huge'))).toEqual([]);
  });

  it('a body over 1 MiB is 413 BODY_TOO_LARGE, announced (Content-Length) or streamed (chunked); the daemon goes on', async () => {
    const big = JSON.stringify({ name: 'x', sizeBytes: MiB, description: 'a'.repeat(2 * MiB) });
    // The server may answer 413 and close before our 2 MiB are written (EPIPE on a loaded machine).
    const announced = await raw(d.controlPort, 'POST', '/v1/volumes', json(big)).catch((e: Error) => e);
    if (!(announced instanceof Error)) {
      expect(announced.status).toBe(413);
      expect(announced.json.error?.code).toBe('BODY_TOO_LARGE');
    } else expect(announced.message).toMatch(/EPIPE|ECONNRESET|socket hang up/);
    const chunks = Array.from({ length: 24 }, () => Buffer.alloc(128 * 1024, 0x20));
    chunks.unshift(Buffer.from('{"name":"x","sizeBytes":1048576,"pad":"'));
    const streamed = await raw(d.controlPort, 'POST', '/v1/volumes', json(chunks)).catch((e: Error) => e);
    // The server answers 413 once past the limit and closes; the rest of our write may meet a reset.
    if (!(streamed instanceof Error)) {
      expect(streamed.status).toBe(413);
      expect(streamed.json.error?.code).toBe('BODY_TOO_LARGE');
    } else expect(streamed.message).toMatch(/EPIPE|ECONNRESET|socket hang up/);
    expect(await volumeNames()).toEqual(['target', 'victim']);
  });
});

describe('control API: random bodies (seeded)', () => {
  it('fields of every type on every JSON route never get a 500 (INTERNAL)', async () => {
    const rnd = prng(testSeed('control-api random bodies'));
    const pick = <T>(a: readonly T[]): T => a[Math.floor(rnd() * a.length)]!;
    const values: unknown[] = [null, true, false, 0, -1, 1.5, 2 ** 53, 2 ** 53 - 512, 1e308, 4096, MiB, '', 'x', 'victim', 's1', '127.0.0.1:9', '::', '[::1]:0', '%ZZ', 'a'.repeat(300), [], {}, [1], { a: 1 }, '\u0000', '../x'];
    const fields = ['name', 'sizeBytes', 'readOnly', 'description', 'trackingBlockBytes', 'snapshotSpaceBytes', 'peer', 'as', 'cutIntervalMs', 'highWaterBytes', 'retries', 'pair', 'snapshot', 'now', 'force', 'sync', 'peerVolume', '__proto__', 'constructor'];
    // Routes that cannot destroy the volumes the other tests use (no DELETE of them, no restore).
    const routes: [string, string][] = [
      ['POST', '/v1/volumes'],
      ['PATCH', '/v1/volumes/target'],
      ['POST', '/v1/volumes/target/snapshots'],
      ['POST', '/v1/volumes/target/replicas'],
      ['POST', '/v1/volumes/target/replicas/suspend'],
      ['POST', '/v1/volumes/target/replicas/resume'],
      ['POST', '/v1/volumes/target/cut'],
      ['POST', '/v1/volumes/target/failover'],
      ['POST', '/v1/volumes/target/resync'],
      ['POST', '/v1/volumes/target/unfence'],
      ['POST', '/v1/default-export'],
      ['POST', '/v1/volumes/target/failback'],
    ];
    const internal: string[] = [];
    const started = Date.now();
    for (let i = 0; i < 300 && Date.now() - started < 30_000; i++) {
      const [method, urlPath] = pick(routes);
      const body: Record<string, unknown> = {};
      for (let k = Math.floor(rnd() * 4); k > 0; k--) body[pick(fields)] = pick(values);
      const text = rnd() < 0.1 ? JSON.stringify(pick(values)) : JSON.stringify(body);
      const r = await raw(d.controlPort, method, urlPath, json2Raw(text));
      // 502 PEER_UNREACHABLE (a random peer) is an answer about the world; 500 is a bug.
      if (r.status === 500 || r.json.error?.code === 'INTERNAL') internal.push(`${r.status} ${method} ${urlPath} ${text} → ${r.text}`);
    }
    expect(internal).toEqual([]);
    // Whatever the random requests created, the volumes of the other tests are there.
    expect(await volumeNames()).toEqual(expect.arrayContaining(['target', 'victim']));
    for (const name of await volumeNames()) if (name !== 'target' && name !== 'victim') await d.api('DELETE', `/v1/volumes/${name}?force=1`);
    await d.api('POST', '/v1/default-export', { name: '' });
  });
});

function json2Raw(text: string) {
  return { headers: { ...auth(), 'content-type': 'application/json' }, body: text };
}

describe('control API: names and descriptions on a terminal', () => {
  const ESC = '\x1b';

  it('a new description with control characters is refused (API 400, CLI exit 2)', async () => {
    const r = await raw(d.controlPort, 'POST', '/v1/volumes', json2({ name: 'esc', sizeBytes: MiB, description: `x${ESC}[2J${ESC}[Hy` }));
    expect(r.status).toBe(400);
    expect(r.json.error?.code).toBe('EINVAL_ARGUMENT');
    const set = d.cli(['volume', 'set', 'victim', '--description', `line1\nline2`]);
    expect(set.status).toBe(2);
    expect(set.stderr).toMatch(/control characters/);
    expect(await volumeNames()).toEqual(['target', 'victim']);
  });

  it('a stored description with escape sequences (made before the check) is printed escaped by volume list and volume info; the token survives the restart', async () => {
    const token = d.token;
    const port = d.controlPort;
    await d.stop();
    const metaFile = path.join(d.dataDir, 'volumes', 'victim', 'volume.json');
    const meta = JSON.parse(fs.readFileSync(metaFile, 'utf8')) as { description: string };
    meta.description = `clear${ESC}[2J${ESC}[Hscreen\nforged line\u202eevil\u0007`;
    fs.writeFileSync(metaFile, JSON.stringify(meta, null, 2) + '\n', { mode: 0o600 });
    const old = d;
    d = await startDaemon({ dataDir: d.dataDir });
    // The first helper owned the directory; the restarted one does not: remove it at the end.
    fs.rmSync(old.logFile, { force: true });
    leftDirs.push(d.dataDir);
    expect(d.token).toBe(token);
    // The old port's copy went away with the old daemon (a clean stop).
    if (d.controlPort !== port) expect(fs.existsSync(path.join(path.dirname(JSON.parse(fs.readFileSync(path.join(d.dataDir, 'daemon.json'), 'utf8')).controlRuntimeTokenFile), `control-${port}.token`))).toBe(false);

    for (const args of [['volume', 'list'], ['volume', 'info', 'victim'], ['status']]) {
      const r = d.cli(args);
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout, args.join(' ')).not.toContain(ESC);
      expect(r.stdout).not.toContain('\u0007');
      expect(r.stdout).not.toContain('\u202e');
      expect(r.stdout).not.toMatch(/^forged line/m);
      if (args[0] === 'volume') {
        expect(r.stdout).toContain('clear\\x1b[2J\\x1b[Hscreen\\nforged line\\u202eevil\\x07');
      }
    }
    // --json stays exact JSON (its escapes are JSON's).
    const j = d.cli(['volume', 'info', 'victim', '--json']);
    expect(j.stdout).not.toContain(ESC);
    expect((JSON.parse(j.stdout) as { description: string }).description).toBe(meta.description);
  });
});

function json2(body: unknown) {
  return { headers: { ...auth(), 'content-type': 'application/json' }, body: JSON.stringify(body) };
}

describe('control API bound to a non-loopback address', () => {
  const ns = `dvctl-bind-${process.pid}`;
  const canNetns = have('ip') && process.getuid?.() === 0;

  it.runIf(canNetns)('prints a warning (log and stderr) at start, still wants the token, and refuses foreign Host names', async () => {
    // In a namespace of its own with only loopback up: 0.0.0.0 there reaches nobody else.
    run('ip', ['netns', 'add', ns]);
    const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'dvctl-bind-'));
    const logFile = path.join(os.tmpdir(), `dvctl-bind-${process.pid}.log`);
    const out = fs.openSync(logFile, 'w');
    const proc = spawn('ip', ['netns', 'exec', ns, process.execPath, CLI, 'serve', '--data-dir', dataDir, '--port', '0', '--repl-port', '0', '--control-port', '0', '--control-bind', '0.0.0.0'], { stdio: ['ignore', out, out] });
    fs.closeSync(out);
    try {
      run('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
      const infoPath = path.join(dataDir, 'daemon.json');
      const deadline = Date.now() + 15_000;
      while (!fs.existsSync(infoPath)) {
        if (Date.now() > deadline || proc.exitCode !== null) throw new Error(`daemon did not start:\n${fs.readFileSync(logFile, 'utf8')}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      const info = JSON.parse(fs.readFileSync(infoPath, 'utf8')) as { controlHost: string; controlPort: number };
      expect(info.controlHost).toBe('0.0.0.0');
      // pino's warn (level 40; pino writes asynchronously) and the plain stderr line.
      const warned = /"level":40[^\n]*WARNING: the control API listens on 0\.0\.0\.0/;
      const until = Date.now() + 5000;
      while (!warned.test(fs.readFileSync(logFile, 'utf8')) && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
      const log = fs.readFileSync(logFile, 'utf8');
      expect(log).toMatch(/"level":40[^\n]*WARNING: the control API listens on 0\.0\.0\.0/);
      expect(log).toMatch(/^deltavol: WARNING: the control API listens on 0\.0\.0\.0:\d+, not on loopback/m);
      const token = fs.readFileSync(path.join(dataDir, 'control.token'), 'utf8').trim();
      const probe = (headers: Record<string, string>) => {
        const script = `require('node:http').get({ host: '127.0.0.1', port: ${info.controlPort}, path: '/v1/volumes', headers: ${JSON.stringify(headers)} }, (r) => { console.log(r.statusCode); r.resume(); })`;
        return run('ip', ['netns', 'exec', ns, process.execPath, '-e', script], { timeoutMs: 20_000 }).stdout.trim();
      };
      expect(probe({})).toBe('401');
      expect(probe({ authorization: `Bearer ${token}` })).toBe('200');
      // Any IP literal names a wildcard listener (port mappings change the port); a DNS name must not.
      expect(probe({ authorization: `Bearer ${token}`, host: '10.1.2.3:20810' })).toBe('200');
      expect(probe({ authorization: `Bearer ${token}`, host: `rebind.attacker.example:${info.controlPort}` })).toBe('403');
    } finally {
      proc.kill('SIGTERM');
      await new Promise((r) => (proc.exitCode !== null || proc.signalCode !== null ? r(null) : proc.once('exit', r)));
      spawnSync('ip', ['netns', 'del', ns], { timeout: 10_000 });
      fs.rmSync(dataDir, { recursive: true, force: true });
      fs.rmSync(logFile, { force: true });
    }
  });

  it('a loopback bind prints no such warning', () => {
    expect(d.log()).not.toMatch(/WARNING: the control API listens/);
  });
});

describe('control API on a Unix socket (--control-socket)', () => {
  it('is mode 0600, needs no token, refuses Origin, is closed to other users, and goes away at a clean stop', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dvctl-sock-'));
    const sock = path.join(dir, 'control.sock');
    const s = await startDaemon({ extraArgs: ['--control-socket', sock] });
    try {
      const st = fs.lstatSync(sock);
      expect(st.isSocket()).toBe(true);
      expect(st.mode & 0o777).toBe(0o600);
      // No token anywhere the CLI could find one: the socket's permission is the check.
      const env = { DELTAVOL_TOKEN: '', DELTAVOL_TOKEN_FILE: '' };
      const created = cliAs(['--control-socket', sock, 'volume', 'create', 'onsock', '--size', '1M'], env);
      expect(created.status, created.stderr).toBe(0);
      const listed = cliAs(['volume', 'list', '--json'], { ...env, DELTAVOL_CONTROL_SOCKET: sock });
      expect(listed.status, listed.stderr).toBe(0);
      expect((JSON.parse(listed.stdout) as { name: string }[]).map((v) => v.name)).toEqual(['onsock']);
      const viaBrowser = await new Promise<number>((resolve, reject) => {
        const req = http.request({ socketPath: sock, path: '/v1/volumes/onsock', method: 'DELETE', headers: { origin: 'http://attacker.example' } }, (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        });
        req.on('error', reject);
        req.end();
      });
      expect(viaBrowser).toBe(403);
      if (have('setpriv') && process.getuid?.() === 0) {
        // Let nobody reach the socket's directory: only the socket's own 0600 stands in the way.
        fs.chmodSync(dir, 0o755);
        const r = run('setpriv', ['--reuid=nobody', '--regid=nogroup', '--clear-groups', '--', process.execPath, CLI, '--control-socket', sock, 'volume', 'delete', 'onsock'], { allowFail: true, timeoutMs: 30_000 });
        expect(r.status).toBe(7);
        expect(r.stderr).toMatch(/no permission to use the control socket/);
      }
      expect((await s.api<{ volumes: { name: string }[] }>('GET', '/v1/volumes')).volumes.map((v) => v.name)).toEqual(['onsock']);
      expect(await s.stop()).toBe(0);
      expect(fs.existsSync(sock)).toBe(false);
    } finally {
      await s.dispose();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
