// Why: the fixed-newstyle handshake (doc/proto.md "Option haggling") as a pure state
// machine: client bytes in, server bytes out, and finally either an opened export with
// what was negotiated, or a reason to close. Never touches a socket, so every byte
// boundary, option and error path is testable with buffers alone. TLS (doc/proto.md "TLS
// support") is a policy here too: the machine answers NBD_OPT_STARTTLS and says
// `starttls`; the caller upgrades the socket and calls tlsStarted().

import { ByteQueue } from '../util/byte-queue.js';
import * as C from './constants.js';
import type { ExportCatalog, NbdExport } from './export.js';
import {
  blockSizeMinBytes,
  blockSizePreferredBytes,
  handshakeOptionBytesMax,
  handshakeOptionsMax,
  handshakeOptionsPerExportMax,
  nbdStringBytesMax,
  requestPayloadBytesMax,
} from '../util/limits.js';

export interface Negotiated {
  export: NbdExport;
  structuredReplies: boolean;
  /** Selected metadata contexts; index = context id. */
  metaContexts: string[];
  /** The client asked for NBD_INFO_BLOCK_SIZE in GO, so it promised to honour the minimum. */
  blockSizeAgreed: boolean;
  /** Transmission flags sent to the client. */
  transmissionFlags: number;
  /** The session was upgraded with NBD_OPT_STARTTLS before transmission. */
  tls: boolean;
}

/**
 * The server's TLS policy, in the spec's words: `off` is NOTLS (STARTTLS answered
 * NBD_REP_ERR_POLICY); `on` is SELECTIVETLS with no TLS-only export (a client may upgrade,
 * plain clients are served); `require` is FORCEDTLS (every option but STARTTLS and ABORT
 * answered NBD_REP_ERR_TLS_REQD until TLS is up, EXPORT_NAME closes the connection).
 */
export type TlsMode = 'off' | 'on' | 'require';

export type NegotiationResult =
  | { kind: 'pending' }
  | { kind: 'done'; negotiated: Negotiated }
  | { kind: 'close'; reason: string }
  /** The STARTTLS ACK is in the output: send it, run the TLS handshake, then call tlsStarted(). */
  | { kind: 'starttls' };

type State = 'client-flags' | 'option-header' | 'option-data' | 'option-discard' | 'tls-wait' | 'finished';

const ZEROES_124 = Buffer.alloc(124);

export function transmissionFlagsFor(exp: NbdExport, structuredReplies: boolean): number {
  const f = exp.features;
  let flags = C.TFLAG_HAS_FLAGS;
  if (f.readOnly) flags |= C.TFLAG_READ_ONLY;
  if (f.flush) flags |= C.TFLAG_SEND_FLUSH;
  if (f.fua) flags |= C.TFLAG_SEND_FUA;
  if (!f.readOnly && f.trim) flags |= C.TFLAG_SEND_TRIM;
  if (!f.readOnly && f.writeZeroes) flags |= C.TFLAG_SEND_WRITE_ZEROES;
  if (!f.readOnly && f.writeZeroes && f.fastZero) flags |= C.TFLAG_SEND_FAST_ZERO;
  if (structuredReplies) flags |= C.TFLAG_SEND_DF;
  if (f.multiConn) flags |= C.TFLAG_CAN_MULTI_CONN;
  if (f.cache) flags |= C.TFLAG_SEND_CACHE;
  return flags;
}

export class Negotiator {
  readonly out: Buffer[] = [];
  private readonly queue = new ByteQueue();
  private state: State = 'client-flags';
  private fixedNewstyle = false;
  private noZeroes = false;
  private structured = false;
  private optionsSeen = 0;
  /** Options allowed on this connection; grows with the catalog (see handshakeOptionsPerExportMax). */
  private optionsAllowed = handshakeOptionsMax;
  private option = 0;
  private optionLength = 0;
  private discardLeft = 0;
  /** The last SET_META_CONTEXT: the export it named and the contexts it selected. */
  private selection: { exportName: string; contexts: string[] } | null = null;
  /** TLS is up (the STARTTLS handshake finished). */
  private tls = false;

  constructor(
    private readonly catalog: ExportCatalog,
    private readonly tlsMode: TlsMode = 'off',
  ) {}

  /** Options received so far (the connection restarts its handshake timer when this grows). */
  get optionsReceived(): number {
    return this.optionsSeen;
  }

  /** Whether TLS was started on this session. */
  get tlsActive(): boolean {
    return this.tls;
  }

  /**
   * The caller finished the TLS handshake after a `starttls` result: option haggling goes
   * on over TLS, and nothing negotiated before it survives (doc/proto.md NBD_OPT_STARTTLS).
   */
  tlsStarted(): void {
    if (this.state !== 'tls-wait') throw new Error(`tlsStarted() in state ${this.state}`);
    this.tls = true;
    this.structured = false;
    this.selection = null;
    this.state = 'option-header';
  }

  /** Before TLS in FORCEDTLS mode: every option but STARTTLS and ABORT is refused. */
  private get tlsRequired(): boolean {
    return this.tlsMode === 'require' && !this.tls;
  }

  /** The server's opening bytes. */
  greeting(): Buffer {
    const b = Buffer.alloc(18);
    b.writeBigUInt64BE(C.NBDMAGIC, 0);
    b.writeBigUInt64BE(C.IHAVEOPT, 8);
    b.writeUInt16BE(C.FLAG_FIXED_NEWSTYLE | C.FLAG_NO_ZEROES, 16);
    return b;
  }

  /** Bytes the client sent after the handshake ended (its first requests). */
  leftover(): ByteQueue {
    return this.queue;
  }

  /** Takes the server bytes produced so far. */
  drainOutput(): Buffer[] {
    return this.out.splice(0, this.out.length);
  }

  push(chunk: Buffer): NegotiationResult {
    this.queue.push(chunk);
    const q = this.queue;
    for (;;) {
      switch (this.state) {
        case 'finished':
          return { kind: 'pending' };
        case 'tls-wait':
          // A client waits for the ACK before its TLS hello, and the caller stops reading
          // until the upgrade; plaintext here would be read as if it came over TLS.
          if (q.length > 0) return this.close('plaintext bytes after NBD_OPT_STARTTLS');
          return { kind: 'pending' };
        case 'client-flags': {
          if (q.length < 4) return { kind: 'pending' };
          const flags = q.take(4).readUInt32BE(0);
          if (flags & ~(C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES)) {
            return this.close(`client flags 0x${flags.toString(16)} include unknown bits`);
          }
          this.fixedNewstyle = (flags & C.FLAG_C_FIXED_NEWSTYLE) !== 0;
          this.noZeroes = (flags & C.FLAG_C_NO_ZEROES) !== 0;
          this.state = 'option-header';
          break;
        }
        case 'option-header': {
          if (q.length < 16) return { kind: 'pending' };
          const h = q.take(16);
          if (h.readBigUInt64BE(0) !== C.IHAVEOPT) return this.close('bad option magic');
          this.option = h.readUInt32BE(8);
          this.optionLength = h.readUInt32BE(12);
          if (++this.optionsSeen > this.optionsAllowed) {
            // Sized lazily: only a client past the base cap pays for counting the catalog.
            this.optionsAllowed = handshakeOptionsMax + handshakeOptionsPerExportMax * this.catalog.list().length;
            if (this.optionsSeen > this.optionsAllowed) {
              return this.close(`more than ${this.optionsAllowed} options (${handshakeOptionsMax} + ${handshakeOptionsPerExportMax} per export)`);
            }
          }
          if (this.optionLength > handshakeOptionBytesMax) {
            if (!this.fixedNewstyle || this.option === C.OPT_EXPORT_NAME) {
              return this.close(`option ${this.option} data of ${this.optionLength} bytes is too large`);
            }
            this.discardLeft = this.optionLength;
            this.state = 'option-discard';
          } else {
            this.state = 'option-data';
          }
          break;
        }
        case 'option-discard': {
          this.discardLeft -= q.skip(this.discardLeft);
          if (this.discardLeft > 0) return { kind: 'pending' };
          if (this.tlsRequired) this.error(this.option, C.REP_ERR_TLS_REQD, 'TLS is required: send NBD_OPT_STARTTLS first');
          else this.reply(this.option, C.REP_ERR_TOO_BIG, Buffer.from('option data too large'));
          this.state = 'option-header';
          break;
        }
        case 'option-data': {
          if (q.length < this.optionLength) return { kind: 'pending' };
          const data = q.take(this.optionLength);
          this.state = 'option-header';
          const result = this.handleOption(this.option, data);
          if (result?.kind === 'starttls' && q.length > 0) {
            // Bytes pipelined behind STARTTLS were sent in the clear: never treat them as
            // if they had come over TLS (the STARTTLS command-injection attack).
            return this.close('plaintext bytes after NBD_OPT_STARTTLS');
          }
          if (result) return result;
          break;
        }
      }
    }
  }

  private close(reason: string): NegotiationResult {
    this.state = 'finished';
    return { kind: 'close', reason };
  }

  private reply(option: number, type: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(20);
    h.writeBigUInt64BE(C.OPTION_REPLY_MAGIC, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(type >>> 0, 12);
    h.writeUInt32BE(data.length, 16);
    this.out.push(h);
    if (data.length) this.out.push(data);
  }

  private error(option: number, type: number, message: string): void {
    this.reply(option, type, Buffer.from(message, 'utf8'));
  }

  private handleOption(option: number, data: Buffer): NegotiationResult | null {
    if (!this.fixedNewstyle && option !== C.OPT_EXPORT_NAME) {
      return this.close(`option ${option} from a client without fixed newstyle`);
    }
    if (this.tlsRequired && option !== C.OPT_STARTTLS && option !== C.OPT_ABORT) {
      // EXPORT_NAME cannot be answered with an error, so it ends the session.
      if (option === C.OPT_EXPORT_NAME) return this.close('NBD_OPT_EXPORT_NAME before TLS (TLS is required)');
      this.error(option, C.REP_ERR_TLS_REQD, 'TLS is required: send NBD_OPT_STARTTLS first');
      return null;
    }
    switch (option) {
      case C.OPT_STARTTLS:
        return this.startTls(data);
      case C.OPT_EXPORT_NAME:
        return this.exportName(data);
      case C.OPT_ABORT:
        this.reply(option, C.REP_ACK);
        return this.close('client aborted the handshake');
      case C.OPT_LIST:
        if (data.length !== 0) {
          this.error(option, C.REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
          return null;
        }
        for (const e of this.catalog.list()) {
          const name = Buffer.from(e.name, 'utf8');
          const desc = Buffer.from(e.description, 'utf8');
          const b = Buffer.allocUnsafe(4 + name.length + desc.length);
          b.writeUInt32BE(name.length, 0);
          name.copy(b, 4);
          desc.copy(b, 4 + name.length);
          this.reply(option, C.REP_SERVER, b);
        }
        this.reply(option, C.REP_ACK);
        return null;
      case C.OPT_INFO:
      case C.OPT_GO:
        return this.infoOrGo(option, data);
      case C.OPT_STRUCTURED_REPLY:
        if (data.length !== 0) {
          this.error(option, C.REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
          return null;
        }
        this.structured = true;
        this.reply(option, C.REP_ACK);
        return null;
      case C.OPT_LIST_META_CONTEXT:
      case C.OPT_SET_META_CONTEXT:
        this.metaContext(option, data);
        return null;
      default:
        this.error(option, C.REP_ERR_UNSUP, `option ${option} is not supported`);
        return null;
    }
  }

  private startTls(data: Buffer): NegotiationResult | null {
    const option = C.OPT_STARTTLS;
    if (this.tlsMode === 'off') {
      this.error(option, C.REP_ERR_POLICY, 'TLS is not enabled on this server');
      return null;
    }
    if (this.tls) {
      this.error(option, C.REP_ERR_INVALID, 'TLS is already active');
      return null;
    }
    if (data.length !== 0) {
      this.error(option, C.REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
      return null;
    }
    this.reply(option, C.REP_ACK);
    this.state = 'tls-wait';
    return { kind: 'starttls' };
  }

  private exportName(data: Buffer): NegotiationResult {
    if (data.length > nbdStringBytesMax) return this.close('export name too long');
    const name = data.toString('utf8');
    const exp = this.catalog.open(name);
    if (!exp) return this.close(`no export named "${name}"`);
    const flags = transmissionFlagsFor(exp, this.structured);
    const b = Buffer.alloc(10);
    b.writeBigUInt64BE(BigInt(exp.sizeBytes), 0);
    b.writeUInt16BE(flags, 8);
    this.out.push(b);
    if (!this.noZeroes) this.out.push(ZEROES_124);
    return this.finish(exp, name, flags, false);
  }

  private finish(exp: NbdExport, requestedName: string, flags: number, blockSizeAgreed: boolean): NegotiationResult {
    this.state = 'finished';
    const sel = this.selection;
    const contexts = sel && this.sameExport(sel.exportName, requestedName, exp.name) ? sel.contexts : [];
    return {
      kind: 'done',
      negotiated: {
        export: exp,
        structuredReplies: this.structured,
        metaContexts: this.structured ? contexts : [],
        blockSizeAgreed,
        transmissionFlags: flags,
        tls: this.tls,
      },
    };
  }

  private sameExport(selectedName: string, requestedName: string, canonical: string): boolean {
    if (selectedName === requestedName) return true;
    const resolve = (n: string) => (n === '' ? this.catalog.defaultName() : n);
    return resolve(selectedName) === canonical;
  }

  private infoOrGo(option: number, data: Buffer): NegotiationResult | null {
    if (data.length < 6) {
      this.error(option, C.REP_ERR_INVALID, 'option data too short');
      return null;
    }
    const nameLength = data.readUInt32BE(0);
    if (nameLength > data.length - 6 || nameLength > nbdStringBytesMax) {
      this.error(option, C.REP_ERR_INVALID, 'export name length exceeds option data');
      return null;
    }
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt16BE(4 + nameLength);
    if (data.length !== 6 + nameLength + 2 * count) {
      this.error(option, C.REP_ERR_INVALID, 'information request count does not match option length');
      return null;
    }
    const requests = new Set<number>();
    for (let i = 0; i < count; i++) requests.add(data.readUInt16BE(6 + nameLength + 2 * i));

    const exp = this.catalog.open(name);
    if (!exp) {
      this.error(option, C.REP_ERR_UNKNOWN, `no export named "${name}"`);
      return null;
    }
    const flags = transmissionFlagsFor(exp, this.structured);
    const info = Buffer.alloc(12);
    info.writeUInt16BE(C.INFO_EXPORT, 0);
    info.writeBigUInt64BE(BigInt(exp.sizeBytes), 2);
    info.writeUInt16BE(flags, 10);
    this.reply(option, C.REP_INFO, info);
    if (requests.has(C.INFO_NAME)) {
      const n = Buffer.from(exp.name, 'utf8');
      const b = Buffer.alloc(2 + n.length);
      b.writeUInt16BE(C.INFO_NAME, 0);
      n.copy(b, 2);
      this.reply(option, C.REP_INFO, b);
    }
    if (requests.has(C.INFO_DESCRIPTION) && exp.description) {
      const d = Buffer.from(exp.description, 'utf8').subarray(0, nbdStringBytesMax);
      const b = Buffer.alloc(2 + d.length);
      b.writeUInt16BE(C.INFO_DESCRIPTION, 0);
      d.copy(b, 2);
      this.reply(option, C.REP_INFO, b);
    }
    // Sent whether asked or not (clients ignore what they did not ask for); only a
    // client that asked has promised to honour the minimum, and only it is held to it.
    const bs = Buffer.alloc(14);
    bs.writeUInt16BE(C.INFO_BLOCK_SIZE, 0);
    bs.writeUInt32BE(blockSizeMinBytes, 2);
    bs.writeUInt32BE(blockSizePreferredBytes, 6);
    bs.writeUInt32BE(requestPayloadBytesMax, 10);
    this.reply(option, C.REP_INFO, bs);
    this.reply(option, C.REP_ACK);
    if (option === C.OPT_INFO) {
      exp.close();
      return null;
    }
    return this.finish(exp, name, flags, requests.has(C.INFO_BLOCK_SIZE));
  }

  private metaContext(option: number, data: Buffer): void {
    const isSet = option === C.OPT_SET_META_CONTEXT;
    if (isSet) this.selection = null; // replaced even when this one fails
    if (!this.structured) {
      this.error(option, C.REP_ERR_INVALID, 'negotiate structured replies first');
      return;
    }
    const parsed = parseMetaContextRequest(data);
    if (typeof parsed === 'string') {
      this.error(option, C.REP_ERR_INVALID, parsed);
      return;
    }
    const available = this.catalog.metaContexts(parsed.exportName);
    if (!available) {
      this.error(option, C.REP_ERR_UNKNOWN, `no export named "${parsed.exportName}"`);
      return;
    }
    let matched: string[];
    if (parsed.queries.length === 0) {
      matched = isSet ? [] : [...available];
    } else {
      const set = new Set<string>();
      for (const q of parsed.queries) {
        for (const name of available) {
          // LIST accepts a namespace prefix ("base:", "qemu:dirty-bitmap:"); SET wants exact names.
          if (name === q || (!isSet && q.endsWith(':') && name.startsWith(q))) set.add(name);
        }
      }
      matched = [...set];
    }
    const contexts: string[] = [];
    for (const name of matched) {
      const id = isSet ? contexts.length : 0;
      const n = Buffer.from(name, 'utf8');
      const b = Buffer.alloc(4 + n.length);
      b.writeUInt32BE(id, 0);
      n.copy(b, 4);
      this.reply(option, C.REP_META_CONTEXT, b);
      contexts.push(name);
    }
    this.reply(option, C.REP_ACK);
    if (isSet) this.selection = { exportName: parsed.exportName, contexts };
  }
}

export function parseMetaContextRequest(data: Buffer): { exportName: string; queries: string[] } | string {
  if (data.length < 8) return 'option data too short';
  const nameLength = data.readUInt32BE(0);
  if (nameLength > nbdStringBytesMax || 4 + nameLength + 4 > data.length) return 'export name length exceeds option data';
  const exportName = data.toString('utf8', 4, 4 + nameLength);
  let pos = 4 + nameLength;
  const count = data.readUInt32BE(pos);
  pos += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (pos + 4 > data.length) return 'query count exceeds option data';
    const len = data.readUInt32BE(pos);
    pos += 4;
    if (len > nbdStringBytesMax || pos + len > data.length) return 'query length exceeds option data';
    const q = data.toString('utf8', pos, pos + len);
    pos += len;
    if (!q.includes(':')) return `query "${q}" has no namespace`;
    queries.push(q);
  }
  if (pos !== data.length) return 'trailing bytes after the last query';
  return { exportName, queries };
}
