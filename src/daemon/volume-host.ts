// Why: replication and recovery see a node's volumes through VolumeHost (ports.ts); the
// daemon's volumes live in its registry, as directories. This adapter is the one place
// that knows where a volume's replication state sits on disk
// (DATA_DIR/volumes/NAME/replication/) and moves the layout of earlier versions there
// (a replica's state used to live in NAME/replica/ and its generation in two files).

import fs from 'node:fs';
import path from 'node:path';
import { DeltavolError } from '../util/errors.js';
import { fsyncDirSync } from '../util/atomic-file.js';
import { nodeDurableFs, type DurableFs } from '../util/durable-fs.js';
import type { Logger } from '../util/log.js';
import type { VolumeRegistry } from '../volume/registry.js';
import type { CreateReplicaVolume, HostedVolume, VolumeHost } from '../replication/ports.js';
import { emptyRoleState, ROLE_FILE, type RoleState, type PairRecord, type UpstreamRecord } from '../recovery/role-record.js';

export const REPLICATION_DIR = 'replication';

export class RegistryVolumeHost implements VolumeHost {
  constructor(
    private readonly registry: VolumeRegistry,
    private readonly log: Logger,
  ) {}

  list(): HostedVolume[] {
    return this.registry.list();
  }
  get(name: string): HostedVolume | undefined {
    return this.registry.get(name);
  }
  require(name: string): HostedVolume {
    return this.registry.require(name);
  }
  async create(o: CreateReplicaVolume): Promise<HostedVolume> {
    // Writable as far as the operator's flag goes: the role (replica) refuses client writes.
    return this.registry.create({ name: o.name, sizeBytes: o.sizeBytes, trackingBlockBytes: o.blockBytes, readOnly: false, description: o.description });
  }

  stateFs(volume: string): DurableFs {
    const v = this.registry.require(volume);
    const dir = path.join(v.dir, REPLICATION_DIR);
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    migrateLegacy(v.dir, dir, this.log.child({ volume }));
    return nodeDurableFs(dir);
  }
}

interface LegacyPrimary {
  version: 1;
  generation: number;
  pairs: (Omit<PairRecord, 'initialCopy'> & { initialCopy: { done: boolean; baseSet: number; baseSnapshot: string | null; validBytes: number } })[];
}
interface LegacyReplica {
  version: 1;
  pairId: string;
  primaryVolume: string;
  generation: number;
  playedSet: number;
  initialCopy: { done: boolean; offsetBytes: number; baseSet: number };
  consistent?: boolean;
  split: boolean;
  createdAt: string;
}

/**
 * Version 0.1 kept a primary's pairs and generation in replication/replication.json and a
 * replica's state in replica/state.json (with its inbound sets in replica/inbound/); the
 * replica's read-only mode was the volume's own flag. Moves all of it into one role record.
 */
function migrateLegacy(volumeDir: string, dir: string, log: Logger): void {
  const rolePath = path.join(dir, ROLE_FILE);
  if (fs.existsSync(rolePath)) return;
  const primaryPath = path.join(dir, 'replication.json');
  const replicaDir = path.join(volumeDir, 'replica');
  const replicaPath = path.join(replicaDir, 'state.json');
  if (!fs.existsSync(primaryPath) && !fs.existsSync(replicaPath)) return;
  const s: RoleState = emptyRoleState();
  try {
    if (fs.existsSync(replicaPath)) {
      const r = JSON.parse(fs.readFileSync(replicaPath, 'utf8')) as LegacyReplica;
      const upstream: UpstreamRecord = {
        pairId: r.pairId,
        primaryVolume: r.primaryVolume,
        playedSet: r.playedSet,
        initialCopy: r.initialCopy,
        consistent: r.consistent ?? r.initialCopy.done,
        split: r.split,
        createdAt: r.createdAt,
        resync: null,
        playedCutAtMs: null,
        lastReport: null,
      };
      Object.assign(s, { role: 'replica', generation: r.generation, upstream });
      for (const name of fs.existsSync(path.join(replicaDir, 'inbound')) ? fs.readdirSync(path.join(replicaDir, 'inbound')) : []) {
        if (/^set-\d+\.(part|json)$/.test(name)) fs.renameSync(path.join(replicaDir, 'inbound', name), path.join(dir, `inbound-${name}`));
      }
      const split = path.join(replicaDir, 'split-writes.json');
      if (fs.existsSync(split)) fs.renameSync(split, path.join(dir, 'replica-split-writes.json'));
      // The replica's read-only mode is the role's now, not the operator's flag.
      const metaPath = path.join(volumeDir, 'volume.json');
      const meta = JSON.parse(fs.readFileSync(metaPath, 'utf8')) as { readOnly: boolean };
      if (meta.readOnly) fs.writeFileSync(metaPath, JSON.stringify({ ...meta, readOnly: false }, null, 2) + '\n');
    } else {
      const p = JSON.parse(fs.readFileSync(primaryPath, 'utf8')) as LegacyPrimary;
      const pairs: PairRecord[] = p.pairs.map((x) => {
        const { validBytes, ...ic } = x.initialCopy;
        return { ...x, initialCopy: { ...ic, totalBytes: validBytes, kind: 'full' as const } };
      });
      Object.assign(s, { role: pairs.length > 0 ? 'primary' : 'simplex', generation: p.generation, pairs });
    }
  } catch (e) {
    throw new DeltavolError('METADATA_CORRUPT', `cannot migrate the replication state of ${volumeDir}: ${(e as Error).message}`);
  }
  fs.writeFileSync(rolePath + '.tmp', JSON.stringify(s, null, 1), { mode: 0o600 });
  fs.renameSync(rolePath + '.tmp', rolePath);
  fsyncDirSync(dir);
  fs.rmSync(primaryPath, { force: true });
  fs.rmSync(replicaDir, { recursive: true, force: true });
  log.info({ role: s.role, generation: s.generation }, 'replication state moved to the role record (from version 0.1)');
}
