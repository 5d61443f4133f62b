// Why: bugs the simulator found, each reduced to a minimal deterministic reproduction
// that does not depend on a simulator seed (seeds drift as the code changes). Each is
// `it.fails` while the bug is there: when a fix lands, its test starts failing ("expected
// to fail"), which is the signal to turn it into a plain `it` and drop its class from
// KNOWN_ISSUES (scenario.ts).

import { describe, expect, it } from 'vitest';
import { VolumeEngine } from '../../src/volume/volume-engine.js';
import { encodeFrame, FrameDecoder } from '../../src/replication/wire.js';
import { PagedFs } from './paged-fs.js';
import { SimVolumeData } from '../helpers/sim-volume-data.js';

const BS = 4096;
/** setImmediate rounds the livelock is given to resolve itself (a healthy run needs a few dozen). */
const roundsMax = 20_000;

describe('simulator findings', () => {
  // Activity-log livelock (simulator class 'activity-log-livelock', first seen with seed 20070:
  // a replica's playback of one chunk never finished). Four concurrent writers, each needing
  // a hot extent and a cold one, need eight extents; the log holds four. Each record makes
  // the four cold ones hot by evicting the four hot ones, so no writer ever has both of its
  // extents hot at once: records are written forever and no write completes.
  it('concurrent writes that need more extents than the activity log holds complete', async () => {
    const data = new SimVolumeData(64 * BS);
    const e = await VolumeEngine.create(new PagedFs(), data, { blockBytes: BS, saveAreaBytesMax: 1 << 20, activityHotMax: 4, activityExtentBytes: BS });
    for (const b of [21, 28, 31, 35]) await e.write(b * BS, [Buffer.alloc(BS, 1)]);
    let done = 0;
    for (const b of [21, 28, 31, 34]) void Promise.resolve(e.write(b * BS, [Buffer.alloc(2 * BS, 7)])).then(() => done++);
    for (let i = 0; i < roundsMax && done < 4; i++) await new Promise((r) => setImmediate(r));
    expect(done, `writes done after ${roundsMax} rounds (activity-log records written: ${e.activityCommits})`).toBe(4);
  });

  // Frame length stall (simulator class 'frame-length-stall', seed 201761): a bit flipped in
  // a frame's msgBytes field is caught only once that many bytes arrived, since the prefix
  // checksum also covers the message. The peer's pings (a few dozen bytes a second) fill the
  // bogus length for many minutes while the link's heartbeat, which counts raw bytes, keeps
  // it alive: nothing is decoded meanwhile. Here 256 KiB of valid pings follow the damaged
  // frame; a decoder that checks the prefix on its own rejects the stream at once.
  it('a flipped bit in a frame length is detected before the bogus length has arrived', () => {
    const frame = Buffer.concat(encodeFrame({ t: 'ping', atMs: 1 }));
    frame[5] = frame[5]! ^ 0x04; // msgBytes (bytes 4..7, big-endian) grows by 2^18
    const d = new FrameDecoder(() => undefined);
    let rejectedAfterBytes: number | null = null;
    let fed = 0;
    const feed = (b: Buffer) => {
      try {
        d.push(b);
      } catch {
        rejectedAfterBytes ??= fed + b.length;
      }
      fed += b.length;
    };
    feed(frame);
    const ping = Buffer.concat(encodeFrame({ t: 'ping', atMs: 2 }));
    for (let i = 0; fed < 256 * 1024 && rejectedAfterBytes === null; i++) feed(ping);
    expect(rejectedAfterBytes, `bytes taken before the damaged frame was rejected (fed ${fed})`).not.toBeNull();
    expect(rejectedAfterBytes!).toBeLessThan(4096);
  });
});
