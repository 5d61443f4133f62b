// Why: a simulated deltavol daemon: durable disks (NodeStore) that outlive any number of
// incarnations, and per incarnation everything a process holds in memory — its clock
// facade, transport facade, volume host and ReplicationService. A crash drops the
// incarnation whole (its timers cancelled, its connections silenced, its host detached),
// replaces the disks by what a power cut or a kill -9 leaves, and the next start() opens
// the volumes (engine recovery) and starts a fresh ReplicationService on what survived,
// as `deltavol serve` does after a restart.

import { pino, type Logger } from 'pino';
import { ReplicationService, type ReplicationConfig } from '../../src/replication/service.js';
import type { ReplicationPlatform } from '../../src/replication/platform.js';
import { NodeClock, type SimTime } from './time.js';
import type { NodeTransport, SimNetwork } from './network.js';
import { NodeStore, type CrashMode, type DiskOptions } from './disk.js';
import { SimHost, type EngineTuning, type HostHooks, type SimVolume } from './sim-volume.js';

export const replPort = 7000;

export class Incarnation {
  dead = false;
  service: ReplicationService | null = null;
  /** Resolves when this incarnation dies (whoever waits on it stops waiting). */
  readonly died: Promise<void>;
  private markDied!: () => void;
  constructor(
    readonly n: number,
    readonly clock: NodeClock,
    readonly transport: NodeTransport,
    readonly host: SimHost,
  ) {
    this.died = new Promise<void>((r) => (this.markDied = r));
  }
  volume(name: string): SimVolume | undefined {
    return this.host.get(name);
  }
  kill(): void {
    this.dead = true;
    this.clock.kill();
    this.transport.kill();
    this.host.kill();
    this.markDied();
  }
}

export type NodeState = 'down' | 'starting' | 'up';

export interface NodeEnv {
  time: SimTime;
  net: SimNetwork;
  rng: () => number;
  disk: DiskOptions;
  tuning: EngineTuning;
  config: Omit<ReplicationConfig, 'host' | 'port' | 'advertiseHost' | 'advertisePort'>;
  /** Production log lines of this node (already leveled), or null to drop them. */
  logSink: ((line: string) => void) | null;
  hooks: (node: SimNode) => HostHooks;
}

export class SimNode {
  readonly store = new NodeStore();
  inc: Incarnation | null = null;
  state: NodeState = 'down';
  incarnations = 0;
  /** How the node last went down (a powered-off node does not answer connects at all). */
  downMode: CrashMode | null = null;
  downSinceMs = 0;
  private readonly logger: Logger;

  constructor(
    readonly name: string,
    private readonly env: NodeEnv,
  ) {
    const sink = env.logSink;
    this.logger = sink
      ? pino(
          { level: 'debug', timestamp: false, base: null, mixin: () => ({ vt: env.time.nowMs % 1_000_000_000, node: name }) },
          { write: (s: string) => sink(s.trimEnd()) },
        )
      : pino({ level: 'silent' });
  }

  get service(): ReplicationService | null {
    return this.state === 'up' ? (this.inc?.service ?? null) : null;
  }

  volume(name: string): SimVolume | undefined {
    return this.state === 'up' ? this.inc?.volume(name) : undefined;
  }

  /** Boots a new incarnation: opens the volumes (engine recovery), then the replication service. */
  async start(): Promise<void> {
    if (this.state !== 'down') throw new Error(`node ${this.name} is ${this.state}`);
    const env = this.env;
    const n = ++this.incarnations;
    const clock = new NodeClock(env.time);
    const transport = env.net.transport(this.name, clock);
    let inc!: Incarnation;
    const alive = () => !inc.dead;
    const host = new SimHost(this.store, env.time, env.rng, env.disk, env.tuning, clock, alive, env.hooks(this));
    inc = new Incarnation(n, clock, transport, host);
    this.inc = inc;
    this.state = 'starting';
    this.downMode = null;
    env.net.nodeUp(this.name);
    await host.open();
    if (inc.dead) return;
    const platform: ReplicationPlatform = {
      clock,
      transport,
      newId: () => {
        let s = '';
        for (let i = 0; i < 12; i++) s += Math.floor(env.rng() * 16).toString(16);
        return s;
      },
    };
    const service = new ReplicationService(host, platform, { ...env.config, host: this.name, port: replPort, advertiseHost: '', advertisePort: 0 }, this.logger.child({ inc: n }));
    inc.service = service;
    await service.start();
    if (inc.dead) return;
    this.state = 'up';
  }

  /** The process dies now (mode: power cut loses unsynced writes; kill -9 keeps them). */
  crash(mode: CrashMode): void {
    const inc = this.inc;
    inc?.kill();
    this.env.net.nodeDown(this.name, mode === 'kill9');
    this.store.crash(this.env.rng, mode);
    this.inc = null;
    this.state = 'down';
    this.downMode = mode;
    this.downSinceMs = this.env.time.nowMs;
  }

  /** A clean stop (the daemon's shutdown): replication stops, engines close; then the process is gone. */
  async stop(): Promise<void> {
    const inc = this.inc;
    if (!inc || this.state !== 'up') return;
    this.state = 'starting'; // not serving clients any more
    await inc.service!.stop();
    for (const v of inc.host.list()) await v.engine.close();
    if (inc.dead) return;
    this.crash('kill9'); // nothing unsynced remains; the process is gone
  }
}
