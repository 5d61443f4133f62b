// Why: what a volume is, on disk, apart from its data: a small JSON document next to the
// data file. Parsing validates every field so a damaged file is reported, not trusted.

import { DeltavolError } from '../util/errors.js';
import { volumeDescriptionBytesMax, volumeNameBytesMax } from '../util/limits.js';

export const VOLUME_FORMAT_VERSION = 1;
/** Volume sizes are multiples of this (the minimum NBD block size we advertise). */
export const VOLUME_SIZE_ALIGN_BYTES = 512;
export const TRACKING_BLOCK_BYTES_DEFAULT = 4096;
/**
 * Most tracking blocks a volume may have: block indexes are unsigned 32-bit in the
 * engine's bitmaps, block maps (0xffffffff marks an empty cell) and records.
 */
export const TRACKING_BLOCKS_MAX = 2 ** 32 - 1;

/** Largest tracking block (the engine copies whole tracking blocks on copy-on-write). */
export const TRACKING_BLOCK_BYTES_MAX = 1024 * 1024;

/**
 * Tracking block size for a new volume when none is asked for: the default (4 KiB), or
 * the smallest larger power of two that keeps the volume within TRACKING_BLOCKS_MAX
 * blocks (8 KiB from 16 TiB, 16 KiB from 32 TiB, 32 KiB from 64 TiB), at most
 * TRACKING_BLOCK_BYTES_MAX.
 */
export function trackingBlockBytesFor(sizeBytes: number): number {
  let bytes = TRACKING_BLOCK_BYTES_DEFAULT;
  while (Math.ceil(sizeBytes / bytes) > TRACKING_BLOCKS_MAX && bytes < TRACKING_BLOCK_BYTES_MAX) bytes *= 2;
  return bytes;
}

/** A volume of sizeBytes must fit in TRACKING_BLOCKS_MAX blocks of trackingBlockBytes. */
export function validateBlockCount(sizeBytes: number, trackingBlockBytes: number): void {
  if (Math.ceil(sizeBytes / trackingBlockBytes) <= TRACKING_BLOCKS_MAX) return;
  const sizeBytesMax = TRACKING_BLOCKS_MAX * trackingBlockBytes;
  const needed = trackingBlockBytesFor(sizeBytes);
  const hint =
    Math.ceil(sizeBytes / needed) <= TRACKING_BLOCKS_MAX
      ? `a volume of ${sizeBytes} bytes needs tracking blocks of at least ${needed} bytes`
      : `${sizeBytes} bytes is more than any tracking block size allows (at most ${TRACKING_BLOCKS_MAX * TRACKING_BLOCK_BYTES_MAX} bytes)`;
  throw new DeltavolError(
    'BAD_SIZE',
    `volume size ${sizeBytes} is over ${sizeBytesMax} bytes, the most ${TRACKING_BLOCKS_MAX} tracking blocks of ${trackingBlockBytes} bytes hold; ${hint}`,
    { sizeBytesMax, trackingBlockBytesMin: needed },
  );
}

export interface VolumeMeta {
  formatVersion: number;
  name: string;
  sizeBytes: number;
  readOnly: boolean;
  description: string;
  createdAt: string;
  /** Unit of change tracking and copy-on-write (power of two, 4 KiB–1 MiB). */
  trackingBlockBytes: number;
  /**
   * Most bytes one snapshot's save area may use; past it that snapshot becomes invalid
   * (and only it). Absent: the volume size plus record overhead (a snapshot never fills).
   */
  snapshotSpaceBytes?: number;
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;

export function validateVolumeName(name: string): void {
  if (typeof name !== 'string' || !NAME_RE.test(name) || Buffer.byteLength(name) > volumeNameBytesMax) {
    throw new DeltavolError(
      'BAD_NAME',
      `invalid volume name "${name}": use 1-${volumeNameBytesMax} letters, digits, '.', '_' or '-', starting with a letter or digit`,
    );
  }
}

// C0 controls, DEL and C1 controls: a description is shown on terminals (`volume list`) and
// to NBD clients, where an escape sequence could rewrite what the reader sees.
// eslint-disable-next-line no-control-regex
const CONTROL_CHAR_RE = /[\u0000-\u001f\u007f-\u009f]/;

/** New descriptions: printable text of at most volumeDescriptionBytesMax bytes (old ones load as they are; the CLI escapes them). */
export function validateDescription(description: string): void {
  if (typeof description !== 'string') throw new DeltavolError('EINVAL_ARGUMENT', 'a description must be a string');
  if (Buffer.byteLength(description) > volumeDescriptionBytesMax) {
    throw new DeltavolError('EINVAL_ARGUMENT', `a description may be at most ${volumeDescriptionBytesMax} bytes, got ${Buffer.byteLength(description)}`);
  }
  if (CONTROL_CHAR_RE.test(description)) {
    throw new DeltavolError('EINVAL_ARGUMENT', 'a description may not contain control characters (escape sequences, newlines, tabs)');
  }
}

export function validateVolumeSize(sizeBytes: number): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) {
    throw new DeltavolError('BAD_SIZE', `volume size must be a positive number of bytes, got ${sizeBytes}`);
  }
  if (sizeBytes % VOLUME_SIZE_ALIGN_BYTES !== 0) {
    throw new DeltavolError('BAD_SIZE', `volume size ${sizeBytes} is not a multiple of ${VOLUME_SIZE_ALIGN_BYTES} bytes`);
  }
}

export function validateTrackingBlock(bytes: number): void {
  if (!Number.isInteger(bytes) || bytes < TRACKING_BLOCK_BYTES_DEFAULT || bytes > TRACKING_BLOCK_BYTES_MAX || (bytes & (bytes - 1)) !== 0) {
    throw new DeltavolError('BAD_SIZE', `tracking block size must be a power of two from 4 KiB to 1 MiB, got ${bytes}`);
  }
}

export function parseVolumeMeta(text: string, where: string): VolumeMeta {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new DeltavolError('METADATA_CORRUPT', `${where}: not valid JSON (${(e as Error).message})`);
  }
  const m = raw as Partial<VolumeMeta>;
  const bad = (field: string) => new DeltavolError('METADATA_CORRUPT', `${where}: field "${field}" is missing or invalid`);
  if (m.formatVersion !== VOLUME_FORMAT_VERSION) throw bad('formatVersion');
  if (typeof m.name !== 'string') throw bad('name');
  if (typeof m.sizeBytes !== 'number' || !Number.isSafeInteger(m.sizeBytes) || m.sizeBytes <= 0) throw bad('sizeBytes');
  if (typeof m.readOnly !== 'boolean') throw bad('readOnly');
  if (typeof m.description !== 'string') throw bad('description');
  if (typeof m.createdAt !== 'string') throw bad('createdAt');
  if (typeof m.trackingBlockBytes !== 'number') throw bad('trackingBlockBytes');
  if (m.snapshotSpaceBytes !== undefined && (typeof m.snapshotSpaceBytes !== 'number' || m.snapshotSpaceBytes <= 0)) throw bad('snapshotSpaceBytes');
  return m as VolumeMeta;
}
