// Why: tests that pipeline requests by hand (random slices, many in flight) need a client
// that stops at the handshake and hands every simple reply to the test, nothing more.
// Shared by the WRITE-receive and write-budget tests.
import net from 'node:net';
import { expect } from 'vitest';
import * as C from '../../src/nbd/constants.js';
import { goData, option } from './wire.js';

/** Connects, negotiates `exportName` with NBD_OPT_GO, then calls onReply(cookieLo, error) per simple reply. */
export async function rawTransmissionClient(port: number, exportName: string): Promise<{ sock: net.Socket; onReply: (fn: (cookie: number, error: number) => void) => void }> {
  const sock = net.connect({ port, host: '127.0.0.1' });
  await new Promise<void>((r, j) => {
    sock.once('connect', () => r());
    sock.once('error', j);
  });
  sock.setNoDelay(true);
  let buf = Buffer.alloc(0);
  let inTransmission = false;
  let onReply: (cookie: number, error: number) => void = () => undefined;
  sock.on('data', (c: Buffer) => {
    buf = buf.length ? Buffer.concat([buf, c]) : c;
    if (!inTransmission) return;
    while (buf.length >= 16) {
      expect(buf.readUInt32BE(0)).toBe(C.SIMPLE_REPLY_MAGIC);
      onReply(buf.readUInt32BE(12), buf.readUInt32BE(4));
      buf = buf.subarray(16);
    }
  });
  sock.write(Buffer.from([0, 0, 0, C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES]));
  sock.write(option(C.OPT_GO, goData(exportName)));
  const deadline = Date.now() + 10_000;
  while (!(buf.length >= 18 + 20 && buf.readUInt32BE(buf.length - 8) === C.REP_ACK) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 5));
  }
  buf = Buffer.alloc(0);
  inTransmission = true;
  return { sock, onReply: (fn) => (onReply = fn) };
}
