// Why: the CLI is what operators and scripts use: help everywhere, exit codes scripts
// can branch on, messages a person understands, and volume changes that NBD clients
// actually see. SIGTERM must be a clean stop: acknowledged writes survive a restart.

import { execFile } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, freePort, run, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { tempDir } from '../helpers/images.js';
import { nbdshBackground, nbdshOut } from '../helpers/nbdsh.js';
import { RawNbd } from '../helpers/raw-nbd.js';

const MiB = 1024 * 1024;
let d: TestDaemon;

beforeAll(async () => {
  d = await startDaemon({
    volumes: [
      { name: 'grow', size: '16M' },
      { name: 'flip', size: '16M' },
      { name: 'busy', size: '16M' },
    ],
  });
});

afterAll(async () => {
  await d?.dispose();
});

/** The CLI without a daemon behind it. */
function cli(args: string[]) {
  return run(process.execPath, [CLI, ...args], { allowFail: true, timeoutMs: 30_000 });
}

/** The CLI without a daemon, run concurrently with others (node start-up dominates). */
function cliAsync(args: string[]): Promise<{ status: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { timeout: 30_000 }, (err, stdout, stderr) => {
      const status = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      resolve({ status, stdout, stderr });
    });
  });
}

function nbdinfo(args: string[]) {
  return run('nbdinfo', args, { allowFail: true, timeoutMs: 30_000 });
}


async function waitFor(what: string, cond: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('cli: usage and exit codes', () => {
  it('--help works on every command and exits 0', async () => {
    const commands = [
      [],
      ['serve'],
      ['volume'],
      ['volume', 'create'],
      ['volume', 'list'],
      ['volume', 'info'],
      ['volume', 'resize'],
      ['volume', 'set'],
      ['volume', 'delete'],
      ['default-export'],
      ['status'],
    ];
    const results = await Promise.all(commands.map((c) => cliAsync([...c, '--help'])));
    for (const [k, c] of commands.entries()) {
      const r = results[k]!;
      expect(r.status, `${c.join(' ')} --help: ${r.stderr}`).toBe(0);
      expect(r.stdout, c.join(' ')).toMatch(/^Usage: deltavol/m);
    }
  });

  it('bad usage exits 2 with a message', async () => {
    const cases = [
      ['no-such-command'],
      ['volume', 'create', 'x'], // --size missing
      ['volume', 'create', 'x', '--size', 'banana'],
      ['volume', 'info'], // name missing
      ['status', '--bogus-flag'],
    ];
    const results = await Promise.all(cases.map((c) => cliAsync(['--control', `127.0.0.1:${d.controlPort}`, ...c])));
    for (const [k, c] of cases.entries()) {
      const r = results[k]!;
      expect(r.status, `${c.join(' ')}: ${r.stdout}${r.stderr}`).toBe(2);
      expect(r.stderr.trim().length, c.join(' ')).toBeGreaterThan(0);
    }
  });

  it('an unreachable daemon exits 3 and says how to point at one', async () => {
    const port = await freePort();
    const r = cli(['--control', `127.0.0.1:${port}`, 'volume', 'list']);
    expect(r.status).toBe(3);
    expect(r.stderr).toMatch(/cannot reach the deltavol daemon at 127\.0\.0\.1:\d+/);
    expect(r.stderr).toMatch(/--control/);
    expect(r.stderr).not.toMatch(/\n\s+at /); // no stack trace
  });

  it('a volume that does not exist exits 4', async () => {
    const cases = [['volume', 'info', 'nope'], ['volume', 'resize', 'nope', '--size', '1G'], ['volume', 'delete', 'nope']];
    const results = await Promise.all(cases.map((c) => cliAsync(['--control', `127.0.0.1:${d.controlPort}`, ...c])));
    for (const [k, c] of cases.entries()) {
      const r = results[k]!;
      expect(r.status, c.join(' ')).toBe(4);
      expect(r.stderr).toMatch(/no volume named "nope"/);
    }
  });

  it('creating a volume that exists exits 5', () => {
    const r = d.cli(['volume', 'create', 'grow', '--size', '1M']);
    expect(r.status).toBe(5);
    expect(r.stderr).toMatch(/already exists/);
  });

  it('status --json and volume list --json parse and describe the daemon', () => {
    const r = d.cli(['status', '--json']);
    expect(r.status, r.stderr).toBe(0);
    const s = JSON.parse(r.stdout) as { daemon: { pid: number; nbdPort: number; controlPort: number }; volumes: { name: string }[] };
    expect(s.daemon.pid).toBe(d.proc.pid);
    expect(s.daemon.nbdPort).toBe(d.nbdPort);
    expect(s.daemon.controlPort).toBe(d.controlPort);
    expect(s.volumes.map((v) => v.name).sort()).toEqual(['busy', 'flip', 'grow']);
    const l = JSON.parse(d.cli(['volume', 'list', '--json']).stdout) as { name: string; sizeBytes: number }[];
    expect(l.find((v) => v.name === 'busy')?.sizeBytes).toBe(16 * MiB);
  });
});

describe('cli: volume changes seen by clients', () => {
  it('resize grows a volume and a new connection sees the new size; shrinking is refused', () => {
    const g = d.cli(['volume', 'resize', 'grow', '--size', '40M']);
    expect(g.status, g.stderr).toBe(0);
    expect(nbdinfo(['--size', d.uri('grow')]).stdout.trim()).toBe(String(40 * MiB));
    const s = d.cli(['volume', 'resize', 'grow', '--size', '8M']);
    expect(s.status).toBe(1);
    expect(s.stderr).toMatch(/cannot shrink/);
    expect(nbdinfo(['--size', d.uri('grow')]).stdout.trim()).toBe(String(40 * MiB));
  });

  it('volume set --read-only makes new connections read-only, --read-write undoes it', () => {
    expect(nbdinfo(['--is', 'read-only', d.uri('flip')]).status).toBe(2);
    expect(d.cli(['volume', 'set', 'flip', '--read-only']).status).toBe(0);
    expect(nbdinfo(['--is', 'read-only', d.uri('flip')]).status).toBe(0);
    expect(nbdinfo(['--can', 'write', d.uri('flip')]).status).toBe(2);
    expect(d.cli(['volume', 'set', 'flip', '--read-write']).status).toBe(0);
    expect(nbdinfo(['--is', 'read-only', d.uri('flip')]).status).toBe(2);
  });

  it('delete is refused (exit 5) while a client is connected, and works once it has gone', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    try {
      await c.handshake('busy');
      const r = d.cli(['volume', 'delete', 'busy']);
      expect(r.status).toBe(5);
      expect(r.stderr).toMatch(/connected client/);
      expect(d.cli(['volume', 'info', 'busy']).status).toBe(0);
    } finally {
      c.destroy();
    }
    const connections = () => (JSON.parse(d.cli(['volume', 'info', 'busy', '--json']).stdout) as { connections: number }).connections;
    await waitFor('the client to be gone', () => connections() === 0);
    const r = d.cli(['volume', 'delete', 'busy']);
    expect(r.status, r.stderr).toBe(0);
    expect(d.cli(['volume', 'info', 'busy']).status).toBe(4);
  });
});

describe('cli: shutdown', () => {
  it('SIGTERM during a write load exits 0, and every acknowledged write is there after a restart', async () => {
    const dataDir = tempDir('sigterm');
    let d1: TestDaemon | undefined;
    let d2: TestDaemon | undefined;
    let load: ReturnType<typeof nbdshBackground> | undefined;
    try {
      d1 = await startDaemon({ dataDir, volumes: [{ name: 'load', size: '64M' }] });
      // Overwrites 1024 blocks of 64 KiB round after round, 16 writes in flight, until
      // the server goes away; block i of round g holds pattern(g * 4096 + i).
      load = nbdshBackground(`
        h = connect(${JSON.stringify(d1.uri('load'))})
        BS, N, DEPTH = 65536, 1024, 16
        acked = {}
        submitted = {}
        ended = None
        t0 = time.monotonic()
        def submit(k):
            i, g = k % N, k // N
            buf = nbd.Buffer.from_bytearray(bytearray(pattern(g * 4096 + i, BS)))
            def done(err, i=i, g=g, buf=buf):
                if err.value == 0:
                    acked[i] = max(acked.get(i, -1), g)
                return 1
            submitted[i] = g
            h.aio_pwrite(buf, i * BS, completion=done)
        k = 0
        try:
            while time.monotonic() - t0 < 20:
                while h.aio_in_flight() < DEPTH:
                    submit(k)
                    k += 1
                    if k == 256:
                        print('LOADING', flush=True)
                h.poll(-1)
        except nbd.Error as e:
            ended = e.string
        out({'acked': acked, 'submitted': submitted, 'ended': ended, 'writes': k})
      `);
      await waitFor('the write load to start', () => load!.lines.includes('LOADING'), 15_000);
      await new Promise((r) => setTimeout(r, 300));
      const code = await d1.stop();
      expect(code).toBe(0);
      const exit = await Promise.race([load.exited, new Promise((r) => setTimeout(() => r('timeout'), 15_000))]);
      expect(exit).toBe(0);
      const outLine = load.lines.find((l) => l.startsWith('@@OUT '));
      expect(outLine).toBeDefined();
      const res = JSON.parse(outLine!.slice(6)) as { acked: Record<string, number>; submitted: Record<string, number>; ended: string | null; writes: number };
      expect(res.ended, 'the load should end because the server closed').not.toBeNull();
      expect(Object.keys(res.acked).length).toBeGreaterThan(0);

      d2 = await startDaemon({ dataDir });
      const bad = nbdshOut<string[]>(`
        h = connect(${JSON.stringify(d2.uri('load'))})
        acked = ${JSON.stringify(res.acked)}
        submitted = ${JSON.stringify(res.submitted)}
        bad = []
        for i, g in acked.items():
            data = h.pread(65536, int(i) * 65536)
            # The last acknowledged round, or the one after it if that was in flight at the stop.
            ok = [gg for gg in {g, submitted[i]} if data == pattern(gg * 4096 + int(i), 65536)]
            if not ok:
                bad.append(i)
        out(bad)
      `, { timeoutMs: 60_000 });
      expect(bad).toEqual([]);
    } finally {
      load?.proc.kill('SIGKILL');
      await d1?.kill();
      await d2?.dispose();
      fs.rmSync(dataDir, { recursive: true, force: true });
    }
  });
});
