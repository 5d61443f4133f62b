// Why: a replica's link reads each frame's data straight into a pooled buffer (TCP
// connections the listener accepted: TcpConn.accepted, Conn.readInto, util/buffer-pool.ts).
// This drives a real loopback connection: frames of every size arrive whole and intact
// under any write pattern of the sender, the data of large frames sits in pooled buffers
// (not in views of 64 KiB socket reads), released buffers carry later frames, and the
// dialling side, which cannot choose its buffers, still gets views as before.
import { afterEach, describe, expect, it } from 'vitest';
import { tcpTransport, type Conn, type Listener } from '../../src/replication/transport.js';
import { Link } from '../../src/replication/link.js';
import { chunkChecksum, type Frame } from '../../src/replication/wire.js';
import { systemClock } from '../../src/util/clock.js';
import { testSeed } from '../helpers/seed.js';

const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function pair(): Promise<{ accepted: Conn; dialled: Conn; listener: Listener }> {
  let accepted: Conn | null = null;
  const listener = await tcpTransport.listen('127.0.0.1', 0, (c) => void (accepted = c));
  cleanups.push(() => listener.close());
  const dialled = await tcpTransport.connect('127.0.0.1', listener.port, 5000);
  cleanups.push(() => dialled.destroy());
  for (let i = 0; i < 200 && accepted === null; i++) await new Promise((r) => setTimeout(r, 5));
  expect(accepted).not.toBeNull();
  cleanups.push(() => accepted!.destroy());
  return { accepted: accepted!, dialled };
}

function chunkFrame(i: number, blocks: number): { msg: Frame['msg']; data: Buffer } {
  const data = Buffer.alloc(blocks * 4096);
  for (let j = 0; j < data.length; j += 512) data.writeUInt32LE((i * 7919 + j) >>> 0, j);
  const runs: [number, number][] = [[i * 1024, blocks]];
  return { msg: { t: 'chunk', generation: 1, set: 1, chunk: i, runs, crc: chunkChecksum(data, 1, i, runs) }, data };
}

describe('replication link: reads into pooled buffers', () => {
  it('an accepted connection reads frames of any size into pooled buffers; released ones carry later frames', async () => {
    const seed = testSeed('replication link: pooled reads');
    let rnd = seed >>> 0 || 1;
    const next = () => (rnd = (Math.imul(rnd, 1103515245) + 12345) >>> 0);
    const { accepted, dialled } = await pair();
    const want = Array.from({ length: 120 }, (_, i) => chunkFrame(i, [1, 3, 16, 64, 256][next() % 5]!));
    const got: { frame: Frame; ok: boolean; buffer: ArrayBufferLike; byteLength: number }[] = [];
    const done = new Promise<void>((resolve) => {
      const rx = new Link(accepted, systemClock, (f) => {
        const w = want[got.length]!;
        const d = f.data!;
        got.push({ frame: f, ok: d.equals(w.data) && JSON.stringify(f.msg) === JSON.stringify(w.msg), buffer: d.buffer, byteLength: d.buffer.byteLength });
        f.release();
        if (got.length === want.length) resolve();
      });
      cleanups.push(() => rx.close('test over'));
    });
    const tx = new Link(dialled, systemClock, () => undefined);
    cleanups.push(() => tx.close('test over'));
    // The sender writes frames whole, in small pieces, or many at once (any read pattern).
    for (const w of want) {
      tx.send(w.msg, [w.data]);
      if (next() % 4 === 0) await new Promise((r) => setImmediate(r));
    }
    await done;
    expect(got.every((g) => g.ok)).toBe(true);
    // Data of 1 MiB frames is in a 1 MiB pooled buffer of its own, not in socket-sized reads.
    const big = got.filter((_, i) => want[i]!.data.length === 1024 * 1024);
    expect(big.length).toBeGreaterThan(5);
    for (const g of big) expect(g.byteLength).toBe(1024 * 1024);
    // Released buffers came back: far fewer distinct buffers than frames.
    expect(new Set(big.map((g) => g.buffer)).size).toBeLessThan(big.length / 2);
  });

  it('a dialled connection cannot choose its buffers: it reads as before', async () => {
    const { dialled } = await pair();
    expect(dialled.readInto?.(() => Buffer.alloc(1)) ?? false).toBe(false);
  });
});
