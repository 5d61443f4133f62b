// Why: nbdsh (libnbd) sends every NBD command and flag, and with strict mode off it
// sends what a server must refuse. These tests hold the server to doc/proto.md for
// each command, flag and error case, and check that bad input on one request or
// connection never disturbs the next request or another connection. Handshake-level
// and malformed-frame cases, which no library sends, use a raw socket client.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { nbdsh, nbdshOut } from '../helpers/nbdsh.js';
import { CMD, OPT, RawNbd, REP, REPLY_TYPE } from '../helpers/raw-nbd.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;
const ENOENT = 2;

/** Data regions of the 'mixed' volume (32 MiB); everything else is a hole. */
const LAYOUT: [number, number][] = [
  [0, 64 * KiB],
  [1 * MiB, 192 * KiB],
  [3 * MiB, 4 * KiB],
  [8 * MiB, 4 * MiB],
  [31 * MiB, 1 * MiB],
];
const MIXED_SIZE = 32 * MiB;

/** The base:allocation map LAYOUT must produce: data = 0, hole = HOLE|ZERO = 3. */
function expectedExtents(from: number, to: number): [number, number, number][] {
  const out: [number, number, number][] = [];
  let pos = from;
  for (const [off, len] of LAYOUT) {
    if (off + len <= from || off >= to) continue;
    if (off > pos) out.push([pos, off - pos, 3]);
    const s = Math.max(off, pos);
    const e = Math.min(off + len, to);
    out.push([s, e - s, 0]);
    pos = e;
  }
  if (pos < to) out.push([pos, to - pos, 3]);
  return out;
}

/** Python that defines expected(offset, length): the bytes LAYOUT puts there. */
const PY_MIXED = `
LAYOUT = ${JSON.stringify(LAYOUT)}
def expected(offset, length):
    b = bytearray(length)
    for off, ln in LAYOUT:
        s, e = max(off, offset), min(off + ln, offset + length)
        if s < e:
            b[s - offset:e - offset] = pattern(off, ln)[s - off:e - off]
    return bytes(b)
`;

let d: TestDaemon;
let sockPath: string;
const py = (s: string) => JSON.stringify(s);

beforeAll(async () => {
  sockPath = path.join(os.tmpdir(), `deltavol-nbdsh-${process.pid}-${Date.now()}.sock`);
  d = await startDaemon({
    extraArgs: ['--socket', sockPath, '--default-export', 'rw'],
    volumes: [
      { name: 'rw', size: '64M', description: 'read-write test volume' },
      { name: 'mixed', size: '32M' },
      { name: 'err', size: '16M' },
      { name: 'ro', size: '16M', readOnly: true },
      { name: 'aio', size: '32M' },
      { name: 'mc', size: '16M' },
    ],
  });
  // Lay out data regions and holes on 'mixed'; each region holds pattern(offset).
  nbdsh(`
    h = connect(${py(d.uri('mixed'))})
    for off, ln in ${JSON.stringify(LAYOUT)}:
        h.pwrite(pattern(off, ln), off)
    h.flush()
  `);
});

afterAll(async () => {
  await d?.dispose();
  fs.rmSync(sockPath, { force: true });
});

describe('nbdsh: commands', () => {
  it('pwrite then pread returns the same bytes, with and without FUA', () => {
    const r = nbdshOut<Record<string, boolean>>(`
      h = connect(${py(d.uri('rw'))})
      a = pattern(1, 1 << 20)
      b = pattern(2, 4096 + 512)
      h.pwrite(a, 0)
      h.pwrite(b, (1 << 20) + 512, nbd.CMD_FLAG_FUA)
      out({'plain': h.pread(len(a), 0) == a, 'fua': h.pread(len(b), (1 << 20) + 512) == b,
           'can_fua': h.can_fua()})
    `);
    expect(r).toEqual({ plain: true, fua: true, can_fua: true });
  });

  it('flush succeeds and written data stays readable', () => {
    const r = nbdshOut(`
      h = connect(${py(d.uri('rw'))})
      a = pattern(3, 64 * 1024)
      h.pwrite(a, 2 << 20)
      out([err_of(lambda: h.flush()), h.pread(len(a), 2 << 20) == a])
    `);
    expect(r).toEqual([0, true]);
  });

  it('trim, plain and with FUA, reads back as zeroes and leaves a hole', () => {
    const r = nbdshOut(`
      h = connect(${py(d.uri('rw'))})
      h.pwrite(pattern(4, 1 << 20), 4 << 20)
      h.trim(512 * 1024, 4 << 20)
      h.trim(512 * 1024, (4 << 20) + 512 * 1024, nbd.CMD_FLAG_FUA)
      out({'zero': h.pread(1 << 20, 4 << 20) == bytes(1 << 20), 'map': extents(h, 1 << 20, 4 << 20)})
    `);
    expect(r).toEqual({ zero: true, map: [[4 * MiB, 1 * MiB, 3]] });
  });

  it('cache succeeds on valid ranges', () => {
    const r = nbdshOut(`
      h = connect(${py(d.uri('rw'))})
      out([h.can_cache(), err_of(lambda: h.cache(1 << 20, 0)), err_of(lambda: h.cache(4096, (64 << 20) - 4096))])
    `);
    expect(r).toEqual([true, 0, 0]);
  });

  it('write_zeroes, plain and with FUA, reads as zeroes and punches a hole', () => {
    const r = nbdshOut(`
      h = connect(${py(d.uri('rw'))})
      h.pwrite(pattern(5, 1 << 20), 8 << 20)
      h.zero(512 * 1024, 8 << 20)
      h.zero(512 * 1024, (8 << 20) + 512 * 1024, nbd.CMD_FLAG_FUA)
      out({'zero': h.pread(1 << 20, 8 << 20) == bytes(1 << 20), 'map': extents(h, 1 << 20, 8 << 20)})
    `);
    expect(r).toEqual({ zero: true, map: [[8 * MiB, 1 * MiB, 3]] });
  });

  it('write_zeroes with NO_HOLE reads as zeroes and keeps the file allocated; without it the space is freed', () => {
    // Allocation is checked on the volume's file: ext4 reports ZERO_RANGE's unwritten
    // extents as holes to SEEK_HOLE, so block status cannot tell the two apart.
    const r = nbdshOut<{ zero: boolean[]; blocks: number[] }>(`
      path = ${py(d.volumePath('rw'))}
      h = connect(${py(d.uri('rw'))})
      h.pwrite(pattern(6, 1 << 20), 10 << 20)
      h.flush()
      b0 = os.stat(path).st_blocks
      h.zero(1 << 20, 10 << 20, nbd.CMD_FLAG_NO_HOLE)
      z1 = h.pread(1 << 20, 10 << 20) == bytes(1 << 20)
      b1 = os.stat(path).st_blocks
      h.zero(1 << 20, 10 << 20)
      z2 = h.pread(1 << 20, 10 << 20) == bytes(1 << 20)
      b2 = os.stat(path).st_blocks
      out({'zero': [z1, z2], 'blocks': [b0, b1, b2]})
    `);
    expect(r.zero).toEqual([true, true]);
    const [b0, b1, b2] = r.blocks as [number, number, number];
    const MiBSectors = MiB / 512;
    expect(b1, 'NO_HOLE freed space').toBeGreaterThanOrEqual(b0 - 8);
    expect(b0 - b2, 'plain zero kept the space').toBeGreaterThanOrEqual(MiBSectors - 8);
  });

  it('write_zeroes with FAST_ZERO succeeds fast and zeroes the range', () => {
    const r = nbdshOut(`
      h = connect(${py(d.uri('rw'))})
      h.pwrite(pattern(7, 1 << 20), 12 << 20)
      t = time.monotonic()
      e = err_of(lambda: h.zero(1 << 20, 12 << 20, nbd.CMD_FLAG_FAST_ZERO))
      out({'can': h.can_fast_zero(), 'err': e, 'fast': time.monotonic() - t < 2,
           'zero': h.pread(1 << 20, 12 << 20) == bytes(1 << 20)})
    `);
    expect(r).toEqual({ can: true, err: 0, fast: true, zero: true });
  });

  it('block_status without REQ_ONE maps a mixed data/hole layout exactly', () => {
    const r = nbdshOut(`
      h = connect(${py(d.uri('mixed'))})
      out([h.can_meta_context('base:allocation'), extents(h, ${MIXED_SIZE}, 0), extents(h, 2 << 20, 1 << 20)])
    `);
    expect(r).toEqual([true, expectedExtents(0, MIXED_SIZE), expectedExtents(1 * MiB, 3 * MiB)]);
  });

  it('block_status with REQ_ONE returns exactly one extent, within the request', () => {
    const r = nbdshOut(`
      h = connect(${py(d.uri('mixed'))})
      out([extents(h, 4 << 20, 0, nbd.CMD_FLAG_REQ_ONE),
           extents(h, 8 << 20, 64 * 1024, nbd.CMD_FLAG_REQ_ONE),
           extents(h, 1 << 20, 8 << 20, nbd.CMD_FLAG_REQ_ONE)])
    `);
    expect(r).toEqual([[[0, 64 * KiB, 0]], [[64 * KiB, 1 * MiB - 64 * KiB, 3]], [[8 * MiB, 1 * MiB, 0]]]);
  });

  it('a large read over holes and data returns the right bytes, holes as OFFSET_HOLE chunks', () => {
    const r = nbdshOut<{ whole: boolean; mid: boolean; chunks: Record<string, number>; assembled: boolean }>(`
      h = connect(${py(d.uri('mixed'))})
      whole = h.pread(${MIXED_SIZE}, 0) == expected(0, ${MIXED_SIZE})
      mid = h.pread(3 * 1024 * 1024 + 4096, 512 * 1024) == expected(512 * 1024, 3 * 1024 * 1024 + 4096)
      chunks = {'data': 0, 'hole': 0}
      buf = bytearray(12 << 20)
      def chunk(sub, off, status, err):
          if status == nbd.READ_DATA:
              chunks['data'] += 1
              buf[off:off + len(sub)] = sub
          elif status == nbd.READ_HOLE:
              chunks['hole'] += 1
          return 0
      h.pread_structured(12 << 20, 0, chunk)
      out({'whole': whole, 'mid': mid, 'chunks': chunks, 'assembled': bytes(buf) == expected(0, 12 << 20)})
    `, { lib: PY_MIXED });
    expect(r.whole).toBe(true);
    expect(r.mid).toBe(true);
    expect(r.assembled).toBe(true);
    // [0,12M) holds 4 data regions separated by 3 holes.
    expect(r.chunks).toEqual({ data: 4, hole: 3 });
  });

  it('a read with DF arrives as one data chunk even over holes', () => {
    const r = nbdshOut(`
      h = connect(${py(d.uri('mixed'))})
      chunks = []
      def chunk(sub, off, status, err):
          chunks.append([off, len(sub), status, bytes(sub) == expected(off, len(sub))])
          return 0
      h.pread_structured(12 << 20, 0, chunk, nbd.CMD_FLAG_DF)
      out([h.can_df(), chunks])
    `, { lib: PY_MIXED });
    expect(r).toEqual([true, [[0, 12 * MiB, 1, true]]]);
  });
});

describe('nbdsh: errors', () => {
  it('out-of-range read, trim, cache and block_status fail with EINVAL; write and zero with ENOSPC', () => {
    const r = nbdshOut(`
      h = connect(${py(d.uri('err'))}, strict=0)
      end = h.get_size()
      out({
        'read_beyond': err_of(lambda: h.pread(512, end)),
        'read_straddle': err_of(lambda: h.pread(1024, end - 512)),
        'trim': err_of(lambda: h.trim(1024, end - 512)),
        'cache': err_of(lambda: h.cache(1024, end - 512)),
        'block_status': err_of(lambda: extents(h, 512, end)),
        'write_beyond': err_of(lambda: h.pwrite(bytes(512), end)),
        'write_straddle': err_of(lambda: h.pwrite(bytes(1024), end - 512)),
        'zero': err_of(lambda: h.zero(1024, end - 512)),
        'after': h.pread(512, end - 512) == bytes(512),
      })
    `);
    expect(r).toEqual({
      read_beyond: EINVAL,
      read_straddle: EINVAL,
      trim: EINVAL,
      cache: EINVAL,
      block_status: EINVAL,
      write_beyond: ENOSPC,
      write_straddle: ENOSPC,
      zero: ENOSPC,
      after: true,
    });
  });

  it('requests at any byte alignment succeed (minimum block size 1, as nbdkit and qemu-nbd), and the stream stays in sync', () => {
    const r = nbdshOut(`
      h = connect(${py(d.uri('err'))})
      a = pattern(10, 4096)
      h.pwrite(a, 0)
      b = bytearray(a)
      res = {
        'min_block': h.get_block_size(nbd.SIZE_MINIMUM),
        'read_offset': h.pread(512, 100) == a[100:612],
        'read_length': h.pread(100, 0) == a[:100],
      }
      h.pwrite(bytes(512), 100); b[100:612] = bytes(512)
      h.pwrite(b'z' * 700, 1); b[1:701] = b'z' * 700
      h.zero(512, 3001); b[3001:3513] = bytes(512)
      h.cache(512, 7)
      res['intact'] = h.pread(4096, 0) == bytes(b)
      out(res)
    `);
    expect(r).toEqual({ min_block: 1, read_offset: true, read_length: true, intact: true });
  });

  it('write, trim and zero on a read-only export fail with EPERM; reads work', () => {
    const r = nbdshOut(`
      h = connect(${py(d.uri('ro'))}, strict=0)
      out({
        'ro': h.is_read_only(),
        'can_trim': h.can_trim(),
        'can_zero': h.can_zero(),
        'write': err_of(lambda: h.pwrite(bytes(512), 0)),
        'write_fua': err_of(lambda: h.pwrite(bytes(512), 0, nbd.CMD_FLAG_FUA)),
        'trim': err_of(lambda: h.trim(512, 0)),
        'zero': err_of(lambda: h.zero(512, 0)),
        'read': h.pread(4096, 0) == bytes(4096),
        'flush': err_of(lambda: h.flush()),
      })
    `);
    expect(r).toEqual({
      ro: true,
      can_trim: false,
      can_zero: false,
      write: EPERM,
      write_fua: EPERM,
      trim: EPERM,
      zero: EPERM,
      read: true,
      flush: 0,
    });
  });

  it('unknown flags, and known flags on commands they do not apply to, fail with EINVAL', () => {
    const r = nbdshOut(`
      h = connect(${py(d.uri('err'))}, strict=0)
      out({
        'read_unknown': err_of(lambda: h.pread(512, 0, 1 << 7)),
        'write_unknown': err_of(lambda: h.pwrite(bytes(512), 0, 1 << 12)),
        'read_no_hole': err_of(lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE)),
        'write_req_one': err_of(lambda: h.pwrite(bytes(512), 0, nbd.CMD_FLAG_REQ_ONE)),
        'trim_df': err_of(lambda: h.trim(512, 0, nbd.CMD_FLAG_DF)),
        'flush_unknown': err_of(lambda: h.flush(1 << 15)),
        'read_ok': err_of(lambda: h.pread(512, 0)),
      })
    `);
    expect(r).toEqual({
      read_unknown: EINVAL,
      write_unknown: EINVAL,
      read_no_hole: EINVAL,
      write_req_one: EINVAL,
      trim_df: EINVAL,
      flush_unknown: EINVAL,
      read_ok: 0,
    });
  });

  it('a write or read larger than the 32 MiB maximum payload fails, changes nothing, and the connection keeps working', () => {
    const r = nbdshOut(`
      h = connect(${py(d.uri('rw'))}, strict=0)
      before = pattern(11, 1 << 20)
      h.pwrite(before, 40 << 20)
      big = pattern(12, 40 << 20)
      err = err_of(lambda: h.pwrite(big, 0))
      rerr = err_of(lambda: h.pread(40 << 20, 0))
      after = pattern(13, 8192)
      h.pwrite(after, 48 << 20)
      out({
        'max': h.get_block_size(nbd.SIZE_MAXIMUM),
        'write': err,
        'read': rerr,
        'untouched': h.pread(1 << 20, 40 << 20) == before,
        'works': h.pread(8192, 48 << 20) == after,
      })
    `);
    expect(r).toEqual({ max: 32 * MiB, write: EINVAL, read: EINVAL, untouched: true, works: true });
  });

  it('zero-length requests are answered (success or EINVAL) without breaking the connection', () => {
    // doc/proto.md: behaviour on length 0 is unspecified, but the server SHOULD NOT disconnect,
    // and an OFFSET_DATA chunk must carry at least one byte (libnbd drops a server that sends an empty one).
    const r = nbdshOut<Record<string, [number, boolean]>>(`
      def probe(structured, fn):
          h = connect(${py(d.uri('err'))}, strict=0, structured=structured)
          e = err_of(lambda: fn(h))
          return [e, err_of(lambda: h.pread(512, 0)) == 0]
      out({
        'read': probe(True, lambda h: h.pread(0, 0)),
        'read_at_end': probe(True, lambda h: h.pread(0, h.get_size())),
        'read_simple': probe(False, lambda h: h.pread(0, 0)),
        'write': probe(True, lambda h: h.pwrite(b'', 0)),
        'trim': probe(True, lambda h: h.trim(0, 0)),
        'zero': probe(True, lambda h: h.zero(0, 0)),
        'cache': probe(True, lambda h: h.cache(0, 0)),
        'block_status': probe(True, lambda h: extents(h, 0, 0)),
      })
    `);
    for (const [what, [err, alive]] of Object.entries(r)) {
      expect([0, EINVAL], what).toContain(err);
      expect(alive, `${what}: connection still works`).toBe(true);
    }
    expect(r.read![0]).toBe(0);
  });

  it('an unknown command gets EINVAL (simple reply) and the connection keeps working', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    try {
      await c.handshake('err');
      c.write(RawNbd.request(42, { cookie: 0xabcdefn, offset: 0, length: 512 }));
      const rep = await c.simpleReply();
      expect(rep).toEqual({ error: EINVAL, cookie: 0xabcdefn });
      expect(c.buffered).toBe(0);
      const data = await c.readSimple(0, 512);
      expect(data.length).toBe(512);
    } finally {
      c.destroy();
    }
  });

  it('an unknown command gets an EINVAL error chunk (structured reply) and the connection keeps working', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    try {
      await c.handshake('err', { structured: true });
      c.write(RawNbd.request(99, { cookie: 5n, offset: 0, length: 0 }));
      const ch = await c.structuredChunk();
      expect(ch.type).toBe(REPLY_TYPE.ERROR);
      expect(ch.cookie).toBe(5n);
      expect(ch.flags & 1).toBe(1); // DONE
      expect(ch.data.readUInt32BE(0)).toBe(EINVAL);
      expect(c.buffered).toBe(0);
      // A READ afterwards is answered in full.
      expect((await c.readStructured(0, 4096, 6n)).length).toBe(4096);
    } finally {
      c.destroy();
    }
  });

  it('a bad request magic closes that connection only; other connections keep working', async () => {
    const bad = await RawNbd.connect({ port: d.nbdPort });
    const good = await RawNbd.connect({ port: d.nbdPort });
    try {
      await bad.handshake('err');
      await good.handshake('err');
      const payload = Buffer.alloc(512, 0x5a);
      expect(await good.writeSimple(8192, payload)).toBe(0);
      bad.write(RawNbd.request(CMD.READ, { magic: 0xdeadbeef, length: 512 }));
      expect(await bad.closedWithin(5000)).toBe(true);
      expect(bad.buffered).toBe(0);
      expect(await good.readSimple(8192, 512)).toEqual(payload);
      // A new connection is served too.
      const r = nbdshOut(`
        h = connect(${py(d.uri('err'))})
        out(h.pread(512, 8192) == bytes([0x5a]) * 512)
      `);
      expect(r).toBe(true);
    } finally {
      bad.destroy();
      good.destroy();
    }
  });
});

describe('nbdsh: sessions', () => {
  it('without structured replies, reads (also over holes) and writes use simple replies correctly', () => {
    const r = nbdshOut(`
      h = connect(${py(d.uri('mixed'))}, meta=False, structured=False)
      g = connect(${py(d.uri('rw'))}, meta=False, structured=False)
      a = pattern(20, 256 * 1024)
      g.pwrite(a, 16 << 20)
      out({
        'structured': h.get_structured_replies_negotiated(),
        'can_df': h.can_df(),
        'mixed': h.pread(12 << 20, 0) == expected(0, 12 << 20),
        'roundtrip': g.pread(len(a), 16 << 20) == a,
      })
    `, { lib: PY_MIXED });
    expect(r).toEqual({ structured: false, can_df: false, mixed: true, roundtrip: true });
  });

  it('64 requests in flight of mixed sizes complete out of order with the right data', () => {
    const r = nbdshOut<{ inflight: number[]; errors: number; sorted: boolean; outOfOrder: boolean; dataOk: boolean }>(`
      h = connect(${py(d.uri('aio'))})
      sizes = [512, 4096, 65536, 262144, 2 << 20, 12288]
      reqs = []
      off = 0
      for i in range(64):
          sz = sizes[i % len(sizes)]
          reqs.append((off, sz))
          off += sz
      assert off <= h.get_size()
      errors = 0
      def run(make_buf, submit):
          global errors
          order = []
          bufs = []
          def done(i):
              def cb(err):
                  global errors
                  if err.value != 0:
                      errors += 1
                  order.append(i)
                  return 1
              return cb
          for i, (o, sz) in enumerate(reqs):
              b = make_buf(i, sz)
              bufs.append(b)
              submit(b, o, done(i))
          inflight = h.aio_in_flight()
          while h.aio_in_flight() > 0:
              h.poll(-1)
          return order, bufs, inflight
      inflight = []
      out_of_order = False
      all_sorted = True
      data_ok = True
      for attempt in range(3):
          order, _, n = run(lambda i, sz: nbd.Buffer.from_bytearray(bytearray(pattern(1000 * attempt + i, sz))),
                            lambda b, o, cb: h.aio_pwrite(b, o, completion=cb))
          inflight.append(n)
          all_sorted = all_sorted and sorted(order) == list(range(64))
          out_of_order = out_of_order or order != sorted(order)
          order, bufs, n = run(lambda i, sz: nbd.Buffer(sz), lambda b, o, cb: h.aio_pread(b, o, completion=cb))
          inflight.append(n)
          all_sorted = all_sorted and sorted(order) == list(range(64))
          out_of_order = out_of_order or order != sorted(order)
          data_ok = data_ok and all(bytes(b.to_bytearray()) == pattern(1000 * attempt + i, reqs[i][1]) for i, b in enumerate(bufs))
          if out_of_order:
              break
      out({'inflight': inflight, 'errors': errors, 'sorted': all_sorted, 'outOfOrder': out_of_order, 'dataOk': data_ok})
    `);
    expect(r.errors).toBe(0);
    expect(r.sorted).toBe(true);
    expect(r.dataOk).toBe(true);
    // libnbd had (nearly) all 64 requests outstanding at once after submitting them.
    expect(r.inflight[0]).toBeGreaterThanOrEqual(48);
    expect(r.outOfOrder).toBe(true);
  });

  it('multi-conn: a write on one connection, flushed on a second, is read on a third', () => {
    const r = nbdshOut(`
      u = ${py(d.uri('mc'))}
      h1, h2, h3 = connect(u), connect(u), connect(u)
      a = pattern(30, 1 << 20)
      h1.pwrite(a, 1 << 20)
      h2.flush()
      out({'multi_conn': [h.can_multi_conn() for h in (h1, h2, h3)], 'read': h3.pread(1 << 20, 1 << 20) == a})
    `);
    expect(r).toEqual({ multi_conn: [true, true, true], read: true });
  });

  it('the empty export name opens the default export', () => {
    const r = nbdshOut(`
      a = pattern(40, 4096)
      connect(${py(d.uri('rw'))}).pwrite(a, 20 << 20)
      h = nbd.NBD()
      h.set_full_info(True)
      h.connect_uri(${py(d.uri(''))})
      out({'name': h.get_canonical_export_name(), 'size': h.get_size(), 'data': h.pread(4096, 20 << 20) == a})
    `);
    expect(r).toEqual({ name: 'rw', size: 64 * MiB, data: true });
  });

  it('an unknown export name is refused with ENOENT, the handshake goes on, and the server keeps serving', () => {
    const r = nbdshOut(`
      h = nbd.NBD()
      first = err_of(lambda: h.connect_uri(${py(d.uri('no-such-volume'))}))
      g = nbd.NBD()
      g.set_opt_mode(True)
      g.connect_uri(${py(d.uri('no-such-volume'))})
      go = err_of(lambda: g.opt_go())
      g.set_export_name('rw')
      g.opt_go()
      out({'connect': first, 'opt_go': go, 'then': g.get_size(), 'other': connect(${py(d.uri('err'))}).get_size()})
    `);
    expect(r).toEqual({ connect: ENOENT, opt_go: ENOENT, then: 64 * MiB, other: 16 * MiB });
  });

  it('serves over a Unix socket', () => {
    const r = nbdshOut(`
      h = connect('nbd+unix:///rw?socket=' + ${py(sockPath)})
      a = pattern(50, 65536)
      h.pwrite(a, 24 << 20, nbd.CMD_FLAG_FUA)
      out({'size': h.get_size(), 'data': h.pread(65536, 24 << 20) == a})
    `);
    expect(r).toEqual({ size: 64 * MiB, data: true });
  });
});

describe('handshake (raw socket)', () => {
  it('a handshake and requests sent one byte at a time are served', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    try {
      expect(await c.greeting()).toBe(3); // FIXED_NEWSTYLE | NO_ZEROES
      await c.writeSlowly(RawNbd.clientFlags(3));
      await c.writeSlowly(RawNbd.option(OPT.GO, RawNbd.goData('err')));
      const go = await c.goReplies();
      expect(go.size).toBe(16n * BigInt(MiB));
      const payload = Buffer.from('written one byte at a time, 64 bytes long, through the framer!!!');
      expect(payload.length).toBe(64);
      await c.writeSlowly(Buffer.concat([RawNbd.request(CMD.WRITE, { cookie: 9n, offset: 12288, length: 64 }), payload]));
      expect(await c.simpleReply()).toEqual({ error: 0, cookie: 9n });
      await c.writeSlowly(RawNbd.request(CMD.READ, { cookie: 10n, offset: 12288, length: 64 }));
      expect(await c.simpleReply()).toEqual({ error: 0, cookie: 10n });
      expect(await c.read(64)).toEqual(payload);
    } finally {
      c.destroy();
    }
  });

  it('NBD_OPT_LIST lists every export with its description, then ACK', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    try {
      await c.greeting();
      c.write(RawNbd.clientFlags());
      c.write(RawNbd.option(OPT.LIST));
      const exports: Record<string, string> = {};
      for (;;) {
        const r = await c.optionReply();
        expect(r.option).toBe(OPT.LIST);
        if (r.type === REP.ACK) break;
        expect(r.type).toBe(REP.SERVER);
        const n = r.data.readUInt32BE(0);
        exports[r.data.toString('utf8', 4, 4 + n)] = r.data.toString('utf8', 4 + n);
      }
      expect(exports).toEqual({ rw: 'read-write test volume', mixed: '', err: '', ro: '', aio: '', mc: '' });
      // The handshake goes on: GO after LIST works.
      c.write(RawNbd.option(OPT.GO, RawNbd.goData('mc')));
      expect((await c.goReplies()).size).toBe(16n * BigInt(MiB));
    } finally {
      c.destroy();
    }
  });

  it('an unknown option gets NBD_REP_ERR_UNSUP and the handshake goes on', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    try {
      await c.greeting();
      c.write(RawNbd.clientFlags());
      c.write(RawNbd.option(0x4242, Buffer.from('some data')));
      const r = await c.optionReply();
      expect([r.option, r.type]).toEqual([0x4242, REP.ERR_UNSUP]);
      c.write(RawNbd.option(OPT.GO, RawNbd.goData('err')));
      expect((await c.goReplies()).size).toBe(16n * BigInt(MiB));
    } finally {
      c.destroy();
    }
  });

  it('more than 64 + 4 per export options close the connection', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    try {
      await c.greeting();
      c.write(RawNbd.clientFlags());
      c.write(RawNbd.option(OPT.LIST));
      let exportsListed = 0;
      for (;;) {
        const r = await c.optionReply();
        if (r.type === REP.ACK) break;
        expect(r.type).toBe(REP.SERVER);
        exportsListed++;
      }
      expect(exportsListed).toBeGreaterThan(0);
      const allowed = 64 + 4 * exportsListed;
      const opts = Array.from({ length: allowed + 20 }, () => RawNbd.option(0x4243));
      c.write(Buffer.concat(opts));
      let replies = 0;
      try {
        for (;;) {
          const r = await c.optionReply();
          expect(r.type).toBe(REP.ERR_UNSUP);
          replies++;
        }
      } catch (e) {
        expect(String(e)).toMatch(/EOF/);
      }
      expect(replies).toBe(allowed - 1); // the LIST was the first option
      expect(await c.closedWithin(5000)).toBe(true);
    } finally {
      c.destroy();
    }
  });

  it('NBD_OPT_ABORT is acknowledged and the server closes', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    try {
      await c.greeting();
      c.write(RawNbd.clientFlags());
      c.write(RawNbd.option(OPT.ABORT));
      const r = await c.optionReply();
      expect([r.option, r.type, r.data.length]).toEqual([OPT.ABORT, REP.ACK, 0]);
      expect(await c.closedWithin(5000)).toBe(true);
    } finally {
      c.destroy();
    }
  });

  it('NBD_OPT_EXPORT_NAME gets size, flags and the 124 zero bytes a client without NO_ZEROES expects', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    try {
      await c.greeting();
      c.write(RawNbd.clientFlags(1)); // FIXED_NEWSTYLE only
      c.write(RawNbd.option(OPT.EXPORT_NAME, Buffer.from('err')));
      const b = await c.read(8 + 2 + 124);
      expect(b.readBigUInt64BE(0)).toBe(16n * BigInt(MiB));
      expect(b.readUInt16BE(8) & 1).toBe(1); // HAS_FLAGS
      expect(b.subarray(10).equals(Buffer.alloc(124))).toBe(true);
      expect((await c.readSimple(0, 512)).length).toBe(512);
    } finally {
      c.destroy();
    }
  });

  it('option data over the limit is skipped with NBD_REP_ERR_TOO_BIG and the handshake goes on', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    try {
      await c.greeting();
      c.write(RawNbd.clientFlags());
      c.write(RawNbd.option(OPT.INFO, Buffer.alloc(1024 * 1024, 0x41)));
      const r = await c.optionReply();
      expect([r.option, r.type]).toEqual([OPT.INFO, 2 ** 31 + 9]);
      c.write(RawNbd.option(OPT.GO, RawNbd.goData('err')));
      expect((await c.goReplies()).size).toBe(16n * BigInt(MiB));
    } finally {
      c.destroy();
    }
  });

  it('unknown client flags close the connection', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    try {
      await c.greeting();
      c.write(RawNbd.clientFlags(0x80000003));
      expect(await c.closedWithin(5000)).toBe(true);
      expect(c.buffered).toBe(0);
    } finally {
      c.destroy();
    }
  });

  it('NBD_CMD_DISC after pipelined requests: every request is answered, then the server closes', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    try {
      await c.handshake('err');
      const payload = Buffer.alloc(4096, 0x3c);
      c.write(
        Buffer.concat([
          RawNbd.request(CMD.WRITE, { cookie: 1n, offset: 65536, length: 4096 }),
          payload,
          RawNbd.request(CMD.FLUSH, { cookie: 2n }),
          RawNbd.request(CMD.READ, { cookie: 3n, offset: 65536, length: 4096 }),
          RawNbd.request(CMD.DISC, { cookie: 4n }),
        ]),
      );
      const seen: bigint[] = [];
      for (let i = 0; i < 3; i++) {
        const r = await c.simpleReply();
        expect(r.error).toBe(0);
        seen.push(r.cookie);
        if (r.cookie === 3n) expect(await c.read(4096)).toEqual(payload);
      }
      expect(seen.sort()).toEqual([1n, 2n, 3n]);
      expect(await c.closedWithin(5000)).toBe(true);
      expect(c.buffered).toBe(0);
    } finally {
      c.destroy();
    }
  });

  it('a connection cut in the middle of a WRITE payload does not disturb the server', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    await c.handshake('err');
    c.write(Buffer.concat([RawNbd.request(CMD.WRITE, { cookie: 1n, offset: 0, length: 65536 }), Buffer.alloc(1000)]));
    await new Promise((r) => setTimeout(r, 50));
    c.destroy();
    const r = nbdshOut(`
      h = connect(${py(d.uri('err'))})
      out(err_of(lambda: h.pread(65536, 0)))
    `);
    expect(r).toBe(0);
    expect(d.exited).toBe(false);
  });

  it('NBD_OPT_GO for an unknown export gets NBD_REP_ERR_UNKNOWN; NBD_OPT_EXPORT_NAME for one closes', async () => {
    const c = await RawNbd.connect({ port: d.nbdPort });
    try {
      await c.greeting();
      c.write(RawNbd.clientFlags());
      c.write(RawNbd.option(OPT.GO, RawNbd.goData('nope')));
      const r = await c.optionReply();
      expect([r.option, r.type]).toEqual([OPT.GO, REP.ERR_UNKNOWN]);
      c.write(RawNbd.option(OPT.EXPORT_NAME, Buffer.from('nope')));
      expect(await c.closedWithin(5000)).toBe(true);
      expect(c.buffered).toBe(0);
    } finally {
      c.destroy();
    }
  });
});
