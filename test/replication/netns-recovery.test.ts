// Why: disaster recovery (issue 9) rehearsed the way it happens: two daemons in two
// network namespaces joined by a veth pair, real crashes (kill -9), real partitions
// (iptables DROP, no RST), a link limited by tc. Each rehearsal asserts that no
// acknowledged write is lost beyond what the failover reported, that the old primary's
// divergent writes survive in its before-resync snapshot, and that both volumes end
// byte-equal (whole files). Cases:
//   1. kill -9 of the primary under fio + a modelled writer, failover, writes on the new
//      primary, the old one back with writes it never shipped, resync: bytes moved vs the
//      union of blocks changed on either side;
//   2. a partition with writers on both sides after a failover: the stale side is fenced
//      as soon as the partition heals, and nothing is overwritten until `resync`;
//   3. planned failover --sync then failback under a writer: zero loss;
//   4. kill -9 of either daemon at seeded points during a resync and during a failback:
//      it resumes or can be rerun, nothing lost;
//   5. the old primary's history is gone: a full copy, with a warning, then equality.
// Needs root and `ip netns` (skipped otherwise). Replay with DELTAVOL_SEED; keep logs with
// DELTAVOL_KEEP_LOGS=1.

import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { sha256File } from '../helpers/images.js';
import { have } from '../helpers/daemon.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import { NetLab, NsDaemon, netnsSupport } from '../helpers/netns.js';
import { prng, testSeed } from '../helpers/seed.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = 4 * KiB;
const SIZE = 64 * MiB;
const V = 'vol';

const support = netnsSupport();
if (!support.ok) console.log(`[netns-recovery] SKIPPED: ${support.why}`);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const secs = (ms: number) => `${(ms / 1000).toFixed(2)} s`;

// ---------------------------------------------------------------- a writer with history

/**
 * Seeded 4 KiB-aligned writes over [regionStart, regionEnd) through one NBD connection,
 * one at a time. Every acknowledged write is applied to the model and to a per-block
 * history of (acknowledged at, content digest), so a check can ask "did every write
 * acknowledged before T survive?" of any volume image.
 */
class HistoryWriter {
  readonly model: Buffer;
  /** Per block: the versions written, acknowledged or not (a write the server died on may have reached the disk). */
  readonly history = new Map<number, { atMs: number; digest: string; acked: boolean }[]>();
  writes = 0;
  refused = 0;
  private running = false;
  private loop: Promise<void> | null = null;

  constructor(
    private client: MiniNbdClient,
    private readonly rnd: () => number,
    private readonly regionStart: number,
    private readonly regionEnd: number,
    initial: Buffer,
  ) {
    this.model = Buffer.from(initial);
  }

  async writeOne(): Promise<boolean> {
    const blocks = 1 + Math.floor(this.rnd() * 16);
    const first = Math.floor(this.regionStart / BS) + Math.floor(this.rnd() * ((this.regionEnd - this.regionStart) / BS - blocks));
    const data = Buffer.allocUnsafe(blocks * BS);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((this.rnd() * 2 ** 32) >>> 0, i);
    const r = await this.client.write(first * BS, data, true); // FUA: acknowledged = durable
    const at = Date.now();
    const acked = r.error === 0;
    // A refused write (EPERM) changed nothing; one the connection died on may have landed.
    if (acked || r.error === -1) {
      for (let i = 0; i < blocks; i++) {
        const h = this.history.get(first + i) ?? [];
        h.push({ atMs: at, digest: digest(data.subarray(i * BS, (i + 1) * BS)), acked });
        this.history.set(first + i, h);
      }
    }
    if (!acked) {
      this.refused++;
      return false;
    }
    data.copy(this.model, first * BS);
    this.writes++;
    return true;
  }

  async burst(n: number): Promise<void> {
    for (let i = 0; i < n; i++) if (!(await this.writeOne())) throw new Error('a write was refused');
  }

  start(pauseMs = 0): void {
    this.running = true;
    this.loop = (async () => {
      while (this.running && !this.client.closed) {
        await this.writeOne();
        if (pauseMs > 0) await sleep(pauseMs);
      }
    })();
  }

  async stop(): Promise<void> {
    this.running = false;
    await this.loop;
  }

  retarget(client: MiniNbdClient): void {
    this.client.destroy();
    this.client = client;
  }

  /**
   * Blocks of `image` that lost a write acknowledged before `beforeMs`: their content is
   * neither that write's nor a later one's (acknowledged or not).
   */
  lostBefore(image: Buffer, beforeMs: number): number[] {
    const lost: number[] = [];
    for (const [b, h] of this.history) {
      let i = h.length - 1;
      while (i >= 0 && (h[i]!.atMs >= beforeMs || !h[i]!.acked)) i--;
      if (i < 0) continue; // nothing acknowledged before: any content is allowed here
      const have = digest(image.subarray(b * BS, (b + 1) * BS));
      if (!h.slice(i).some((v) => v.digest === have)) lost.push(b);
    }
    return lost;
  }

  async close(): Promise<void> {
    await this.client.disconnect().catch(() => this.client.destroy());
  }
}

function digest(b: Buffer): string {
  return crypto.createHash('sha256').update(b).digest('hex');
}

/** 4 KiB blocks where two images differ. */
function blocksDiffering(x: Buffer, y: Buffer): Set<number> {
  const out = new Set<number>();
  for (let b = 0; b * BS < x.length; b++) if (!x.subarray(b * BS, (b + 1) * BS).equals(y.subarray(b * BS, (b + 1) * BS))) out.add(b);
  return out;
}

// ---------------------------------------------------------------- the lab

interface VolStatus {
  role: string;
  state: string;
  generation: number;
  currentSet?: number;
  changedBlocksSinceCut?: number;
  playedSet?: number;
  fenced?: unknown;
  rpo?: { seconds: number; atRiskSinceMs: number | null };
  replicas?: { state: string; playedSet: number; ackedSet: number; initialCopy: { kind: string; doneBytes: number; totalBytes: number } | null; bytesSent: number; connected: boolean; pendingBlocks: number }[];
}

class Rehearsal {
  lab!: NetLab;
  a!: NsDaemon;
  b!: NsDaemon;

  static async create(opts: { rate?: string } = {}): Promise<Rehearsal> {
    const r = new Rehearsal();
    r.lab = NetLab.create();
    if (opts.rate) {
      for (const s of ['a', 'b'] as const) r.lab.exec(s, 'tc', ['qdisc', 'add', 'dev', r.lab.veth[s], 'root', 'tbf', 'rate', opts.rate, 'burst', '64kb', 'latency', '50ms']);
    }
    [r.a, r.b] = await Promise.all([NsDaemon.start(r.lab, 'a', { tmpfs: true }), NsDaemon.start(r.lab, 'b', { tmpfs: true })]);
    return r;
  }

  node(side: 'a' | 'b'): NsDaemon {
    return side === 'a' ? this.a : this.b;
  }

  async restart(side: 'a' | 'b'): Promise<NsDaemon> {
    const old = this.node(side);
    await old.kill();
    const d = await NsDaemon.start(this.lab, side, { tmpfs: true, dataDir: old.dataDir });
    if (side === 'a') this.a = d;
    else this.b = d;
    return d;
  }

  cli(side: 'a' | 'b', args: string[], timeoutMs = 120_000): string {
    const d = this.node(side);
    const r = d.cli(args, timeoutMs);
    if (r.status !== 0) throw new Error(`[${side}] deltavol ${args.join(' ')} → ${r.status}\n${r.stdout}\n${r.stderr}\n--- a ---\n${this.a.logTail(30)}\n--- b ---\n${this.b.logTail(30)}`);
    return r.stdout;
  }

  async status(side: 'a' | 'b'): Promise<VolStatus> {
    const r = await this.node(side).api<{ volumes: VolStatus[] }>('GET', `/v1/replication?volume=${V}`);
    return r.volumes[0]!;
  }

  async waitFor(side: 'a' | 'b', what: string, cond: (s: VolStatus) => boolean, timeoutMs: number): Promise<VolStatus> {
    const t0 = Date.now();
    let last: VolStatus | null = null;
    let err = '';
    for (;;) {
      try {
        last = await this.status(side);
        if (cond(last)) return last;
      } catch (e) {
        err = (e as Error).message;
      }
      if (Date.now() - t0 > timeoutMs) {
        throw new Error(`timed out after ${secs(timeoutMs)} waiting for ${what} on ${side}\nlast: ${JSON.stringify(last)?.slice(0, 1500)} ${err}\n--- a ---\n${this.a.logTail(40)}\n--- b ---\n${this.b.logTail(40)}`);
      }
      await sleep(100);
    }
  }

  /** The primary on `side` has shipped everything and its only replica played it. */
  async waitInSync(side: 'a' | 'b', timeoutMs = 60_000): Promise<VolStatus> {
    this.cli(side, ['replica', 'cut', V]);
    return this.waitFor(
      side,
      'the pair in sync',
      (s) => s.changedBlocksSinceCut === 0 && s.replicas?.length === 1 && s.replicas[0]!.initialCopy === null && s.replicas[0]!.state === 'duplex' && s.replicas[0]!.playedSet === s.currentSet,
      timeoutMs,
    );
  }

  image(side: 'a' | 'b'): Buffer {
    return fs.readFileSync(this.node(side).volumePath(V));
  }

  /** A volume export read whole (snapshots: `vol@snap`). */
  async read(side: 'a' | 'b', exportName: string): Promise<Buffer> {
    const c = await MiniNbdClient.connect(await this.node(side).nbdPort(), exportName);
    try {
      const out = Buffer.alloc(c.sizeBytes);
      for (let off = 0; off < out.length; off += 4 * MiB) {
        const r = await c.read(off, Math.min(4 * MiB, out.length - off));
        if (r.error !== 0) throw new Error(`read ${exportName} at ${off}: error ${r.error}`);
        r.data.copy(out, off);
      }
      return out;
    } finally {
      await c.disconnect().catch(() => c.destroy());
    }
  }

  async client(side: 'a' | 'b'): Promise<MiniNbdClient> {
    return MiniNbdClient.connect(await this.node(side).nbdPort(), V);
  }

  async dispose(): Promise<void> {
    await this.lab?.dispose();
  }
}

let current: Rehearsal | null = null;
afterEach(async () => {
  await current?.dispose();
  current = null;
}, 60_000);

/** A primary `vol` on a, paired with b, in sync, with a modelled writer on [0, SIZE/2). */
async function pairedLab(seed: number, opts: { rate?: string } = {}): Promise<{ r: Rehearsal; w: HistoryWriter }> {
  const r = (current = await Rehearsal.create(opts));
  r.cli('a', ['volume', 'create', V, '--size', `${SIZE / MiB}M`]);
  const w = new HistoryWriter(await r.client('a'), prng(seed), 0, SIZE / 2, Buffer.alloc(SIZE));
  await w.burst(200);
  r.cli('a', ['replica', 'add', V, '--peer', `${r.lab.addr.b}:${r.b.replPort}`, '--cut-interval', '500ms', '--retries', '3', '--timeout', '60s']);
  await r.waitInSync('a');
  return { r, w };
}

interface FailoverJson {
  generation: number;
  rtoMs: number;
  restartPoint: { snapshot: string; set: number };
  report: { atRiskSinceMs: number | null; lastContactMs: number | null; seconds: number; setsNotHere: number[]; setsDropped: number[]; bytesAtMost: number; consistent: boolean };
}
interface ResyncJson {
  full: boolean;
  reason: string;
  divergentBlocks: number;
  beforeSnapshot: string;
  registered: boolean;
}

/** After a failover: no block of `image` lost a write acknowledged before the report's at-risk time. */
function expectNoUnreportedLoss(w: HistoryWriter, image: Buffer, fo: FailoverJson, label: string): void {
  const since = fo.report.atRiskSinceMs ?? Date.now();
  const lost = w.lostBefore(image, since);
  expect(lost, `${label}: blocks that lost a write acknowledged before ${new Date(since).toISOString()} (the failover reported loss only after it)`).toEqual([]);
}

describe.skipIf(!support.ok)('disaster recovery between two network namespaces', () => {
  it('1: kill -9 of the primary under fio, failover, writes on both sides, resync moves only the union', async () => {
    const seed = testSeed('netns-recovery-1');
    const { r, w } = await pairedLab(seed);
    // fio on the upper half (unmodelled load), the modelled writer on the lower half.
    expect(have('fio'), 'fio is installed by scripts/install-test-deps.sh').toBe(true);
    const fio = r.lab.spawn('a', 'fio', [
      '--name=load',
      '--ioengine=nbd',
      `--uri=nbd+unix:///${V}?socket=${r.a.nbdSocket}`,
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=8',
      `--offset=${SIZE / 2}`,
      `--size=${SIZE / 2}`,
      '--time_based',
      '--runtime=60',
    ]);
    w.start();
    await sleep(2500);
    const live = await r.status('b');
    await r.a.kill(); // the primary dies under load
    fio.kill('SIGKILL');
    await w.stop();
    const aModel = Buffer.from(w.model);
    console.log(`[netns-recovery] case 1: ${w.writes} modelled writes; replica's live RPO before the crash: ${JSON.stringify(live.rpo)}`);

    const t0 = Date.now();
    const fo = JSON.parse(r.cli('b', ['failover', V, '--json'])) as FailoverJson;
    const foWallMs = Date.now() - t0;
    console.log(`[netns-recovery] case 1: failover rto ${fo.rtoMs} ms (command ${foWallMs} ms); report ${JSON.stringify(fo.report)}`);
    expect(fo.report.consistent).toBe(true);
    const restart = await r.read('b', `${V}@${fo.restartPoint.snapshot}`);
    expectNoUnreportedLoss(w, restart, fo, 'new primary at its restart point');
    // The live RPO before the crash and the report agree within a cut interval (500 ms) and a heartbeat.
    if (live.rpo?.atRiskSinceMs && fo.report.atRiskSinceMs) expect(Math.abs(fo.report.atRiskSinceMs - live.rpo.atRiskSinceMs)).toBeLessThan(2500);

    // The new primary takes writes (modelled, on the lower half).
    const wb = new HistoryWriter(await r.client('b'), prng(seed + 1), 0, SIZE / 2, restart);
    await wb.burst(150);
    // The old primary returns: it learns it was replaced and refuses writes.
    const tBack = Date.now();
    await r.restart('a');
    await r.waitFor('a', 'the old primary fenced', (s) => s.state === 'fenced', 30_000);
    console.log(`[netns-recovery] case 1: old primary fenced ${secs(Date.now() - tBack)} after its restart`);
    const aImage = r.image('a');
    const lostOnA = w.lostBefore(aImage, Date.now());
    expect(lostOnA, 'the old primary kept every write it acknowledged').toEqual([]);
    const bAtResync = r.image('b');
    const union = new Set([...blocksDiffering(restart, aImage), ...blocksDiffering(restart, bAtResync)]);

    const t1 = Date.now();
    const rs = JSON.parse(r.cli('a', ['resync', V, '--json'])) as ResyncJson;
    const st = await r.waitInSync('b');
    const resyncMs = Date.now() - t1;
    const moved = st.replicas![0]!.bytesSent;
    console.log(`[netns-recovery] case 1: resync in ${secs(resyncMs)}: ${rs.divergentBlocks} blocks possibly changed on the old primary, union of blocks changed on either side ${union.size} (${(union.size * BS / MiB).toFixed(2)} MiB); moved ${(moved / MiB).toFixed(2)} MiB = ${(moved / (union.size * BS)).toFixed(3)} × the union (a full copy would be ${SIZE / MiB} MiB)`);
    expect(rs.full).toBe(false);
    expect(moved).toBeLessThanOrEqual(1.1 * union.size * BS + 512 * KiB);
    expect(sha256File(r.a.volumePath(V))).toBe(sha256File(r.b.volumePath(V)));
    const before = await r.read('a', `${V}@${rs.beforeSnapshot}`);
    expect(before.equals(aImage), 'the old primary kept its own version in its before-resync snapshot').toBe(true);
    expect(wb.lostBefore(r.image('a'), Date.now())).toEqual([]);
    await wb.close();
  }, 180_000);

  it('2: a partition with writers on both sides after a failover: fenced when it heals, nothing overwritten until resync', async () => {
    const seed = testSeed('netns-recovery-2');
    const { r, w } = await pairedLab(seed);
    await w.burst(100);
    await r.waitInSync('a');
    const rules = [
      ['INPUT', '-s', r.lab.addr.a, '-j', 'DROP'],
      ['OUTPUT', '-d', r.lab.addr.a, '-j', 'DROP'],
    ];
    for (const rule of rules) r.lab.exec('b', 'iptables', ['-I', ...rule]);
    await r.waitFor('b', 'the replica to notice the silence', (s) => s.state === 'disconnected', 20_000);
    const fo = JSON.parse(r.cli('b', ['failover', V, '--json'])) as FailoverJson;
    expect(fo.generation).toBe(2);
    // Both sides take writes during the partition (the old primary does not know yet).
    const wb = new HistoryWriter(await r.client('b'), prng(seed + 1), 0, SIZE / 2, await r.read('b', V));
    await Promise.all([w.burst(120), wb.burst(120)]);
    const aModel = Buffer.from(w.model);
    const tHeal = Date.now();
    for (const rule of rules) r.lab.exec('b', 'iptables', ['-D', ...rule]);
    await r.waitFor('a', 'the stale primary fenced after the partition healed', (s) => s.state === 'fenced', 30_000);
    const fencedMs = Date.now() - tHeal;
    console.log(`[netns-recovery] case 2: stale primary fenced ${secs(fencedMs)} after the partition healed`);
    const c = await r.client('a');
    expect((await c.write(0, Buffer.alloc(BS, 1))).error, 'writes to a fenced primary are refused (EPERM)').toBe(1);
    await c.disconnect();
    await sleep(2000); // nothing may overwrite the fenced side by itself
    expect(r.image('a').equals(aModel), 'the fenced side holds exactly its own acknowledged writes').toBe(true);

    const rs = JSON.parse(r.cli('a', ['resync', V, '--json'])) as ResyncJson;
    await r.waitInSync('b');
    expect(sha256File(r.a.volumePath(V))).toBe(sha256File(r.b.volumePath(V)));
    expect((await r.read('a', `${V}@${rs.beforeSnapshot}`)).equals(aModel), 'its divergent writes are kept').toBe(true);
    expect(r.image('a').equals(wb.model), 'after resync it equals the new primary').toBe(true);
    await Promise.all([w.close(), wb.close()]);
  }, 150_000);

  it('3: planned failover --sync then failback under a writer: zero loss', async () => {
    const seed = testSeed('netns-recovery-3');
    const { r, w } = await pairedLab(seed);
    let side: 'a' | 'b' = 'a';
    let stop = false;
    const loop = (async () => {
      while (!stop) {
        if (!(await w.writeOne())) {
          side = side === 'a' ? 'b' : 'a';
          w.retarget(await r.client(side));
        }
      }
    })();
    await sleep(1500);
    const sw = JSON.parse(r.cli('b', ['failover', V, '--sync', '--json'])) as { rtoMs: number; generation: number };
    await r.waitFor('b', 'the reverse pair in duplex', (s) => s.replicas?.[0]?.state === 'duplex', 30_000);
    await sleep(1000);
    const fb = JSON.parse(r.cli('a', ['failback', V, '--json'])) as { rtoMs: number; generation: number };
    await sleep(1000);
    stop = true;
    await loop;
    console.log(`[netns-recovery] case 3: failover --sync rto ${sw.rtoMs} ms, failback rto ${fb.rtoMs} ms, ${w.writes} writes, ${w.refused} refused (each sent the writer to the new primary)`);
    expect(sw.generation).toBe(2);
    expect(fb.generation).toBe(3);
    expect(side).toBe('a');
    await r.waitInSync('a');
    expect(r.image('a').subarray(0, SIZE / 2).equals(w.model.subarray(0, SIZE / 2)), 'every acknowledged write is on the primary').toBe(true);
    expect(sha256File(r.a.volumePath(V))).toBe(sha256File(r.b.volumePath(V)));
    await w.close();
  }, 150_000);

  it('4: kill -9 of either daemon at seeded points during a resync and during a failback: it resumes, nothing lost', async () => {
    const seed = testSeed('netns-recovery-4');
    const rnd = prng(seed ^ 0x5bd1e995);
    const { r, w } = await pairedLab(seed, { rate: '200mbit' });
    // Divergence on both sides: the old primary writes a lot that never ships.
    r.cli('a', ['replica', 'suspend', V]);
    await w.burst(1500);
    await r.a.kill();
    const fo = JSON.parse(r.cli('b', ['failover', V, '--force', '--json'])) as FailoverJson;
    const wb = new HistoryWriter(await r.client('b'), prng(seed + 1), SIZE / 2, SIZE, await r.read('b', V));
    await wb.burst(1500);
    await r.restart('a');
    // Its pair is split, so it never contacts the new primary: it stays an unfenced primary
    // until the operator's resync fences it.
    expect((await r.status('a')).state).toBe('primary');
    const aModel = r.image('a');

    // Resync, with a crash of one side at a seeded moment of the copy.
    const victim1 = rnd() < 0.5 ? 'a' : 'b';
    const at1 = Math.floor(200 + rnd() * 2500);
    const resyncRun = r.node('a').cli(['resync', V, '--no-wait', '--json']);
    expect(resyncRun.status, resyncRun.stderr).toBe(0);
    await sleep(at1);
    await r.restart(victim1);
    console.log(`[netns-recovery] case 4: killed ${victim1} ${at1} ms into the resync (failover report ${JSON.stringify(fo.report)})`);
    // A second `resync` is harmless (the daemon also retries by itself).
    const again = r.node('a').cli(['resync', V, '--no-wait', '--json']);
    expect([0, 5]).toContain(again.status);
    await r.waitInSync('b', 120_000);
    expect(sha256File(r.a.volumePath(V))).toBe(sha256File(r.b.volumePath(V)));
    expect(r.image('a').subarray(SIZE / 2).equals(wb.model.subarray(SIZE / 2)), 'the new primary lost nothing').toBe(true);
    const rsInfo = (await r.read('a', `${V}@before-resync-g2`)).equals(aModel);
    expect(rsInfo, 'the before-resync snapshot survived the crash').toBe(true);

    // Failback, with a crash of one side at a seeded moment of the swap.
    const victim2 = rnd() < 0.5 ? 'a' : 'b';
    const at2 = Math.floor(rnd() * 400);
    const cliRun = new Promise<{ status: number; out: string }>((resolve) => {
      const p = r.lab.spawn('a', process.execPath, [path.resolve('dist/cli/main.js'), '--control', `127.0.0.1:${r.a.controlPort}`, '--token-file', path.join(r.a.dataDir, 'control.token'), 'failback', V, '--json']);
      let out = '';
      p.stdout?.on('data', (d: Buffer) => (out += d.toString()));
      p.once('exit', (code) => resolve({ status: code ?? -1, out }));
    });
    await sleep(at2);
    await r.restart(victim2);
    const res = await cliRun;
    console.log(`[netns-recovery] case 4: killed ${victim2} ${at2} ms into the failback; the command exited ${res.status}`);
    // Whatever the crash hit, the two settle on one primary; rerun failback if it did not happen.
    await sleep(3000);
    let sa = await r.status('a');
    if (sa.role !== 'primary') {
      const retry = r.node('a').cli(['failback', V, '--json']);
      console.log(`[netns-recovery] case 4: failback rerun → ${retry.status} ${retry.stdout.slice(0, 200)}${retry.stderr.slice(0, 300)}`);
      sa = await r.waitFor('a', 'a primary again', (s) => s.role === 'primary' && s.state !== 'handing-over', 40_000);
    }
    expect(sa.role).toBe('primary');
    const sb = await r.status('b');
    expect(sb.role, 'exactly one primary').toBe('replica');
    await r.waitInSync('a', 90_000);
    expect(sha256File(r.a.volumePath(V))).toBe(sha256File(r.b.volumePath(V)));
    expect(r.image('a').subarray(SIZE / 2).equals(wb.model.subarray(SIZE / 2)), 'failback lost nothing').toBe(true);
    await Promise.all([w.close(), wb.close().catch(() => undefined)]);
  }, 240_000);

  it('5: the old primary lost its history: a full copy with a warning, then equality', async () => {
    const seed = testSeed('netns-recovery-5');
    const { r, w } = await pairedLab(seed);
    await w.burst(300);
    await r.a.kill();
    r.cli('b', ['failover', V, '--json']);
    // The old primary's replication state is gone (a replaced disk, a wiped directory).
    fs.rmSync(path.join(r.a.dataDir, 'volumes', V, 'replication'), { recursive: true, force: true });
    await r.restart('a');
    const s = await r.status('a');
    expect(s.role).toBe('simplex');
    const res = r.node('a').cli(['resync', V, '--peer', `${r.lab.addr.b}:${r.b.replPort}`]);
    expect(res.status, res.stderr).toBe(0);
    expect(res.stderr).toMatch(/WARNING: a full copy is needed: this volume has no replication pair/);
    await r.waitInSync('b');
    const st = await r.status('b');
    console.log(`[netns-recovery] case 5: full resync moved ${(st.replicas![0]!.bytesSent / MiB).toFixed(1)} MiB`);
    expect(sha256File(r.a.volumePath(V))).toBe(sha256File(r.b.volumePath(V)));
    await w.close();
  }, 120_000);
});
