// Why: replication and recovery see volumes only as HostedVolume / VolumeHost
// (src/replication/ports.ts). In production those are Volume objects over a real file
// and the daemon's registry; the simulator needs the same behaviour over simulated
// disks and virtual time. SimVolume runs the real VolumeEngine on LatentFs/LatentData and
// the real WriteGate (write access open / hold / refuse, writesIdle) on the node's virtual
// clock, and mirrors what Volume adds where Volume cannot be used as it is (it opens real
// files): the read overlay of a replica's playback. SimHost is one node incarnation's
// volumes; it dies with it.

import { forEachBlockSlice } from '../../src/util/block-slices.js';
import { DeltavolError, systemError } from '../../src/util/errors.js';
import type { DurableFs } from '../../src/util/durable-fs.js';
import { VolumeEngine, type BuildOptions, type DeltaSink } from '../../src/volume/volume-engine.js';
import type { ReadOverlay } from '../../src/volume/volume.js';
import type { WriteMirror } from '../../src/volume/write-mirror.js';
import { WriteGate, type WriteAccess } from '../../src/volume/write-gate.js';
import { validateVolumeName } from '../../src/volume/volume-meta.js';
import type { SnapshotInfo } from '../../src/snapshot/snapshot-queue.js';
import type { PagedBitmap } from '../../src/bitmap/paged-bitmap.js';
import type { CreateReplicaVolume, HostedVolume, VolumeHost } from '../../src/replication/ports.js';
import type { Clock } from '../../src/util/clock.js';
import { SimVolumeData } from '../helpers/sim-volume-data.js';
import { PagedFs } from './paged-fs.js';
import { LatentData, LatentFs, type DiskOptions, type NodeStore, type VolumeDisks } from './disk.js';
import type { SimTime } from './time.js';

/** Engine settings the seed picks (small extents and turns reach more of the engine's paths). */
export interface EngineTuning {
  activityExtentBlocks: number;
  activityHotMax: number;
  copyBlocksPerTurn: number;
  /** Write journal region bytes and locality ring (see EngineOptions). */
  journalRegionBytes: number;
  journalRecentExtents: number;
  checkpointPagesPerTurn: number;
}

export class SimVolume implements HostedVolume {
  private overlay: ReadOverlay | null = null;
  private readonly gate: WriteGate;
  /** Client writes refused (EPERM) so far, for the trace. */
  refused = 0;

  constructor(
    readonly name: string,
    readonly sizeBytes: number,
    readonly description: string,
    readonly engine: VolumeEngine,
    private readonly data: LatentData,
    private readonly clock: Clock,
  ) {
    this.gate = new WriteGate(name, (ms, fn) => clock.after(ms, fn));
  }

  get blockBytes(): number {
    return this.engine.blockBytes;
  }
  get blocksTotal(): number {
    return this.engine.blocksTotal;
  }
  get writeAccess(): WriteAccess {
    return this.gate.current;
  }
  get overlayActive(): boolean {
    return this.overlay !== null;
  }

  private checkRange(offset: number, length: number): void {
    if (!(offset >= 0 && length >= 0 && offset + length <= this.sizeBytes)) throw systemError('EINVAL', `range ${offset}+${length} outside volume ${this.name}`);
  }

  // ================= clients =================

  /** A client write, as Volume.write does it; `onIssue` runs when its data goes to the engine. */
  clientWrite(offset: number, data: Buffer, onIssue: () => void): Promise<void> {
    let wait: Promise<void> | undefined;
    try {
      wait = this.gate.check();
    } catch (e) {
      this.refused++;
      return Promise.reject(e as Error);
    }
    if (wait) return wait.then(() => this.clientWrite(offset, data, onIssue));
    this.checkRange(offset, data.length);
    try {
      this.engine.admitWrite(); // a sync pair's fence refuses it before anything changes
    } catch (e) {
      this.refused++;
      return Promise.reject(e as Error);
    }
    onIssue();
    try {
      return Promise.resolve(this.gate.track(this.engine.write(offset, [data])));
    } catch (e) {
      return Promise.reject(e as Error); // (a sync pair's fence refusing it: EIO, nothing changed)
    }
  }

  setWriteAccess(a: WriteAccess): void {
    this.gate.set(a);
  }

  writesIdle(): Promise<void> {
    return this.gate.idle();
  }
  get quiescing(): boolean {
    return this.engine.quiescing;
  }
  /** The simulator's clients are not connections. */
  clientCount(): number {
    return 0;
  }

  read(offset: number, length: number, target: Buffer): void {
    this.checkRange(offset, length);
    const o = this.overlay;
    if (o === null) {
      this.data.readSync(offset, target, 0, length);
      return;
    }
    forEachBlockSlice(offset, length, this.blockBytes, (b, inBlock, done, n) => {
      if (!o.readBlock(b, inBlock, target, done, n)) this.data.readSync(offset + done, target, done, n);
    });
  }

  /** The whole volume as a client reads it now. */
  readAll(): Buffer {
    const b = Buffer.alloc(this.sizeBytes);
    this.read(0, this.sizeBytes, b);
    return b;
  }

  // ================= PrimaryPort =================

  setMirror(m: WriteMirror | null): void {
    this.engine.setMirror(m);
  }
  buildDeltaSet(n: number, sink: DeltaSink, options: BuildOptions): Promise<{ blocks: number }> {
    if (options.snapshotName !== undefined) validateVolumeName(options.snapshotName);
    return this.engine.buildDeltaSet(n, sink, options);
  }
  snapshotAndForget(name: string, n: number): Promise<void> {
    validateVolumeName(name);
    return this.engine.snapshotAndForget(name, n);
  }
  changedBlockCount(): number {
    return this.engine.changedBlockCount();
  }
  unshippedBlockCount(): number {
    return this.engine.unshippedBlockCount();
  }
  snapshots(): SnapshotInfo[] {
    return this.engine.listSnapshots();
  }
  private snapshot(name: string): SnapshotInfo {
    const s = this.engine.listSnapshots().find((x) => x.name === name);
    if (!s) throw new DeltavolError('SNAPSHOT_NOT_FOUND', `volume ${this.name} has no snapshot named "${name}"`);
    return s;
  }
  async deleteSnapshot(name: string, _force: boolean): Promise<void> {
    this.snapshot(name);
    await this.engine.deleteSnapshot(name);
  }
  snapshotValidBlocks(name: string): PagedBitmap {
    return this.engine.snapshotValidBlocks(name);
  }
  readSnapshot(name: string, offset: number, length: number, target: Buffer): void {
    const s = this.snapshot(name);
    if (!s.valid) throw systemError('EIO', `snapshot ${this.name}@${name} is invalid (its save area filled)`);
    if (!(offset >= 0 && length >= 0 && offset + length <= s.sizeBytes)) throw systemError('EINVAL', `range outside snapshot ${name}`);
    this.engine.readSnapshot(name, offset, length, target);
  }
  differenceBlocks(from: string, to: string | null): { data: PagedBitmap; zero: PagedBitmap } {
    return this.engine.differential(from, to);
  }

  // ================= ReplicaPort =================

  playbackWrite(offset: number, chunks: Buffer[]): void | Promise<void> {
    return this.engine.write(offset, chunks);
  }
  playbackWriteRuns(ranges: Float64Array, count: number, source: Buffer, sourceOffset: number): void | Promise<void> {
    return this.engine.writeRuns(ranges, count, source, sourceOffset);
  }
  playbackZero(offset: number, length: number): void | Promise<void> {
    this.checkRange(offset, length);
    return this.engine.zero(offset, length);
  }
  flush(): Promise<void> {
    return this.engine.flush();
  }
  setOverlay(o: ReadOverlay | null): void {
    this.overlay = o;
  }
  readsDrained(): Promise<void> {
    return Promise.resolve(); // reads are synchronous here
  }
  createSnapshot(name: string, deltaSetNumber: number): Promise<SnapshotInfo> {
    validateVolumeName(name);
    return this.engine.createSnapshot(name, deltaSetNumber, new Date(this.clock.now()));
  }
  discardChanges(): Promise<void> {
    return this.engine.discardChanges();
  }
  changedBlocks(): PagedBitmap {
    return this.engine.changeLog.pending();
  }

  hasData(): boolean {
    return this.engine.validBlockCount() > 0;
  }

  /** The whole snapshot as an export of it reads. */
  readSnapshotAll(name: string): Buffer {
    const s = this.snapshot(name);
    const b = Buffer.alloc(s.sizeBytes);
    this.readSnapshot(name, 0, s.sizeBytes, b);
    return b;
  }
}

export interface HostHooks {
  /** role.json of a volume was replaced (a transition or progress). */
  onRoleWrite(volume: string): void;
  warn(message: string, fields: Record<string, unknown>): void;
}

/** One node incarnation's volumes, over its store. Dead with the incarnation. */
export class SimHost implements VolumeHost {
  private readonly volumes = new Map<string, SimVolume>();
  private readonly stateFss = new Map<string, LatentFs>();
  private dead = false;

  constructor(
    private readonly store: NodeStore,
    private readonly time: SimTime,
    private readonly rng: () => number,
    private readonly disk: DiskOptions,
    private readonly tuning: EngineTuning,
    private readonly clock: Clock,
    private readonly alive: () => boolean,
    private readonly hooks: HostHooks,
  ) {}

  private engineOptions(blockBytes: number, sizeBytes: number) {
    return {
      blockBytes,
      saveAreaBytesMax: sizeBytes + Math.ceil(sizeBytes / 8),
      activityExtentBytes: this.tuning.activityExtentBlocks * blockBytes,
      activityHotMax: this.tuning.activityHotMax,
      copyBlocksPerTurn: this.tuning.copyBlocksPerTurn,
      journalRegionBytes: this.tuning.journalRegionBytes,
      journalRecentExtents: this.tuning.journalRecentExtents,
      checkpointPagesPerTurn: this.tuning.checkpointPagesPerTurn,
      warn: (m: string, f: Record<string, unknown>) => this.hooks.warn(m, f),
    };
  }

  private wrap(d: VolumeDisks): { engineFs: LatentFs; stateFs: LatentFs; data: LatentData } {
    return {
      engineFs: new LatentFs(d.engineFs, this.time, this.rng, this.disk, this.alive),
      stateFs: new LatentFs(d.stateFs, this.time, this.rng, this.disk, this.alive, (name) => {
        if (name === 'role.json') this.hooks.onRoleWrite(d.name);
      }),
      data: new LatentData(d.data, this.time, this.rng, this.disk, this.alive),
    };
  }

  /** Opens every volume of the store (engine recovery after a crash). */
  async open(): Promise<void> {
    for (const d of [...this.store.volumes.values()].sort((a, b) => a.name.localeCompare(b.name))) {
      const w = this.wrap(d);
      const engine = await VolumeEngine.open(w.engineFs, w.data, this.engineOptions(d.blockBytes, d.sizeBytes));
      if (this.dead) return;
      this.volumes.set(d.name, new SimVolume(d.name, d.sizeBytes, d.description, engine, w.data, this.clock));
      this.stateFss.set(d.name, w.stateFs);
    }
  }

  kill(): void {
    this.dead = true;
  }

  list(): SimVolume[] {
    return [...this.volumes.values()].sort((a, b) => a.name.localeCompare(b.name));
  }
  get(name: string): SimVolume | undefined {
    return this.volumes.get(name);
  }
  require(name: string): SimVolume {
    const v = this.volumes.get(name);
    if (!v) throw new DeltavolError('VOLUME_NOT_FOUND', `no volume named "${name}"`);
    return v;
  }

  async create(o: CreateReplicaVolume): Promise<SimVolume> {
    if (this.dead) return new Promise<SimVolume>(() => undefined);
    validateVolumeName(o.name);
    if (this.volumes.has(o.name) || this.store.volumes.has(o.name)) throw new DeltavolError('VOLUME_EXISTS', `volume "${o.name}" already exists`);
    const d: VolumeDisks = { name: o.name, sizeBytes: o.sizeBytes, blockBytes: o.blockBytes, description: o.description, engineFs: new PagedFs(), stateFs: new PagedFs(), data: new SimVolumeData(o.sizeBytes) };
    const w = this.wrap(d);
    const engine = await VolumeEngine.create(w.engineFs, w.data, this.engineOptions(o.blockBytes, o.sizeBytes));
    if (this.dead) return new Promise<SimVolume>(() => undefined);
    // Durable from here (the registry writes its metadata last).
    this.store.volumes.set(o.name, d);
    const v = new SimVolume(o.name, o.sizeBytes, o.description, engine, w.data, this.clock);
    this.volumes.set(o.name, v);
    this.stateFss.set(o.name, w.stateFs);
    return v;
  }

  /** The operator deletes a volume (after the service forgot it): gone from memory and disk. */
  deleteVolume(name: string): void {
    this.volumes.delete(name);
    this.stateFss.delete(name);
    if (!this.dead) this.store.volumes.delete(name);
  }

  stateFs(volume: string): DurableFs {
    const f = this.stateFss.get(volume);
    if (!f) throw new DeltavolError('VOLUME_NOT_FOUND', `no volume named "${volume}"`);
    return f;
  }
}
