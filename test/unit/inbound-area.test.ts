// Why: the replica's inbound area no longer keeps received chunk data in memory until
// playback (it cost ~250 MiB of RSS and the garbage collection of it). What it plays must
// be what is durable in the set's file, never a live view of buffers the receive path
// may reuse.
//
// Run: npx vitest run test/unit/inbound-area.test.ts

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { InboundArea } from '../../src/replication/inbound-area.js';
import { setDataChecksum } from '../../src/replication/outbound-log.js';
import { chunkChecksum, trailerChecksum, type ReplMessage, type Runs } from '../../src/replication/wire.js';
import { nodeDurableFs, type DurableFs } from '../../src/util/durable-fs.js';
import { SimFs } from '../helpers/sim-fs.js';

type Chunk = Extract<ReplMessage, { t: 'chunk' }>;
type Trailer = Extract<ReplMessage, { t: 'trailer' }>;
const BS = 4096;

function chunkOf(set: number, chunk: number, firstBlock: number, data: Buffer): Chunk {
  const runs: Runs = [[firstBlock, data.length / BS]];
  return { t: 'chunk', generation: 1, set, chunk, runs, crc: chunkChecksum(data, set, chunk, runs) };
}

function trailerOf(set: number, chunks: Chunk[], dataBytes: number): Trailer {
  const blocks = chunks.reduce((n, c) => n + c.runs.reduce((m, [, k]) => m + k, 0), 0);
  const fields = { generation: 1, set, chunks: chunks.length, blocks, dataBytes, dataCrc: setDataChecksum(chunks.map((c) => c.crc)), catchUpFrom: set - 1, createdAtMs: 1, partial: false };
  return { t: 'trailer', ...fields, trailerCrc: trailerChecksum(fields) };
}

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

function realFs(): DurableFs {
  const d = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), 'inbound-area-'));
  dirs.push(d);
  return nodeDurableFs(d);
}

describe('InboundArea', () => {
  it('plays back what was stored, not the received buffers (they may be reused after storeChunk)', async () => {
    for (const fsys of [new SimFs(), realFs()]) {
      const area = new InboundArea(fsys, () => 0);
      const original = crypto.randomBytes(4 * BS);
      const received = [Buffer.from(original.subarray(0, 3 * BS)), Buffer.from(original.subarray(3 * BS))];
      const c = chunkOf(1, 0, 10, original);
      await area.storeChunk(c, received);
      // The receive path reuses its buffers for the next bytes of the stream.
      for (const b of received) b.fill(0xee);
      const r = await area.finishSet(trailerOf(1, [c], original.length));
      expect(r.ok).toBe(true);
      const s = area.get(1)!;
      expect(Buffer.compare(area.chunkData(1, s.chunks[0]!), original)).toBe(0);
      area.close();
    }
  });
});
