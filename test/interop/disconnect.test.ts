// Why: every connection that ends must give back its slot. A client that sent
// NBD_CMD_DISC was answered with our FIN on a socket that no longer read, so its own FIN
// went unseen: the connection stayed listed forever, and after 64 such clients from one
// address (nbdinfo or qemu-img runs from a script) that address was refused for good.
// The protocol fuzz test hung on this under load. Here: more clean disconnects, hang-ups
// mid-WRITE and DISC followed by junk than one address may hold at once, then a new
// client is served and no connection is left behind.
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import * as C from '../../src/nbd/constants.js';
import { goData, option, request } from '../helpers/wire.js';
import { connectionsPerAddressMaxDefault } from '../../src/util/limits.js';

let d: TestDaemon;
beforeAll(async () => {
  d = await startDaemon({ volumes: [{ name: 'target', size: '64M' }], logLevel: 'warn' });
});
afterAll(async () => {
  await d?.dispose();
});

const FLAGS = Buffer.from([0, 0, 0, C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES]);

async function connectionsListed(): Promise<number> {
  const st = (await (await d.fetch('/v1/status')).json()) as { connections: unknown[] };
  return st.connections.length;
}

/** A raw client: handshake, then `after`, then a hang-up 30 ms later. */
async function rawSession(after: Buffer[]): Promise<void> {
  const s = net.connect({ port: d.nbdPort, host: '127.0.0.1' });
  s.on('error', () => undefined);
  s.on('data', () => undefined);
  await new Promise((r) => s.once('connect', r));
  s.write(FLAGS);
  s.write(option(C.OPT_GO, goData('target', [C.INFO_BLOCK_SIZE])));
  for (const b of after) s.write(b);
  await new Promise((r) => setTimeout(r, 30));
  s.destroy();
}

async function until(what: () => Promise<boolean>, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await what()) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return what();
}

describe('connections that end give their slot back', () => {
  it(`after ${connectionsPerAddressMaxDefault + 16} clean disconnects (NBD_CMD_DISC) from one address, nothing is left and a new client is served`, async () => {
    for (let i = 0; i < connectionsPerAddressMaxDefault + 16; i++) {
      const c = await MiniNbdClient.connect(d.nbdPort, 'target');
      await c.disconnect(); // DISC, then waits for the server to close
    }
    expect(await until(async () => (await connectionsListed()) === 0, 2000)).toBe(true);
    const c = await MiniNbdClient.connect(d.nbdPort, 'target');
    expect((await c.read(0, 4096)).error).toBe(0);
    await c.disconnect();
  });

  it('DISC followed by more requests, and hang-ups in the middle of a WRITE payload, leave nothing behind', async () => {
    const sessions = [
      [request(C.CMD_DISC)],
      [request(C.CMD_DISC), request(C.CMD_READ, { offset: 0, length: 512 })],
      [request(C.CMD_WRITE, { offset: 0, length: 131072 }), Buffer.alloc(1000)],
      [request(C.CMD_WRITE, { offset: 0, length: 2 ** 31 }), Buffer.alloc(1000)],
    ];
    for (let i = 0; i < 24; i++) await rawSession(sessions[i % sessions.length]!);
    expect(await until(async () => (await connectionsListed()) === 0, 2000)).toBe(true);
  });
});
