// Why: the volume engine's limits and on-disk constants in one place, named with their
// unit last, with the relations between them asserted when the module loads (as
// src/util/limits.ts does for the server; kept apart so the two can change independently).

import { assert } from '../util/assert.js';
import { BITMAP_PAGE_BYTES } from '../bitmap/paged-bitmap.js';

/** Activity log: the volume is divided into extents of this many bytes (DRBD uses 4 MiB). */
export const activityExtentBytes = 4 * 1024 * 1024;
/**
 * Activity log: extents that may be "hot" (written since their bitmap pages were last made
 * durable) at once. After a crash every block of every hot extent is marked changed and
 * valid, so this times activityExtentBytes (≈ 3.9 GiB) bounds the extra work recovery causes.
 */
export const activityExtentsMax = 1000;
/** Activity log record: one sector-aligned 4 KiB record holds the whole hot set. */
export const activityRecordBytes = 4096;
/** Bytes of a bitmap page record's trailer (magic, page, generation, checksum). */
export const bitmapRecordTrailerBytes = 32;
/** Bytes of a save-area record header (magic, snapshot id, block, slot, checksum). */
export const saveRecordHeaderBytes = 32;
/** Tracking block sizes (bytes) the engine accepts. */
export const trackingBlockBytesMin = 4096;
export const trackingBlockBytesMax = 1024 * 1024;
/** Snapshots per volume. */
export const snapshotsMax = 256;

assert(activityRecordBytes >= 32 + activityExtentsMax * 4, 'the whole hot set fits one activity record');
assert(BITMAP_PAGE_BYTES % 512 === 0, 'bitmap pages are whole sectors');
assert(activityExtentBytes >= trackingBlockBytesMax, 'an activity extent holds at least one tracking block');
