// Why: a replica plays a chunk's runs from one buffer holding their blocks back to back.
// Writing each run alone cost its daemon more than the writes (4 KiB random writes: 256 runs
// a chunk), so small runs go to the volume several at once (one native call), and that call
// needs their bytes back to back in the buffer too. A run that holds the volume's short last
// block has fewer bytes than its blocks take in the buffer, and runs need not come in block
// order, so such a run may sit anywhere in a chunk: it must end a batch, or the bytes of the
// runs after it are taken from the wrong place (the simulator found this, seed 3740383:
// a cascade's replica held zeroes where its primary held data). Pure: no I/O, tested alone.

import { assert } from '../util/assert.js';
import type { Runs } from './wire.js';

/** What to write: `count` runs of `ranges` whose bytes start at sourceOffset, or one run alone. */
export type PlaybackStep =
  | { batch: true; count: number; sourceOffset: number }
  | { batch: false; offset: number; length: number; sourceOffset: number };

export interface PlaybackLimits {
  /** A run longer than this is written alone (the volume decides how: the threadpool). */
  runBytesMax: number;
  /** Runs in one batch at most; `ranges` holds 2 × this many numbers. */
  runsMax: number;
}

/**
 * Calls `step` for the writes that play `runs` (blocks of `blockBytes`; the volume holds
 * `sizeBytes`), in order. A batch's (offset, length) pairs are in `ranges`, which the next
 * step overwrites: use them before returning.
 */
export function planPlayback(runs: Runs, blockBytes: number, sizeBytes: number, ranges: Float64Array, limits: PlaybackLimits, step: (s: PlaybackStep) => void): void {
  assert(ranges.length >= 2 * limits.runsMax, 'playback ranges hold runsMax pairs');
  let batched = 0;
  let batchAt = 0;
  let at = 0;
  const endBatch = () => {
    if (batched > 0) step({ batch: true, count: batched, sourceOffset: batchAt });
    batched = 0;
  };
  for (const [b, n] of runs) {
    const offset = b * blockBytes;
    const inBuffer = n * blockBytes;
    const length = Math.min(inBuffer, sizeBytes - offset);
    assert(length > 0, 'a run lies in the volume');
    if (length > limits.runBytesMax || length < inBuffer) {
      // Alone: large, or short (the volume's last block), after which the bytes of the next
      // run do not follow its own.
      endBatch();
      step({ batch: false, offset, length, sourceOffset: at });
    } else {
      if (batched === 0) batchAt = at;
      ranges[2 * batched] = offset;
      ranges[2 * batched + 1] = length;
      if (++batched === limits.runsMax) endBatch();
    }
    at += inBuffer;
  }
  endBatch();
}
