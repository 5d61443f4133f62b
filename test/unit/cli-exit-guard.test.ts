// Why: a CLI command whose promise never settles (its request lost the connection without an
// error, seen when the daemon was killed mid-request) used to exit 0 with no output, so a
// script, and the kill9 test, took a snapshot create that never happened for a success.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';

const GUARD = pathToFileURL(path.resolve('dist/cli/exit-guard.js')).href;

function run(promise: string): { status: number | null; stderr: string } {
  const code = `import { exitWhenSettled } from ${JSON.stringify(GUARD)}; exitWhenSettled(${promise}, 0, 1);`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', code], { encoding: 'utf8', timeout: 20_000 });
  return { status: r.status, stderr: r.stderr };
}

describe('CLI exit status', () => {
  it('a command that never settles exits 1 and says so, not 0', () => {
    const r = run('new Promise(() => {})');
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/ended without an answer/);
  });

  it('a settled command exits with its code', () => {
    expect(run('Promise.resolve(0)')).toEqual({ status: 0, stderr: '' });
    expect(run('Promise.resolve(3)').status).toBe(3);
    // Settled after a while (a timer keeps the loop alive until then): still its own code.
    expect(run('new Promise((r) => setTimeout(() => r(0), 50))')).toEqual({ status: 0, stderr: '' });
  });
});
