// Why: a snapshot differential L→M must travel (to a file, to another volume, later to a
// peer) as a self-checking byte stream. Format (all integers big-endian):
//   header:  "DVDIFF01" | u32 n | n bytes of JSON (DiffHeader)
//   record:  u8 type (1 data, 2 zero) | u64 offset | u32 length | data (type 1 only)
//   trailer: u8 0 | u32 records | u64 data bytes | u32 crc32c of every byte before the trailer
// Records come in block order and never overlap. The decoder is a push parser that accepts
// chunks of any size and fails on a bad magic, a bad record or a checksum mismatch.

import { crc32c } from '@node-rs/crc32';
import { DeltavolError } from '../util/errors.js';

export const DIFF_MAGIC = Buffer.from('DVDIFF01', 'ascii');
const TYPE_END = 0;
const TYPE_DATA = 1;
const TYPE_ZERO = 2;
const RECORD_HEADER_BYTES = 13;
const TRAILER_BYTES = 1 + 4 + 8 + 4;
const HEADER_JSON_BYTES_MAX = 64 * 1024;
/** A data record carries at most this many bytes (the encoder's runs are far smaller). */
export const DIFF_RECORD_BYTES_MAX = 64 * 1024 * 1024;

export interface DiffHeader {
  volume: string;
  from: string;
  to: string;
  blockBytes: number;
  sizeBytes: number;
  createdAt: string;
}

export interface DiffRun {
  offsetBytes: number;
  lengthBytes: number;
  /** null: the range reads as zeroes. */
  data: Buffer | null;
}

function u64(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 4294967296), at);
  b.writeUInt32BE(v >>> 0, at + 4);
}

/** Encodes runs into stream pieces; the checksum covers everything before the trailer. */
export class DiffEncoder {
  private crc = 0;
  private records = 0;
  private dataBytes = 0;

  header(h: DiffHeader): Buffer {
    const json = Buffer.from(JSON.stringify(h), 'utf8');
    const b = Buffer.alloc(DIFF_MAGIC.length + 4 + json.length);
    DIFF_MAGIC.copy(b, 0);
    b.writeUInt32BE(json.length, 8);
    json.copy(b, 12);
    this.crc = crc32c(b, this.crc);
    return b;
  }

  run(r: DiffRun): Buffer[] {
    const h = Buffer.alloc(RECORD_HEADER_BYTES);
    h.writeUInt8(r.data ? TYPE_DATA : TYPE_ZERO, 0);
    u64(h, 1, r.offsetBytes);
    h.writeUInt32BE(r.lengthBytes, 9);
    this.crc = crc32c(h, this.crc);
    this.records++;
    if (!r.data) return [h];
    this.crc = crc32c(r.data, this.crc);
    this.dataBytes += r.data.length;
    return [h, r.data];
  }

  trailer(): Buffer {
    const t = Buffer.alloc(TRAILER_BYTES);
    t.writeUInt8(TYPE_END, 0);
    t.writeUInt32BE(this.records, 1);
    u64(t, 5, this.dataBytes);
    t.writeUInt32BE(this.crc >>> 0, 13);
    return t;
  }
}

type State = 'magic' | 'header' | 'record' | 'data' | 'done';

/** Push parser: feed chunks; runs come out through onRun; end() checks the trailer was seen. */
export class DiffDecoder {
  private buf: Buffer = Buffer.alloc(0);
  private state: State = 'magic';
  private headerBytes = 0;
  private crc = 0;
  private records = 0;
  private dataBytes = 0;
  private pending: { offsetBytes: number; lengthBytes: number; header: Buffer } | null = null;
  private lastEnd = 0;
  header: DiffHeader | null = null;

  constructor(private readonly onRun: (r: DiffRun) => void) {}

  private fail(message: string): never {
    throw new DeltavolError('BAD_STREAM', `differential stream: ${message}`);
  }

  push(chunk: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    for (;;) {
      switch (this.state) {
        case 'magic': {
          if (this.buf.length < 12) return;
          if (!this.buf.subarray(0, 8).equals(DIFF_MAGIC)) this.fail('not a deltavol differential (bad magic)');
          this.headerBytes = this.buf.readUInt32BE(8);
          if (this.headerBytes > HEADER_JSON_BYTES_MAX) this.fail('header too large');
          this.state = 'header';
          break;
        }
        case 'header': {
          const n = 12 + this.headerBytes;
          if (this.buf.length < n) return;
          try {
            this.header = JSON.parse(this.buf.toString('utf8', 12, n)) as DiffHeader;
          } catch {
            this.fail('header is not valid JSON');
          }
          this.crc = crc32c(this.buf.subarray(0, n), this.crc);
          this.buf = this.buf.subarray(n);
          this.state = 'record';
          break;
        }
        case 'record': {
          if (this.buf.length < 1) return;
          const type = this.buf.readUInt8(0);
          if (type === TYPE_END) {
            if (this.buf.length < TRAILER_BYTES) return;
            const records = this.buf.readUInt32BE(1);
            const dataBytes = this.buf.readUInt32BE(5) * 4294967296 + this.buf.readUInt32BE(9);
            const crc = this.buf.readUInt32BE(13);
            if (records !== this.records || dataBytes !== this.dataBytes) this.fail('trailer counts do not match the records');
            if (crc !== this.crc >>> 0) this.fail('checksum mismatch');
            this.buf = this.buf.subarray(TRAILER_BYTES);
            this.state = 'done';
            break;
          }
          if (this.buf.length < RECORD_HEADER_BYTES) return;
          if (type !== TYPE_DATA && type !== TYPE_ZERO) this.fail(`unknown record type ${type}`);
          const offsetBytes = this.buf.readUInt32BE(1) * 4294967296 + this.buf.readUInt32BE(5);
          const lengthBytes = this.buf.readUInt32BE(9);
          const size = this.header!.sizeBytes;
          if (lengthBytes === 0 || offsetBytes < this.lastEnd || offsetBytes + lengthBytes > size || lengthBytes > DIFF_RECORD_BYTES_MAX) {
            this.fail(`bad record ${offsetBytes}+${lengthBytes}`);
          }
          const header = Buffer.from(this.buf.subarray(0, RECORD_HEADER_BYTES));
          this.buf = this.buf.subarray(RECORD_HEADER_BYTES);
          this.lastEnd = offsetBytes + lengthBytes;
          if (type === TYPE_ZERO) {
            this.crc = crc32c(header, this.crc);
            this.records++;
            this.onRun({ offsetBytes, lengthBytes, data: null });
          } else {
            this.pending = { offsetBytes, lengthBytes, header };
            this.state = 'data';
          }
          break;
        }
        case 'data': {
          const p = this.pending!;
          if (this.buf.length < p.lengthBytes) return;
          const data = Buffer.from(this.buf.subarray(0, p.lengthBytes));
          this.buf = this.buf.subarray(p.lengthBytes);
          this.crc = crc32c(data, crc32c(p.header, this.crc));
          this.records++;
          this.dataBytes += data.length;
          this.pending = null;
          this.state = 'record';
          this.onRun({ offsetBytes: p.offsetBytes, lengthBytes: p.lengthBytes, data });
          break;
        }
        case 'done':
          if (this.buf.length > 0) this.fail('bytes after the trailer');
          return;
      }
    }
  }

  end(): { records: number; dataBytes: number } {
    if (this.state !== 'done') this.fail('stream ended before its trailer (truncated)');
    return { records: this.records, dataBytes: this.dataBytes };
  }
}
