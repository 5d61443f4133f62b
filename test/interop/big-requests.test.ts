// Why: a client that negotiated no block sizes (NBD_OPT_EXPORT_NAME, or GO without
// NBD_INFO_BLOCK_SIZE) may send READ and WRITE of any length, and the spec asks a server
// to accept them (nbd-server and nbdkit do). deltavol streams them in pieces; these tests
// prove the data round-trips, the daemon's memory stays bounded by the piece size and
// not by the request, a client vanishing mid-request leaves the daemon healthy, and a
// client that agreed to the 32 MiB maximum is still held to it.
import fs from 'node:fs';
import crypto from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { CMD, OPT, RawNbd } from '../helpers/raw-nbd.js';
import { nbdshOut } from '../helpers/nbdsh.js';

const py = (s: string) => JSON.stringify(s);

const MiB = 1024 * 1024;
const EINVAL = 22;
const INFO_BLOCK_SIZE = 3;

let d: TestDaemon;
beforeAll(async () => {
  d = await startDaemon({ volumes: [{ name: 'big', size: '256M' }], tmpfs: true, logLevel: 'warn' });
});
afterAll(async () => {
  await d?.dispose();
});

function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

/** Samples the daemon's RSS every 10 ms until stopped; returns the peak. */
function watchRss(pid: number): { stop: () => number } {
  let peak = rssBytes(pid);
  const t = setInterval(() => (peak = Math.max(peak, rssBytes(pid))), 10);
  return {
    stop: () => {
      clearInterval(t);
      return Math.max(peak, rssBytes(pid));
    },
  };
}

function pattern(seed: number, n: number): Buffer {
  // Deterministic, incompressible, fast: AES-CTR keystream.
  const key = crypto.createHash('sha256').update(String(seed)).digest();
  const c = crypto.createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
  return c.update(Buffer.alloc(n));
}

/** A client that uses NBD_OPT_EXPORT_NAME (so it negotiated no block sizes), as old clients do. */
const exportNameClient = (name: string) => RawNbd.exportName(d.nbdPort, name);

async function bufferBytes(): Promise<number> {
  const m = /^deltavol_nbd_buffer_bytes (\d+)/m.exec(await d.metrics());
  return m ? Number(m[1]) : -1;
}

describe('requests larger than the 32 MiB maximum, from clients that did not agree to it', () => {
  it('EXPORT_NAME client: a 100 MiB WRITE and a 100 MiB READ in one request each round-trip, RSS stays bounded', async () => {
    const SIZE = 100 * MiB;
    const data = pattern(1, SIZE);
    const c = await exportNameClient('big');
    try {
      // Warm up (pools, code paths) so the baseline is a working daemon, not a cold one.
      expect(await c.writeSimple(200 * MiB, Buffer.alloc(MiB, 1))).toBe(0);
      expect((await c.readSimple(200 * MiB, MiB)).length).toBe(MiB);
      const baseline = rssBytes(d.proc.pid!);
      const rss = watchRss(d.proc.pid!);
      const t0 = Date.now();
      expect(await c.writeSimple(4096 * 3 + 512, data, 5n)).toBe(0);
      const tw = Date.now();
      // Read it back, slightly wider than written so both ends' neighbours are checked.
      c.write(RawNbd.request(CMD.READ, { cookie: 6n, offset: 4096 * 3, length: SIZE + 1024 }));
      const r = await c.simpleReply(60_000);
      expect(r).toEqual({ error: 0, cookie: 6n });
      const back = await c.read(SIZE + 1024, 60_000);
      const tr = Date.now();
      const peak = rss.stop();
      expect(back.subarray(0, 512).equals(Buffer.alloc(512))).toBe(true);
      expect(crypto.createHash('sha256').update(back.subarray(512, 512 + SIZE)).digest('hex')).toBe(crypto.createHash('sha256').update(data).digest('hex'));
      expect(back.subarray(512 + SIZE).equals(Buffer.alloc(512))).toBe(true);
      console.log(
        `[big-requests] 100 MiB WRITE ${tw - t0} ms, READ ${tr - tw} ms; daemon RSS baseline ${(baseline / MiB).toFixed(0)} MiB, peak ${(peak / MiB).toFixed(0)} MiB (+${((peak - baseline) / MiB).toFixed(0)})`,
      );
      expect(peak - baseline).toBeLessThan(100 * MiB);
      // The stream is still in sync: a small request right after.
      expect((await c.readSimple(200 * MiB, 4096, 7n)).equals(Buffer.alloc(4096, 1))).toBe(true);
    } finally {
      c.destroy();
    }
  });

  it('GO without NBD_INFO_BLOCK_SIZE and structured replies: a 40 MiB READ comes as several chunks covering it', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    try {
      await c.handshake('big', { structured: true });
      const data = pattern(2, 40 * MiB);
      expect(await c.writeSimple(64 * MiB + 7, data)).toBe(0);
      let chunks = 0;
      const got = await c.readStructured(64 * MiB + 7, 40 * MiB, 80n, 60_000, () => chunks++);
      expect(got.equals(data)).toBe(true);
      expect(chunks).toBeGreaterThan(2);
    } finally {
      c.destroy();
    }
  });

  it('a client that asked for NBD_INFO_BLOCK_SIZE is held to the 32 MiB maximum: a 40 MiB WRITE and READ get EINVAL, the stream stays in sync', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    try {
      await c.greeting();
      c.write(RawNbd.clientFlags());
      c.write(RawNbd.option(OPT.GO, RawNbd.goData('big', [INFO_BLOCK_SIZE])));
      await c.goReplies();
      const before = await c.readSimple(128 * MiB, MiB, 1n);
      expect(await c.writeSimple(128 * MiB, Buffer.alloc(40 * MiB, 0x33), 2n)).toBe(EINVAL);
      c.write(RawNbd.request(CMD.READ, { cookie: 3n, offset: 0, length: 40 * MiB }));
      expect(await c.simpleReply()).toEqual({ error: EINVAL, cookie: 3n });
      expect((await c.readSimple(128 * MiB, MiB, 4n)).equals(before)).toBe(true);
    } finally {
      c.destroy();
    }
  });

  it('clients that vanish in the middle of a 100 MiB WRITE or READ leave the daemon healthy and its buffers released', async () => {
    // Half a WRITE payload, then gone.
    const w = await exportNameClient('big');
    w.write(RawNbd.request(CMD.WRITE, { cookie: 1n, offset: 0, length: 100 * MiB }));
    w.write(pattern(3, 30 * MiB));
    await new Promise((r) => setTimeout(r, 300));
    w.destroy();
    // A READ whose reply is being streamed, then gone after a little of it.
    const r = await exportNameClient('big');
    r.write(RawNbd.request(CMD.READ, { cookie: 2n, offset: 0, length: 100 * MiB }));
    await r.read(16 + MiB, 30_000);
    r.destroy();
    // And one that sends a huge WRITE header and stops without any payload.
    const s = await exportNameClient('big');
    s.write(RawNbd.request(CMD.WRITE, { cookie: 3n, offset: 0, length: 2 ** 32 - 4096 }));
    await new Promise((res) => setTimeout(res, 200));
    s.destroy();

    const deadline = Date.now() + 10_000;
    while ((await bufferBytes()) !== 0 && Date.now() < deadline) await new Promise((res) => setTimeout(res, 100));
    expect(await bufferBytes()).toBe(0);
    const c = await exportNameClient('big');
    try {
      const data = pattern(4, 2 * MiB);
      expect(await c.writeSimple(200 * MiB, data)).toBe(0);
      expect((await c.readSimple(200 * MiB, 2 * MiB)).equals(data)).toBe(true);
    } finally {
      c.destroy();
    }
    expect(d.exited).toBe(false);
  });

  it('libnbd without block-size negotiation (set_request_block_size False) writes and reads 40 MiB in one request', () => {
    const r = nbdshOut(`
      h = nbd.NBD()
      h.set_request_block_size(False)
      h.connect_uri(${py(d.uri('big'))})
      h.set_strict_mode(0)
      a = pattern(21, 40 << 20)
      h.pwrite(a, (150 << 20) + 3)
      out({'same': h.pread(40 << 20, (150 << 20) + 3) == a})
    `);
    expect(r).toEqual({ same: true });
  });
});

