// Why: the daemon sets glibc's trim and mmap thresholds at start (fsx.mallocTune) so that
// 1 MiB buffers freed by the collector are reused instead of coming back as fresh zeroed
// pages; the call must take sane byte counts, refuse the rest with a code, and
// tuneMallocHeap must say whether it applied.
import { describe, expect, it } from 'vitest';
import { loadFsx, trimMallocHeap, tuneMallocHeap } from '../../src/storage/native.js';

describe('fsx.mallocTune', () => {
  it('applies byte thresholds, refuses bad ones, and trimming still works after', () => {
    const fsx = loadFsx();
    expect(fsx?.mallocTune, 'the addon (npm run build) has mallocTune').toBeTypeOf('function');
    expect(tuneMallocHeap(128 * 1024 * 1024, 32 * 1024 * 1024)).toBe(true);
    for (const bad of [[-1, 0], [0, Number.NaN], [2 ** 31, 0]] as const) {
      let err: (Error & { code?: string }) | null = null;
      try {
        fsx!.mallocTune!(bad[0], bad[1]);
      } catch (e) {
        err = e as Error & { code?: string };
      }
      expect(err?.code, `mallocTune(${bad.join(', ')})`).toBe('EINVAL_ARGUMENT');
    }
    expect(trimMallocHeap()).toBe(true);
  });
});
