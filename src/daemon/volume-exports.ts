// Why: the seam between the two worlds that must not know each other: it presents
// volumes to the NBD layer as exports (NbdExport / ExportCatalog), translating
// allocation into base:allocation flags. Adding snapshot exports or dirty-bitmap
// contexts later happens here, not in the protocol code.

import * as C from '../nbd/constants.js';
import type { ExportCatalog, ExportFeatures, ExportListing, Extent, NbdExport, WriteZeroesOptions } from '../nbd/export.js';
import { systemError } from '../util/errors.js';
import type { Volume } from '../volume/volume.js';
import type { VolumeRegistry } from '../volume/registry.js';

const BASE_CONTEXTS = [C.CONTEXT_BASE_ALLOCATION] as const;

export class VolumeExport implements NbdExport {
  readonly sizeBytes: number;
  readonly features: ExportFeatures;
  readonly metaContexts = BASE_CONTEXTS;
  private released = false;

  constructor(private readonly volume: Volume) {
    volume.acquire();
    this.sizeBytes = volume.sizeBytes;
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

  read(offset: number, length: number, target: Buffer): void | Promise<void> {
    return this.volume.read(offset, length, target);
  }
  write(offset: number, chunks: Buffer[], fua: boolean): void | Promise<void> {
    return this.volume.write(offset, chunks, fua);
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
    if (context !== C.CONTEXT_BASE_ALLOCATION) throw systemError('EINVAL', `unknown metadata context ${context}`);
    return this.volume.extents(offset, length, extentsMax).map((e) => ({
      lengthBytes: e.lengthBytes,
      flags: e.hole ? C.STATE_HOLE | C.STATE_ZERO : 0,
    }));
  }
  close(): void {
    if (this.released) return;
    this.released = true;
    this.volume.release();
  }
}

export class VolumeCatalog implements ExportCatalog {
  constructor(
    private readonly registry: VolumeRegistry,
    private readonly defaultExport: () => string | undefined,
  ) {}

  list(): ExportListing[] {
    return this.registry.list().map((v) => ({ name: v.name, description: v.description }));
  }

  defaultName(): string | undefined {
    return this.defaultExport();
  }

  private resolve(name: string): Volume | undefined {
    const n = name === '' ? this.defaultExport() : name;
    return n === undefined ? undefined : this.registry.get(n);
  }

  open(name: string): NbdExport | undefined {
    const v = this.resolve(name);
    if (!v) return undefined;
    try {
      return new VolumeExport(v);
    } catch {
      return undefined; // closing
    }
  }

  metaContexts(name: string): readonly string[] | undefined {
    return this.resolve(name) ? BASE_CONTEXTS : undefined;
  }
}
