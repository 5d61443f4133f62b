// Why: large READ replies leave from a threadpool thread (src/server/native-send.ts,
// src/native/sockx.c) while smaller ones go through Node's socket, and a threadpool send
// that finds the socket full hands its rest back to Node. Replies of every size, many in
// flight, with a client that stops reading now and then (so sends come back partial), must
// each arrive whole, exactly once, with the right bytes; the same with the feature off
// (`--nbd-sends loop`); and a client that hangs up in the middle must leave the daemon
// serving, with no descriptor left behind. By default the data of large replies leaves from
// the volume's file (sendfile, `--nbd-reads sendfile`): a send cut short there has its rest
// read into memory, and each queued reply holds a descriptor of the file until it is sent or
// dropped; `--nbd-reads copy` reads every reply into a buffer first.
import fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import { prng, testSeed } from '../helpers/seed.js';
import * as C from '../../src/nbd/constants.js';
import { request } from '../helpers/wire.js';
import { rawHandshake } from '../helpers/raw-transmission.js';

const VOLUME_BYTES = 64 * 1024 * 1024;
const SIZES = [4096, 65536, 200 * 1024, 256 * 1024, 300 * 1024, 1024 * 1024, 2 * 1024 * 1024];

/** The bytes written at every offset: a pattern no two 4 KiB blocks share. */
function pattern(seed: number): Buffer {
  const b = Buffer.allocUnsafe(VOLUME_BYTES);
  const rnd = prng(seed);
  for (let i = 0; i < VOLUME_BYTES; i += 4) b.writeUInt32LE((rnd() * 2 ** 32) >>> 0, i);
  return b;
}

async function fill(d: TestDaemon, data: Buffer): Promise<void> {
  const c = await MiniNbdClient.connect(d.nbdPort, 'ts');
  for (let off = 0; off < VOLUME_BYTES; off += 4 * 1024 * 1024) {
    const r = await c.write(off, data.subarray(off, off + 4 * 1024 * 1024));
    expect(r.error).toBe(0);
  }
  await c.disconnect();
}

async function sendCounts(d: TestDaemon): Promise<{ sends: number; partial: number; fileReplies: number; fileRestReads: number }> {
  const text = await (await d.fetch('/metrics')).text();
  const num = (name: string) => Number(new RegExp(`^${name} (\\d+)$`, 'm').exec(text)?.[1] ?? NaN);
  return {
    sends: num('deltavol_nbd_threadpool_sends_total'),
    partial: num('deltavol_nbd_threadpool_sends_partial_total'),
    fileReplies: num('deltavol_nbd_file_replies_total'),
    fileRestReads: num('deltavol_nbd_file_reply_rest_reads_total'),
  };
}

function openDescriptors(pid: number): number {
  return fs.readdirSync(`/proc/${pid}/fd`).length;
}

for (const [mode, reads] of [['threadpool', 'sendfile'], ['threadpool', 'copy'], ['loop', 'sendfile']] as const) {
  describe(`replies of every size with --nbd-sends ${mode} --nbd-reads ${reads}`, () => {
    let d: TestDaemon;
    let data: Buffer;
    const seed = testSeed(`threadpool-sends ${mode} ${reads}`);
    beforeAll(async () => {
      d = await startDaemon({ volumes: [{ name: 'ts', size: '64M' }], logLevel: 'warn', tmpfs: true, extraArgs: ['--nbd-sends', mode, '--nbd-reads', reads] });
      data = pattern(seed);
      await fill(d, data);
    }, 60_000);
    afterAll(async () => {
      await d?.dispose();
    });

    it('600 pipelined reads of 4 KiB to 2 MiB, the client pausing now and then: every reply whole, once, with its bytes', async () => {
      const rnd = prng(seed ^ 0x5a5a);
      const REQUESTS = 600;
      const sock = await rawHandshake(d.nbdPort, 'ts');
      const wanted = new Map<number, { offset: number; length: number }>();
      let pending = Buffer.alloc(0);
      let answered = 0;
      let pausedTimes = 0;
      const done = new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`only ${answered} of ${REQUESTS} replies`)), 90_000);
        sock.on('error', reject);
        sock.on('data', (c: Buffer) => {
          pending = pending.length ? Buffer.concat([pending, c]) : c;
          while (pending.length >= 16) {
            if (pending.readUInt32BE(0) !== C.SIMPLE_REPLY_MAGIC) {
              reject(new Error(`bad reply magic after ${answered} replies`));
              return;
            }
            const cookie = pending.readUInt32BE(12);
            const want = wanted.get(cookie);
            if (!want) {
              reject(new Error(`reply for unknown or already answered cookie ${cookie}`));
              return;
            }
            const err = pending.readUInt32BE(4);
            if (err !== 0) {
              reject(new Error(`cookie ${cookie}: error ${err}`));
              return;
            }
            if (pending.length < 16 + want.length) break;
            const got = pending.subarray(16, 16 + want.length);
            if (!got.equals(data.subarray(want.offset, want.offset + want.length))) {
              reject(new Error(`cookie ${cookie}: wrong bytes for ${want.length} at ${want.offset}`));
              return;
            }
            pending = pending.subarray(16 + want.length);
            wanted.delete(cookie);
            answered++;
            // Now and then stop reading for a while: the socket fills, sends come back partial.
            if (rnd() < 0.03 && pausedTimes < 20) {
              pausedTimes++;
              sock.pause();
              setTimeout(() => sock.resume(), 20 + Math.floor(rnd() * 80));
            }
            if (answered === REQUESTS) {
              clearTimeout(timer);
              resolve();
            }
          }
        });
      });
      for (let i = 1; i <= REQUESTS; i++) {
        const length = SIZES[Math.floor(rnd() * SIZES.length)]!;
        const offset = Math.floor(rnd() * ((VOLUME_BYTES - length) / 512)) * 512;
        wanted.set(i, { offset, length });
        sock.write(request(C.CMD_READ, { cookie: i, offset, length }));
      }
      await done;
      expect(wanted.size).toBe(0);
      expect(pausedTimes).toBeGreaterThan(0);
      sock.destroy();
      // The path under test was taken: large replies from the pool, some of them cut short by a full socket.
      const counts = await sendCounts(d);
      console.log(`[threadpool-sends] ${mode} ${reads}: ${counts.sends} threadpool sends, ${counts.partial} partial; ${counts.fileReplies} file replies, ${counts.fileRestReads} finished from memory`);
      if (mode === 'threadpool') {
        expect(counts.sends).toBeGreaterThan(50);
        expect(counts.partial).toBeGreaterThan(0);
      } else expect(counts.sends).toBe(0);
      if (mode === 'threadpool' && reads === 'sendfile') {
        // Every block was written: each reply of 256 KiB or more left from the file.
        expect(counts.fileReplies).toBeGreaterThan(50);
        expect(counts.fileRestReads).toBeGreaterThan(0);
      } else expect(counts.fileReplies).toBe(0);
    }, 120_000);

    it('clients that hang up with large replies on the way: the daemon serves on, no descriptor is left open', async () => {
      const pid = d.proc.pid!;
      const before = openDescriptors(pid);
      for (let round = 0; round < 10; round++) {
        const sock = await rawHandshake(d.nbdPort, 'ts');
        for (let i = 0; i < 16; i++) sock.write(request(C.CMD_READ, { cookie: i + 1, offset: i * 1024 * 1024, length: 1024 * 1024 }));
        // Read a little of the replies, then hang up (a reset half the time).
        await new Promise<void>((r) => sock.once('data', () => r()));
        if (round % 2 === 0) sock.resetAndDestroy();
        else sock.destroy();
      }
      const c = await MiniNbdClient.connect(d.nbdPort, 'ts');
      const r = await c.read(3 * 1024 * 1024, 1024 * 1024);
      expect(r.error).toBe(0);
      expect(r.data.equals(data.subarray(3 * 1024 * 1024, 4 * 1024 * 1024))).toBe(true);
      await c.disconnect();
      // Connections close asynchronously: give the daemon a moment to drop them.
      const deadline = Date.now() + 10_000;
      while (openDescriptors(pid) > before && Date.now() < deadline) await new Promise((res) => setTimeout(res, 50));
      expect(openDescriptors(pid)).toBeLessThanOrEqual(before);
    }, 60_000);
  });
}
