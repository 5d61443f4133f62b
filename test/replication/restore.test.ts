// Why: restoring a primary from its replica (seed 003, issue 13) is what an operator runs
// after ransomware or a bad script wrote over the primary: it must bring back exactly the
// replica's snapshot (or current state), move only the blocks that differ, keep the damaged
// state in a local snapshot, refuse while clients are connected unless forced, refuse
// client writes while it runs, survive a crash of the primary in the middle, and leave the
// pair converging to the restored content. Two real daemons on loopback, whole-volume
// comparisons against models of what was acknowledged.
//
// Replay: DELTAVOL_SEED=<printed seed> npx vitest run test/replication/restore.test.ts

import { afterAll, describe, expect, it } from 'vitest';
import type { TestDaemon } from '../helpers/daemon.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import { prng, testSeed } from '../helpers/seed.js';
import { blocksDiffering, cliOk, DaemonFleet, type DaemonPorts, expectVolumeEquals, freePorts, replStatus, SeededWriter, waitInSync, waitStatus } from '../helpers/replication.js';

const MiB = 1024 * 1024;
const BS = 4096;

const fleet = new DaemonFleet();
afterAll(() => fleet.dispose());
const ports = freePorts;
/** A daemon on fixed ports (so it can be restarted at the same address), data on tmpfs. */
const daemon = (p: DaemonPorts, dataDir?: string): Promise<TestDaemon> => fleet.start(p, dataDir);


/** Overwrites `count` distinct random blocks with random bytes (as ransomware would); returns them. */
async function damage(port: number, model: Buffer, count: number, rnd: () => number): Promise<Set<number>> {
  const c = await MiniNbdClient.connect(port, 'v');
  const blocks = new Set<number>();
  const total = model.length / BS;
  while (blocks.size < count) blocks.add(Math.floor(rnd() * total));
  const ops: Promise<unknown>[] = [];
  for (const b of blocks) {
    const data = Buffer.allocUnsafe(BS);
    for (let i = 0; i < BS; i += 4) data.writeUInt32LE((rnd() * 0xffffffff) >>> 0, i);
    data.copy(model, b * BS);
    ops.push(c.write(b * BS, data).then((r) => expect(r.error).toBe(0)));
  }
  await Promise.all(ops);
  expect((await c.flush()).error).toBe(0);
  await c.disconnect();
  return blocks;
}

interface RestoreDone {
  state: string;
  snapshot: string;
  temporary: boolean;
  beforeSnapshot: string;
  blocksToCopy: number;
  blocksChangedOnReplica: number;
  blocksChangedHere: number;
  blocksDone: number;
  bytesFetched: number;
  bytesZeroed: number;
  seconds: number;
  resumed: boolean;
}

describe('restore of a primary from its replica (seed 003)', () => {
  it.each(['async', 'sync'])('ransomware: back to a replica snapshot taken before the damage, moving only the damaged blocks (%s pair)', async (mode) => {
    const seed = testSeed(`restore-snapshot-${mode}`);
    const rnd = prng(seed);
    const SIZE = 32 * MiB;
    const pa = await ports();
    const pb = await ports();
    const a = await daemon(pa);
    const b = await daemon(pb);
    cliOk(a, ['volume', 'create', 'v', '--size', String(SIZE)]);
    const w = await SeededWriter.connect(a.nbdPort, 'v', SIZE, rnd);
    await w.batch(300);
    // (A sync pair streams every write: its sets carry no data, the replica has each write at once.)
    cliOk(a, ['replica', 'add', 'v', '--peer', `127.0.0.1:${pb.repl}`, '--cut-interval', '1h', '--high-water', '1G', '--mode', mode]);
    await waitInSync(a, 'v');
    // The replica's snapshot before the damage (taken on the replica's node).
    cliOk(b, ['snapshot', 'create', 'v', 'clean']);
    const clean = Buffer.from(w.model);
    // Legitimate writes after it, shipped and played (the restore takes them back too).
    await w.batch(40);
    await w.close();
    // The damage: part of it shipped to the replica, part not yet cut (a sync pair has it all).
    const shipped = await damage(a.nbdPort, w.model, 120, rnd);
    cliOk(a, ['replica', 'cut', 'v']);
    await waitInSync(a, 'v');
    const unshipped = await damage(a.nbdPort, w.model, 80, rnd);
    const damaged = Buffer.from(w.model);
    const differ = blocksDiffering(clean, damaged);
    expect(differ.size).toBeGreaterThanOrEqual(shipped.size); // (the two damages may overlap)

    // Refused while a client is connected, unless forced.
    const held = await MiniNbdClient.connect(a.nbdPort, 'v');
    const busy = a.cli(['restore', 'v', '--from-replica', '--snapshot', 'clean']);
    expect(busy.status, busy.stderr).toBe(5);
    expect(busy.stderr).toMatch(/connected client/);
    await held.disconnect();
    // A snapshot the replica does not have; a volume that is a replica.
    const nope = a.cli(['restore', 'v', '--from-replica', '--snapshot', 'nope']);
    expect(nope.status, nope.stderr).toBe(4);
    expect(b.cli(['restore', 'v', '--from-replica']).status).toBe(5);
    expect((await replStatus(a, 'v')).state).toBe('primary'); // the refusals changed nothing

    const out = JSON.parse(cliOk(a, ['restore', 'v', '--from-replica', '--snapshot', 'clean', '--json'])) as RestoreDone;
    console.log(`restore from snapshot (${mode}): ${differ.size} blocks differ (${shipped.size} damaged and shipped, ${unshipped.size} not, 40 writes after the snapshot); moved ${out.blocksToCopy} blocks (${out.blocksChangedOnReplica} changed on the replica, ${out.blocksChangedHere} here), ${out.bytesFetched} bytes fetched, ${out.bytesZeroed} zeroed, ${out.seconds} s`);
    expect(out.state).toBe('done');
    expect(out.temporary).toBe(false);
    expect(out.blocksDone).toBe(out.blocksToCopy);
    // Every differing block travelled, and hardly anything else (a 512-byte write or a trim
    // of a block marks it changed although it may end equal; the model cannot see that).
    expect(out.blocksToCopy).toBeGreaterThanOrEqual(differ.size);
    expect(out.blocksToCopy).toBeLessThanOrEqual(Math.ceil(differ.size * 1.15) + 8);
    expect(out.bytesFetched + out.bytesZeroed).toBeLessThanOrEqual(out.blocksToCopy * BS);
    await expectVolumeEquals(a.nbdPort, 'v', clean, 'the primary = the replica snapshot');
    await expectVolumeEquals(a.nbdPort, `v@${out.beforeSnapshot}`, damaged, 'the damaged state kept in the before-restore snapshot');
    // Writable again; the pair ships the restored blocks back and converges.
    const c = await MiniNbdClient.connect(a.nbdPort, 'v');
    const extra = Buffer.alloc(BS, 0x5a);
    expect((await c.write(0, extra)).error).toBe(0);
    await c.disconnect();
    extra.copy(clean, 0);
    cliOk(a, ['replica', 'cut', 'v']);
    await waitInSync(a, 'v');
    await expectVolumeEquals(b.nbdPort, 'v', clean, 'the replica follows the restored primary');
    const st = (await replStatus(a, 'v')) as unknown as { restore: RestoreDone | null; state: string };
    expect(st.restore?.state).toBe('done');
    expect(st.state).toBe('primary');
  });

  it("back to the replica's current state; client writes refused while it runs; a kill -9 in the middle is finished by running it again", async () => {
    const seed = testSeed('restore-current');
    const rnd = prng(seed);
    const SIZE = 256 * MiB;
    const pa = await ports();
    const pb = await ports();
    let a = await daemon(pa);
    const b = await daemon(pb);
    cliOk(a, ['volume', 'create', 'v', '--size', String(SIZE)]);
    const w = await SeededWriter.connect(a.nbdPort, 'v', SIZE, rnd, 8 * MiB);
    await w.batch(200);
    await w.close();
    cliOk(a, ['replica', 'add', 'v', '--peer', `127.0.0.1:${pb.repl}`, '--cut-interval', '1h', '--high-water', '1G']);
    await waitInSync(a, 'v');
    const replicaState = Buffer.from(w.model);
    // Unshipped damage (the cut interval is an hour): only this side knows these blocks.
    const d1 = await damage(a.nbdPort, w.model, 300, rnd);
    const out = JSON.parse(cliOk(a, ['restore', 'v', '--from-replica', '--json'])) as RestoreDone;
    console.log(`restore to the current state: ${d1.size} blocks damaged, ${out.blocksToCopy} moved (${out.blocksChangedOnReplica} changed on the replica), ${out.seconds} s`);
    expect(out.temporary).toBe(true);
    expect(out.blocksChangedOnReplica).toBe(0);
    expect(out.blocksToCopy).toBe(d1.size);
    await expectVolumeEquals(a.nbdPort, 'v', replicaState, 'the primary = the replica');
    expect(cliOk(b, ['snapshot', 'list', 'v'])).not.toMatch(/restore-point-/); // the temporary snapshot went
    w.model.set(replicaState);

    // A large damage (200 MiB in one go), then a restore killed in the middle.
    const big = await MiniNbdClient.connect(a.nbdPort, 'v');
    const junk = Buffer.alloc(4 * MiB);
    for (let off = 16 * MiB; off < 216 * MiB; off += junk.length) {
      for (let i = 0; i < junk.length; i += 4) junk.writeUInt32LE((rnd() * 0xffffffff) >>> 0, i);
      expect((await big.write(off, junk)).error).toBe(0);
    }
    expect((await big.flush()).error).toBe(0);
    await big.disconnect();
    const started = JSON.parse(cliOk(a, ['restore', 'v', '--from-replica', '--no-wait', '--json'])) as RestoreDone;
    expect(started.blocksToCopy).toBeGreaterThanOrEqual((200 * MiB) / BS);
    await a.kill();
    a = await daemon(pa, a.dataDir);
    const st = (await replStatus(a, 'v')) as unknown as { restore: { state: string; beforeSnapshot: string } | null; state: string };
    expect(st.state).toBe('restoring');
    expect(st.restore?.state).toBe('interrupted');
    expect(st.restore?.beforeSnapshot).toBe(started.beforeSnapshot);
    // Writes stay refused (EPERM) until the restore is finished.
    const c = await MiniNbdClient.connect(a.nbdPort, 'v');
    expect((await c.write(0, Buffer.alloc(BS, 1))).error).toBe(1);
    await c.disconnect();
    // Another snapshot than the interrupted one's: refused.
    expect(a.cli(['restore', 'v', '--from-replica', '--snapshot', 'x']).status).toBe(2);
    const again = JSON.parse(cliOk(a, ['restore', 'v', '--from-replica', '--json'])) as RestoreDone;
    console.log(`restore after kill -9: ${again.blocksToCopy} blocks moved on the second run (${again.blocksChangedHere} changed here, ${again.blocksChangedOnReplica} on the replica; the first run listed ${started.blocksToCopy}), ${again.seconds} s`);
    expect(again.resumed).toBe(true);
    expect(again.beforeSnapshot).toBe(started.beforeSnapshot);
    await expectVolumeEquals(a.nbdPort, 'v', replicaState, 'the primary = the replica after the finished restore');
    const c2 = await MiniNbdClient.connect(a.nbdPort, 'v');
    expect((await c2.write(0, Buffer.alloc(BS, 1))).error).toBe(0);
    await c2.disconnect();
    await waitStatus(a, 'v', (s) => s.state === 'primary', 10_000, 'primary again');
  });
});
