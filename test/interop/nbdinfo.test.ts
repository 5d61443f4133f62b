// Why: nbdinfo (libnbd) is the reference client for what a server advertises: exports
// and descriptions, sizes, capabilities, block sizes and allocation maps.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run, startDaemon, type TestDaemon } from '../helpers/daemon.js';

let d: TestDaemon;

beforeAll(async () => {
  d = await startDaemon({
    volumes: [
      { name: 'alpha', size: '64M', description: 'first volume' },
      { name: 'ro', size: '16M', readOnly: true, description: 'read-only volume' },
    ],
  });
});
afterAll(async () => {
  await d?.dispose();
});

describe('nbdinfo', () => {
  it('--list shows every volume with its description', () => {
    const out = run('nbdinfo', ['--list', '--json', d.uri()]).stdout;
    const j = JSON.parse(out) as { exports: { 'export-name': string; description?: string; 'export-size': number }[] };
    const byName = Object.fromEntries(j.exports.map((e) => [e['export-name'], e]));
    expect(Object.keys(byName).sort()).toEqual(['alpha', 'ro']);
    expect(byName.alpha!.description).toBe('first volume');
    expect(byName.alpha!['export-size']).toBe(64 * 1024 * 1024);
    expect(byName.ro!.description).toBe('read-only volume');
  });

  it('--can and --is report capabilities truthfully', () => {
    for (const cap of ['flush', 'fua', 'trim', 'zero', 'fast-zero', 'cache', 'df', 'multi-conn']) {
      expect(run('nbdinfo', ['--can', cap, d.uri('alpha')], { allowFail: true }).status, cap).toBe(0);
    }
    expect(run('nbdinfo', ['--is', 'read-only', d.uri('ro')], { allowFail: true }).status).toBe(0);
    expect(run('nbdinfo', ['--is', 'read-only', d.uri('alpha')], { allowFail: true }).status).toBe(2);
    expect(run('nbdinfo', ['--can', 'write', d.uri('ro')], { allowFail: true }).status).toBe(2);
  });

  it('--map reports a new volume as one hole', () => {
    const out = run('nbdinfo', ['--map', '--json', d.uri('alpha')]).stdout;
    const map = JSON.parse(out) as { offset: number; length: number; type: number }[];
    expect(map).toEqual([{ offset: 0, length: 64 * 1024 * 1024, type: 3, description: 'hole,zero' }]);
  });
});
