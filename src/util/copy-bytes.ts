// Why: bitmap records are mostly a few dozen bytes, and Buffer.copy's fixed cost (argument
// checks, a native call) outweighs copying that many bytes by hand; restart and checkpoint
// copy hundreds of thousands of them. One helper for every such short copy.

/** Copies up to this many bytes with a loop; longer runs go through Buffer.copy. */
const LOOP_COPY_BYTES_MAX = 64;

/** src[from, from + n) to dst[at..). */
export function copyBytes(src: Buffer, from: number, dst: Buffer, at: number, n: number): void {
  if (n > LOOP_COPY_BYTES_MAX) {
    src.copy(dst, at, from, from + n);
    return;
  }
  for (let i = 0; i < n; i++) dst[at + i] = src[from + i]!;
}
