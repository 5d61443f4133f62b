// Why: the CLI (and scripts, and tests) drive a running daemon through this small
// HTTP+JSON API. Routes map one-to-one onto registry and daemon operations; DeltavolError
// codes map onto HTTP statuses so clients can act on them. `/metrics` serves the same
// numbers in Prometheus text format.
//
// Only the daemon's owner may drive it, and a web page the owner happens to visit must not
// (cross-site requests and DNS rebinding reach 127.0.0.1 too). So before any route runs or
// any body is read, every request passes, in order: no Origin header (browsers send one;
// the CLI and curl do not), a Host header naming this listener (a rebinding page sends its
// own name), the bearer token (constant-time compare), and a Content-Type that is the one
// the route takes when there is a body. Every refusal closes the connection.

import fs from 'node:fs';
import http from 'node:http';
import net, { type AddressInfo } from 'node:net';
import os from 'node:os';
import { controlBodyBytesMax } from '../util/limits.js';
import { tokensEqual } from './control-token.js';
import type { Logger } from '../util/log.js';
import { DeltavolError, errnoCode, isDeltavolError, type ErrorCode } from '../util/errors.js';
import { isLoopbackHost } from '../util/loopback.js';

export type RouteHandler = (params: Record<string, string>, body: unknown, query: URLSearchParams) => unknown | Promise<unknown>;
/** A route that reads the request and writes the response itself (binary streams). */
export type RawHandler = (params: Record<string, string>, query: URLSearchParams, req: http.IncomingMessage, res: http.ServerResponse) => Promise<void>;

interface Route {
  method: string;
  pattern: RegExp;
  keys: string[];
  handler: RouteHandler | null;
  raw: RawHandler | null;
}

const STATUS_FOR: Partial<Record<ErrorCode, number>> = {
  VOLUME_NOT_FOUND: 404,
  VOLUME_EXISTS: 409,
  VOLUME_BUSY: 409,
  VOLUME_READ_ONLY: 409,
  VOLUME_SHRINK: 400,
  BAD_NAME: 400,
  BAD_SIZE: 400,
  EINVAL_ARGUMENT: 400,
  SHUTTING_DOWN: 503,
  SNAPSHOT_NOT_FOUND: 404,
  SNAPSHOT_EXISTS: 409,
  SNAPSHOT_INVALID: 409,
  SNAPSHOTS_MAX: 409,
  BAD_STREAM: 400,
  ROLE_CONFLICT: 409,
  STALE_GENERATION: 409,
  GEOMETRY: 409,
  PEER_REFUSED: 409,
  PEER_UNREACHABLE: 502,
  SAVE_AREA_FULL: 507,
  DELTA_SET_BUSY: 409,
  UNAUTHORIZED: 401,
  FORBIDDEN: 403,
  UNSUPPORTED_MEDIA_TYPE: 415,
  BODY_TOO_LARGE: 413,
};

const JSON_TYPE = 'application/json';
const BINARY_TYPE = 'application/octet-stream';

/** The media type of a Content-Type header, lower case, without parameters ("" if absent). */
function mediaType(header: string | undefined): string {
  return (header ?? '').split(';')[0]!.trim().toLowerCase();
}

function hasBody(req: http.IncomingMessage): boolean {
  return req.headers['transfer-encoding'] !== undefined || Number(req.headers['content-length'] ?? '0') > 0;
}


/**
 * Which Host headers name this listener: the bound address and the loopback names, with
 * the port (and this machine's host name when not bound to loopback). Bound to a wildcard,
 * any IP literal is accepted too, with any port: a port mapping (docker -p 20810:10810)
 * changes the port, and a page can only make a browser send an IP literal as Host by being
 * served from that address, which is then not a rebinding. A DNS-rebinding page sends a
 * name it controls, never one of these.
 */
export function hostMatcher(boundHost: string, port: number): (hostHeader: string | undefined) => boolean {
  const names = new Set<string>();
  const add = (h: string) => names.add(`${net.isIPv6(h) ? `[${h}]` : h}:${port}`.toLowerCase());
  for (const h of ['localhost', '127.0.0.1', '::1', boundHost]) add(h);
  const wildcard = boundHost === '0.0.0.0' || boundHost === '::' || boundHost === '';
  if (!isLoopbackHost(boundHost)) add(os.hostname());
  return (hostHeader) => {
    if (!hostHeader) return false;
    const h = hostHeader.toLowerCase();
    if (names.has(h)) return true;
    if (!wildcard) return false;
    const m = /^(?:\[([0-9a-f:.]+)\]|(\d+\.\d+\.\d+\.\d+)):(\d+)$/.exec(h);
    return m !== null && Number(m[3]) > 0 && Number(m[3]) <= 65535 && net.isIP(m[1] ?? m[2]!) !== 0;
  };
}

export class ControlApi {
  private readonly routes: Route[] = [];
  private readonly servers: http.Server[] = [];
  private socketPath: string | null = null;
  private textRoutes = new Map<string, () => string>();
  private hostAllowed: (hostHeader: string | undefined) => boolean = () => false;
  /** What every request must carry as `Authorization: Bearer TOKEN` (set by listen). */
  private token: string | null = null;

  constructor(private readonly log: Logger) {}

  route(method: string, path: string, handler: RouteHandler): void {
    this.add(method, path, handler, null);
  }

  /** A route whose handler streams: it must write the whole response (errors before the first byte become JSON errors). Its body, if any, is application/octet-stream. */
  rawRoute(method: string, path: string, handler: RawHandler): void {
    this.add(method, path, null, handler);
  }

  private add(method: string, path: string, handler: RouteHandler | null, raw: RawHandler | null): void {
    const keys: string[] = [];
    const pattern = new RegExp(
      '^' +
        path.replace(/:([a-zA-Z]+)/g, (_, k: string) => {
          keys.push(k);
          return '([^/]+)';
        }) +
        '$',
    );
    this.routes.push({ method, pattern, keys, handler, raw });
  }

  /** A GET route answered as text/plain (Prometheus metrics); it needs the token like every route. */
  text(path: string, render: () => string): void {
    this.textRoutes.set(path, render);
  }

  listen(port: number, host: string, token: string): Promise<number> {
    this.token = token;
    const server = http.createServer((req, res) => void this.handle(req, res, 'tcp'));
    this.servers.push(server);
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen({ port, host }, () => {
        server.off('error', reject);
        const bound = (server.address() as AddressInfo).port;
        this.hostAllowed = hostMatcher(host, bound);
        resolve(bound);
      });
    });
  }

  /**
   * Also serve on a Unix socket, mode 0600: there the file permission is the proof of
   * ownership (only the daemon's user and root can connect), so no token is asked; Origin
   * and Content-Type are still checked. A stale socket is replaced; any other file is not.
   */
  listenUnix(socketPath: string): Promise<void> {
    try {
      if (fs.lstatSync(socketPath).isSocket()) fs.unlinkSync(socketPath);
      else throw new DeltavolError('EINVAL_ARGUMENT', `--control-socket ${socketPath} exists and is not a socket`);
    } catch (e) {
      if (isDeltavolError(e) || errnoCode(e) !== 'ENOENT') throw e;
    }
    const server = http.createServer((req, res) => void this.handle(req, res, 'unix'));
    this.servers.push(server);
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      // bind() runs synchronously inside listen(): the umask makes the socket 0600 from its first instant.
      const umask = process.umask(0o177);
      try {
        server.listen(socketPath, () => {
          server.off('error', reject);
          fs.chmodSync(socketPath, 0o600);
          this.socketPath = socketPath;
          resolve();
        });
      } finally {
        process.umask(umask);
      }
    });
  }

  async close(): Promise<void> {
    await Promise.all(
      this.servers.map(
        (s) =>
          new Promise<void>((r) => {
            s.close(() => r());
            s.closeAllConnections();
          }),
      ),
    );
    if (this.socketPath) fs.rmSync(this.socketPath, { force: true });
  }

  /** Refusals are logged at most once a second (with how many were not), so a flood cannot fill the log. */
  private refusalsUnlogged = 0;
  private refusalLoggedMs = 0;
  refusedRequests = 0;

  private logRefusal(refusal: DeltavolError, req: http.IncomingMessage): void {
    this.refusedRequests++;
    const now = Date.now();
    if (now - this.refusalLoggedMs < 1000) {
      this.refusalsUnlogged++;
      return;
    }
    this.log.warn(
      { code: refusal.code, reason: refusal.message, method: req.method, remote: req.socket.remoteAddress ?? 'unix', refusedUnlogged: this.refusalsUnlogged, refusedTotal: this.refusedRequests },
      'control request refused',
    );
    this.refusalLoggedMs = now;
    this.refusalsUnlogged = 0;
  }

  /** The checks every request passes before routing and before its body is read; a refusal, or null. */
  private admit(req: http.IncomingMessage, via: 'tcp' | 'unix'): DeltavolError | null {
    // Browsers send Origin on cross-origin requests and on every POST; our clients never do.
    if (req.headers.origin !== undefined) return new DeltavolError('FORBIDDEN', 'requests from web pages (with an Origin header) are refused');
    const site = req.headers['sec-fetch-site'];
    if (site !== undefined && site !== 'none') return new DeltavolError('FORBIDDEN', 'requests from web pages (Sec-Fetch-Site) are refused');
    if (via === 'tcp') {
      if (!this.hostAllowed(req.headers.host)) return new DeltavolError('FORBIDDEN', 'the Host header does not name this control API');
      const auth = /^Bearer[ ]+([^\s]+)\s*$/i.exec(req.headers.authorization ?? '');
      if (!auth || this.token === null || !tokensEqual(auth[1]!, this.token)) return new DeltavolError('UNAUTHORIZED', 'a valid bearer token is required');
    }
    if (hasBody(req)) {
      const type = mediaType(req.headers['content-type']);
      if (type !== JSON_TYPE && type !== BINARY_TYPE) return new DeltavolError('UNSUPPORTED_MEDIA_TYPE', `request bodies must be ${JSON_TYPE} (or ${BINARY_TYPE} for differential uploads), got "${type}"`);
      const length = Number(req.headers['content-length'] ?? '0');
      if (type === JSON_TYPE && length > controlBodyBytesMax) return new DeltavolError('BODY_TOO_LARGE', `a JSON body may be at most ${controlBodyBytesMax} bytes`);
    }
    return null;
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse, via: 'tcp' | 'unix'): Promise<void> {
    const send = (status: number, body: unknown, close = false) => {
      const text = JSON.stringify(body);
      const headers: http.OutgoingHttpHeaders = { 'content-type': JSON_TYPE, 'content-length': Buffer.byteLength(text) };
      // A refused request's body is never read: close rather than drain it.
      if (close) headers.connection = 'close';
      if (status === 401) headers['www-authenticate'] = 'Bearer';
      res.writeHead(status, headers);
      res.end(text);
    };
    const errorJson = (e: DeltavolError) => ({ error: { code: e.code, message: e.message, ...(e.details ? { details: e.details } : {}) } });
    let pathname = '';
    try {
      const refusal = this.admit(req, via);
      if (refusal) {
        this.logRefusal(refusal, req);
        send(STATUS_FOR[refusal.code]!, errorJson(refusal), true);
        return;
      }
      let url: URL;
      try {
        url = new URL(req.url ?? '/', 'http://localhost');
      } catch {
        throw new DeltavolError('EINVAL_ARGUMENT', 'malformed request target');
      }
      pathname = url.pathname;
      const textRoute = req.method === 'GET' ? this.textRoutes.get(url.pathname) : undefined;
      if (textRoute) {
        const text = textRoute();
        res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' });
        res.end(text);
        return;
      }
      for (const r of this.routes) {
        if (r.method !== req.method) continue;
        const m = r.pattern.exec(url.pathname);
        if (!m) continue;
        const params: Record<string, string> = {};
        r.keys.forEach((k, i) => (params[k] = decodePathPart(m[i + 1]!)));
        const wanted = r.raw ? BINARY_TYPE : JSON_TYPE;
        if (hasBody(req) && mediaType(req.headers['content-type']) !== wanted) {
          throw new DeltavolError('UNSUPPORTED_MEDIA_TYPE', `${req.method} ${url.pathname} takes ${wanted}`);
        }
        if (r.raw) {
          await r.raw(params, url.searchParams, req, res);
          return;
        }
        const body = await readJson(req);
        const result = await r.handler!(params, body, url.searchParams);
        send(200, result ?? {});
        return;
      }
      send(404, { error: { code: 'NOT_FOUND', message: `no route ${req.method} ${url.pathname}` } });
    } catch (e) {
      if (res.headersSent) {
        // A stream failed half-way: the client sees a truncated body (its trailer is missing).
        this.log.error({ err: (e as Error).message, path: pathname }, 'control API stream failed');
        res.destroy();
        return;
      }
      if (isDeltavolError(e)) {
        const status = STATUS_FOR[e.code] ?? 500;
        // A body left unread (refused before or while reading it) is not drained.
        send(status, errorJson(e), hasBody(req) && !req.readableEnded);
      } else {
        this.log.error({ err: (e as Error).stack ?? String(e), path: pathname }, 'control API request failed');
        send(500, { error: { code: 'INTERNAL', message: (e as Error).message } }, hasBody(req) && !req.readableEnded);
      }
    }
  }
}

function decodePathPart(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw new DeltavolError('EINVAL_ARGUMENT', 'malformed percent-encoding in the request path');
  }
}

/** A JSON route's body: an object (absent body: {}); anything else is refused as a coded 4xx. */
async function readJson(req: http.IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const c of req) {
    total += (c as Buffer).length;
    if (total > controlBodyBytesMax) throw new DeltavolError('BODY_TOO_LARGE', `a JSON body may be at most ${controlBodyBytesMax} bytes`);
    chunks.push(c as Buffer);
  }
  if (total === 0) return {};
  let value: unknown;
  try {
    value = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new DeltavolError('EINVAL_ARGUMENT', 'request body is not valid JSON');
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new DeltavolError('EINVAL_ARGUMENT', `request body must be a JSON object, got ${value === null ? 'null' : Array.isArray(value) ? 'an array' : typeof value}`);
  }
  return value as Record<string, unknown>;
}
