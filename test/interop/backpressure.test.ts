// Why: a client that pipelines far more than the server will hold, and does not read
// its replies, must not make the daemon buffer without bound. The server stops reading
// at its in-flight caps and while replies wait unsent; when the client finally reads,
// every request gets exactly one reply.
import fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDaemon, type TestDaemon } from '../helpers/daemon.js';
import * as C from '../../src/nbd/constants.js';
import { request } from '../helpers/wire.js';
import { rawHandshake } from '../helpers/raw-transmission.js';

let d: TestDaemon;
beforeAll(async () => {
  d = await startDaemon({ volumes: [{ name: 'bp', size: '64M' }], logLevel: 'warn' });
});
afterAll(async () => {
  await d?.dispose();
});

function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : 0;
}

describe('backpressure', () => {
  it('1 GiB of pipelined 1 MiB reads with replies unread: memory stays bounded, every reply arrives', async () => {
    const REQUESTS = 1024;
    const READ_BYTES = 1024 * 1024;
    const sock = await rawHandshake(d.nbdPort, 'bp');
    sock.pause(); // stop reading replies
    const rssBefore = rssMiB(d.proc.pid!);
    // Write all requests; the socket's own buffer absorbs what the server does not read.
    for (let i = 0; i < REQUESTS; i++) sock.write(request(C.CMD_READ, { cookie: i + 1, offset: (i % 64) * READ_BYTES, length: READ_BYTES }));
    await new Promise((r) => setTimeout(r, 3000));
    const rssStalled = rssMiB(d.proc.pid!);
    // Now read everything and count replies.
    let pending = Buffer.alloc(0);
    let replies = 0;
    let errors = 0;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`only ${replies} replies`)), 60_000);
      sock.on('data', (c: Buffer) => {
        pending = pending.length ? Buffer.concat([pending, c]) : c;
        while (pending.length >= 16) {
          expect(pending.readUInt32BE(0)).toBe(C.SIMPLE_REPLY_MAGIC);
          const err = pending.readUInt32BE(4);
          const need = 16 + (err === 0 ? READ_BYTES : 0);
          if (pending.length < need) break;
          if (err) errors++;
          replies++;
          pending = pending.subarray(need);
        }
        if (replies === REQUESTS) {
          clearTimeout(timer);
          resolve();
        }
      });
      sock.resume();
    });
    sock.destroy();
    console.log(`[backpressure] RSS before ${rssBefore.toFixed(0)} MiB, while stalled ${rssStalled.toFixed(0)} MiB`);
    expect(replies).toBe(REQUESTS);
    expect(errors).toBe(0);
    // 1 GiB of replies were requested; while stalled the daemon may hold its unsent-reply
    // cap (32 MiB) plus its in-flight cap (64 MiB) plus one request.
    expect(rssStalled - rssBefore).toBeLessThan(160);
  });
});
