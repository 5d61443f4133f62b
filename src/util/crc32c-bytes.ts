// Why: a call into the native crc32c costs about as much as checksumming a few hundred
// bytes; a save area checks a 20-byte record header per before-image when it opens
// (262,144 of them per GiB), where a table lookup per byte in JS is several times cheaper.
// The same function as @node-rs/crc32's crc32c (Castagnoli, reflected, pre- and post-
// inverted, chainable), checked against it by test/unit/crc32c-bytes.test.ts.

const TABLE = (() => {
  const t = new Int32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[n] = c;
  }
  return t;
})();

/** crc32c of bytes[offset, offset + length), continuing from `crc` (a previous result; 0 to start). */
export function crc32cBytes(bytes: Uint8Array, offset: number, length: number, crc = 0): number {
  let c = ~crc;
  const end = offset + length;
  for (let i = offset; i < end; i++) c = TABLE[(c ^ bytes[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}
