// Why: after an outage the primary catches up from its outbound log, and most of a large
// backlog has left the log's memory cache by then. Those chunk records go on the link from
// the log's file (sendfile through the link's threadpool sender), not read into fresh
// memory first. The replica must still get every byte: this stops the replica, writes
// 320 MiB (over 3× the 96 MiB cache) so the sets are cut into the log while it is away,
// starts it again, and compares the volumes.

import fs from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { DaemonFleet, freePorts, replStatus, sha256File, waitInSync, writeBacklog } from '../helpers/replication.js';

const MiB = 1024 * 1024;

/** User + system CPU seconds of a process so far (Linux /proc). */
function cpuSeconds(pid: number): number {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks (USER_HZ 100)
}

describe('catch-up from the outbound log file', () => {
  const fleet = new DaemonFleet();
  afterAll(() => fleet.dispose());

  it('chunks no longer cached leave from the file, and the replica ends equal to the primary', async () => {
    const [pa, pb] = [await freePorts(), await freePorts()];
    const a = await fleet.start(pa);
    let b = await fleet.start(pb);
    const size = 384 * MiB;
    const backlog = 320 * MiB;
    await a.api('POST', '/v1/volumes', { name: 'cu', sizeBytes: size });
    await a.api('POST', '/v1/volumes/cu/replicas', { peer: `127.0.0.1:${pb.repl}` });
    await waitInSync(a, 'cu');
    const bDir = b.dataDir;
    await b.stop();
    await writeBacklog(a.nbdPort, 'cu', backlog, 53);
    await a.api('POST', '/v1/volumes/cu/cut', {});
    const atCut = (await replStatus(a, 'cu')).outbound;
    expect(atCut.usedBytes, 'the backlog waits in the outbound log').toBeGreaterThan(backlog);
    expect(atCut.cachedBytes!, 'more than the cache holds').toBeLessThan(atCut.usedBytes);
    const cpu0 = cpuSeconds(a.proc.pid!);
    const t0 = Date.now();
    b = await fleet.start(pb, bDir);
    const s = await waitInSync(a, 'cu', 120_000);
    const cpu = cpuSeconds(a.proc.pid!) - cpu0;
    console.log(`[catch-up-from-file] ${s.outbound.chunkFileSends} chunk records sent from the file, ${s.outbound.chunkFileReads} read back into memory; the primary used ${cpu.toFixed(2)} s of CPU in the ${((Date.now() - t0) / 1000).toFixed(1)} s from the replica's start to in sync`);
    expect(s.outbound.chunkFileSends!, 'chunk records sent from the outbound file').toBeGreaterThan(100);
    expect(sha256File(b.volumePath('cu'))).toBe(sha256File(a.volumePath('cu')));
  }, 180_000);
});
