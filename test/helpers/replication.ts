// Why: every replication test does the same few things: start two daemons, pair a
// volume, drive a seeded write load through a real NBD client while remembering what was
// acknowledged, wait until the replica has played everything, and compare whole volumes.
// Here once, so the tests read as the scenario they check.

import fs from 'node:fs';
import net from 'node:net';
import { expect } from 'vitest';
import { MiniNbdClient } from './nbd-client.js';
import { freePort, startDaemon, type TestDaemon } from './daemon.js';
export { sha256File } from './images.js';
export { freePort };

export interface PairStatusJson {
  id: string;
  state: string;
  reason: string | null;
  connected: boolean;
  ackedSet: number;
  playedSet: number;
  lagSeconds: number;
  bytesDifferent: number;
  bytesSent: number;
  pendingBlocks: number;
  initialCopy: { doneBytes: number; totalBytes: number } | null;
  sets: { set: number; state: string; partial: boolean }[];
}

export interface PrimaryStatusJson {
  volume: string;
  role: string;
  currentSet: number;
  changedBlocksSinceCut: number;
  outbound: { capacityBytes: number; usedBytes: number; full: boolean; sets: number; cachedBytes?: number; chunkFileReads?: number; chunkFileSends?: number; chunkBuffersAllocated?: number; chunkBuffersReused?: number };
  replicas: PairStatusJson[];
  // replica side
  playedSet?: number;
  ackedSet?: number;
  state?: string;
  consistent?: boolean;
}

/** (Any daemon handle with the control API: a TestDaemon, a namespace's NsDaemon.) */
type ApiDaemon = Pick<TestDaemon, 'api'>;

export async function replStatus(d: ApiDaemon, volume: string): Promise<PrimaryStatusJson> {
  const r = await d.api<{ volumes: PrimaryStatusJson[] }>('GET', `/v1/replication?volume=${encodeURIComponent(volume)}`);
  return r.volumes[0]!;
}

/** Polls until pred(status) holds (bounded); returns the last status. */
export async function waitStatus(d: ApiDaemon, volume: string, pred: (s: PrimaryStatusJson) => boolean, timeoutMs: number, what: string): Promise<PrimaryStatusJson> {
  const deadline = Date.now() + timeoutMs;
  let s = await replStatus(d, volume);
  while (!pred(s)) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last status: ${JSON.stringify(s).slice(0, 2000)}`);
    await new Promise((r) => setTimeout(r, 100));
    s = await replStatus(d, volume);
  }
  return s;
}

/** Every replica has played everything the primary changed (nothing cut or uncut is left). */
export function inSync(s: PrimaryStatusJson): boolean {
  return s.changedBlocksSinceCut === 0 && s.replicas.length > 0 && s.replicas.every((p) => p.initialCopy === null && p.playedSet === s.currentSet && p.pendingBlocks === 0 && p.state === 'duplex');
}

export function waitInSync(d: ApiDaemon, volume: string, timeoutMs = 60_000): Promise<PrimaryStatusJson> {
  return waitStatus(d, volume, inSync, timeoutMs, 'replicas in sync');
}

/**
 * A seeded writer through NBD: random aligned and unaligned writes (512-byte sectors),
 * some TRIMs, kept in a byte model of what was acknowledged. stop() waits for requests in
 * flight; model holds the expected volume content.
 */
export class SeededWriter {
  readonly model: Buffer;
  /** Per 512-byte sector: 1 when a request covering it failed unacknowledged (its content is unknown). */
  readonly uncertain: Uint8Array;
  writes = 0;
  trims = 0;
  private running = false;
  private loop: Promise<void> | null = null;
  error: Error | null = null;

  constructor(
    private client: MiniNbdClient,
    readonly sizeBytes: number,
    private readonly rnd: () => number,
    /** Writes only below this offset (a region the test can reason about). */
    private readonly regionBytes = sizeBytes,
    initial?: Buffer,
  ) {
    this.model = initial ?? Buffer.alloc(sizeBytes);
    this.uncertain = new Uint8Array(Math.ceil(sizeBytes / 512));
  }

  private settle(off: number, len: number, ok: boolean): void {
    this.uncertain.fill(ok ? 0 : 1, off / 512, (off + len) / 512);
  }

  static async connect(port: number, exportName: string, sizeBytes: number, rnd: () => number, regionBytes?: number): Promise<SeededWriter> {
    return new SeededWriter(await MiniNbdClient.connect(port, exportName), sizeBytes, rnd, regionBytes);
  }

  /** One batch of `n` pipelined requests. */
  async batch(n: number): Promise<void> {
    const ops: Promise<void>[] = [];
    // Requests in one batch never overlap (their order on the server is not the model's).
    const taken: [number, number][] = [];
    for (let i = 0; i < n; i++) {
      const aligned = this.rnd() < 0.7;
      const len = aligned ? 4096 * (1 + Math.floor(this.rnd() * 16)) : 512 * (1 + Math.floor(this.rnd() * 24));
      const off = (aligned ? 4096 : 512) * Math.floor((this.rnd() * (this.regionBytes - len)) / (aligned ? 4096 : 512));
      if (taken.some(([a, b]) => off < b && a < off + len)) continue;
      taken.push([off, off + len]);
      if (this.rnd() < 0.08) {
        ops.push(
          this.client.request(4 /* TRIM */, off, len).then(
            (r) => {
              if (r.error !== 0) {
                this.settle(off, len, false);
                throw new Error(`trim error ${r.error}`);
              }
              this.model.fill(0, off, off + len);
              this.settle(off, len, true);
              this.trims++;
            },
            (e: Error) => {
              this.settle(off, len, false);
              throw e;
            },
          ),
        );
      } else {
        const data = Buffer.allocUnsafe(len);
        for (let j = 0; j < len; j += 4) data.writeUInt32LE((this.rnd() * 0xffffffff) >>> 0, j);
        ops.push(
          this.client.write(off, data).then(
            (r) => {
              if (r.error !== 0) {
                this.settle(off, len, false);
                throw new Error(`write error ${r.error}`);
              }
              data.copy(this.model, off);
              this.settle(off, len, true);
              this.writes++;
            },
            (e: Error) => {
              this.settle(off, len, false);
              throw e;
            },
          ),
        );
      }
    }
    const results = await Promise.allSettled(ops);
    const failed = results.find((r) => r.status === 'rejected');
    if (failed) throw (failed as PromiseRejectedResult).reason;
  }

  /** Continues on a new connection (after the daemon was restarted). */
  reconnect(client: MiniNbdClient): void {
    this.client.destroy();
    this.client = client;
    this.error = null;
  }

  /** Writes in batches until stop() (or an error). */
  start(batchSize = 16, pauseMs = 0): void {
    this.running = true;
    this.loop = (async () => {
      try {
        while (this.running) {
          await this.batch(batchSize);
          if (pauseMs > 0) await new Promise((r) => setTimeout(r, pauseMs));
        }
      } catch (e) {
        this.error = e as Error;
      }
    })();
  }

  async stop(): Promise<void> {
    this.running = false;
    await this.loop;
    if (this.error) throw this.error;
  }

  async close(): Promise<void> {
    await this.client.disconnect().catch(() => this.client.destroy());
  }
}

/** The whole volume through NBD, compared with what the model says (first difference reported). */
export async function expectVolumeEquals(port: number, exportName: string, expected: Buffer, what: string, uncertain?: Uint8Array): Promise<void> {
  const c = await MiniNbdClient.connect(port, exportName);
  try {
    const step = 4 * 1024 * 1024;
    for (let off = 0; off < expected.length; off += step) {
      const n = Math.min(step, expected.length - off);
      const r = await c.read(off, n);
      expect(r.error, `${what}: read error at ${off}`).toBe(0);
      if (!r.data.equals(expected.subarray(off, off + n))) {
        for (let i = 0; i < n; i++) {
          if (r.data[i] === expected[off + i]) continue;
          if (uncertain && uncertain[Math.floor((off + i) / 512)]) continue;
          throw new Error(`${what}: first difference at byte ${off + i} (block ${Math.floor((off + i) / 4096)})`);
        }
      }
    }
  } finally {
    await c.disconnect().catch(() => c.destroy());
  }
}

/** The CLI on daemon d; throws with its output and the daemon's log tail unless it exits 0. */
export function cliOk(d: TestDaemon, args: string[]): string {
  return checked(d, args, d.cli(args));
}

/** The same without blocking the test's event loop (a writer in the test keeps running: TestDaemon.cliAsync). */
export async function cliOkAsync(d: TestDaemon, args: string[]): Promise<string> {
  return checked(d, args, await d.cliAsync(args));
}

function checked(d: TestDaemon, args: string[], r: { status: number; stdout: string; stderr: string }): string {
  if (r.status !== 0) throw new Error(`deltavol ${args.join(' ')} → ${r.status}\n${r.stdout}\n${r.stderr}\n${d.log().slice(-4000)}`);
  return r.stdout;
}

/**
 * One writer that follows the primary across planned swaps: random writes, one at a time
 * (optionally paced), moving to the other node when its node refuses (it became the
 * replica). Every acknowledged write goes into the model; the longest gap between two
 * acknowledged writes since the last resetGap() is what a swap costs the writer.
 */
export class FollowingWriter {
  readonly model: Buffer;
  /** Times (ms) of every acknowledged write. */
  readonly acks: number[] = [];
  target: TestDaemon;
  acked = 0;
  refused = 0;
  gapMaxMs = 0;
  private lastAckMs = Date.now();
  private stopped = false;
  private loop: Promise<void> | null = null;
  private client: MiniNbdClient | null = null;

  constructor(
    private readonly nodes: [TestDaemon, TestDaemon],
    private readonly volume: string,
    private readonly sizeBytes: number,
    private readonly rnd: () => number,
    /** writeBytes: every write this size (else 4–32 KiB); intervalMs: one write this often at most. */
    private readonly o: { initial?: Buffer; writeBytes?: number; intervalMs?: number } = {},
  ) {
    this.model = o.initial ? Buffer.from(o.initial) : Buffer.alloc(sizeBytes);
    this.target = nodes[0];
  }

  async start(): Promise<void> {
    this.client = await MiniNbdClient.connect(this.target.nbdPort, this.volume);
    this.lastAckMs = Date.now();
    this.loop = this.run();
  }

  private async run(): Promise<void> {
    let next = Date.now();
    while (!this.stopped) {
      const len = this.o.writeBytes ?? 4096 * (1 + Math.floor(this.rnd() * 8));
      const off = len * Math.floor(this.rnd() * Math.floor(this.sizeBytes / len));
      const data = Buffer.alloc(len);
      for (let i = 0; i < len; i += 4) data.writeUInt32LE((this.rnd() * 2 ** 32) >>> 0, i);
      const r = await this.client!.write(off, data);
      if (r.error !== 0) {
        this.refused++;
        this.client!.destroy();
        this.target = this.target === this.nodes[0] ? this.nodes[1] : this.nodes[0];
        this.client = await MiniNbdClient.connect(this.target.nbdPort, this.volume);
        continue;
      }
      data.copy(this.model, off);
      const now = Date.now();
      this.gapMaxMs = Math.max(this.gapMaxMs, now - this.lastAckMs);
      this.lastAckMs = now;
      this.acks.push(now);
      this.acked++;
      if (this.o.intervalMs !== undefined) {
        next += this.o.intervalMs;
        const wait = next - Date.now();
        if (wait > 0) await new Promise((res) => setTimeout(res, wait));
        else next = Date.now();
      }
    }
  }

  /** The longest gap so far, and a fresh start for the next one. */
  takeGap(): number {
    const g = this.gapMaxMs;
    this.gapMaxMs = 0;
    return g;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.loop;
    this.client?.destroy();
  }
}

/** A daemon's three ports, fixed so that it can be restarted at the same address. */
export interface DaemonPorts {
  nbd: number;
  control: number;
  repl: number;
}

/** Whether 127.0.0.1:port can be listened on now. */
function canListen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

/**
 * A free port below the kernel's ephemeral range. A port from listen(0) is in that range,
 * so between this check and the daemon's bind (and across its restarts) another test's
 * outgoing connection could take it: CI once failed with EADDRINUSE that way. Below the
 * range only another fixed-port pick can collide (random, and checked here).
 */
async function freeFixedPort(): Promise<number> {
  let low = 32768;
  try {
    low = Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]);
  } catch {
    // not Linux: keep the usual bound
  }
  if (low >= 12000) {
    for (let i = 0; i < 100; i++) {
      const port = 10000 + Math.floor(Math.random() * (low - 10000));
      if (await canListen(port)) return port;
    }
  }
  return freePort();
}

export async function freePorts(): Promise<DaemonPorts> {
  return { nbd: await freeFixedPort(), control: await freeFixedPort(), repl: await freeFixedPort() };
}

/** Daemons on fixed ports (restartable at the same address, on the same data), data on tmpfs; all disposed at the end. */
export class DaemonFleet {
  private readonly all: TestDaemon[] = [];

  async start(p: DaemonPorts, dataDir?: string): Promise<TestDaemon> {
    const d = await startDaemon({ tmpfs: true, ...(dataDir ? { dataDir } : {}), extraArgs: ['--port', String(p.nbd), '--control-port', String(p.control), '--repl-port', String(p.repl)] });
    this.all.push(d);
    return d;
  }

  async dispose(): Promise<void> {
    await Promise.all(this.all.splice(0).map((d) => d.dispose()));
  }
}

/** Blocks (of blockBytes) whose content differs between two equal-sized buffers. */
export function blocksDiffering(x: Buffer, y: Buffer, blockBytes = 4096): Set<number> {
  const out = new Set<number>();
  for (let b = 0; b * blockBytes < x.length; b++) if (!x.subarray(b * blockBytes, (b + 1) * blockBytes).equals(y.subarray(b * blockBytes, (b + 1) * blockBytes))) out.add(b);
  return out;
}

/**
 * Writes `bytes` from offset 0 through NBD in 1 MiB writes, four in flight, each MiB its own
 * fill byte (from `seed`) with its offset in its first 4 bytes: a backlog whose every chunk
 * differs, so a chunk sent twice or out of place shows in the volumes' checksums.
 */
export async function writeBacklog(nbdPort: number, volume: string, bytes: number, seed: number): Promise<void> {
  const MiB = 1024 * 1024;
  const c = await MiniNbdClient.connect(nbdPort, volume);
  const chunk = Buffer.alloc(MiB);
  for (let off = 0; off < bytes; off += 4 * MiB) {
    const writes = [];
    for (let i = 0; i < 4 && off + i * MiB < bytes; i++) {
      chunk.fill(((off / MiB + i) * seed + 11) & 255);
      chunk.writeUInt32LE(off + i * MiB, 0);
      writes.push(c.write(off + i * MiB, Buffer.from(chunk)));
    }
    for (const r of await Promise.all(writes)) expect(r.error).toBe(0);
  }
  await c.disconnect();
}
