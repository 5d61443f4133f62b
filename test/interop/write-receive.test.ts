// Why: WRITE payloads of 64 KiB and more are read from the socket straight into a buffer
// of their own (util/user-buffer-socket.ts, RequestFramer fill mode), headers and small
// payloads into a reused arena. A mistake there shows as a payload with bytes of another
// request, or as a connection that stops being read. Four connections pipeline writes of
// mixed sizes, sent in random slices, and everything must be answered promptly and read
// back as written, with either kind of read buffers.
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rawTransmissionClient } from '../helpers/raw-transmission.js';
import { startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import * as C from '../../src/nbd/constants.js';
import { request } from '../helpers/wire.js';
import { testSeed } from '../helpers/seed.js';

const MiB = 1024 * 1024;
const VOLUME_BYTES = 256 * MiB;
/** Each connection writes round-robin into slots of this size, more slots than its queue depth: writes in flight never overlap (their order is not defined). */
const SLOT_BYTES = 4 * MiB;

function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 2 ** 32;
  };
}

/** A raw client that sends requests in random slices and records each reply's error by cookie. */
async function rawClient(port: number, exportName: string): Promise<{ sock: net.Socket; replies: Map<number, number>; onReply: (fn: () => void) => void }> {
  const c = await rawTransmissionClient(port, exportName);
  const replies = new Map<number, number>();
  let notify: () => void = () => undefined;
  c.onReply((cookie, error) => {
    replies.set(cookie, error);
    notify();
  });
  return { sock: c.sock, replies, onReply: (fn) => (notify = fn) };
}

const SIZES = [4096, 1000, 64 * 1024 - 1, 64 * 1024, 64 * 1024 + 7, 300 * 1024, MiB, MiB + 513, 3 * MiB];

async function scenario(d: TestDaemon, seed: number): Promise<void> {
  const random = rng(seed);
  const model = Buffer.alloc(VOLUME_BYTES);
  const connections = 4;
  const perConnection = 48;
  const depth = 8;
  const region = VOLUME_BYTES / connections;
  const worstMs: number[] = [];
  await Promise.all(
    Array.from({ length: connections }, async (_, ci) => {
      const c = await rawClient(d.nbdPort, 'w');
      let cookie = 0;
      let outstanding = 0;
      let worst = 0;
      const sentAt = new Map<number, number>();
      let wake: () => void = () => undefined;
      c.onReply(() => wake());
      const waitBelow = (n: number) =>
        new Promise<void>((resolve) => {
          const check = () => {
            for (const [k, t] of sentAt) {
              if (c.replies.has(k)) {
                expect(c.replies.get(k)).toBe(0);
                worst = Math.max(worst, Date.now() - t);
                sentAt.delete(k);
                outstanding--;
              }
            }
            if (outstanding < n) resolve();
            else wake = check;
          };
          check();
        });
      for (let i = 0; i < perConnection; i++) {
        await waitBelow(depth);
        const length = SIZES[Math.floor(random() * SIZES.length)]!;
        const slot = i % (region / SLOT_BYTES);
        const offset = ci * region + slot * SLOT_BYTES + Math.floor(random() * (SLOT_BYTES - length));
        const payload = Buffer.allocUnsafe(length);
        for (let p = 0; p < length; p += 4) payload.writeUInt32LE((random() * 2 ** 32) >>> 0, Math.min(p, length - 4));
        payload.copy(model, offset);
        const bytes = Buffer.concat([request(C.CMD_WRITE, { cookie: ++cookie, offset, length }), payload]);
        sentAt.set(cookie, Date.now());
        outstanding++;
        // Random slices: headers and payloads split anywhere, sometimes together with the next request.
        for (let at = 0; at < bytes.length; ) {
          const n = Math.min(bytes.length - at, 1 + Math.floor(random() * 200_000));
          c.sock.write(bytes.subarray(at, at + n));
          at += n;
        }
      }
      await waitBelow(1);
      worstMs.push(worst);
      c.sock.destroy();
    }),
  );
  // No request waited anywhere near a stall: each is answered well within a second or two.
  expect(Math.max(...worstMs)).toBeLessThan(5000);
  const reader = await MiniNbdClient.connect(d.nbdPort, 'w');
  for (let at = 0; at < VOLUME_BYTES; at += 4 * MiB) {
    const r = await reader.read(at, 4 * MiB);
    expect(r.error).toBe(0);
    expect(r.data.equals(model.subarray(at, at + 4 * MiB)), `bytes at ${at}`).toBe(true);
  }
  await reader.disconnect();
}

for (const mode of ['own', 'node'] as const) {
  describe(`WRITE payload receive (--nbd-read-buffers ${mode})`, () => {
    let d: TestDaemon;
    beforeAll(async () => {
      d = await startDaemon({ volumes: [{ name: 'w', size: '256M' }], logLevel: 'warn', tmpfs: true, extraArgs: ['--nbd-read-buffers', mode] });
    });
    afterAll(async () => {
      await d?.dispose();
    });
    it('four connections pipelining mixed-size writes in random slices: all answered promptly, all read back', async () => {
      await scenario(d, testSeed(`write-receive ${mode}`));
    }, 120_000);
  });
}
