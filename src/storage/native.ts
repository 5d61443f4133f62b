// Why: loads the small C addon (src/native/fsx.c, built by `npm run build`) that gives
// us fallocate(2) and lseek(SEEK_DATA/SEEK_HOLE), which Node.js does not expose.
// Without it the server still works: holes are not punched and every range reads as data.

import { loadAddon } from '../util/native-addon.js';

export interface Fsx {
  punchHole(fd: number, offset: number, length: number): void;
  zeroRange(fd: number, offset: number, length: number): void;
  allocate(fd: number, offset: number, length: number): void;
  /** Next data offset ≥ offset, or -1 when only a hole follows. */
  seekData(fd: number, offset: number): number;
  /** Next hole offset ≥ offset (the file end counts as a hole). */
  seekHole(fd: number, offset: number): number;
  /** posix_fadvise(WILLNEED): asks the kernel to read the range ahead. */
  willNeed(fd: number, offset: number, length: number): void;
  /** flock(LOCK_EX | LOCK_NB): true if acquired, false if another process holds it. */
  lockExclusive(fd: number): boolean;
  /**
   * Reads `count` ranges (ranges[2i] = file offset, ranges[2i+1] = length) one after the
   * other into target from targetOffset; past the end of the file reads as zeroes.
   * Returns the bytes placed. (Absent from an addon built before it: callers check.)
   */
  preadRanges?(fd: number, target: Buffer, targetOffset: number, ranges: Float64Array, count: number): number;
  /**
   * Writes `count` ranges (ranges[2i] = file offset, ranges[2i+1] = length), their bytes
   * taken one after the other from source at sourceOffset. Returns the bytes written.
   * (Absent from an addon built before it: callers check.)
   */
  pwriteRanges?(fd: number, source: Buffer, sourceOffset: number, ranges: Float64Array, count: number): number;
  /**
   * pread of `length` bytes into target at targetOffset, in the threadpool (past the end of
   * the file reads as zeroes); resolves to the number of all-zero blocks of blockBytes in
   * them (-1 with blockBytes 0). Rejects with the errno name as `code`. (Absent from older addons.)
   */
  preadScan?(fd: number, target: Buffer, targetOffset: number, length: number, position: number, blockBytes: number): Promise<number>;
  /** malloc_trim(0): gives freed heap memory back to the kernel; 1 if some was. (Absent from older addons.) */
  mallocTrim?(): number;
  /** mallopt(M_TRIM_THRESHOLD, trim) and mallopt(M_MMAP_THRESHOLD, mmapAt); 1 if both took. (Absent from older addons.) */
  mallocTune?(trimThresholdBytes: number, mmapThresholdBytes: number): number;
}

export function loadFsx(): Fsx | null {
  return loadAddon<Fsx>('fsx');
}

/**
 * Gives memory that was freed back to the kernel (glibc keeps freed heap memory, so a
 * daemon's RSS stayed at its peak after a burst of large buffers). False without the addon.
 */
export function trimMallocHeap(): boolean {
  const fsx = loadFsx();
  if (!fsx?.mallocTrim) return false;
  fsx.mallocTrim();
  return true;
}

/**
 * Lets glibc keep freed heap memory up to `trimThresholdBytes` and serve buffers below
 * `mmapThresholdBytes` from the heap (see malloc_tune_fn in src/native/fsx.c for the
 * measurement); trimMallocHeap() still gives it back. False without the addon or when
 * glibc refused.
 */
export function tuneMallocHeap(trimThresholdBytes: number, mmapThresholdBytes: number): boolean {
  const fsx = loadFsx();
  if (!fsx?.mallocTune) return false;
  return fsx.mallocTune(trimThresholdBytes, mmapThresholdBytes) === 1;
}
