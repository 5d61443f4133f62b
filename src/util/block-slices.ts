// Why: a byte range read block by block (snapshot reads, a replica's overlay reads) is
// cut into per-block slices the same way everywhere; one place to get the edges right.

/**
 * Calls fn for each tracking block touched by [offset, offset+length): the block, the
 * offset inside it, where the slice goes in the caller's buffer, and its length.
 */
export function forEachBlockSlice(offset: number, length: number, blockBytes: number, fn: (block: number, inBlock: number, done: number, n: number) => void): void {
  let done = 0;
  while (done < length) {
    const at = offset + done;
    const b = Math.floor(at / blockBytes);
    const inBlock = at - b * blockBytes;
    const n = Math.min(blockBytes - inBlock, length - done);
    fn(b, inBlock, done, n);
    done += n;
  }
}
