// Why: tests speak NBD bytes directly: build requests and options, parse replies.
import * as C from '../../src/nbd/constants.js';

export function request(type: number, opts: { flags?: number; cookie?: number; offset?: number; length?: number } = {}): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(C.REQUEST_MAGIC, 0);
  b.writeUInt16BE(opts.flags ?? 0, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(0, 8);
  b.writeUInt32BE(opts.cookie ?? 1, 12);
  const off = opts.offset ?? 0;
  b.writeUInt32BE(Math.floor(off / 4294967296), 16);
  b.writeUInt32BE(off >>> 0, 20);
  b.writeUInt32BE(opts.length ?? 0, 24);
  return b;
}

export function option(opt: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(C.IHAVEOPT, 0);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(data.length, 12);
  return Buffer.concat([h, data]);
}

export function goData(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((i, k) => b.writeUInt16BE(i, 6 + n.length + 2 * k));
  return b;
}

export function metaData(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const n = Buffer.from(name);
  const h = Buffer.alloc(4);
  h.writeUInt32BE(n.length);
  parts.push(h, n);
  const c = Buffer.alloc(4);
  c.writeUInt32BE(queries.length);
  parts.push(c);
  for (const q of queries) {
    const qb = Buffer.from(q);
    const l = Buffer.alloc(4);
    l.writeUInt32BE(qb.length);
    parts.push(l, qb);
  }
  return Buffer.concat(parts);
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

/** Parses a run of option replies (magic-checked). */
export function parseOptionReplies(buf: Buffer): OptionReply[] {
  const out: OptionReply[] = [];
  let pos = 0;
  while (pos + 20 <= buf.length) {
    if (buf.readBigUInt64BE(pos) !== C.OPTION_REPLY_MAGIC) throw new Error(`bad option reply magic at ${pos}`);
    const len = buf.readUInt32BE(pos + 16);
    out.push({ option: buf.readUInt32BE(pos + 8), type: buf.readUInt32BE(pos + 12), data: buf.subarray(pos + 20, pos + 20 + len) });
    pos += 20 + len;
  }
  if (pos !== buf.length) throw new Error(`trailing ${buf.length - pos} bytes after option replies`);
  return out;
}
