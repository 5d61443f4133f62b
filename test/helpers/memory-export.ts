// Why: protocol tests need an export with known contents and no disk: this one keeps
// bytes in memory and reports zero-filled 4 KiB pages as holes.
import { payloadChunks, type WritePayload } from '../../src/util/piped-bytes.js';
import type { ExportCatalog, ExportFeatures, Extent, NbdExport, WriteZeroesOptions } from '../../src/nbd/export.js';
import * as C from '../../src/nbd/constants.js';

export class MemoryExport implements NbdExport {
  readonly data: Buffer;
  readonly metaContexts = [C.CONTEXT_BASE_ALLOCATION];
  closed = 0;
  calls: string[] = [];
  /** When set, the next call of that name throws an error with this code. */
  failNext: { op: string; code: string } | null = null;
  /** Make operations complete asynchronously. */
  async = false;

  constructor(
    readonly name: string,
    readonly sizeBytes: number,
    readonly features: ExportFeatures = {
      readOnly: false,
      flush: true,
      fua: true,
      trim: true,
      writeZeroes: true,
      fastZero: true,
      cache: true,
      multiConn: true,
    },
    readonly description = '',
  ) {
    this.data = Buffer.alloc(sizeBytes);
  }

  private op<T>(name: string, fn: () => T): T | Promise<T> {
    this.calls.push(name);
    if (this.failNext && this.failNext.op === name) {
      const code = this.failNext.code;
      this.failNext = null;
      const e = Object.assign(new Error(`injected ${code}`), { code });
      if (this.async) return Promise.reject(e);
      throw e;
    }
    if (this.async) return new Promise((r) => setImmediate(() => r(fn())));
    return fn();
  }

  read(offset: number, length: number, target: Buffer) {
    return this.op('read', () => {
      this.data.copy(target, 0, offset, offset + length);
    });
  }
  write(offset: number, payload: WritePayload) {
    return this.op('write', () => {
      let pos = offset;
      for (const c of payloadChunks(payload)) {
        c.copy(this.data, pos);
        pos += c.length;
      }
    });
  }
  flush() {
    return this.op('flush', () => undefined);
  }
  trim(offset: number, length: number) {
    return this.op('trim', () => {
      this.data.fill(0, offset, offset + length);
    });
  }
  writeZeroes(offset: number, length: number, _o: WriteZeroesOptions) {
    return this.op('zero', () => {
      this.data.fill(0, offset, offset + length);
    });
  }
  cache() {
    return this.op('cache', () => undefined);
  }
  blockStatus(_context: string, offset: number, length: number, extentsMax: number): Extent[] | Promise<Extent[]> {
    return this.op('block_status', () => {
      const page = 4096;
      const out: Extent[] = [];
      let pos = offset;
      const end = Math.min(this.sizeBytes, offset + length);
      while (pos < end && out.length < extentsMax) {
        const next = Math.min(end, (Math.floor(pos / page) + 1) * page);
        const zero = this.data.subarray(pos, next).every((b) => b === 0);
        const flags = zero ? C.STATE_HOLE | C.STATE_ZERO : 0;
        const last = out[out.length - 1];
        if (last && last.flags === flags) last.lengthBytes += next - pos;
        else out.push({ lengthBytes: next - pos, flags });
        pos = next;
      }
      return out;
    });
  }
  close() {
    this.closed++;
  }
}

export class MemoryCatalog implements ExportCatalog {
  constructor(
    readonly exports: MemoryExport[],
    private readonly defaultExport?: string,
  ) {}
  list() {
    return this.exports.map((e) => ({ name: e.name, description: e.description }));
  }
  defaultName() {
    return this.defaultExport;
  }
  open(name: string) {
    const n = name === '' ? this.defaultExport : name;
    return this.exports.find((e) => e.name === n);
  }
  metaContexts(name: string) {
    return this.open(name)?.metaContexts;
  }
}
