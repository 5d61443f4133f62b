// Why: positional I/O on one sparse file, the bottom of every volume. Small reads and
// writes run synchronously on the event loop and large ones in the threadpool (PERF.md:
// the threadpool hand-off costs more than a 4 KiB page-cache copy, and a 1 MiB copy on the
// loop stalls every connection). Flushes are group-committed: many callers, one fdatasync.
// Holes are punched and found with the fsx addon where the file system allows.

import type { PipedBytes } from '../util/piped-bytes.js';
import fs from 'node:fs';
import nodePath from 'node:path';
import { promisify } from 'node:util';
import { assert } from '../util/assert.js';
import { DeltavolError, errnoCode } from '../util/errors.js';
import { loadFsx, type Fsx } from './native.js';
import { zeroBufferBytes } from '../util/limits.js';
import type { ZeroBlockScan } from '../util/zero-block-scan.js';

const readAsync = promisify(fs.read);
const writevAsync = promisify(fs.writev);
const fdatasyncAsync = promisify(fs.fdatasync);

export interface AllocationExtent {
  lengthBytes: number;
  /** True when the range is a hole (reads as zeroes, no space used). */
  hole: boolean;
}

export interface FileStoreOptions {
  readOnly: boolean;
  /** Reads/writes up to this many bytes are synchronous; 0 = always threadpool (read at each I/O). */
  readonly syncIoBytesMax: number;
  /** Reads only: up to this many bytes are synchronous (default syncIoBytesMax; read at each I/O). */
  readonly syncReadBytesMax?: number;
}

const ZEROES = Buffer.alloc(zeroBufferBytes);

export class FileStore {
  private readonly fsx: Fsx | null = loadFsx();
  private flushing: Promise<void> | null = null;
  private flushQueued: Promise<void> | null = null;
  /** Whether punching holes works on this file system (learned on first try). */
  private punchWorks = true;
  private zeroRangeWorks = true;
  private closed = false;

  private constructor(
    readonly path: string,
    readonly fd: number,
    public sizeBytes: number,
    private readonly options: FileStoreOptions,
  ) {}

  static create(path: string, sizeBytes: number): void {
    const fd = fs.openSync(path, 'wx', 0o600);
    try {
      truncateOrBadSize(fd, sizeBytes, nodePath.dirname(path));
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  }

  static open(path: string, options: FileStoreOptions): FileStore {
    const fd = fs.openSync(path, options.readOnly ? 'r' : 'r+');
    const size = fs.fstatSync(fd).size;
    return new FileStore(path, fd, size, options);
  }

  /** For writers that go around write() (file-store-data's batched ranges): the file is open for writing. */
  assertWritable(): void {
    assert(!this.closed, 'write on a closed file');
    assert(!this.options.readOnly, 'write to a read-only file');
  }

  get canPunch(): boolean {
    return this.fsx !== null && this.punchWorks;
  }

  /** Reads in the threadpool count the zero blocks `scan` asks for where the addon can. */
  read(offset: number, length: number, target: Buffer, scan?: ZeroBlockScan): void | Promise<void> {
    assert(!this.closed, 'read on a closed file');
    assert(target.length >= length, 'read target too small');
    if (length <= (this.options.syncReadBytesMax ?? this.options.syncIoBytesMax)) {
      let done = 0;
      while (done < length) {
        const n = fs.readSync(this.fd, target, done, length - done, offset + done);
        if (n === 0) {
          target.fill(0, done, length); // past EOF reads as zeroes
          break;
        }
        done += n;
      }
      return;
    }
    const preadScan = this.fsx?.preadScan;
    if (preadScan !== undefined) {
      const counted = preadScan(this.fd, target, 0, length, offset, scan?.blockBytes ?? 0);
      return scan === undefined ? (counted as unknown as Promise<void>) : counted.then((zeroBlocks) => { scan.zeroBlocks = zeroBlocks; });
    }
    return this.readLoop(offset, length, target);
  }

  private async readLoop(offset: number, length: number, target: Buffer): Promise<void> {
    let done = 0;
    while (done < length) {
      const { bytesRead } = await readAsync(this.fd, target, done, length - done, offset + done);
      if (bytesRead === 0) {
        target.fill(0, done, length);
        break;
      }
      done += bytesRead;
    }
  }

  /**
   * Writes bytes waiting in a pipe (a WRITE spliced from its socket: util/piped-bytes.ts), on
   * the loop or in the threadpool by the same size rule as write().
   */
  writePiped(offset: number, bytes: PipedBytes): void | Promise<void> {
    assert(!this.closed, 'write on a closed file');
    assert(!this.options.readOnly, 'write to a read-only file');
    if (bytes.length <= this.options.syncIoBytesMax) return bytes.moveToFileSync(this.fd, offset);
    return bytes.moveToFile(this.fd, offset);
  }

  write(offset: number, chunks: Buffer[]): void | Promise<void> {
    assert(!this.closed, 'write on a closed file');
    let total = 0;
    for (const c of chunks) total += c.length;
    if (total <= this.options.syncIoBytesMax) {
      let written = chunks.length === 1 ? fs.writeSync(this.fd, chunks[0]!, 0, total, offset) : fs.writevSync(this.fd, chunks, offset);
      if (written < total) this.writeRestSync(offset, chunks, written, total);
      return;
    }
    return this.writeLoop(offset, chunks, total);
  }

  private writeRestSync(offset: number, chunks: Buffer[], written: number, total: number): void {
    const all = Buffer.concat(chunks, total);
    while (written < total) {
      written += fs.writeSync(this.fd, all, written, total - written, offset + written);
    }
  }

  private async writeLoop(offset: number, chunks: Buffer[], total: number): Promise<void> {
    // writev takes at most IOV_MAX (1024) buffers; Node splits socket data in ≤ 64 KiB
    // pieces so a 32 MiB write has ~512: under the limit, but loop to be safe.
    let written = 0;
    let idx = 0;
    while (idx < chunks.length) {
      const batch = chunks.slice(idx, idx + 1024);
      let batchBytes = 0;
      for (const c of batch) batchBytes += c.length;
      const n = (await writevAsync(this.fd, batch, offset + written)) as unknown as number;
      if (n < batchBytes) {
        const rest = Buffer.concat(batch).subarray(n);
        let done = 0;
        while (done < rest.length) {
          const w = fs.writeSync(this.fd, rest, done, rest.length - done, offset + written + n + done);
          done += w;
        }
      }
      written += batchBytes;
      idx += batch.length;
    }
    assert(written === total, 'writev wrote a different byte count');
  }

  /**
   * Makes every write that completed before this call durable. Concurrent callers share
   * fdatasync calls: while one runs, later callers wait for the next one (group commit).
   */
  flush(): Promise<void> {
    if (this.closed) return Promise.resolve();
    if (!this.flushing) {
      this.flushing = fdatasyncAsync(this.fd).finally(() => {
        this.flushing = null;
      });
      return this.flushing;
    }
    if (!this.flushQueued) {
      this.flushQueued = this.flushing.catch(() => undefined).then(() => {
        this.flushQueued = null;
        return this.flush();
      });
    }
    return this.flushQueued;
  }

  /**
   * Makes [offset, offset+length) read as zeroes. With keepAllocated, the range stays
   * provisioned (NO_HOLE). Returns false when it could only be done by writing zeroes
   * and `fastOnly` was asked (the caller reports ENOTSUP).
   */
  zero(offset: number, length: number, keepAllocated: boolean, fastOnly: boolean): boolean | Promise<boolean> {
    const fsx = this.fsx;
    if (fsx && !keepAllocated && this.punchWorks) {
      try {
        fsx.punchHole(this.fd, offset, length);
        return true;
      } catch (e) {
        if (!this.isUnsupported(e)) throw e;
        this.punchWorks = false;
      }
    }
    if (fsx && keepAllocated && this.zeroRangeWorks) {
      try {
        fsx.zeroRange(this.fd, offset, length);
        return true;
      } catch (e) {
        if (!this.isUnsupported(e)) throw e;
        this.zeroRangeWorks = false;
      }
    }
    if (fsx && keepAllocated && this.punchWorks) {
      // No ZERO_RANGE (tmpfs): punch, then allocate again.
      try {
        fsx.punchHole(this.fd, offset, length);
        fsx.allocate(this.fd, offset, length);
        return true;
      } catch (e) {
        if (!this.isUnsupported(e)) throw e;
      }
    }
    if (fastOnly) return false;
    return this.writeZeroes(offset, length).then(() => true);
  }

  private isUnsupported(e: unknown): boolean {
    const code = (e as { code?: string }).code;
    return code === 'EOPNOTSUPP' || code === 'ENOSYS' || code === 'ENOTSUP';
  }

  private async writeZeroes(offset: number, length: number): Promise<void> {
    let done = 0;
    while (done < length) {
      const n = Math.min(ZEROES.length, length - done);
      await writevAsync(this.fd, [ZEROES.subarray(0, n)], offset + done);
      done += n;
    }
  }

  /**
   * Data and hole extents covering at least [offset, offset+length) (the last one may
   * reach further, never past the file size), at most extentsMax of them.
   */
  allocation(offset: number, length: number, extentsMax: number): AllocationExtent[] {
    const end = Math.min(this.sizeBytes, offset + length);
    if (!this.fsx) return [{ lengthBytes: end - offset, hole: false }];
    const out: AllocationExtent[] = [];
    let pos = offset;
    while (pos < end && out.length < extentsMax) {
      let dataAt = this.fsx.seekData(this.fd, pos);
      if (dataAt < 0 || dataAt > this.sizeBytes) dataAt = this.sizeBytes;
      if (dataAt > pos) {
        out.push({ lengthBytes: Math.min(dataAt, end) - pos, hole: true });
        pos = Math.min(dataAt, end);
        continue;
      }
      let holeAt = this.fsx.seekHole(this.fd, pos);
      if (holeAt < 0 || holeAt > this.sizeBytes) holeAt = this.sizeBytes;
      assert(holeAt > pos, 'SEEK_HOLE must move forward from data');
      out.push({ lengthBytes: Math.min(holeAt, end) - pos, hole: false });
      pos = Math.min(holeAt, end);
    }
    return out;
  }

  /** Bytes the file really occupies on disk. */
  allocatedBytes(): number {
    return fs.fstatSync(this.fd).blocks * 512;
  }

  /** Grows the file (never shrinks: callers check). */
  resize(sizeBytes: number): void {
    assert(sizeBytes >= this.sizeBytes, 'FileStore.resize only grows');
    truncateOrBadSize(this.fd, sizeBytes, nodePath.dirname(this.path));
    fs.fsyncSync(this.fd);
    this.sizeBytes = sizeBytes;
  }

  /** Asks the kernel to read a range ahead (NBD_CMD_CACHE); a hint, so failures are ignored. */
  prefetch(offset: number, length: number): void {
    try {
      this.fsx?.willNeed(this.fd, offset, length);
    } catch {
      // advisory only
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
  }
}

/** ftruncate, with EFBIG (larger than the file system allows) reported as BAD_SIZE with the limit. */
function truncateOrBadSize(fd: number, sizeBytes: number, dir: string): void {
  try {
    fs.ftruncateSync(fd, sizeBytes);
  } catch (e) {
    if (errnoCode(e) !== 'EFBIG' && errnoCode(e) !== 'EINVAL') throw e;
    const max = fileSizeBytesMax(dir);
    if (max === null || sizeBytes <= max) throw e;
    throw new DeltavolError('BAD_SIZE', `volume size ${sizeBytes} is larger than the file system at ${dir} allows (at most ${max} bytes)`, { sizeBytesMax: max });
  }
}

/**
 * The largest file the file system holding dir allows, found by truncating a scratch file
 * (sparse: no blocks are written) in a binary search; null if no scratch file can be made.
 * Only called after an EFBIG, so its ~53 truncates cost nothing in the normal path.
 */
export function fileSizeBytesMax(dir: string): number | null {
  const scratch = nodePath.join(dir, `.size-probe-${process.pid}`);
  let fd: number;
  try {
    fd = fs.openSync(scratch, 'w', 0o600);
  } catch {
    return null;
  }
  try {
    let lo = 0; // known to work
    let hi = Number.MAX_SAFE_INTEGER + 1; // treated as failing
    while (hi - lo > 1) {
      const mid = lo + Math.floor((hi - lo) / 2);
      try {
        fs.ftruncateSync(fd, mid);
        lo = mid;
      } catch {
        hi = mid;
      }
    }
    return lo;
  } finally {
    fs.closeSync(fd);
    fs.rmSync(scratch, { force: true });
  }
}
