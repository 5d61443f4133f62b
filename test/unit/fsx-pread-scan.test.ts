// Why: large NBD READs are read in the threadpool by fsx.preadScan, which also counts the
// all-zero blocks the NBD layer would otherwise scan for on the event loop. The count
// decides whether a reply carries data or holes, so it must be exact (a block whose only
// non-zero byte is its last, a short last block, bytes past the end of the file), the
// bytes must land where asked and nowhere else, and a failed pread must reject with the
// errno name. FileStore must hand the count to the asker through its read().
import { describe, expect, it } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadFsx } from '../../src/storage/native.js';
import { FileStore } from '../../src/storage/file-store.js';
import { zeroBlockScan } from '../../src/util/zero-block-scan.js';

function withFile(content: Buffer, f: (file: string) => Promise<void>): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fsx-scan-'));
  const file = path.join(dir, 'f');
  fs.writeFileSync(file, content);
  return f(file).finally(() => fs.rmSync(dir, { recursive: true, force: true }));
}

/** What the scan must find: blocks of `block` bytes from the start, the last one shorter. */
function countZeroBlocks(b: Buffer, block: number): number {
  let n = 0;
  for (let at = 0; at < b.length; at += block) if (b.subarray(at, Math.min(b.length, at + block)).every((x) => x === 0)) n++;
  return n;
}

describe('fsx.preadScan', () => {
  it('reads into the target at its offset, zeroes past the end, and counts zero blocks exactly', async () => {
    const fsx = loadFsx();
    expect(fsx?.preadScan, 'the addon (npm run build) has preadScan').toBeTypeOf('function');
    // zero, zero but its last byte, data, zero; then 5000 zero bytes and the end of the file
    const content = Buffer.concat([Buffer.alloc(4096), Buffer.alloc(4096), Buffer.alloc(4096, 1), Buffer.alloc(4096), Buffer.alloc(5000)]);
    content[8191] = 9;
    await withFile(content, async (file) => {
      const fd = fs.openSync(file, 'r');
      try {
        const target = Buffer.alloc(30_000, 0xaa);
        const length = 25_000; // 4904 bytes past the end of the file
        const zeros = await fsx!.preadScan!(fd, target, 100, length, 0, 4096);
        const expected = Buffer.concat([content, Buffer.alloc(length - content.length)]);
        expect(target.subarray(100, 100 + length).equals(expected)).toBe(true);
        expect(target.subarray(0, 100).every((x) => x === 0xaa) && target.subarray(100 + length).every((x) => x === 0xaa)).toBe(true);
        expect(zeros).toBe(countZeroBlocks(expected, 4096));
        expect(zeros).toBe(5); // blocks 0, 3, 4, 5 and 6 (the short last one); block 1 ends in 9
        // from an unaligned position, with another block size, and without a scan
        expect(await fsx!.preadScan!(fd, target, 0, 9000, 4000, 512)).toBe(countZeroBlocks(content.subarray(4000, 13_000), 512));
        expect(await fsx!.preadScan!(fd, target, 0, 9000, 4000, 0)).toBe(-1);
        expect(target.subarray(0, 9000).equals(content.subarray(4000, 13_000))).toBe(true);
      } finally {
        fs.closeSync(fd);
      }
    });
  });

  it('rejects a failed pread with the errno name, and refuses a range that does not fit the target', async () => {
    const fsx = loadFsx()!;
    const target = Buffer.alloc(4096);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fsx-scan-'));
    const fd = fs.openSync(dir, 'r'); // a directory: pread fails with EISDIR
    try {
      await expect(fsx.preadScan!(999_999, target, 0, 4096, 0, 4096)).rejects.toMatchObject({ code: 'EBADF' });
      await expect(fsx.preadScan!(fd, target, 0, 4096, 0, 4096)).rejects.toThrow(/pread/);
      expect(() => fsx.preadScan!(fd, target, 1, 4096, 0, 4096)).toThrow(/does not fit/);
      expect(() => fsx.preadScan!(fd, target, 0, 10, -1, 4096)).toThrow(/expected \(fd, Buffer/);
    } finally {
      fs.closeSync(fd);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('FileStore.read with a zero-block scan', () => {
  it('reads in the threadpool count what the scan asks; synchronous reads leave it to the asker', async () => {
    const content = Buffer.alloc(1 << 20);
    content.fill(5, 65536, 65536 + 4096);
    await withFile(content, async (file) => {
      const store = FileStore.open(file, { readOnly: true, syncIoBytesMax: 65536 });
      try {
        const big = zeroBlockScan(4096);
        const target = Buffer.alloc(1 << 20);
        await store.read(0, 1 << 20, target, big);
        expect(target.equals(content)).toBe(true);
        expect(big.zeroBlocks).toBe(255);
        const small = zeroBlockScan(4096);
        expect(store.read(0, 65536, target, small)).toBeUndefined(); // on the loop: not counted
        expect(small.zeroBlocks).toBe(-1);
        await store.read(0, 128 << 10, target); // no scan asked: still the native read
        expect(target.subarray(0, 128 << 10).equals(content.subarray(0, 128 << 10))).toBe(true);
      } finally {
        store.close();
      }
    });
  });
});
