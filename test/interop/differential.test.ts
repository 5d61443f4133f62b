// Why: the snapshot differential L→M is how a copy of L becomes M without a full copy
// (backups today, resync tomorrow). Checked with qemu-io writes and qemu-img compare: the
// stream applied to a copy of L equals M byte for byte; damaged streams change nothing.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run, startDaemon, type TestDaemon } from '../helpers/daemon.js';

let d: TestDaemon;
let dir: string;

beforeAll(async () => {
  d = await startDaemon({ volumes: [{ name: 'a', size: '128M' }, { name: 'b', size: '128M' }, { name: 'c', size: '128M' }], logLevel: 'warn' });
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'deltavol-diff-'));
  run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 48M', '-c', 'write -P 0x12 60M 4M', d.uri('a')]);
  expect(d.cli(['snapshot', 'create', 'a', 'L']).status).toBe(0);
  run('nbdcopy', [d.uri('a@L'), d.uri('b')]);
  run('nbdcopy', [d.uri('a@L'), d.uri('c')]);
  // Between L and M: overwrite, zero, trim, write into a hole, an unaligned write.
  run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 8M 12M', '-c', 'write -z 30M 6M', '-c', 'discard 60M 2M', '-c', 'write -P 0x44 100M 1M', '-c', 'write -P 0x55 12345 7000', d.uri('a')]);
  expect(d.cli(['snapshot', 'create', 'a', 'M']).status).toBe(0);
  run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x66 0 1M', d.uri('a')]); // after M: must not travel
});
afterAll(async () => {
  await d?.dispose();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('snapshot differential', () => {
  it('--apply-to makes a copy of L equal M, sending only what changed', () => {
    const r = d.cli(['snapshot', 'diff', 'a', 'L', 'M', '--apply-to', 'b']);
    expect(r.status, r.stderr).toBe(0);
    const written = Number(/([\d.]+) MiB written/.exec(r.stdout)?.[1]);
    expect(written).toBeGreaterThan(12);
    expect(written).toBeLessThan(16); // 12 MiB + 1 MiB + the unaligned write's blocks, not 48 MiB
    expect(run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', d.uri('a@M'), d.uri('b')]).stdout).toMatch(/identical/);
  });

  it('a stream file applied with `snapshot apply` does the same; damaged streams change nothing', () => {
    const file = path.join(dir, 'lm.diff');
    expect(d.cli(['snapshot', 'diff', 'a', 'L', 'M', '-o', file]).status).toBe(0);
    const bytes = fs.readFileSync(file);
    const bad = Buffer.from(bytes);
    bad[Math.floor(bad.length / 2)] ^= 0x40;
    fs.writeFileSync(path.join(dir, 'bad.diff'), bad);
    fs.writeFileSync(path.join(dir, 'short.diff'), bytes.subarray(0, bytes.length - 100));
    for (const f of ['bad.diff', 'short.diff']) {
      const r = d.cli(['snapshot', 'apply', 'c', '-i', path.join(dir, f)]);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/checksum mismatch|truncated|differential stream/);
    }
    expect(run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', d.uri('a@L'), d.uri('c')]).stdout).toMatch(/identical/);
    expect(d.cli(['snapshot', 'apply', 'c', '-i', file]).status).toBe(0);
    expect(run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', d.uri('a@M'), d.uri('c')]).stdout).toMatch(/identical/);
  });

  it('refuses M older than L, and unknown snapshots', () => {
    const r = d.cli(['snapshot', 'diff', 'a', 'M', 'L', '-o', path.join(dir, 'x')]);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/not newer than/);
    expect(d.cli(['snapshot', 'diff', 'a', 'L', 'nope', '-o', path.join(dir, 'y')]).status).toBe(4);
  });
});
