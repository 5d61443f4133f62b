// Why: nbdcopy (libnbd) copies whole disks with many requests in flight, block status
// to skip holes, zero requests for them and, with --connections, several connections
// at once (multi-conn). A whole sparse volume must come back bit for bit, both ways.

import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { makeSparseImage, sha256File, tempDir } from '../helpers/images.js';

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;
let d: TestDaemon;
let dir: string;
let src: string;
let srcSha: string;
let dataBytes: number;

beforeAll(async () => {
  dir = tempDir('nbdcopy');
  src = path.join(dir, 'src.img');
  ({ dataBytes } = makeSparseImage(src, SIZE, { regions: 24, maxRegionBytes: 3 * MiB, seed: 2026 }));
  srcSha = sha256File(src);
  d = await startDaemon({
    volumes: [
      { name: 'one', size: '256M' },
      { name: 'four', size: '256M' },
    ],
  });
});

afterAll(async () => {
  await d?.dispose();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

function allocatedBytes(name: string): number {
  const r = d.cli(['volume', 'info', name, '--json']);
  expect(r.status, r.stderr).toBe(0);
  return (JSON.parse(r.stdout) as { allocatedBytes: number }).allocatedBytes;
}

describe('nbdcopy', () => {
  it('copies a sparse 256 MiB image into a volume and back with the same sha256, keeping the volume sparse', () => {
    const back = path.join(dir, 'back-one.img');
    run('nbdcopy', ['--flush', src, d.uri('one')], { timeoutMs: 120_000 });
    run('nbdcopy', [d.uri('one'), back], { timeoutMs: 120_000 });
    expect(fs.statSync(back).size).toBe(SIZE);
    expect(sha256File(back)).toBe(srcSha);
    // Holes were sent as holes (zero requests) and punched, not written as zero data.
    const allocated = allocatedBytes('one');
    expect(allocated).toBeGreaterThanOrEqual(dataBytes - 2 * MiB);
    expect(allocated).toBeLessThan(dataBytes + 16 * MiB);
  });

  it('copies both ways with --connections 4 --requests 64 and the same sha256', () => {
    const back = path.join(dir, 'back-four.img');
    run('nbdcopy', ['--connections', '4', '--requests', '64', src, d.uri('four')], { timeoutMs: 120_000 });
    run('nbdcopy', ['--connections', '4', '--requests', '64', d.uri('four'), back], { timeoutMs: 120_000 });
    expect(fs.statSync(back).size).toBe(SIZE);
    expect(sha256File(back)).toBe(srcSha);
  });
});
