// Why: the engine speaks VolumeData; a volume's bytes live in a FileStore. This adapter
// is the only place the two meet, so file-store.ts stays free of engine concerns. Zeroing
// must really read back as zeroes afterwards (the engine marks the blocks invalid), so
// TRIM goes through FileStore.zero (punch, else write zeroes), never a hint that may do nothing.

import fs from 'node:fs';
import type { FileStore } from '../storage/file-store.js';
import { loadFsx } from '../storage/native.js';
import type { VolumeData } from './volume-engine.js';

export function fileStoreData(store: FileStore): VolumeData {
  const fsx = loadFsx();
  return {
    get sizeBytes() {
      return store.sizeBytes;
    },
    readSync(offset, target, targetOffset, length) {
      let done = 0;
      while (done < length) {
        const n = fs.readSync(store.fd, target, targetOffset + done, length - done, offset + done);
        if (n === 0) {
          target.fill(0, targetOffset + done, targetOffset + length); // past EOF reads as zeroes
          return;
        }
        done += n;
      }
    },
    ...(fsx?.preadRanges
      ? {
          readRangesSync(ranges: Float64Array, count: number, target: Buffer, targetOffset: number) {
            fsx.preadRanges!(store.fd, target, targetOffset, ranges, count);
          },
        }
      : {}),
    ...(fsx?.pwriteRanges
      ? {
          writeRangesSync(ranges: Float64Array, count: number, source: Buffer, sourceOffset: number) {
            store.assertWritable();
            fsx.pwriteRanges!(store.fd, source, sourceOffset, ranges, count);
          },
        }
      : {}),
    write: (offset, chunks) => store.write(offset, chunks),
    writePiped: (offset, bytes) => store.writePiped(offset, bytes),
    zero(offset, length, keepAllocated) {
      const r = store.zero(offset, length, keepAllocated ?? false, false);
      if (typeof r !== 'boolean') return r.then(() => undefined);
    },
    flush: () => store.flush(),
  };
}
