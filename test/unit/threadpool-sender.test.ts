// Why: util/threadpool-sender.ts queues large messages for a threadpool job (sockx.c) while
// small ones go through Node's socket, and a queue stopped by a full socket hands the rest
// back to Node. The one thing that must never happen is two messages' bytes interleaving on the
// wire. Here a real TCP pair, a reader that stops now and then, and messages of random
// sizes (seeded): the bytes received are exactly the messages in the order they were
// offered, every `done` runs once, and nothing stays queued.
import fs from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import { describe, expect, it } from 'vitest';
import { ThreadpoolSender, type ThreadpoolSendCounts } from '../../src/util/threadpool-sender.js';
import { prng, testSeed } from '../helpers/seed.js';

async function socketPair(): Promise<{ a: net.Socket; b: net.Socket; close: () => void }> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as net.AddressInfo).port;
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const a = net.connect({ port, host: '127.0.0.1' });
  await new Promise<void>((r) => a.once('connect', () => r()));
  const b = await accepted;
  return {
    a,
    b,
    close: () => {
      a.destroy();
      b.destroy();
      server.close();
    },
  };
}

describe('ThreadpoolSender on a TLS socket', () => {
  it('is refused: a TLS socket reports the descriptor of the TCP socket under it, and bytes sent there would bypass TLS', async () => {
    const { a, close } = await socketPair();
    const t = new tls.TLSSocket(a, {});
    expect((t as unknown as { _handle?: { fd?: number } })._handle?.fd).toBeGreaterThanOrEqual(0); // why the check exists
    expect(ThreadpoolSender.forSocket(t, { bytesMin: 1, waitMs: 0, counts: { sends: 0, partial: 0 } })).toBeNull();
    t.destroy();
    close();
  });
});

const SIZES = [16, 700, 4096, 100_000, 256 * 1024, 300_000, 1024 * 1024, 3 * 1024 * 1024];

for (const waitMs of [0, 20]) {
  describe(`ThreadpoolSender (waitMs ${waitMs})`, () => {
    it('messages of random sizes, a reader that pauses: the stream is the messages in order, each done once', async () => {
      const seed = testSeed(`threadpool-sender waitMs ${waitMs}`);
      const rnd = prng(seed);
      const { a, b, close } = await socketPair();
      const counts: ThreadpoolSendCounts = { sends: 0, partial: 0 };
      const sender = ThreadpoolSender.forSocket(a, { bytesMin: 256 * 1024, waitMs, counts });
      expect(sender, 'the sockx addon is built (npm run build)').not.toBeNull();
      const MESSAGES = 300;
      const expected: Buffer[] = [];
      let doneCalls = 0;
      let expectedBytes = 0;
      const received: Buffer[] = [];
      let receivedBytes = 0;
      const all = new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`received ${receivedBytes} of ${expectedBytes} bytes`)), 60_000);
        b.on('data', (c: Buffer) => {
          received.push(Buffer.from(c));
          receivedBytes += c.length;
          if (rnd() < 0.02) {
            b.pause();
            setTimeout(() => b.resume(), 5 + Math.floor(rnd() * 40));
          }
          if (receivedBytes === expectedBytes && expected.length === MESSAGES) {
            clearTimeout(timer);
            resolve();
          }
        });
      });
      for (let i = 0; i < MESSAGES; i++) {
        const size = SIZES[Math.floor(rnd() * SIZES.length)]!;
        // Each message: its number in every 4-byte word, so a misplaced piece shows.
        const msg = Buffer.alloc(size);
        for (let o = 0; o + 4 <= size; o += 4) msg.writeUInt32LE(i * 1_000_003 + o, o);
        const parts = size > 1000 && rnd() < 0.5 ? [msg.subarray(0, 500), msg.subarray(500)] : [msg];
        expected.push(msg);
        expectedBytes += size;
        const done = () => {
          doneCalls++;
        };
        if (!sender!.offer(parts, size, done)) {
          for (let p = 0; p < parts.length - 1; p++) a.write(parts[p]!);
          a.write(parts[parts.length - 1]!, done);
        }
        // Sometimes let the loop turn, so sends complete while more are offered.
        if (rnd() < 0.2) await new Promise((r) => setImmediate(r));
      }
      await all;
      // `done` runs on the sender's side once the socket took a message: maybe a little after the peer read it.
      const deadline = Date.now() + 5000;
      while (doneCalls < MESSAGES && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
      expect(Buffer.concat(received).equals(Buffer.concat(expected))).toBe(true);
      expect(doneCalls).toBe(MESSAGES);
      expect(sender!.queuedBytes).toBe(0);
      expect(sender!.idle).toBe(true);
      expect(counts.sends).toBeGreaterThan(0);
      // With no wait, a full socket stops the threadpool queue and Node sends the rest: that path ran.
      if (waitMs === 0) expect(counts.partial).toBeGreaterThan(0);
      console.log(`[threadpool-sender] waitMs ${waitMs}: ${counts.sends} sends, ${counts.partial} partial, ${expectedBytes} bytes`);
      close();
    }, 90_000);

    it('the socket destroyed while the threadpool job sends: every done runs once, our descriptor is closed', async () => {
      const { a, b, close } = await socketPair();
      const fdsBefore = fs.readdirSync('/proc/self/fd').length;
      const counts: ThreadpoolSendCounts = { sends: 0, partial: 0 };
      const sender = ThreadpoolSender.forSocket(a, { bytesMin: 256 * 1024, waitMs, counts })!;
      expect(fs.readdirSync('/proc/self/fd').length).toBe(fdsBefore + 1); // the dup
      a.on('error', () => {});
      let doneCalls = 0;
      const big = Buffer.alloc(4 * 1024 * 1024, 9);
      // The reader takes a little then stops: the job is sending (or waiting for room) when the socket goes.
      b.once('data', () => b.pause());
      for (let i = 0; i < 8; i++) expect(sender.offer([big], big.length, () => doneCalls++)).toBe(true);
      await new Promise((r) => setTimeout(r, 30));
      a.destroy();
      sender.close();
      const deadline = Date.now() + 10_000;
      while ((doneCalls < 8 || !sender.idle) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      expect(doneCalls).toBe(8);
      expect(sender.idle).toBe(true);
      expect(fs.readdirSync('/proc/self/fd').length).toBeLessThanOrEqual(fdsBefore - 1); // a's own descriptor and the dup are closed
      close();
    }, 30_000);

    it('a peer that is gone: the send fails, the socket is destroyed, every waiting done still runs', async () => {
      const { a, b, close } = await socketPair();
      const counts: ThreadpoolSendCounts = { sends: 0, partial: 0 };
      const sender = ThreadpoolSender.forSocket(a, { bytesMin: 256 * 1024, waitMs, counts })!;
      a.on('error', () => {});
      b.resetAndDestroy();
      await new Promise((r) => setTimeout(r, 50));
      let doneCalls = 0;
      const big = Buffer.alloc(2 * 1024 * 1024, 7);
      for (let i = 0; i < 20; i++) {
        if (!sender.offer([big], big.length, () => doneCalls++)) a.write(big, () => doneCalls++);
      }
      const deadline = Date.now() + 10_000;
      while (doneCalls < 20 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      sender.close();
      expect(doneCalls).toBe(20);
      expect(a.destroyed).toBe(true);
      close();
    }, 30_000);
  });
}
