// Why: issue 10 took the replication port apart with a hand-made client speaking the
// public wire format: it planted volumes, learned what to forge from refusal texts, took
// a replica's session over with a stolen pair id and generation 2^32−1, wrote a forged
// set into the replica, split it read-write, and grew the daemon by ~500 MiB with
// unfinished hellos. Each of those is kept here as a test that fails on the old code:
// on plain loopback (rule: a hello never raises a generation nor replaces the primary's
// session; refusals say nothing to an unauthenticated peer; unauthenticated connections
// and their buffers are capped), and with TLS-PSK (nothing without a key, a wrong key
// refused, a pair bound to the identity that made it) and X.509 (a certificate from
// another CA refused).
//
// Run: npx vitest run test/security/replication-attacks.test.ts

import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { have, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import { replStatus, waitInSync } from '../helpers/replication.js';
import { helloFor, RawPeer, type PeerCreds } from '../helpers/repl-peer.js';
import { makePki } from '../helpers/pki.js';
import { encodeFrame, type ReplMessage } from '../../src/replication/wire.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const BS = 4096;

interface ReplicaStatusJson {
  role: string;
  state: string;
  pairId: string;
  generation: number;
  connected: boolean;
  playedSet: number;
  peerIdentity?: string | null;
}

const cli = (d: TestDaemon, args: string[]) => {
  const r = d.cli(args);
  if (r.status !== 0) throw new Error(`deltavol ${args.join(' ')} → ${r.status}\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
};

async function replicaStatus(d: TestDaemon, volume: string): Promise<ReplicaStatusJson> {
  const r = await d.api<{ volumes: ReplicaStatusJson[] }>('GET', `/v1/replication?volume=${volume}`);
  return r.volumes[0]!;
}

async function readBlock(d: TestDaemon, volume: string, block: number): Promise<Buffer> {
  const c = await MiniNbdClient.connect(d.nbdPort, volume);
  try {
    const r = await c.read(block * BS, BS);
    expect(r.error).toBe(0);
    return r.data;
  } finally {
    await c.disconnect();
  }
}

async function writeBlock(d: TestDaemon, volume: string, block: number, fill: number): Promise<number> {
  const c = await MiniNbdClient.connect(d.nbdPort, volume);
  try {
    return (await c.write(block * BS, Buffer.alloc(BS, fill))).error;
  } finally {
    await c.disconnect();
  }
}

function volumeNames(d: TestDaemon): string[] {
  return (JSON.parse(cli(d, ['volume', 'list', '--json'])) as { name: string }[]).map((v) => v.name);
}

async function metric(d: TestDaemon, name: string, labels: string): Promise<number> {
  const text = await d.metrics();
  const line = text.split('\n').find((l) => l.startsWith(`${name}{${labels}}`) || (labels === '' && l.startsWith(`${name} `)));
  return line ? Number(line.split(' ').pop()) : NaN;
}

function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m![1]) * 1024;
}

/** A primary `a` with volume `v1` replicated to `b` (duplex, in sync), block 0 holding 0x5a. */
async function pairUp(a: TestDaemon, b: TestDaemon, volume: string): Promise<{ pairId: string }> {
  cli(a, ['volume', 'create', volume, '--size', String(SIZE)]);
  expect(await writeBlock(a, volume, 0, 0x5a)).toBe(0);
  cli(a, ['replica', 'add', volume, '--peer', `127.0.0.1:${b.replPort}`, '--cut-interval', '200ms', '--timeout', '30s']);
  await waitInSync(a, volume, 30_000);
  const r = await replicaStatus(b, volume);
  expect(r.state).toBe('duplex');
  return { pairId: r.pairId };
}

/** After an attack: the pair is untouched (duplex, connected, same generation, block 0 as the primary wrote it). */
async function expectPairUntouched(a: TestDaemon, b: TestDaemon, volume: string, generation = 1): Promise<void> {
  await new Promise((r) => setTimeout(r, 800)); // give a forged set time to land, if it could
  const r = await replicaStatus(b, volume);
  expect(r.generation, 'replica generation').toBe(generation);
  expect(r.state, 'replica state').toBe('duplex');
  expect(r.connected, 'the real primary is still connected').toBe(true);
  const p = await replStatus(a, volume);
  expect(p.replicas[0]!.state, 'primary side of the pair').toMatch(/^duplex/);
  expect(p.replicas[0]!.connected).toBe(true);
  expect((await readBlock(b, volume, 0))[0], 'block 0 on the replica').toBe(0x5a);
  // Still read-only to clients (no forged split took effect).
  expect(await writeBlock(b, volume, 1, 0x11), 'a write to the replica is refused').not.toBe(0);
  // And still replicating: a new write arrives.
  expect(await writeBlock(a, volume, 2, 0x77)).toBe(0);
  await waitInSync(a, volume, 30_000);
  expect((await readBlock(b, volume, 2))[0]).toBe(0x77);
}

/** The words a refusal to an unauthenticated peer must not contain. */
function expectNothingRevealed(m: ReplMessage | null, secrets: string[]): void {
  if (!m || m.t !== 'refuse') return;
  for (const s of secrets) expect(m.message, `refusal "${m.message}" reveals ${s}`).not.toContain(s);
}

describe('replication port without credentials (plain loopback)', () => {
  let a: TestDaemon;
  let b: TestDaemon;
  let pairId = '';

  beforeAll(async () => {
    [a, b] = await Promise.all([startDaemon({ tmpfs: true }), startDaemon({ tmpfs: true })]);
    ({ pairId } = await pairUp(a, b, 'v1'));
  }, 60_000);
  afterAll(async () => {
    await Promise.all([a?.dispose(), b?.dispose()]);
  });

  it('a hello with a stolen pair id and generation 2^32−1 is refused; forged set and split change nothing', async () => {
    const t0 = Date.now();
    const p = await RawPeer.open(b.replPort);
    p.send(helloFor({ pairId, primaryVolume: 'v1', replicaVolume: 'v1', generation: 2 ** 32 - 1, sizeBytes: SIZE }));
    const answer = await p.answer();
    // What the attacker sends next whatever the answer (the old code welcomed it and took all of it).
    const played = (await replicaStatus(b, 'v1')).playedSet;
    p.sendSet(2 ** 32 - 1, played + 1, [[0, 1]], Buffer.alloc(BS, 0xee), played);
    p.send({ t: 'split', generation: 2 ** 32 - 1 });
    expect(answer?.t, JSON.stringify(answer)).toBe('refuse');
    expect(await p.waitClosed()).toBe(true);
    p.destroy();
    await expectPairUntouched(a, b, 'v1');
    console.log(`[repl-attacks] stolen pair id + generation 2^32-1 refused, pair untouched (${Date.now() - t0} ms)`);
  }, 60_000);

  it('refusals tell an unauthenticated peer no pair id, size or name of ours', async () => {
    const secrets = [pairId, String(SIZE), 'replica of', 'bytes'];
    const tries: { port: number; msg: ReplMessage }[] = [
      // Another pair for the replica's name.
      { port: b.replPort, msg: helloFor({ pairId: '000000000000', primaryVolume: 'x', replicaVolume: 'v1', generation: 1, sizeBytes: SIZE, create: false }) },
      // The right pair id but another geometry (the old refusal told the replica's size).
      { port: b.replPort, msg: helloFor({ pairId, primaryVolume: 'v1', replicaVolume: 'v1', generation: 1, sizeBytes: SIZE * 2 }) },
      // A hello for a volume that is a primary.
      { port: a.replPort, msg: helloFor({ pairId: '000000000000', primaryVolume: 'x', replicaVolume: 'v1', generation: 1, sizeBytes: SIZE }) },
      // A name that does not exist, without create.
      { port: b.replPort, msg: helloFor({ pairId: '000000000000', primaryVolume: 'x', replicaVolume: 'nope', generation: 1, sizeBytes: SIZE, create: false }) },
      // A resync request against the replica.
      { port: b.replPort, msg: { t: 'resyncHello', protocol: 2, pairId: '', primaryVolume: 'v1', replicaVolume: 'x', generation: 1, sizeBytes: 4096, blockBytes: 4096, returnHost: '', returnPort: 1 } },
    ];
    let refusals = 0;
    for (const t of tries) {
      const p = await RawPeer.open(t.port);
      p.send(t.msg);
      const m = await p.answer();
      p.destroy();
      expect(m?.t, JSON.stringify(m)).toBe('refuse');
      refusals++;
      expectNothingRevealed(m, secrets);
    }
    expect(refusals).toBe(tries.length);
    await expectPairUntouched(a, b, 'v1');
  }, 60_000);

  it('200 connections each sending a partial 1 MiB hello: RSS grows < 50 MiB, counted, and a real pair still works', async () => {
    const t0 = Date.now();
    const pid = b.proc.pid!;
    const before = rssBytes(pid);
    const frame = Buffer.concat(encodeFrame(helloFor({ pairId: 'aaaaaaaaaaaa', primaryVolume: 'p', replicaVolume: 'big', generation: 1, sizeBytes: SIZE, description: 'x'.repeat(MiB - 1024) })));
    const partial = frame.subarray(0, frame.length - 16);
    const socks: net.Socket[] = [];
    let peak = before;
    const sampler = setInterval(() => (peak = Math.max(peak, rssBytes(pid))), 50);
    try {
      await Promise.all(
        Array.from({ length: 200 }, () => {
          return new Promise<void>((resolve) => {
            const s = net.connect(b.replPort, '127.0.0.1', () => s.write(partial, () => resolve()));
            s.on('error', () => resolve());
            s.on('close', () => resolve());
            setTimeout(resolve, 10_000).unref();
            socks.push(s);
          });
        }),
      );
      await new Promise((r) => setTimeout(r, 1500));
      peak = Math.max(peak, rssBytes(pid));
    } finally {
      clearInterval(sampler);
      for (const s of socks) s.destroy();
    }
    const grewMiB = (peak - before) / MiB;
    const oversize = await metric(b, 'deltavol_replication_connections_refused_total', 'reason="oversize_before_hello"');
    const capped = (await metric(b, 'deltavol_replication_connections_refused_total', 'reason="daemon_cap"')) + (await metric(b, 'deltavol_replication_connections_refused_total', 'reason="address_cap"'));
    console.log(`[repl-attacks] 200 partial 1 MiB hellos: RSS ${(before / MiB).toFixed(0)} → peak ${(peak / MiB).toFixed(0)} MiB (+${grewMiB.toFixed(1)}); closed oversize ${oversize}, refused at the caps ${capped} (${Date.now() - t0} ms)`);
    expect(grewMiB).toBeLessThan(50);
    expect(oversize + capped).toBeGreaterThan(0);
    expect(b.log()).toMatch(/replication connection (closed: a frame larger than a hello|refused: too many unauthenticated)/);
    expect(volumeNames(b)).not.toContain('big');
    // A real pair still works.
    await pairUp(a, b, 'v2');
  }, 90_000);
});

// ---------------------------------------------------------------- TLS

function pskLine(dir: string, identity: string): string {
  const file = path.join(dir, `${identity}.psk`);
  if (have('psktool')) {
    const r = spawnSync('psktool', ['-u', identity, '-p', file], { encoding: 'utf8', timeout: 10_000 });
    if (r.status === 0) return fs.readFileSync(file, 'utf8').trim();
  }
  return `${identity}:${crypto.randomBytes(32).toString('hex')}`;
}

function keyOf(line: string): Buffer {
  return Buffer.from(line.slice(line.lastIndexOf(':') + 1), 'hex');
}

describe('replication over TLS with pre-shared keys (loopback)', () => {
  let a: TestDaemon;
  let b: TestDaemon;
  /** b's first incarnation (owns the data directory) when b was restarted. */
  let bFirst: TestDaemon | undefined;
  let dir = '';
  let pairId = '';
  const lines: Record<string, string> = {};

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dvrt-psk-'));
    for (const id of ['beta', 'alpha', 'gamma', 'mallory']) lines[id] = pskLine(dir, id);
    // Both nodes trust alpha, beta and gamma (gamma: another node of the group); nobody knows mallory.
    const keys = path.join(dir, 'repl.psk');
    fs.writeFileSync(keys, `${lines.beta}\n${lines.alpha}\n${lines.gamma}\n`, { mode: 0o600 });
    [a, b] = await Promise.all([
      startDaemon({ tmpfs: true, extraArgs: ['--repl-tls-psk', keys, '--repl-tls-psk-identity', 'alpha'] }),
      startDaemon({ tmpfs: true, extraArgs: ['--repl-tls-psk', keys] }),
    ]);
    ({ pairId } = await pairUp(a, b, 'v1'));
  }, 60_000);
  afterAll(async () => {
    await Promise.all([a?.dispose(), b?.dispose()]);
    await bFirst?.dispose();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  const creds = (id: string, key?: Buffer): PeerCreds => ({ psk: { identity: id, key: key ?? keyOf(lines[id]!) } });

  it('the pair runs over TLS-PSK, status shows the mode and identities, the pair is bound to them', async () => {
    const st = await a.api<{ daemon: { replTls: { mode: string; identity: string } } }>('GET', '/v1/status');
    expect(st.daemon.replTls).toMatchObject({ mode: 'psk', identity: 'psk:alpha' });
    expect(a.cli(['status']).stdout).toContain('replication security: TLS psk, this node is psk:alpha');
    expect((await replicaStatus(b, 'v1')).peerIdentity).toBe('psk:alpha');
    expect((await replStatus(a, 'v1')).replicas[0]).toMatchObject({ peerIdentity: 'psk:beta' });
    expect(b.log()).toMatch(/replication: TLS \(psk\), this node is psk:beta/);
    expect(await metric(b, 'deltavol_replication_tls', 'mode="psk"')).toBe(1);
  }, 30_000);

  it('without credentials a hand-made client creates nothing and forged frames change nothing', async () => {
    const before = volumeNames(b);
    const p = await RawPeer.open(b.replPort);
    p.send(helloFor({ pairId: 'bbbbbbbbbbbb', primaryVolume: 'p', replicaVolume: 'planted', generation: 1, sizeBytes: 16 * 2 ** 40 }));
    p.send({ t: 'split', generation: 2 ** 32 - 1 });
    p.sendSet(2 ** 32 - 1, 1000, [[0, 1]], Buffer.alloc(BS, 0xee), 0);
    expect(await p.answer(3000)).toBeNull();
    expect(await p.waitClosed(12_000), 'the daemon closes a connection that does not speak TLS').toBe(true);
    p.destroy();
    // The same with a stolen pair id, for the real replica.
    const q = await RawPeer.open(b.replPort);
    q.send(helloFor({ pairId, primaryVolume: 'v1', replicaVolume: 'v1', generation: 2 ** 32 - 1, sizeBytes: SIZE }));
    expect(await q.answer(3000)).toBeNull();
    q.destroy();
    expect(volumeNames(b)).toEqual(before);
    expect(volumeNames(b)).not.toContain('planted');
    await expectPairUntouched(a, b, 'v1');
    expect(await metric(b, 'deltavol_replication_connections_refused_total', 'reason="handshake_failed"')).toBeGreaterThanOrEqual(1);
  }, 60_000);

  it('a connection that never finishes its TLS handshake is cut after 10 s, counted and logged', async () => {
    const before = await metric(b, 'deltavol_replication_connections_refused_total', 'reason="handshake_timeout"');
    const t0 = Date.now();
    const s = net.connect(b.replPort, '127.0.0.1');
    s.on('error', () => undefined);
    const closed = await new Promise<boolean>((r) => {
      s.once('close', () => r(true));
      setTimeout(() => r(false), 15_000).unref();
    });
    const ms = Date.now() - t0;
    s.destroy();
    expect(closed).toBe(true);
    expect(ms).toBeGreaterThanOrEqual(9_000);
    expect(await metric(b, 'deltavol_replication_connections_refused_total', 'reason="handshake_timeout"')).toBe(before + 1);
    expect(b.log()).toMatch(/replication TLS handshake timed out/);
    console.log(`[repl-attacks] silent connection cut after ${ms} ms`);
  }, 30_000);

  it('a wrong key and an unknown identity are refused at the handshake', async () => {
    const failedBefore = await metric(b, 'deltavol_replication_connections_refused_total', 'reason="handshake_failed"');
    const wrong = await RawPeer.open(b.replPort, creds('alpha', crypto.randomBytes(32)));
    wrong.send(helloFor({ pairId, primaryVolume: 'v1', replicaVolume: 'v1', generation: 1, sizeBytes: SIZE }));
    expect(await wrong.answer(3000)).toBeNull();
    expect(await wrong.waitClosed()).toBe(true);
    wrong.destroy();
    const stranger = await RawPeer.open(b.replPort, creds('mallory'));
    stranger.send(helloFor({ pairId: 'cccccccccccc', primaryVolume: 'p', replicaVolume: 'planted2', generation: 1, sizeBytes: SIZE }));
    expect(await stranger.answer(3000)).toBeNull();
    expect(await stranger.waitClosed()).toBe(true);
    stranger.destroy();
    expect(volumeNames(b)).not.toContain('planted2');
    expect(await metric(b, 'deltavol_replication_connections_refused_total', 'reason="handshake_failed"')).toBeGreaterThanOrEqual(failedBefore + 2);
    expect(b.log()).toMatch(/replication TLS handshake failed/);
    await expectPairUntouched(a, b, 'v1');
  }, 60_000);

  it('another verified identity with the stolen pair id (and generation 2^32−1) is refused; the primary keeps its session', async () => {
    for (const generation of [2 ** 32 - 1, 1]) {
      const g = await RawPeer.open(b.replPort, creds('gamma'));
      expect(g.error).toBeNull();
      g.send(helloFor({ pairId, primaryVolume: 'v1', replicaVolume: 'v1', generation, sizeBytes: SIZE }));
      const m = await g.answer();
      const played = (await replicaStatus(b, 'v1')).playedSet;
      g.sendSet(generation, played + 1, [[0, 1]], Buffer.alloc(BS, 0xee), played);
      g.send({ t: 'split', generation });
      expect(m, `generation ${generation}`).toMatchObject({ t: 'refuse', code: 'PEER_REFUSED' });
      g.destroy();
    }
    expect(b.log()).toMatch(/its pair is bound to psk:alpha, the hello came from psk:gamma/);
    await expectPairUntouched(a, b, 'v1');
  }, 60_000);

  it('another verified node at the replica\'s address gets no session and no resync from the primary', async () => {
    const t0 = Date.now();
    const port = b.replPort;
    const keys = path.join(dir, 'repl.psk');
    await b.stop();
    // gamma takes the replica's address (a reused IP, a hijacked DNS name).
    const c = await startDaemon({ tmpfs: true, extraArgs: ['--repl-tls-psk', keys, '--repl-tls-psk-identity', 'gamma', '--repl-port', String(port)] });
    try {
      // The primary's sender reconnects meanwhile, meets gamma and refuses it.
      let p = (await replStatus(a, 'v1')).replicas[0]!;
      for (let i = 0; i < 100 && !/psk:gamma/.test(String(p.reason)); i++) {
        await new Promise((r) => setTimeout(r, 100));
        p = (await replStatus(a, 'v1')).replicas[0]!;
      }
      expect(p.connected, 'the primary does not ship to gamma').toBe(false);
      expect(p).toMatchObject({ peerIdentity: 'psk:beta' });
      expect(String(p.reason), JSON.stringify(p)).toMatch(/is psk:gamma, but this pair is bound to psk:beta: not replicating to it/);
      expect(volumeNames(c)).not.toContain('v1');
      const rs = a.cli(['resync', 'v1']);
      expect(rs.status).not.toBe(0);
      expect(rs.stderr).toMatch(/is psk:gamma, but the pair of v1 is bound to psk:beta: not resyncing from it/);
      const st = (await replStatus(a, 'v1')) as unknown as { role: string; fenced: unknown };
      expect(st.role).toBe('primary');
      expect(st.fenced).toBeNull();
    } finally {
      await c.dispose();
    }
    // The real replica comes back at its address: the pair resumes.
    bFirst = b;
    b = await startDaemon({ dataDir: b.dataDir, extraArgs: ['--repl-tls-psk', keys, '--repl-port', String(port)] });
    await waitInSync(a, 'v1', 30_000);
    await expectPairUntouched(a, b, 'v1');
    console.log(`[repl-attacks] gamma at the replica's address: no session, no resync; the real replica resumed (${Date.now() - t0} ms)`);
  }, 90_000);

  it('a planned takeover keeps the binding: the old primary takes hellos only from the new one; a resync is asked for only with credentials', async () => {
    const t0 = Date.now();
    const sw = b.cli(['failover', 'v1', '--sync', '--json']);
    expect(sw.status, sw.stderr).toBe(0);
    await waitInSync(b, 'v1', 30_000);
    const r = await replicaStatus(a, 'v1');
    expect(r).toMatchObject({ role: 'replica', generation: 2, peerIdentity: 'psk:beta' });
    expect((await replStatus(b, 'v1')).replicas[0]).toMatchObject({ peerIdentity: 'psk:alpha' });
    // Another verified node with the new pair id, at the current and at a higher generation.
    for (const generation of [2, 3]) {
      const g = await RawPeer.open(a.replPort, creds('gamma'));
      g.send(helloFor({ pairId: r.pairId, primaryVolume: 'v1', replicaVolume: 'v1', generation, sizeBytes: SIZE }));
      expect(await g.answer(), `hello at generation ${generation}`).toMatchObject({ t: 'refuse', code: 'PEER_REFUSED' });
      g.destroy();
    }
    // A resync (a new pair on the new primary) needs credentials like a replica add; without them, nothing.
    const resyncHello = (): ReplMessage => ({ t: 'resyncHello', protocol: 2, pairId: '', primaryVolume: 'v1', replicaVolume: 'v1', generation: 1, sizeBytes: SIZE, blockBytes: BS, returnHost: '127.0.0.1', returnPort: 1 });
    const anon = await RawPeer.open(b.replPort);
    anon.send(resyncHello());
    expect(await anon.answer(3000)).toBeNull();
    anon.destroy();
    const al = await RawPeer.open(b.replPort, creds('alpha'));
    al.send(resyncHello());
    expect(await al.answer()).toMatchObject({ t: 'resyncOffer' });
    al.destroy();
    await expectPairUntouched(b, a, 'v1', 2);
    console.log(`[repl-attacks] takeover over TLS-PSK, bindings moved with it, foreign hellos refused, no resync without credentials (${Date.now() - t0} ms)`);
  }, 90_000);

  it('--repl-allow keeps other verified identities out at the handshake', async () => {
    const c = await startDaemon({ tmpfs: true, extraArgs: ['--repl-tls-psk', path.join(dir, 'repl.psk'), '--repl-allow', 'alpha'] });
    try {
      const ok = await RawPeer.open(c.replPort, creds('alpha'));
      expect(ok.error).toBeNull();
      expect(ok.closed).toBe(false);
      ok.destroy();
      const g = await RawPeer.open(c.replPort, creds('gamma'));
      g.send(helloFor({ pairId: 'dddddddddddd', primaryVolume: 'p', replicaVolume: 'g1', generation: 1, sizeBytes: SIZE }));
      expect(await g.answer(3000)).toBeNull();
      expect(await g.waitClosed()).toBe(true);
      g.destroy();
      expect(volumeNames(c)).not.toContain('g1');
    } finally {
      await c.dispose();
    }
  }, 60_000);
});

describe('replication over TLS with X.509 (loopback)', () => {
  const support = have('openssl');
  let dir = '';
  let c: TestDaemon | undefined;

  beforeAll(async () => {
    if (!support) return;
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dvrt-x509-'));
    makePki(dir, ['alpha', 'beta']);
    c = await startDaemon({ tmpfs: true, extraArgs: ['--repl-tls-cert', path.join(dir, 'beta.pem'), '--repl-tls-key', path.join(dir, 'beta.key'), '--repl-tls-ca', path.join(dir, 'ca.pem')] });
  }, 60_000);
  afterAll(async () => {
    await c?.dispose();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it.skipIf(!support)('a certificate of another CA (same CN) and no certificate at all are refused; the right one is let in', async () => {
    const r = (f: string) => fs.readFileSync(path.join(dir, f));
    const ok = await RawPeer.open(c!.replPort, { x509: { cert: r('alpha.pem'), key: r('alpha.key'), ca: r('ca.pem') } });
    expect(ok.error).toBeNull();
    ok.send(helloFor({ pairId: 'eeeeeeeeeeee', primaryVolume: 'p', replicaVolume: 'nope', generation: 1, sizeBytes: SIZE, create: false }));
    expect(await ok.answer()).toMatchObject({ t: 'refuse', code: 'VOLUME_NOT_FOUND' });
    ok.destroy();
    const rogue = await RawPeer.open(c!.replPort, { x509: { cert: r('mallory.pem'), key: r('mallory.key'), ca: r('ca.pem') } });
    rogue.send(helloFor({ pairId: 'ffffffffffff', primaryVolume: 'p', replicaVolume: 'planted', generation: 1, sizeBytes: SIZE }));
    expect(await rogue.answer(3000)).toBeNull();
    expect(await rogue.waitClosed()).toBe(true);
    rogue.destroy();
    const bare = await RawPeer.open(c!.replPort, { x509: { cert: undefined as unknown as Buffer, key: undefined as unknown as Buffer, ca: r('ca.pem') } });
    bare.send(helloFor({ pairId: 'ffffffffffff', primaryVolume: 'p', replicaVolume: 'planted', generation: 1, sizeBytes: SIZE }));
    expect(await bare.answer(3000)).toBeNull();
    expect(await bare.waitClosed()).toBe(true);
    bare.destroy();
    expect(volumeNames(c!)).not.toContain('planted');
    const st = await c!.api<{ daemon: { replTls: { mode: string; identity: string } } }>('GET', '/v1/status');
    expect(st.daemon.replTls).toMatchObject({ mode: 'x509', identity: 'x509:beta' });
  }, 60_000);
});
