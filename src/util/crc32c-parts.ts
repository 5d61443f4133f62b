// Why: every replicated byte is checksummed on both ends (chunkChecksum, the initial copy's
// crc), and @node-rs/crc32 runs the CPU's crc32 instruction on one stream (~5 GiB/s per
// core here, ~10% of the replica's CPU while it receives). The native addon (fsx.c) runs
// three streams at once (~12 GiB/s) and takes a list of buffers in one call (a chunk
// arrives as ~16 socket buffers). Without the addon, or on a CPU without SSE 4.2, the
// library does it. Same function either way (test/unit/crc32c-parts.test.ts).

import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { crc32c } from '@node-rs/crc32';

type NativeCrc = (parts: Uint8Array | readonly Uint8Array[], initial: number) => number;

function loadNative(): NativeCrc | null {
  if (process.env.DELTAVOL_NO_NATIVE_CRC === '1') return null;
  try {
    const here = path.dirname(fileURLToPath(import.meta.url));
    // dist/util/ or src/util/ → project root
    const m = createRequire(import.meta.url)(path.resolve(here, '../../build/Release/fsx.node')) as { crc32c?: NativeCrc };
    return typeof m.crc32c === 'function' ? m.crc32c : null;
  } catch {
    return null;
  }
}

const native = loadNative();

/** Whether the three-stream native crc is in use (else @node-rs/crc32). */
export const crc32cNative = native !== null;

/** crc32c of the parts back to back, continuing from `crc` (a previous result; 0 to start). */
export function crc32cParts(parts: Uint8Array | readonly Uint8Array[], crc = 0): number {
  if (native) return native(parts, crc >>> 0);
  if (!Array.isArray(parts)) return crc32c(parts as Buffer, crc) >>> 0;
  for (const p of parts as readonly Uint8Array[]) crc = crc32c(p as Buffer, crc);
  return crc >>> 0;
}
