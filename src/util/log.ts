// Why: one logger configuration for the daemon and the CLI. JSON lines by default
// (for machines and log shippers); `--log-format pretty` pipes through pino-pretty.

import { pino, type Logger, type LevelWithSilent } from 'pino';

export type { Logger };

export interface LogOptions {
  level?: LevelWithSilent;
  pretty?: boolean;
  /** File descriptor to write to; default 1 (stdout). */
  fd?: number;
}

export function createLogger(options: LogOptions = {}): Logger {
  const level = options.level ?? 'info';
  if (options.pretty) {
    return pino({
      level,
      transport: { target: 'pino-pretty', options: { destination: options.fd ?? 1, colorize: false, translateTime: 'SYS:standard' } },
    });
  }
  return pino({ level, base: { pid: process.pid } }, pino.destination({ fd: options.fd ?? 1, sync: false }));
}

/** A logger that drops everything: for unit tests and library use. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
