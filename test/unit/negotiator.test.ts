// Why: the handshake is where clients differ most (the kernel sends only GO, qemu and
// libnbd negotiate structured replies and contexts, old clients use EXPORT_NAME).
// These tests drive the negotiator with bytes and check every reply against the spec.
import { describe, expect, it } from 'vitest';
import { Negotiator, type NegotiationResult } from '../../src/nbd/negotiator.js';
import * as C from '../../src/nbd/constants.js';
import { MemoryCatalog, MemoryExport } from '../helpers/memory-export.js';
import { goData, metaData, option, parseOptionReplies } from '../helpers/wire.js';
import { handshakeOptionsMax, handshakeOptionsPerExportMax } from '../../src/util/limits.js';

const FLAGS = Buffer.from([0, 0, 0, C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES]);

function setup(defaultExport?: string) {
  const disk = new MemoryExport('disk', 1 << 20, undefined, 'the disk');
  const ro = new MemoryExport('ro', 1 << 16, {
    readOnly: true, flush: true, fua: true, trim: true, writeZeroes: true, fastZero: true, cache: true, multiConn: true,
  });
  const n = new Negotiator(new MemoryCatalog([disk, ro], defaultExport));
  return { n, disk, ro };
}

function feed(n: Negotiator, ...parts: Buffer[]): { result: NegotiationResult; out: Buffer } {
  let result: NegotiationResult = { kind: 'pending' };
  for (const p of parts) result = n.push(p);
  return { result, out: Buffer.concat(n.drainOutput()) };
}

describe('Negotiator', () => {
  it('greets with NBDMAGIC, IHAVEOPT and FIXED_NEWSTYLE|NO_ZEROES', () => {
    const g = setup().n.greeting();
    expect(g.readBigUInt64BE(0)).toBe(C.NBDMAGIC);
    expect(g.readBigUInt64BE(8)).toBe(C.IHAVEOPT);
    expect(g.readUInt16BE(16)).toBe(C.FLAG_FIXED_NEWSTYLE | C.FLAG_NO_ZEROES);
  });

  it('closes on unknown client flags', () => {
    const { n } = setup();
    expect(feed(n, Buffer.from([0, 0, 0, 0x80])).result.kind).toBe('close');
  });

  it('GO: INFO_EXPORT with size and flags, BLOCK_SIZE, then ACK, and records the agreement', () => {
    const { n, disk } = setup();
    const { result, out } = feed(n, FLAGS, option(C.OPT_GO, goData('disk', [C.INFO_BLOCK_SIZE, C.INFO_NAME, C.INFO_DESCRIPTION])));
    const replies = parseOptionReplies(out);
    expect(replies.at(-1)!.type).toBe(C.REP_ACK);
    const infos = replies.filter((r) => r.type === C.REP_INFO).map((r) => r.data.readUInt16BE(0));
    expect(infos.sort()).toEqual([C.INFO_EXPORT, C.INFO_NAME, C.INFO_DESCRIPTION, C.INFO_BLOCK_SIZE].sort());
    const exp = replies.find((r) => r.type === C.REP_INFO && r.data.readUInt16BE(0) === C.INFO_EXPORT)!.data;
    expect(Number(exp.readBigUInt64BE(2))).toBe(disk.sizeBytes);
    const flags = exp.readUInt16BE(10);
    expect(flags & C.TFLAG_HAS_FLAGS).toBeTruthy();
    expect(flags & C.TFLAG_READ_ONLY).toBe(0);
    expect(flags & C.TFLAG_SEND_DF).toBe(0); // no structured replies negotiated
    const bs = replies.find((r) => r.type === C.REP_INFO && r.data.readUInt16BE(0) === C.INFO_BLOCK_SIZE)!.data;
    expect([bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)]).toEqual([1, 4096, 32 * 1024 * 1024]);
    const desc = replies.find((r) => r.type === C.REP_INFO && r.data.readUInt16BE(0) === C.INFO_DESCRIPTION)!.data;
    expect(desc.subarray(2).toString()).toBe('the disk');
    expect(result.kind).toBe('done');
    if (result.kind === 'done') {
      expect(result.negotiated.blockSizeAgreed).toBe(true);
      expect(result.negotiated.structuredReplies).toBe(false);
    }
  });

  it('GO split across many small writes, as the kernel sends it', () => {
    const { n } = setup();
    const bytes = Buffer.concat([FLAGS, option(C.OPT_GO, goData('disk'))]);
    let result: NegotiationResult = { kind: 'pending' };
    for (let i = 0; i < bytes.length; i++) result = n.push(bytes.subarray(i, i + 1));
    expect(result.kind).toBe('done');
    if (result.kind === 'done') expect(result.negotiated.blockSizeAgreed).toBe(false);
  });

  it('GO for an unknown export answers ERR_UNKNOWN and keeps negotiating', () => {
    const { n } = setup();
    const { result, out } = feed(n, FLAGS, option(C.OPT_GO, goData('nope')));
    expect(result.kind).toBe('pending');
    expect(parseOptionReplies(out).map((r) => r.type)).toEqual([C.REP_ERR_UNKNOWN]);
  });

  it('INFO then GO on the default export', () => {
    const { n } = setup('disk');
    let r = feed(n, FLAGS, option(C.OPT_INFO, goData('')));
    expect(r.result.kind).toBe('pending');
    expect(parseOptionReplies(r.out).at(-1)!.type).toBe(C.REP_ACK);
    r = feed(n, option(C.OPT_GO, goData('')));
    expect(r.result.kind === 'done' && r.result.negotiated.export.name).toBe('disk');
  });

  it('EXPORT_NAME: size, flags and 124 zero bytes unless NO_ZEROES', () => {
    const a = setup();
    let r = feed(a.n, Buffer.from([0, 0, 0, C.FLAG_C_FIXED_NEWSTYLE]), option(C.OPT_EXPORT_NAME, Buffer.from('disk')));
    expect(r.out.length).toBe(8 + 2 + 124);
    expect(r.result.kind).toBe('done');
    const b = setup();
    r = feed(b.n, FLAGS, option(C.OPT_EXPORT_NAME, Buffer.from('disk')));
    expect(r.out.length).toBe(10);
    const c = setup();
    r = feed(c.n, FLAGS, option(C.OPT_EXPORT_NAME, Buffer.from('missing')));
    expect(r.result.kind).toBe('close');
  });

  it('LIST: one SERVER reply per export with its description, then ACK; data is refused', () => {
    const { n } = setup();
    const { out } = feed(n, FLAGS, option(C.OPT_LIST));
    const replies = parseOptionReplies(out);
    expect(replies.map((r) => r.type)).toEqual([C.REP_SERVER, C.REP_SERVER, C.REP_ACK]);
    const first = replies[0]!.data;
    const len = first.readUInt32BE(0);
    expect(first.subarray(4, 4 + len).toString()).toBe('disk');
    expect(first.subarray(4 + len).toString()).toBe('the disk');
    const r2 = feed(n, option(C.OPT_LIST, Buffer.from('x')));
    expect(parseOptionReplies(r2.out)[0]!.type).toBe(C.REP_ERR_INVALID);
  });

  it('unknown options get ERR_UNSUP; STARTTLS without TLS configured gets ERR_POLICY', () => {
    const { n } = setup();
    const { out, result } = feed(n, FLAGS, option(99, Buffer.from('abc')), option(C.OPT_STARTTLS));
    expect(parseOptionReplies(out).map((r) => r.type)).toEqual([C.REP_ERR_UNSUP, C.REP_ERR_POLICY]);
    expect(result.kind).toBe('pending');
  });

  it('ABORT is acknowledged and closes', () => {
    const { n } = setup();
    const { out, result } = feed(n, FLAGS, option(C.OPT_ABORT));
    expect(parseOptionReplies(out).map((r) => r.type)).toEqual([C.REP_ACK]);
    expect(result.kind).toBe('close');
  });

  it(`closes after ${handshakeOptionsMax} + ${handshakeOptionsPerExportMax} per export options`, () => {
    const { n } = setup(); // two exports
    const allowed = handshakeOptionsMax + handshakeOptionsPerExportMax * 2;
    n.push(FLAGS);
    let result: NegotiationResult = { kind: 'pending' };
    let answered = 0;
    for (let i = 0; i < allowed + 5 && result.kind === 'pending'; i++) {
      result = n.push(option(C.OPT_STRUCTURED_REPLY));
      if (result.kind === 'pending') answered++;
    }
    expect(answered).toBe(allowed);
    expect(result.kind).toBe('close');
    if (result.kind === 'close') expect(result.reason).toContain(`more than ${allowed} options`);
  });

  it('lets a client list 1000 exports the way libnbd does (LIST, then INFO and SET_META_CONTEXT for each, then GO)', () => {
    const exports = Array.from({ length: 1000 }, (_, i) => new MemoryExport(`vol${i}`, 1 << 16));
    const n = new Negotiator(new MemoryCatalog(exports));
    let r = feed(n, FLAGS, option(C.OPT_STRUCTURED_REPLY), option(C.OPT_LIST));
    const listed = parseOptionReplies(r.out).filter((x) => x.type === C.REP_SERVER);
    expect(listed).toHaveLength(1000);
    for (let i = 0; i < 1000; i++) {
      r = feed(n, option(C.OPT_SET_META_CONTEXT, metaData(`vol${i}`, ['base:allocation'])), option(C.OPT_INFO, goData(`vol${i}`, [C.INFO_NAME])));
      expect(r.result.kind).toBe('pending');
      expect(parseOptionReplies(r.out).at(-1)!.type).toBe(C.REP_ACK);
    }
    r = feed(n, option(C.OPT_GO, goData('vol999', [])));
    expect(r.result.kind).toBe('done');
  });

  it('meta contexts need structured replies; LIST and SET base:allocation', () => {
    const { n } = setup();
    let r = feed(n, FLAGS, option(C.OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation'])));
    expect(parseOptionReplies(r.out)[0]!.type).toBe(C.REP_ERR_INVALID);
    r = feed(n, option(C.OPT_STRUCTURED_REPLY));
    expect(parseOptionReplies(r.out)[0]!.type).toBe(C.REP_ACK);
    r = feed(n, option(C.OPT_LIST_META_CONTEXT, metaData('disk', [])));
    let replies = parseOptionReplies(r.out);
    expect(replies.map((x) => x.type)).toEqual([C.REP_META_CONTEXT, C.REP_ACK]);
    expect(replies[0]!.data.subarray(4).toString()).toBe('base:allocation');
    r = feed(n, option(C.OPT_LIST_META_CONTEXT, metaData('disk', ['base:'])));
    expect(parseOptionReplies(r.out).map((x) => x.type)).toEqual([C.REP_META_CONTEXT, C.REP_ACK]);
    r = feed(n, option(C.OPT_LIST_META_CONTEXT, metaData('disk', ['x-other:thing'])));
    expect(parseOptionReplies(r.out).map((x) => x.type)).toEqual([C.REP_ACK]);
    r = feed(n, option(C.OPT_SET_META_CONTEXT, metaData('nope', ['base:allocation'])));
    expect(parseOptionReplies(r.out)[0]!.type).toBe(C.REP_ERR_UNKNOWN);
    r = feed(n, option(C.OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation', 'bogus'])));
    expect(parseOptionReplies(r.out)[0]!.type).toBe(C.REP_ERR_INVALID); // no namespace
    r = feed(n, option(C.OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation'])));
    replies = parseOptionReplies(r.out);
    expect(replies.map((x) => x.type)).toEqual([C.REP_META_CONTEXT, C.REP_ACK]);
    r = feed(n, option(C.OPT_GO, goData('disk')));
    expect(r.result.kind === 'done' && r.result.negotiated.metaContexts).toEqual(['base:allocation']);
    expect(r.result.kind === 'done' && r.result.negotiated.transmissionFlags & C.TFLAG_SEND_DF).toBeTruthy();
  });

  it('contexts selected for one export do not carry over to another', () => {
    const { n } = setup();
    feed(n, FLAGS, option(C.OPT_STRUCTURED_REPLY), option(C.OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation'])));
    const r = feed(n, option(C.OPT_GO, goData('ro')));
    expect(r.result.kind === 'done' && r.result.negotiated.metaContexts).toEqual([]);
  });

  it('read-only exports advertise READ_ONLY and no write-type commands', () => {
    const { n } = setup();
    const r = feed(n, FLAGS, option(C.OPT_GO, goData('ro')));
    expect(r.result.kind).toBe('done');
    if (r.result.kind !== 'done') return;
    const f = r.result.negotiated.transmissionFlags;
    expect(f & C.TFLAG_READ_ONLY).toBeTruthy();
    expect(f & (C.TFLAG_SEND_TRIM | C.TFLAG_SEND_WRITE_ZEROES | C.TFLAG_SEND_FAST_ZERO)).toBe(0);
  });

  it('malformed GO data gets ERR_INVALID, not a crash', () => {
    const { n } = setup();
    const bad = goData('disk', [1, 2]);
    bad.writeUInt32BE(1000, 0); // name length beyond data
    const r = feed(n, FLAGS, option(C.OPT_GO, bad), option(C.OPT_GO, Buffer.alloc(3)));
    expect(parseOptionReplies(r.out).map((x) => x.type)).toEqual([C.REP_ERR_INVALID, C.REP_ERR_INVALID]);
  });

  it('oversize option data is skipped with ERR_TOO_BIG', () => {
    const { n } = setup();
    const big = option(77, Buffer.alloc(200 * 1024));
    const r = feed(n, FLAGS, big, option(C.OPT_LIST));
    expect(parseOptionReplies(r.out).map((x) => x.type)).toEqual([C.REP_ERR_TOO_BIG, C.REP_SERVER, C.REP_SERVER, C.REP_ACK]);
  });

  it('bytes after GO are left for the transmission phase', () => {
    const { n } = setup();
    const extra = Buffer.from('0123456789');
    const r = feed(n, Buffer.concat([FLAGS, option(C.OPT_GO, goData('disk')), extra]));
    expect(r.result.kind).toBe('done');
    expect(n.leftover().take(n.leftover().length).toString()).toBe('0123456789');
  });
});
