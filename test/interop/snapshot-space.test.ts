// Why: running out of snapshot space is an expected event, not a failure of the volume:
// the snapshot that filled becomes invalid (log line, status, its export goes away), the
// volume keeps accepting writes, and the other snapshots keep their content.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run, startDaemon, type TestDaemon } from '../helpers/daemon.js';

let d: TestDaemon;
beforeAll(async () => {
  d = await startDaemon({ logLevel: 'info' });
  const r = d.cli(['volume', 'create', 'small', '--size', '64M', '--snapshot-space', '2M']);
  expect(r.status, r.stderr).toBe(0);
});
afterAll(async () => {
  await d?.dispose();
});

describe('snapshot space', () => {
  it('a full save area invalidates only the snapshot that needed it; writes go on', () => {
    run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 16M', d.uri('small')]);
    expect(d.cli(['snapshot', 'create', 'small', 'old']).status).toBe(0);
    // 1 MiB of first writes: fits old's 2 MiB space.
    run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 0 1M', d.uri('small')]);
    expect(d.cli(['snapshot', 'create', 'small', 'new']).status).toBe(0);
    // 8 MiB of first writes after 'new': far past 2 MiB. Every write must still succeed.
    const w = run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 4M 8M', '-c', 'read -P 0x33 4M 8M', d.uri('small')]);
    expect(w.stdout).toMatch(/wrote 8388608\/8388608/);
    expect(w.stdout).not.toMatch(/Pattern verification failed/);
    const list = JSON.parse(d.cli(['snapshot', 'list', 'small', '--json']).stdout) as { name: string; valid: boolean }[];
    const byName = Object.fromEntries(list.map((s) => [s.name, s.valid]));
    expect(byName.new).toBe(false);
    // 'old' either stays valid (it got what it needed from 'new' first) or is retired the
    // same way; it must never read wrong data. Here its blocks 1M..16M were saved by 'new'.
    const exports = run('nbdinfo', ['--list', '--json', d.uri()]).stdout;
    expect(exports).not.toContain('small@new');
    if (byName.old) {
      const r = run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x11 0 16M', d.uri('small@old')]);
      expect(r.stdout).not.toMatch(/Pattern verification failed/);
    }
    expect(d.log()).toMatch(/snapshot save area full/);
    // The volume keeps working.
    expect(run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 32M 1M', d.uri('small')]).stdout).toMatch(/wrote/);
  });

  it('refuses a snapshot space smaller than one tracking block', () => {
    const r = d.cli(['volume', 'create', 'tiny', '--size', '8M', '--snapshot-space', '1K']);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/snapshot space/);
  });
});
