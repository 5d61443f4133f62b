// Why: seed 002's three sites rehearsed the way they fail (issue 13): three daemons in three
// network namespaces joined by a bridge, replication over TLS-PSK on real addresses, the
// distant link slowed by tc (tbf), a site cut off with `ip link set down` and its daemon
// killed with -9. A → B is synchronous, B → C asynchronous (B forwards what it plays).
// Checked with whole-volume checksums:
//   - the chain converges under a writer;
//   - C lost (link down, writes go on): A and B go on; C catches up when it is back;
//   - A lost (link down + kill -9 under writes): B fails over with no acknowledged write
//     lost, C keeps following B at B's new generation, the two survivors match;
//   - B lost (link down + kill -9): C moves to A (`resync --peer A`) and only what A
//     changed since the set C holds travels; B returns as A's sync replica and catches up.
// Needs root and `ip netns` (skipped otherwise). Replay with DELTAVOL_SEED; keep logs with
// DELTAVOL_KEEP_LOGS=1.

import crypto from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import { NetLab, NsDaemon, netnsSupport } from '../helpers/netns.js';
import { inSync, replStatus, SeededWriter, waitInSync, waitStatus } from '../helpers/replication.js';
import { prng, testSeed } from '../helpers/seed.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const V = 'vol';

const support = netnsSupport();
if (!support.ok) console.log(`[netns-cascade] SKIPPED: ${support.why}`);

let lab: NetLab | null = null;
afterEach(async () => {
  await lab?.dispose();
  lab = null;
});

function cli(d: NsDaemon, args: string[], timeoutMs = 60_000): string {
  const r = d.cli(args, timeoutMs);
  if (r.status !== 0) throw new Error(`deltavol ${args.join(' ')} on ${d.side} → ${r.status}\n${r.stdout}\n${r.stderr}\n${d.logTail(30)}`);
  return r.stdout;
}

/** sha256 of the whole volume, read through NBD. */
async function volumeSum(d: NsDaemon): Promise<string> {
  const c = await MiniNbdClient.connect(await d.nbdPort(), V);
  try {
    const h = crypto.createHash('sha256');
    for (let off = 0; off < SIZE; off += 4 * MiB) {
      const r = await c.read(off, 4 * MiB);
      expect(r.error).toBe(0);
      h.update(r.data);
    }
    return h.digest('hex');
  } finally {
    await c.disconnect().catch(() => c.destroy());
  }
}

const modelSum = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe.skipIf(!support.ok)('cascade A → B → C in three network namespaces', () => {
  it('converges; C cut off and back catches up; A lost: B fails over with nothing lost and C follows it', async () => {
    const seed = testSeed('netns-cascade');
    const rnd = prng(seed);
    lab = NetLab.create({ prefix: 'dvk-', sides: 3 });
    const [a, b, c] = await Promise.all([NsDaemon.start(lab, 'a', { tmpfs: true }), NsDaemon.start(lab, 'b', { tmpfs: true }), NsDaemon.start(lab, 'c', { tmpfs: true })]);
    // The distant site: 50 Mbit/s out of C's namespace and into it (tbf on its veth).
    lab.exec('c', 'tc', ['qdisc', 'add', 'dev', lab.veth.c, 'root', 'tbf', 'rate', '50mbit', 'burst', '256kb', 'latency', '50ms']);
    cli(a, ['volume', 'create', V, '--size', `${SIZE / MiB}M`]);
    const w = await SeededWriter.connect(await a.nbdPort(), V, SIZE, rnd);
    await w.batch(150);
    cli(a, ['replica', 'add', V, '--peer', `${lab.addr.b}:${b.replPort}`, '--mode', 'sync', '--cut-interval', '500ms']);
    await waitInSync(a, V);
    cli(b, ['replica', 'add', V, '--peer', `${lab.addr.c}:${c.replPort}`, '--cut-interval', '300ms']);
    await waitInSync(b, V, 120_000);

    // ---- under a writer ----
    w.start(16, 5);
    await sleep(3000);
    await w.stop();
    cli(a, ['replica', 'cut', V]);
    await waitInSync(a, V);
    await waitInSync(b, V, 120_000);
    const want1 = modelSum(w.model);
    expect(await volumeSum(b)).toBe(want1);
    expect(await volumeSum(c)).toBe(want1);
    console.log(`[netns-cascade] converged under a writer: ${w.writes} writes, A = B = C`);

    // ---- C cut off (link down) while A writes; back: it catches up ----
    lab.setLink('c', false);
    w.start(16, 5);
    const away = Date.now();
    // B notices once the link is silent (no RST through a downed link).
    const sb = await waitStatus(b, V, (s) => s.replicas[0]?.connected === false, 20_000, "B sees C's link down");
    await sleep(1000);
    lab.setLink('c', true);
    await w.stop();
    cli(a, ['replica', 'cut', V]);
    await waitInSync(a, V);
    const t0 = Date.now();
    await waitInSync(b, V, 120_000);
    console.log(`[netns-cascade] C back after ${((t0 - away) / 1000).toFixed(1)} s away: in sync ${((Date.now() - t0) / 1000).toFixed(1)} s after the last cut; B's pair was ${sb.replicas[0]!.state} meanwhile`);
    const want2 = modelSum(w.model);
    expect(await volumeSum(c)).toBe(want2);

    // ---- A lost: its site goes dark (link down) and its daemon dies, under writes ----
    w.start(16, 2);
    await sleep(1500);
    lab.setLink('a', false);
    await a.kill();
    await w.stop().catch(() => undefined); // requests in flight at the crash fail (uncertain)
    await w.close();
    await waitStatus(b, V, (s) => (s as unknown as { connected: boolean }).connected === false, 15_000, 'B sees A gone');
    const fo = JSON.parse(cli(b, ['failover', V, '--json'])) as { generation: number; rtoMs: number; report: { bytesAtMost: number } };
    expect(fo.generation).toBe(2);
    // Every acknowledged write is on B (sync pair): compare with the model where it is certain.
    const bc = await MiniNbdClient.connect(await b.nbdPort(), V);
    let lost = 0;
    for (let off = 0; off < SIZE; off += 4 * MiB) {
      const r = await bc.read(off, 4 * MiB);
      for (let i = 0; i < 4 * MiB; i += 512) {
        if (w.uncertain[(off + i) / 512]) continue;
        if (!r.data.subarray(i, i + 512).equals(w.model.subarray(off + i, off + i + 512))) lost++;
      }
    }
    await bc.disconnect();
    expect(lost).toBe(0);
    const t1 = Date.now();
    await waitStatus(b, V, inSync, 120_000, 'C in sync with B, the new primary');
    const sc = await replStatus(c, V);
    console.log(`[netns-cascade] A lost: failover rto ${fo.rtoMs} ms, 0 acknowledged sectors lost on B; C in sync with B ${((Date.now() - t1) / 1000).toFixed(1)} s later at generation ${(sc as unknown as { generation: number }).generation}`);
    expect((sc as unknown as { generation: number }).generation).toBe(2);
    expect(await volumeSum(c)).toBe(await volumeSum(b));
  });

  it('B lost (its site dark, killed): C moves to A and only what A changed since C\'s set travels; B back: A\'s sync replica again', async () => {
    const seed = testSeed('netns-cascade-b-lost');
    const rnd = prng(seed);
    lab = NetLab.create({ prefix: 'dvl-', sides: 3 });
    const [a, b0, c] = await Promise.all([NsDaemon.start(lab, 'a', { tmpfs: true }), NsDaemon.start(lab, 'b', { tmpfs: true }), NsDaemon.start(lab, 'c', { tmpfs: true })]);
    let b = b0;
    cli(a, ['volume', 'create', V, '--size', `${SIZE / MiB}M`]);
    const w = await SeededWriter.connect(await a.nbdPort(), V, SIZE, rnd);
    await w.batch(200);
    cli(a, ['replica', 'add', V, '--peer', `${lab.addr.b}:${b.replPort}`, '--mode', 'sync', '--cut-interval', '300ms', '--sync-timeout', '500ms']);
    await waitInSync(a, V);
    cli(b, ['replica', 'add', V, '--peer', `${lab.addr.c}:${c.replPort}`, '--cut-interval', '200ms']);
    await waitInSync(b, V, 120_000);
    type Distant = { confirmedSet: number; trackedFrom: number; differential: boolean; blocks: number };
    for (let i = 0; i < 30; i++) {
      await w.batch(20);
      cli(a, ['replica', 'cut', V]);
      await sleep(300);
      const d = ((await replStatus(a, V)) as unknown as { distant?: Distant[] }).distant ?? [];
      if (d[0]?.differential) break;
    }
    const tracked = ((await replStatus(a, V)) as unknown as { distant: Distant[] }).distant[0]!;
    expect(tracked.differential).toBe(true);

    // ---- B's site goes dark and its daemon dies; A writes on ----
    lab.setLink('b', false);
    await b.kill();
    await w.batch(150);
    const fl = await MiniNbdClient.connect(await a.nbdPort(), V);
    expect((await fl.flush()).error).toBe(0);
    await fl.disconnect();
    await waitStatus(c, V, (s) => (s as unknown as { connected: boolean }).connected === false, 20_000, 'C sees B gone');
    const rs = JSON.parse(cli(c, ['resync', V, '--peer', `${lab.addr.a}:${a.replPort}`, '--json'])) as { full: boolean; reason: string; restartSet: number };
    expect(rs.full, rs.reason).toBe(false);
    const st = await waitStatus(a, V, (s) => s.replicas.some((p) => p.peer === `${lab!.addr.c}:${c.replPort}` && p.state === 'duplex' && p.initialCopy === null && p.playedSet === s.currentSet), 120_000, 'A → C in sync');
    const toC = st.replicas.find((p) => p.peer === `${lab!.addr.c}:${c.replPort}`)!;
    console.log(`[netns-cascade] B lost: C held A's set ${rs.restartSet}; A → C moved ${toC.bytesSent} bytes of a ${SIZE}-byte volume (tracked ${tracked.blocks} blocks before the loss)`);
    expect(toC.bytesSent).toBeLessThan(SIZE / 4);
    expect(await volumeSum(c)).toBe(modelSum(w.model));

    // ---- B back: A's sync replica again, caught up; its pair to C is removed ----
    lab.setLink('b', true);
    b = await NsDaemon.start(lab, 'b', { tmpfs: true, dataDir: b.dataDir });
    await waitStatus(a, V, (s) => s.replicas.every((p) => p.state === 'duplex'), 60_000, 'A → B and A → C duplex');
    cli(a, ['replica', 'cut', V]);
    await waitStatus(a, V, (s) => s.replicas.every((p) => p.playedSet === s.currentSet), 60_000, 'both played everything');
    expect(await volumeSum(b)).toBe(modelSum(w.model));
    await w.close();
  });
});
