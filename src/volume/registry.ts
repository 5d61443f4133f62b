// Why: the daemon hosts many volumes under one data directory. The registry owns that
// directory: it finds the volumes at start, creates, resizes and deletes them, and keeps
// each on-disk change crash-safe (metadata written atomically, data file created first).
//
// Layout: DATA_DIR/volumes/NAME/volume.json and DATA_DIR/volumes/NAME/data.img

import fs from 'node:fs';
import path from 'node:path';
import { DeltavolError } from '../util/errors.js';
import { fsyncDirSync, writeFileAtomicSync } from '../util/atomic-file.js';
import type { Logger } from '../util/log.js';
import { FileStore } from '../storage/file-store.js';
import { DATA_FILE, META_FILE, Volume, type VolumeIoOptions } from './volume.js';
import {
  parseVolumeMeta,
  trackingBlockBytesFor,
  validateBlockCount,
  validateTrackingBlock,
  validateVolumeName,
  validateVolumeSize,
  validateDescription,
  VOLUME_FORMAT_VERSION,
  type VolumeMeta,
} from './volume-meta.js';

export interface CreateVolumeOptions {
  name: string;
  sizeBytes: number;
  readOnly?: boolean;
  description?: string;
  trackingBlockBytes?: number;
  snapshotSpaceBytes?: number;
}

export class VolumeRegistry {
  private readonly volumes = new Map<string, Volume>();
  readonly volumesDir: string;

  constructor(
    readonly dataDir: string,
    private readonly io: VolumeIoOptions,
    private readonly log: Logger,
  ) {
    this.volumesDir = path.join(dataDir, 'volumes');
  }

  /** Opens every volume found under the data directory. A damaged one is logged and skipped. */
  async load(): Promise<void> {
    fs.mkdirSync(this.volumesDir, { recursive: true, mode: 0o700 });
    for (const entry of fs.readdirSync(this.volumesDir, { withFileTypes: true })) {
      const dir = path.join(this.volumesDir, entry.name);
      if (entry.isDirectory() && entry.name.startsWith('.deleting-')) {
        fs.rmSync(dir, { recursive: true, force: true }); // a delete that crashed half-way
        continue;
      }
      if (!entry.isDirectory() || entry.name.startsWith('.')) continue;
      const metaPath = path.join(dir, META_FILE);
      try {
        if (!fs.existsSync(metaPath)) {
          // A create that crashed before writing metadata: nothing was ever exported.
          this.log.warn({ dir }, 'removing incomplete volume directory (no metadata)');
          fs.rmSync(dir, { recursive: true, force: true });
          continue;
        }
        const meta = parseVolumeMeta(fs.readFileSync(metaPath, 'utf8'), metaPath);
        if (meta.name !== entry.name) throw new DeltavolError('METADATA_CORRUPT', `${metaPath}: name "${meta.name}" ≠ directory`);
        this.volumes.set(meta.name, await Volume.open(dir, meta, this.io, false));
      } catch (e) {
        this.log.error({ dir, err: (e as Error).message }, 'volume not loaded');
      }
    }
    this.log.info({ volumes: [...this.volumes.keys()] }, 'volumes loaded');
  }

  list(): Volume[] {
    return [...this.volumes.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  get(name: string): Volume | undefined {
    return this.volumes.get(name);
  }

  require(name: string): Volume {
    const v = this.volumes.get(name);
    if (!v) throw new DeltavolError('VOLUME_NOT_FOUND', `no volume named "${name}"`);
    return v;
  }

  async create(options: CreateVolumeOptions): Promise<Volume> {
    validateVolumeName(options.name);
    validateVolumeSize(options.sizeBytes);
    if (options.description !== undefined) validateDescription(options.description);
    const trackingBlockBytes = options.trackingBlockBytes ?? trackingBlockBytesFor(options.sizeBytes);
    validateTrackingBlock(trackingBlockBytes);
    validateBlockCount(options.sizeBytes, trackingBlockBytes);
    if (options.snapshotSpaceBytes !== undefined && !(Number.isSafeInteger(options.snapshotSpaceBytes) && options.snapshotSpaceBytes >= trackingBlockBytes)) {
      throw new DeltavolError('BAD_SIZE', `snapshot space must be at least one tracking block (${trackingBlockBytes} bytes)`);
    }
    if (this.volumes.has(options.name)) throw new DeltavolError('VOLUME_EXISTS', `volume "${options.name}" already exists`);
    const dir = path.join(this.volumesDir, options.name);
    if (fs.existsSync(dir)) throw new DeltavolError('VOLUME_EXISTS', `directory ${dir} already exists`);
    const meta: VolumeMeta = {
      formatVersion: VOLUME_FORMAT_VERSION,
      name: options.name,
      sizeBytes: options.sizeBytes,
      readOnly: options.readOnly ?? false,
      description: options.description ?? '',
      createdAt: new Date().toISOString(),
      trackingBlockBytes,
      ...(options.snapshotSpaceBytes !== undefined ? { snapshotSpaceBytes: options.snapshotSpaceBytes } : {}),
    };
    fs.mkdirSync(dir, { mode: 0o700 });
    let v: Volume;
    try {
      // Data and engine first, metadata last: a crash in between leaves a directory
      // without metadata, which load() removes.
      FileStore.create(path.join(dir, DATA_FILE), meta.sizeBytes);
      v = await Volume.open(dir, meta, this.io, true);
      writeFileAtomicSync(path.join(dir, META_FILE), JSON.stringify(meta, null, 2) + '\n');
      fsyncDirSync(this.volumesDir);
    } catch (e) {
      fs.rmSync(dir, { recursive: true, force: true });
      throw e;
    }
    this.volumes.set(meta.name, v);
    this.log.info({ volume: meta.name, sizeBytes: meta.sizeBytes, readOnly: meta.readOnly }, 'volume created');
    return v;
  }

  async resize(name: string, sizeBytes: number): Promise<Volume> {
    const v = this.require(name);
    validateVolumeSize(sizeBytes);
    validateBlockCount(sizeBytes, v.blockBytes);
    await v.updateMeta({ sizeBytes });
    this.log.info({ volume: name, sizeBytes }, 'volume resized');
    return v;
  }

  async update(name: string, patch: { readOnly?: boolean; description?: string }): Promise<Volume> {
    const v = this.require(name);
    if (patch.description !== undefined) validateDescription(patch.description);
    await v.updateMeta(patch);
    this.log.info({ volume: name, ...patch }, 'volume updated');
    return v;
  }

  /** Deletes a volume; refused while clients use it unless force (their requests then fail). */
  async delete(name: string, force: boolean): Promise<void> {
    const v = this.require(name);
    if (v.users > 0 && !force) {
      throw new DeltavolError('VOLUME_BUSY', `volume "${name}" has ${v.users} connected client(s); disconnect them or use --force`);
    }
    this.volumes.delete(name);
    await v.close();
    // Rename first so a crash mid-delete never leaves a half-deleted volume that loads.
    const trash = path.join(this.volumesDir, `.deleting-${name}-${Date.now()}`);
    fs.renameSync(v.dir, trash);
    fsyncDirSync(this.volumesDir);
    fs.rmSync(trash, { recursive: true, force: true });
    this.log.info({ volume: name }, 'volume deleted');
  }

  async closeAll(): Promise<void> {
    for (const v of this.volumes.values()) await v.close();
  }
}
