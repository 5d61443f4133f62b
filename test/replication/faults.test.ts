// Why: replication must survive what real links and machines do (issue 5 "Faults"):
// a stream that is cut, reordered, duplicated and bit-flipped; a sender killed with
// SIGKILL mid-set and a receiver killed mid-playback, again and again; a link down for
// longer than the retry budget; an outbound save area too small for the backlog. After
// each, the assertion is the same: nothing acknowledged is lost on the primary, and the
// replica equals the primary byte for byte once it has played everything.
//
// Replay: DELTAVOL_SEED=<printed seed> npx vitest run test/replication/faults.test.ts
// (kill instants relative to the I/O are timing, so a replay is similar, not identical).

import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import { prng, testSeed } from '../helpers/seed.js';
import { startFaultProxy, type FaultProxy } from '../helpers/fault-proxy.js';
import { expectVolumeEquals, freePort, replStatus, SeededWriter, sha256File, waitInSync, waitStatus } from '../helpers/replication.js';

const MiB = 1024 * 1024;
const SIZE = 48 * MiB;

const daemons: TestDaemon[] = [];
const proxies: FaultProxy[] = [];
afterEach(async () => {
  await Promise.all(proxies.splice(0).map((p) => p.close()));
});
afterAll(async () => {
  await Promise.all(daemons.splice(0).map((d) => d.dispose()));
});

async function daemon(opts: Parameters<typeof startDaemon>[0] = {}): Promise<TestDaemon> {
  const d = await startDaemon({ tmpfs: true, ...opts });
  daemons.push(d);
  return d;
}

function cli(d: TestDaemon, args: string[]): string {
  const r = d.cli(args);
  if (r.status !== 0) throw new Error(`deltavol ${args.join(' ')} → ${r.status}\n${r.stdout}\n${r.stderr}\n${d.log().slice(-3000)}`);
  return r.stdout;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Replica equals primary (whole files), and the primary holds every acknowledged write. */
async function expectConverged(a: TestDaemon, b: TestDaemon, vol: string, w: SeededWriter, timeoutMs = 90_000): Promise<void> {
  await waitInSync(a, vol, timeoutMs);
  await expectVolumeEquals(a.nbdPort, vol, w.model, `primary ${vol} vs acknowledged writes`, w.uncertain);
  expect(sha256File(b.volumePath(vol)), 'replica equals primary').toBe(sha256File(a.volumePath(vol)));
}

describe('replication faults', () => {
  it('a stream that is truncated, reordered, duplicated and bit-flipped still converges', async () => {
    const seed = testSeed('replication-proxy');
    const rnd = prng(seed);
    const [a, b] = await Promise.all([daemon(), daemon()]);
    const proxy = await startFaultProxy({
      targetHost: '127.0.0.1',
      targetPort: b.replPort,
      seed,
      faults: { flipBitInData: 0.05, flipBitAnywhere: 0.01, duplicate: 0.05, reorder: 0.05, truncateAfterFrames: { min: 20, max: 200 } },
    });
    proxies.push(proxy);
    cli(a, ['volume', 'create', 'v', '--size', String(SIZE)]);
    const w = await SeededWriter.connect(a.nbdPort, 'v', SIZE, rnd);
    await w.batch(300);
    cli(a, ['replica', 'add', 'v', '--peer', `127.0.0.1:${proxy.port}`, '--cut-interval', '200ms', '--high-water', '2M', '--no-wait']);
    w.start(16, 5);
    await sleep(6000);
    await w.stop();
    const s = proxy.stats;
    console.log(`fault proxy: ${JSON.stringify(s)}`);
    expect(s.flipped + s.duplicated + s.reordered + s.truncated).toBeGreaterThan(5);
    // Faults stay on while the replica catches up, then the link heals.
    await sleep(2000);
    proxy.setFaults({});
    await expectConverged(a, b, 'v', w);
    expect(b.log()).toMatch(/delta set refused|chunk|replication frame failed|session started/);
    await w.close();
  }, 150_000);

  it('kill -9 of the sender mid-set, repeatedly, loses nothing', async () => {
    const seed = testSeed('replication-kill-sender');
    const rnd = prng(seed);
    const b = await daemon();
    let a = await daemon();
    const dataDir = a.dataDir;
    cli(a, ['volume', 'create', 'v', '--size', String(SIZE)]);
    const w = await SeededWriter.connect(a.nbdPort, 'v', SIZE, rnd);
    await w.batch(200);
    cli(a, ['replica', 'add', 'v', '--peer', `127.0.0.1:${b.replPort}`, '--cut-interval', '100ms', '--high-water', '1M', '--no-wait']);
    const kills = 5;
    for (let k = 0; k < kills; k++) {
      w.start(16, 0);
      await sleep(400 + rnd() * 1200);
      await a.kill();
      await w.stop().catch(() => undefined); // requests in flight at the kill are uncertain
      a = await startDaemon({ tmpfs: true, dataDir });
      daemons.push(a);
      w.reconnect(await MiniNbdClient.connect(a.nbdPort, 'v'));
    }
    await w.batch(50);
    await expectConverged(a, b, 'v', w);
    expect(a.log()).not.toMatch(/"level":50/);
    await w.close();
  }, 150_000);

  it('kill -9 of the receiver mid-playback, repeatedly, loses nothing and plays no set twice', async () => {
    const seed = testSeed('replication-kill-receiver');
    const rnd = prng(seed);
    const replPort = await freePort();
    const a = await daemon();
    let b = await daemon({ extraArgs: ['--repl-port', String(replPort)] });
    const dataDir = b.dataDir;
    cli(a, ['volume', 'create', 'v', '--size', String(SIZE)]);
    const w = await SeededWriter.connect(a.nbdPort, 'v', SIZE, rnd);
    await w.batch(200);
    cli(a, ['replica', 'add', 'v', '--peer', `127.0.0.1:${replPort}`, '--cut-interval', '100ms', '--high-water', '2M', '--retries', '50', '--no-wait']);
    w.start(16, 0);
    for (let k = 0; k < 5; k++) {
      await sleep(500 + rnd() * 1500);
      await b.kill();
      await sleep(rnd() * 500);
      b = await startDaemon({ tmpfs: true, dataDir, extraArgs: ['--repl-port', String(replPort)] });
      daemons.push(b);
    }
    await w.stop();
    await expectConverged(a, b, 'v', w);
    expect(b.log()).not.toMatch(/playback failed/);
    await w.close();
  }, 150_000);

  it('a link down for longer than the retry budget: failure-suspend, then it recovers by itself', async () => {
    const seed = testSeed('replication-link-cut');
    const rnd = prng(seed);
    const [a, b] = await Promise.all([daemon(), daemon()]);
    const port = await freePort();
    let proxy = await startFaultProxy({ targetHost: '127.0.0.1', targetPort: b.replPort, seed, listenPort: port });
    proxies.push(proxy);
    cli(a, ['volume', 'create', 'v', '--size', String(SIZE)]);
    const w = await SeededWriter.connect(a.nbdPort, 'v', SIZE, rnd);
    // --no-wait: the CLI runs synchronously in this process, which also runs the proxy.
    cli(a, ['replica', 'add', 'v', '--peer', `127.0.0.1:${port}`, '--cut-interval', '200ms', '--retries', '3', '--no-wait']);
    await waitStatus(a, 'v', (s) => s.replicas[0]!.state === 'duplex', 30_000, 'duplex');
    w.start(8, 10);
    await sleep(500);
    await proxy.close(); // the link is gone: connections refused
    const down = await waitStatus(a, 'v', (s) => s.replicas[0]!.state === 'failure-suspend', 30_000, 'failure-suspend');
    expect(down.replicas[0]!.reason).toBeTruthy();
    console.log(`link down: state ${down.replicas[0]!.state}, reason: ${down.replicas[0]!.reason}`);
    await sleep(1500); // writes go on while the pair is down, and nothing is refused
    expect(w.error).toBeNull();
    const during = await replStatus(a, 'v');
    expect(during.replicas[0]!.lagSeconds).toBeGreaterThan(0.5);
    proxy = await startFaultProxy({ targetHost: '127.0.0.1', targetPort: b.replPort, seed: seed + 1, listenPort: port });
    proxies.push(proxy);
    await waitStatus(a, 'v', (s) => s.replicas[0]!.connected, 30_000, 'link back up');
    await w.stop();
    await expectConverged(a, b, 'v', w);
    await w.close();
  }, 120_000);

  it('an outbound save area too small for the backlog: the pair falls back to its pending bitmap, writes never wait', async () => {
    const seed = testSeed('replication-outbound-full');
    const rnd = prng(seed);
    const replPort = await freePort();
    const a = await daemon({ extraArgs: ['--outbound-size', '4M'] });
    let b = await daemon({ extraArgs: ['--repl-port', String(replPort)] });
    cli(a, ['volume', 'create', 'v', '--size', String(SIZE)]);
    const w = await SeededWriter.connect(a.nbdPort, 'v', SIZE, rnd);
    cli(a, ['replica', 'add', 'v', '--peer', `127.0.0.1:${replPort}`, '--cut-interval', '100ms', '--high-water', '256K', '--retries', '2']);
    // While split nothing is cut: the change log accumulates (nobody would take a set).
    cli(a, ['replica', 'suspend', 'v']);
    for (let i = 0; i < 5; i++) await w.batch(32);
    await sleep(400);
    const split = await replStatus(a, 'v');
    expect(split.outbound.sets).toBe(0);
    expect(split.changedBlocksSinceCut).toBeGreaterThan(0);
    cli(a, ['replica', 'resume', 'v']);
    await waitInSync(a, 'v');
    // The replica goes away: sets are cut into the 4 MiB outbound area until it is full,
    // then the stalled pair is detached and what it misses goes to its pending bitmap.
    const dataDir = b.dataDir;
    await b.stop();
    const started = Date.now();
    for (let i = 0; i < 20; i++) await w.batch(32); // ~16 MiB of changes
    const writeMs = Date.now() - started;
    const full = await waitStatus(a, 'v', (s) => s.replicas[0]!.pendingBlocks > 0, 30_000, 'pair detached to its pending bitmap');
    console.log(`outbound with the replica away: ${JSON.stringify(full.outbound)}, pending blocks ${full.replicas[0]!.pendingBlocks}, state ${full.replicas[0]!.state}, writes took ${writeMs} ms`);
    expect(full.outbound.usedBytes).toBeLessThanOrEqual(full.outbound.capacityBytes);
    expect(a.log()).toMatch(/outbound save area full: stalled pair detached/);
    b = await daemon({ dataDir, extraArgs: ['--repl-port', String(replPort)] });
    w.start(8, 20); // and keep writing while it catches up
    await sleep(2000);
    await w.stop();
    await expectConverged(a, b, 'v', w);
    // The catch-up came in partial sets; the last one played makes it a point in time again.
    expect((await replStatus(b, 'v')).consistent).toBe(true);
    await w.close();
  }, 150_000);
});
