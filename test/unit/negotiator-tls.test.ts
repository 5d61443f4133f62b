// Why: the STARTTLS rules of doc/proto.md ("TLS support", NBD_OPT_STARTTLS) are where a
// server leaks what it should not (export names before TLS) or lets a client skip TLS.
// These drive the negotiator with bytes alone in each mode: NOTLS (off), SELECTIVETLS with
// no TLS-only export (on), FORCEDTLS (require).
import { describe, expect, it } from 'vitest';
import { Negotiator, type NegotiationResult, type TlsMode } from '../../src/nbd/negotiator.js';
import * as C from '../../src/nbd/constants.js';
import { MemoryCatalog, MemoryExport } from '../helpers/memory-export.js';
import { goData, metaData, option, parseOptionReplies } from '../helpers/wire.js';
import { handshakeOptionBytesMax } from '../../src/util/limits.js';

const FLAGS = Buffer.from([0, 0, 0, C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES]);
const SECRET_NAME = 'secret-volume';

function setup(mode: TlsMode) {
  const disk = new MemoryExport(SECRET_NAME, 1 << 20, undefined, 'payroll disk');
  return new Negotiator(new MemoryCatalog([disk], SECRET_NAME), mode);
}

function feed(n: Negotiator, ...parts: Buffer[]): { result: NegotiationResult; out: Buffer } {
  let result: NegotiationResult = { kind: 'pending' };
  for (const p of parts) result = n.push(p);
  return { result, out: Buffer.concat(n.drainOutput()) };
}

const types = (out: Buffer) => parseOptionReplies(out).map((r) => r.type);

/** Greeting done, STARTTLS acknowledged, and the caller's TLS handshake "finished". */
function upgraded(mode: TlsMode): Negotiator {
  const n = setup(mode);
  const { result, out } = feed(n, FLAGS, option(C.OPT_STARTTLS));
  expect(result.kind).toBe('starttls');
  expect(types(out)).toEqual([C.REP_ACK]);
  n.tlsStarted();
  return n;
}

describe('Negotiator: NBD_OPT_STARTTLS', () => {
  it('off (NOTLS): STARTTLS gets ERR_POLICY, haggling goes on, never TLS_REQD', () => {
    const n = setup('off');
    const { result, out } = feed(n, FLAGS, option(C.OPT_STARTTLS), option(C.OPT_LIST), option(C.OPT_GO, goData(SECRET_NAME)));
    const t = types(out);
    expect(t[0]).toBe(C.REP_ERR_POLICY);
    expect(t).not.toContain(C.REP_ERR_TLS_REQD);
    expect(result.kind).toBe('done');
    if (result.kind === 'done') expect(result.negotiated.tls).toBe(false);
  });

  it('on: plain clients are served (LIST, GO) without TLS', () => {
    const n = setup('on');
    const { result, out } = feed(n, FLAGS, option(C.OPT_LIST), option(C.OPT_GO, goData(SECRET_NAME)));
    expect(types(out)).not.toContain(C.REP_ERR_TLS_REQD);
    expect(result.kind).toBe('done');
    if (result.kind === 'done') expect(result.negotiated.tls).toBe(false);
  });

  it('on: STARTTLS is acknowledged and the machine waits for the TLS handshake', () => {
    const n = setup('on');
    const { result, out } = feed(n, FLAGS, option(C.OPT_STARTTLS));
    expect(result).toEqual({ kind: 'starttls' });
    const r = parseOptionReplies(out);
    expect(r).toHaveLength(1);
    expect(r[0]!.option).toBe(C.OPT_STARTTLS);
    expect(r[0]!.type).toBe(C.REP_ACK);
    expect(r[0]!.data.length).toBe(0);
    expect(n.tlsActive).toBe(false);
    n.tlsStarted();
    expect(n.tlsActive).toBe(true);
  });

  it('STARTTLS with data gets ERR_INVALID and no upgrade', () => {
    const n = setup('require');
    const { result, out } = feed(n, FLAGS, option(C.OPT_STARTTLS, Buffer.from('x')));
    expect(types(out)).toEqual([C.REP_ERR_INVALID]);
    expect(result.kind).toBe('pending');
  });

  for (const mode of ['on', 'require'] as const) {
    it(`${mode}: STARTTLS after TLS gets ERR_INVALID; options then work, never TLS_REQD`, () => {
      const n = upgraded(mode);
      const { result, out } = feed(n, option(C.OPT_STARTTLS), option(C.OPT_LIST), option(C.OPT_GO, goData(SECRET_NAME)));
      const t = types(out);
      expect(t[0]).toBe(C.REP_ERR_INVALID);
      expect(t).toContain(C.REP_SERVER);
      expect(t).not.toContain(C.REP_ERR_TLS_REQD);
      expect(result.kind).toBe('done');
      if (result.kind === 'done') expect(result.negotiated.tls).toBe(true);
    });
  }

  it('state negotiated before STARTTLS does not survive it (structured replies, meta contexts)', () => {
    const n = setup('on');
    const before = feed(
      n,
      FLAGS,
      option(C.OPT_STRUCTURED_REPLY),
      option(C.OPT_SET_META_CONTEXT, metaData(SECRET_NAME, [C.CONTEXT_BASE_ALLOCATION])),
      option(C.OPT_STARTTLS),
    );
    expect(types(before.out)).toEqual([C.REP_ACK, C.REP_META_CONTEXT, C.REP_ACK, C.REP_ACK]);
    expect(before.result.kind).toBe('starttls');
    n.tlsStarted();
    const { result } = feed(n, option(C.OPT_GO, goData(SECRET_NAME)));
    expect(result.kind).toBe('done');
    if (result.kind === 'done') {
      expect(result.negotiated.structuredReplies).toBe(false);
      expect(result.negotiated.metaContexts).toEqual([]);
      expect(result.negotiated.transmissionFlags & C.TFLAG_SEND_DF).toBe(0);
    }
  });

  it('require (FORCEDTLS): every option but STARTTLS/ABORT gets TLS_REQD, and nothing about exports leaks', () => {
    const n = setup('require');
    const opts = [
      option(C.OPT_LIST),
      option(C.OPT_INFO, goData(SECRET_NAME, [C.INFO_NAME, C.INFO_DESCRIPTION])),
      option(C.OPT_GO, goData(SECRET_NAME)),
      option(C.OPT_GO, goData('no-such-export')),
      option(C.OPT_STRUCTURED_REPLY),
      option(C.OPT_LIST_META_CONTEXT, metaData(SECRET_NAME, [])),
      option(C.OPT_SET_META_CONTEXT, metaData(SECRET_NAME, [C.CONTEXT_BASE_ALLOCATION])),
      option(99, Buffer.from('unknown')),
    ];
    const { result, out } = feed(n, FLAGS, ...opts);
    const r = parseOptionReplies(out);
    expect(r.map((x) => x.type)).toEqual(opts.map(() => C.REP_ERR_TLS_REQD));
    expect(r.map((x) => x.option)).toEqual([C.OPT_LIST, C.OPT_INFO, C.OPT_GO, C.OPT_GO, C.OPT_STRUCTURED_REPLY, C.OPT_LIST_META_CONTEXT, C.OPT_SET_META_CONTEXT, 99]);
    expect(out.includes(Buffer.from(SECRET_NAME))).toBe(false);
    expect(out.includes(Buffer.from('payroll'))).toBe(false);
    expect(result.kind).toBe('pending');
    // And STARTTLS still works after all that.
    const s = feed(n, option(C.OPT_STARTTLS));
    expect(s.result.kind).toBe('starttls');
    expect(types(s.out)).toEqual([C.REP_ACK]);
  });

  it('require: an oversize option before TLS is skipped with TLS_REQD, not TOO_BIG', () => {
    const n = setup('require');
    const { result, out } = feed(n, FLAGS, option(C.OPT_LIST, Buffer.alloc(handshakeOptionBytesMax + 1)), option(C.OPT_STARTTLS));
    expect(types(out)).toEqual([C.REP_ERR_TLS_REQD, C.REP_ACK]);
    expect(result.kind).toBe('starttls');
  });

  it('require: EXPORT_NAME before TLS closes the session without a byte of export data', () => {
    const n = setup('require');
    const { result, out } = feed(n, FLAGS, option(C.OPT_EXPORT_NAME, Buffer.from(SECRET_NAME)));
    expect(result.kind).toBe('close');
    expect(out.length).toBe(0);
  });

  it('require: a client without fixed newstyle cannot get an export', () => {
    const n = setup('require');
    const { result, out } = feed(n, Buffer.from([0, 0, 0, 0]), option(C.OPT_EXPORT_NAME, Buffer.from(SECRET_NAME)));
    expect(result.kind).toBe('close');
    expect(out.length).toBe(0);
  });

  it('require: ABORT before TLS is acknowledged and closes', () => {
    const n = setup('require');
    const { result, out } = feed(n, FLAGS, option(C.OPT_ABORT));
    expect(types(out)).toEqual([C.REP_ACK]);
    expect(result.kind).toBe('close');
  });

  it('require: after TLS, EXPORT_NAME and GO enter transmission', () => {
    const a = upgraded('require');
    expect(feed(a, option(C.OPT_EXPORT_NAME, Buffer.from(SECRET_NAME))).result.kind).toBe('done');
    const b = upgraded('require');
    expect(feed(b, option(C.OPT_GO, goData(SECRET_NAME))).result.kind).toBe('done');
  });

  it('plaintext pipelined behind STARTTLS closes the session (no command injection)', () => {
    const n = setup('on');
    // One segment: STARTTLS and a GO an attacker slipped in before the TLS handshake.
    const { result } = feed(n, Buffer.concat([FLAGS, option(C.OPT_STARTTLS), option(C.OPT_GO, goData(SECRET_NAME))]));
    expect(result.kind).toBe('close');
    // The same bytes arriving in a later segment, before the upgrade finished.
    const m = setup('on');
    expect(feed(m, FLAGS, option(C.OPT_STARTTLS)).result.kind).toBe('starttls');
    expect(feed(m, option(C.OPT_GO, goData(SECRET_NAME))).result.kind).toBe('close');
    expect(() => m.tlsStarted()).toThrow();
  });

  it('STARTTLS split one byte at a time still yields starttls', () => {
    const n = setup('require');
    const bytes = Buffer.concat([FLAGS, option(C.OPT_STARTTLS)]);
    let result: NegotiationResult = { kind: 'pending' };
    for (let i = 0; i < bytes.length; i++) result = n.push(bytes.subarray(i, i + 1));
    expect(result.kind).toBe('starttls');
  });
});
