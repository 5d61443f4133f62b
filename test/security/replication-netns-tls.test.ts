// Why: replica nodes listen on 0.0.0.0 (the README tells them to), so that is where the
// credentials matter: two daemons in two network namespaces joined by a veth replicate
// over TLS, once with a pre-shared key (psktool file) and once with X.509 certificates
// verified both ways; the volumes end byte-equal. A daemon bound to a non-loopback
// address without credentials must refuse to start, and start with --insecure only with
// a loud warning.
//
// Needs root and `ip netns` (skipped otherwise). Namespaces: dvrt-a-PID, dvrt-b-PID.
// Run: npx vitest run test/security/replication-netns-tls.test.ts

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, have } from '../helpers/daemon.js';
import { sha256File } from '../helpers/images.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import { NetLab, NsDaemon, netnsSupport, replSecurityArgs, type NsDaemonOptions } from '../helpers/netns.js';
import { makePki } from '../helpers/pki.js';
import { prng, testSeed } from '../helpers/seed.js';
import type { PrimaryStatusJson } from '../helpers/replication.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;

const support = netnsSupport();
if (!support.ok) console.log(`[repl-netns-tls] SKIPPED: ${support.why}`);

async function waitInSync(a: NsDaemon, volume: string, timeoutMs: number): Promise<PrimaryStatusJson> {
  const deadline = Date.now() + timeoutMs;
  let last: PrimaryStatusJson | null = null;
  while (Date.now() < deadline) {
    const r = await a.api<{ volumes: PrimaryStatusJson[] }>('GET', `/v1/replication?volume=${volume}`);
    last = r.volumes[0]!;
    const p = last.replicas[0];
    if (p && p.state === 'duplex' && p.connected && p.ackedSet === last.currentSet && p.playedSet === last.currentSet && last.changedBlocksSinceCut === 0) return last;
    await new Promise((r2) => setTimeout(r2, 200));
  }
  throw new Error(`${volume} not in sync within ${timeoutMs} ms: ${JSON.stringify(last)}\n${a.logTail()}`);
}

/** Writes seeded data to `volume` on a, replicates it to b, and checks both files are equal. */
async function replicateAndCompare(lab: NetLab, a: NsDaemon, b: NsDaemon, volume: string, seedName: string): Promise<{ ms: number; bytes: number }> {
  const t0 = Date.now();
  const seed = testSeed(seedName);
  const rnd = prng(seed);
  expect(a.cli(['volume', 'create', volume, '--size', String(SIZE)]).status).toBe(0);
  const c = await MiniNbdClient.connect(await a.nbdPort(), volume);
  let bytes = 0;
  const writeSome = async (n: number) => {
    for (let i = 0; i < n; i++) {
      const len = 4096 * (1 + Math.floor(rnd() * 16));
      const off = 4096 * Math.floor(rnd() * ((SIZE - len) / 4096));
      const buf = crypto.createHash('sha256').update(`${seed}:${i}:${off}`).digest();
      const data = Buffer.alloc(len);
      for (let j = 0; j < len; j += buf.length) buf.copy(data, j);
      expect((await c.write(off, data)).error).toBe(0);
      bytes += len;
    }
  };
  await writeSome(100);
  const add = a.cli(['replica', 'add', volume, '--peer', `${lab.addr.b}:${b.replPort}`, '--cut-interval', '300ms', '--timeout', '40s', '--json'], 50_000);
  expect(add.status, add.stderr + a.logTail()).toBe(0);
  await writeSome(100); // delta sets after the initial copy
  await c.disconnect();
  await waitInSync(a, volume, 60_000);
  expect(sha256File(b.volumePath(volume))).toBe(sha256File(a.volumePath(volume)));
  return { ms: Date.now() - t0, bytes };
}

describe.skipIf(!support.ok)('replication between two namespaces over TLS', () => {
  let lab: NetLab;
  let dir = '';

  beforeAll(() => {
    lab = NetLab.create({ prefix: 'dvrt-' });
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dvrt-netns-tls-'));
  });
  afterAll(async () => {
    await lab?.dispose();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  const start = (side: 'a' | 'b', replSecurity: NsDaemonOptions['replSecurity'], port: number) => NsDaemon.start(lab, side, { tmpfs: true, replSecurity, nbdPort: port, controlPort: port + 1, replPort: port + 2 });

  it('with a pre-shared key (psktool file): the pair runs over TLS-PSK and the volumes end equal', async () => {
    let psk = lab.pskFile();
    if (have('psktool')) {
      // The format as psktool writes it (identities node-a, node-b).
      psk = path.join(dir, 'psktool.psk');
      for (const id of ['node-a', 'node-b']) expect(lab.exec('a', 'psktool', ['-u', id, '-p', psk]).status).toBe(0);
    }
    const args = (side: 'a' | 'b') => ['--repl-tls-psk', psk, '--repl-tls-psk-identity', `node-${side}`];
    const a = await NsDaemon.start(lab, 'a', { tmpfs: true, replSecurity: 'none', extraArgs: args('a'), nbdPort: 11809, controlPort: 11810, replPort: 11811 });
    const b = await NsDaemon.start(lab, 'b', { tmpfs: true, replSecurity: 'none', extraArgs: args('b'), nbdPort: 11809, controlPort: 11810, replPort: 11811 });
    const r = await replicateAndCompare(lab, a, b, 'vpsk', 'repl-netns-psk');
    const rs = await b.api<{ volumes: { peerIdentity: string | null }[] }>('GET', '/v1/replication?volume=vpsk');
    expect(rs.volumes[0]!.peerIdentity).toBe('psk:node-a');
    expect(b.log()).toMatch(/replication: TLS \(psk\), this node is psk:node-b/);
    console.log(`[repl-netns-tls] PSK: ${(r.bytes / MiB).toFixed(1)} MiB written and replicated across namespaces, equal after ${r.ms} ms`);
    await a.close();
    await b.close();
  }, 120_000);

  it.skipIf(!have('openssl'))('with X.509 certificates verified both ways: the volumes end equal', async () => {
    makePki(dir, ['node-a', 'node-b']);
    const x = (n: string) => ({ certFile: path.join(dir, `${n}.pem`), keyFile: path.join(dir, `${n}.key`), caFile: path.join(dir, 'ca.pem') });
    const a = await start('a', x('node-a'), 12809);
    const b = await start('b', x('node-b'), 12809);
    const r = await replicateAndCompare(lab, a, b, 'vx509', 'repl-netns-x509');
    const ps = await a.api<{ volumes: PrimaryStatusJson[] }>('GET', '/v1/replication?volume=vx509');
    expect((ps.volumes[0]!.replicas[0] as unknown as { peerIdentity: string }).peerIdentity).toBe('x509:node-b');
    console.log(`[repl-netns-tls] X.509: ${(r.bytes / MiB).toFixed(1)} MiB written and replicated across namespaces, equal after ${r.ms} ms`);
    await a.close();
    await b.close();
  }, 120_000);

  it('replication on 0.0.0.0 without credentials does not start; --insecure starts with a loud warning', async () => {
    const data = fs.mkdtempSync(path.join(os.tmpdir(), 'dvrt-insecure-'));
    try {
      const base = [CLI, 'serve', '--data-dir', data, '--port', '0', '--control-port', '0', '--repl-bind', '0.0.0.0', '--repl-port', '0'];
      const refused = lab.exec('a', process.execPath, [...base, ...replSecurityArgs(lab, 'a', 'none')], { allowFail: true, timeoutMs: 20_000 });
      expect(refused.status).not.toBe(0);
      expect(refused.stdout + refused.stderr).toMatch(/without credentials.*--insecure/s);
      const d = await NsDaemon.start(lab, 'a', { tmpfs: true, replSecurity: 'insecure', nbdPort: 13809, controlPort: 13810, replPort: 13811 });
      expect(d.log()).toMatch(/INSECURE: replication listens on 0\.0\.0\.0:13811 WITHOUT authentication/);
      expect(d.log()).toMatch(/WARNING: replication on 0\.0\.0\.0:13811 runs WITHOUT authentication/);
      expect(d.cli(['status']).stdout).toContain('replication security: NONE (--insecure');
      await d.close();
    } finally {
      fs.rmSync(data, { recursive: true, force: true });
    }
  }, 60_000);
});
