// Why: the CLI's only way into the daemon. Finds the daemon (flag, environment, the data
// directory's daemon.json, or the default port), sends JSON, and turns HTTP failures
// into DeltavolErrors with the daemon's own code and message.

import fs from 'node:fs';
import path from 'node:path';
import { DeltavolError, type ErrorCode } from '../util/errors.js';
import { parseHostPort } from '../util/units.js';

export const CONTROL_PORT_DEFAULT = 10810;

export interface ControlTarget {
  host: string;
  port: number;
}

export function resolveControlTarget(opts: { control?: string; dataDir?: string }): ControlTarget {
  const fromFlag = opts.control ?? process.env.DELTAVOL_CONTROL;
  if (fromFlag) return parseHostPort(fromFlag);
  if (opts.dataDir) {
    const file = path.join(opts.dataDir, 'daemon.json');
    try {
      const info = JSON.parse(fs.readFileSync(file, 'utf8')) as { controlHost: string; controlPort: number };
      return { host: info.controlHost === '0.0.0.0' ? '127.0.0.1' : info.controlHost, port: info.controlPort };
    } catch {
      throw new DeltavolError('DAEMON_UNREACHABLE', `no running daemon found for data directory ${opts.dataDir} (${file} missing)`);
    }
  }
  return { host: '127.0.0.1', port: CONTROL_PORT_DEFAULT };
}

export class ControlClient {
  constructor(private readonly target: ControlTarget) {}

  get address(): string {
    return `${this.target.host}:${this.target.port}`;
  }

  private url(urlPath: string): string {
    return `http://${this.target.host.includes(':') ? `[${this.target.host}]` : this.target.host}:${this.target.port}${urlPath}`;
  }

  async request<T>(method: string, urlPath: string, body?: unknown): Promise<T> {
    const res = await this.send(urlPath, {
      method,
      headers: body === undefined ? {} : { 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(60_000),
    });
    return this.json<T>(res);
  }

  /** GET of a binary stream (a differential); HTTP errors become DeltavolErrors. */
  async download(urlPath: string): Promise<ReadableStream<Uint8Array>> {
    const res = await this.send(urlPath, { method: 'GET' });
    if (!res.ok || !res.body) await this.json(res);
    return res.body!;
  }

  /** POST of a binary stream; the answer is JSON. */
  async upload<T>(urlPath: string, body: ReadableStream<Uint8Array>): Promise<T> {
    const init = { method: 'POST', body, duplex: 'half', headers: { 'content-type': 'application/octet-stream' } };
    return this.json<T>(await this.send(urlPath, init as RequestInit));
  }

  private async send(urlPath: string, init: RequestInit): Promise<Response> {
    try {
      return await fetch(this.url(urlPath), init);
    } catch (e) {
      const cause = (e as { cause?: { code?: string } }).cause?.code ?? (e as Error).message;
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
      throw new DeltavolError((err?.code as ErrorCode) ?? 'CONTROL_API', err?.message ?? `HTTP ${res.status}`);
    }
    return json as T;
  }
}
