// Why: a snapshot differential leaves a node (the control API's GET, a file) and arrives
// (the control API's POST) in the same two shapes wherever it travels: the runs of a
// volume's differential batched into stream pieces, and a received stream verified whole
// before any run is applied. Those loops live here, beside the codec (diff-stream.ts), so
// every transport uses one implementation; the HTTP handlers only move bytes. Knows the
// volume only through the two small interfaces below.

import { DeltavolError } from '../util/errors.js';
import { DiffDecoder, DiffEncoder, type DiffHeader, type DiffRun } from './diff-stream.js';

/** A volume a differential is read from. */
export interface DifferentialSource {
  differentialHeader(from: string, to: string): DiffHeader;
  differential(from: string, to: string): Generator<DiffRun>;
}

/** A volume a differential is applied to (through its normal write path). */
export interface DifferentialTarget {
  readonly name: string;
  readonly sizeBytes: number;
  applyRun(run: DiffRun): void | Promise<void>;
  flush(): Promise<void>;
}

/** Runs are small (often one 4 KiB block): stream pieces are batched to about this size. */
export const differentialBatchBytes = 1024 * 1024;

/**
 * The stream of the differential from → to, in pieces of about differentialBatchBytes.
 * The first run is computed before the first piece is returned, so a bad pair of
 * snapshots fails before anything is sent.
 */
export function encodeDifferential(src: DifferentialSource, from: string, to: string): { first: Buffer; rest: Generator<Buffer, { dataBytes: number }> } {
  const enc = new DiffEncoder();
  const header = src.differentialHeader(from, to);
  const runs = src.differential(from, to);
  const first = runs.next();
  function* rest(): Generator<Buffer, { dataBytes: number }> {
    let batch: Buffer[] = [];
    let batchBytes = 0;
    let dataBytes = 0;
    for (let it = first; !it.done; it = runs.next()) {
      dataBytes += it.value.data?.length ?? 0;
      for (const b of enc.run(it.value)) {
        batch.push(b);
        batchBytes += b.length;
      }
      if (batchBytes >= differentialBatchBytes) {
        yield Buffer.concat(batch);
        batch = [];
        batchBytes = 0;
      }
    }
    batch.push(enc.trailer());
    yield Buffer.concat(batch);
    return { dataBytes };
  }
  return { first: enc.header(header), rest: rest() };
}

/** Checks a whole stream (checksum, counts, bounds) without applying it; returns its header. */
export async function verifyDifferential(chunks: AsyncIterable<Buffer>, onChunk?: (c: Buffer) => void): Promise<DiffHeader> {
  const check = new DiffDecoder(() => undefined);
  for await (const chunk of chunks) {
    check.push(chunk);
    onChunk?.(chunk);
  }
  check.end();
  return check.header!;
}

/** Applies a stream already verified whole to `target`, run by run, then flushes. */
export async function applyDifferential(
  target: DifferentialTarget,
  header: DiffHeader,
  chunks: AsyncIterable<Buffer>,
): Promise<{ records: number; bytesWritten: number; bytesZeroed: number }> {
  if (header.sizeBytes > target.sizeBytes) {
    throw new DeltavolError('EINVAL_ARGUMENT', `differential is for a volume of ${header.sizeBytes} bytes; ${target.name} has ${target.sizeBytes}`);
  }
  let runs: DiffRun[] = [];
  let bytesWritten = 0;
  let bytesZeroed = 0;
  const apply = new DiffDecoder((r) => runs.push(r));
  for await (const chunk of chunks) {
    apply.push(chunk);
    const batch = runs;
    runs = [];
    for (const r of batch) {
      await target.applyRun(r);
      if (r.data) bytesWritten += r.lengthBytes;
      else bytesZeroed += r.lengthBytes;
    }
  }
  const totals = apply.end();
  await target.flush();
  return { records: totals.records, bytesWritten, bytesZeroed };
}
