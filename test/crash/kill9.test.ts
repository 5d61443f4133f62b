// Why: the volume engine promises (README "Volume engine", issue 4 "Crash safety") that a
// kill -9 at any instant never loses a write made durable (FUA or a completed FLUSH),
// never lets a snapshot read data newer than its creation, and never leaves a changed
// block missing from both the pending bitmap and the activity log (it would silently never
// replicate). This test checks those promises against a real daemon in a child process:
// several NBD connections keep pipelined writes of mixed sizes, TRIMs, zeroes and FLUSHes
// in flight, snapshots are created and deleted through the CLI, and the daemon is killed
// with SIGKILL at seeded random moments, dozens of times, restarted on the same data
// directory each time. A log of every request (issued, acknowledged, durable) is the model.
//
// Layout: a 256 MiB volume (64 activity extents of 4 MiB); the test writes only inside 60
// windows of 128 KiB, one per extent, some straddling an extent boundary, some not 4 KiB
// aligned (so "aligned" writes are partial tracking blocks). Each kill epoch loads a few
// windows (some never touched before), so activity-log extents turn hot during the load and
// a kill can land between "extent logged" and "data written". The model space is the
// concatenation of the windows (7.5 MiB).
//
// After each kill, with the daemon dead, the engine's own files are read with its own
// classes (BitmapFile, ActivityLog): no cut is ever taken here, so every block ever written
// (acknowledged, or seen changed on disk) must be in the pending bitmap or in an extent the
// activity log names (recovery marks those whole), and every block holding data on disk must
// be valid or in such an extent. After each restart: no error log lines, the volume loaded,
// durable writes read back, every snapshot reads as of its creation (first against the
// model, then byte for byte what it read the first time); at the end SIGTERM exits 0 and
// leaves the activity log empty.
//
// Also here: crash recovery time of a 1 GiB volume (printed: the README states it), and a
// snapshot save area (volume create --snapshot-space) filling under load, then SIGKILL.
//
// Replay: DELTAVOL_SEED=<printed seed> npx vitest run test/crash/kill9.test.ts
// (kill instants relative to the I/O are timing, so a replay is similar, not identical).
// Soak of snapshot deletes against kills: KILL9_SNAP_CHURN=1 (a create and a delete every epoch), in a loop.

import { execFile, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import * as C from '../../src/nbd/constants.js';
import { BitmapFile } from '../../src/bitmap/bitmap-file.js';
import { ActivityLog } from '../../src/bitmap/activity-log.js';
import { WriteJournal, journalRegionBytesDefault } from '../../src/bitmap/write-journal.js';
import { nodeDurableFs } from '../../src/util/durable-fs.js';
import { activityExtentBytes } from '../../src/volume/engine-limits.js';
import { Volume } from '../../src/volume/volume.js';
import { parseVolumeMeta } from '../../src/volume/volume-meta.js';
import { syncIoBytesMaxDefault } from '../../src/util/limits.js';
import { CLI, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { MiniNbdClient } from '../helpers/nbd-client.js';
import { prng, testSeed } from '../helpers/seed.js';
import { checkAgainstModel, type ModelOp } from '../helpers/crash-model.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const VOL = 'v';
const VOL_BYTES = 256 * MiB;
const BLOCK = 4 * KiB; // the volume's tracking block (default)
const WIN = 128 * KiB;
const NW = 60;
const MODEL_BYTES = NW * WIN;
const KILLS_MAX = 40;
const KILL_PHASE_MS = 50_000; // the kill loop stops starting epochs after this
const CONNECTIONS = 3;
const LANES = 6; // requests in flight per connection
const SNAPSHOTS_LIVE_MAX = 4;
/** KILL9_SNAP_CHURN=1 (soak runs): a snapshot create and a delete in every epoch that allows them. */
const SNAP_CHURN = process.env.KILL9_SNAP_CHURN === '1';

const seed = testSeed('crash/kill9');
const rnd = prng(seed);
const randInt = (lo: number, hi: number) => lo + Math.floor(rnd() * (hi - lo + 1)); // inclusive

/** Volume offset of each window. */
const windowBase: number[] = [];
for (let i = 0; i < NW; i++) {
  const ext = i * activityExtentBytes;
  if (i % 4 === 0) windowBase.push(ext + activityExtentBytes - WIN / 2); // straddles extents i, i+1
  // 512-aligned, past the end of window i-1 (which straddles into this extent).
  else if (i % 4 === 1) windowBase.push(ext + WIN / 2 + 512 * randInt(1, (activityExtentBytes - WIN - WIN / 2) / 512 - 8));
  else windowBase.push(ext + BLOCK * randInt(0, (activityExtentBytes - WIN) / BLOCK - 1));
}
for (let i = 0; i < NW; i++) {
  if (windowBase[i]! % 512 !== 0 || windowBase[i]! + WIN > VOL_BYTES) throw new Error('bad window layout');
  if (i > 0 && windowBase[i - 1]! + WIN > windowBase[i]!) throw new Error(`windows ${i - 1} and ${i} overlap`);
}
const volAt = (m: number) => windowBase[Math.floor(m / WIN)]! + (m % WIN);

/** Deterministic-per-seed data (random bytes from a second stream). */
const dataRnd = prng(seed ^ 0x5eed);
function randomBytes(n: number): Buffer {
  const words = new Uint32Array(Math.ceil(n / 4));
  for (let i = 0; i < words.length; i++) words[i] = Math.floor(dataRnd() * 2 ** 32);
  return Buffer.from(words.buffer, 0, n);
}

function cliAsync(d: TestDaemon, args: string[]): Promise<{ status: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...d.controlArgs(), ...args], { timeout: 30_000 }, (err, stdout, stderr) => {
      const status = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      resolve({ status, stdout, stderr });
    });
  });
}

/** An engine's snapshot manifest as text, for a failure's message. */
function manifestText(engineDir: string): string {
  try {
    return fs.readFileSync(path.join(engineDir, 'snapshots.json'), 'utf8');
  } catch (e) {
    return `(unreadable: ${(e as Error).message})`;
  }
}

/** Names of the visible snapshots in an engine's manifest, or null if it cannot be read now. */
function manifestNames(engineDir: string): string[] | null {
  try {
    const m = JSON.parse(manifestText(engineDir)) as { snapshots: { name: string; hidden?: boolean }[] };
    return m.snapshots.filter((x) => x.hidden !== true).map((x) => x.name);
  } catch {
    return null;
  }
}

/** The daemon log's lines about snapshots (pino JSON), for a failure's message. */
function snapshotLogLines(log: string): string {
  return log
    .split('\n')
    .filter((l) => l.includes('"snapshot'))
    .slice(-20)
    .join('\n');
}

/** Log lines at error level or worse (pino JSON: level ≥ 50), and the "volumes loaded" lines. */
function logProblems(d: TestDaemon): { errors: string[]; loaded: string[][] } {
  const errors: string[] = [];
  const loaded: string[][] = [];
  for (const line of d.log().split('\n')) {
    if (!line.trim()) continue;
    let j: { level?: number; msg?: string; volumes?: string[] };
    try {
      j = JSON.parse(line);
    } catch {
      errors.push(`not JSON: ${line}`);
      continue;
    }
    if ((j.level ?? 0) >= 50) errors.push(line);
    if (j.msg === 'volumes loaded') loaded.push(j.volumes ?? []);
  }
  return { errors, loaded };
}

/** Reads the model space from an export (volume or snapshot), a few windows at a time. */
async function readModelSpace(c: MiniNbdClient): Promise<Buffer> {
  const out = Buffer.alloc(MODEL_BYTES);
  for (let w = 0; w < NW; w += 4) {
    const rs = await Promise.all(
      [0, 1, 2, 3].filter((k) => w + k < NW).map((k) => c.read(windowBase[w + k]!, WIN).then((r) => ({ k, r }))),
    );
    for (const { k, r } of rs) {
      if (r.error !== 0) throw new Error(`read of window ${w + k} failed: error ${r.error}`);
      r.data.copy(out, (w + k) * WIN);
    }
  }
  return out;
}

type SnapState = 'creating' | 'created' | 'unknown' | 'deleting' | 'deleted';
interface Snap {
  name: string;
  state: SnapState;
  epoch: number;
  start: number;
  end: number;
  /** Exact content (model space) once checked against the model. */
  content: Buffer | null;
  /** What happened to it, for a failure's message (epoch, request, answer, verification). */
  history: string[];
}

interface Epoch {
  index: number;
  base: Buffer;
  ops: ModelOp[];
}

describe('kill -9 under load', () => {
  const dirs: string[] = [];
  afterAll(() => {
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  });

  it('keeps durable writes, snapshots and the change log across repeated SIGKILLs (up to 40)', async () => {
    const t0 = Date.now();
    const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'deltavol-kill9-'));
    dirs.push(dataDir);
    const engineDir = path.join(dataDir, 'volumes', VOL, 'engine');
    const dataImg = path.join(dataDir, 'volumes', VOL, 'data.img');
    const blocksTotal = VOL_BYTES / BLOCK;
    const extentBlocks = activityExtentBytes / BLOCK;
    /** Blocks written (acknowledged, or seen changed on disk) since the volume was created. */
    const everChanged = new Uint8Array(blocksTotal);
    const snaps: Snap[] = [];
    let snapSeq = 0;
    let clock = 0;
    let kills = 0;
    const stats = { ops: 0, bytes: 0, fua: 0, flushes: 0, zeroes: 0, inflightAtKill: 0, snapsCreated: 0, snapsChecked: 0, snapsDeleted: 0, restartMs: [] as number[], hotAtKill: [] as number[], journaledAtKill: [] as number[], ackedLostBytes: 0, restores: 0 };
    const phaseMs: Record<string, number> = {};
    const phase = async <T,>(name: string, fn: () => Promise<T> | T): Promise<T> => {
      const t = Date.now();
      try {
        return await fn();
      } finally {
        phaseMs[name] = (phaseMs[name] ?? 0) + Date.now() - t;
      }
    };
    const touched = new Set<number>();
    let model: Buffer = Buffer.alloc(MODEL_BYTES); // content at the start of the current epoch
    let prev: Epoch | null = null;
    let lastLog = '';
    const diskAtKill = Buffer.alloc(MODEL_BYTES);
    const badPerWindow = (ep: Epoch, actual: Buffer) => {
      const out: Record<number, number> = {};
      for (let w = 0; w < NW; w++) {
        const sub = checkAgainstModel(
          ep.base.subarray(w * WIN, (w + 1) * WIN),
          ep.ops.filter((op) => Math.floor(op.start / WIN) === w).map((op) => ({ ...op, start: op.start - w * WIN })),
          actual.subarray(w * WIN, (w + 1) * WIN),
          (op) => op.durable,
          () => true,
          0,
        );
        if (sub.bad) out[w] = sub.bad;
      }
      return out;
    };

    const failures: string[] = [];
    const fail = (m: string) => {
      failures.push(m);
      throw new Error(`${m} (seed ${seed})`);
    };

    const start = async (first: boolean): Promise<TestDaemon> => {
      const t = Date.now();
      const d = await startDaemon({ dataDir, volumes: first ? [{ name: VOL, size: String(VOL_BYTES) }] : [] });
      if (!first) stats.restartMs.push(Date.now() - t);
      const { errors, loaded } = logProblems(d);
      if (errors.length > 0) fail(`restart ${kills}: error log lines:\n${errors.join('\n')}`);
      if (!first && !(loaded.length === 1 && loaded[0]!.includes(VOL))) fail(`restart ${kills}: volume not loaded: ${JSON.stringify(loaded)}`);
      return d;
    };

    /** Verifies the volume after a restart against the previous epoch; returns its content. */
    const verifyVolume = async (c: MiniNbdClient, ep: Epoch | null): Promise<Buffer> => {
      const f = await c.flush(); // what we read now is durable: the next epoch's exact base
      if (f.error !== 0) fail(`flush after restart failed: ${f.error}`);
      const actual = await readModelSpace(c);
      if (ep) {
        const r = checkAgainstModel(ep.base, ep.ops, actual, (op) => op.durable, () => true);
        if (r.bad > 0) {
          // Where did the bytes come from? (a misplaced write, the disk at the kill, ...)
          const at = r.mismatches[0]!.at;
          const probe = actual.subarray(at, at + 32);
          const sources = ep.ops
            .map((op) => ({ op, i: op.data ? op.data.indexOf(probe) : -1 }))
            .filter((x) => x.i >= 0)
            .map(({ op, i }) => ({ modelStart: op.start, volumeStart: volAt(op.start), length: op.length, issue: op.issue, ack: op.ack, durable: op.durable, probeAt: i }));
          fail(
            `after kill ${kills}: ${r.bad} bytes read back a value no durable/acknowledged/in-flight write allows; first: ` +
              JSON.stringify(r.mismatches.map((m) => ({ ...m, volumeOffset: volAt(m.at) }))) +
              `; disk at the kill there: ${diskAtKill.subarray(at, at + 16).toString('hex')}, read now: ${actual.subarray(at, at + 16).toString('hex')}, epoch base: ${ep.base.subarray(at, at + 16).toString('hex')}` +
              `; ops whose data holds the 32 bytes read: ${JSON.stringify(sources)}; bad bytes per window: ${JSON.stringify(badPerWindow(ep, actual))}`,
          );
        }
        // Stricter, informational: a process kill keeps the page cache, so even writes never
        // flushed should survive unless the daemon acknowledged before handing them to the kernel.
        // (Every third epoch: it costs as much as the check itself.)
        if (ep.index % 3 === 0) stats.ackedLostBytes += checkAgainstModel(ep.base, ep.ops, actual, (op) => op.ack !== Infinity, () => true, 0).bad;
      }
      return actual;
    };

    const verifySnapshots = async (d: TestDaemon) => {
      // The control API directly (the CLI's list is the same call; node start-up costs ~250 ms).
      const res = await d.fetch(`/v1/volumes/${VOL}/snapshots`);
      if (!res.ok) fail(`snapshot list failed: ${res.status} ${await res.text()}`);
      const { snapshots } = (await res.json()) as { snapshots: { name: string; valid: boolean }[] };
      const infos = new Map(snapshots.map((s) => [s.name, s]));
      const listed = new Set(infos.keys());
      for (const s of snaps) {
        const exists = listed.has(s.name);
        listed.delete(s.name);
        if (s.state === 'created' && !exists) {
          fail(
            `snapshot ${s.name} (created, acknowledged) is gone after kill ${kills}; its history: ${s.history.join('; ')}; manifest now: ${manifestText(engineDir)}\n` +
              `snapshot lines of the killed daemon's log:\n${snapshotLogLines(lastLog)}\nlog of the killed daemon (tail):\n${lastLog.slice(-3000)}\nlog of this one:\n${d.log().slice(-3000)}`,
          );
        }
        if (s.state === 'deleted' && exists) {
          fail(
            `snapshot ${s.name} (deleted: acknowledged, or missing after an earlier kill; see its history) is back after kill ${kills}; its history: ${s.history.join('; ')}; manifest now: ${manifestText(engineDir)}\n` +
              `snapshot lines of the killed daemon's log:\n${snapshotLogLines(lastLog)}\nof this one:\n${snapshotLogLines(d.log())}`,
          );
        }
        if (s.state === 'unknown' || s.state === 'deleting') {
          s.history.push(`after kill ${kills}: was ${s.state}, ${exists ? 'listed' : 'not listed'}`);
          s.state = exists ? 'created' : 'deleted';
        }
        if (s.state !== 'created') continue;
        if (!infos.get(s.name)!.valid) fail(`snapshot ${s.name} is invalid after kill ${kills}`);
        const sc = await MiniNbdClient.connect(d.nbdPort, `${VOL}@${s.name}`);
        const actual = await readModelSpace(sc);
        await sc.disconnect();
        stats.snapsChecked++;
        if (s.content === null) {
          // First check: against the model of the epoch it was taken in.
          const ep = prev!;
          if (ep.index !== s.epoch) fail(`internal: snapshot ${s.name} of epoch ${s.epoch} checked in epoch ${ep.index + 1}`);
          const res = checkAgainstModel(
            ep.base,
            ep.ops,
            actual,
            (op) => op.ack < s.start,
            (op) => op.issue < s.end,
          );
          if (res.bad > 0) {
            fail(
              `snapshot ${s.name} (taken in epoch ${s.epoch}, clock ${s.start}..${s.end}): ${res.bad} bytes not as of its creation; first: ` +
                JSON.stringify(res.mismatches.map((m) => ({ ...m, volumeOffset: volAt(m.at) }))),
            );
          }
          s.content = actual;
        } else if (!actual.equals(s.content)) {
          let at = 0;
          while (actual[at] === s.content[at]) at++;
          fail(`snapshot ${s.name} changed after kill ${kills}: first difference at model byte ${at} (volume offset ${volAt(at)})`);
        }
      }
      if (listed.size > 0) fail(`unexpected snapshots after kill ${kills}: ${[...listed.keys()].join(', ')}`);
    };

    /** After a kill, with the daemon dead: the engine's own files, read with its own classes. */
    const checkEngineFiles = (ep: Epoch) => {
      const fsys = nodeDurableFs(engineDir);
      const pending = BitmapFile.open(fsys, 'pending.bm');
      const validity = BitmapFile.open(fsys, 'validity.bm');
      const { log, hotAtOpen } = ActivityLog.open(fsys, 'activity.log', {
        extentsTotal: Math.ceil(blocksTotal / extentBlocks),
        extentBytes: activityExtentBytes,
        checkpoint: async () => undefined,
      });
      const journalFile = fsys.open('writes.journal', false);
      const { ranges } = WriteJournal.read(journalFile, journalRegionBytesDefault);
      journalFile.close();
      pending.file.close();
      validity.file.close();
      void log; // opened read-only in effect (nothing written); its fd closes with the process
      stats.hotAtKill.push(hotAtOpen.length);
      stats.journaledAtKill.push(ranges.length / 2);
      const hot = new Set(hotAtOpen);
      const journaled = new Set<number>();
      for (let i = 0; i < ranges.length; i += 2) for (let b = ranges[i]!; b <= ranges[i + 1]!; b++) journaled.add(b);
      const covered = (b: number, bm: typeof pending.bitmap) => bm.test(b) || hot.has(Math.floor(b / extentBlocks)) || journaled.has(b);
      // Blocks acknowledged as written or zeroed this epoch.
      for (const op of ep.ops) {
        if (op.ack === Infinity) continue;
        const vs = volAt(op.start); // an op stays inside one window: contiguous on the volume
        for (let b = Math.floor(vs / BLOCK); b <= Math.floor((vs + op.length - 1) / BLOCK); b++) everChanged[b] = 1;
      }
      // Blocks whose bytes on disk differ from the epoch's start (in-flight writes that landed).
      const fd = fs.openSync(dataImg, 'r');
      try {
        for (let w = 0; w < NW; w++) {
          const lo = Math.floor(windowBase[w]! / BLOCK) * BLOCK;
          const hi = Math.ceil((windowBase[w]! + WIN) / BLOCK) * BLOCK;
          const buf = Buffer.alloc(hi - lo);
          fs.readSync(fd, buf, 0, buf.length, lo);
          const disk = buf.subarray(windowBase[w]! - lo, windowBase[w]! - lo + WIN);
          disk.copy(diskAtKill, w * WIN);
          const was = ep.base.subarray(w * WIN, (w + 1) * WIN);
          for (let x = 0; x < WIN; x += 1) {
            if (disk[x] !== was[x]) {
              everChanged[Math.floor((windowBase[w]! + x) / BLOCK)] = 1;
              x = (Math.floor((windowBase[w]! + x) / BLOCK) + 1) * BLOCK - windowBase[w]! - 1;
            }
          }
          // Validity: a block holding data must be valid (or in a hot extent).
          for (let b = lo / BLOCK; b < hi / BLOCK; b++) {
            const blk = buf.subarray(b * BLOCK - lo, (b + 1) * BLOCK - lo);
            if (blk.some((v) => v !== 0) && !covered(b, validity.bitmap)) {
              fail(`after kill ${kills}: block ${b} holds data on disk but is neither valid nor in a hot activity extent (a snapshot would read it as a hole)`);
            }
          }
        }
      } finally {
        fs.closeSync(fd);
      }
      const missing: number[] = [];
      for (let b = 0; b < blocksTotal; b++) if (everChanged[b] && !covered(b, pending.bitmap)) missing.push(b);
      if (missing.length > 0) {
        fail(`after kill ${kills}: ${missing.length} changed blocks in neither the pending bitmap nor a hot activity extent (first: ${missing.slice(0, 8).join(', ')}; hot extents ${hotAtOpen.join(',')})`);
      }
    };

    let d = await start(true);
    try {
      while (kills < KILLS_MAX && Date.now() - t0 < KILL_PHASE_MS) {
        const epochIndex = kills;
        const clients = await Promise.all(Array.from({ length: CONNECTIONS }, () => MiniNbdClient.connect(d.nbdPort, VOL, '127.0.0.1', { blockSize: false })));
        model = await phase('verify volume', () => verifyVolume(clients[0]!, prev));
        await phase('verify snapshots', () => verifySnapshots(d));
        // Sometimes roll the volume back to a snapshot first (the idle clients stay: --force).
        const restorable = snaps.filter((s) => s.state === 'created' && s.content !== null);
        if (restorable.length > 0 && rnd() < 0.25) {
          const s = restorable[randInt(0, restorable.length - 1)]!;
          const r = await cliAsync(d, ['snapshot', 'restore', VOL, s.name, '--force']);
          if (r.status !== 0) fail(`snapshot restore ${s.name}: ${r.status} ${r.stderr}`);
          s.history.push(`epoch ${epochIndex}: restored from`);
          if ((await clients[0]!.flush()).error !== 0) fail('flush after restore failed');
          const now = await readModelSpace(clients[0]!);
          if (!now.equals(s.content!)) {
            let at = 0;
            while (now[at] === s.content![at]) at++;
            fail(`after restoring ${s.name} the volume differs from it at model byte ${at} (volume offset ${volAt(at)})`);
          }
          // The blocks the restore rewrote are changes the change log must hold too.
          for (let m = 0; m < MODEL_BYTES; m++) if (now[m] !== model[m]) everChanged[Math.floor(volAt(m) / BLOCK)] = 1;
          model = now;
          stats.restores++;
        }
        const ep: Epoch = { index: epochIndex, base: model, ops: [] };
        const acked: ModelOp[] = []; // in acknowledgement order
        let durableUpTo = 0;
        const markDurableBefore = (t: number) => {
          while (durableUpTo < acked.length && acked[durableUpTo]!.ack < t) acked[durableUpTo++]!.durable = true;
        };

        // This epoch's windows: some touched before, some new.
        const active: number[] = [];
        const known = [...touched];
        for (let k = 0; k < 3 && known.length > 0; k++) active.push(known[randInt(0, known.length - 1)]!);
        for (let k = 0; k < 3; k++) active.push(randInt(0, NW - 1));
        for (const w of active) touched.add(w);

        let stop = false;
        let killed = false;
        const errors: string[] = [];
        const lane = async (c: MiniNbdClient) => {
          while (!stop) {
            const w = active[randInt(0, active.length - 1)]!;
            const r = rnd();
            let o: number;
            let len: number;
            let kind: 'write' | 'trim' | 'zero' | 'flush' = 'write';
            if (r < 0.35) [o, len] = [BLOCK * randInt(0, WIN / BLOCK - 1), BLOCK];
            else if (r < 0.55) {
              len = 512 * randInt(1, 7);
              o = 512 * randInt(0, (WIN - len) / 512);
            } else if (r < 0.65) [o, len] = [BLOCK * randInt(0, (WIN - 64 * KiB) / BLOCK), 64 * KiB];
            else if (r < 0.8) {
              len = randInt(1, 12_000);
              o = randInt(0, WIN - len);
            } else if (r < 0.86) {
              kind = 'trim';
              len = 512 * randInt(1, 128);
              o = 512 * randInt(0, (WIN - len) / 512);
            } else if (r < 0.92) {
              kind = 'zero';
              len = BLOCK * randInt(1, 16);
              o = BLOCK * randInt(0, (WIN - len) / BLOCK);
            } else {
              kind = 'flush';
              [o, len] = [0, 0];
            }
            const fua = kind !== 'flush' && rnd() < 0.15;
            const flags = fua ? C.CMDFLAG_FUA : 0;
            const at = windowBase[w]! + o;
            if (kind === 'flush') {
              const issue = clock++;
              stats.flushes++;
              const res = await c.flush();
              if (res.error === -1) return;
              if (res.error !== 0) errors.push(`FLUSH failed: ${res.error}`);
              else markDurableBefore(issue);
              continue;
            }
            const op: ModelOp = { start: w * WIN + o, length: len, data: kind === 'write' ? randomBytes(len) : null, issue: clock++, ack: Infinity, durable: false };
            ep.ops.push(op);
            let res: { error: number };
            if (kind === 'write') res = await c.write(at, op.data!, fua);
            else if (kind === 'trim') res = await c.request(C.CMD_TRIM, at, len, { flags });
            else res = await c.request(C.CMD_WRITE_ZEROES, at, len, { flags: flags | (rnd() < 0.5 ? C.CMDFLAG_NO_HOLE : 0) });
            if (res.error === -1) return; // the daemon was killed: in flight forever
            if (res.error !== 0) {
              errors.push(`${kind} ${at}+${len} failed: error ${res.error}`);
              return;
            }
            op.ack = clock++;
            acked.push(op);
            if (fua) op.durable = true;
            stats.ops++;
            stats.bytes += len;
            if (fua) stats.fua++;
            if (kind !== 'write') stats.zeroes++;
          }
        };
        const lanes = clients.flatMap((c) => Array.from({ length: LANES }, () => lane(c)));

        // A snapshot (and maybe a delete) at random moments of this epoch; the kill may hit them.
        const killDelay = randInt(40, 700);
        const live = snaps.filter((s) => s.state === 'created');
        const side: Promise<void>[] = [];
        let killAt = killDelay;
        if (live.length < SNAPSHOTS_LIVE_MAX && (SNAP_CHURN || rnd() < 0.6)) {
          const snapDelay = randInt(0, 300);
          // Aim at the creation (CLI start-up + quiesce + flush take 250-800 ms under load),
          // or let it complete so writes after it go through copy-on-write before the kill.
          killAt = snapDelay + (rnd() < 0.4 ? randInt(0, 700) : randInt(700, 1100));
          const s: Snap = { name: `s${++snapSeq}`, state: 'creating', epoch: epochIndex, start: 0, end: Infinity, content: null, history: [] };
          snaps.push(s);
          side.push(
            (async () => {
              await new Promise((r) => setTimeout(r, snapDelay));
              s.start = clock++;
              const t = Date.now();
              const res = await cliAsync(d, ['snapshot', 'create', VOL, s.name]);
              s.history.push(`epoch ${epochIndex}: create asked at ${snapDelay} ms, status ${res.status} after ${Date.now() - t} ms (kill at ${killAt} ms, killed: ${killed}): ${res.stdout.trim()} ${res.stderr.trim().slice(0, 200)}`);
              if (process.env.KILL9_DEBUG) console.log(`snapshot ${s.name}: status ${res.status} after ${Date.now() - t} ms (kill at ${killAt}, asked at ${snapDelay}) killed=${killed}`);
              if (res.status === 0) {
                s.end = clock++;
                s.state = 'created';
                markDurableBefore(s.start); // it holds (and flushed) every write acknowledged before it
                stats.snapsCreated++;
              } else if (killed) s.state = 'unknown';
              else errors.push(`snapshot create ${s.name}: ${res.status} ${res.stderr}`);
            })(),
          );
        }
        if (live.length > 1 && (SNAP_CHURN || rnd() < (live.length >= 3 ? 0.6 : 0.25))) {
          const victim = live[randInt(0, live.length - 1)]!;
          const delDelay = randInt(0, 600);
          side.push(
            (async () => {
              await new Promise((r) => setTimeout(r, delDelay));
              if (killed) return;
              victim.state = 'deleting';
              const t = Date.now();
              const res = await cliAsync(d, ['snapshot', 'delete', VOL, victim.name]);
              victim.history.push(`epoch ${epochIndex}: delete asked at ${delDelay} ms, status ${res.status} after ${Date.now() - t} ms (kill at ${killAt} ms, killed: ${killed}): ${res.stdout.trim()} ${res.stderr.trim().slice(0, 200)}`);
              if (res.status === 0) {
                // The daemon wrote its manifest before it answered: it must not name the
                // snapshot as visible from here on (this tells a late writer from a lost one).
                const listed = manifestNames(engineDir);
                victim.history.push(`manifest after the answer: ${listed === null ? 'unreadable' : listed.includes(victim.name) ? 'still lists it' : 'does not list it'}`);
                if (listed !== null && listed.includes(victim.name)) fail(`snapshot ${victim.name}: deleted (status 0) but the manifest still lists it: ${manifestText(engineDir)}`);
                victim.state = 'deleted';
                stats.snapsDeleted++;
              } else if (!killed) errors.push(`snapshot delete ${victim.name}: ${res.status} ${res.stderr}`);
            })(),
          );
        }

        await phase('load', () => new Promise((r) => setTimeout(r, killAt)));
        if (d.exited) fail(`daemon exited on its own in epoch ${epochIndex}:\n${d.log().slice(-4000)}`);
        killed = true;
        await d.kill();
        kills++;
        stop = true;
        for (const c of clients) c.destroy();
        await Promise.all(lanes);
        await Promise.all(side);
        if (errors.length > 0) fail(`epoch ${epochIndex}: requests failed while the daemon ran:\n${errors.slice(0, 10).join('\n')}`);
        stats.inflightAtKill += ep.ops.filter((op) => op.ack === Infinity).length;
        lastLog = d.log();
        fs.rmSync(d.logFile, { force: true });

        await phase('engine files', () => checkEngineFiles(ep));
        prev = ep;
        d = await phase('restart', () => start(false));
      }

      // Last restart: verify, then a clean stop must exit 0 and leave nothing hot.
      const c = await MiniNbdClient.connect(d.nbdPort, VOL, '127.0.0.1', { blockSize: false });
      model = await verifyVolume(c, prev);
      await c.disconnect();
      await verifySnapshots(d);
      const code = await d.stop();
      const { errors } = logProblems(d);
      fs.rmSync(d.logFile, { force: true });
      expect(errors).toEqual([]);
      expect(code).toBe(0);
      const { hotAtOpen } = ActivityLog.open(nodeDurableFs(engineDir), 'activity.log', {
        extentsTotal: Math.ceil(blocksTotal / extentBlocks),
        extentBytes: activityExtentBytes,
        checkpoint: async () => undefined,
      });
      expect(hotAtOpen).toEqual([]);
      const journalFile = nodeDurableFs(engineDir).open('writes.journal', false);
      expect(WriteJournal.read(journalFile, journalRegionBytesDefault).ranges, 'a clean stop leaves nothing to replay').toEqual([]);
      journalFile.close();
    } finally {
      if (!d.exited) await d.kill();
      fs.rmSync(d.logFile, { force: true });
    }

    const rs = [...stats.restartMs].sort((a, b) => a - b);
    console.log(
      `[kill9] seed ${seed}: ${kills} kills in ${((Date.now() - t0) / 1000).toFixed(1)} s; ${stats.ops} requests acknowledged ` +
        `(${(stats.bytes / MiB).toFixed(0)} MiB, ${stats.fua} FUA, ${stats.zeroes} trim/zero), ${stats.flushes} flushes, ` +
        `${stats.inflightAtKill} in flight at kills; bytes of acknowledged (not yet durable) writes lost (every 3rd epoch): ${stats.ackedLostBytes}; snapshots: ${stats.snapsCreated} created, ${stats.snapsDeleted} deleted, ${stats.snapsChecked} checks, ${stats.restores} restores; ` +
        `hot extents at kills: max ${Math.max(...stats.hotAtKill)}; journaled writes at kills: max ${Math.max(...stats.journaledAtKill)}; restart (spawn → daemon.json) median ${rs[rs.length >> 1]} ms, max ${rs[rs.length - 1]} ms; time per phase (ms) ${JSON.stringify(phaseMs)}`,
    );
    expect(failures).toEqual([]);
    // A quiet machine reaches KILLS_MAX (40); under the full suite on 2 cores it gets 10-20.
    // The floor only proves the loop really crashed the daemon repeatedly; the checks above
    // run after every kill, so fewer kills weaken coverage but never hide a loss.
    expect(kills, 'kills in the time budget (a slow or busy machine gets fewer)').toBeGreaterThanOrEqual(6);
  }, 85_000);

  it('measures crash recovery of a 1 GiB volume (spawn → daemon.json after a SIGKILL under load)', async () => {
    const GiB = 1024 * MiB;
    const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'deltavol-kill9-1g-'));
    dirs.push(dataDir);
    const engineDir = path.join(dataDir, 'volumes', 'big', 'engine');
    const extentsTotal = GiB / activityExtentBytes;
    let d = await startDaemon({ dataDir, volumes: [{ name: 'big', size: '1G' }] });
    const crashMs: number[] = [];
    const hot: number[] = [];
    let cleanMs = 0;
    let engineOpenMs = 0;
    try {
      expect(d.cli(['snapshot', 'create', 'big', 'before']).status).toBe(0); // copy-on-write active too
      for (let round = 0; round < 3; round++) {
        const clients = await Promise.all([0, 1].map(() => MiniNbdClient.connect(d.nbdPort, 'big')));
        let stop = false;
        let acked = 0;
        const lanes = clients.flatMap((c) =>
          Array.from({ length: 8 }, async () => {
            while (!stop) {
              const at = BLOCK * randInt(0, GiB / BLOCK - 1);
              const r = await c.write(at, randomBytes(BLOCK), rnd() < 0.1);
              if (r.error !== 0) return;
              acked++;
            }
          }),
        );
        await new Promise((r) => setTimeout(r, 1500));
        expect(d.exited).toBe(false);
        await d.kill();
        stop = true;
        for (const c of clients) c.destroy();
        await Promise.all(lanes);
        fs.rmSync(d.logFile, { force: true });
        const { hotAtOpen } = ActivityLog.open(nodeDurableFs(engineDir), 'activity.log', {
          extentsTotal,
          extentBytes: activityExtentBytes,
          checkpoint: async () => undefined,
        });
        hot.push(hotAtOpen.length);
        if (round === 0) {
          // The engine's share alone: open (recover) and close a sparse copy of the killed
          // volume in this process, with the daemon's own Volume class.
          const copy = path.join(dataDir, 'copy');
          const cp = spawnSync('cp', ['-r', '--sparse=always', path.join(dataDir, 'volumes', 'big'), copy]);
          expect(cp.status, String(cp.stderr)).toBe(0);
          spawnSync('sync', ['-f', path.join(copy, 'data.img')]); // the copy's own dirty pages are not recovery work
          const meta = parseVolumeMeta(fs.readFileSync(path.join(copy, 'volume.json'), 'utf8'), 'copy');
          const t0 = performance.now();
          const v = await Volume.open(copy, meta, { syncIoBytesMax: syncIoBytesMaxDefault }, false);
          engineOpenMs = performance.now() - t0;
          await v.close();
          fs.rmSync(copy, { recursive: true, force: true });
        }
        const t = Date.now();
        d = await startDaemon({ dataDir });
        crashMs.push(Date.now() - t);
        const { errors, loaded } = logProblems(d);
        expect(errors).toEqual([]);
        expect(loaded).toEqual([['big']]);
        expect(acked).toBeGreaterThan(100);
      }
      // Baseline: restarts after a clean stop (node start-up, no recovery work).
      const clean: number[] = [];
      for (let k = 0; k < 3; k++) {
        expect(await d.stop()).toBe(0);
        expect(logProblems(d).errors).toEqual([]);
        fs.rmSync(d.logFile, { force: true });
        const t = Date.now();
        d = await startDaemon({ dataDir });
        clean.push(Date.now() - t);
      }
      cleanMs = [...clean].sort((a, b) => a - b)[1]!;
      expect(await d.stop()).toBe(0);
      expect(logProblems(d).errors).toEqual([]);
    } finally {
      if (!d.exited) await d.kill();
      fs.rmSync(d.logFile, { force: true });
    }
    const sorted = [...crashMs].sort((a, b) => a - b);
    console.log(
      `[kill9] 1 GiB volume crash recovery (spawn → daemon.json, 25 ms polling): ${crashMs.join(', ')} ms (median ${sorted[1]} ms) ` +
        `with ${hot.join(', ')} of ${extentsTotal} activity extents hot at the kill; after a clean stop (median of 3): ${cleanMs} ms; ` +
        `the engine's recovery alone (Volume.open + close of a synced copy after the first kill, in this process): ${engineOpenMs.toFixed(1)} ms`,
    );
  }, 60_000);

  it('a snapshot save area that fills under load, then SIGKILL: the full one stays invalid, the older one intact, writes go on', async () => {
    const SMALL = 32 * MiB;
    const SPAN = 16 * MiB; // writes land in [0, SPAN)
    const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'deltavol-kill9-space-'));
    dirs.push(dataDir);
    let d = await startDaemon({ dataDir });
    const logs: string[] = [];
    try {
      const cr = d.cli(['volume', 'create', 'small', '--size', String(SMALL), '--snapshot-space', '1M']);
      expect(cr.status, cr.stderr).toBe(0);
      let c = await MiniNbdClient.connect(d.nbdPort, 'small');
      for (let at = 0; at < 8 * MiB; at += 64 * KiB) expect((await c.write(at, randomBytes(64 * KiB))).error).toBe(0);
      expect(d.cli(['snapshot', 'create', 'small', 'old']).status).toBe(0);
      const readSpan = async (cl: MiniNbdClient) => {
        const out = Buffer.alloc(SPAN);
        for (let at = 0; at < SPAN; at += 256 * KiB) {
          const r = await cl.read(at, 256 * KiB);
          expect(r.error).toBe(0);
          r.data.copy(out, at);
        }
        return out;
      };
      const oldContent = await readSpan(c);
      // 512 KiB of first writes after 'old': fits its 1 MiB space.
      for (let at = 0; at < 512 * KiB; at += 64 * KiB) expect((await c.write(at, randomBytes(64 * KiB))).error).toBe(0);
      expect(d.cli(['snapshot', 'create', 'small', 'new']).status).toBe(0);
      await c.disconnect();

      for (let round = 0; round < 3; round++) {
        // Load: random 4 KiB and unaligned writes over 16 MiB, some FUA, some FLUSH; 'new' fills
        // after ~250 first writes. Killed at a seeded moment.
        const cl = await MiniNbdClient.connect(d.nbdPort, 'small', '127.0.0.1', { blockSize: false });
        const f = await cl.flush();
        expect(f.error).toBe(0);
        const base = await readSpan(cl);
        const ops: ModelOp[] = [];
        const acked: ModelOp[] = [];
        let durableUpTo = 0;
        let clk = 0;
        let stop = false;
        const lanes = Array.from({ length: 8 }, async () => {
          while (!stop) {
            if (rnd() < 0.05) {
              const issue = clk++;
              const r = await cl.flush();
              if (r.error !== 0) return;
              while (durableUpTo < acked.length && acked[durableUpTo]!.ack < issue) acked[durableUpTo++]!.durable = true;
              continue;
            }
            const len = rnd() < 0.7 ? BLOCK : randInt(1, 9000);
            const at = len === BLOCK ? BLOCK * randInt(0, SPAN / BLOCK - 1) : randInt(0, SPAN - len);
            const fua = rnd() < 0.1;
            const op: ModelOp = { start: at, length: len, data: randomBytes(len), issue: clk++, ack: Infinity, durable: false };
            ops.push(op);
            const r = await cl.write(at, op.data!, fua);
            if (r.error === -1) return;
            expect(r.error, `write ${at}+${len} while the save area filled`).toBe(0);
            op.ack = clk++;
            op.durable = fua;
            acked.push(op);
          }
        });
        if (round === 0) {
          // Kill only once 'new' has filled (at a seeded moment after), so the invalidation is on disk.
          const until = Date.now() + 10_000;
          while (!/snapshot save area full/.test(d.log()) && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
          await new Promise((r) => setTimeout(r, randInt(0, 300)));
        } else {
          await new Promise((r) => setTimeout(r, randInt(150, 600)));
        }
        expect(d.exited).toBe(false);
        await d.kill();
        stop = true;
        cl.destroy();
        await Promise.all(lanes);
        logs.push(d.log());
        fs.rmSync(d.logFile, { force: true });

        d = await startDaemon({ dataDir });
        expect(logProblems(d).errors).toEqual([]);
        c = await MiniNbdClient.connect(d.nbdPort, 'small', '127.0.0.1', { blockSize: false });
        const after = await readSpan(c);
        const res = checkAgainstModel(base, ops, after, (op) => op.durable, () => true);
        expect(res.bad, `round ${round}: ${JSON.stringify(res.mismatches)} (seed ${seed})`).toBe(0);
        const list = JSON.parse(d.cli(['snapshot', 'list', 'small', '--json']).stdout) as { name: string; valid: boolean }[];
        const valid = Object.fromEntries(list.map((s) => [s.name, s.valid]));
        expect(Object.keys(valid).sort()).toEqual(['new', 'old']);
        expect(valid.new, `round ${round}: 'new' (1 MiB space, > 4 MiB of first writes) is still valid`).toBe(false);
        await expect(MiniNbdClient.connect(d.nbdPort, 'small@new')).rejects.toThrow(/GO refused/);
        if (valid.old) {
          const oc = await MiniNbdClient.connect(d.nbdPort, 'small@old');
          const got = await readSpan(oc);
          await oc.disconnect();
          expect(got.equals(oldContent), `round ${round}: snapshot 'old' changed (seed ${seed})`).toBe(true);
        }
        await c.disconnect();
      }
      expect(logs.join('\n')).toMatch(/snapshot save area full/);
      expect(await d.stop()).toBe(0);
      expect(logProblems(d).errors).toEqual([]);
    } finally {
      if (!d.exited) await d.kill();
      fs.rmSync(d.logFile, { force: true });
    }
  }, 60_000);
});
