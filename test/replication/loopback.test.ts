// Why: the promise of replication (issue 5, DESIGN.md "Delta sets", "Replica"), checked
// end to end with two real daemons on loopback: a replica added while the primary is
// being written (initial copy by snapshot, then delta sets) ends byte for byte equal to
// the primary; a snapshot cut on the primary at set n equals the replica's snapshot
// stamped n; a primary fans out to two replicas; a volume with data and snapshots can be
// paired later; an operator split lets the replica be written and resume undoes those
// writes; readers of the replica never see half a set; a stale generation is refused.
//
// Replay: DELTAVOL_SEED=<printed seed> npx vitest run test/replication/loopback.test.ts

import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import { prng, testSeed } from '../helpers/seed.js';
import { encodeFrame, FrameDecoder, type ReplMessage } from '../../src/replication/wire.js';
import { expectVolumeEquals, replStatus, SeededWriter, sha256File, waitInSync, waitStatus } from '../helpers/replication.js';

const MiB = 1024 * 1024;

describe('replication over loopback', () => {
  let a: TestDaemon;
  let b: TestDaemon;
  const seed = testSeed('replication-loopback');
  const rnd = prng(seed);

  beforeAll(async () => {
    [a, b] = await Promise.all([startDaemon({ tmpfs: true }), startDaemon({ tmpfs: true })]);
  });
  afterAll(async () => {
    await Promise.all([a?.dispose(), b?.dispose()]);
  });

  const cli = (d: TestDaemon, args: string[]) => {
    const r = d.cli(args);
    if (r.status !== 0) throw new Error(`deltavol ${args.join(' ')} → ${r.status}\n${r.stdout}\n${r.stderr}`);
    return r.stdout;
  };

  it('a replica added under write load ends equal to the primary; snapshots at a cut match', async () => {
    const size = 64 * MiB;
    cli(a, ['volume', 'create', 'v1', '--size', String(size)]);
    const w = await SeededWriter.connect(a.nbdPort, 'v1', size, rnd);
    await w.batch(200); // data before the pair exists
    w.start(16, 2);
    // Writes continue through the initial copy and the first sets.
    const add = JSON.parse(cli(a, ['replica', 'add', 'v1', '--peer', `127.0.0.1:${b.replPort}`, '--cut-interval', '300ms', '--json'])) as { state: string };
    expect(['duplex', 'duplex-pending']).toContain(add.state);
    await new Promise((r) => setTimeout(r, 1500));
    await w.stop();
    const s = await waitInSync(a, 'v1');
    expect(s.replicas[0]!.lagSeconds).toBe(0);
    expect((await replStatus(b, 'v1')).consistent).toBe(true);
    expect(sha256File(b.volumePath('v1'))).toBe(sha256File(a.volumePath('v1')));
    await expectVolumeEquals(b.nbdPort, 'v1', w.model, 'replica vs acknowledged writes');

    // A snapshot at a cut on the primary equals the replica snapshot stamped with that set.
    // No writes between the cut and the replica's snapshot: set n is the last one.
    await w.batch(50);
    const cut = JSON.parse(cli(a, ['replica', 'cut', 'v1', '--snapshot', 'p1', '--json'])) as { set: number };
    expect(cut.set).toBeGreaterThan(0);
    await waitStatus(a, 'v1', (x) => x.replicas[0]!.playedSet >= cut.set, 30_000, 'replica played the cut set');
    const snap = JSON.parse(cli(b, ['snapshot', 'create', 'v1', 'r1', '--json'])) as { deltaSetNumber: number };
    expect(snap.deltaSetNumber).toBe(cut.set);
    const pSnap = (JSON.parse(cli(a, ['snapshot', 'list', 'v1', '--json'])) as { name: string; deltaSetNumber: number }[]).find((x) => x.name === 'p1')!;
    expect(pSnap.deltaSetNumber).toBe(cut.set);
    await w.batch(100); // changes after the cut reach neither snapshot
    await waitInSync(a, 'v1');
    const ca = await MiniNbdClient.connect(a.nbdPort, 'v1@p1');
    const cb = await MiniNbdClient.connect(b.nbdPort, 'v1@r1');
    for (let off = 0; off < size; off += 4 * MiB) {
      const [x, y] = await Promise.all([ca.read(off, 4 * MiB), cb.read(off, 4 * MiB)]);
      expect(x.error + y.error).toBe(0);
      expect(y.data.equals(x.data), `snapshot p1 vs r1 at ${off}`).toBe(true);
    }
    await ca.disconnect();
    await cb.disconnect();
    const listed = JSON.parse(cli(b, ['snapshot', 'list', 'v1', '--json'])) as { name: string; deltaSetNumber: number }[];
    for (const sn of listed) expect(sn.deltaSetNumber).toBeGreaterThan(0);
    await waitInSync(a, 'v1');
    expect(sha256File(b.volumePath('v1'))).toBe(sha256File(a.volumePath('v1')));
    await w.close();
  }, 120_000);

  it('the replica is read-only to clients, and a stale generation is refused', async () => {
    const c = await MiniNbdClient.connect(b.nbdPort, 'v1');
    const r = await c.write(0, Buffer.alloc(4096, 1));
    expect(r.error).toBe(1); // EPERM
    await c.disconnect();
    // The same pair with an older generation than the replica's (1) is fenced at hello.
    const pairId = (await replStatus(a, 'v1')).replicas[0]!.id;
    const msgs = await talk(b.replPort, {
      t: 'hello',
      protocol: 2,
      pairId,
      primaryVolume: 'old',
      replicaVolume: 'v1',
      generation: 0,
      sizeBytes: 64 * MiB,
      blockBytes: 4096,
      create: false,
      description: '',
      returnHost: '',
      returnPort: 0,
    });
    expect(msgs[0]).toMatchObject({ t: 'refuse', code: 'STALE_GENERATION' });
    // Another pair cannot take the replica over.
    const other = await talk(b.replPort, { t: 'hello', protocol: 2, pairId: 'not-mine', primaryVolume: 'v9', replicaVolume: 'v1', generation: 1, sizeBytes: 64 * MiB, blockBytes: 4096, create: true, description: '', returnHost: '', returnPort: 0 });
    expect(other[0]).toMatchObject({ t: 'refuse', code: 'VOLUME_EXISTS' });
  });

  it('a replica name taken on the peer is refused at once, with the reason', async () => {
    cli(b, ['volume', 'create', 'taken', '--size', '16M']);
    cli(a, ['volume', 'create', 'v4', '--size', '16M']);
    const r = a.cli(['replica', 'add', 'v4', '--peer', `127.0.0.1:${b.replPort}`, '--as', 'taken', '--timeout', '30s']);
    expect(r.status, r.stderr).toBe(5);
    expect(r.stderr).toMatch(/replica refused: VOLUME_EXISTS: volume taken exists on this node and is not a replica/);
    const s = await replStatus(a, 'v4');
    expect(s.replicas[0]!.state).toBe('failure-suspend');
    cli(a, ['replica', 'remove', 'v4', 'taken']);
    expect((await replStatus(a, 'v4')).role).toBe('simplex');
    // Replicated volumes cannot be resized; a primary with replicas is deleted only with --force.
    expect(a.cli(['volume', 'resize', 'v1', '--size', '128M']).status).toBe(5);
    expect(a.cli(['volume', 'delete', 'v1']).status).toBe(5);
  }, 60_000);

  it('fans out to two replicas, pairs a volume that already has data and snapshots', async () => {
    const size = 32 * MiB;
    cli(a, ['volume', 'create', 'v2', '--size', String(size)]);
    const w = await SeededWriter.connect(a.nbdPort, 'v2', size, rnd);
    await w.batch(300);
    cli(a, ['snapshot', 'create', 'v2', 'old']);
    await w.batch(100);
    cli(a, ['replica', 'add', 'v2', '--peer', `127.0.0.1:${b.replPort}`, '--as', 'v2-one', '--cut-interval', '200ms']);
    w.start(8, 5);
    cli(a, ['replica', 'add', 'v2', '--peer', `127.0.0.1:${b.replPort}`, '--as', 'v2-two', '--cut-interval', '200ms']);
    await new Promise((r) => setTimeout(r, 1000));
    await w.stop();
    const s = await waitInSync(a, 'v2');
    expect(s.replicas.map((p) => p.state)).toEqual(['duplex', 'duplex']);
    const want = sha256File(a.volumePath('v2'));
    expect(sha256File(b.volumePath('v2-one'))).toBe(want);
    expect(sha256File(b.volumePath('v2-two'))).toBe(want);
    // The base snapshots of the initial copies are gone; the user's snapshot stays.
    const snaps = JSON.parse(cli(a, ['snapshot', 'list', 'v2', '--json'])) as { name: string }[];
    expect(snaps.map((x) => x.name)).toEqual(['old']);
    // Adding the same replica twice is refused; removing one leaves the other replicating.
    expect(a.cli(['replica', 'add', 'v2', '--peer', `127.0.0.1:${b.replPort}`, '--as', 'v2-one', '--no-wait']).status).toBe(5);
    cli(a, ['replica', 'remove', 'v2', 'v2-two']);
    await w.batch(50);
    const s2 = await waitInSync(a, 'v2');
    expect(s2.replicas.length).toBe(1);
    // The same numbers for people and for Prometheus.
    const table = cli(a, ['status', 'v2']);
    expect(table).toMatch(/v2\s+primary\s+v2-one@127\.0\.0\.1:\d+\s+duplex\s+1\s/);
    const metrics = await a.metrics();
    expect(metrics).toMatch(/deltavol_replication_pair_state\{volume="v2",pair="[0-9a-f]+",peer="[^"]+",remote_volume="v2-one",state="duplex"\} 1/);
    expect(metrics).toMatch(/deltavol_replication_lag_seconds\{volume="v2",[^}]*remote_volume="v2-one"\} 0\n/);
    const rmetrics = await b.metrics();
    expect(rmetrics).toMatch(/deltavol_replica_played_set\{volume="v2-one",primary_volume="v2"\} \d+/);
    expect(sha256File(b.volumePath('v2-one'))).toBe(sha256File(a.volumePath('v2')));
    // The replica volume is deleted on the peer: the pair notices at its next hello and
    // copies everything again from a new base snapshot.
    cli(b, ['volume', 'delete', 'v2-one', '--force']);
    await w.batch(30);
    for (let i = 0; i < 200 && !/the replica has lost its copy/.test(a.log()); i++) await new Promise((r) => setTimeout(r, 100));
    expect(a.log()).toMatch(/the replica has lost its copy: initial copy starts again/);
    await waitInSync(a, 'v2');
    expect(sha256File(b.volumePath('v2-one'))).toBe(sha256File(a.volumePath('v2')));
    await w.close();
  }, 120_000);

  it('split: the replica becomes writable; resume ships only the differences and undoes replica writes', async () => {
    const w = await SeededWriter.connect(a.nbdPort, 'v1', 64 * MiB, rnd);
    cli(a, ['replica', 'suspend', 'v1']);
    const st = await replStatus(a, 'v1');
    expect(st.replicas[0]!.state).toBe('suspend');
    await waitStatus(b, 'v1', (x) => x.state === 'suspend', 10_000, 'replica split');
    // Both sides write while split.
    await w.batch(100);
    const rw = await MiniNbdClient.connect(b.nbdPort, 'v1');
    expect((await rw.write(8 * MiB, Buffer.alloc(64 * 1024, 0x5a))).error).toBe(0);
    expect((await rw.write(40 * MiB + 512, Buffer.alloc(1024, 0xa5))).error).toBe(0);
    await rw.disconnect();
    const sentBefore = (await replStatus(a, 'v1')).replicas[0]!.bytesSent;
    cli(a, ['replica', 'resume', 'v1']);
    await waitInSync(a, 'v1');
    expect(sha256File(b.volumePath('v1'))).toBe(sha256File(a.volumePath('v1')));
    // Only the differences travelled: the changed blocks, not the 64 MiB volume.
    const sent = (await replStatus(a, 'v1')).replicas[0]!.bytesSent - sentBefore;
    expect(sent).toBeLessThan(16 * MiB);
    const ro = await MiniNbdClient.connect(b.nbdPort, 'v1');
    expect((await ro.write(0, Buffer.alloc(4096))).error).toBe(1);
    await ro.disconnect();
    await w.close();
  }, 60_000);

  it('a restart point cut over a backlog larger than one set still means byte equality', async () => {
    // Issue 9's reproduction: 80 MiB changed while split, then `cut --snapshot`: the
    // first 64 MiB travel as a partial set, the snapshot goes with the set that carries
    // the rest, and the replica that has played that set equals the snapshot.
    const size = 128 * MiB;
    cli(a, ['volume', 'create', 'v5', '--size', String(size)]);
    cli(a, ['replica', 'add', 'v5', '--peer', `127.0.0.1:${b.replPort}`, '--cut-interval', '1h']);
    cli(a, ['replica', 'suspend', 'v5']);
    const wc = await MiniNbdClient.connect(a.nbdPort, 'v5');
    const piece = Buffer.alloc(MiB);
    for (let off = 0; off < 80 * MiB; off += MiB) {
      for (let i = 0; i < MiB; i += 4) piece.writeUInt32LE((rnd() * 2 ** 32) >>> 0, i);
      expect((await wc.write(off, piece)).error).toBe(0);
    }
    const cut = JSON.parse(cli(a, ['replica', 'cut', 'v5', '--snapshot', 's1', '--json'])) as { set: number };
    const sets = (await replStatus(a, 'v5')).replicas[0]!.sets;
    expect(sets.find((x) => x.set === cut.set)!.partial).toBe(false);
    expect(sets.some((x) => x.set < cut.set && x.partial)).toBe(true); // the backlog went first
    cli(a, ['replica', 'resume', 'v5']);
    await waitInSync(a, 'v5', 90_000);
    const snap = JSON.parse(cli(b, ['snapshot', 'create', 'v5', 'r1', '--json'])) as { deltaSetNumber: number };
    expect(snap.deltaSetNumber).toBe(cut.set);
    // Writes after the restart point reach the volumes but neither snapshot.
    expect((await wc.write(0, Buffer.alloc(MiB, 7))).error).toBe(0);
    cli(a, ['replica', 'cut', 'v5']);
    await waitInSync(a, 'v5');
    const ca = await MiniNbdClient.connect(a.nbdPort, 'v5@s1');
    const cb = await MiniNbdClient.connect(b.nbdPort, 'v5@r1');
    for (let off = 0; off < size; off += 4 * MiB) {
      const [x, y] = await Promise.all([ca.read(off, 4 * MiB), cb.read(off, 4 * MiB)]);
      expect(x.error + y.error).toBe(0);
      expect(y.data.equals(x.data), `restart point s1 vs replica snapshot r1 at ${off}`).toBe(true);
    }
    await Promise.all([ca.disconnect(), cb.disconnect(), wc.disconnect()]);
  }, 120_000);

  it('readers of the replica never see half a delta set', async () => {
    // Every block of a 2 MiB region carries the number of the round that wrote it; each
    // round rewrites the whole region, then cuts: set k holds round k everywhere.
    const size = 16 * MiB;
    cli(a, ['volume', 'create', 'v3', '--size', String(size)]);
    cli(a, ['replica', 'add', 'v3', '--peer', `127.0.0.1:${b.replPort}`, '--cut-interval', '1h']);
    const region = 2 * MiB;
    const wc = await MiniNbdClient.connect(a.nbdPort, 'v3');
    const rc = await MiniNbdClient.connect(b.nbdPort, 'v3');
    let stop = false;
    let reads = 0;
    const seen = new Set<number>();
    const reader = (async () => {
      while (!stop) {
        const r = await rc.read(0, region);
        const first = r.data.readUInt32LE(0);
        for (let off = 0; off < region; off += 4096) {
          const v = r.data.readUInt32LE(off);
          if (v !== first) throw new Error(`torn read: block 0 has round ${first}, block ${off / 4096} has round ${v}`);
        }
        seen.add(first);
        reads++;
      }
    })();
    const rounds = 12;
    for (let k = 1; k <= rounds; k++) {
      const data = Buffer.alloc(region);
      for (let off = 0; off < region; off += 4096) data.writeUInt32LE(k, off);
      // Written in pieces, out of order, so a torn set would be visible.
      const pieces = [];
      for (let off = 0; off < region; off += 256 * 1024) pieces.push(off);
      pieces.sort(() => rnd() - 0.5);
      for (const off of pieces) expect((await wc.write(off, data.subarray(off, off + 256 * 1024))).error).toBe(0);
      cli(a, ['replica', 'cut', 'v3']);
      await new Promise((r) => setTimeout(r, 30 + rnd() * 60));
    }
    await waitInSync(a, 'v3');
    stop = true;
    await reader;
    expect(reads).toBeGreaterThan(10);
    expect(seen.has(rounds)).toBe(true);
    console.log(`replica reader: ${reads} reads of 2 MiB, rounds seen ${[...seen].sort((x, y) => x - y).join(',')}`);
    await wc.disconnect();
    await rc.disconnect();
  }, 90_000);
});

/** Sends one message on a fresh replication connection; collects replies until it closes. */
async function talk(port: number, msg: ReplMessage): Promise<ReplMessage[]> {
  const out: ReplMessage[] = [];
  await new Promise<void>((resolve) => {
    const s = net.connect(port, '127.0.0.1', () => {
      for (const p of encodeFrame(msg)) s.write(p);
    });
    const d = new FrameDecoder((f) => out.push(f.msg));
    s.on('data', (c: Buffer) => d.push(c));
    s.on('close', () => resolve());
    s.on('error', () => resolve());
    setTimeout(() => s.destroy(), 5000).unref();
  });
  return out;
}
