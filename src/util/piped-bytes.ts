// Why: a large WRITE's payload may arrive in a kernel pipe instead of a buffer (spliced from
// its socket: socket-pipe.ts), and a file takes it from there with no copy through user
// memory. The volume layer sees it only as this interface; it knows nothing of sockets. A
// writer that needs the bytes themselves (a synchronous mirror, a copy-on-write wait) takes
// them into memory.

/** `length` bytes waiting in a kernel pipe. Each method consumes them; call one, once. */
export interface PipedBytes {
  readonly length: number;
  /** Moves every byte into file `fd` at `offset` on this thread (throws with the errno name as code). */
  moveToFileSync(fd: number, offset: number): void;
  /** The same in the threadpool. */
  moveToFile(fd: number, offset: number): Promise<void>;
  /** The bytes in memory; the buffer is valid until the request is done with its payload. */
  take(): Buffer;
}

/** A WRITE's data: views of received buffers, or bytes waiting in a pipe. */
export type WritePayload = Buffer[] | PipedBytes;

export function isPiped(p: WritePayload): p is PipedBytes {
  return !Array.isArray(p);
}

export function payloadLength(p: WritePayload): number {
  if (isPiped(p)) return p.length;
  let n = 0;
  for (const c of p) n += c.length;
  return n;
}

/** The payload as buffers (a piped one is taken into memory). */
export function payloadChunks(p: WritePayload): Buffer[] {
  return isPiped(p) ? [p.take()] : p;
}
