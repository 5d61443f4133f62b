// Why: the replication link is where most recovery bugs hide (a heartbeat that never
// notices a partition, a frame accepted after a flipped bit, a session that outlives its
// peer). This is the simulated network the nodes talk over (TigerBeetle's
// packet_simulator, adapted to byte streams): every connection is two in-order byte
// queues with a seeded delay and seeded chunking, and the seed's faults act on them:
// partitions (bytes stop both ways, new connects time out), resets (both ends close),
// delay spikes, flipped bits in delivered bytes, refused connects while a node is down.
// A crashed node's connections die with it and its listener disappears. Each node
// incarnation reaches the network through a NodeTransport, the Transport src/ takes.

import type { Admission, Conn, Listener, Transport } from '../../src/replication/transport.js';
import { DeltavolError } from '../../src/util/errors.js';
import type { NodeClock, SimEvent, SimTime } from './time.js';

export interface NetOptions {
  /** One-way delay of a segment: base plus up to jitter (ms). */
  latencyMs: number;
  jitterMs: number;
  /** Probability that one write is delivered in several segments. */
  chunkProbability: number;
}

export interface NetStats {
  connects: number;
  refused: number;
  timedOut: number;
  segments: number;
  bytes: number;
  flips: number;
  resets: number;
}

interface Segment {
  at: number;
  data: Buffer | null; // null: the sender closed (FIN)
}

/** One direction of a connection: a FIFO of segments and the event that delivers the head. */
interface Pipe {
  queue: Segment[];
  queuedBytes: number;
  pump: SimEvent | null;
  lastAt: number;
}

type PathKey = string;
const pathKey = (a: string, b: string): PathKey => (a < b ? `${a}|${b}` : `${b}|${a}`);

export class SimNetwork {
  private readonly listeners = new Map<string, { node: string; onConn: (c: Conn, a: Admission) => void }>();
  private readonly partitions = new Set<PathKey>();
  private readonly spikes = new Map<PathKey, { untilMs: number; extraMs: number }>();
  /** Probability that a delivered segment gets one bit flipped (0: off). */
  flipProbability = 0;
  readonly conns = new Set<SimConn>();
  /** Peers of connections a powered-off node held: reset when it boots again. */
  private readonly orphans = new Map<string, SimConn[]>();
  /** Nodes that are powered off (a connect to them times out instead of being refused). */
  readonly poweredOff = new Set<string>();
  readonly stats: NetStats = { connects: 0, refused: 0, timedOut: 0, segments: 0, bytes: 0, flips: 0, resets: 0 };

  constructor(
    readonly time: SimTime,
    private readonly rng: () => number,
    readonly options: NetOptions,
    private readonly trace: (line: string) => void,
  ) {}

  // ================= faults =================

  partition(a: string, b: string): void {
    this.partitions.add(pathKey(a, b));
  }

  heal(a: string, b: string): void {
    if (!this.partitions.delete(pathKey(a, b))) return;
    for (const c of this.conns) if (pathKey(c.node, c.peer.node) === pathKey(a, b)) c.repump();
  }

  partitioned(a: string, b: string): boolean {
    return this.partitions.has(pathKey(a, b));
  }

  /** Largest delay spike so far (ms). */
  maxSpikeMs = 0;

  spike(a: string, b: string, extraMs: number, durationMs: number): void {
    this.maxSpikeMs = Math.max(this.maxSpikeMs, extraMs);
    this.spikes.set(pathKey(a, b), { untilMs: this.time.nowMs + durationMs, extraMs });
  }

  /** Both ends of every connection between a and b close, bytes in flight are lost. */
  reset(a: string, b: string): number {
    let n = 0;
    for (const c of [...this.conns]) {
      if (c.isClient && pathKey(c.node, c.peer.node) === pathKey(a, b)) {
        c.abort('connection reset');
        c.peer.abort('connection reset by peer');
        n++;
      }
    }
    this.stats.resets += n;
    return n;
  }

  healAll(): void {
    const ps = [...this.partitions];
    this.partitions.clear();
    this.spikes.clear();
    this.flipProbability = 0;
    for (const p of ps) {
      const [a, b] = p.split('|') as [string, string];
      for (const c of this.conns) if (pathKey(c.node, c.peer.node) === pathKey(a, b)) c.repump();
    }
  }

  // ================= nodes =================

  /** A node died: its listener goes, its ends go silent; peers hear a reset only if its kernel lives (kill -9). */
  nodeDown(node: string, kernelAlive: boolean): void {
    for (const [k, l] of [...this.listeners]) if (l.node === node) this.listeners.delete(k);
    const orphans = this.orphans.get(node) ?? [];
    for (const c of [...this.conns]) {
      if (c.node !== node) continue;
      c.silence();
      if (kernelAlive) c.peer.abortLater('connection reset by peer', this.delay(c.node, c.peer.node));
      else orphans.push(c.peer);
    }
    this.orphans.set(node, orphans);
    if (!kernelAlive) this.poweredOff.add(node);
  }

  /** A node booted: peers still holding connections to its earlier incarnations get a reset. */
  nodeUp(node: string): void {
    this.poweredOff.delete(node);
    for (const p of this.orphans.get(node) ?? []) if (!p.closed) p.abortLater('connection reset by peer', this.delay(node, p.node));
    this.orphans.delete(node);
  }

  transport(node: string, clock: NodeClock): NodeTransport {
    return new NodeTransport(this, node, clock);
  }

  // ================= internals =================

  delay(from: string, to: string): number {
    let d = this.options.latencyMs + this.rng() * this.options.jitterMs;
    const s = this.spikes.get(pathKey(from, to));
    if (s && s.untilMs > this.time.nowMs) d += s.extraMs;
    return d;
  }

  listen(node: string, host: string, port: number, onConn: (c: Conn, a: Admission) => void): Listener {
    const key = `${host}:${port}`;
    if (this.listeners.has(key)) throw Object.assign(new Error(`listen EADDRINUSE ${key}`), { code: 'EADDRINUSE' });
    const entry = { node, onConn };
    this.listeners.set(key, entry);
    return {
      port,
      close: async () => {
        if (this.listeners.get(key) === entry) this.listeners.delete(key);
      },
    };
  }

  connect(t: NodeTransport, host: string, port: number, timeoutMs: number, signal?: AbortSignal): Promise<Conn> {
    this.stats.connects++;
    return new Promise<Conn>((resolve, reject) => {
      let settled = false;
      const finish = (f: () => void) => {
        if (settled) return;
        settled = true;
        cancelTimeout();
        signal?.removeEventListener('abort', onAbort);
        if (t.alive) f(); // a dead incarnation's connect never settles
      };
      const fail = (why: string) => finish(() => reject(new DeltavolError('DAEMON_UNREACHABLE', why)));
      const onAbort = () => fail(`connect to ${host}:${port} aborted`);
      const cancelTimeout = t.clock.after(timeoutMs, () => {
        this.stats.timedOut++;
        fail(`connect to ${host}:${port} timed out`);
      });
      if (signal?.aborted) return onAbort();
      signal?.addEventListener('abort', onAbort, { once: true });
      const target = host; // hosts are node names
      const there = this.delay(t.node, target);
      this.time.schedule(there, () => {
        if (settled || !t.alive) return;
        if (this.partitioned(t.node, target) || this.poweredOff.has(target)) return; // the SYN is lost: the timeout answers
        const l = this.listeners.get(`${host}:${port}`);
        const back = this.delay(target, t.node);
        if (!l) {
          this.time.schedule(back, () => {
            this.stats.refused++;
            fail(`cannot reach ${host}:${port}: connect ECONNREFUSED`);
          });
          return;
        }
        const client = new SimConn(this, t.node, true, target);
        const server = new SimConn(this, target, false, t.node);
        client.peer = server;
        server.peer = client;
        client.owner = t;
        this.conns.add(client);
        this.conns.add(server);
        try {
          l.onConn(server, { release: () => undefined });
        } catch (e) {
          this.time.errors.push(e as Error);
        }
        this.time.schedule(back, () => {
          if (settled) return;
          if (client.closed) return fail(`connect to ${host}:${port}: connection closed during the handshake`);
          finish(() => resolve(client));
        });
      });
    });
  }

  flip(b: Buffer): Buffer {
    if (this.flipProbability <= 0 || b.length === 0 || this.rng() >= this.flipProbability) return b;
    const i = Math.floor(this.rng() * b.length);
    const bit = Math.floor(this.rng() * 8);
    b[i] = b[i]! ^ (1 << bit);
    this.stats.flips++;
    this.trace(`net: flipped bit ${bit} of byte ${i}/${b.length}`);
    return b;
  }

  chunkCount(length: number): number {
    if (length < 2 || this.rng() >= this.options.chunkProbability) return 1;
    return 2 + Math.floor(this.rng() * 2);
  }

  split(length: number, parts: number): number[] {
    const cuts = new Set<number>();
    for (let i = 0; i < parts - 1; i++) cuts.add(1 + Math.floor(this.rng() * (length - 1)));
    return [...cuts].sort((a, b) => a - b);
  }
}

/** One end of a simulated connection. */
export class SimConn implements Conn {
  peer!: SimConn;
  owner: NodeTransport | null = null;
  closed = false;
  /** The node holding this end died: nothing of it runs or is heard again. */
  silenced = false;
  private paused = false;
  private readonly dataFns: ((chunk: Buffer) => void)[] = [];
  private readonly closeFns: ((reason: string) => void)[] = [];
  private readonly drainFns = new Set<() => void>();
  /** Bytes this end sent that were not yet delivered. */
  private readonly out: Pipe = { queue: [], queuedBytes: 0, pump: null, lastAt: 0 };

  constructor(
    private readonly net: SimNetwork,
    readonly node: string,
    readonly isClient: boolean,
    readonly remoteAddress: string,
  ) {}

  /** Simulated links are authenticated: the peer is the node it is (hosts are node names). */
  get peerIdentity(): string {
    return `sim:${this.remoteAddress}`;
  }

  get writableLength(): number {
    return this.out.queuedBytes;
  }

  write(b: Buffer, done?: () => void): void {
    if (this.closed || b.length === 0) {
      done?.();
      return;
    }
    this.net.time.activity++;
    const copy = Buffer.from(b); // the caller may reuse its buffer
    done?.();
    const parts = this.net.chunkCount(copy.length);
    const base = this.net.time.nowMs + Math.ceil(this.net.delay(this.node, this.peer.node));
    const at = Math.max(base, this.out.lastAt);
    this.out.lastAt = at;
    let from = 0;
    for (const cut of [...this.net.split(copy.length, parts), copy.length]) {
      this.out.queue.push({ at, data: copy.subarray(from, cut) });
      from = cut;
    }
    this.out.queuedBytes += copy.length;
    this.schedulePump();
  }

  cork(): void {}
  uncork(): void {}

  pause(): void {
    this.paused = true;
  }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    this.peer.repump();
  }

  destroy(): void {
    if (this.closed) return;
    this.closed = true;
    // The peer reads what was sent, then the end of the stream.
    const at = Math.max(this.net.time.nowMs + Math.ceil(this.net.delay(this.node, this.peer.node)), this.out.lastAt);
    this.out.queue.push({ at, data: null });
    this.schedulePump();
    this.net.time.schedule(0, () => this.fireClose('connection closed'));
  }

  onData(fn: (chunk: Buffer) => void): void {
    this.dataFns.push(fn);
    this.peer?.repump();
  }

  /** Where reads go (Conn.readInto): null, fresh buffers. */
  next: (() => Buffer) | null = null;

  readInto(next: () => Buffer): boolean {
    this.next = next;
    return true;
  }

  onClose(fn: (reason: string) => void): void {
    if (this.closeFired) fn('connection closed');
    else this.closeFns.push(fn);
  }

  onDrain(fn: () => void): void {
    this.drainFns.add(fn);
  }

  offDrain(fn: () => void): void {
    this.drainFns.delete(fn);
  }

  // ================= network side =================

  private closeFired = false;

  private fireClose(reason: string): void {
    if (this.closeFired || this.silenced) return;
    this.closeFired = true;
    this.net.conns.delete(this);
    for (const f of this.closeFns.splice(0)) {
      try {
        f(reason);
      } catch (e) {
        this.net.time.errors.push(e as Error);
      }
    }
  }

  /** Closed by the network (reset): no FIN, bytes in flight both ways are lost. */
  abort(reason: string): void {
    this.out.queue = [];
    this.out.queuedBytes = 0;
    if (this.out.pump) this.net.time.cancel(this.out.pump);
    this.out.pump = null;
    if (this.closed && this.closeFired) return;
    this.closed = true;
    this.net.time.schedule(0, () => this.fireClose(reason));
  }

  abortLater(reason: string, delayMs: number): void {
    this.net.time.schedule(delayMs, () => this.abort(reason));
  }

  /** The node holding this end died: drop everything, tell nobody on this side. */
  silence(): void {
    this.silenced = true;
    this.closed = true;
    this.out.queue = [];
    this.out.queuedBytes = 0;
    if (this.out.pump) this.net.time.cancel(this.out.pump);
    this.out.pump = null;
    this.net.conns.delete(this);
  }

  /** Try delivering again (a partition healed, the receiver resumed or got a handler). */
  repump(): void {
    if (this.out.pump) this.net.time.cancel(this.out.pump);
    this.out.pump = null;
    this.schedulePump();
  }

  private schedulePump(): void {
    if (this.out.pump || this.out.queue.length === 0) return;
    const head = this.out.queue[0]!;
    this.out.pump = this.net.time.schedule(Math.max(0, head.at - this.net.time.nowMs), () => {
      this.out.pump = null;
      this.deliverHead();
    });
  }

  /** Delivers every segment due now, in order, as far as the path and the receiver allow. */
  private deliverHead(): void {
    const to = this.peer;
    for (let n = 0; n < 1_000_000; n++) {
      const head = this.out.queue[0];
      if (!head || head.at > this.net.time.nowMs) break;
      if (this.net.partitioned(this.node, to.node)) return; // held until heal() repumps
      if (head.data !== null && (to.paused || to.dataFns.length === 0) && !to.closed) return; // resume()/onData() repumps
      this.out.queue.shift();
      if (head.data) this.out.queuedBytes -= head.data.length;
      if (to.closed) {
        // Bytes to a closed end are lost; if the sender is still open it hears a reset.
        if (!this.closed && !to.silenced) this.abort('connection reset by peer');
        return;
      }
      if (head.data === null) {
        to.closed = true;
        to.fireClose('connection closed by peer');
        return;
      }
      this.net.stats.segments++;
      this.net.stats.bytes += head.data.length;
      const chunk = this.net.flip(head.data);
      // A receiver that chose its buffers (readInto, as a replica's link does on TCP) gets
      // the segment copied into them, one read per buffer, as the kernel would.
      for (let at = 0; at < chunk.length; ) {
        let piece = chunk.subarray(at);
        if (to.next !== null) {
          const b = to.next();
          if (b.length === 0) throw new Error('readInto: an empty buffer');
          const n = chunk.copy(b, 0, at, Math.min(chunk.length, at + b.length));
          piece = b.subarray(0, n);
        }
        at += piece.length;
        for (const f of to.dataFns) {
          try {
            f(piece);
          } catch (e) {
            this.net.time.errors.push(e as Error);
          }
        }
      }
      if (this.out.queuedBytes === 0 && this.drainFns.size > 0) for (const f of [...this.drainFns]) f();
    }
    this.schedulePump();
  }
}

/** The Transport one node incarnation uses. Dead once its node crashes. */
export class NodeTransport implements Transport {
  private dead = false;
  private readonly listeners: Listener[] = [];

  constructor(
    private readonly net: SimNetwork,
    readonly node: string,
    readonly clock: NodeClock,
  ) {}

  get alive(): boolean {
    return !this.dead;
  }

  connect(host: string, port: number, timeoutMs: number, signal?: AbortSignal): Promise<Conn> {
    if (this.dead) return new Promise<Conn>(() => undefined);
    return this.net.connect(this, host, port, timeoutMs, signal);
  }

  listen(host: string, port: number, onConn: (c: Conn, a: Admission) => void): Promise<Listener> {
    if (this.dead) return new Promise<Listener>(() => undefined);
    if (host !== this.node) return Promise.reject(new Error(`listen: ${host} is not this node (${this.node})`));
    const l = this.net.listen(this.node, host, port, onConn);
    this.listeners.push(l);
    return Promise.resolve(l);
  }

  kill(): void {
    this.dead = true;
  }
}
