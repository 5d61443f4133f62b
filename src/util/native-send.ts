// Why: loads the small C addon (src/native/sockx.c) that sends a large reply from the libuv
// threadpool instead of the event loop (perf of 1 MiB reads on four connections: 75% of the
// loop in the socket's writev, the other core half idle). Without the addon, or where the
// socket has no descriptor (TLS), replies go through Node's socket as before.

import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

export interface Sockx {
  /**
   * Hands `buffers` (1 to 64) to sendmsg(MSG_DONTWAIT) on a threadpool thread until all are
   * taken or the socket stayed full for `waitMs` (0 to 1000; the thread waits in poll);
   * `done(errorCode | null, bytesSent)` runs on the loop. The buffers must not change until then.
   */
  sendv(fd: number, buffers: Buffer[], waitMs: number, done: (error: string | null, sentBytes: number) => void): void;
  /** A close-on-exec duplicate of `fd` (so a descriptor Node closes is never reused under a send). */
  dupFd(fd: number): number;
  closeFd(fd: number): void;
}

/** Most buffers one sendv call takes (SEND_BUFFERS_MAX in sockx.c). */
export const nativeSendBuffersMax = 64;

let cached: Sockx | null | undefined;

export function loadSockx(): Sockx | null {
  if (cached !== undefined) return cached;
  const here = path.dirname(fileURLToPath(import.meta.url));
  const require = createRequire(import.meta.url);
  try {
    // dist/util/ or src/util/ → project root
    cached = require(path.resolve(here, '../../build/Release/sockx.node')) as Sockx;
  } catch {
    cached = null;
  }
  return cached;
}

/**
 * The descriptor under a plain TCP or Unix socket, or -1. A TLS socket's handle may report
 * the descriptor of the TCP socket under it: bytes sent there would bypass TLS, so it is
 * refused here (`encrypted`), whatever else is checked by callers.
 */
export function socketFd(socket: unknown): number {
  if ((socket as { encrypted?: unknown }).encrypted) return -1;
  const fd = (socket as { _handle?: { fd?: unknown } | null })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : -1;
}
