// Why: the CLI's only way into the daemon. Finds the daemon (flag, environment, the data
// directory's daemon.json, or the default port) and its bearer token (control-token.ts),
// sends JSON, and turns HTTP failures into DeltavolErrors with the daemon's own code and
// message; a refused token becomes a message that says how to find the right one.

import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { Readable } from 'node:stream';
import { DeltavolError, type ErrorCode } from '../util/errors.js';
import { parseHostPort } from '../util/units.js';
import { findToken } from '../daemon/control-token.js';

export const CONTROL_PORT_DEFAULT = 10810;

export interface ControlTarget {
  host: string;
  port: number;
  /** The daemon's control socket: used instead of host:port, and no token is needed there. */
  socketPath?: string;
  /** The bearer token, or null when none was found (the request then fails with a hint). */
  token?: string | null;
  /** Where the token came from, or where the search looked. */
  tokenSource?: string;
  tokenTried?: string[];
}

function resolveAddress(opts: { control?: string; dataDir?: string }): { host: string; port: number } {
  const fromFlag = opts.control ?? process.env.DELTAVOL_CONTROL;
  if (fromFlag) return parseHostPort(fromFlag);
  if (opts.dataDir) {
    const file = path.join(opts.dataDir, 'daemon.json');
    try {
      const info = JSON.parse(fs.readFileSync(file, 'utf8')) as { controlHost: string; controlPort: number };
      const host = info.controlHost === '0.0.0.0' ? '127.0.0.1' : info.controlHost === '::' ? '::1' : info.controlHost;
      return { host, port: info.controlPort };
    } catch {
      throw new DeltavolError('DAEMON_UNREACHABLE', `no running daemon found for data directory ${opts.dataDir} (${file} missing)`);
    }
  }
  return { host: '127.0.0.1', port: CONTROL_PORT_DEFAULT };
}

export function resolveControlTarget(opts: { control?: string; controlSocket?: string; dataDir?: string; tokenFile?: string }): ControlTarget {
  const socketPath = opts.controlSocket ?? process.env.DELTAVOL_CONTROL_SOCKET;
  if (socketPath && !opts.control) return { host: 'localhost', port: 0, socketPath, token: null };
  const at = resolveAddress(opts);
  const found = findToken({ tokenFile: opts.tokenFile, dataDir: opts.dataDir, port: at.port });
  return found.token !== null ? { ...at, token: found.token, tokenSource: found.source } : { ...at, token: null, tokenTried: found.tried };
}

const HOW_TO_FIND =
  'run the CLI as the user the daemon runs as, or give --data-dir DIR (the daemon\'s data directory: reads DIR/control.token), --token-file FILE, DELTAVOL_TOKEN_FILE=FILE or DELTAVOL_TOKEN=TOKEN';

export class ControlClient {
  constructor(private readonly target: ControlTarget) {}

  get address(): string {
    return this.target.socketPath ? `unix:${this.target.socketPath}` : `${this.target.host}:${this.target.port}`;
  }

  private url(urlPath: string): string {
    return `http://${this.target.host.includes(':') ? `[${this.target.host}]` : this.target.host}:${this.target.port}${urlPath}`;
  }

  private headers(extra: Record<string, string>): Record<string, string> {
    return this.target.token ? { ...extra, authorization: `Bearer ${this.target.token}` } : extra;
  }

  async request<T>(method: string, urlPath: string, body?: unknown): Promise<T> {
    const res = await this.send(urlPath, {
      method,
      headers: this.headers(body === undefined ? {} : { 'content-type': 'application/json' }),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(60_000),
    });
    return this.json<T>(res);
  }

  /** GET of a binary stream (a differential); HTTP errors become DeltavolErrors. */
  async download(urlPath: string): Promise<ReadableStream<Uint8Array>> {
    const res = await this.send(urlPath, { method: 'GET', headers: this.headers({}) });
    if (!res.ok || !res.body) await this.json(res);
    return res.body!;
  }

  /** POST of a binary stream; the answer is JSON. */
  async upload<T>(urlPath: string, body: ReadableStream<Uint8Array>): Promise<T> {
    const init = { method: 'POST', body, duplex: 'half', headers: this.headers({ 'content-type': 'application/octet-stream' }) };
    return this.json<T>(await this.send(urlPath, init as RequestInit));
  }

  private async send(urlPath: string, init: RequestInit): Promise<Response> {
    try {
      return this.target.socketPath ? await sendUnix(this.target.socketPath, urlPath, init) : await fetch(this.url(urlPath), init);
    } catch (e) {
      const cause = (e as { cause?: { code?: string } }).cause?.code ?? (e as { code?: string }).code ?? (e as Error).message;
      if (cause === 'EACCES' && this.target.socketPath) {
        throw new DeltavolError('UNAUTHORIZED', `no permission to use the control socket ${this.target.socketPath}: run the CLI as the user the daemon runs as`);
      }
      throw new DeltavolError(
        'DAEMON_UNREACHABLE',
        `cannot reach the deltavol daemon at ${this.address} (${cause}). Is \`deltavol serve\` running? Use --control HOST:PORT or DELTAVOL_CONTROL to point at it.`,
      );
    }
  }

  private async json<T>(res: Response): Promise<T> {
    const text = await res.text();
    let json: unknown;
    try {
      json = text ? JSON.parse(text) : {};
    } catch {
      throw new DeltavolError('CONTROL_API', `daemon at ${this.address} sent a non-JSON reply (HTTP ${res.status})`);
    }
    if (!res.ok) {
      const err = (json as { error?: { code?: string; message?: string } }).error;
      if (res.status === 401) {
        const t = this.target;
        throw new DeltavolError(
          'UNAUTHORIZED',
          t.token
            ? `the daemon at ${this.address} refused the control token from ${t.tokenSource} (it belongs to another daemon, or was replaced): ${HOW_TO_FIND}`
            : `the daemon at ${this.address} needs its control token and none was found (looked at ${(t.tokenTried ?? []).join('; ') || 'nothing'}): ${HOW_TO_FIND}`,
        );
      }
      if (res.status === 403 && err?.code === 'FORBIDDEN') {
        throw new DeltavolError('FORBIDDEN', `the daemon at ${this.address} refused the request: ${err.message ?? 'forbidden'} (give --control the address it is bound to, as an IP address)`);
      }
      throw new DeltavolError((err?.code as ErrorCode) ?? 'CONTROL_API', err?.message ?? `HTTP ${res.status}`);
    }
    return json as T;
  }
}

/** One request over a Unix socket (fetch cannot), answered as a fetch Response so the rest is shared. */
function sendUnix(socketPath: string, urlPath: string, init: RequestInit): Promise<Response> {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath, path: urlPath, method: init.method ?? 'GET', headers: (init.headers ?? {}) as Record<string, string> }, (res) => {
      const headers = new Headers();
      for (const [k, v] of Object.entries(res.headers)) if (v !== undefined) headers.set(k, Array.isArray(v) ? v.join(', ') : v);
      resolve(new Response(Readable.toWeb(res) as ReadableStream<Uint8Array>, { status: res.statusCode ?? 500, headers }));
    });
    req.on('error', reject);
    init.signal?.addEventListener('abort', () => req.destroy(new Error('timed out')), { once: true });
    const body = init.body;
    if (body === undefined || body === null) req.end();
    else if (typeof body === 'string') req.end(body);
    else Readable.fromWeb(body as import('node:stream/web').ReadableStream).pipe(req);
  });
}
