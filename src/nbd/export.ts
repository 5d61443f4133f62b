// Why: the one interface through which the NBD layer reaches storage. The protocol
// code validates a request (range, flags, capabilities, read-only) and then calls
// exactly one of these methods; it never learns what stands behind them (a file, a
// volume with a change log, a snapshot). Methods may complete synchronously (return
// undefined / a value) or asynchronously (return a Promise): small I/O on page-cache
// data is twice as fast on the event loop (PERF.md), so the backend chooses.

import type { WritePayload } from '../util/piped-bytes.js';
import type { FileRange } from '../util/file-range.js';
import type { ZeroBlockScan } from '../util/zero-block-scan.js';

export type MaybePromise<T> = T | Promise<T>;

export interface Extent {
  lengthBytes: number;
  /** Context-defined flags: for base:allocation, STATE_HOLE | STATE_ZERO. */
  flags: number;
}

export interface ExportListing {
  name: string;
  description: string;
}

/** Capabilities: advertised truthfully as transmission flags. */
export interface ExportFeatures {
  readOnly: boolean;
  flush: boolean;
  fua: boolean;
  trim: boolean;
  writeZeroes: boolean;
  fastZero: boolean;
  cache: boolean;
  /** True only if a FLUSH on one connection makes writes of all connections durable. */
  multiConn: boolean;
}

export interface WriteZeroesOptions {
  /** NBD_CMD_FLAG_NO_HOLE: the range must stay allocated. */
  noHole: boolean;
  /** NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than write zeroes slowly. */
  fastZero: boolean;
}

/** An export opened for one connection. Errors are thrown (or rejected) with an errno `code`. */
export interface NbdExport {
  readonly name: string;
  readonly description: string;
  readonly sizeBytes: number;
  readonly features: ExportFeatures;
  /** Metadata contexts this export offers (always includes base:allocation). */
  readonly metaContexts: readonly string[];

  /**
   * Fills target[0..length) with bytes [offset, offset+length). May count the all-zero
   * blocks of what it read into `scan` (zero-block-scan.ts); leaving it alone is fine.
   */
  read(offset: number, length: number, target: Buffer, scan?: ZeroBlockScan): MaybePromise<void>;
  /**
   * Optional: where in an open file the bytes [offset, offset+length) lie, for a reply sent
   * from the page cache (util/file-range.ts), or null when they must be read (the export
   * then sends no such range: only ranges whose file bytes stay what a read returns until
   * the client has them, bar writes racing the read, and that hold no runs worth sending as
   * holes).
   */
  fileRange?(offset: number, length: number): FileRange | null;
  /**
   * Writes the payload at offset (the concatenation of its chunks, or bytes waiting in a
   * pipe: util/piped-bytes.ts); durable before return when fua.
   */
  write(offset: number, payload: WritePayload, fua: boolean): MaybePromise<void>;
  flush(): MaybePromise<void>;
  trim(offset: number, length: number, fua: boolean): MaybePromise<void>;
  writeZeroes(offset: number, length: number, options: WriteZeroesOptions, fua: boolean): MaybePromise<void>;
  cache(offset: number, length: number): MaybePromise<void>;
  /** Consecutive extents from offset covering at least 1 byte, at most extentsMax of them. */
  blockStatus(context: string, offset: number, length: number, extentsMax: number): MaybePromise<Extent[]>;
  /** The connection that opened this export is gone (all its requests completed). */
  close(): void;
}

/** What the server exports: the daemon provides it, the NBD layer asks it. */
export interface ExportCatalog {
  list(): ExportListing[];
  /** Opens an export by name; '' is the default export. Undefined when there is none. */
  open(name: string): NbdExport | undefined;
  /** The metadata contexts of an export without opening it (for LIST/SET_META_CONTEXT). */
  metaContexts(name: string): readonly string[] | undefined;
  /** The name '' stands for, or undefined when there is no default export. */
  defaultName(): string | undefined;
}
