// Why: a large READ reply can leave from the page cache (sendfile) instead of being read
// into memory and written out again: one copy of each byte instead of two. The protocol
// layer must not know what a volume or a file store is, and the volume must not know
// sockets; this is the one thing they share: where a range's bytes lie in an open file, and
// how to have them in memory when a socket must send them itself after all.

/** Bytes of a file that are, right now, what a read of some range returns. */
export interface FileRange {
  /** An open descriptor (the sender duplicates it; the owner may close its own). */
  readonly fd: number;
  /** Where in the file the range starts. */
  readonly offset: number;
  readonly length: number;
  /**
   * `length` bytes from `from` (within the range) as a buffer, for when they must go through
   * memory after all (a full socket: Node's socket sends the rest). Throws when the file is
   * gone (the volume closed): the reply cannot be finished.
   */
  read(from: number, length: number): Buffer;
}
