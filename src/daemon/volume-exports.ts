// Why: the seam between the two worlds that must not know each other: it presents
// volumes and their snapshots to the NBD layer as exports (NbdExport / ExportCatalog).
// A volume is exported as NAME (read-write unless set read-only) with the contexts
// base:allocation and qemu:dirty-bitmap:SNAP (blocks changed since snapshot SNAP); each
// snapshot as NAME@SNAP, read-only, with base:allocation reporting its holes.

import type { WritePayload } from '../util/piped-bytes.js';
import * as C from '../nbd/constants.js';
import type { ExportCatalog, ExportFeatures, ExportListing, Extent, NbdExport, WriteZeroesOptions } from '../nbd/export.js';
import { systemError } from '../util/errors.js';
import type { ZeroBlockScan } from '../util/zero-block-scan.js';
import type { FileRange } from '../util/file-range.js';
import type { Volume } from '../volume/volume.js';
import type { VolumeRegistry } from '../volume/registry.js';

export const DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';
/** qemu:dirty-bitmap flag: the extent changed since the snapshot. */
const STATE_DIRTY = 1;
const SNAPSHOT_SEPARATOR = '@';

function volumeContexts(v: Volume): string[] {
  return [C.CONTEXT_BASE_ALLOCATION, ...v.snapshots().filter((s) => s.valid).map((s) => DIRTY_BITMAP_PREFIX + s.name)];
}

const SNAPSHOT_CONTEXTS = [C.CONTEXT_BASE_ALLOCATION] as const;

export class VolumeExport implements NbdExport {
  readonly sizeBytes: number;
  readonly features: ExportFeatures;
  readonly metaContexts: readonly string[];
  private released = false;

  constructor(private readonly volume: Volume) {
    volume.acquire();
    this.sizeBytes = volume.sizeBytes;
    this.metaContexts = volumeContexts(volume);
    this.features = {
      readOnly: volume.readOnly,
      flush: true,
      fua: true,
      trim: true,
      writeZeroes: true,
      fastZero: volume.canZeroFast,
      cache: true,
      // One process, one file descriptor per volume shared by every connection: an
      // fdatasync from any connection covers the writes of all of them.
      multiConn: true,
    };
  }

  get name(): string {
    return this.volume.name;
  }
  get description(): string {
    return this.volume.description;
  }

  read(offset: number, length: number, target: Buffer, scan?: ZeroBlockScan): void | Promise<void> {
    return this.volume.read(offset, length, target, scan);
  }
  fileRange(offset: number, length: number): FileRange | null {
    return this.volume.fileRange(offset, length);
  }
  write(offset: number, payload: WritePayload, fua: boolean): void | Promise<void> {
    return this.volume.write(offset, payload, fua);
  }
  flush(): Promise<void> {
    return this.volume.flush();
  }
  trim(offset: number, length: number, fua: boolean): void | Promise<void> {
    return this.volume.trim(offset, length, fua);
  }
  writeZeroes(offset: number, length: number, options: WriteZeroesOptions, fua: boolean): void | Promise<void> {
    return this.volume.zero(offset, length, options.noHole, options.fastZero, fua);
  }
  cache(offset: number, length: number): void {
    this.volume.prefetch(offset, length);
  }
  blockStatus(context: string, offset: number, length: number, extentsMax: number): Extent[] {
    if (context === C.CONTEXT_BASE_ALLOCATION) {
      return this.volume.extents(offset, length, extentsMax).map((e) => ({
        lengthBytes: e.lengthBytes,
        flags: e.hole ? C.STATE_HOLE | C.STATE_ZERO : 0,
      }));
    }
    if (context.startsWith(DIRTY_BITMAP_PREFIX)) {
      return this.volume.changedSince(context.slice(DIRTY_BITMAP_PREFIX.length), offset, length, extentsMax).map((e) => ({
        lengthBytes: e.lengthBytes,
        flags: e.dirty ? STATE_DIRTY : 0,
      }));
    }
    throw systemError('EINVAL', `unknown metadata context ${context}`);
  }
  close(): void {
    if (this.released) return;
    this.released = true;
    this.volume.release();
  }
}

/** A snapshot, read-only, as it was when taken (seed 001 FIG. 27 reads through the engine). */
export class SnapshotExport implements NbdExport {
  readonly sizeBytes: number;
  readonly description: string;
  readonly metaContexts = SNAPSHOT_CONTEXTS;
  readonly features: ExportFeatures = {
    readOnly: true,
    flush: true,
    fua: true,
    trim: false,
    writeZeroes: false,
    fastZero: false,
    cache: false,
    multiConn: true, // nothing to make durable: every connection sees the same bytes
  };
  private released = false;

  constructor(
    private readonly volume: Volume,
    private readonly snapshotName: string,
  ) {
    const s = volume.acquireSnapshot(snapshotName);
    this.sizeBytes = s.sizeBytes;
    this.description = `snapshot ${snapshotName} of ${volume.name}, taken ${s.createdAt}`;
  }

  get name(): string {
    return this.volume.name + SNAPSHOT_SEPARATOR + this.snapshotName;
  }

  read(offset: number, length: number, target: Buffer): void {
    this.volume.readSnapshot(this.snapshotName, offset, length, target);
  }
  write(): void {
    throw systemError('EPERM', 'snapshots are read-only');
  }
  flush(): void {
    // nothing is ever written to a snapshot export
  }
  trim(): void {
    throw systemError('EPERM', 'snapshots are read-only');
  }
  writeZeroes(): void {
    throw systemError('EPERM', 'snapshots are read-only');
  }
  cache(): void {
    // reads come from the volume and save area files; nothing to warm specially
  }
  blockStatus(context: string, offset: number, length: number, extentsMax: number): Extent[] {
    if (context !== C.CONTEXT_BASE_ALLOCATION) throw systemError('EINVAL', `unknown metadata context ${context}`);
    return this.volume.snapshotExtents(this.snapshotName, offset, length, extentsMax).map((e) => ({
      lengthBytes: e.lengthBytes,
      flags: e.hole ? C.STATE_HOLE | C.STATE_ZERO : 0,
    }));
  }
  close(): void {
    if (this.released) return;
    this.released = true;
    this.volume.releaseSnapshot(this.snapshotName);
  }
}

export class VolumeCatalog implements ExportCatalog {
  constructor(
    private readonly registry: VolumeRegistry,
    private readonly defaultExport: () => string | undefined,
  ) {}

  list(): ExportListing[] {
    const out: ExportListing[] = [];
    for (const v of this.registry.list()) {
      out.push({ name: v.name, description: v.description });
      for (const s of v.snapshots()) {
        if (s.valid) out.push({ name: v.name + SNAPSHOT_SEPARATOR + s.name, description: `snapshot ${s.name} of ${v.name}, taken ${s.createdAt}` });
      }
    }
    return out;
  }

  defaultName(): string | undefined {
    return this.defaultExport();
  }

  /** Splits an export name into a volume and, for VOLUME@SNAPSHOT, a valid snapshot. */
  private resolve(name: string): { volume: Volume; snapshot?: string } | undefined {
    const n = name === '' ? this.defaultExport() : name;
    if (n === undefined) return undefined;
    const at = n.indexOf(SNAPSHOT_SEPARATOR);
    const volume = this.registry.get(at < 0 ? n : n.slice(0, at));
    if (!volume) return undefined;
    if (at < 0) return { volume };
    const snapshot = n.slice(at + 1);
    return volume.snapshots().some((s) => s.name === snapshot && s.valid) ? { volume, snapshot } : undefined;
  }

  open(name: string): NbdExport | undefined {
    const r = this.resolve(name);
    if (!r) return undefined;
    try {
      return r.snapshot === undefined ? new VolumeExport(r.volume) : new SnapshotExport(r.volume, r.snapshot);
    } catch {
      return undefined; // closing, or the snapshot went away meanwhile
    }
  }

  metaContexts(name: string): readonly string[] | undefined {
    const r = this.resolve(name);
    if (!r) return undefined;
    return r.snapshot === undefined ? volumeContexts(r.volume) : SNAPSHOT_CONTEXTS;
  }
}
