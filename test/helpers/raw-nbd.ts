// Why: some interop checks need bytes no well-behaved client sends (unknown commands,
// bad magic, a handshake dribbled one byte at a time, a flood of options). This is a
// minimal NBD client over a raw socket, written from doc/proto.md and independent of
// src/, so the tests compare the server with the spec and not with itself.

import net from 'node:net';

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED_REPLY: 8 } as const;
export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  ERR_UNSUP: 2 ** 31 + 1,
  ERR_POLICY: 2 ** 31 + 2,
  ERR_INVALID: 2 ** 31 + 3,
  ERR_TLS_REQD: 2 ** 31 + 5,
  ERR_UNKNOWN: 2 ** 31 + 6,
} as const;
export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 } as const;
export const REPLY_TYPE = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, ERROR: 2 ** 15 + 1 } as const;

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export interface SimpleReply {
  error: number;
  cookie: bigint;
}

export interface StructuredChunk {
  flags: number;
  type: number;
  cookie: bigint;
  data: Buffer;
}

export class RawNbd {
  /** Received bytes not yet read, as the chunks they came in (joining on every chunk is quadratic for 100 MiB replies). */
  private chunks: Buffer[] = [];
  private bufBytes = 0;
  private ended = false;
  private wake: (() => void) | null = null;
  private readonly closedPromise: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    socket.setNoDelay(true);
    socket.on('data', (b: Buffer) => {
      this.chunks.push(b);
      this.bufBytes += b.length;
      this.wake?.();
    });
    this.closedPromise = new Promise((resolve) => {
      socket.on('close', () => {
        this.ended = true;
        this.wake?.();
        resolve();
      });
    });
    socket.on('end', () => {
      this.ended = true;
      this.wake?.();
    });
    socket.on('error', () => {
      this.ended = true;
      this.wake?.();
    });
  }

  /** Speaks over an already connected socket (a TLS socket after NBD_OPT_STARTTLS). */
  static over(socket: net.Socket): RawNbd {
    return new RawNbd(socket);
  }

  /** `localAddress` picks the source address (127.0.0.2 on loopback looks like a second host). */
  static connect(target: { port: number; localAddress?: string } | { path: string }): Promise<RawNbd> {
    return new Promise((resolve, reject) => {
      const s = 'port' in target ? net.connect({ port: target.port, host: '127.0.0.1', localAddress: target.localAddress }) : net.connect(target.path);
      s.once('connect', () => resolve(new RawNbd(s)));
      s.once('error', reject);
    });
  }

  /**
   * A client that uses NBD_OPT_EXPORT_NAME, as old clients do: it negotiated no block sizes
   * and gets simple replies only. Returns in transmission.
   */
  static async exportName(port: number, name: string): Promise<RawNbd> {
    const c = await RawNbd.connect({ port });
    await c.greeting();
    c.write(RawNbd.clientFlags(3)); // FIXED_NEWSTYLE | NO_ZEROES
    c.write(RawNbd.option(OPT.EXPORT_NAME, Buffer.from(name)));
    await c.read(8 + 2);
    return c;
  }

  /** Exactly n bytes; rejects on EOF or after timeoutMs. */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.bufBytes < n) {
      if (this.ended) throw new Error(`EOF after ${this.bufBytes} of ${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.bufBytes})`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = null;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - filled);
      c.copy(out, filled, 0, k);
      filled += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.bufBytes -= n;
    return out;
  }

  /** Resolves true if the server closes the connection within timeoutMs (bytes it sent first are dropped). */
  async closedWithin(timeoutMs: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean>((r) => {
      timer = setTimeout(() => r(false), timeoutMs);
    });
    const closed = this.closedPromise.then(() => true);
    const result = await Promise.race([closed, timeout]);
    clearTimeout(timer);
    return result;
  }

  /** Bytes received and not yet read. */
  get buffered(): number {
    return this.bufBytes;
  }

  write(b: Buffer): void {
    this.socket.write(b);
  }

  /** Writes one byte per socket write, pausing between them so they arrive as separate segments. */
  async writeSlowly(b: Buffer, pauseMs = 1): Promise<void> {
    for (let i = 0; i < b.length; i++) {
      this.socket.write(b.subarray(i, i + 1));
      await new Promise((r) => setTimeout(r, pauseMs));
    }
  }

  destroy(): void {
    this.socket.destroy();
  }

  // ---- handshake ----

  /** Reads the 18-byte greeting; returns the handshake flags. */
  async greeting(): Promise<number> {
    const g = await this.read(18);
    if (g.readBigUInt64BE(0) !== NBDMAGIC) throw new Error('bad NBDMAGIC');
    if (g.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('server is not newstyle');
    return g.readUInt16BE(16);
  }

  static clientFlags(flags = 3): Buffer {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(flags, 0);
    return b;
  }

  static option(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    return Buffer.concat([h, data]);
  }

  /** NBD_OPT_GO / NBD_OPT_INFO data: name and a list of NBD_INFO requests. */
  static goData(name: string, infos: number[] = []): Buffer {
    const n = Buffer.from(name, 'utf8');
    const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
    b.writeUInt32BE(n.length, 0);
    n.copy(b, 4);
    b.writeUInt16BE(infos.length, 4 + n.length);
    infos.forEach((i, k) => b.writeUInt16BE(i, 6 + n.length + 2 * k));
    return b;
  }

  async optionReply(timeoutMs = 5000): Promise<OptionReply> {
    const h = await this.read(20, timeoutMs);
    if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new Error(`bad option reply magic ${h.toString('hex')}`);
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: len ? await this.read(len, timeoutMs) : Buffer.alloc(0) };
  }

  /** Greeting, client flags, optional STRUCTURED_REPLY, GO; returns size and transmission flags. */
  async handshake(name: string, opts: { structured?: boolean } = {}): Promise<{ size: bigint; flags: number }> {
    await this.greeting();
    this.write(RawNbd.clientFlags());
    if (opts.structured) {
      this.write(RawNbd.option(OPT.STRUCTURED_REPLY));
      const r = await this.optionReply();
      if (r.type !== REP.ACK) throw new Error(`STRUCTURED_REPLY refused: ${r.type}`);
    }
    this.write(RawNbd.option(OPT.GO, RawNbd.goData(name)));
    return this.goReplies();
  }

  /** Reads GO replies up to the ACK. */
  async goReplies(): Promise<{ size: bigint; flags: number }> {
    let size = -1n;
    let flags = -1;
    for (;;) {
      const r = await this.optionReply();
      if (r.type === REP.ACK) break;
      if (r.type !== REP.INFO) throw new Error(`GO failed: reply type 0x${r.type.toString(16)} ${r.data.toString()}`);
      if (r.data.readUInt16BE(0) === 0) {
        size = r.data.readBigUInt64BE(2);
        flags = r.data.readUInt16BE(10);
      }
    }
    return { size, flags };
  }

  // ---- transmission ----

  static request(type: number, opts: { flags?: number; cookie?: bigint; offset?: bigint | number; length?: number; magic?: number } = {}): Buffer {
    const b = Buffer.alloc(28);
    b.writeUInt32BE(opts.magic ?? REQUEST_MAGIC, 0);
    b.writeUInt16BE(opts.flags ?? 0, 4);
    b.writeUInt16BE(type, 6);
    b.writeBigUInt64BE(opts.cookie ?? 1n, 8);
    b.writeBigUInt64BE(BigInt(opts.offset ?? 0), 16);
    b.writeUInt32BE(opts.length ?? 0, 24);
    return b;
  }

  async simpleReply(timeoutMs = 5000): Promise<SimpleReply> {
    const h = await this.read(16, timeoutMs);
    const magic = h.readUInt32BE(0);
    if (magic !== SIMPLE_REPLY_MAGIC) throw new Error(`expected a simple reply, got magic 0x${magic.toString(16)}`);
    return { error: h.readUInt32BE(4), cookie: h.readBigUInt64BE(8) };
  }

  async structuredChunk(timeoutMs = 5000): Promise<StructuredChunk> {
    const h = await this.read(20, timeoutMs);
    const magic = h.readUInt32BE(0);
    if (magic !== STRUCTURED_REPLY_MAGIC) throw new Error(`expected a structured reply, got magic 0x${magic.toString(16)}`);
    const len = h.readUInt32BE(16);
    return {
      flags: h.readUInt16BE(4),
      type: h.readUInt16BE(6),
      cookie: h.readBigUInt64BE(8),
      data: len ? await this.read(len, timeoutMs) : Buffer.alloc(0),
    };
  }

  /** A structured-reply READ: assembles OFFSET_DATA / OFFSET_HOLE chunks up to DONE (throws on an error chunk). */
  async readStructured(offset: number, length: number, cookie = 79n, timeoutMs = 5000, onChunk?: (type: number) => void): Promise<Buffer> {
    this.write(RawNbd.request(CMD.READ, { cookie, offset, length }));
    const out = Buffer.alloc(length, 0xee);
    let covered = 0;
    for (;;) {
      const ch = await this.structuredChunk(timeoutMs);
      onChunk?.(ch.type);
      if (ch.cookie !== cookie) throw new Error(`chunk for cookie ${ch.cookie}, expected ${cookie}`);
      if (ch.type === REPLY_TYPE.OFFSET_DATA) {
        const at = Number(ch.data.readBigUInt64BE(0)) - offset;
        ch.data.copy(out, at, 8);
        covered += ch.data.length - 8;
      } else if (ch.type === REPLY_TYPE.OFFSET_HOLE) {
        const at = Number(ch.data.readBigUInt64BE(0)) - offset;
        const n = ch.data.readUInt32BE(8);
        out.fill(0, at, at + n);
        covered += n;
      } else if (ch.type !== REPLY_TYPE.NONE) {
        throw new Error(`READ failed: chunk type ${ch.type}, error ${ch.data.length >= 4 ? ch.data.readUInt32BE(0) : '?'}`);
      }
      if (ch.flags & 1) break;
    }
    if (covered !== length) throw new Error(`READ chunks covered ${covered} of ${length} bytes`);
    return out;
  }

  /** A simple-reply READ: returns the data (throws on an error reply). */
  async readSimple(offset: number, length: number, cookie = 77n): Promise<Buffer> {
    this.write(RawNbd.request(CMD.READ, { cookie, offset, length }));
    const r = await this.simpleReply();
    if (r.cookie !== cookie) throw new Error(`reply for cookie ${r.cookie}, expected ${cookie}`);
    if (r.error !== 0) throw new Error(`READ failed with error ${r.error}`);
    return this.read(length);
  }

  /** A simple-reply WRITE: returns the error code. */
  async writeSimple(offset: number, data: Buffer, cookie = 78n): Promise<number> {
    this.write(Buffer.concat([RawNbd.request(CMD.WRITE, { cookie, offset, length: data.length }), data]));
    const r = await this.simpleReply();
    if (r.cookie !== cookie) throw new Error(`reply for cookie ${r.cookie}, expected ${cookie}`);
    return r.error;
  }
}
