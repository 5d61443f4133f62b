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

  it('writes a new set over a played set\'s file, reads only its own bytes, and keeps at most two spares', async () => {
    for (const fsys of [new SimFs(), realFs()]) {
      let area = new InboundArea(fsys, () => 0);
      const play = async (set: number, blocks: number) => {
        const data = crypto.randomBytes(blocks * BS);
        const c = chunkOf(set, 0, 100 * set, data);
        await area.storeChunk(c, [data]);
        const r = await area.finishSet(trailerOf(set, [c], data.length));
        expect(r.ok).toBe(true);
        return { data, chunk: area.get(set)!.chunks[0]! };
      };
      // A big set played and removed leaves its file as a spare.
      const big = await play(1, 16);
      expect(Buffer.compare(area.chunkData(1, big.chunk), big.data)).toBe(0);
      area.remove(1);
      expect(area.spareFiles).toBe(1);
      expect(fsys.list().filter((n) => n.startsWith('inbound-set-'))).toEqual([]);
      // A smaller set takes it over: its data is exactly its own (stale bytes follow it).
      const small = await play(2, 3);
      expect(area.spareFiles).toBe(0);
      expect(Buffer.compare(area.chunkData(2, small.chunk), small.data)).toBe(0);
      // Reopened, a complete set on a reused file plays the same.
      area.close();
      area = new InboundArea(fsys, () => 0);
      expect(Buffer.compare(area.chunkData(2, area.get(2)!.chunks[0]!), small.data)).toBe(0);
      // Sets complete at once, then removed: two spares kept, the third file deleted.
      const more = [await play(3, 2), await play(4, 2), await play(5, 2)];
      expect(more.length).toBe(3);
      for (const set of [2, 3, 4, 5]) area.remove(set);
      expect(area.spareFiles).toBe(2);
      expect(fsys.list().filter((n) => n.startsWith('inbound-spare-')).length).toBe(2);
      expect(fsys.list().filter((n) => n.startsWith('inbound-set-'))).toEqual([]);
      // A reopened area adopts the spares and numbers new ones past them.
      area.close();
      area = new InboundArea(fsys, () => 0);
      expect(area.spareFiles).toBe(2);
      const next = await play(6, 1);
      expect(Buffer.compare(area.chunkData(6, next.chunk), next.data)).toBe(0);
      area.remove(6);
      expect(new Set(fsys.list().filter((n) => n.startsWith('inbound-spare-'))).size).toBe(2);
      area.close();
    }
  });
});
