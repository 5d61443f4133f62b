// Why: replication is only worth having if the replica ends up equal to the primary
// after the network misbehaves the way real networks do. Here two deltavol daemons run
// in two network namespaces joined by a veth pair limited to 100 Mbit/s (tc tbf), a
// seeded NBD writer loads the primary, and the link is cut (ip link down) and
// partitioned (iptables DROP, no RST) for longer than the pair's retry budget. After
// each rehearsal the pair must come back by itself (failure-suspend → duplex-pending →
// duplex) and, once in sync, the primary's and the replica's volume files must be
// byte-for-byte equal to each other and to the writer's in-memory model.
//
// Needs root and `ip netns` (skipped otherwise, with the reason printed); uses tc and
// iptables inside the namespaces only. Replay a run with DELTAVOL_SEED; keep the
// daemons' logs with DELTAVOL_KEEP_LOGS=1.

import crypto from 'node:crypto';
import fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sha256File } from '../helpers/images.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import { NetLab, NsDaemon, netnsSupport, sh } from '../helpers/netns.js';
import { prng, testSeed } from '../helpers/seed.js';
import type { PairStatusJson, PrimaryStatusJson } from '../helpers/replication.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 128 * MiB;
const V = 'vol';
/** Primary → replica bandwidth (tc tbf on the primary's end of the veth). */
const LINK_RATE = '100mbit';

const support = netnsSupport();
if (!support.ok) console.log(`[netns] SKIPPED: ${support.why}`);

// ---------------------------------------------------------------- status

type PairStatus = PairStatusJson;
type PrimaryStatus = PrimaryStatusJson;

interface ReplicaStatus {
  volume: string;
  role: string;
  state: string;
  playedSet: number;
  ackedSet: number;
  connected: boolean;
}

// ---------------------------------------------------------------- the writer

/**
 * Seeded random writes (512-byte aligned, 512 B–64 KiB, some up to 1 MiB) over one NBD
 * connection, one at a time, paced to a byte rate; every acknowledged write goes into
 * the model, so the model is what the volume must hold.
 */
class Writer {
  readonly model = Buffer.alloc(SIZE);
  bytes = 0;
  writes = 0;
  readonly errors: string[] = [];
  private running = false;
  private loop: Promise<void> | null = null;

  constructor(
    private readonly client: MiniNbdClient,
    private readonly rnd: () => number,
  ) {}

  private async writeOne(): Promise<number> {
    const big = this.rnd() < 0.1;
    const len = 512 * (1 + Math.floor(this.rnd() * (big ? 2048 : 128)));
    const off = 512 * Math.floor(this.rnd() * ((SIZE - len) / 512 + 1));
    const data = Buffer.allocUnsafe(len);
    for (let i = 0; i < len; i += 4) data.writeUInt32LE(Math.floor(this.rnd() * 2 ** 32), i);
    const r = await this.client.write(off, data);
    if (r.error !== 0) this.errors.push(`write ${off}+${len}: error ${r.error}`);
    else data.copy(this.model, off);
    this.bytes += len;
    this.writes++;
    return len;
  }

  /** Writes `bytes` as fast as the server takes them. */
  async burst(bytes: number): Promise<void> {
    for (let n = 0; n < bytes; ) n += await this.writeOne();
  }

  /** Writes in the background at about `bytesPerSec` until stop(). */
  start(bytesPerSec: number): void {
    if (this.running) throw new Error('writer already running');
    this.running = true;
    this.loop = (async () => {
      const t0 = Date.now();
      let n = 0;
      while (this.running && !this.client.closed) {
        n += await this.writeOne();
        const ahead = (n / bytesPerSec) * 1000 - (Date.now() - t0);
        if (ahead > 0) await sleep(Math.min(ahead, 200));
      }
    })();
  }

  async stop(): Promise<void> {
    this.running = false;
    await this.loop;
    this.loop = null;
  }
}

// ---------------------------------------------------------------- the lab

let lab: NetLab | undefined;
let a: NsDaemon; // primary, in namespace a
let b: NsDaemon; // replica, in namespace b
let client: MiniNbdClient | undefined;
let writer: Writer;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const secs = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

async function primary(): Promise<PrimaryStatus> {
  const r = await a.api<{ volumes: PrimaryStatus[] }>('GET', `/v1/replication?volume=${V}`);
  const v = r.volumes[0]!;
  expect(v.role).toBe('primary');
  return v;
}

async function replica(): Promise<ReplicaStatus> {
  const r = await b.api<{ volumes: ReplicaStatus[] }>('GET', `/v1/replication?volume=${V}`);
  return r.volumes[0]!;
}

function pairOf(s: PrimaryStatus): PairStatus {
  expect(s.replicas).toHaveLength(1);
  return s.replicas[0]!;
}

/** Pair states seen by the polls of one rehearsal, with their time since it started. */
class StateTrail {
  readonly seen: { state: string; atMs: number; reason: string | null }[] = [];
  constructor(readonly t0 = Date.now()) {}
  note(p: PairStatus): void {
    const last = this.seen[this.seen.length - 1];
    if (!last || last.state !== p.state) this.seen.push({ state: p.state, atMs: Date.now() - this.t0, reason: p.reason });
  }
  states(): string[] {
    return this.seen.map((s) => s.state);
  }
  toString(): string {
    return this.seen.map((s) => `${s.state}@${secs(s.atMs)}${s.reason ? ` (${s.reason})` : ''}`).join(' → ');
  }
}

/** Polls the primary's status every 100 ms until `cond` holds (bounded); the failure says where things stood. */
async function waitForPrimary(what: string, cond: (s: PrimaryStatus) => boolean, timeoutMs: number, trail?: StateTrail): Promise<PrimaryStatus> {
  const t0 = Date.now();
  let last: PrimaryStatus | null = null;
  let lastErr = '';
  for (;;) {
    try {
      last = await primary();
      trail?.note(pairOf(last));
      if (cond(last)) return last;
    } catch (e) {
      lastErr = (e as Error).message;
    }
    if (Date.now() - t0 > timeoutMs) {
      throw new Error(
        `timed out after ${secs(timeoutMs)} waiting for ${what}\n` +
          `states: ${trail?.toString() ?? '-'}\nlast status: ${JSON.stringify(last)}\n${lastErr ? `last error: ${lastErr}\n` : ''}` +
          `--- primary log ---\n${a.logTail()}\n--- replica log ---\n${b.logTail()}`,
      );
    }
    await sleep(100);
  }
}

/** In sync: nothing changed since the last cut, the replica has played the last set cut. */
function inSync(s: PrimaryStatus): boolean {
  return s.changedBlocksSinceCut === 0 && s.replicas.length > 0 && s.replicas.every((p) => p.initialCopy === null && p.playedSet === s.currentSet && p.ackedSet === s.currentSet);
}

/** 4 KiB blocks where two files differ (the first few), for a failure message. */
function differingBlocks(f1: string, f2: string, max = 8): string {
  const b1 = fs.readFileSync(f1);
  const b2 = fs.readFileSync(f2);
  const out: number[] = [];
  let count = 0;
  for (let off = 0; off < Math.max(b1.length, b2.length); off += 4 * KiB) {
    if (!b1.subarray(off, off + 4 * KiB).equals(b2.subarray(off, off + 4 * KiB))) {
      count++;
      if (out.length < max) out.push(off / (4 * KiB));
    }
  }
  return `sizes ${b1.length}/${b2.length}, ${count} differing 4 KiB blocks, first: ${out.join(', ')}`;
}

/** Waits for sync, then: primary file == model, replica file == primary file. */
async function expectInSync(label: string, timeoutMs: number, trail?: StateTrail): Promise<number> {
  const t0 = Date.now();
  const s = await waitForPrimary(`${label}: the replica to catch up`, inSync, timeoutMs, trail);
  const syncMs = Date.now() - t0;
  const r = await replica();
  expect(r.role).toBe('replica');
  expect(r.playedSet, 'the replica reports the set the primary saw played').toBe(s.currentSet);
  const model = crypto.createHash('sha256').update(writer.model).digest('hex');
  const pa = a.volumePath(V);
  const pb = b.volumePath(V);
  const shaA = sha256File(pa);
  const shaB = sha256File(pb);
  console.log(`[netns] ${label}: in sync ${secs(syncMs)} after the writes stopped; set ${s.currentSet}; sha256 primary ${shaA.slice(0, 16)} replica ${shaB.slice(0, 16)} model ${model.slice(0, 16)}`);
  expect(writer.errors, 'NBD writes to the primary failed').toEqual([]);
  expect(fs.statSync(pb).size).toBe(SIZE);
  if (shaA !== model) {
    const tmp = `${pa}.model`;
    fs.writeFileSync(tmp, writer.model);
    const diff = differingBlocks(pa, tmp);
    fs.rmSync(tmp, { force: true });
    expect.fail(`${label}: the primary's volume file differs from the writer's model: ${diff}`);
  }
  if (shaB !== shaA) expect.fail(`${label}: the replica's volume file differs from the primary's: ${differingBlocks(pa, pb)}\n--- replica log ---\n${b.logTail()}`);
  return syncMs;
}

function printStatusTable(label: string): void {
  const r = a.cli(['status', V]);
  console.log(`[netns] ${label}: deltavol status ${V} (primary)\n${r.stdout}${r.stderr}`);
}

// ---------------------------------------------------------------- tests

describe.skipIf(!support.ok)('replication between two network namespaces (veth, tc, ip link, iptables)', () => {
  let seed = 0;

  beforeAll(async () => {
    const t0 = Date.now();
    seed = testSeed('replication netns');
    lab = NetLab.create();
    lab.exec('a', 'tc', ['qdisc', 'add', 'dev', lab.veth.a, 'root', 'tbf', 'rate', LINK_RATE, 'burst', '64kb', 'latency', '50ms']);
    [a, b] = await Promise.all([NsDaemon.start(lab, 'a'), NsDaemon.start(lab, 'b')]);
    console.log(`[netns] lab: ${lab.ns.a} (${lab.addr.a}, primary) ⇄ ${lab.ns.b} (${lab.addr.b}, replica) over ${lab.veth.a}/${lab.veth.b}, ${LINK_RATE}`);

    const created = a.cli(['volume', 'create', V, '--size', `${SIZE / MiB}M`]);
    expect(created.status, created.stderr).toBe(0);
    client = await MiniNbdClient.connect(await a.nbdPort(), V);
    expect(client.sizeBytes).toBe(SIZE);
    writer = new Writer(client, prng(seed));
    // Data before the replica exists: it travels in the initial copy.
    await writer.burst(16 * MiB);

    const add = a.cli(['replica', 'add', V, '--peer', `${lab.addr.b}:${b.replPort}`, '--cut-interval', '500ms', '--retries', '3', '--timeout', '40s', '--json'], 50_000);
    expect(add.status, `replica add: ${add.stdout}${add.stderr}\n${a.logTail()}`).toBe(0);
    const pair = JSON.parse(add.stdout) as PairStatus;
    expect(pair.initialCopy).toBeNull();
    console.log(`[netns] setup ${secs(Date.now() - t0)}: volume ${SIZE / MiB} MiB, 16 MiB written, replica added (initial copy done), pair ${pair.id} ${pair.state}`);
  }, 90_000);

  afterAll(async () => {
    await writer?.stop().catch(() => undefined);
    client?.destroy();
    await lab?.dispose();
    if (lab) {
      const left = sh('ip', ['netns', 'list']).stdout;
      expect(left).not.toContain(lab.ns.a);
      expect(left).not.toContain(lab.ns.b);
    }
  }, 60_000);

  it('after a write load over a 100 Mbit/s link, the replica file equals the primary file', async () => {
    const t0 = Date.now();
    const trail = new StateTrail(t0);
    // The initial copy already made both equal.
    await expectInSync('after the initial copy', 20_000, trail);

    // A steady load, then a burst faster than the link.
    writer.start(4 * MiB);
    await sleep(3000);
    const mid = pairOf(await primary());
    trail.note(mid);
    expect(mid.connected).toBe(true);
    await writer.stop();
    const before = writer.bytes;
    await writer.burst(24 * MiB);
    console.log(`[netns] case 1: wrote ${((writer.bytes - 16 * MiB) / MiB).toFixed(1)} MiB in ${writer.writes} writes so far; burst of ${((writer.bytes - before) / MiB).toFixed(1)} MiB last`);
    const syncMs = await expectInSync('case 1 (write load)', 45_000, trail);
    const p = pairOf(await primary());
    expect(p.state).toBe('duplex');
    expect(trail.states()).not.toContain('failure-suspend');
    // The replication traffic really went through the 100 Mbit/s qdisc.
    const tc = lab!.exec('a', 'tc', ['-s', 'qdisc', 'show', 'dev', lab!.veth.a]).stdout;
    const qdiscBytes = Number(/Sent (\d+) bytes/.exec(tc)?.[1] ?? 0);
    expect(tc).toMatch(/qdisc tbf/);
    expect(qdiscBytes, tc).toBeGreaterThanOrEqual(p.bytesSent);
    console.log(`[netns] case 1: ${secs(Date.now() - t0)} total, sync ${secs(syncMs)}, ${(p.bytesSent / MiB).toFixed(1)} MiB sent by the pair, ${(qdiscBytes / MiB).toFixed(1)} MiB through tbf; states ${trail}`);
    printStatusTable('case 1');
  }, 90_000);

  it('a link cut (ip link down) longer than the retry budget: failure-suspend, then back to duplex by itself, then equal files', async () => {
    const t0 = Date.now();
    const trail = new StateTrail(t0);
    writer.start(3 * MiB);
    await waitForPrimary('duplex before the cut', (s) => pairOf(s).state === 'duplex' && pairOf(s).connected, 20_000, trail);
    await sleep(1000);
    const setAtCut = (await primary()).currentSet;

    const tDown = Date.now();
    lab!.setLink('a', false);
    // The heartbeat notices the silent peer (~6 s), then 3 failed attempts with back-off.
    const down = await waitForPrimary('failure-suspend after the link went down', (s) => pairOf(s).state === 'failure-suspend', 30_000, trail);
    const suspendMs = Date.now() - tDown;
    const dp = pairOf(down);
    expect(dp.connected).toBe(false);
    expect(dp.reason, 'failure-suspend says why').toBeTruthy();
    console.log(`[netns] case 2: failure-suspend ${secs(suspendMs)} after ip link down (reason: ${dp.reason})`);

    // Writes go on; sets keep being cut into the outbound log.
    await sleep(2000);
    const held = await primary();
    expect(pairOf(held).state).toBe('failure-suspend');
    expect(held.currentSet, 'sets are cut while the replica is unreachable').toBeGreaterThan(setAtCut);
    expect(pairOf(held).ackedSet).toBeLessThan(held.currentSet);

    const tUp = Date.now();
    lab!.setLink('a', true);
    await waitForPrimary('duplex after the link came back', (s) => pairOf(s).state === 'duplex' && pairOf(s).connected, 30_000, trail);
    const backMs = Date.now() - tUp;
    const states = trail.states();
    expect(states.slice(states.lastIndexOf('failure-suspend') + 1), `it goes back through duplex-pending: ${trail}`).toContain('duplex-pending');
    console.log(`[netns] case 2: duplex again ${secs(backMs)} after ip link up`);

    await writer.stop();
    const syncMs = await expectInSync('case 2 (link down)', 45_000, trail);
    console.log(`[netns] case 2: ${secs(Date.now() - t0)} total; suspend after ${secs(suspendMs)}, duplex ${secs(backMs)} after up, sync ${secs(syncMs)}; states ${trail}`);
    printStatusTable('case 2');
  }, 110_000);

  it('a partition without link-down (iptables DROP both ways): failure-suspend, then back to duplex by itself, then equal files', async () => {
    const t0 = Date.now();
    const trail = new StateTrail(t0);
    const rules = [
      ['INPUT', '-s', lab!.addr.a, '-j', 'DROP'],
      ['OUTPUT', '-d', lab!.addr.a, '-j', 'DROP'],
    ];
    writer.start(3 * MiB);
    await waitForPrimary('duplex before the partition', (s) => pairOf(s).state === 'duplex' && pairOf(s).connected, 20_000, trail);
    await sleep(1000);

    const tCut = Date.now();
    for (const r of rules) lab!.exec('b', 'iptables', ['-I', ...r]);
    // Nothing comes back, not even an RST: silence (~6 s), then connects time out (5 s each).
    const down = await waitForPrimary('failure-suspend during the partition', (s) => pairOf(s).state === 'failure-suspend', 45_000, trail);
    const suspendMs = Date.now() - tCut;
    expect(pairOf(down).reason, 'failure-suspend says why').toBeTruthy();
    console.log(`[netns] case 3: failure-suspend ${secs(suspendMs)} after the DROP rules (reason: ${pairOf(down).reason})`);
    await sleep(2000);

    const tHeal = Date.now();
    for (const r of rules) lab!.exec('b', 'iptables', ['-D', ...r]);
    await waitForPrimary('duplex after the partition healed', (s) => pairOf(s).state === 'duplex' && pairOf(s).connected, 30_000, trail);
    const backMs = Date.now() - tHeal;
    const states = trail.states();
    expect(states.slice(states.lastIndexOf('failure-suspend') + 1), `it goes back through duplex-pending: ${trail}`).toContain('duplex-pending');

    await writer.stop();
    const syncMs = await expectInSync('case 3 (iptables DROP)', 45_000, trail);
    console.log(`[netns] case 3: ${secs(Date.now() - t0)} total; suspend after ${secs(suspendMs)}, duplex ${secs(backMs)} after the rules went, sync ${secs(syncMs)}; states ${trail}`);
    console.log(`[netns] writer: ${writer.writes} writes, ${(writer.bytes / MiB).toFixed(1)} MiB in all (seed ${seed})`);
  }, 110_000);
});
