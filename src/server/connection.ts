// Why: one client socket, from greeting to close. It feeds bytes to the negotiator and
// then to the request framer, hands requests to the Transmission, and owns the socket
// concerns the protocol code must not: corking replies into one write per batch,
// backpressure (stop reading at the in-flight caps or when the client does not read its
// replies), timeouts, DISC, and draining on shutdown. After an NBD_OPT_STARTTLS ACK it
// swaps its socket for the TLS one (tls-upgrade.ts) and goes on with the handshake there. It also keeps this connection's
// share of the daemon-wide memory budget (memory-budget.ts): a request's buffer is
// reserved before the request is parsed, reply bytes count until the socket has taken
// them, and a connection refused memory stops being read until some is released.
// Without TLS it reads the socket into buffers it chooses (user-buffer-socket.ts): a
// reused scratch buffer for headers and small payloads, and a large WRITE's own pooled
// buffer for the rest of its payload, so 1 MiB arrives in a few large reads with no
// per-read allocation and no copy beyond the kernel's. A WRITE of pipedPayloadBytesMin or
// more goes further (socket-pipe.ts): its payload is spliced from the socket into a kernel
// pipe, with Node's reads stopped meanwhile, and the volume's file takes it from there.

import type { Socket } from 'node:net';
import type { Logger } from '../util/log.js';
import type { ExportCatalog } from '../nbd/export.js';
import { Negotiator } from '../nbd/negotiator.js';
import type { TlsServerConfig } from './tls-config.js';
import { upgradeToTls } from './tls-upgrade.js';
import { RequestFramer, type FramerError, type RequestHeader } from '../nbd/request-framer.js';
import { Transmission, heldBytesFor } from '../nbd/transmission.js';
import { CMD_DISC, CMD_WRITE, COMMAND_NAMES, REQUEST_HEADER_BYTES } from '../nbd/constants.js';
import { MemoryAccount, type MemoryBudget } from './memory-budget.js';
import { adoptWithUserBuffer } from '../util/user-buffer-socket.js';
import { BufferPool } from '../util/buffer-pool.js';
import { SliceArena } from '../util/slice-arena.js';
import { ThreadpoolSender, type ThreadpoolSendCounts } from '../util/threadpool-sender.js';
import { socketFd } from '../util/native-send.js';
import { PayloadPipePool, PipeReceiver, type PayloadPipe } from '../util/socket-pipe.js';
import type { FileRange } from '../util/file-range.js';
import { assert } from '../util/assert.js';
import {
  handshakeTimeoutMs,
  inflightPayloadBytesMax,
  inflightRequestsMax,
  requestPayloadBytesMax,
  socketQueuedBytesMax,
  streamPieceBytes,
  receiveScratchBytes,
  receiveReadBytesMin,
  directPayloadBytesMin,
  pooledWritePayloadBytesMax,
  smallBufferSlabBytes,
  smallBufferSparesMax,
  headerReadBytes,
  threadpoolSendBytesMin,
  readAheadBytesMaxDefault,
  pipedPayloadBytesMin,
  pipedPayloadBytesMax,
} from '../util/limits.js';

/** WRITE payload buffers shared by every connection of the process (see buffer-pool.ts). */
const writePayloads = new BufferPool(directPayloadBytesMin, pooledWritePayloadBytesMax);
/**
 * Smaller WRITE payloads, copied out of the receive arena into slices of reused slabs: while
 * their requests held views of the arena it had to be replaced by a fresh one, 180 MB/s of new
 * external memory at 45k 4 KiB writes a second and a full mark-compact every ~0.1 s.
 */
const smallWritePayloads = new SliceArena(smallBufferSlabBytes, smallBufferSparesMax);

/** Kernel pipes for spliced WRITE payloads, shared by every connection (socket-pipe.ts). */
const payloadPipes = new PayloadPipePool({ acquire: (n) => writePayloads.acquire(n), release: (b) => writePayloads.release(b) });

/** Spliced WRITE payloads since start, those that went to a buffer after all (a full pipe), and the pipes open. */
const pipedCounts = { piped: 0, toBuffer: 0 };
export function pipedWriteCounts(): { piped: number; toBuffer: number; pipesOpen: number; pipeError: string | null } {
  return { ...pipedCounts, pipesOpen: payloadPipes.openPipes, pipeError: payloadPipes.lastError };
}

/** After a burst: idle WRITE payload buffers beyond `keepBytes` are dropped for the GC (nbd-server.ts). */
export function trimWritePayloadBuffers(keepBytes: number): void {
  writePayloads.trim(keepBytes);
}

/** Replies sent from the threadpool since start, and those of them the socket took only part of (then Node sent the rest). */
const poolSends: ThreadpoolSendCounts = { sends: 0, partial: 0, fileRestReads: 0 };

/** READ replies whose data left from the volume's file (sendfile) since start. */
const fileReplyCount = { replies: 0 };
export function fileReplyCounts(): { replies: number; restReads: number } {
  return { replies: fileReplyCount.replies, restReads: poolSends.fileRestReads ?? 0 };
}

export function threadpoolSendCounts(): ThreadpoolSendCounts {
  return { ...poolSends };
}

/** The WRITE payload pool's idle bytes and how many buffers it has handed out. */
export function writePayloadPoolState(): { idleBytes: number; acquires: number } {
  return { idleBytes: writePayloads.idleBytes, acquires: writePayloads.acquires };
}

type State = 'handshake' | 'transmission' | 'draining' | 'closed';

export interface ConnectionStats {
  requests: number;
  bytesRead: number;
  bytesWritten: number;
}

/** What the server gives each connection for the daemon-wide limits. */
export interface ConnectionLimits {
  budget: MemoryBudget;
  /** The handshake is over: the connection moves to the transmission pool. */
  enteredTransmission(c: Connection): void;
  /** Read plain sockets into the connection's own buffers (user-buffer-socket.ts). */
  ownReadBuffers?: boolean;
  /** This connection made a request (the daemon's loop I/O policy counts the clients served). */
  requestFrom?(c: Connection): void;
  /** Send large replies on plain sockets from the threadpool (native-send.ts; default true). */
  threadpoolSends?: boolean;
  /** Bytes of large READ buffers a connection fills ahead of its socket (Transmission; 0 = no limit). */
  readAheadBytesMax?: number;
  /** Splice large WRITE payloads of plain sockets into pipes and from there to the file (socket-pipe.ts; default true). */
  pipedWrites?: boolean;
  /** Send large READ replies whose data the export names in a file from the page cache (sendfile; default true; needs the threadpool sender). */
  fileReplies?: boolean;
}

/** What accepting() reserves for a request header (the Transmission releases the same when it completes). */
function needFor(type: number, length: number): number {
  return heldBytesFor(type, length);
}

export class Connection {
  private state: State = 'handshake';
  private readonly negotiator: Negotiator;
  private framer: RequestFramer | null = null;
  private tx: Transmission | null = null;
  private handshakeTimer: NodeJS.Timeout | null;
  private inDataEvent = false;
  private uncorkScheduled = false;
  private paused = false;
  private drainWaiters: (() => void)[] = [];
  // ---- reads into our own buffers (plain sockets only) ----
  /** The socket reads into buffers chosen here (nextReadBuffer) rather than Node's. */
  private readonly userBuffers: boolean;
  /**
   * Where reads go when no WRITE payload is being received straight into its buffer: an
   * arena filled front to back (reads of small requests take only what they read), started
   * over when nothing refers to its bytes any more, replaced when its free tail gets short.
   */
  private scratch: Buffer = Buffer.allocUnsafe(receiveScratchBytes);
  /** Bytes at the front of scratch that requests or the parser may still refer to. */
  private scratchUsed = 0;
  /** Something still refers to scratch[0, scratchUsed). */
  private scratchHeld = false;
  /** The payload region handed out for the next read, if it was one. */
  private fillGiven: Buffer | null = null;
  /**
   * The last request took a payload buffer of its own: the next is likely another large
   * WRITE, so the next read into scratch is kept short (its header and a little payload),
   * and the rest of that payload goes straight to its buffer instead of being copied there.
   */
  private lastLargeWrite = false;
  /** Large replies leave from the threadpool (threadpool-sender.ts; only while --tls is off), or null. */
  private readonly sender: ThreadpoolSender | null;
  // ---- WRITE payloads spliced into pipes (plain sockets with their own read buffers) ----
  private readonly pipedWrites: boolean;
  /** READ replies may leave from the file (limits.fileReplies and a threadpool sender). */
  private readonly fileReplies: boolean;
  /** Moves the socket's bytes into a pipe while Node's reads are stopped; opened at first use. */
  private receiver: PipeReceiver | null = null;
  /** The pipe the framer's outside payload goes to, until its request takes it. */
  private outsidePipe: PayloadPipe | null = null;
  readonly stats: ConnectionStats = { requests: 0, bytesRead: 0, bytesWritten: 0 };
  exportName: string | null = null;
  /** The authenticated TLS client (PSK identity or certificate DN), once TLS is up. */
  tlsClient: string | null = null;
  private readonly listeners = {
    data: (chunk: Buffer) => this.onData(chunk),
    drain: () => this.maybeResume(),
    error: (err: Error) => this.log.debug({ err: err.message }, 'socket error'),
    close: () => this.onSocketClose(),
    end: () => {
      // The client half-closed; finish what is in flight, then close our side.
      if (this.state === 'transmission') this.beginDrain('client closed its side');
      else this.socket.end();
    },
  };
  // ---- limits (memory budget, admission, stall detection) ----
  private readonly account: MemoryAccount;
  /** Reply bytes handed to the socket and not yet written by it. */
  private queuedBytes = 0;
  private socketGone = false;
  /** Bumped on every sign of life: bytes received, a reply written, a request completed. */
  private progress = 0;
  private stallProgress = -1;
  private stallQueueBytes = -1;
  private stallSinceMs = 0;
  readonly acceptedMs = Date.now();
  lastActiveMs = this.acceptedMs;

  constructor(
    private socket: Socket,
    catalog: ExportCatalog,
    readonly log: Logger,
    private readonly onClosed: (c: Connection) => void,
    private readonly limits: ConnectionLimits,
    /** Normalized remote address (null for Unix sockets), for the per-address caps. */
    readonly address: string | null = null,
    private readonly tls: TlsServerConfig | null = null,
  ) {
    this.account = new MemoryAccount(() => this.maybeResume());
    this.negotiator = new Negotiator(catalog, tls?.mode ?? 'off');
    const adopted = (tls?.mode ?? 'off') === 'off' && limits.ownReadBuffers !== false ? adoptWithUserBuffer(socket, { next: () => this.nextReadBuffer(), received: (n, b) => this.onRead(n, b) }) : null;
    this.userBuffers = adopted !== null;
    if (adopted) this.socket = socket = adopted;
    this.pipedWrites = this.userBuffers && limits.pipedWrites !== false && PayloadPipePool.available;
    this.sender =
      (tls?.mode ?? 'off') === 'off' && limits.threadpoolSends !== false
        ? ThreadpoolSender.forSocket(socket, {
            bytesMin: threadpoolSendBytesMin,
            waitMs: 0,
            counts: poolSends,
            onSent: () => {
              if (this.paused) this.maybeResume();
            },
          })
        : null;
    this.fileReplies = this.sender !== null && limits.fileReplies !== false;
    socket.setNoDelay(true);
    this.attach(socket);
    socket.resume(); // listeners accept connections paused
    this.handshakeTimer = setTimeout(() => {
      this.log.info('handshake timed out');
      this.socket.destroy();
    }, handshakeTimeoutMs);
    this.handshakeTimer.unref();
    socket.write(this.negotiator.greeting());
  }

  private attach(socket: Socket): void {
    for (const [event, fn] of Object.entries(this.listeners)) socket.on(event, fn as (...a: unknown[]) => void);
  }

  private detach(socket: Socket): void {
    for (const [event, fn] of Object.entries(this.listeners)) socket.off(event, fn as (...a: unknown[]) => void);
  }

  /** TLS is up on this connection (after NBD_OPT_STARTTLS). */
  get tlsActive(): boolean {
    return this.negotiator.tlsActive;
  }

  get inflight(): number {
    return this.tx?.inflight ?? 0;
  }

  /** Bytes this connection holds in the memory budget. */
  get heldBytes(): number {
    return this.account.heldBytes;
  }

  /** Requests in flight or replies not yet written: closing it would cut work short. */
  get busy(): boolean {
    return this.inflight > 0 || this.queuedBytes > 0;
  }

  /**
   * How long this connection has held memory the client is not moving: replies it does
   * not read, or a WRITE payload it stopped sending. 0 when it is not doing that. Called
   * by the server's periodic check while other connections wait for memory.
   */
  stalledMs(nowMs: number): number {
    if (this.state === 'closed' || !(this.queuedBytes > 0 || this.framer?.awaitingPayload)) {
      this.stallSinceMs = 0;
      return 0;
    }
    // libuv's queue shrinks as a large reply is written piecewise; the write callback only fires at its end.
    const q = (this.socket as unknown as { _handle?: { writeQueueSize?: number } })._handle?.writeQueueSize ?? 0;
    // A payload spliced into a pipe moves without the loop hearing of it until it is all there.
    if (this.receiver?.armed) this.progress += this.receiver.movedSinceLook();
    if (this.stallSinceMs === 0 || this.progress !== this.stallProgress || q !== this.stallQueueBytes) {
      this.stallProgress = this.progress;
      this.stallQueueBytes = q;
      this.stallSinceMs = nowMs;
      return 0;
    }
    return nowMs - this.stallSinceMs;
  }

  /** The buffer the next socket read fills: the rest of a WRITE payload, else scratch. */
  private nextReadBuffer(): Buffer {
    const region = this.framer !== null && this.state === 'transmission' ? this.framer.fillRegion() : null;
    this.fillGiven = region;
    if (region) return region;
    if (!this.scratchHeld) this.scratchUsed = 0;
    else if (this.scratch.length - this.scratchUsed < receiveReadBytesMin) {
      this.scratch = Buffer.allocUnsafe(receiveScratchBytes);
      this.scratchUsed = 0;
      this.scratchHeld = false;
    }
    return this.scratch.subarray(this.scratchUsed, this.lastLargeWrite ? this.scratchUsed + headerReadBytes : undefined);
  }

  private onRead(n: number, buffer: Buffer): void {
    if (buffer === this.fillGiven) {
      this.fillGiven = null;
      this.onPayloadBytes(n);
      return;
    }
    const framer = this.framer;
    const viewed = framer ? framer.viewedBytes : 0;
    this.scratchUsed += n;
    this.onData(buffer.subarray(0, n));
    // The arena may be read into again from its start only if nothing kept a view of it:
    // no handshake bytes, no partial or unaccepted request left, no payload handed over as views
    // (a WRITE may hold those until its data is written). Once held, it stays held.
    if (framer === null || this.framer !== framer || framer.holdsInput || framer.viewedBytes !== viewed) this.scratchHeld = true;
  }

  /** n bytes of a WRITE payload were read straight into its buffer. */
  private onPayloadBytes(n: number): void {
    this.stats.bytesRead += n;
    this.progress++;
    if (this.state !== 'transmission' || !this.framer) return;
    this.inDataEvent = true;
    this.socket.cork();
    try {
      if (this.framingOk(this.framer.filled(n))) this.receiveOutside();
    } finally {
      this.inDataEvent = false;
      this.socket.uncork();
    }
  }

  private onData(chunk: Buffer): void {
    this.stats.bytesRead += chunk.length;
    this.progress++;
    this.inDataEvent = true;
    this.socket.cork();
    try {
      if (this.state === 'handshake') this.handshakeData(chunk);
      else if (this.state === 'transmission' && this.framer) {
        if (this.framingOk(this.framer.push(chunk))) this.receiveOutside();
      }
      // 'draining' and 'closed': anything after DISC or shutdown is ignored.
    } finally {
      this.inDataEvent = false;
      this.socket.uncork();
    }
  }

  private handshakeData(chunk: Buffer): void {
    const optionsBefore = this.negotiator.optionsReceived;
    const result = this.negotiator.push(chunk);
    const out = this.negotiator.drainOutput();
    // Progress restarts the handshake timer: a listing of many exports may take minutes.
    if (this.negotiator.optionsReceived !== optionsBefore) this.handshakeTimer?.refresh();
    if (result.kind === 'starttls') {
      this.startTls(out);
      return;
    }
    for (const b of out) this.socket.write(b);
    if (result.kind === 'close') {
      this.log.info({ reason: result.reason }, 'handshake ended without a connection');
      this.socket.end(() => this.socket.destroy()); // nothing more is read: do not wait for the client's FIN
      this.state = 'closed';
      return;
    }
    if (result.kind !== 'done') return;
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
    const n = result.negotiated;
    this.exportName = n.export.name;
    this.log.info(
      { export: n.export.name, structured: n.structuredReplies, contexts: n.metaContexts, flags: n.transmissionFlags, tls: n.tls },
      'client connected to export',
    );
    this.limits.enteredTransmission(this);
    this.tx = new Transmission(n.export, n, {
      send: (buffers, sent) => this.send(buffers, sent),
      ...(this.fileReplies ? { sendFile: (buffers: Buffer[], file: FileRange, sent: () => void) => this.sendFile(buffers, file, sent) } : {}),
      completed: (payloadBytes) => this.requestCompleted(payloadBytes),
      warn: (msg, fields) => this.log.warn(fields, msg),
      released: (bytes) => this.requestCompleted(bytes),
      fatal: (reason) => this.protocolError(reason),
    }, this.limits.readAheadBytesMax ?? readAheadBytesMaxDefault);
    this.state = 'transmission';
    this.framer = new RequestFramer(
      this.negotiator.leftover(),
      {
        request: (h, p) => this.onRequest(h, p),
        accepting: (type, length) => this.accepting(type, length),
        streamWrite: (h) => this.state === 'transmission' && this.tx!.streamWrite(h),
        pieceAccepting: (length) => this.pieceAccepting(length),
        writePiece: (h, p, last) => this.tx!.writePiece(h, p, last),
        ...(this.pipedWrites ? { payloadOutside: (h: RequestHeader) => this.payloadOutside(h), outsideBytes: (views: Buffer[]) => this.outsideBytes(views) } : {}),
        ...(this.userBuffers
          ? {
              // Small payloads: slices of reused slabs, so the receive arena is never held by
              // them (util/slice-arena.ts); large ones: a pooled buffer of their own.
              payloadBuffer: (length: number) => (length >= directPayloadBytesMin ? writePayloads.acquire(length) : smallWritePayloads.take(length)),
              payloadRelease: (b: Buffer) => (b.length >= directPayloadBytesMin ? () => writePayloads.release(b) : smallWritePayloads.lastSlab.release),
            }
          : {}),
      },
      requestPayloadBytesMax,
      streamPieceBytes,
    );
    if (this.framingOk(this.framer.parse())) this.receiveOutside();
  }

  /**
   * Sends the STARTTLS ACK in the clear, then hands the socket to TLS. Reading stops at
   * once: the client's TLS hello stays in the kernel (or the paused stream, which the TLS
   * socket takes over) until the TLS socket reads it.
   */
  private startTls(out: Buffer[]): void {
    const raw = this.socket;
    const tlsConfig = this.tls!;
    raw.pause();
    const upgrade = () => {
      if (this.state !== 'handshake' || raw.destroyed) return;
      this.detach(raw);
      upgradeToTls(raw, tlsConfig).then(
        (peer) => {
          this.socket = peer.socket;
          this.attach(peer.socket);
          if (this.state !== 'handshake') {
            peer.socket.destroy(); // shut down meanwhile; its 'close' ends the connection
            return;
          }
          this.tlsClient = peer.client;
          this.negotiator.tlsStarted();
          this.log.info({ protocol: peer.protocol, cipher: peer.cipher, client: peer.client }, 'TLS started');
        },
        (e: Error) => {
          this.log.info({ reason: e.message }, 'TLS refused: closing connection');
          this.state = 'closed';
          // The raw socket's listeners are gone; account for the close here.
          this.onSocketClose();
        },
      );
    };
    // The upgrade waits until the ACK has been handed to the kernel, in the clear.
    const last = out.length - 1;
    out.forEach((b, i) => (i === last ? raw.write(b, () => upgrade()) : raw.write(b)));
  }

  private onRequest(h: RequestHeader, payload: Buffer[]): void {
    const piped = h.payloadOutside ? this.outsidePipe : null;
    if (piped) this.outsidePipe = null;
    this.stats.requests++;
    this.limits.requestFrom?.(this);
    if (this.state !== 'transmission') {
      this.releaseHeld(needFor(h.type, h.length));
      h.releasePayload?.();
      return;
    }
    this.lastActiveMs = Date.now();
    if (h.type === CMD_DISC) {
      this.beginDrain('client sent DISC');
      return;
    }
    if (this.log.isLevelEnabled('trace')) {
      this.log.trace({ cmd: COMMAND_NAMES[h.type] ?? h.type, offset: h.offset, length: h.length, flags: h.flags }, 'request');
    }
    this.lastLargeWrite = h.releasePayload != null && h.length >= directPayloadBytesMin;
    if (piped) pipedCounts.piped++;
    this.tx!.handle(h, piped ?? payload);
  }

  /** Whether another request may be parsed now (backpressure), with its buffer reserved in the budget. */
  private accepting(type: number, length: number): boolean {
    const tx = this.tx;
    if (this.state !== 'transmission' || !tx) return false;
    const need = needFor(type, length);
    const ok =
      tx.inflight < inflightRequestsMax &&
      tx.inflightPayloadBytes < inflightPayloadBytesMax &&
      this.socket.writableLength + (this.sender?.queuedBytes ?? 0) < socketQueuedBytesMax &&
      (need === 0 ? this.limits.budget.mayGrow(this.account) : this.limits.budget.tryTake(this.account, need, this.pipelinedBehind(type, length)));
    if (!ok && !this.paused) {
      this.paused = true;
      this.socket.pause();
    }
    return ok;
  }

  /** Whether the next piece of a streamed WRITE may be received now, with its bytes reserved in the budget. */
  private pieceAccepting(length: number): boolean {
    const tx = this.tx;
    const ok = this.state === 'transmission' && tx !== null && tx.acceptPiece(() => this.limits.budget.tryTake(this.account, length, false));
    if (!ok && !this.paused) {
      this.paused = true;
      this.socket.pause();
    }
    return ok;
  }

  /** Whether another request header is already queued behind the one being admitted (and its WRITE payload). */
  private pipelinedBehind(type: number, length: number): boolean {
    const queued = this.framer ? this.framer.queue.length : 0;
    return queued - (type === CMD_WRITE ? length : 0) >= REQUEST_HEADER_BYTES;
  }

  private maybeResume(): void {
    if (!this.paused || this.state !== 'transmission' || !this.framer) return;
    this.paused = false;
    this.inDataEvent = true;
    this.socket.cork();
    try {
      if (!this.framingOk(this.framer.parse())) return;
      this.receiveOutside();
    } finally {
      this.inDataEvent = false;
      this.socket.uncork();
    }
    if (!this.paused && this.framer.outsideLeft === 0) this.socket.resume();
  }

  // ---- WRITE payloads spliced into pipes ----

  /** Whether this WRITE's payload goes to a pipe (asked by the framer when its header is accepted). */
  private payloadOutside(h: RequestHeader): boolean {
    if (!this.pipedWrites || h.length < pipedPayloadBytesMin || h.length > pipedPayloadBytesMax) return false;
    // Mostly here already: the rest comes through the queue for less than the splices cost.
    if (this.framer!.queue.length >= h.length / 2) return false;
    const pipe = payloadPipes.acquire();
    if (!pipe) return false;
    pipe.length = h.length;
    this.outsidePipe = pipe;
    h.releasePayload = () => payloadPipes.release(pipe);
    return true;
  }

  /** The payload's first bytes, queued with its header: into the pipe (a buffer, should it be full). */
  private outsideBytes(views: Buffer[]): void {
    const pipe = this.outsidePipe!;
    let want = 0;
    for (const v of views) want += v.length;
    const put = pipe.put(views);
    if (put === want) return;
    // (Not expected: an empty pipe holds the few KiB read with a header many times over.)
    const target = this.pipeToBuffer(pipe);
    let at = put;
    let skip = put;
    for (const v of views) {
      const from = Math.min(skip, v.length);
      skip -= from;
      at += v.copy(target, at, from);
    }
  }

  /**
   * Splices the rest of the outside payload (if any) from the socket into its pipe, with
   * Node's reads stopped until it is all there.
   */
  private receiveOutside(): void {
    const framer = this.framer;
    const pipe = this.outsidePipe;
    if (!framer || !pipe || framer.outsideLeft === 0 || this.receiver?.armed || this.state !== 'transmission') return;
    if (!this.receiver) {
      this.receiver = PipeReceiver.open(socketFd(this.socket), (moved, end) => this.outsideArrived(moved, end));
      if (!this.receiver) {
        this.continueInBuffer(pipe);
        return;
      }
    }
    this.socket.pause(); // Node must not read the payload's bytes meanwhile
    const left = framer.outsideLeft;
    const now = this.receiver.start(pipe, left);
    if (now === 0) return;
    pipe.received(now);
    this.stats.bytesRead += now;
    this.progress++;
    // The request, when that was all of it.
    if (this.framingOk(framer.outsideReceived(now)) && now === left) this.outsideDone();
  }

  /** An armed receive ended: all there (end null), or the socket ended, failed, or the pipe filled. */
  private outsideArrived(moved: number, end: string | null): void {
    const framer = this.framer;
    const pipe = this.outsidePipe;
    if (!framer || !pipe || this.state === 'closed') return;
    pipe.received(moved);
    this.stats.bytesRead += moved;
    this.progress++;
    if (end !== null && end !== 'PIPE_FULL') {
      this.log.debug({ end, left: framer.outsideLeft - moved }, 'socket ended within a WRITE payload');
      this.socket.destroy();
      return;
    }
    this.inDataEvent = true;
    this.socket.cork();
    try {
      if (!this.framingOk(framer.outsideReceived(moved))) return;
      if (end === 'PIPE_FULL') this.continueInBuffer(pipe);
      else this.outsideDone();
    } finally {
      this.inDataEvent = false;
      this.socket.uncork();
    }
  }

  /** The outside payload is complete (its request went to the Transmission): Node reads again. */
  private outsideDone(): void {
    if (this.state !== 'transmission' || !this.framer) return;
    if (!this.framingOk(this.framer.parse())) return;
    if (this.framer.outsideLeft > 0) this.receiveOutside();
    else if (!this.paused) this.socket.resume();
  }

  /** The pipe cannot take the rest: what it holds goes to a buffer, and Node reads the rest into it. */
  private continueInBuffer(pipe: PayloadPipe): void {
    this.pipeToBuffer(pipe);
    pipedCounts.toBuffer++;
    if (this.state === 'transmission' && !this.paused) this.socket.resume();
  }

  /** Moves the framer's outside payload from `pipe` to a pooled buffer (returned); the pipe goes back. */
  private pipeToBuffer(pipe: PayloadPipe): Buffer {
    const target = writePayloads.acquire(pipe.length);
    pipe.drainInto(target, 0);
    payloadPipes.release(pipe);
    this.outsidePipe = null;
    this.framer!.outsideToFill(target, () => writePayloads.release(target));
    return target;
  }

  private send(buffers: Buffer[], sent?: () => void): void {
    if (this.state === 'closed' || this.socket.destroyed) {
      sent?.();
      return;
    }
    let bytes = 0;
    for (let i = 0; i < buffers.length; i++) bytes += buffers[i]!.length;
    this.stats.bytesWritten += bytes;
    this.queuedBytes += bytes;
    this.limits.budget.add(this.account, bytes);
    // (The check first spares a closure per small reply.)
    const sender = this.sender;
    if (sender && (bytes >= threadpoolSendBytesMin || !sender.idle) && sender.offer(buffers, bytes, () => this.replyWritten(bytes, sent))) return;
    this.writeReply(buffers, bytes, sent);
  }

  /**
   * A reply whose data follows `buffers` from `file` (sendfile from the threadpool sender, in
   * order with every other reply). False, with nothing queued: the sender is closed.
   */
  private sendFile(buffers: Buffer[], file: FileRange, sent: () => void): boolean {
    const sender = this.sender;
    if (sender === null || !sender.takesFiles || this.state === 'closed' || this.socket.destroyed) return false;
    let bytes = file.length;
    for (let i = 0; i < buffers.length; i++) bytes += buffers[i]!.length;
    if (bytes < threadpoolSendBytesMin) return false;
    this.stats.bytesWritten += bytes;
    this.queuedBytes += bytes;
    this.limits.budget.add(this.account, bytes);
    const taken = sender.offer(buffers, bytes, () => this.replyWritten(bytes, sent), file);
    assert(taken, 'an open sender takes a large message');
    fileReplyCount.replies++;
    return true;
  }

  /** Hands one reply to Node's socket (corked: the replies completed in one loop turn go out in one write). */
  private writeReply(buffers: Buffer[], bytes: number, sent: (() => void) | undefined): void {
    if (!this.inDataEvent && !this.uncorkScheduled) {
      // Completions from the threadpool: batch all that land in this loop turn.
      this.uncorkScheduled = true;
      this.socket.cork();
      setImmediate(() => {
        this.uncorkScheduled = false;
        this.socket.uncork();
      });
    }
    const last = buffers.length - 1;
    for (let i = 0; i < last; i++) this.socket.write(buffers[i]!);
    // Writes complete in order, so the last one's callback means all were taken.
    this.socket.write(buffers[last]!, () => this.replyWritten(bytes, sent));
  }

  private replyWritten(bytes: number, sent: (() => void) | undefined): void {
    this.progress++;
    this.account.proven = true;
    if (!this.socketGone) {
      this.queuedBytes -= bytes;
      this.limits.budget.release(this.account, bytes);
    }
    sent?.();
  }

  private releaseHeld(bytes: number): void {
    if (bytes > 0) this.limits.budget.release(this.account, bytes);
  }

  private requestCompleted(payloadBytes: number): void {
    this.progress++;
    this.releaseHeld(payloadBytes);
    if (this.paused) this.maybeResume();
    if (this.tx && this.tx.inflight === 0) {
      const waiters = this.drainWaiters.splice(0);
      for (const w of waiters) w();
      if (this.state === 'draining') this.finishDrain();
    }
  }

  /** False (and the connection closed) when the request stream is broken. */
  private framingOk(err: FramerError | null): boolean {
    if (err) this.protocolError(`bad request magic 0x${err.magic.toString(16)}`);
    return err === null;
  }

  private protocolError(reason: string): void {
    this.log.warn({ reason }, 'protocol error: closing connection');
    this.state = 'closed';
    if (this.tx) this.tx.closed = true;
    this.socket.destroy();
  }

  /** Stops reading; closes once every request in flight has been answered. */
  private beginDrain(reason: string): void {
    if (this.state !== 'transmission') return;
    this.log.debug({ reason, inflight: this.inflight }, 'draining connection');
    this.state = 'draining';
    this.tx?.abandonPartialRequest();
    this.socket.pause();
    if (this.inflight === 0) this.finishDrain();
  }

  private finishDrain(): void {
    this.state = 'closed';
    // end() alone would wait for the client's FIN, which a paused socket never reads: the
    // connection (and its admission slot) stayed forever after every NBD_CMD_DISC. Once our
    // FIN is out, the connection is done.
    const close = () => this.socket.end(() => this.socket.destroy());
    if (this.sender && !this.sender.idle) this.sender.whenIdle(close);
    else if (this.uncorkScheduled) setImmediate(close);
    else close();
  }

  /** Server shutdown: refuse new requests, answer the ones in flight (bounded), close. */
  shutdown(drainMs: number): Promise<void> {
    if (this.state === 'handshake') {
      this.state = 'closed';
      this.socket.destroy();
      return Promise.resolve();
    }
    if (this.state === 'transmission') this.beginDrain('server shutting down');
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.log.warn({ inflight: this.inflight }, 'requests still in flight at shutdown deadline; closing');
        this.socket.destroy();
        resolve();
      }, drainMs);
      this.drainWaiters.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  /** Hard close (after a shutdown grace period). */
  destroy(): void {
    this.socket.destroy();
  }

  private onSocketClose(): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.state = 'closed';
    // Unwritten replies and a half-received WRITE are dropped with the socket; requests in
    // flight release theirs as they complete.
    this.socketGone = true;
    this.sender?.close(); // drops the replies still waiting; its descriptor closes once no send runs
    this.receiver?.close();
    if (this.outsidePipe) {
      payloadPipes.release(this.outsidePipe); // a payload never completed: the pipe is closed
      this.outsidePipe = null;
    }
    this.releaseHeld(this.queuedBytes + (this.framer ? this.framer.pendingWriteBytes : 0));
    this.queuedBytes = 0;
    this.limits.budget.close(this.account);
    const tx = this.tx;
    if (tx) {
      tx.close();
      // Requests still running finish against the export; release it after them.
      if (tx.inflight === 0) tx.exp.close();
      else this.drainWaiters.push(() => tx.exp.close());
    }
    this.log.debug(this.stats, 'connection closed');
    this.onClosed(this);
  }
}
