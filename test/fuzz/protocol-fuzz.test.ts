// Why: a server on a network must survive whatever arrives. For a bounded time this
// throws random and mutated handshakes and requests at a live daemon, over many
// connections that also hang up at random points, while a well-behaved client keeps
// writing and verifying its own data. Passing means: the daemon never exits, the
// well-behaved client never sees a wrong byte or an error, and memory stays bounded.
import net from 'node:net';
import fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import { prng, testSeed } from '../helpers/seed.js';
import * as C from '../../src/nbd/constants.js';
import { goData, metaData, option, request } from '../helpers/wire.js';

const FUZZ_MS = Number(process.env.DELTAVOL_FUZZ_MS ?? 12_000);
const CONCURRENCY = 6;
const RSS_MAX_BYTES = 400 * 1024 * 1024;

let d: TestDaemon;

beforeAll(async () => {
  d = await startDaemon({ volumes: [{ name: 'target', size: '64M' }, { name: 'canary', size: '16M' }], logLevel: 'warn' });
});
afterAll(async () => {
  await d?.dispose();
});

function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

type Rand = () => number;
const int = (r: Rand, n: number) => Math.floor(r() * n);

function mutate(r: Rand, b: Buffer): Buffer {
  const out = Buffer.from(b);
  const flips = 1 + int(r, 4);
  for (let i = 0; i < flips && out.length > 0; i++) out[int(r, out.length)] ^= 1 << int(r, 8);
  if (r() < 0.2) return out.subarray(0, int(r, out.length + 1)); // truncate
  return out;
}

const CLIENT_FLAGS = Buffer.from([0, 0, 0, C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES]);

/** One fuzzing session: a byte script for one connection. */
function script(r: Rand): Buffer[] {
  const parts: Buffer[] = [];
  const kind = int(r, 5);
  if (kind === 0) {
    // Pure noise from the first byte.
    parts.push(Buffer.from(Array.from({ length: int(r, 512) }, () => int(r, 256))));
    return parts;
  }
  parts.push(r() < 0.9 ? CLIENT_FLAGS : Buffer.from([int(r, 256), int(r, 256), int(r, 256), int(r, 256)]));
  const options = [
    () => option(C.OPT_LIST),
    () => option(C.OPT_STRUCTURED_REPLY),
    () => option(C.OPT_INFO, goData(r() < 0.5 ? 'target' : 'nope', [C.INFO_BLOCK_SIZE, C.INFO_NAME])),
    () => option(C.OPT_LIST_META_CONTEXT, metaData('target', r() < 0.5 ? [] : ['base:'])),
    () => option(C.OPT_SET_META_CONTEXT, metaData('target', ['base:allocation'])),
    () => option(int(r, 20), Buffer.from(Array.from({ length: int(r, 64) }, () => int(r, 256)))),
  ];
  const nOptions = int(r, 6);
  for (let i = 0; i < nOptions; i++) {
    const o = options[int(r, options.length)]!();
    parts.push(kind === 1 ? mutate(r, o) : o);
  }
  if (kind === 1) return parts;
  parts.push(r() < 0.5 ? option(C.OPT_GO, goData('target', [C.INFO_BLOCK_SIZE])) : option(C.OPT_EXPORT_NAME, Buffer.from('target')));
  const size = 64 * 1024 * 1024;
  const nReq = int(r, 40);
  for (let i = 0; i < nReq; i++) {
    const type = r() < 0.9 ? int(r, 9) : int(r, 65536);
    const offset = r() < 0.8 ? int(r, size / 512) * 512 : int(r, 2 ** 52);
    const length = r() < 0.8 ? (1 + int(r, 64)) * 512 : int(r, 2 ** 32);
    const flags = r() < 0.7 ? 0 : int(r, 65536);
    let req = request(type, { offset, length: length >>> 0, flags, cookie: i });
    if (kind === 3) req = mutate(r, req);
    parts.push(req);
    if (type === C.CMD_WRITE) {
      // Full payload, a short one (the connection then desynchronises), or none.
      const n = r() < 0.8 ? Math.min(length, 128 * 1024) : int(r, 4096);
      parts.push(Buffer.alloc(n, int(r, 256)));
      if (length > n) break; // what follows would be payload anyway
    }
  }
  return parts;
}

async function runSession(port: number, r: Rand): Promise<void> {
  const parts = script(r);
  const sock = net.connect({ port, host: '127.0.0.1' });
  sock.on('error', () => undefined);
  sock.on('data', () => undefined); // read and discard replies
  await new Promise<void>((res) => {
    sock.once('connect', () => res());
    sock.once('close', () => res());
  });
  const hangUpAt = r() < 0.3 ? int(r, parts.length + 1) : parts.length;
  for (let i = 0; i < hangUpAt && !sock.destroyed; i++) {
    sock.write(parts[i]!);
    if (r() < 0.3) await new Promise((res) => setTimeout(res, int(r, 5)));
  }
  await new Promise((res) => setTimeout(res, 20 + int(r, 80)));
  sock.destroy();
}

describe('protocol fuzz', () => {
  it(`survives ${FUZZ_MS} ms of random and mutated traffic while a good client works`, async () => {
    const seed = testSeed('protocol fuzz');
    const rand = prng(seed);
    const canary = await MiniNbdClient.connect(d.nbdPort, 'canary');
    const deadline = Date.now() + FUZZ_MS;
    let sessions = 0;
    let canaryOps = 0;
    const canaryLoop = (async () => {
      const cr = prng(seed ^ 0x5555);
      const model = Buffer.alloc(16 * 1024 * 1024);
      while (Date.now() < deadline) {
        const off = Math.floor(cr() * 4096) * 4096;
        const data = Buffer.alloc(4096, Math.floor(cr() * 256));
        const w = await canary.write(off, data);
        expect(w.error).toBe(0);
        data.copy(model, off);
        const rd = await canary.read(off, 4096);
        expect(rd.error).toBe(0);
        expect(rd.data.equals(model.subarray(off, off + 4096))).toBe(true);
        canaryOps++;
      }
    })();
    const workers = Array.from({ length: CONCURRENCY }, async (_, k) => {
      const wr = prng(seed + k + 1);
      while (Date.now() < deadline) {
        await runSession(d.nbdPort, wr);
        sessions++;
        expect(d.exited).toBe(false);
      }
    });
    await Promise.all([canaryLoop, ...workers]);
    await canary.disconnect();
    const rss = rssBytes(d.proc.pid!);
    console.log(`[fuzz] ${sessions} sessions, ${canaryOps} canary write+verify cycles, daemon RSS ${(rss / 2 ** 20).toFixed(0)} MiB`);
    expect(d.exited).toBe(false);
    expect(sessions).toBeGreaterThan(50);
    expect(canaryOps).toBeGreaterThan(50);
    expect(rss).toBeLessThan(RSS_MAX_BYTES);
    // The daemon still serves a fresh client correctly (promptly: a stall here once hung
    // the test to its timeout, so it says what the daemon was doing).
    const stalled = setTimeout(() => {
      void d.fetch('/v1/status').then(async (res) => console.log(`[fuzz] fresh client stalled 10 s; status: ${(await res.text()).slice(0, 4000)}\nlog tail:\n${d.log().split('\n').slice(-40).join('\n')}`), (e) => console.log(`[fuzz] fresh client stalled; status failed: ${String(e)}`));
    }, 10_000);
    try {
      const after = await MiniNbdClient.connect(d.nbdPort, 'canary');
      expect((await after.read(0, 512)).error).toBe(0);
      await after.disconnect();
    } finally {
      clearTimeout(stalled);
    }
    expect(d.log()).not.toMatch(/"level":(50|60)/); // no error/fatal log lines
  });
});
