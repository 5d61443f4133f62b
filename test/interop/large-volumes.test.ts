// Why: the engine indexes tracking blocks with unsigned 32-bit numbers, so a volume holds
// at most 2^32 - 1 of them. Volumes past 16 TiB must still be creatable (a larger tracking
// block is chosen when none is asked for), and a size or tracking block that cannot work
// must be refused up front with the limit, not fail an assertion inside the engine.
// tmpfs holds sparse files of any of these sizes, so nothing is really allocated.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { nbdshOut } from '../helpers/nbdsh.js';
import { trackingBlockBytesFor, TRACKING_BLOCKS_MAX } from '../../src/volume/volume-meta.js';

const KiB = 1024;
const TiB = 1024 ** 4;
let d: TestDaemon;

beforeAll(async () => {
  d = await startDaemon({ tmpfs: true });
});
afterAll(async () => {
  await d?.dispose();
});

interface VolumeJson {
  sizeBytes: number;
  trackingBlockBytes: number;
}

async function raw(method: string, path: string, body?: unknown): Promise<{ status: number; json: { error?: { code: string; message: string; details?: Record<string, number> } } & Partial<VolumeJson> }> {
  const r = await fetch(`http://127.0.0.1:${d.controlPort}${path}`, {
    method,
    headers: { authorization: `Bearer ${d.token}`, 'content-type': 'application/json' },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  return { status: r.status, json: (await r.json()) as never };
}

describe('volume size and tracking block count', () => {
  it('chooses the smallest tracking block that keeps a volume within 2^32 - 1 blocks', () => {
    expect(trackingBlockBytesFor(1024 ** 3)).toBe(4 * KiB);
    expect(trackingBlockBytesFor(16 * TiB - 4 * KiB)).toBe(4 * KiB);
    expect(trackingBlockBytesFor(16 * TiB)).toBe(8 * KiB); // 2^32 blocks of 4 KiB: one too many
    expect(trackingBlockBytesFor(64 * TiB - 16 * KiB)).toBe(16 * KiB);
    expect(trackingBlockBytesFor(64 * TiB)).toBe(32 * KiB);
    expect(trackingBlockBytesFor(2 ** 53 - 512)).toBe(1024 * KiB); // capped: refused by the count check
  });

  it('a 64 TiB - 16 KiB volume is created with 16 KiB tracking blocks, written at both ends and read back', async () => {
    const r = await raw('POST', '/v1/volumes', { name: 'huge', sizeBytes: 64 * TiB - 16 * KiB });
    expect(r.status, JSON.stringify(r.json)).toBe(200);
    expect(r.json.trackingBlockBytes).toBe(16 * KiB);
    const io = nbdshOut<{ size: number; same: boolean }>(`
      import os
      h = nbd.NBD()
      h.connect_uri(${JSON.stringify(d.uri('huge'))})
      size = h.get_size()
      a = os.urandom(4096); b = os.urandom(4096)
      h.pwrite(a, 0); h.pwrite(b, size - 4096); h.flush()
      out({'size': size, 'same': h.pread(4096, 0) == a and h.pread(4096, size - 4096) == b})
    `);
    expect(io).toEqual({ size: 64 * TiB - 16 * KiB, same: true });
  });

  it('an explicit tracking block too small for the size is 400 BAD_SIZE naming the smallest that works', async () => {
    const r = await raw('POST', '/v1/volumes', { name: 'toosmall', sizeBytes: 64 * TiB, trackingBlockBytes: 4 * KiB });
    expect(r.status).toBe(400);
    expect(r.json.error?.code).toBe('BAD_SIZE');
    expect(r.json.error?.details?.trackingBlockBytesMin).toBe(32 * KiB);
    expect(r.json.error?.details?.sizeBytesMax).toBe(TRACKING_BLOCKS_MAX * 4 * KiB);
    expect(r.json.error?.message).toContain('32768');
    expect((await raw('GET', '/v1/volumes/toosmall')).status).toBe(404);
  });

  it('growing a volume past 2^32 - 1 of its tracking blocks is 400 BAD_SIZE and leaves it as it was', async () => {
    expect((await raw('POST', '/v1/volumes', { name: 'small', sizeBytes: 1024 ** 3 })).status).toBe(200);
    const r = await raw('PATCH', '/v1/volumes/small', { sizeBytes: 16 * TiB });
    expect(r.status).toBe(400);
    expect(r.json.error?.code).toBe('BAD_SIZE');
    expect(r.json.error?.details?.sizeBytesMax).toBe(TRACKING_BLOCKS_MAX * 4 * KiB);
    expect((await raw('GET', '/v1/volumes/small')).json.sizeBytes).toBe(1024 ** 3);
    const grown = await raw('PATCH', '/v1/volumes/small', { sizeBytes: 16 * TiB - 4 * KiB });
    expect(grown.status, JSON.stringify(grown.json)).toBe(200);
  });
});
