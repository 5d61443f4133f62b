// Why: replication tests will trust the fault proxy to damage the link exactly as asked,
// reproducibly from a seed. These tests check each fault against a small server that
// decodes frames with the real FrameDecoder.
import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { chunkChecksum, encodeFrame, FrameDecoder, type Frame, type ReplMessage } from '../../src/replication/wire.js';
import { isDeltavolError } from '../../src/util/errors.js';
import { startFaultProxy, type FaultProxy, type Faults } from '../helpers/fault-proxy.js';
import { testSeed } from '../helpers/seed.js';

type Chunk = Extract<ReplMessage, { t: 'chunk' }>;

interface Received {
  frames: Frame[];
  error: unknown;
  closed: Promise<void>;
  isClosed: boolean;
}

interface Collector {
  port: number;
  conns: Received[];
  close(): Promise<void>;
}

/** Decodes frames on every connection; answers each with a pong (server→client traffic). */
async function startCollector(): Promise<Collector> {
  const conns: Received[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    let done!: () => void;
    const r: Received = { frames: [], error: null, closed: new Promise((res) => (done = res)), isClosed: false };
    conns.push(r);
    const d = new FrameDecoder((f) => {
      r.frames.push({ msg: f.msg, data: f.data && Buffer.from(f.data) });
      s.write(Buffer.concat(encodeFrame({ t: 'pong', atMs: r.frames.length })));
    });
    s.on('data', (chunk: Buffer) => {
      if (r.error) return;
      try {
        d.push(chunk);
      } catch (e) {
        r.error = e;
        s.destroy();
      }
    });
    s.on('end', () => {
      try {
        d.end();
      } catch (e) {
        r.error ??= e;
      }
      s.end();
    });
    s.on('error', () => {});
    s.on('close', () => {
      sockets.delete(s);
      r.isClosed = true;
      done();
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    conns,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

function chunkFrame(i: number, blockBytes = 512): { msg: Chunk; data: Buffer } {
  const runs: Chunk['runs'] = [
    [i * 10, 2],
    [i * 10 + 5, 1],
  ];
  const data = Buffer.alloc(3 * blockBytes);
  for (let k = 0; k < data.length; k++) data[k] = (k * 7 + i) & 0xff;
  return { msg: { t: 'chunk', generation: 1, set: 1, chunk: i, runs, crc: chunkChecksum(data, 1, i, runs) }, data };
}

interface Client {
  socket: net.Socket;
  pongs: Frame[];
  closed: Promise<void>;
  send(frames: { msg: ReplMessage; data: Buffer }[]): void;
}

async function connect(port: number): Promise<Client> {
  const socket = net.connect({ host: '127.0.0.1', port });
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  const pongs: Frame[] = [];
  const d = new FrameDecoder((f) => pongs.push(f));
  socket.on('data', (c: Buffer) => {
    try {
      d.push(c);
    } catch {
      socket.destroy();
    }
  });
  socket.on('error', () => {});
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  return {
    socket,
    pongs,
    closed,
    send(frames) {
      socket.cork();
      for (const f of frames) for (const b of encodeFrame(f.msg, [f.data])) socket.write(b);
      socket.uncork();
    },
  };
}

async function waitFor(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const until = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

const chunkIndex = (f: Frame): number => (f.msg as Chunk).chunk;
const checksumOk = (f: Frame): boolean => {
  const m = f.msg as Chunk;
  return chunkChecksum(f.data!, m.set, m.chunk, m.runs) === m.crc;
};

let proxy: FaultProxy | null = null;
let collector: Collector | null = null;
afterEach(async () => {
  await proxy?.close();
  await collector?.close();
  proxy = null;
  collector = null;
});

async function setup(name: string, faults: Faults, seed = testSeed(`fault-proxy: ${name}`)): Promise<{ proxy: FaultProxy; collector: Collector }> {
  collector = await startCollector();
  proxy = await startFaultProxy({ targetHost: '127.0.0.1', targetPort: collector.port, seed, faults });
  return { proxy, collector };
}

/** Sends frames on one connection, ends it, and returns what the server received. */
async function roundTrip(p: FaultProxy, c: Collector, frames: { msg: ReplMessage; data: Buffer }[]): Promise<{ got: Received; client: Client }> {
  const client = await connect(p.port);
  client.send(frames);
  client.socket.end();
  await waitFor(() => c.conns.length === p.stats.connections, 'the server connection');
  const got = c.conns[c.conns.length - 1]!;
  await got.closed;
  await client.closed;
  return { got, client };
}

describe('fault proxy', () => {
  it('passes frames intact both ways when no faults are set', async () => {
    const { proxy, collector } = await setup('none', {});
    const frames = Array.from({ length: 20 }, (_, i) => chunkFrame(i));
    const { got, client } = await roundTrip(proxy, collector, frames);
    expect(got.error).toBeNull();
    expect(got.frames.map(chunkIndex)).toEqual(frames.map((f) => f.msg.chunk));
    for (let i = 0; i < frames.length; i++) {
      expect(got.frames[i]!.msg).toEqual(frames[i]!.msg);
      expect(got.frames[i]!.data!.equals(frames[i]!.data)).toBe(true);
    }
    expect(client.pongs.map((f) => (f.msg as { atMs: number }).atMs)).toEqual(frames.map((_, i) => i + 1));
    expect(proxy.stats).toMatchObject({ frames: 20, flipped: 0, duplicated: 0, reordered: 0, truncated: 0, dropped: 0, connections: 1 });
  });

  it('duplicate=1 delivers every frame twice, in place', async () => {
    const { proxy, collector } = await setup('duplicate', { duplicate: 1 });
    const frames = Array.from({ length: 10 }, (_, i) => chunkFrame(i));
    const { got } = await roundTrip(proxy, collector, frames);
    expect(got.error).toBeNull();
    expect(got.frames.map(chunkIndex)).toEqual(frames.flatMap((f) => [f.msg.chunk, f.msg.chunk]));
    expect(got.frames.every(checksumOk)).toBe(true);
    expect(proxy.stats.duplicated).toBe(10);
  });

  it('reorder keeps the multiset of frames and changes their order', async () => {
    const { proxy, collector } = await setup('reorder', { reorder: 0.5 });
    const frames = Array.from({ length: 40 }, (_, i) => chunkFrame(i));
    const { got } = await roundTrip(proxy, collector, frames);
    expect(got.error).toBeNull();
    const order = got.frames.map(chunkIndex);
    expect([...order].sort((a, b) => a - b)).toEqual(frames.map((f) => f.msg.chunk));
    expect(proxy.stats.reordered).toBeGreaterThan(0);
    expect(order).not.toEqual(frames.map((f) => f.msg.chunk));
    expect(got.frames.every(checksumOk)).toBe(true);
  });

  it('releases a held frame after reorderHoldMs when no next frame comes', async () => {
    const { proxy, collector } = await setup('reorder hold', { reorder: 1, reorderHoldMs: 20 });
    const client = await connect(proxy.port);
    client.send([chunkFrame(0)]);
    await waitFor(() => collector.conns[0]?.frames.length === 1, 'the held frame');
    expect(proxy.stats.reordered).toBe(1);
    client.socket.destroy();
  });

  it('flipBitInData: framing stays intact and chunkChecksum catches every flipped chunk', async () => {
    const { proxy, collector } = await setup('flip data', { flipBitInData: 1 });
    const frames = Array.from({ length: 30 }, (_, i) => chunkFrame(i));
    const { got } = await roundTrip(proxy, collector, frames);
    expect(got.error).toBeNull();
    expect(got.frames.length).toBe(30);
    expect(proxy.stats.flipped).toBe(30);
    for (const f of got.frames) expect(checksumOk(f)).toBe(false);
  });

  it('flipBitAnywhere: each damaged frame is refused by the framing or caught by chunkChecksum', async () => {
    const { proxy, collector } = await setup('flip anywhere', { flipBitAnywhere: 1 });
    let refused = 0;
    let caught = 0;
    for (let i = 0; i < 16; i++) {
      const { got } = await roundTrip(proxy, collector, [chunkFrame(i)]);
      if (got.error) {
        expect(isDeltavolError(got.error, 'BAD_STREAM')).toBe(true);
        refused++;
      } else {
        expect(got.frames.length).toBe(1);
        expect(checksumOk(got.frames[0]!)).toBe(false);
        caught++;
      }
    }
    expect(refused + caught).toBe(16);
    expect(proxy.stats.flipped).toBe(16);
  });

  it('truncation sends half a frame after N frames, then closes the connection', async () => {
    const { proxy, collector } = await setup('truncate', { truncateAfterFrames: { min: 3, max: 5 } });
    const frames = Array.from({ length: 10 }, (_, i) => chunkFrame(i));
    const { got } = await roundTrip(proxy, collector, frames);
    expect(got.frames.length).toBeGreaterThanOrEqual(3);
    expect(got.frames.length).toBeLessThanOrEqual(5);
    expect(got.frames.map(chunkIndex)).toEqual(frames.slice(0, got.frames.length).map((f) => f.msg.chunk));
    expect(isDeltavolError(got.error, 'BAD_STREAM')).toBe(true); // ended inside a frame
    expect(String((got.error as Error).message)).toMatch(/truncated/);
    expect(proxy.stats.truncated).toBe(1);
  });

  it('dropConnection cuts the link before the frame', async () => {
    const { proxy, collector } = await setup('drop', { dropConnection: 1 });
    const { got } = await roundTrip(proxy, collector, [chunkFrame(0), chunkFrame(1)]);
    expect(got.frames.length).toBe(0);
    expect(got.error).toBeNull(); // cut between frames: nothing partial
    expect(proxy.stats.dropped).toBe(1);
  });

  it('setFaults lets the link heal', async () => {
    const { proxy, collector } = await setup('heal', { duplicate: 1 });
    const client = await connect(proxy.port);
    client.send([chunkFrame(0), chunkFrame(1)]);
    await waitFor(() => collector.conns[0]?.frames.length === 4, 'duplicated frames');
    proxy.setFaults({});
    client.send([chunkFrame(2), chunkFrame(3)]);
    await waitFor(() => collector.conns[0]?.frames.length === 6, 'healed frames');
    client.socket.end();
    await collector.conns[0]!.closed;
    expect(collector.conns[0]!.frames.map(chunkIndex)).toEqual([0, 0, 1, 1, 2, 3]);
  });

  it('is deterministic for a given seed', async () => {
    const seed = testSeed('fault-proxy: determinism');
    const faults: Faults = { flipBitInData: 0.3, duplicate: 0.3, reorder: 0.3, reorderHoldMs: 1000 };
    const runs: string[] = [];
    for (let r = 0; r < 2; r++) {
      const { proxy: p, collector: c } = await setup('determinism', faults, seed);
      const frames = Array.from({ length: 50 }, (_, i) => chunkFrame(i));
      const { got } = await roundTrip(p, c, frames);
      runs.push(JSON.stringify({ got: got.frames.map((f) => [chunkIndex(f), checksumOk(f)]), stats: p.stats }));
      await p.close();
      await c.close();
      proxy = null;
      collector = null;
    }
    expect(runs[1]).toBe(runs[0]);
  });

  it('flipServerBits flips bits server→client at seeded offsets', async () => {
    const payload = Buffer.alloc(256 * 1024, 0x5a);
    const server = net.createServer((s) => {
      s.on('error', () => {});
      s.end(payload);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const seed = testSeed('fault-proxy: server bits');
    const results: number[][] = [];
    try {
      for (let r = 0; r < 2; r++) {
        const p = await startFaultProxy({
          targetHost: '127.0.0.1',
          targetPort: (server.address() as net.AddressInfo).port,
          seed,
          faults: { flipServerBits: 1e-3 },
        });
        const sock = net.connect({ host: '127.0.0.1', port: p.port });
        const parts: Buffer[] = [];
        sock.on('data', (c: Buffer) => parts.push(c));
        await new Promise<void>((resolve) => sock.once('close', () => resolve()));
        const got = Buffer.concat(parts);
        expect(got.length).toBe(payload.length);
        const diffs: number[] = [];
        for (let i = 0; i < got.length; i++) if (got[i] !== payload[i]) diffs.push(i);
        expect(diffs.length).toBe(p.stats.serverFlipped);
        expect(diffs.length).toBeGreaterThan(100);
        results.push(diffs);
        await p.close();
      }
      expect(results[1]).toEqual(results[0]);
    } finally {
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });
});
