// Why: the engine's crash rules are about the order in which metadata and volume data
// reach disk, so tests need a volume whose unflushed writes can be lost or torn too.
// Writes and zeroings land in `current` at once; flush() makes them durable; crash(rng)
// keeps a random subset (whole or sector-torn) of what was not flushed.

import type { VolumeData } from '../../src/volume/volume-engine.js';
import type { PipedBytes } from '../../src/util/piped-bytes.js';

/** A payload "in a pipe" that lives in memory (tests of the engine's choices; no file descriptors). */
export function memoryPiped(data: Buffer): PipedBytes {
  let consumed = false;
  const once = () => {
    if (consumed) throw new Error('a piped payload consumed twice');
    consumed = true;
  };
  return {
    length: data.length,
    moveToFileSync: () => {
      throw new Error('memoryPiped has no pipe to move from');
    },
    moveToFile: () => Promise.reject(new Error('memoryPiped has no pipe to move from')),
    take: () => {
      once();
      return data;
    },
  };
}

const SECTOR_BYTES = 512;

export class SimVolumeData implements VolumeData {
  current: Buffer;
  durable: Buffer;
  private pending: { position: number; data: Buffer }[] = [];
  flushes = 0;

  constructor(
    public sizeBytes: number,
    from?: Buffer,
  ) {
    this.current = from ? Buffer.from(from) : Buffer.alloc(sizeBytes);
    this.durable = Buffer.from(this.current);
  }

  readSync(offset: number, target: Buffer, targetOffset: number, length: number): void {
    this.current.copy(target, targetOffset, offset, offset + length);
  }

  write(offset: number, chunks: Buffer[]): void {
    const data = Buffer.concat(chunks);
    data.copy(this.current, offset);
    this.pending.push({ position: offset, data });
  }

  /** Payloads the engine handed over still piped (the fast path), as opposed to taken into memory first. */
  pipedWrites = 0;

  /** pipedWrites of every instance (a test's volumes are replaced at each simulated crash). */
  static pipedWritesTotal = 0;

  writePiped(offset: number, bytes: PipedBytes): void {
    this.pipedWrites++;
    SimVolumeData.pipedWritesTotal++;
    this.write(offset, [bytes.take()]);
  }

  zero(offset: number, length: number): void {
    this.current.fill(0, offset, offset + length);
    this.pending.push({ position: offset, data: Buffer.alloc(length) });
  }

  async flush(): Promise<void> {
    // Covers the writes issued before the call, and takes time (a crash may come first).
    const covered = this.pending.length;
    await new Promise<void>((r) => setImmediate(r));
    for (const p of this.pending.slice(0, covered)) p.data.copy(this.durable, p.position);
    this.pending = this.pending.slice(covered);
    this.flushes++;
  }

  /** Grows the volume (like ftruncate to a larger size: durable at once, reads as zeroes). */
  grow(sizeBytes: number): void {
    const grow = (b: Buffer) => {
      const g = Buffer.alloc(sizeBytes);
      b.copy(g);
      return g;
    };
    this.current = grow(this.current);
    this.durable = grow(this.durable);
    this.sizeBytes = sizeBytes;
  }

  crash(rng: () => number): SimVolumeData {
    const buf = Buffer.from(this.durable);
    for (const p of this.pending) {
      const r = rng();
      if (r < 0.4) continue;
      if (r < 0.6) {
        for (let s = 0; s < p.data.length; s += SECTOR_BYTES) {
          if (rng() < 0.5) p.data.copy(buf, p.position + s, s, Math.min(p.data.length, s + SECTOR_BYTES));
        }
        continue;
      }
      p.data.copy(buf, p.position);
    }
    return new SimVolumeData(this.sizeBytes, buf);
  }
}
