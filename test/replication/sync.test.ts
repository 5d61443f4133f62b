// Why: a pair in mode sync (issue 13) promises what an async pair cannot: a write whose
// reply went out is on the replica, so losing the primary loses no acknowledged write.
// Checked end to end with real daemons on loopback: after every acknowledged batch (with
// no cut in between: the cut interval is an hour) the replica reads exactly what was
// acknowledged; a kill -9 of the primary and a failover keep every acknowledged write; a
// replica that hangs (SIGSTOP) stops the stream after the timeout: `--fence never` keeps
// serving and catches up by itself, `--fence data` fails writes with EIO until the stream
// is back.
//
// Replay: DELTAVOL_SEED=<printed seed> npx vitest run test/replication/sync.test.ts

import fs from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { startDaemon, freePort, type TestDaemon } from '../helpers/daemon.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import { prng, testSeed } from '../helpers/seed.js';
import { cliOk, cliOkAsync, expectVolumeEquals, FollowingWriter, replStatus, SeededWriter, waitStatus, type PrimaryStatusJson } from '../helpers/replication.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;

const daemons: TestDaemon[] = [];
const dirs: string[] = [];
afterAll(async () => {
  for (const d of daemons) if (!d.exited) d.proc.kill('SIGCONT');
  await Promise.all(daemons.splice(0).map((d) => d.dispose()));
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

async function daemon(): Promise<TestDaemon> {
  const d = await startDaemon({ tmpfs: true });
  daemons.push(d);
  return d;
}

const cli = cliOk;
const cliAsync = cliOkAsync;

interface SyncJson {
  stream: string;
  inSync: boolean;
  fence: string;
  unacknowledged: number;
  lastBreak: { reason: string } | null;
  writes: number;
  breaks: number;
  starts: number;
  refused: number;
  failed: number;
  latency: { p50Us: number; p99Us: number } | null;
}
const syncOf = (s: PrimaryStatusJson, i = 0) => (s.replicas[i] as unknown as { sync: SyncJson }).sync;

function waitStreaming(d: TestDaemon, volume: string, timeoutMs = 30_000): Promise<PrimaryStatusJson> {
  return waitStatus(d, volume, (s) => s.replicas.length > 0 && syncOf(s)?.stream === 'streaming', timeoutMs, `${volume}: sync stream up`);
}

describe('synchronous replication over loopback', () => {
  it('an acknowledged write is on the replica at once; kill -9 of the primary loses none of them', async () => {
    const seed = testSeed('replication-sync');
    const rnd = prng(seed);
    const a = await daemon();
    const b = await daemon();
    cli(a, ['volume', 'create', 'v', '--size', String(SIZE)]);
    const w = await SeededWriter.connect(a.nbdPort, 'v', SIZE, rnd);
    await w.batch(100); // data before the pair: the initial copy moves it
    // No cut for an hour: anything on the replica came by the stream.
    const add = JSON.parse(cli(a, ['replica', 'add', 'v', '--peer', `127.0.0.1:${b.replPort}`, '--mode', 'sync', '--cut-interval', '1h', '--high-water', '1G', '--json'])) as { state: string };
    expect(['duplex', 'duplex-pending']).toContain(add.state);
    await waitStreaming(a, 'v');
    const replicaReader = await MiniNbdClient.connect(b.nbdPort, 'v');
    for (let round = 0; round < 8; round++) {
      await w.batch(24);
      // Every acknowledged write reads back from the replica now, with no cut in between.
      for (let off = 0; off < SIZE; off += 4 * MiB) {
        const r = await replicaReader.read(off, 4 * MiB);
        expect(r.error).toBe(0);
        expect(r.data.equals(w.model.subarray(off, off + 4 * MiB)), `round ${round}: replica lacks an acknowledged write near ${off} (seed ${seed})`).toBe(true);
      }
    }
    // FUA and FLUSH are answered (durable on both sides).
    const c = await MiniNbdClient.connect(a.nbdPort, 'v');
    const fuaData = Buffer.alloc(8192, 0x5a);
    expect((await c.write(SIZE - 8192, fuaData, true)).error).toBe(0);
    fuaData.copy(w.model, SIZE - 8192);
    expect((await c.flush()).error).toBe(0);
    // A write larger than one stream frame (16 MiB) travels in pieces and is acknowledged whole.
    const big = Buffer.alloc(20 * MiB);
    for (let i = 0; i < big.length; i += 4) big.writeUInt32LE((rnd() * 2 ** 32) >>> 0, i);
    expect((await c.write(4 * MiB, big)).error).toBe(0);
    big.copy(w.model, 4 * MiB);
    await c.disconnect();
    const rb = await replicaReader.read(4 * MiB, 20 * MiB);
    expect(rb.data.equals(big), 'a 20 MiB write is on the replica when acknowledged').toBe(true);
    const s = await replStatus(a, 'v');
    const sync = syncOf(s);
    expect(sync.stream).toBe('streaming');
    expect(sync.writes).toBeGreaterThan(100);
    expect(sync.breaks).toBe(0);
    expect(s.replicas[0]!.playedSet).toBeLessThan(s.currentSet + 1);
    const metrics = await a.metrics();
    expect(metrics).toMatch(/deltavol_replication_sync_in_sync\{[^}]*fence="never"[^}]*\} 1/);
    expect(metrics).toMatch(/deltavol_replication_sync_writes_total\{[^}]*\} [1-9]/);
    console.log(`sync pair: ${sync.writes} writes streamed, replica round trip p50 ${sync.latency?.p50Us} µs p99 ${sync.latency?.p99Us} µs`);

    // Writes under way when the primary dies: the acknowledged ones are all on the replica.
    w.start(16);
    await new Promise((r) => setTimeout(r, 400));
    await a.kill();
    await w.stop().catch(() => undefined); // requests in flight fail: their sectors are uncertain
    await replicaReader.disconnect();
    await new Promise((r) => setTimeout(r, 3000)); // the primary's silence lets failover go without --force
    const fo = JSON.parse(cli(b, ['failover', 'v', '--json'])) as { generation: number; report: { bytesAtMost: number } };
    expect(fo.generation).toBe(2);
    await expectVolumeEquals(b.nbdPort, 'v', w.model, `new primary vs every acknowledged write (seed ${seed})`, w.uncertain);

    // The old primary returns, is fenced, resyncs: the pair in the other direction is sync too.
    daemons.splice(daemons.indexOf(a), 1);
    dirs.push(a.dataDir);
    const a2 = await startDaemon({ tmpfs: true, dataDir: a.dataDir });
    daemons.push(a2);
    await waitStatus(a2, 'v', (s) => s.state === 'fenced', 20_000, 'old primary fenced');
    cli(a2, ['resync', 'v', '--json']);
    const back = await waitStatus(b, 'v', (s) => s.replicas.length === 1 && syncOf(s)?.stream === 'streaming', 60_000, 'the resynced pair streams (sync kept across the failover)');
    expect((back.replicas[0] as unknown as { mode: string }).mode).toBe('sync');
    const bc = await MiniNbdClient.connect(b.nbdPort, 'v');
    const now = (await bc.read(0, SIZE)).data;
    await bc.disconnect();
    const wb = new SeededWriter(await MiniNbdClient.connect(b.nbdPort, 'v'), SIZE, rnd, SIZE, Buffer.from(now));
    await wb.batch(40);
    await wb.close();
    await expectVolumeEquals(a2.nbdPort, 'v', wb.model, `the old primary, now a sync replica, right after the writes (seed ${seed})`);
  }, 120_000);

  it('a hung replica: fence never keeps serving and catches up by itself; fence data fails writes with EIO', async () => {
    const seed = testSeed('replication-sync-fence');
    const rnd = prng(seed);
    const a = await daemon();
    const b = await daemon();
    for (const [name, fence] of [
      ['never', 'never'],
      ['data', 'data'],
    ] as const) {
      cli(a, ['volume', 'create', name, '--size', String(SIZE)]);
      cli(a, ['replica', 'add', name, '--peer', `127.0.0.1:${b.replPort}`, '--mode', 'sync', '--fence', fence, '--sync-timeout', '500ms', '--cut-interval', '1h']);
    }
    await waitStreaming(a, 'never');
    await waitStreaming(a, 'data');
    const wNever = await SeededWriter.connect(a.nbdPort, 'never', SIZE, rnd);
    const cData = await MiniNbdClient.connect(a.nbdPort, 'data');
    await wNever.batch(20);
    const ok = Buffer.alloc(4096, 1);
    expect((await cData.write(0, ok)).error).toBe(0);

    b.proc.kill('SIGSTOP'); // the replica hangs: no RST, no acknowledgement
    try {
      const t0 = Date.now();
      const first = wNever.batch(20); // waits out the timeout once, then goes on
      // A cut while the stream still counts as up: a set without data whose barrier the
      // replica never acknowledges; its blocks must reach the replica in a catch-up set.
      await new Promise((r) => setTimeout(r, 50)); // the batch's writes reach the primary
      const cutWhileHung = await a.api<{ set: number | null }>('POST', '/v1/volumes/never/cut', {});
      expect(cutWhileHung.set).not.toBeNull();
      const hungSets = (await replStatus(a, 'never')).replicas[0]!.sets as unknown as { set: number; bytes: number }[];
      expect(hungSets.find((x) => x.set === cutWhileHung.set)?.bytes, 'a set cut while streaming carries no data').toBe(0);
      await first;
      const waited = Date.now() - t0;
      expect(waited).toBeLessThan(5000);
      await wNever.batch(20);
      // EIO: the write sent before the timeout fails, and the ones after are refused before they change anything.
      expect((await cData.write(4096, ok)).error).toBe(5);
      expect((await cData.write(4096, ok)).error).toBe(5);
      const never = syncOf(await replStatus(a, 'never'));
      expect(never.stream).not.toBe('streaming');
      expect(never.lastBreak?.reason).toMatch(/did not acknowledge within 500 ms|link down/);
      const data = syncOf(await replStatus(a, 'data'));
      expect(data.refused).toBeGreaterThan(0);
      console.log(`hung replica: the first write batch waited ${waited} ms; never: ${never.lastBreak?.reason}`);
    } finally {
      b.proc.kill('SIGCONT');
    }
    // Back by itself: caught up by sets, streaming again; writes of fence data work again.
    await waitStreaming(a, 'never', 60_000);
    await waitStreaming(a, 'data', 60_000);
    await wNever.batch(20);
    expect((await cData.write(8192, ok)).error).toBe(0);
    await wNever.close();
    await cData.disconnect();
    // What was acknowledged without the replica travelled in sets: after a cut played, equal.
    const cut = JSON.parse(cli(a, ['replica', 'cut', 'never', '--json'])) as { set: number | null };
    if (cut.set !== null) await waitStatus(a, 'never', (s) => s.replicas[0]!.playedSet >= cut.set!, 30_000, 'the cut played');
    await expectVolumeEquals(b.nbdPort, 'never', wNever.model, `fence never: replica after catching up (seed ${seed})`);
  }, 120_000);

  it('a sync pair beside an async one: a restart point equal on all three; planned swaps of the sync pair under a writer lose nothing', async () => {
    const seed = testSeed('replication-sync-mixed');
    const rnd = prng(seed);
    const a = await daemon();
    const b = await daemon();
    const c = await daemon();
    cli(a, ['volume', 'create', 'm', '--size', String(SIZE)]);
    cli(a, ['replica', 'add', 'm', '--peer', `127.0.0.1:${b.replPort}`, '--mode', 'sync', '--cut-interval', '300ms']);
    cli(a, ['replica', 'add', 'm', '--peer', `127.0.0.1:${c.replPort}`, '--cut-interval', '300ms']);
    await waitStreaming(a, 'm');
    const w = await SeededWriter.connect(a.nbdPort, 'm', SIZE, rnd);
    for (let round = 0; round < 4; round++) {
      await w.batch(24);
      await expectVolumeEquals(b.nbdPort, 'm', w.model, `round ${round}: the sync replica right after the batch (seed ${seed})`);
    }
    // Sets carry data for the async pair while the sync one streams.
    const mixed = await replStatus(a, 'm');
    expect(mixed.replicas.map((p) => (p as unknown as { mode: string }).mode).sort()).toEqual(['async', 'sync']);
    // A restart point: the primary's snapshot at the cut equals both replicas' snapshots of that set.
    const cut = JSON.parse(cli(a, ['replica', 'cut', 'm', '--snapshot', 'p1', '--json'])) as { set: number };
    for (const d of [b, c]) {
      await waitStatus(a, 'm', (s) => s.replicas.every((p) => p.playedSet >= cut.set), 30_000, 'both replicas played the cut');
      const snap = JSON.parse(cli(d, ['snapshot', 'create', 'm', 'r1', '--json'])) as { deltaSetNumber: number };
      expect(snap.deltaSetNumber).toBe(cut.set);
      const x = await MiniNbdClient.connect(a.nbdPort, 'm@p1');
      const y = await MiniNbdClient.connect(d.nbdPort, 'm@r1');
      const [rx, ry] = await Promise.all([x.read(0, SIZE), y.read(0, SIZE)]);
      expect(ry.data.equals(rx.data), `restart point p1 vs ${d === b ? 'sync' : 'async'} replica's r1`).toBe(true);
      await x.disconnect();
      await y.disconnect();
    }
    await w.close();
    cli(a, ['replica', 'remove', 'm', `127.0.0.1:${c.replPort}`]);

    // Planned swaps with the sync pair under a writer that follows the primary.
    const fw = new FollowingWriter([a, b], 'm', SIZE, rnd, { initial: w.model });
    await fw.start();
    await new Promise((r) => setTimeout(r, 1000));
    fw.takeGap();
    const sw = JSON.parse(await cliAsync(b, ['failover', 'm', '--sync', '--json'])) as { generation: number; rtoMs: number };
    await new Promise((r) => setTimeout(r, 1000));
    const gap1 = fw.takeGap();
    const reverse = await waitStreaming(b, 'm');
    expect((reverse.replicas[0] as unknown as { mode: string }).mode).toBe('sync');
    fw.takeGap();
    const fb = JSON.parse(await cliAsync(a, ['failback', 'm', '--json'])) as { generation: number; rtoMs: number };
    await new Promise((r) => setTimeout(r, 1000));
    const gap2 = fw.takeGap();
    await fw.stop();
    const { model, acked, target } = fw;
    expect(sw.generation).toBe(2);
    expect(fb.generation).toBe(3);
    expect(target).toBe(a);
    console.log(`sync pair, planned swaps under a writer: failover --sync rto ${sw.rtoMs} ms, failback rto ${fb.rtoMs} ms; longest gap between acknowledged writes ${gap1} / ${gap2} ms; ${acked} writes`);
    await waitStreaming(a, 'm');
    await expectVolumeEquals(a.nbdPort, 'm', model, `primary after two planned swaps (seed ${seed})`);
    await expectVolumeEquals(b.nbdPort, 'm', model, `sync replica after two planned swaps (seed ${seed})`);
    expect(Math.max(gap1, gap2)).toBeLessThan(10_000);
  }, 120_000);

  it('refuses bad sync settings with clear errors', async () => {
    const a = await daemon();
    const port = await freePort();
    cli(a, ['volume', 'create', 'x', '--size', '1M']);
    const bad = (args: string[], re: RegExp) => {
      const r = a.cli(['replica', 'add', 'x', '--peer', `127.0.0.1:${port}`, '--no-wait', ...args]);
      expect(r.status).not.toBe(0);
      expect(r.stderr).toMatch(re);
    };
    bad(['--mode', 'semi'], /mode must be async or sync/);
    bad(['--mode', 'sync', '--fence', 'maybe'], /fence must be never or data/);
    bad(['--mode', 'sync', '--sync-timeout', '10s'], /sync timeout must be/);
    bad(['--fence', 'data'], /sync pairs only/);
    cli(a, ['replica', 'add', 'x', '--peer', `127.0.0.1:${port}`, '--mode', 'sync', '--no-wait']);
    bad(['--mode', 'sync', '--as', 'x2'], /one sync replica per volume/);
  }, 60_000);
});
