// Why: replication and recovery talk to volumes through these small interfaces and
// nothing else (STYLE.md layer boundaries): the primary cuts delta sets and reads
// snapshots, the replica writes, overlays reads and snapshots, and recovery compares
// snapshots and sets who may write. The daemon passes Volume objects (through a
// VolumeHost over its registry); the seeded simulator passes volumes over simulated
// disks. Paths never cross this line: a volume's replication state lives in the
// DurableFs its host gives.

import type { DeltaSink, BuildOptions } from '../volume/volume-engine.js';
import type { WriteMirror } from '../volume/write-mirror.js';
import type { ReadOverlay } from '../volume/volume.js';
import type { SnapshotInfo } from '../snapshot/snapshot-queue.js';
import type { PagedBitmap } from '../bitmap/paged-bitmap.js';
import type { DurableFs } from '../util/durable-fs.js';
import type { WriteAccess } from '../recovery/role-record.js';

export interface VolumeGeometry {
  readonly name: string;
  readonly sizeBytes: number;
  readonly blockBytes: number;
  readonly blocksTotal: number;
  readonly description: string;
}

export interface PrimaryPort extends VolumeGeometry {
  /** Cuts set `n` and copies its blocks, as of the cut, into sink. */
  buildDeltaSet(n: number, sink: DeltaSink, options: BuildOptions): Promise<{ blocks: number }>;
  /** A snapshot stamped n holding every change so far; the change log is emptied. */
  snapshotAndForget(name: string, n: number): Promise<void>;
  /** Blocks changed since the last cut. */
  changedBlockCount(): number;
  /** Blocks not yet in a committed set (changed since the cut, or in the set being built). */
  unshippedBlockCount(): number;
  snapshots(): SnapshotInfo[];
  deleteSnapshot(name: string, force: boolean): Promise<void>;
  /** Blocks that held data when the snapshot was taken. */
  snapshotValidBlocks(name: string): PagedBitmap;
  readSnapshot(name: string, offset: number, length: number, target: Buffer): void;
  /** Blocks to copy (data) and to zero that turn a copy of snapshot `from` into `to` (null: the volume now). */
  differenceBlocks(from: string, to: string | null): { data: PagedBitmap; zero: PagedBitmap };
  /** Something holds new writes for a consistent point now (a cut, a snapshot): a cut started now would wait for it. */
  readonly quiescing: boolean;
  /** Every write issued from now on also goes to m, in issue order (a sync pair's stream); null: none. */
  setMirror(m: WriteMirror | null): void;
}

export interface ReplicaPort extends VolumeGeometry {
  playbackWrite(offset: number, chunks: Buffer[]): void | Promise<void>;
  /**
   * `count` runs (ranges[2i] = offset, ranges[2i+1] = length) whose bytes lie one after the
   * other in source from sourceOffset: playbackWrite for each, in fewer calls.
   */
  playbackWriteRuns(ranges: Float64Array, count: number, source: Buffer, sourceOffset: number): void | Promise<void>;
  /** The range reads as zeroes afterwards (a resync zeroing blocks the primary has not got). */
  playbackZero(offset: number, length: number): void | Promise<void>;
  flush(): Promise<void>;
  setOverlay(o: ReadOverlay | null): void;
  readsDrained(): Promise<void>;
  createSnapshot(name: string, deltaSetNumber: number): Promise<SnapshotInfo>;
  /** Forgets the change log (from now on it holds only later writes). */
  discardChanges(): Promise<void>;
  /** Blocks written since the last cut or discardChanges (a split's writes, a fenced primary's backlog). */
  changedBlocks(): PagedBitmap;
  /** Whether any block may hold data (false for a volume never written). */
  hasData(): boolean;
}

/** A volume as replication and recovery see it. */
export interface HostedVolume extends PrimaryPort, ReplicaPort {
  /** Reads the volume as clients see it (a resync hashes the blocks it may have changed). */
  read(offset: number, length: number, target: Buffer): void | Promise<void>;
  /** What clients may do (the role record decides; the volume enforces). */
  setWriteAccess(a: WriteAccess): void;
  /** Resolves when no client write is running (the ones held or refused do not count). */
  writesIdle(): Promise<void>;
  /** Clients connected to the volume itself (readers of its snapshot exports do not count). */
  clientCount(): number;
}

export interface CreateReplicaVolume {
  name: string;
  sizeBytes: number;
  blockBytes: number;
  description: string;
}

/** The volumes of one node, as replication needs them. */
export interface VolumeHost {
  list(): HostedVolume[];
  get(name: string): HostedVolume | undefined;
  /** Throws VOLUME_NOT_FOUND. */
  require(name: string): HostedVolume;
  create(options: CreateReplicaVolume): Promise<HostedVolume>;
  /** Where the volume's replication state lives (role record, save areas, pending bitmaps). */
  stateFs(volume: string): DurableFs;
}
