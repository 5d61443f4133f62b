// Why: WRITE payloads of 256 KiB to 2 MiB are spliced from the socket into a kernel pipe
// and from there into the volume's file (util/socket-pipe.ts, src/native/pipex.c). A
// mistake there writes another request's bytes, loses a payload's first bytes (those read
// with its header), leaks pipes, or leaves the socket unread. These tests drive a real
// daemon with a raw client and read everything back: sizes on both sides of the limits, a
// payload sent in tiny pieces (its fragments fill the pipe's slots: it goes on in a
// buffer), a write the volume must copy first (a snapshot holds the old data: the payload
// waits in its pipe meanwhile), a client gone mid-payload, and --nbd-writes buffer.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, run, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import { rawTransmissionClient } from '../helpers/raw-transmission.js';
import { request } from '../helpers/wire.js';
import { testSeed } from '../helpers/seed.js';
import * as C from '../../src/nbd/constants.js';
import { pipedPayloadBytesMax, pipedPayloadBytesMin } from '../../src/util/limits.js';

const MiB = 1024 * 1024;

function metric(text: string, name: string): number {
  const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(text);
  if (!m) throw new Error(`no metric ${name}`);
  return Number(m[1]);
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    b[i] = s & 255;
  }
  return b;
}

async function waitFor(cond: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe('WRITE payloads spliced into pipes (--nbd-writes splice, the default)', () => {
  let d: TestDaemon;
  beforeAll(async () => {
    d = await startDaemon({ volumes: [{ name: 'p', size: '64M' }], logLevel: 'warn', tmpfs: true });
  });
  afterAll(async () => {
    await d?.dispose();
  });

  it('pipelined writes around the size limits, sent with their headers in one piece, read back exactly', async () => {
    const seed = testSeed('piped-writes sizes');
    const sizes = [pipedPayloadBytesMin - 1, pipedPayloadBytesMin, 300 * 1024 + 3, MiB, MiB + 513, pipedPayloadBytesMax, pipedPayloadBytesMax + 1, 4096];
    const before = metric(await d.metrics(), 'deltavol_nbd_piped_writes_total');
    const c = await rawTransmissionClient(d.nbdPort, 'p');
    const replies = new Map<number, number>();
    c.onReply((cookie, error) => replies.set(cookie, error));
    const model = Buffer.alloc(64 * MiB);
    let cookie = 0;
    // Three rounds, each a pipeline of every size: later ones arrive behind a large WRITE, so
    // their headers are read alone and their payloads go to pipes.
    for (let round = 0; round < 3; round++) {
      for (const [i, length] of sizes.entries()) {
        const offset = (round * sizes.length + i) * 2 * MiB + 7 * i;
        const payload = pattern(length, seed + round * 100 + i);
        payload.copy(model, offset);
        c.sock.write(Buffer.concat([request(C.CMD_WRITE, { cookie: ++cookie, offset, length }), payload]));
      }
    }
    await waitFor(() => replies.size === cookie, 30_000, 'every WRITE answered');
    for (const [k, e] of replies) expect(e, `WRITE ${k}`).toBe(0);
    c.sock.destroy();
    const after = metric(await d.metrics(), 'deltavol_nbd_piped_writes_total');
    expect(after - before, 'payloads that went through a pipe').toBeGreaterThanOrEqual(6);
    const r = await MiniNbdClient.connect(d.nbdPort, 'p');
    for (let at = 0; at < 64 * MiB; at += 8 * MiB) {
      const got = await r.read(at, 8 * MiB);
      expect(got.error).toBe(0);
      expect(got.data.equals(model.subarray(at, at + 8 * MiB)), `bytes at ${at}`).toBe(true);
    }
    await r.disconnect();
  }, 60_000);

  it('a payload sent in tiny pieces fills the pipe\'s slots and goes on in a buffer, intact', async () => {
    const before = metric(await d.metrics(), 'deltavol_nbd_piped_writes_to_buffer_total');
    const c = await rawTransmissionClient(d.nbdPort, 'p');
    const replies = new Map<number, number>();
    c.onReply((cookie, error) => replies.set(cookie, error));
    // A large WRITE first, so the next header is read alone and its payload goes to a pipe.
    c.sock.write(Buffer.concat([request(C.CMD_WRITE, { cookie: 1, offset: 0, length: MiB }), pattern(MiB, 5)]));
    await waitFor(() => replies.has(1), 10_000, 'the first WRITE');
    const payload = pattern(MiB, 6);
    c.sock.write(request(C.CMD_WRITE, { cookie: 2, offset: 3 * MiB, length: MiB }));
    // Each small write leaves as its own segment (no delay): one pipe slot each, far more than a pipe has.
    let at = 0;
    for (let i = 0; i < 1500; i++, at += 3) {
      c.sock.write(payload.subarray(at, at + 3));
      if (i % 50 === 49) await new Promise((r) => setImmediate(r));
    }
    c.sock.write(payload.subarray(at));
    await waitFor(() => replies.has(2), 10_000, 'the WRITE sent in pieces');
    expect(replies.get(2)).toBe(0);
    c.sock.destroy();
    expect(metric(await d.metrics(), 'deltavol_nbd_piped_writes_to_buffer_total') - before, 'payloads moved from a full pipe to a buffer').toBeGreaterThanOrEqual(1);
    const r = await MiniNbdClient.connect(d.nbdPort, 'p');
    expect((await r.read(0, MiB)).data.equals(pattern(MiB, 5))).toBe(true);
    expect((await r.read(3 * MiB, MiB)).data.equals(payload)).toBe(true);
    await r.disconnect();
  }, 60_000);

  it('a client gone mid-payload leaves no pipe behind and the next client is served', async () => {
    const pipesBefore = metric(await d.metrics(), 'deltavol_nbd_payload_pipes');
    for (let i = 0; i < 40; i++) {
      const c = await rawTransmissionClient(d.nbdPort, 'p');
      const replies = new Map<number, number>();
      c.onReply((cookie, error) => replies.set(cookie, error));
      c.sock.write(Buffer.concat([request(C.CMD_WRITE, { cookie: 1, offset: 8 * MiB, length: MiB }), pattern(MiB, 7)]));
      await waitFor(() => replies.has(1), 10_000, 'the first WRITE');
      c.sock.write(Buffer.concat([request(C.CMD_WRITE, { cookie: 2, offset: 10 * MiB, length: MiB }), pattern(MiB / 2, 8)]));
      await new Promise((r) => setTimeout(r, 5));
      c.sock.destroy();
    }
    await new Promise((r) => setTimeout(r, 200));
    // Pipes of finished payloads are kept for reuse; none is added per abandoned one.
    expect(metric(await d.metrics(), 'deltavol_nbd_payload_pipes')).toBeLessThanOrEqual(Math.max(pipesBefore, 8));
    const r = await MiniNbdClient.connect(d.nbdPort, 'p');
    expect((await r.write(12 * MiB, pattern(MiB, 9))).error).toBe(0);
    expect((await r.read(12 * MiB, MiB)).data.equals(pattern(MiB, 9))).toBe(true);
    // The half-sent payload never reached the volume as a completed write; the first did.
    expect((await r.read(8 * MiB, MiB)).data.equals(pattern(MiB, 7))).toBe(true);
    await r.disconnect();
  }, 60_000);

  it('with a snapshot holding the old data, the old blocks are saved first (counted) and both sides read right', async () => {
    const r = await MiniNbdClient.connect(d.nbdPort, 'p');
    expect((await r.write(20 * MiB, pattern(2 * MiB, 10))).error).toBe(0);
    await r.flush();
    expect(d.cli(['snapshot', 'create', 'p', 'old']).status).toBe(0);
    const pipedBefore = metric(await d.metrics(), 'deltavol_nbd_piped_writes_total');
    const savedBefore = metric(await d.metrics(), 'deltavol_volume_before_images_total{volume="p"}');
    const c = await rawTransmissionClient(d.nbdPort, 'p');
    const replies = new Map<number, number>();
    c.onReply((cookie, error) => replies.set(cookie, error));
    c.sock.write(Buffer.concat([request(C.CMD_WRITE, { cookie: 1, offset: 30 * MiB, length: MiB }), pattern(MiB, 11)]));
    c.sock.write(Buffer.concat([request(C.CMD_WRITE, { cookie: 2, offset: 20 * MiB + 4096, length: MiB }), pattern(MiB, 12)]));
    await waitFor(() => replies.size === 2, 10_000, 'both WRITEs');
    expect([...replies.values()]).toEqual([0, 0]);
    c.sock.destroy();
    // The second WRITE saved its 256 blocks of 4 KiB for the snapshot first (the first may have
    // saved a few: earlier tests wrote near it); both payloads came in through pipes (whether
    // the engine then moved or took them is the engine model's check).
    expect(metric(await d.metrics(), 'deltavol_volume_before_images_total{volume="p"}') - savedBefore).toBeGreaterThanOrEqual(256);
    expect(metric(await d.metrics(), 'deltavol_nbd_piped_writes_total') - pipedBefore).toBe(2);
    const want = pattern(2 * MiB, 10);
    pattern(MiB, 12).copy(want, 4096);
    expect((await r.read(20 * MiB, 2 * MiB)).data.equals(want)).toBe(true);
    await r.disconnect();
    const s = await MiniNbdClient.connect(d.nbdPort, 'p@old');
    expect((await s.read(20 * MiB, 2 * MiB)).data.equals(pattern(2 * MiB, 10))).toBe(true);
    await s.disconnect();
  }, 60_000);
});

describe('spliced payloads and the memory budget', () => {
  it('a payload stalled midway is closed after the stall timeout while others wait for memory; one that trickles in is not', async () => {
    // 8 connections × 128 KiB reserve, 35 MiB shared; each 2 MiB WRITE reserves its length when its header is read.
    const d = await startDaemon({ volumes: [{ name: 's', size: '64M' }], logLevel: 'warn', tmpfs: true, extraArgs: ['--connections-max', '8', '--nbd-buffer-bytes-max', '36M', '--nbd-stall-timeout', '1s'] });
    try {
      const w = await MiniNbdClient.connect(d.nbdPort, 's');
      expect((await w.write(0, Buffer.alloc(4096, 1))).error).toBe(0); // w has been seen reading
      const open = async () => {
        const c = await rawTransmissionClient(d.nbdPort, 's');
        const replies = new Map<number, number>();
        c.onReply((cookie, error) => replies.set(cookie, error));
        let closed = false;
        c.sock.on('close', () => (closed = true));
        c.sock.on('error', () => undefined);
        // A small WRITE answered first: the client is seen reading, so its next WRITE may use the shared budget.
        c.sock.write(Buffer.concat([request(C.CMD_WRITE, { cookie: 100, offset: 60 * MiB, length: 4096 }), Buffer.alloc(4096)]));
        await waitFor(() => replies.has(100), 5_000, 'a first small WRITE');
        return { ...c, replies, closed: () => closed };
      };
      const stuck = await open();
      const trickler = await open();
      // Headers alone first: the payloads then go to pipes.
      stuck.sock.write(request(C.CMD_WRITE, { cookie: 1, offset: 8 * MiB, length: 2 * MiB }));
      trickler.sock.write(request(C.CMD_WRITE, { cookie: 1, offset: 16 * MiB, length: 2 * MiB }));
      await new Promise((r) => setTimeout(r, 50));
      stuck.sock.write(pattern(256 * 1024, 30));
      const slow = pattern(2 * MiB, 31);
      let sent = 0;
      const trickle = setInterval(() => {
        if (sent >= slow.length) return;
        trickler.sock.write(slow.subarray(sent, sent + 64 * 1024));
        sent += 64 * 1024;
      }, 100);
      try {
        await waitFor(() => sent >= 256 * 1024, 5_000, 'the trickle to start');
        expect(metric(await d.metrics(), 'deltavol_nbd_piped_writes_total')).toBe(0); // neither is complete
        expect(metric(await d.metrics(), 'deltavol_nbd_buffer_bytes'), 'both 2 MiB WRITEs hold their reservation').toBeGreaterThanOrEqual(4 * MiB);
        // 32 MiB does not fit while both hold their 2 MiB: it waits until the stalled one is closed.
        const t0 = Date.now();
        const big = Buffer.concat(Array.from({ length: 32 }, (_, i) => pattern(MiB, 32 + i)));
        expect((await w.write(32 * MiB, big)).error).toBe(0);
        const waitedMs = Date.now() - t0;
        console.log(`[piped-writes-stall] the 32 MiB write waited ${waitedMs} ms for the stalled payload to be closed`);
        expect(waitedMs).toBeGreaterThanOrEqual(900);
        await waitFor(() => stuck.closed(), 5_000, 'the stalled client to be closed');
        await waitFor(() => trickler.replies.has(1), 40_000, 'the trickled WRITE to be answered');
        console.log(`[piped-writes-stall] the trickled WRITE answered ${Date.now() - t0} ms after the large one was sent`);
        expect(trickler.replies.get(1)).toBe(0);
        expect(trickler.closed(), 'the client that kept sending is served').toBe(false);
        expect((await w.read(16 * MiB, 2 * MiB)).data.equals(slow)).toBe(true);
        for (let at = 0; at < 32 * MiB; at += 4 * MiB) expect((await w.read(32 * MiB + at, 4 * MiB)).data.equals(big.subarray(at, at + 4 * MiB))).toBe(true);
        expect(metric(await d.metrics(), 'deltavol_nbd_stalled_connections_closed_total')).toBe(1);
      } finally {
        clearInterval(trickle);
        trickler.sock.destroy();
        stuck.sock.destroy();
        await w.disconnect();
      }
    } finally {
      await d.dispose();
    }
  }, 60_000);
});

describe('--nbd-writes buffer', () => {
  it('reads every payload into buffers: no pipe is used', async () => {
    const d = await startDaemon({ volumes: [{ name: 'b', size: '16M' }], logLevel: 'warn', tmpfs: true, extraArgs: ['--nbd-writes', 'buffer'] });
    try {
      const c = await rawTransmissionClient(d.nbdPort, 'b');
      const replies = new Map<number, number>();
      c.onReply((cookie, error) => replies.set(cookie, error));
      for (let i = 0; i < 6; i++) c.sock.write(Buffer.concat([request(C.CMD_WRITE, { cookie: i + 1, offset: i * 2 * MiB, length: MiB }), pattern(MiB, 20 + i)]));
      await waitFor(() => replies.size === 6, 10_000, 'every WRITE');
      c.sock.destroy();
      const m = await d.metrics();
      expect(metric(m, 'deltavol_nbd_piped_writes_total')).toBe(0);
      expect(metric(m, 'deltavol_nbd_payload_pipes')).toBe(0);
      const r = await MiniNbdClient.connect(d.nbdPort, 'b');
      for (let i = 0; i < 6; i++) expect((await r.read(i * 2 * MiB, MiB)).data.equals(pattern(MiB, 20 + i))).toBe(true);
      await r.disconnect();
    } finally {
      await d.dispose();
    }
  }, 60_000);

  it('refuses a mode it does not know, before it serves', () => {
    const r = run('node', [CLI, 'serve', '--data-dir', '/nonexistent-deltavol-test', '--nbd-writes', 'zerocopy'], { allowFail: true, timeoutMs: 20_000 });
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/--nbd-writes "zerocopy" is not one of splice, buffer/);
  }, 30_000);
});
