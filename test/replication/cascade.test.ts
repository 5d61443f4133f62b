// Why: the three-site cascade of seed 002 (issue 13): A replicates synchronously to a
// nearby B, and B, a replica itself, forwards to a distant C asynchronously in delta sets
// of its own, cut only where B equals A at a point in time. These tests run three real
// daemons on loopback: the chain converges byte for byte under a writer; A lost → B fails
// over with no acknowledged write lost and C keeps following B (adopting its generation);
// B or C lost for a while (kill -9, restart) → the others go on and it catches up. The netns version with the
// B-lost path is test/replication/netns-cascade.test.ts.
//
// Replay: DELTAVOL_SEED=<printed seed> npx vitest run test/replication/cascade.test.ts

import { afterAll, describe, expect, it } from 'vitest';
import type { TestDaemon } from '../helpers/daemon.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import { prng, testSeed } from '../helpers/seed.js';
import { blocksDiffering, cliOk, cliOkAsync, DaemonFleet, type DaemonPorts, expectVolumeEquals, freePorts, replStatus, SeededWriter, waitInSync, waitStatus } from '../helpers/replication.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

const fleet = new DaemonFleet();
afterAll(() => fleet.dispose());
const ports = freePorts;
/** A daemon on fixed ports (so it can be restarted at the same address), data on tmpfs. */
const daemon = (p: DaemonPorts, dataDir?: string): Promise<TestDaemon> => fleet.start(p, dataDir);

interface ChainStatus {
  role: string;
  state: string;
  generation: number;
  playedSet?: number;
  replicas?: { state: string; playedSet: number; remoteVolume: string; peer: string }[];
}

/**
 * Three daemons on fixed ports: volume v on A with `batch` seeded writes, A → B sync (with
 * abArgs), B → C async at cut interval bcCut (beforeForward runs on B first); both in sync.
 */
async function threeSites(seedName: string, batch: number, abArgs: string[], bcCut: string, beforeForward?: (b: TestDaemon, pc: DaemonPorts) => void) {
  const rnd = prng(testSeed(seedName));
  const pa = await ports();
  const pb = await ports();
  const pc = await ports();
  const a = await daemon(pa);
  const b = await daemon(pb);
  const c = await daemon(pc);
  cliOk(a, ['volume', 'create', 'v', '--size', String(SIZE)]);
  const w = await SeededWriter.connect(a.nbdPort, 'v', SIZE, rnd);
  await w.batch(batch);
  cliOk(a, ['replica', 'add', 'v', '--peer', `127.0.0.1:${pb.repl}`, '--mode', 'sync', ...abArgs]);
  await waitInSync(a, 'v');
  beforeForward?.(b, pc);
  cliOk(b, ['replica', 'add', 'v', '--peer', `127.0.0.1:${pc.repl}`, '--cut-interval', bcCut]);
  await waitInSync(b, 'v');
  return { rnd, pa, pb, pc, a, b, c, w };
}

describe('three-site cascade A → B (sync) → C (async)', () => {
  it('converges under a writer; A lost: B fails over with nothing lost and C follows B; C lost: it catches up on return', async () => {
    const site = await threeSites('cascade', 200, ['--cut-interval', '500ms'], '300ms', (b, pc) => {
      // B forwards to C: refused as sync, accepted as async.
      const syncDown = b.cli(['replica', 'add', 'v', '--peer', `127.0.0.1:${pc.repl}`, '--mode', 'sync']);
      expect(syncDown.status, syncDown.stderr).toBe(2);
    });
    const { a, pb, pc, rnd, w } = site;
    let { b, c } = site;
    await expectVolumeEquals(c.nbdPort, 'v', w.model, 'C after its initial copy from B');

    // Under a writer: A → B streams, B cuts its own sets for C at its consistent points.
    w.start(16, 5);
    await new Promise((r) => setTimeout(r, 3000));
    await w.stop();
    cliOk(a, ['replica', 'cut', 'v']);
    await waitInSync(a, 'v');
    await waitInSync(b, 'v');
    const sb = (await replStatus(b, 'v')) as unknown as ChainStatus;
    expect(sb.role).toBe('replica');
    expect(sb.replicas?.[0]?.state).toBe('duplex');
    const sc = (await replStatus(c, 'v')) as unknown as ChainStatus;
    console.log(`cascade under a writer: ${w.writes} writes; B played A's set ${sb.playedSet}, C played B's set ${sc.playedSet} (consistent)`);
    await expectVolumeEquals(b.nbdPort, 'v', w.model, 'B = A');
    await expectVolumeEquals(c.nbdPort, 'v', w.model, 'C = A, through B');
    // Every node shows the whole chain (reports travel one hop a second).
    type Hop = { position: string; depth: number; state: string; peer: string };
    const chainOf = async (d: TestDaemon) => ((await replStatus(d, 'v')) as unknown as { chain?: Hop[] }).chain ?? [];
    await waitStatus(a, 'v', (s) => ((s as unknown as { chain?: Hop[] }).chain ?? []).some((h) => h.position === 'downstream' && h.depth === 2), 10_000, "A's chain shows C");
    await waitStatus(c, 'v', (s) => ((s as unknown as { chain?: Hop[] }).chain ?? []).some((h) => h.position === 'upstream' && h.depth === 2), 10_000, "C's chain shows A");
    const ca = await chainOf(a);
    const cb = await chainOf(b);
    const cc = await chainOf(c);
    expect(ca.map((h) => `${h.position}${h.depth}`)).toEqual(['here0', 'downstream1', 'downstream2']);
    expect(cb.map((h) => `${h.position}${h.depth}`)).toEqual(['upstream1', 'here0', 'downstream1']);
    expect(cc.map((h) => `${h.position}${h.depth}`)).toEqual(['upstream2', 'upstream1', 'here0']);
    expect(ca[2]!.peer).toBe(`127.0.0.1:${pc.repl}`); // C, as B reaches it
    const text = cliOk(c, ['status', 'v']);
    console.log(`status on C:\n${text}`);
    expect(text).toMatch(/chain .* → .* → \[v here: replica/);

    // A planned takeover asked of B (C's upstream, itself a replica) is refused up front:
    // two primaries otherwise. Nothing is held; the chain goes on.
    const swap = c.cli(['failover', 'v', '--sync']);
    expect(swap.status, swap.stdout + swap.stderr).not.toBe(0);
    expect(swap.stdout + swap.stderr).toMatch(/middle of a cascade/);
    expect(((await replStatus(b, 'v')) as unknown as ChainStatus).role).toBe('replica');
    expect(((await replStatus(c, 'v')) as unknown as ChainStatus).role).toBe('replica');

    // ---- B crashes under writes (kill -9) and comes back: A goes on (fence never), B catches
    // up and forwards again; the three converge ----
    w.start(16, 2);
    await new Promise((r) => setTimeout(r, 800));
    await b.kill();
    await new Promise((r) => setTimeout(r, 1500));
    b = await daemon(pb, b.dataDir);
    await new Promise((r) => setTimeout(r, 1000));
    await w.stop();
    cliOk(a, ['replica', 'cut', 'v']);
    await waitInSync(a, 'v');
    await waitInSync(b, 'v');
    await expectVolumeEquals(b.nbdPort, 'v', w.model, 'B = A after its crash');
    await expectVolumeEquals(c.nbdPort, 'v', w.model, 'C = A after B crashed and came back');

    // ---- A lost: kill -9 under writes; B fails over; nothing acknowledged is lost ----
    w.start(16, 2);
    await new Promise((r) => setTimeout(r, 1500));
    await a.kill();
    await w.stop().catch(() => undefined); // writes in flight at the kill fail (uncertain)
    await waitStatus(b, 'v', (s) => (s as unknown as { connected: boolean }).connected === false, 10_000, 'B sees A gone');
    const fo = JSON.parse(await cliOkAsync(b, ['failover', 'v', '--json'])) as { generation: number; rtoMs: number; downstream: { peer: string; bytesDifferent: number }[] };
    expect(fo.generation).toBe(2);
    // The report says what C lacks of B as B takes over (it catches up by itself).
    expect(fo.downstream.map((d) => d.peer)).toEqual([`127.0.0.1:${pc.repl}`]);
    console.log(`failover on B: rto ${fo.rtoMs} ms; C lacked ${fo.downstream[0]!.bytesDifferent} bytes of B then`);
    await expectVolumeEquals(b.nbdPort, 'v', w.model, 'B after the failover holds every acknowledged write', w.uncertain);
    // The blocks written by requests that failed at the kill: B's content decides.
    const bNow = await readAll(b.nbdPort);
    await waitInSync(b, 'v');
    const sc2 = (await replStatus(c, 'v')) as unknown as ChainStatus;
    expect(sc2.generation).toBe(2); // C adopted its primary's new generation
    await expectVolumeEquals(c.nbdPort, 'v', bNow, 'C follows B, the new primary');

    // ---- C keeps following B; then C lost and back ----
    const wb = new SeededWriter(await MiniNbdClient.connect(b.nbdPort, 'v'), SIZE, rnd, SIZE, Buffer.from(bNow));
    await wb.batch(100);
    cliOk(b, ['replica', 'cut', 'v']);
    await waitInSync(b, 'v');
    await expectVolumeEquals(c.nbdPort, 'v', wb.model, 'C = B after more writes on B');
    await c.kill();
    await wb.batch(150);
    c = await daemon(pc, c.dataDir);
    cliOk(b, ['replica', 'cut', 'v']);
    await waitInSync(b, 'v', 60_000);
    await expectVolumeEquals(c.nbdPort, 'v', wb.model, 'C caught up after its restart');
    await wb.close();
  });
});

describe('cascade: the middle lost', () => {
  it('B lost: C moves to A with only the blocks A changed since the set C holds; B returns as A\'s sync replica', async () => {
    const site = await threeSites('cascade-b-lost', 300, ['--cut-interval', '300ms', '--sync-timeout', '500ms'], '200ms');
    const { a, pa, pb, pc, c, w } = site;
    let { b } = site;
    // A learns where C stands through B's reports; a few rounds of writes make C confirm a
    // set of A's from after A began tracking it.
    type Distant = { pairId: string; confirmedSet: number; trackedFrom: number; differential: boolean; blocks: number };
    for (let i = 0; i < 20; i++) {
      await w.batch(20);
      cliOk(a, ['replica', 'cut', 'v']);
      await new Promise((r) => setTimeout(r, 300));
      const d = ((await replStatus(a, 'v')) as unknown as { distant?: Distant[] }).distant ?? [];
      if (d[0]?.differential) break;
    }
    await waitInSync(a, 'v');
    await waitInSync(b, 'v');
    const before = ((await replStatus(a, 'v')) as unknown as { distant: Distant[] }).distant;
    expect(before.length).toBe(1);
    expect(before[0]!.differential).toBe(true);
    const atLoss = Buffer.from(w.model);

    // ---- B lost (kill -9); A goes on writing (fence never: the stream breaks after 0.5 s) ----
    await b.kill();
    await w.batch(120);
    const fl = await MiniNbdClient.connect(a.nbdPort, 'v');
    expect((await fl.flush()).error).toBe(0);
    await fl.disconnect();
    const changedSince = blocksDiffering(atLoss, w.model).size;
    // On C: move to A. Only what A changed since the set C holds travels.
    await waitStatus(c, 'v', (s) => (s as unknown as { connected: boolean }).connected === false, 15_000, 'C sees B gone');
    const rs = JSON.parse(await cliOkAsync(c, ['resync', 'v', '--peer', `127.0.0.1:${pa.repl}`, '--json'])) as { full: boolean; reason: string; restartSet: number };
    expect(rs.full, rs.reason).toBe(false);
    const st = await waitStatus(a, 'v', (s) => s.replicas.some((p) => p.peer === `127.0.0.1:${pc.repl}` && p.state === 'duplex' && p.initialCopy === null && p.playedSet === s.currentSet), 60_000, 'A → C in sync');
    const toC = st.replicas.find((p) => p.peer === `127.0.0.1:${pc.repl}`)!;
    const distantBlocks = before[0]!.blocks;
    console.log(`B lost: C held A's set ${rs.restartSet}; A changed ${changedSince} blocks (4 KiB) after B died, tracked ${distantBlocks} before it; A → C moved ${toC.bytesSent} bytes (the volume is ${SIZE})`);
    expect(toC.bytesSent).toBeLessThan(SIZE / 4); // not a full copy
    expect(toC.bytesSent).toBeGreaterThanOrEqual(changedSince * 4096 * 0.5); // (zero runs travel without data)
    await expectVolumeEquals(c.nbdPort, 'v', w.model, 'C = A, caught up directly from A');

    // ---- B returns: still A's sync replica, it catches up; its pair to the moved C is removed ----
    b = await daemon(pb, b.dataDir);
    await waitStatus(a, 'v', (s) => s.replicas.every((p) => p.state === 'duplex'), 60_000, 'A → B and A → C duplex');
    cliOk(a, ['replica', 'cut', 'v']);
    await waitStatus(a, 'v', (s) => s.replicas.every((p) => p.playedSet === s.currentSet), 60_000, 'both played everything');
    await expectVolumeEquals(b.nbdPort, 'v', w.model, 'B = A after it returned');
    const bPairs = JSON.parse(cliOk(b, ['replica', 'list', 'v', '--json'])) as { id: string }[] | { replicas: { id: string }[] };
    const list = Array.isArray(bPairs) ? bPairs : bPairs.replicas;
    for (const p of list) cliOk(b, ['replica', 'remove', 'v', p.id]);
    await w.close();
  });
});


async function readAll(port: number): Promise<Buffer> {
  const cl = await MiniNbdClient.connect(port, 'v');
  try {
    const out = Buffer.alloc(SIZE);
    for (let off = 0; off < SIZE; off += 4 * MiB) {
      const r = await cl.read(off, 4 * MiB);
      expect(r.error).toBe(0);
      r.data.copy(out, off);
    }
    return out;
  } finally {
    await cl.disconnect();
  }
}
