// Why: a node's disks are the only thing that survives its crash, so they must be
// separate from everything the node holds in memory. NodeStore is that durable part:
// per volume, the engine's metadata (PagedFs: SimFs's crash model, paged), its data
// (test/helpers' SimVolumeData) and its replication state (PagedFs): unsynced writes are
// lost or torn at a power cut. A crash replaces each by its crash(rng) result; a kill -9 keeps every
// write (the page cache survives the process). Each incarnation reaches the disks through
// LatentFs / LatentData, which add a seeded sync latency in virtual time (so a crash can
// land while a sync is under way) and report activity to the simulator's settle loop.

import type { DurableFile, DurableFs } from '../../src/util/durable-fs.js';
import type { VolumeData } from '../../src/volume/volume-engine.js';
import { SimVolumeData } from '../helpers/sim-volume-data.js';
import { PagedFs } from './paged-fs.js';
import type { SimTime } from './time.js';

export interface VolumeDisks {
  name: string;
  sizeBytes: number;
  blockBytes: number;
  description: string;
  engineFs: PagedFs;
  stateFs: PagedFs;
  data: SimVolumeData;
}

export type CrashMode = 'powercut' | 'kill9';

/** What a node keeps across crashes: its volumes' disks (a volume exists once its creation finished). */
export class NodeStore {
  readonly volumes = new Map<string, VolumeDisks>();

  crash(rng: () => number, mode: CrashMode): void {
    // kill -9: the kernel keeps every write the process made (none lost or torn).
    const r = mode === 'kill9' ? () => 0.99 : rng;
    for (const [name, v] of [...this.volumes]) {
      this.volumes.set(name, { ...v, engineFs: v.engineFs.crash(r), stateFs: v.stateFs.crash(r), data: v.data.crash(r) });
    }
  }
}

/** I/O latency of one node's disks (virtual ms). */
export interface DiskOptions {
  syncLatencyMs: number;
  syncJitterMs: number;
}

/**
 * Disk latency runs on SimTime itself, not on the node's clock: the disk finishes what
 * it was doing even when the node dies (its completions land on the discarded disk
 * objects, which the crash already replaced). Only the node's own timers die with it.
 */
class Latency {
  constructor(
    private readonly time: SimTime,
    private readonly rng: () => number,
    private readonly o: DiskOptions,
    /** False once the incarnation died (its role-record writes are no longer reported). */
    readonly alive: () => boolean,
  ) {}
  wait(): Promise<void> {
    const ms = this.o.syncLatencyMs + this.rng() * this.o.syncJitterMs;
    return new Promise((r) => this.time.schedule(ms, r));
  }
  async io<T>(p: () => Promise<T>): Promise<T> {
    this.time.activity++;
    await this.wait();
    this.time.pendingIo++;
    try {
      return await p();
    } finally {
      this.time.pendingIo--;
      this.time.activity++;
    }
  }
  touch(): void {
    this.time.activity++;
  }
}

export class LatentFs implements DurableFs {
  private readonly lat: Latency;
  constructor(
    readonly inner: PagedFs,
    time: SimTime,
    rng: () => number,
    o: DiskOptions,
    alive: () => boolean,
    /** Called after every atomic replace (the simulator watches role.json through it). */
    private readonly onAtomic: (name: string) => void = () => undefined,
  ) {
    const lat = new Latency(time, rng, o, alive);
    this.lat = lat;
    inner.syncDelay = () => lat.wait();
  }
  open(name: string, create: boolean): DurableFile {
    const f = this.inner.open(name, create);
    const lat = this.lat;
    return {
      name: f.name,
      sizeBytes: () => f.sizeBytes(),
      read: (position, target, offset, length) => f.read(position, target, offset, length),
      write(position, source, offset, length) {
        lat.touch();
        f.write(position, source, offset, length);
      },
      truncate(sizeBytes) {
        lat.touch();
        f.truncate(sizeBytes);
      },
      sync() {
        lat.touch();
        return f.sync().finally(() => lat.touch());
      },
      close: () => f.close(),
    };
  }
  exists(name: string): boolean {
    return this.inner.exists(name);
  }
  remove(name: string): void {
    this.lat.touch();
    this.inner.remove(name);
  }
  rename(from: string, to: string): void {
    this.lat.touch();
    this.inner.rename(from, to);
  }
  writeAtomic(name: string, data: Uint8Array): void {
    this.lat.touch();
    this.inner.writeAtomic(name, data);
    if (this.lat.alive()) this.onAtomic(name);
  }
  readAll(name: string): Buffer | null {
    return this.inner.readAll(name);
  }
  list(): string[] {
    return this.inner.list();
  }
}

export class LatentData implements VolumeData {
  private readonly lat: Latency;
  constructor(
    readonly inner: SimVolumeData,
    time: SimTime,
    rng: () => number,
    o: DiskOptions,
    alive: () => boolean,
  ) {
    this.lat = new Latency(time, rng, o, alive);
  }
  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }
  readSync(offset: number, target: Buffer, targetOffset: number, length: number): void {
    this.lat.touch(); // (the engine's copy-out reads between its yields)
    this.inner.readSync(offset, target, targetOffset, length);
  }
  write(offset: number, chunks: Buffer[]): void {
    this.lat.touch();
    this.inner.write(offset, chunks);
  }
  writeRangesSync(ranges: Float64Array, count: number, source: Buffer, sourceOffset: number): void {
    this.lat.touch();
    let at = sourceOffset;
    for (let i = 0; i < count; i++) {
      const length = ranges[2 * i + 1]!;
      this.inner.write(ranges[2 * i]!, [source.subarray(at, at + length)]);
      at += length;
    }
  }
  zero(offset: number, length: number): void {
    this.lat.touch();
    this.inner.zero(offset, length);
  }
  flush(): Promise<void> {
    return this.lat.io(() => this.inner.flush());
  }
}
