// Why: people type sizes ("1G", "512MiB", "4096"); scripts read exact bytes. One parser
// and one formatter so the CLI, control API and README all agree on what a size means.

import { DeltavolError } from './errors.js';

const SUFFIX_SHIFT: Record<string, number> = { '': 0, k: 10, m: 20, g: 30, t: 40, p: 50 };

/** Parses "1G", "1GiB", "512m", "4096", "4096B" into bytes (binary multiples). */
export function parseSizeBytes(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$/i.exec(text);
  if (!m) throw new DeltavolError('BAD_SIZE', `cannot parse size "${text}" (examples: 4096, 64M, 1GiB, 2T)`);
  const value = Number(m[1]);
  const shift = SUFFIX_SHIFT[m[2]!.toLowerCase()]!;
  const bytes = value * 2 ** shift;
  if (!Number.isSafeInteger(bytes)) {
    throw new DeltavolError('BAD_SIZE', `size "${text}" is not a whole number of bytes or is too large`);
  }
  return bytes;
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

export function formatBytes(bytes: number): string {
  let value = bytes;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit++;
  }
  const text = unit === 0 ? String(value) : value.toFixed(value >= 100 ? 0 : value >= 10 ? 1 : 2);
  return `${text} ${UNITS[unit]}`;
}

/** Parses "host:port", ":port" or "port" into parts; used for --control and --peer. */
export function parseHostPort(text: string, defaultHost = '127.0.0.1'): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*))?:?(\d+)$/.exec(text.trim());
  if (!m) throw new DeltavolError('EINVAL_ARGUMENT', `cannot parse "${text}" as HOST:PORT`);
  const port = Number(m[3]);
  if (port < 1 || port > 65535) throw new DeltavolError('EINVAL_ARGUMENT', `port ${port} is out of range 1-65535`);
  const host = m[1] ?? (m[2] || defaultHost);
  return { host, port };
}

const DURATION_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** Parses "500ms", "5s", "2m", "1h" or a plain number of seconds into milliseconds. */
export function parseDurationMs(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/i.exec(text);
  if (!m) throw new DeltavolError('EINVAL_ARGUMENT', `cannot parse duration "${text}" (examples: 500ms, 5s, 2m)`);
  const ms = Number(m[1]) * DURATION_MS[(m[2] ?? 's').toLowerCase()]!;
  if (!Number.isSafeInteger(Math.round(ms))) throw new DeltavolError('EINVAL_ARGUMENT', `duration "${text}" is too large`);
  return Math.round(ms);
}
