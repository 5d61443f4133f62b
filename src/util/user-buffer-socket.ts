// Why: a plain net.Socket reads into a fresh 64 KiB buffer per read. A 1 MiB WRITE then
// costs 16 reads, 16 new buffers the kernel must fault in page by page, and garbage the
// collector must trace (perf of 1M writes: a third of the daemon's CPU in those page
// faults and in major GCs). Node reads into buffers we choose when a socket is made with
// `onread` (net.Socket option), but a server's accepted sockets cannot be given one; so a
// connection accepted paused is re-made here around the same handle with `onread`. Only
// for plain TCP/Unix streams: a socket that may switch to TLS keeps Node's own reads.

import net from 'node:net';

/** Where the next read goes, and what to do with what was read into it. */
export interface UserBufferReader {
  /** The buffer the next read fills (from its start). Called after every read. */
  next(): Buffer;
  /** `n` bytes were read into the start of `buffer` (one returned by next()). */
  received(n: number, buffer: Buffer): void;
}

interface SocketInternals {
  _handle: { useUserBuffer?: unknown } | null;
  _server?: unknown;
  server?: unknown;
}

/**
 * The same connection as `socket` (accepted with pauseOnConnect, nothing read yet), as a
 * new net.Socket that reads into the reader's buffers; null when this Node cannot (then
 * keep using `socket`). The old object must not be used afterwards.
 */
export function adoptWithUserBuffer(socket: net.Socket, reader: UserBufferReader): net.Socket | null {
  const old = socket as unknown as SocketInternals;
  const handle = old._handle;
  if (!handle || typeof handle.useUserBuffer !== 'function' || socket.readableLength > 0) return null;
  // `handle` is how net.Server itself makes its sockets; it is not in the typings.
  const adopted = new net.Socket({
    handle,
    allowHalfOpen: socket.allowHalfOpen,
    onread: {
      buffer: () => reader.next(),
      callback: (n: number, buffer: Uint8Array) => {
        reader.received(n, buffer as Buffer);
        return true;
      },
    },
  } as net.SocketConstructorOpts);
  // The server counts its connections on the socket that closes; hand that over.
  const fresh = adopted as unknown as SocketInternals;
  fresh._server = old._server;
  fresh.server = old.server;
  old._server = null;
  old._handle = null;
  return adopted;
}
