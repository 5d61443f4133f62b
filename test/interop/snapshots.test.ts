// Why: snapshots are read by real tools, not by our own code: backup software compares
// a snapshot export with a copy taken at snapshot time (qemu-img compare), copies only
// its data (nbdinfo --map / base:allocation) or only what changed since a snapshot
// (qemu:dirty-bitmap:NAME), and mounts it read-only while the volume keeps changing.
// Each test here proves one of those promises (issue 4, "Snapshots" and the Interop
// tests) with qemu-io, qemu-img, nbdcopy, nbdinfo, nbdsh and fio against a real daemon.

import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { makeSparseImage, sha256File, tempDir } from '../helpers/images.js';
import { nbdsh, nbdshBackground } from '../helpers/nbdsh.js';
import { prng, testSeed } from '../helpers/seed.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** The default tracking block: the granularity of qemu:dirty-bitmap:NAME. */
const TB = 4 * KiB;

let d: TestDaemon;
let dir: string;

beforeAll(async () => {
  dir = tempDir('snapshots');
  d = await startDaemon({
    volumes: [
      { name: 'cmp', size: '32M' },
      { name: 'map', size: '16M' },
      { name: 'dirty', size: '16M' },
      { name: 'ro', size: '8M' },
      { name: 'queue', size: '8M' },
      { name: 'busy', size: '8M' },
      { name: 'live', size: '64M' },
    ],
  });
});

afterAll(async () => {
  await d?.dispose();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

// ---------------------------------------------------------------- helpers

interface MapEntry {
  offset: number;
  length: number;
  type: number;
  description?: string;
}

/** qemu-io commands on one connection; throws unless every one succeeded. */
function qemuIo(uri: string, commands: string[]): void {
  if (commands.length === 0) return;
  const r = run('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri], { allowFail: true, timeoutMs: 60_000 });
  expect(r.status, `qemu-io ${commands.join('; ')}:\n${r.stdout}\n${r.stderr}`).toBe(0);
  expect(r.stdout + r.stderr).not.toMatch(/failed|error/i);
}

function snap(args: string[]) {
  return d.cli(['snapshot', ...args]);
}

function snapOk(args: string[]): string {
  const r = snap(args);
  expect(r.status, `snapshot ${args.join(' ')}: ${r.stderr}`).toBe(0);
  return r.stdout;
}

/** Copies a whole export into a new file with nbdcopy; returns the file. */
function save(uri: string, name: string): string {
  const file = path.join(dir, name);
  fs.rmSync(file, { force: true });
  run('nbdcopy', [uri, file], { timeoutMs: 60_000 });
  return file;
}

function exportSha(uri: string): string {
  const file = save(uri, `sha-${crypto.randomUUID()}.img`);
  try {
    return sha256File(file);
  } finally {
    fs.rmSync(file, { force: true });
  }
}

function sha(buf: Buffer): string {
  return crypto.createHash('sha256').update(buf).digest('hex');
}

/** qemu-img compare: 0 identical, 1 different (anything else is an error). */
function compare(a: string, b: string): { status: number; out: string } {
  const r = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b], { allowFail: true, timeoutMs: 60_000 });
  expect([0, 1], r.stdout + r.stderr).toContain(r.status);
  return { status: r.status, out: r.stdout + r.stderr };
}

function nbdMap(uri: string, context?: string): MapEntry[] {
  const out = run('nbdinfo', [context ? `--map=${context}` : '--map', '--json', uri], { timeoutMs: 30_000 }).stdout;
  return (JSON.parse(out) as MapEntry[]).map(({ offset, length, type }) => ({ offset, length, type }));
}

/** base:allocation map for [start, end) data ranges (merged) of a `size`-byte export: data 0, hole 3. */
function allocationMap(size: number, data: [number, number][]): MapEntry[] {
  return spans(size, data, 0, 3);
}

/** qemu:dirty-bitmap map for a set of dirty tracking blocks: dirty 1, clean 0. */
function dirtyMap(size: number, blocks: Iterable<number>): MapEntry[] {
  return spans(
    size,
    [...new Set(blocks)].map((b) => [b * TB, (b + 1) * TB]),
    1,
    0,
  );
}

function spans(size: number, ranges: [number, number][], inType: number, outType: number): MapEntry[] {
  const sorted = [...ranges].sort((a, b) => a[0] - b[0]);
  const merged: [number, number][] = [];
  for (const [s, e] of sorted) {
    const last = merged[merged.length - 1];
    if (last && s <= last[1]) last[1] = Math.max(last[1], e);
    else merged.push([s, e]);
  }
  const out: MapEntry[] = [];
  let pos = 0;
  for (const [s, e] of merged) {
    if (s > pos) out.push({ offset: pos, length: s - pos, type: outType });
    out.push({ offset: s, length: e - s, type: inType });
    pos = e;
  }
  if (pos < size) out.push({ offset: pos, length: size - pos, type: outType });
  return out;
}

/** The tracking blocks a qemu:dirty-bitmap map reports dirty. */
function dirtyBlocks(map: MapEntry[]): Set<number> {
  const out = new Set<number>();
  for (const e of map) {
    expect(e.offset % TB === 0 && e.length % TB === 0, `extent ${e.offset}+${e.length} is not on tracking-block boundaries`).toBe(true);
    if (e.type & 1) for (let b = e.offset / TB; b < (e.offset + e.length) / TB; b++) out.add(b);
  }
  return out;
}

/** The tracking blocks [offset, offset + length) touches. */
function blocksOf(offset: number, length: number): number[] {
  const out: number[] = [];
  for (let b = Math.floor(offset / TB); b * TB < offset + length; b++) out.push(b);
  return out;
}

function exportNames(): string[] {
  const j = JSON.parse(run('nbdinfo', ['--list', '--json', d.uri()], { timeoutMs: 30_000 }).stdout) as { exports: { 'export-name': string }[] };
  return j.exports.map((e) => e['export-name']).sort();
}

async function waitFor(what: string, cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A child process run asynchronously with a time bound (so several can overlap). */
function runAsync(cmd: string, args: string[], timeoutMs: number): Promise<{ status: number | null; output: string }> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    p.stdout.on('data', (b: Buffer) => (output += b.toString()));
    p.stderr.on('data', (b: Buffer) => (output += b.toString()));
    const timer = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.once('close', (status) => {
      clearTimeout(timer);
      resolve({ status, output });
    });
  });
}

/**
 * An in-memory model of a volume, driven by the same operations sent with qemu-io:
 * pattern writes (any offset and length), write-zeroes, and 4 KiB-aligned trims.
 */
class Model {
  readonly buf: Buffer;
  /** Tracking blocks touched since the last reset. */
  touched = new Set<number>();
  constructor(size: number) {
    this.buf = Buffer.alloc(size);
  }
  write(offset: number, length: number, pattern: number): string {
    this.buf.fill(pattern, offset, offset + length);
    for (const b of blocksOf(offset, length)) this.touched.add(b);
    return `write -P 0x${pattern.toString(16)} ${offset} ${length}`;
  }
  zero(offset: number, length: number): string {
    this.buf.fill(0, offset, offset + length);
    for (const b of blocksOf(offset, length)) this.touched.add(b);
    return `write -z ${offset} ${length}`;
  }
  trim(offset: number, length: number): string {
    expect(offset % TB === 0 && length % TB === 0, 'model trims are block-aligned').toBe(true);
    this.buf.fill(0, offset, offset + length);
    for (const b of blocksOf(offset, length)) this.touched.add(b);
    return `discard ${offset} ${length}`;
  }
  /** Random overlapping operations (seeded): mostly writes, some zeroes and trims. */
  randomOps(rnd: () => number, n: number): string[] {
    const size = this.buf.length;
    const cmds: string[] = [];
    for (let i = 0; i < n; i++) {
      const k = rnd();
      if (k < 0.7) {
        const len = 1 + Math.floor(rnd() * 96 * KiB);
        const off = Math.floor(rnd() * (size - len));
        cmds.push(this.write(off, len, 1 + Math.floor(rnd() * 254)));
      } else if (k < 0.85) {
        const len = 1 + Math.floor(rnd() * 64 * KiB);
        cmds.push(this.zero(Math.floor(rnd() * (size - len)), len));
      } else {
        const blocks = 1 + Math.floor(rnd() * 16);
        const first = Math.floor(rnd() * (size / TB - blocks));
        cmds.push(this.trim(first * TB, blocks * TB));
      }
    }
    return cmds;
  }
  /** Tracking blocks whose content differs from another model's. */
  differingBlockSet(other: Buffer): Set<number> {
    const out = new Set<number>();
    for (let off = 0; off < this.buf.length; off += TB) {
      if (!this.buf.subarray(off, off + TB).equals(other.subarray(off, off + TB))) out.add(off / TB);
    }
    return out;
  }
}

// ---------------------------------------------------------------- tests

describe('snapshot contents (qemu-img compare, sha256)', () => {
  it('a snapshot export is identical to a copy of the volume saved at snapshot time, while the volume has moved on', () => {
    const src = path.join(dir, 'cmp-src.img');
    makeSparseImage(src, 32 * MiB, { regions: 16, maxRegionBytes: 2 * MiB, seed: 4 });
    run('nbdcopy', [src, d.uri('cmp')], { timeoutMs: 60_000 });
    qemuIo(d.uri('cmp'), ['write -P 0x5a 12345 70000', 'write -P 0x6b 20M 1M']);
    const saved = save(d.uri('cmp'), 'cmp-saved.img');
    snapOk(['create', 'cmp', 'at-save']);
    // Keep writing: overwrite saved data, unaligned, then trim and zero some of it.
    qemuIo(d.uri('cmp'), ['write -P 0x77 0 4096', 'write -P 0x78 12000 1000', 'write -P 0x79 20M 2M', 'discard 24M 1M', 'write -z 31M 512K']);

    const same = compare(saved, d.uri('cmp@at-save'));
    expect(same.status, same.out).toBe(0);
    expect(same.out).toMatch(/Images are identical/);
    const moved = compare(saved, d.uri('cmp'));
    expect(moved.status, moved.out).toBe(1);
    expect(moved.out).toMatch(/Content mismatch at offset 0\b/);
    expect(compare(d.uri('cmp@at-save'), d.uri('cmp')).status).toBe(1);
    // And byte for byte, not only by qemu-img's reading of it.
    expect(exportSha(d.uri('cmp@at-save'))).toBe(sha256File(saved));
  });
});

describe('snapshot allocation map (nbdinfo --map)', () => {
  it('lists exactly the data and holes of the volume as of the snapshot, not the live volume', () => {
    const size = 16 * MiB;
    const data: [number, number][] = [
      [0, 64 * KiB],
      [1 * MiB, 1 * MiB + 4 * KiB],
      [5 * MiB, 5 * MiB + 256 * KiB],
      [size - 8 * KiB, size],
    ];
    qemuIo(
      d.uri('map'),
      data.map(([s, e], i) => `write -P 0x${(0x31 + i).toString(16)} ${s} ${e - s}`),
    );
    const before = nbdMap(d.uri('map'));
    expect(before).toEqual(allocationMap(size, data));
    snapOk(['create', 'map', 'm1']);
    expect(nbdMap(d.uri('map@m1'))).toEqual(before);

    // Trim part of the data, write where there were holes.
    qemuIo(d.uri('map'), ['discard 0 32K', 'discard 5M 256K', 'write -P 0x99 8M 128K', 'write -P 0x9a 2M 4K']);
    const live = nbdMap(d.uri('map'));
    expect(live).toEqual(
      allocationMap(size, [
        [32 * KiB, 64 * KiB],
        [1 * MiB, 1 * MiB + 4 * KiB],
        [2 * MiB, 2 * MiB + 4 * KiB],
        [8 * MiB, 8 * MiB + 128 * KiB],
        [size - 8 * KiB, size],
      ]),
    );
    // The snapshot still reports what it held: data, including the before-images now in
    // its save area, and holes where the volume has new data.
    expect(nbdMap(d.uri('map@m1'))).toEqual(allocationMap(size, data));
    expect(nbdMap(d.uri('map@m1'))).not.toEqual(live);
    // What it reports as holes reads as zeroes, and its data as written.
    const r = nbdsh(`
      h = connect(${JSON.stringify(d.uri('map@m1'))})
      out([h.pread(32768, 0) == b'\\x31' * 32768, h.pread(262144, 5 * 1048576) == b'\\x33' * 262144,
           h.pread(131072, 8 * 1048576) == bytes(131072), h.pread(4096, 2 * 1048576) == bytes(4096)])
    `);
    expect(r.out).toEqual([[true, true, true, true]]);
  });
});

describe('changes since a snapshot (nbdinfo --map=qemu:dirty-bitmap:NAME)', () => {
  it('lists exactly the 4 KiB blocks written, trimmed or zeroed since each snapshot', () => {
    const size = 16 * MiB;
    const uri = d.uri('dirty');
    // Data before the snapshot is not a change.
    qemuIo(uri, ['write -P 0x10 0 1M', 'write -P 0x11 10M 64K']);
    snapOk(['create', 'dirty', 'a']);
    expect(nbdMap(uri, 'qemu:dirty-bitmap:a')).toEqual(dirtyMap(size, []));

    const sinceA = new Set<number>();
    const cmdsA = [
      `write -P 0x21 ${10 * TB + 100} 10`, // unaligned, inside block 10
      `write -P 0x22 ${20 * TB - 1} 2`, // straddles blocks 19 and 20
      'write -P 0x23 1M 64K', // 16 blocks where there was a hole
      `discard ${10 * MiB} 8K`, // trims 2 data blocks
      `write -z ${512 * KiB} 4K`, // zeroes a data block
      `write -P 0x24 ${size - 512} 512`, // the last block
    ];
    for (const b of [10, 19, 20, ...blocksOf(1 * MiB, 64 * KiB), ...blocksOf(10 * MiB, 8 * KiB), 128, size / TB - 1]) sinceA.add(b);
    qemuIo(uri, cmdsA);
    expect(nbdMap(uri, 'qemu:dirty-bitmap:a')).toEqual(dirtyMap(size, sinceA));

    // A second snapshot: its bitmap starts clean; a's keeps accumulating.
    snapOk(['create', 'dirty', 'b']);
    expect(nbdMap(uri, 'qemu:dirty-bitmap:b')).toEqual(dirtyMap(size, []));
    qemuIo(uri, ['write -P 0x31 8M 12K', `write -P 0x32 ${10 * TB + 4000} 200`]); // blocks 2048-2050, 10-11
    const sinceB = [2048, 2049, 2050, 10, 11];
    for (const b of sinceB) sinceA.add(b);
    expect(nbdMap(uri, 'qemu:dirty-bitmap:b')).toEqual(dirtyMap(size, sinceB));
    expect(nbdMap(uri, 'qemu:dirty-bitmap:a')).toEqual(dirtyMap(size, sinceA));

    // Both contexts are advertised on the volume export, none on a snapshot export.
    const list = JSON.parse(run('nbdinfo', ['--list', '--json', d.uri()]).stdout) as { exports: { 'export-name': string; contexts?: string[] }[] };
    const ctx = (n: string) => list.exports.find((e) => e['export-name'] === n)?.contexts ?? [];
    expect(ctx('dirty')).toEqual(expect.arrayContaining(['base:allocation', 'qemu:dirty-bitmap:a', 'qemu:dirty-bitmap:b']));
    expect(ctx('dirty@a')).toEqual(['base:allocation']);
    // An unknown snapshot name is not a context: nbdinfo fails rather than inventing a map.
    expect(run('nbdinfo', ['--map=qemu:dirty-bitmap:nosuch', '--json', uri], { allowFail: true }).status).not.toBe(0);
  });
});

describe('snapshot exports are read-only', () => {
  it('nbdinfo lists VOLUME@NAME, reports it read-only, and writes, trims and zeroes get EPERM', () => {
    qemuIo(d.uri('ro'), ['write -P 0x42 0 64K']);
    snapOk(['create', 'ro', 'frozen']);
    expect(exportNames()).toContain('ro@frozen');
    expect(run('nbdinfo', ['--can', 'write', d.uri('ro@frozen')], { allowFail: true }).status).toBe(2);
    expect(run('nbdinfo', ['--is', 'read-only', d.uri('ro@frozen')], { allowFail: true }).status).toBe(0);
    // The volume itself stays writable.
    expect(run('nbdinfo', ['--can', 'write', d.uri('ro')], { allowFail: true }).status).toBe(0);
    // A snapshot that does not exist is not an export.
    expect(run('nbdinfo', ['--size', d.uri('ro@nosuch')], { allowFail: true }).status).not.toBe(0);

    const r = nbdsh(`
      h = connect(${JSON.stringify(d.uri('ro@frozen'))}, strict=0)
      out({
        'write': err_of(lambda: h.pwrite(b'x' * 4096, 0)),
        'write_fua': err_of(lambda: h.pwrite(b'x' * 512, 512, nbd.CMD_FLAG_FUA)),
        'trim': err_of(lambda: h.trim(4096, 0)),
        'zero': err_of(lambda: h.zero(4096, 8192)),
        'data': h.pread(65536, 0) == b'\\x42' * 65536,
      })
    `);
    expect(r.out).toEqual([{ write: 1, write_fua: 1, trim: 1, zero: 1, data: true }]); // 1 = EPERM
  });
});

describe('a queue of snapshots', () => {
  it('each of 3 snapshots reads back its model; deleting the middle one keeps the others; restore rolls the volume back', () => {
    const seed = testSeed('snapshots queue');
    const rnd = prng(seed);
    const size = 8 * MiB;
    const uri = d.uri('queue');
    const m = new Model(size);
    // Start from a seeded sparse image.
    const src = path.join(dir, 'queue-src.img');
    makeSparseImage(src, size, { regions: 8, maxRegionBytes: 512 * KiB, seed });
    run('nbdcopy', [src, uri], { timeoutMs: 60_000 });
    fs.readFileSync(src).copy(m.buf);

    const models: Record<string, Buffer> = {};
    const touchedSince: Record<string, Set<number>> = {};
    for (const name of ['s1', 's2', 's3']) {
      qemuIo(uri, m.randomOps(rnd, 24));
      snapOk(['create', 'queue', name]);
      models[name] = Buffer.from(m.buf);
      for (const t of Object.values(touchedSince)) for (const b of m.touched) t.add(b);
      m.touched = new Set();
      touchedSince[name] = new Set();
    }
    qemuIo(uri, m.randomOps(rnd, 24));
    for (const t of Object.values(touchedSince)) for (const b of m.touched) t.add(b);

    const list = JSON.parse(snapOk(['list', 'queue', '--json'])) as { name: string }[];
    expect(list.map((s) => s.name)).toEqual(['s1', 's2', 's3']);
    for (const name of ['s1', 's2', 's3']) expect(exportSha(d.uri(`queue@${name}`)), name).toBe(sha(models[name]!));
    expect(exportSha(uri), 'volume').toBe(sha(m.buf));
    // The changed-block maps hold every block whose content differs from the snapshot's
    // and only blocks an operation touched since (a block that was a hole then and is a
    // hole again now may be left out: nothing to copy).
    const checkDirtyMaps = (names: string[]) => {
      for (const name of names) {
        const dirty = dirtyBlocks(nbdMap(uri, `qemu:dirty-bitmap:${name}`));
        const differing = m.differingBlockSet(models[name]!);
        expect([...differing].filter((b) => !dirty.has(b)), `${name}: changed blocks missing from the map`).toEqual([]);
        expect([...dirty].filter((b) => !touchedSince[name]!.has(b)), `${name}: untouched blocks in the map`).toEqual([]);
        expect(dirty.size, name).toBeGreaterThan(0);
      }
    };
    checkDirtyMaps(['s1', 's2', 's3']);
    // Reads that start and end inside tracking blocks (512-byte aligned, the export's
    // minimum), from the oldest snapshot, whose blocks may live in s1's, s2's or s3's
    // save area or still on the volume (seed 001 FIG. 27).
    const ranges = Array.from({ length: 40 }, () => {
      const len = 512 * (1 + Math.floor(rnd() * 40));
      return [512 * Math.floor(rnd() * ((size - len) / 512)), len] as [number, number];
    });
    const readSums = (name: string) =>
      nbdsh(`
        h = connect(${JSON.stringify(d.uri(`queue@${name}`))})
        out([sha(h.pread(l, o)) for o, l in ${JSON.stringify(ranges)}])
      `).out[0];
    expect(readSums('s1')).toEqual(ranges.map(([o, l]) => sha(models.s1!.subarray(o, o + l))));

    // Delete the middle snapshot: s1 (whose reads may have gone through s2's save area) and s3 are untouched.
    snapOk(['delete', 'queue', 's2']);
    expect((JSON.parse(snapOk(['list', 'queue', '--json'])) as { name: string }[]).map((s) => s.name)).toEqual(['s1', 's3']);
    expect(exportNames()).not.toContain('queue@s2');
    expect(exportSha(d.uri('queue@s1'))).toBe(sha(models.s1!));
    expect(exportSha(d.uri('queue@s3'))).toBe(sha(models.s3!));
    expect(readSums('s1')).toEqual(ranges.map(([o, l]) => sha(models.s1!.subarray(o, o + l))));
    // s1's changed-block map still covers the changes s2 had recorded.
    checkDirtyMaps(['s1', 's3']);
    const ctx = (JSON.parse(run('nbdinfo', ['--list', '--json', d.uri()]).stdout) as { exports: { 'export-name': string; contexts?: string[] }[] }).exports.find(
      (e) => e['export-name'] === 'queue',
    )?.contexts;
    expect(ctx).not.toContain('qemu:dirty-bitmap:s2');

    // Restore s1: the volume equals it; only changed blocks were copied, at least every
    // block that differs; s3 keeps its content although the restore rewrote the volume.
    const r = JSON.parse(snapOk(['restore', 'queue', 's1', '--json'])) as { blocksWritten: number; blocksZeroed: number; seconds: number };
    const copied = r.blocksWritten + r.blocksZeroed;
    expect(copied).toBeGreaterThanOrEqual(m.differingBlockSet(models.s1!).size);
    expect(copied).toBeLessThanOrEqual(touchedSince.s1!.size);
    expect(r.blocksWritten).toBeGreaterThan(0);
    const cmp = compare(uri, d.uri('queue@s1'));
    expect(cmp.status, cmp.out).toBe(0);
    expect(exportSha(uri)).toBe(sha(models.s1!));
    expect(exportSha(d.uri('queue@s3'))).toBe(sha(models.s3!));

    // And forward again to the newest snapshot.
    snapOk(['restore', 'queue', 's3']);
    expect(exportSha(uri)).toBe(sha(models.s3!));
    expect(exportSha(d.uri('queue@s1'))).toBe(sha(models.s1!));

    // Deleting moves no data: s2 and now the newest, s3, stay hidden while s1 reads
    // through them (the volume's status says so), and leave with s1.
    qemuIo(uri, m.randomOps(rnd, 24)); // s3, the tail, saves more before-images
    snapOk(['delete', 'queue', 's3']);
    const kept = async () => (await d.api<{ deletedSnapshotsKept: { count: number; saveAreaBytes: number } }>('GET', '/v1/volumes/queue')).deletedSnapshotsKept;
    return (async () => {
      expect(await kept()).toMatchObject({ count: 2 });
      expect((await kept()).saveAreaBytes).toBeGreaterThan(0);
      expect(exportSha(d.uri('queue@s1'))).toBe(sha(models.s1!));
      expect(readSums('s1')).toEqual(ranges.map(([o, l]) => sha(models.s1!.subarray(o, o + l))));
      snapOk(['delete', 'queue', 's1']);
      expect(await kept()).toEqual({ count: 0, saveAreaBytes: 0 });
      const files = fs.readdirSync(path.join(d.dataDir, 'volumes', 'queue'), { recursive: true }) as string[];
      expect(files.some((f) => path.basename(f) === 'snapshots.json')).toBe(true);
      expect(files.filter((f) => path.basename(f).startsWith('snap-'))).toEqual([]);
    })();
  });

  it('restore is refused (exit 5) while a client is connected to the volume, and done with --force', async () => {
    const uri = d.uri('busy');
    qemuIo(uri, ['write -P 0x61 0 64K']);
    snapOk(['create', 'busy', 'b1']);
    qemuIo(uri, ['write -P 0x62 0 64K']);
    const release = path.join(dir, 'busy-release');
    const client = nbdshBackground(`
      h = connect(${JSON.stringify(uri)})
      print('CONNECTED', flush=True)
      t0 = time.monotonic()
      while not os.path.exists(${JSON.stringify(release)}) and time.monotonic() - t0 < 30:
          time.sleep(0.05)
      h.shutdown()
    `);
    try {
      await waitFor('the client to connect', () => client.lines.includes('CONNECTED'));
      const refused = snap(['restore', 'busy', 'b1']);
      expect(refused.status, refused.stderr).toBe(5);
      expect(refused.stderr).toMatch(/connected client/);
      expect(compare(uri, d.uri('busy@b1')).status).toBe(1); // untouched
      const forced = snap(['restore', 'busy', 'b1', '--force', '--json']);
      expect(forced.status, forced.stderr).toBe(0);
      expect((JSON.parse(forced.stdout) as { blocksWritten: number }).blocksWritten).toBe(16);
      expect(compare(uri, d.uri('busy@b1')).status).toBe(0);
      fs.writeFileSync(release, '');
      await Promise.race([client.exited, new Promise((r) => setTimeout(r, 10_000))]);
    } finally {
      client.proc.kill('SIGKILL');
    }
  });
});

describe('snapshot CLI', () => {
  it('exit codes: missing volume 4, missing snapshot 4, duplicate name 5; list --json parses', () => {
    qemuIo(d.uri('ro'), ['write -P 0x43 1M 4K']);
    expect(snap(['create', 'nosuch', 'x']).status).toBe(4);
    expect(snap(['list', 'nosuch']).status).toBe(4);
    snapOk(['create', 'ro', 'dup']);
    const dup = snap(['create', 'ro', 'dup']);
    expect(dup.status, dup.stderr).toBe(5);
    expect(dup.stderr).toMatch(/already exists/);
    expect(snap(['delete', 'ro', 'nosuch']).status).toBe(4);
    expect(snap(['restore', 'ro', 'nosuch']).status).toBe(4);
    const list = JSON.parse(snapOk(['list', 'ro', '--json'])) as { name: string; createdAt: string; sizeBytes: number; valid: boolean; deltaSetNumber: number }[];
    const dupInfo = list.find((s) => s.name === 'dup');
    expect(dupInfo).toBeDefined();
    expect(dupInfo!.sizeBytes).toBe(8 * MiB);
    expect(dupInfo!.valid).toBe(true);
    expect(dupInfo!.deltaSetNumber).toBe(0);
    expect(Number.isNaN(Date.parse(dupInfo!.createdAt))).toBe(false);
    expect(Math.abs(Date.parse(dupInfo!.createdAt) - Date.now())).toBeLessThan(10 * 60_000);
    // Names that cannot be export names are refused as usage errors.
    expect(snap(['create', 'ro', 'a@b']).status).not.toBe(0);
    expect(snap(['create', 'ro', '']).status).not.toBe(0);
  });

  it('snapshots, their exports and their change maps survive a daemon restart', async () => {
    const dataDir = tempDir('snap-restart');
    let d1: TestDaemon | undefined;
    let d2: TestDaemon | undefined;
    try {
      d1 = await startDaemon({ dataDir, volumes: [{ name: 'keep', size: '8M' }] });
      qemuIo(d1.uri('keep'), ['write -P 0x71 0 1M', 'write -P 0x72 4M 64K']);
      const savedFile = save(d1.uri('keep'), 'keep-saved.img');
      const saved = sha256File(savedFile);
      expect(d1.cli(['snapshot', 'create', 'keep', 'before']).status).toBe(0);
      qemuIo(d1.uri('keep'), ['write -P 0x73 0 8K', 'discard 4M 64K', 'write -P 0x74 6M 4K']);
      const live = exportSha(d1.uri('keep'));
      const dirtyBefore = nbdMap(d1.uri('keep'), 'qemu:dirty-bitmap:before');
      const allocBefore = nbdMap(d1.uri('keep@before'));
      expect(await d1.stop()).toBe(0);

      d2 = await startDaemon({ dataDir });
      const list = JSON.parse(d2.cli(['snapshot', 'list', 'keep', '--json']).stdout) as { name: string; valid: boolean }[];
      expect(list).toEqual([expect.objectContaining({ name: 'before', valid: true })]);
      const names = (JSON.parse(run('nbdinfo', ['--list', '--json', d2.uri()]).stdout) as { exports: { 'export-name': string }[] }).exports.map((e) => e['export-name']);
      expect(names.sort()).toEqual(['keep', 'keep@before']);
      expect(exportSha(d2.uri('keep@before'))).toBe(saved);
      expect(exportSha(d2.uri('keep'))).toBe(live);
      expect(nbdMap(d2.uri('keep'), 'qemu:dirty-bitmap:before')).toEqual(dirtyBefore);
      expect(dirtyBefore).toEqual(dirtyMap(8 * MiB, [0, 1, ...blocksOf(4 * MiB, 64 * KiB), (6 * MiB) / TB]));
      expect(nbdMap(d2.uri('keep@before'))).toEqual(allocBefore);
      // Copy-on-write still works after the restart.
      qemuIo(d2.uri('keep'), ['write -P 0x75 512K 512K']);
      expect(exportSha(d2.uri('keep@before'))).toBe(saved);
      expect(compare(savedFile, d2.uri('keep@before')).status).toBe(0);
    } finally {
      await d1?.dispose(); // stops it if a step above failed; removes its log (the data directory is ours)
      await d2?.dispose();
      fs.rmSync(dataDir, { recursive: true, force: true });
    }
  });
});

describe('a snapshot read while the volume changes', () => {
  it('copies of the snapshot taken during fio randwrite on the volume all equal the copy saved at snapshot time', async () => {
    const uri = d.uri('live');
    const src = path.join(dir, 'live-src.img');
    makeSparseImage(src, 64 * MiB, { regions: 24, maxRegionBytes: 4 * MiB, seed: 64 });
    run('nbdcopy', [src, uri], { timeoutMs: 60_000 });
    const saved = sha256File(save(uri, 'live-saved.img'));
    snapOk(['create', 'live', 'mounted']);

    // A client that has the snapshot open before the writes start and reads it whole,
    // over and over, on the same connection, until told to stop.
    const stop = path.join(dir, 'live-stop');
    const reader = nbdshBackground(`
      h = connect(${JSON.stringify(d.uri('live@mounted'))})
      size = h.get_size()
      print('OPEN', flush=True)
      t0 = time.monotonic()
      while time.monotonic() - t0 < 60:
          hs = hashlib.sha256()
          for off in range(0, size, 1048576):
              hs.update(h.pread(1048576, off))
          print('PASS ' + hs.hexdigest(), flush=True)
          if os.path.exists(${JSON.stringify(stop)}):
              break
      h.shutdown()
    `);
    try {
      await waitFor('the snapshot reader to connect', () => reader.lines.includes('OPEN'));
      const fio = runAsync(
        'fio',
        ['--name=live', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bsrange=4k-64k', '--iodepth=16', '--size=64M', '--time_based', '--runtime=6', '--output-format=json'],
        60_000,
      );
      let fioDone = false;
      void fio.then(() => (fioDone = true));
      // Whole copies of the snapshot with nbdcopy (4 connections), while fio writes.
      const copies: string[] = [];
      while (!fioDone) {
        const file = path.join(dir, `live-copy-${copies.length}.img`);
        const c = await runAsync('nbdcopy', ['--connections=4', d.uri('live@mounted'), file], 60_000);
        expect(c.status, c.output).toBe(0);
        if (!fioDone || copies.length === 0) copies.push(sha256File(file));
        fs.rmSync(file, { force: true });
      }
      const f = await fio;
      expect(f.status, f.output).toBe(0);
      const job = (JSON.parse(f.output.slice(f.output.indexOf('{'))) as { jobs: { error: number; write: { io_bytes: number } }[] }).jobs[0]!;
      expect(job.error).toBe(0);
      expect(job.write.io_bytes).toBeGreaterThan(8 * MiB);
      fs.writeFileSync(stop, '');
      await Promise.race([reader.exited, new Promise((r) => setTimeout(r, 20_000))]);

      expect(copies.length).toBeGreaterThanOrEqual(2);
      for (const c of copies) expect(c).toBe(saved);
      const passes = reader.lines.filter((l) => l.startsWith('PASS ')).map((l) => l.slice(5));
      expect(passes.length).toBeGreaterThanOrEqual(2);
      for (const p of passes) expect(p).toBe(saved);
      // The volume really moved on, and the snapshot still equals the saved copy.
      expect(exportSha(uri)).not.toBe(saved);
      expect(exportSha(d.uri('live@mounted'))).toBe(saved);
    } finally {
      reader.proc.kill('SIGKILL');
    }
  });
});
