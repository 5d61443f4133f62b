// Why: the CLI (and scripts, and tests) drive a running daemon through this small
// HTTP+JSON API, bound to localhost only. Routes map one-to-one onto registry and
// daemon operations; DeltavolError codes map onto HTTP statuses so clients can act on
// them. `/metrics` serves the same numbers in Prometheus text format.

import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from '../util/log.js';
import { DeltavolError, isDeltavolError, type ErrorCode } from '../util/errors.js';

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
};

const BODY_BYTES_MAX = 1024 * 1024;

export class ControlApi {
  private readonly routes: Route[] = [];
  private server: http.Server | null = null;
  private textRoutes = new Map<string, () => string>();

  constructor(private readonly log: Logger) {}

  route(method: string, path: string, handler: RouteHandler): void {
    this.add(method, path, handler, null);
  }

  /** A route whose handler streams: it must write the whole response (errors before the first byte become JSON errors). */
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

  /** A GET route answered as text/plain (Prometheus metrics). */
  text(path: string, render: () => string): void {
    this.textRoutes.set(path, render);
  }

  listen(port: number, host: string): Promise<number> {
    const server = http.createServer((req, res) => void this.handle(req, res));
    this.server = server;
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen({ port, host }, () => {
        server.off('error', reject);
        resolve((server.address() as AddressInfo).port);
      });
    });
  }

  close(): Promise<void> {
    const s = this.server;
    if (!s) return Promise.resolve();
    return new Promise((r) => {
      s.close(() => r());
      s.closeAllConnections();
    });
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://localhost');
    const send = (status: number, body: unknown) => {
      const text = JSON.stringify(body);
      res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
      res.end(text);
    };
    try {
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
        r.keys.forEach((k, i) => (params[k] = decodeURIComponent(m[i + 1]!)));
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
        this.log.error({ err: (e as Error).message, path: url.pathname }, 'control API stream failed');
        res.destroy();
        return;
      }
      if (isDeltavolError(e)) {
        send(STATUS_FOR[e.code] ?? 500, { error: { code: e.code, message: e.message, details: e.details } });
      } else {
        this.log.error({ err: (e as Error).stack ?? String(e), path: url.pathname }, 'control API request failed');
        send(500, { error: { code: 'INTERNAL', message: (e as Error).message } });
      }
    }
  }
}

async function readJson(req: http.IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const c of req) {
    total += (c as Buffer).length;
    if (total > BODY_BYTES_MAX) throw new DeltavolError('EINVAL_ARGUMENT', 'request body too large');
    chunks.push(c as Buffer);
  }
  if (total === 0) return {};
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new DeltavolError('EINVAL_ARGUMENT', 'request body is not valid JSON');
  }
}
