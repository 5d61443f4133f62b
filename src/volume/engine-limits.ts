// Why: the volume engine's own limits in one place, named with their unit last, with the
// relations between them asserted when the module loads (as src/util/limits.ts does for the
// server). Limits of an on-disk format live beside the module that owns the format
// (activity-log.ts, bitmap-file.ts, save-area.ts, snapshot-queue.ts), so the lower layers
// import nothing from volume/.

import { assert } from '../util/assert.js';

/** Activity log: the volume is divided into extents of this many bytes (DRBD uses 4 MiB). */
export const activityExtentBytes = 4 * 1024 * 1024;
/** Tracking block sizes (bytes) the engine accepts. */
export const trackingBlockBytesMin = 4096;
export const trackingBlockBytesMax = 1024 * 1024;

assert(activityExtentBytes >= trackingBlockBytesMax, 'an activity extent holds at least one tracking block');
