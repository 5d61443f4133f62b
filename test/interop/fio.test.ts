// Why: fio's nbd engine (libnbd underneath) drives deep queues of random writes and then
// checks every block it wrote by its crc32c: data integrity under concurrency, on one
// connection and on four at once against the same volume.

import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { tempDir } from '../helpers/images.js';

const MiB = 1024 * 1024;
let d: TestDaemon;
let dir: string;

interface FioJob {
  jobname: string;
  error: number;
  write: { io_bytes: number; total_ios: number };
  read: { io_bytes: number };
}

beforeAll(async () => {
  dir = tempDir('fio');
  d = await startDaemon({
    volumes: [
      { name: 'one', size: '64M' },
      { name: 'four', size: '128M' },
    ],
  });
});

afterAll(async () => {
  await d?.dispose();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

/** Runs fio with JSON output to a file; returns its jobs. */
function fio(name: string, args: string[]): FioJob[] {
  const outFile = path.join(dir, `${name}.json`);
  const r = run(
    'fio',
    [`--name=${name}`, '--ioengine=nbd', '--rw=randwrite', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json', `--output=${outFile}`, ...args],
    { allowFail: true, timeoutMs: 90_000 },
  );
  const text = fs.existsSync(outFile) ? fs.readFileSync(outFile, 'utf8') : '';
  expect(r.status, `fio exited ${r.status}:\n${r.stdout}\n${r.stderr}\n${text}`).toBe(0);
  return (JSON.parse(text.slice(text.indexOf('{'))) as { jobs: FioJob[] }).jobs;
}

describe('fio --ioengine=nbd', () => {
  it('randwrite with crc32c verify on one connection: no errors, every byte written is verified', () => {
    const jobs = fio('one', [`--uri=${d.uri('one')}`, '--bs=4k', '--iodepth=32', '--size=64M']);
    expect(jobs.length).toBe(1);
    const j = jobs[0]!;
    expect(j.error).toBe(0);
    expect(j.write.io_bytes).toBe(64 * MiB);
    expect(j.read.io_bytes).toBe(64 * MiB);
  });

  it('randwrite with crc32c verify on four connections at once: no errors, every byte verified', () => {
    const jobs = fio('four', [
      `--uri=${d.uri('four')}`,
      '--bsrange=4k-64k',
      '--iodepth=16',
      '--numjobs=4',
      '--size=32M',
      '--offset_increment=32M',
    ]);
    expect(jobs.length).toBe(4);
    for (const j of jobs) {
      expect(j.error, j.jobname).toBe(0);
      expect(j.write.io_bytes).toBe(32 * MiB);
      expect(j.read.io_bytes).toBe(32 * MiB);
    }
  });
});
