// Why: qemu's NBD client (qemu-img, qemu-io) is what virtual machines use; it negotiates
// differently from libnbd (its own block-size handling, read-modify-write for
// unaligned I/O, block status for sparse copies). Data must survive a trip through it.

import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { makeSparseImage, sha256File, tempDir } from '../helpers/images.js';

const MiB = 1024 * 1024;
let d: TestDaemon;
let dir: string;

beforeAll(async () => {
  dir = tempDir('qemu');
  d = await startDaemon({
    volumes: [
      { name: 'info', size: '48M' },
      { name: 'conv', size: '32M' },
      { name: 'io', size: '16M' },
      { name: 'cmp', size: '8M' },
    ],
  });
});

afterAll(async () => {
  await d?.dispose();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

function qemuIo(uri: string, commands: string[]) {
  return run('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri], { allowFail: true, timeoutMs: 60_000 });
}

describe('qemu', () => {
  it('qemu-img info reports the raw size of a volume', () => {
    const j = JSON.parse(run('qemu-img', ['info', '--output=json', d.uri('info')], { timeoutMs: 30_000 }).stdout) as Record<string, unknown>;
    expect(j['virtual-size']).toBe(48 * MiB);
    expect(j.format).toBe('raw');
  });

  it('qemu-img convert copies a sparse image into a volume and back unchanged', () => {
    const src = path.join(dir, 'src.img');
    const back = path.join(dir, 'back.img');
    makeSparseImage(src, 32 * MiB, { regions: 12, maxRegionBytes: 1 * MiB, seed: 7 });
    run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, d.uri('conv')], { timeoutMs: 60_000 });
    run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', d.uri('conv'), back], { timeoutMs: 60_000 });
    expect(fs.statSync(back).size).toBe(32 * MiB);
    expect(sha256File(back)).toBe(sha256File(src));
  });

  it('qemu-io write -P then read -P, on a new connection, at aligned and unaligned offsets and sizes', () => {
    // [offset, length, pattern]; disjoint, with gaps that must stay zero.
    const regions: [number, number, number][] = [
      [0, 512, 0x11],
      [1000, 3000, 0x22],
      [8192, 65536, 0x33],
      [MiB - 1, 2, 0x44],
      [3 * MiB + 7, MiB + 13, 0x55],
      [8 * MiB + 4096, 2 * MiB, 0x66],
      [16 * MiB - 4096, 4096, 0x77],
    ];
    const w = qemuIo(d.uri('io'), regions.map(([o, l, p]) => `write -P 0x${p.toString(16)} ${o} ${l}`));
    expect(w.status, w.stdout + w.stderr).toBe(0);
    expect(w.stdout.match(/^wrote /gm)?.length).toBe(regions.length);

    const gaps: [number, number][] = [
      [512, 488],
      [4000, 8192 - 4000],
      [8192 + 65536, 4096],
      [MiB - 4096, 4095],
      [MiB + 1, 4096],
      [3 * MiB, 7],
      [4 * MiB + 20, 4096],
      [16 * MiB - 8192, 4096],
    ];
    const reads = [
      ...regions.map(([o, l, p]) => `read -P 0x${p.toString(16)} ${o} ${l}`),
      ...gaps.map(([o, l]) => `read -P 0 ${o} ${l}`),
    ];
    const r = qemuIo(d.uri('io'), reads);
    expect(r.stdout).not.toMatch(/Pattern verification failed/);
    expect(r.status, r.stdout + r.stderr).toBe(0);
    expect(r.stdout.match(/^read (\d+)\/\1 bytes/gm)?.length).toBe(reads.length);
    // A wrong pattern is caught (the check can fail).
    const bad = qemuIo(d.uri('io'), ['read -P 0x22 0 512']);
    expect(bad.stdout).toMatch(/Pattern verification failed at offset 0/);
  });

  it('qemu-img compare finds an identical volume identical and a one-sector change different', () => {
    const src = path.join(dir, 'cmp.img');
    makeSparseImage(src, 8 * MiB, { regions: 6, maxRegionBytes: 512 * 1024, seed: 11 });
    run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, d.uri('cmp')], { timeoutMs: 60_000 });
    const same = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, d.uri('cmp')], { allowFail: true, timeoutMs: 60_000 });
    expect(same.status, same.stdout + same.stderr).toBe(0);
    expect(same.stdout).toMatch(/Images are identical/);
    const w = qemuIo(d.uri('cmp'), [`write -P 0xa5 ${5 * MiB} 512`]);
    expect(w.status, w.stderr).toBe(0);
    const diff = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, d.uri('cmp')], { allowFail: true, timeoutMs: 60_000 });
    expect(diff.status, diff.stdout + diff.stderr).toBe(1);
    expect(diff.stdout).toMatch(/Content mismatch at offset/);
  });
});
