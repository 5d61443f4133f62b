// Why: copy tools (qemu-img, nbdcopy) are checked by moving a disk image into a volume
// and back and comparing checksums; the image should look like a real disk (sparse,
// data in scattered regions), so holes and data both travel over the wire.

import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { prng } from './seed.js';

export function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `deltavol-${prefix}-`));
}

export function sha256File(file: string): string {
  const h = crypto.createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(4 * 1024 * 1024);
    for (;;) {
      const n = fs.readSync(fd, buf, 0, buf.length, null);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
    }
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

/**
 * Writes a sparse image of `sizeBytes` with `regions` random-data regions at random
 * offsets (some unaligned), the rest holes. Returns the regions written and the bytes of data.
 */
export function makeSparseImage(
  file: string,
  sizeBytes: number,
  opts: { regions: number; maxRegionBytes: number; seed: number },
): { regions: [number, number][]; dataBytes: number } {
  const rnd = prng(opts.seed);
  const fd = fs.openSync(file, 'w');
  const regions: [number, number][] = [];
  let dataBytes = 0;
  try {
    fs.ftruncateSync(fd, sizeBytes);
    for (let i = 0; i < opts.regions; i++) {
      const len = 1 + Math.floor(rnd() * opts.maxRegionBytes);
      let off = Math.floor(rnd() * (sizeBytes - len));
      if (i % 2 === 0) off -= off % 4096; // half aligned, half not
      const data = crypto.randomBytes(len);
      fs.writeSync(fd, data, 0, len, off);
      regions.push([off, len]);
      dataBytes += len;
    }
    // Always some data in the last block, so a copy that drops the tail is caught.
    fs.writeSync(fd, crypto.randomBytes(100), 0, 100, sizeBytes - 100);
    regions.push([sizeBytes - 100, 100]);
  } finally {
    fs.closeSync(fd);
  }
  return { regions, dataBytes: dataBytes + 100 };
}
