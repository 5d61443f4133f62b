// Why: replication talks to volumes through this small interface and nothing else
// (STYLE.md layer boundaries): the primary cuts delta sets and reads snapshots, the
// replica writes, overlays reads and snapshots. The daemon passes Volume objects, which
// implement both; tests may pass fakes.

import type { DeltaSink, BuildOptions } from '../volume/volume-engine.js';
import type { ReadOverlay } from '../volume/volume.js';
import type { SnapshotInfo } from '../snapshot/snapshot-queue.js';
import type { PagedBitmap } from '../bitmap/paged-bitmap.js';

export interface PrimaryPort {
  readonly name: string;
  readonly sizeBytes: number;
  readonly blockBytes: number;
  readonly blocksTotal: number;
  readonly description: string;
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
}

export interface ReplicaPort {
  readonly name: string;
  readonly sizeBytes: number;
  readonly blockBytes: number;
  readonly readOnly: boolean;
  playbackWrite(offset: number, chunks: Buffer[]): void | Promise<void>;
  flush(): Promise<void>;
  setOverlay(o: ReadOverlay | null): void;
  readsDrained(): Promise<void>;
  createSnapshot(name: string, deltaSetNumber: number): Promise<SnapshotInfo>;
  /** Forgets the change log (a split starts: from now on it holds the replica's own writes). */
  discardChanges(): Promise<void>;
  /** Blocks written since discardChanges (the replica's side of a split). */
  changedBlocks(): PagedBitmap;
  setReadOnly(readOnly: boolean): Promise<void>;
}
