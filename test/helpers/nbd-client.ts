// Why: a deliberately small NBD client for tests that need to control the wire (fuzz
// canaries, crash tests): fixed newstyle, GO, simple replies, requests pipelined and
// matched by cookie. Real-world interop is tested with libnbd/qemu/kernel clients instead.
import net from 'node:net';
import * as C from '../../src/nbd/constants.js';
import { goData, option } from './wire.js';

export class MiniNbdClient {
  private buf = Buffer.alloc(0);
  private waiters = new Map<number, { resolve: (v: { error: number; data: Buffer }) => void; readLength: number }>();
  private nextCookie = 1;
  private waitingFor: { n: number; resolve: (b: Buffer) => void } | null = null;
  sizeBytes = 0;
  flags = 0;
  closed = false;

  private constructor(private readonly sock: net.Socket) {
    sock.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.pump();
    });
    sock.on('close', () => {
      this.closed = true;
      for (const w of this.waiters.values()) w.resolve({ error: -1, data: Buffer.alloc(0) });
      this.waiters.clear();
    });
    sock.on('error', () => undefined);
  }

  /**
   * blockSize false: do not ask for NBD_INFO_BLOCK_SIZE, so the server does not hold this
   * client to its advertised sizes (its minimum is 1 anyway; the 32 MiB maximum then does not apply).
   */
  static async connect(port: number, exportName: string, host = '127.0.0.1', opts: { blockSize?: boolean } = {}): Promise<MiniNbdClient> {
    const sock = net.connect({ port, host });
    await new Promise<void>((res, rej) => {
      sock.once('connect', () => res());
      sock.once('error', rej);
    });
    sock.setNoDelay(true);
    const c = new MiniNbdClient(sock);
    await c.handshake(exportName, opts.blockSize ?? true);
    return c;
  }

  private take(n: number): Promise<Buffer> {
    return new Promise((resolve) => {
      this.waitingFor = { n, resolve };
      this.pump();
    });
  }

  private inTransmission = false;

  private pump(): void {
    if (!this.inTransmission) {
      if (this.waitingFor && this.buf.length >= this.waitingFor.n) {
        const w = this.waitingFor;
        this.waitingFor = null;
        const out = this.buf.subarray(0, w.n);
        this.buf = this.buf.subarray(w.n);
        w.resolve(out);
      }
      return;
    }
    while (this.buf.length >= 16) {
      if (this.buf.readUInt32BE(0) !== C.SIMPLE_REPLY_MAGIC) throw new Error('bad reply magic');
      const error = this.buf.readUInt32BE(4);
      const cookie = this.buf.readUInt32BE(12);
      const w = this.waiters.get(cookie);
      if (!w) throw new Error(`reply for unknown cookie ${cookie}`);
      const need = error === 0 ? w.readLength : 0;
      if (this.buf.length < 16 + need) return;
      const data = Buffer.from(this.buf.subarray(16, 16 + need));
      this.buf = this.buf.subarray(16 + need);
      this.waiters.delete(cookie);
      w.resolve({ error, data });
    }
  }

  private async handshake(exportName: string, blockSize: boolean): Promise<void> {
    const greeting = await this.take(18);
    if (greeting.readBigUInt64BE(0) !== C.NBDMAGIC) throw new Error('bad greeting');
    this.sock.write(Buffer.from([0, 0, 0, C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES]));
    this.sock.write(option(C.OPT_GO, goData(exportName, blockSize ? [C.INFO_BLOCK_SIZE] : [])));
    for (;;) {
      const h = await this.take(20);
      const type = h.readUInt32BE(12);
      const len = h.readUInt32BE(16);
      const data = await this.take(len);
      if (type === C.REP_INFO && data.readUInt16BE(0) === C.INFO_EXPORT) {
        this.sizeBytes = Number(data.readBigUInt64BE(2));
        this.flags = data.readUInt16BE(10);
      } else if (type === C.REP_ACK) {
        break;
      } else if (type >= 2 ** 31) {
        throw new Error(`GO refused: ${type - 2 ** 31} ${data.toString()}`);
      }
    }
    this.inTransmission = true;
    this.pump();
  }

  request(type: number, offset: number, length: number, opts: { flags?: number; payload?: Buffer } = {}): Promise<{ error: number; data: Buffer }> {
    if (this.closed) return Promise.resolve({ error: -1, data: Buffer.alloc(0) });
    const cookie = this.nextCookie++;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(C.REQUEST_MAGIC, 0);
    h.writeUInt16BE(opts.flags ?? 0, 4);
    h.writeUInt16BE(type, 6);
    h.writeUInt32BE(cookie, 12);
    h.writeUInt32BE(Math.floor(offset / 2 ** 32), 16);
    h.writeUInt32BE(offset >>> 0, 20);
    h.writeUInt32BE(length, 24);
    const p = new Promise<{ error: number; data: Buffer }>((resolve) =>
      this.waiters.set(cookie, { resolve, readLength: type === C.CMD_READ ? length : 0 }),
    );
    this.sock.write(opts.payload ? Buffer.concat([h, opts.payload]) : h);
    return p;
  }

  read(offset: number, length: number) {
    return this.request(C.CMD_READ, offset, length);
  }
  write(offset: number, payload: Buffer, fua = false) {
    return this.request(C.CMD_WRITE, offset, payload.length, { payload, flags: fua ? C.CMDFLAG_FUA : 0 });
  }
  flush() {
    return this.request(C.CMD_FLUSH, 0, 0);
  }

  async disconnect(): Promise<void> {
    if (this.closed) return;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(C.REQUEST_MAGIC, 0);
    h.writeUInt16BE(C.CMD_DISC, 6);
    this.sock.end(h);
    await new Promise<void>((r) => (this.closed ? r() : this.sock.once('close', () => r())));
  }

  destroy(): void {
    this.sock.destroy();
  }
}
