// Why: the engine's metadata (bitmap pages, the activity log, snapshot save areas and
// manifests) must survive a crash at any instant, and that can only be tested if the file
// system is a parameter: production passes nodeDurableFs(dir), tests pass a simulated one
// that loses or tears every write not yet synced when it "crashes" (STYLE.md practice 8).
// Small positional reads and writes are synchronous (PERF.md: cheaper than the
// threadpool for a few KiB in page cache); sync() is where the waiting happens.

import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { fsyncDirSync, writeFileAtomicSync } from './atomic-file.js';
import { SyncMode } from './sync-mode.js';

const fdatasyncAsync = promisify(fs.fdatasync);

/** Where metadata syncs run (sync-mode.ts): on the loop while fast, else in the threadpool. */
const syncMode = new SyncMode();

async function adaptiveSync(fd: number): Promise<void> {
  if (syncMode.inPool(Date.now())) return fdatasyncAsync(fd);
  const t = process.hrtime.bigint();
  fs.fdatasyncSync(fd);
  syncMode.record(Number(process.hrtime.bigint() - t), Date.now());
}

export interface DurableFile {
  readonly name: string;
  sizeBytes(): number;
  /** Reads up to length bytes at position; returns the count (short only at end of file). */
  read(position: number, target: Uint8Array, offset: number, length: number): number;
  write(position: number, source: Uint8Array, offset: number, length: number): void;
  /** Writes the sources back to back from position, in one system call where it can (optional: else write each). */
  writev?(position: number, sources: readonly Uint8Array[]): void;
  truncate(sizeBytes: number): void;
  /** Every write that returned before this call is durable when the promise resolves. */
  sync(): Promise<void>;
  close(): void;
  /** Optional: the open descriptor (a real file: a sender may send from it; not after close). */
  readonly fd?: number;
}

export interface DurableFs {
  /** Opens a file; `create` makes it (and its directory entry) durable if it is new. */
  open(name: string, create: boolean): DurableFile;
  exists(name: string): boolean;
  remove(name: string): void;
  /**
   * Renames `from` over `to` atomically and durably (the directory is synced before this
   * returns); the file's own unsynced writes stay unsynced. Open handles follow the file.
   */
  rename(from: string, to: string): void;
  /** Replaces a whole small file atomically and durably (manifests). */
  writeAtomic(name: string, data: Uint8Array): void;
  /** The whole file, or null if it does not exist. */
  readAll(name: string): Buffer | null;
  /** Names of the files present. */
  list(): string[];
}

class NodeFile implements DurableFile {
  constructor(
    readonly name: string,
    readonly fd: number,
  ) {}
  sizeBytes(): number {
    return fs.fstatSync(this.fd).size;
  }
  read(position: number, target: Uint8Array, offset: number, length: number): number {
    let done = 0;
    while (done < length) {
      const n = fs.readSync(this.fd, target, offset + done, length - done, position + done);
      if (n === 0) break;
      done += n;
    }
    return done;
  }
  write(position: number, source: Uint8Array, offset: number, length: number): void {
    let done = 0;
    while (done < length) done += fs.writeSync(this.fd, source, offset + done, length - done, position + done);
  }
  writev(position: number, sources: readonly Uint8Array[]): void {
    let total = 0;
    for (const s of sources) total += s.length;
    const done = fs.writevSync(this.fd, sources as Uint8Array[], position);
    if (done === total) return;
    // A short writev (rare): the rest one source at a time.
    let skip = done;
    let at = position + done;
    for (const s of sources) {
      if (skip >= s.length) {
        skip -= s.length;
        continue;
      }
      this.write(at, s, skip, s.length - skip);
      at += s.length - skip;
      skip = 0;
    }
  }
  truncate(sizeBytes: number): void {
    fs.ftruncateSync(this.fd, sizeBytes);
  }
  sync(): Promise<void> {
    return adaptiveSync(this.fd);
  }
  close(): void {
    fs.closeSync(this.fd);
  }
}

/** The real file system, rooted at one directory (names are plain file names). */
export function nodeDurableFs(dir: string): DurableFs {
  const at = (name: string) => path.join(dir, name);
  return {
    open(name, create) {
      const existed = fs.existsSync(at(name));
      const fd = fs.openSync(at(name), create ? 'a+' : 'r+', 0o600);
      // 'a+' would append on write; reopen read/write without O_APPEND now that it exists.
      let rw = fd;
      if (create) {
        fs.closeSync(fd);
        rw = fs.openSync(at(name), 'r+');
        if (!existed) {
          fs.fsyncSync(rw);
          fsyncDirSync(dir);
        }
      }
      return new NodeFile(name, rw);
    },
    exists: (name) => fs.existsSync(at(name)),
    remove(name) {
      fs.rmSync(at(name), { force: true });
      fsyncDirSync(dir);
    },
    rename(from, to) {
      fs.renameSync(at(from), at(to));
      fsyncDirSync(dir);
    },
    writeAtomic: (name, data) => writeFileAtomicSync(at(name), Buffer.from(data.buffer, data.byteOffset, data.byteLength)),
    readAll(name) {
      try {
        return fs.readFileSync(at(name));
      } catch (e) {
        if ((e as { code?: string }).code === 'ENOENT') return null;
        throw e;
      }
    },
    list: () => fs.readdirSync(dir, { withFileTypes: true }).filter((e) => e.isFile()).map((e) => e.name),
  };
}
