// Why: deltavol chooses the TCP congestion control of the connections it sends data on
// (src/util/tcp-congestion.ts): CUBIC on loopback by default, because the host's BBR paces
// and reorders segments there, the system's choice elsewhere, or what --tcp-congestion names.
// Checked where the kernel shows it: `ss -ti` of the daemons' own sockets, NBD and replication,
// and the parsing and refusals in-process.

import net from 'node:net';
import fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, run, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { waitInSync } from '../helpers/replication.js';
import { silentLogger } from '../../src/util/log.js';
import { loadSockx, socketFd } from '../../src/util/native-send.js';
import { applyTcpCongestion, configureTcpCongestion, congestionFor, parseTcpCongestion } from '../../src/util/tcp-congestion.js';

const systemDefault = fs.readFileSync('/proc/sys/net/ipv4/tcp_congestion_control', 'utf8').trim();

/** The congestion control `ss` shows for the established TCP sockets matching `filter` (e.g. "sport = :10809"). */
function congestionOf(filter: string): string[] {
  const out = run('ss', ['-tinH', 'state', 'established', `( ${filter} )`]).stdout;
  // One line per socket, then an indented line of TCP info whose first word is the algorithm.
  return out
    .split('\n')
    .filter((l) => /^\s/.test(l) && l.trim() !== '')
    .map((l) => l.trim().split(/\s+/)[0]!);
}

async function waitFor<T>(what: string, get: () => T[], timeoutMs = 10_000): Promise<T[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = get();
    if (v.length > 0) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A connected loopback pair in this process: [accepted side, client side]. */
async function loopbackPair(): Promise<{ server: net.Server; accepted: net.Socket; client: net.Socket }> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const acceptedP = new Promise<net.Socket>((r) => server.once('connection', r));
  const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  await new Promise<void>((r) => client.once('connect', () => r()));
  return { server, accepted: await acceptedP, client };
}

describe('TCP congestion control policy', () => {
  it('parses auto, system and algorithm names, and refuses anything else', () => {
    expect(parseTcpCongestion('auto')).toEqual({ kind: 'auto' });
    expect(parseTcpCongestion(' system ')).toEqual({ kind: 'system' });
    expect(parseTcpCongestion('reno')).toEqual({ kind: 'set', name: 'reno' });
    for (const bad of ['', 'BBR', 'cu bic', 'a'.repeat(16), 'x;y']) expect(() => parseTcpCongestion(bad), bad).toThrow(/--tcp-congestion/);
  });

  it('auto picks cubic for loopback peers only; system never sets; a name is set everywhere', () => {
    const auto = { kind: 'auto' } as const;
    for (const a of ['127.0.0.1', '127.3.2.1', '::1', '::ffff:127.0.0.1']) expect(congestionFor(auto, a), a).toBe('cubic');
    for (const a of ['10.0.0.2', '192.168.1.5', '::ffff:10.1.1.1', 'fe80::1']) expect(congestionFor(auto, a), a).toBeNull();
    expect(congestionFor(auto, undefined)).toBeNull(); // a Unix socket
    expect(congestionFor({ kind: 'system' }, '127.0.0.1')).toBeNull();
    expect(congestionFor({ kind: 'set', name: 'reno' }, '10.0.0.2')).toBe('reno');
    expect(congestionFor({ kind: 'set', name: 'reno' }, undefined)).toBeNull();
  });

  it('sets the policy on real sockets, and refuses an algorithm the kernel lacks at configuration', async () => {
    const sockx = loadSockx();
    expect(sockx, 'the addon is built by npm run build').not.toBeNull();
    const log = silentLogger();
    try {
      await configureTcpCongestion({ kind: 'auto' }, log);
      let p = await loopbackPair();
      expect(applyTcpCongestion(p.accepted)).toBe('cubic');
      expect(sockx!.congestion(socketFd(p.accepted))).toBe('cubic');
      expect(sockx!.congestion(socketFd(p.client))).toBe(systemDefault); // not ours to change
      p.client.destroy();
      p.accepted.destroy();
      p.server.close();

      await configureTcpCongestion({ kind: 'set', name: 'reno' }, log);
      p = await loopbackPair();
      expect(applyTcpCongestion(p.accepted)).toBe('reno');
      expect(sockx!.congestion(socketFd(p.accepted))).toBe('reno');
      p.client.destroy();
      p.accepted.destroy();
      p.server.close();

      await configureTcpCongestion({ kind: 'system' }, log);
      p = await loopbackPair();
      expect(applyTcpCongestion(p.accepted)).toBeNull();
      expect(sockx!.congestion(socketFd(p.accepted))).toBe(systemDefault);
      p.client.destroy();
      p.accepted.destroy();
      p.server.close();

      await expect(configureTcpCongestion({ kind: 'set', name: 'nosuchalgo' }, log)).rejects.toThrow(/no algorithm nosuchalgo.*tcp_available_congestion_control/);
    } finally {
      await configureTcpCongestion({ kind: 'auto' }, log);
    }
  });
});

describe('daemons set it on their NBD and replication sockets', () => {
  let a: TestDaemon; // default (auto)
  let b: TestDaemon; // --tcp-congestion reno
  beforeAll(async () => {
    [a, b] = await Promise.all([startDaemon({ tmpfs: true }), startDaemon({ tmpfs: true, extraArgs: ['--tcp-congestion', 'reno'] })]);
  });
  afterAll(async () => {
    await Promise.all([a?.dispose(), b?.dispose()]);
  });

  it('an NBD connection from loopback gets cubic by default, and the named algorithm with --tcp-congestion', async () => {
    for (const [d, want] of [
      [a, 'cubic'],
      [b, 'reno'],
    ] as const) {
      const s = net.connect(d.nbdPort, '127.0.0.1');
      await new Promise<void>((r) => s.once('data', () => r())); // the greeting: accepted and set
      expect(await waitFor('the NBD socket', () => congestionOf(`sport = :${d.nbdPort}`))).toEqual([want]);
      s.destroy();
    }
  });

  it('the replication link: the primary sets it on its outbound socket, the replica on the one it accepted', async () => {
    const r = b.cli(['volume', 'create', 'v', '--size', '8M']);
    expect(r.status, r.stderr).toBe(0);
    const add = b.cli(['replica', 'add', 'v', '--peer', `127.0.0.1:${a.replPort}`, '--json']);
    expect(add.status, add.stderr).toBe(0);
    await waitInSync(b, 'v');
    // b (reno) dialled a's replication port; a (auto) accepted from loopback.
    expect(await waitFor('the primary link socket', () => congestionOf(`dport = :${a.replPort}`))).toEqual(expect.arrayContaining(['reno']));
    expect(new Set(congestionOf(`dport = :${a.replPort}`))).toEqual(new Set(['reno']));
    expect(new Set(await waitFor('the replica link socket', () => congestionOf(`sport = :${a.replPort}`)))).toEqual(new Set(['cubic']));
  });

  it('a daemon refuses to start with an algorithm the kernel does not have', () => {
    const dir = fs.mkdtempSync('/dev/shm/deltavol-test-cc-');
    try {
      const out = run(process.execPath, [CLI, 'serve', '--data-dir', dir, '--port', '0', '--control-port', '0', '--repl-port', '0', '--tcp-congestion', 'nosuchalgo'], { allowFail: true, timeoutMs: 20_000 });
      expect(out.status).not.toBe(0);
      expect(out.stderr).toMatch(/--tcp-congestion nosuchalgo: the kernel has no algorithm nosuchalgo/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
