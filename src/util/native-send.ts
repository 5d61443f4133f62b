// Why: loads the small C addon (src/native/sockx.c) that sends large messages from the libuv
// threadpool instead of the event loop (perf of 1 MiB reads on four connections: 75% of the
// loop in the socket's writev, the other core half idle). Without the addon, or where the
// socket has no descriptor (TLS), replies go through Node's socket as before.

import { loadAddon } from './native-addon.js';

/** A sender's queue in the addon (an opaque handle). */
export type SenderHandle = object & { readonly __sender: unique symbol };

export interface Sockx {
  /**
   * A queue of messages for the socket `fd` (which it owns from now on), drained by one
   * threadpool job at a time with sendmsg(MSG_DONTWAIT). `notify(closed)` runs on the loop
   * when there is news (senderState tells it); `closed` is true once, after senderClose, when
   * the sender is freed. While the socket stays full for `waitMs` (0 to 1000), or fails, the
   * sender stops: pushes are refused until senderResume.
   */
  senderOpen(fd: number, waitMs: number, notify: (closed: boolean) => void): SenderHandle;
  /**
   * Queues one message (1 to 64 buffers, unchanged until counted sent; then, if given,
   * `fileLength` bytes of `fileFd` from `fileOffset`, sent with sendfile from the sender's own
   * dup of it); false: refused (stopped or closing).
   */
  senderPush(handle: SenderHandle, buffers: Buffer[], fileFd?: number, fileOffset?: number, fileLength?: number): boolean;
  /**
   * Fills `out` with [messages sent since open, sendmsg calls since open, stopped (1/0),
   * bytes of the first unsent message already sent, a job queued or running (1/0)]; returns
   * the errno name of a failed send, or null.
   */
  senderState(handle: SenderHandle, out: Float64Array): string | null;
  /** After a stop, with no job running: forgets the unsent messages (the caller took them back). */
  senderResume(handle: SenderHandle): void;
  /** True: freed now; false: freed when its job ends (notify(true)). The handle is not used again. */
  senderClose(handle: SenderHandle): boolean;
  /** A close-on-exec duplicate of `fd` (so a descriptor Node closes is never reused under a send). */
  dupFd(fd: number): number;
  closeFd(fd: number): void;
  /**
   * The TCP congestion control of socket `fd`, after setting it to `name` when given (the
   * error's code is the errno name: ENOENT no such algorithm, EPERM not allowed).
   */
  congestion(fd: number, name?: string): string;
}

/** Most buffers one message may have (MESSAGE_BUFFERS_MAX in sockx.c). */
export const nativeSendBuffersMax = 64;

export function loadSockx(): Sockx | null {
  return loadAddon<Sockx>('sockx');
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
