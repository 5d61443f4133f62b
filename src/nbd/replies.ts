// Why: reply encoders. Read replies put their header in front of the data in one
// buffer (one socket write, no copy); the rest are small fixed frames.

import * as C from './constants.js';

/** Bytes to reserve before read data for a simple (16) or structured OFFSET_DATA (20 + 8) reply. */
export function readHeaderBytes(structured: boolean): number {
  return structured ? C.STRUCTURED_REPLY_HEADER_BYTES + 8 : C.SIMPLE_REPLY_HEADER_BYTES;
}

export function writeSimpleHeader(b: Buffer, at: number, error: number, cookieHi: number, cookieLo: number): void {
  b.writeUInt32BE(C.SIMPLE_REPLY_MAGIC, at);
  b.writeUInt32BE(error, at + 4);
  b.writeUInt32BE(cookieHi, at + 8);
  b.writeUInt32BE(cookieLo, at + 12);
}

export function simpleReply(error: number, cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(C.SIMPLE_REPLY_HEADER_BYTES);
  writeSimpleHeader(b, 0, error, cookieHi, cookieLo);
  return b;
}

export function writeChunkHeader(
  b: Buffer,
  at: number,
  flags: number,
  type: number,
  cookieHi: number,
  cookieLo: number,
  length: number,
): void {
  b.writeUInt32BE(C.STRUCTURED_REPLY_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  b.writeUInt32BE(cookieHi, at + 8);
  b.writeUInt32BE(cookieLo, at + 12);
  b.writeUInt32BE(length, at + 16);
}

/** OFFSET_DATA header (chunk header + offset) written at b[at..at+28); data follows. */
export function writeOffsetDataHeader(
  b: Buffer,
  at: number,
  done: boolean,
  cookieHi: number,
  cookieLo: number,
  offset: number,
  dataBytes: number,
): void {
  writeChunkHeader(b, at, done ? C.REPLY_FLAG_DONE : 0, C.REPLY_TYPE_OFFSET_DATA, cookieHi, cookieLo, 8 + dataBytes);
  writeUInt64(b, at + 20, offset);
}

export function offsetHoleChunk(done: boolean, cookieHi: number, cookieLo: number, offset: number, holeBytes: number): Buffer {
  const b = Buffer.allocUnsafe(C.STRUCTURED_REPLY_HEADER_BYTES + 12);
  writeChunkHeader(b, 0, done ? C.REPLY_FLAG_DONE : 0, C.REPLY_TYPE_OFFSET_HOLE, cookieHi, cookieLo, 12);
  writeUInt64(b, 20, offset);
  b.writeUInt32BE(holeBytes, 28);
  return b;
}

export function noneChunk(cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(C.STRUCTURED_REPLY_HEADER_BYTES);
  writeChunkHeader(b, 0, C.REPLY_FLAG_DONE, C.REPLY_TYPE_NONE, cookieHi, cookieLo, 0);
  return b;
}

export function errorChunk(error: number, message: string, cookieHi: number, cookieLo: number): Buffer {
  const msg = Buffer.from(message.slice(0, 512), 'utf8');
  const b = Buffer.allocUnsafe(C.STRUCTURED_REPLY_HEADER_BYTES + 6 + msg.length);
  writeChunkHeader(b, 0, C.REPLY_FLAG_DONE, C.REPLY_TYPE_ERROR, cookieHi, cookieLo, 6 + msg.length);
  b.writeUInt32BE(error, 20);
  b.writeUInt16BE(msg.length, 24);
  msg.copy(b, 26);
  return b;
}

export function blockStatusChunk(
  done: boolean,
  cookieHi: number,
  cookieLo: number,
  contextId: number,
  extents: readonly { lengthBytes: number; flags: number }[],
): Buffer {
  const payload = 4 + 8 * extents.length;
  const b = Buffer.allocUnsafe(C.STRUCTURED_REPLY_HEADER_BYTES + payload);
  writeChunkHeader(b, 0, done ? C.REPLY_FLAG_DONE : 0, C.REPLY_TYPE_BLOCK_STATUS, cookieHi, cookieLo, payload);
  b.writeUInt32BE(contextId, 20);
  let at = 24;
  for (const e of extents) {
    b.writeUInt32BE(e.lengthBytes, at);
    b.writeUInt32BE(e.flags, at + 4);
    at += 8;
  }
  return b;
}

function writeUInt64(b: Buffer, at: number, value: number): void {
  b.writeUInt32BE(Math.floor(value / 4294967296), at);
  b.writeUInt32BE(value >>> 0, at + 4);
}
