// Why: tests that pipeline requests by hand (random slices, many in flight) need a client
// that stops at the handshake and hands every simple reply to the test, nothing more.
// Shared by the WRITE-receive, write-budget, backpressure and threadpool-send tests.
import net from 'node:net';
import { expect } from 'vitest';
import * as C from '../../src/nbd/constants.js';
import { goData, option } from './wire.js';

/**
 * Connects and negotiates `exportName` with NBD_OPT_GO; resolves once the ACK is in, with
 * no listener left on the socket (the server sends nothing more until a request).
 */
export async function rawHandshake(port: number, exportName: string): Promise<net.Socket> {
  const sock = net.connect({ port, host: '127.0.0.1' });
  await new Promise<void>((r, j) => {
    sock.once('connect', () => r());
    sock.once('error', j);
  });
  sock.setNoDelay(true);
  let buf = Buffer.alloc(0);
  const onData = (c: Buffer) => (buf = Buffer.concat([buf, c]));
  sock.on('data', onData);
  sock.write(Buffer.from([0, 0, 0, C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES]));
  sock.write(option(C.OPT_GO, goData(exportName)));
  // The greeting, NBD_REP_INFO replies, then the ACK.
  const deadline = Date.now() + 10_000;
  while (!(buf.length >= 18 + 20 && buf.readUInt32BE(buf.length - 8) === C.REP_ACK) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 5));
  }
  sock.off('data', onData);
  expect(buf.readUInt32BE(buf.length - 8), 'NBD_OPT_GO acknowledged').toBe(C.REP_ACK);
  return sock;
}

/** Connects, negotiates `exportName` with NBD_OPT_GO, then calls onReply(cookieLo, error) per simple reply. */
export async function rawTransmissionClient(port: number, exportName: string): Promise<{ sock: net.Socket; onReply: (fn: (cookie: number, error: number) => void) => void }> {
  const sock = await rawHandshake(port, exportName);
  let buf = Buffer.alloc(0);
  let onReply: (cookie: number, error: number) => void = () => undefined;
  sock.on('data', (c: Buffer) => {
    buf = buf.length ? Buffer.concat([buf, c]) : c;
    while (buf.length >= 16) {
      expect(buf.readUInt32BE(0)).toBe(C.SIMPLE_REPLY_MAGIC);
      onReply(buf.readUInt32BE(12), buf.readUInt32BE(4));
      buf = buf.subarray(16);
    }
  });
  return { sock, onReply: (fn) => (onReply = fn) };
}
