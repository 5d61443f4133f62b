// Why: the primary builds delta sets just ahead of the link (issue 11): a set built far
// ahead of what the sender is sending leaves the outbound log's memory cache before it is
// sent, and is then read back from the file into a fresh buffer, a copy and a page-faulting
// allocation per chunk for nothing. A backlog much larger than the cache (suspend, write,
// resume) must ship with no chunk read back from the file, and arrive whole.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { replStatus, sha256File, waitInSync, writeBacklog } from '../helpers/replication.js';

const MiB = 1024 * 1024;

describe('set building paced by the link', () => {
  let a: TestDaemon;
  let b: TestDaemon;

  beforeAll(async () => {
    [a, b] = await Promise.all([startDaemon({ tmpfs: true }), startDaemon({ tmpfs: true })]);
  });
  afterAll(async () => {
    await Promise.all([a?.dispose(), b?.dispose()]);
  });

  it('a 320 MiB backlog ships from memory, not read back from the outbound file', async () => {
    const size = 384 * MiB;
    const backlog = 320 * MiB; // over 3× the 96 MiB cache
    await a.api('POST', '/v1/volumes', { name: 'pb', sizeBytes: size });
    await a.api('POST', '/v1/volumes/pb/replicas', { peer: `127.0.0.1:${b.replPort}` });
    await waitInSync(a, 'pb');
    await a.api('POST', '/v1/volumes/pb/replicas/suspend', {});
    await writeBacklog(a.nbdPort, 'pb', backlog, 37);
    await a.api('POST', '/v1/volumes/pb/cut', {});
    const atCut = (await replStatus(a, 'pb')).outbound;
    expect(atCut.chunkFileReads).toBe(0);
    const allocatedBefore = atCut.chunkBuffersAllocated!;
    await a.api('POST', '/v1/volumes/pb/replicas/resume', {});
    const s = await waitInSync(a, 'pb', 120_000);
    expect(s.outbound.chunkFileReads, 'chunks read back from the outbound file').toBe(0);
    // 320 chunks went through at most the cache's 96 MiB of buffers plus the pool's floor
    // and what the socket still held: a set acknowledged from the cache used to free 64
    // buffers while the pool kept 8, and the next set allocated the rest again.
    const allocated = s.outbound.chunkBuffersAllocated! - allocatedBefore;
    console.log(`[paced-build] chunk buffers allocated ${allocated}, reused ${s.outbound.chunkBuffersReused} (320 chunks shipped)`);
    expect(allocated, `chunk buffers allocated while shipping (reused ${s.outbound.chunkBuffersReused})`).toBeLessThanOrEqual(128);
    expect(sha256File(b.volumePath('pb'))).toBe(sha256File(a.volumePath('pb')));
  }, 180_000);
});
