// Why: large WRITE payloads are read straight into buffers of their own (own read
// buffers), and a connection refused memory by the daemon-wide budget stops being read
// until memory is released. Four connections pipelining 1 MiB writes under a small
// budget make both happen many times a second; every write must be answered within a
// bounded time and read back as written.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import * as C from '../../src/nbd/constants.js';
import { request } from '../helpers/wire.js';
import { rawTransmissionClient } from '../helpers/raw-transmission.js';

const MiB = 1024 * 1024;
const VOLUME_BYTES = 64 * MiB;
const CONNECTIONS = 4;
const DEPTH = 8;
const WRITES_PER_CONNECTION = 64;

for (const mode of ['own', 'node'] as const) {
  describe(`1 MiB writes from 4 connections under a small NBD buffer budget (--nbd-read-buffers ${mode})`, () => {
    let d: TestDaemon;
    beforeAll(async () => {
      d = await startDaemon({
        volumes: [{ name: 'w', size: '64M' }],
        logLevel: 'warn',
        tmpfs: true,
        extraArgs: ['--nbd-read-buffers', mode, '--connections-max', '8', '--nbd-buffer-bytes-max', '40M'],
      });
    });
    afterAll(async () => {
      await d?.dispose();
    });
    it('every write is answered within a bounded time and reads back', async () => {
      const region = VOLUME_BYTES / CONNECTIONS;
      const worstMs: number[] = [];
      const t0 = Date.now();
      await Promise.all(
        Array.from({ length: CONNECTIONS }, async (_, ci) => {
          const c = await rawTransmissionClient(d.nbdPort, 'w');
          const sentAt = new Map<number, number>();
          let worst = 0;
          let wake: () => void = () => undefined;
          c.onReply((cookie, error) => {
            expect(error).toBe(0);
            worst = Math.max(worst, Date.now() - sentAt.get(cookie)!);
            sentAt.delete(cookie);
            wake();
          });
          const below = (n: number) => new Promise<void>((resolve) => {
            const check = () => (sentAt.size < n ? resolve() : (wake = check));
            check();
          });
          for (let i = 0; i < WRITES_PER_CONNECTION; i++) {
            await below(DEPTH);
            const offset = ci * region + ((i * MiB) % region);
            const payload = Buffer.alloc(MiB, (ci * 64 + i) & 0xff);
            sentAt.set(i + 1, Date.now());
            c.sock.write(request(C.CMD_WRITE, { cookie: i + 1, offset, length: MiB }));
            c.sock.write(payload);
          }
          await below(1);
          worstMs.push(worst);
          c.sock.destroy();
        }),
      );
      console.log(`[write-budget ${mode}] ${CONNECTIONS * WRITES_PER_CONNECTION} MiB in ${Date.now() - t0} ms, worst write ${Math.max(...worstMs)} ms`);
      // Unloaded, the worst is ~250 ms; the stall once seen lasted 3–6 s.
      expect(Math.max(...worstMs)).toBeLessThan(3000);
      // The budget really was the limit: connections were paused for memory and resumed.
      const waits = Number(/^deltavol_nbd_memory_waits_total (\d+)/m.exec(await d.metrics())?.[1]);
      expect(waits).toBeGreaterThan(0);
      const reader = await MiniNbdClient.connect(d.nbdPort, 'w');
      for (let ci = 0; ci < CONNECTIONS; ci++) {
        for (let k = 0; k < region / MiB; k++) {
          const r = await reader.read(ci * region + k * MiB, MiB);
          expect(r.error).toBe(0);
          const i = WRITES_PER_CONNECTION - region / MiB + k;
          expect(r.data.equals(Buffer.alloc(MiB, (ci * 64 + i) & 0xff)), `connection ${ci} block ${k}`).toBe(true);
        }
      }
      await reader.disconnect();
    }, 60_000);
  });
}
