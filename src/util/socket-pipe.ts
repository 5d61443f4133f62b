// Why: a 1 MiB WRITE read into a buffer and written from it crosses user memory twice; the
// same payload spliced from its socket into a kernel pipe, and from the pipe into the
// volume's file, is copied once (src/native/pipex.c has the measurement). This module owns
// the pipes (a process-wide pool of them), moves payloads through them and waits for a
// socket's data without Node reading it. It knows nothing of NBD: the connection decides
// which bytes go where. Without the addon, or where a pipe cannot be made as large as it
// must be, nothing here is used and payloads go to buffers as before.

import fs from 'node:fs';
import { loadAddon } from './native-addon.js';
import { assert } from './assert.js';
import { payloadPipeBytes, payloadPipesMax } from './limits.js';
import type { PipedBytes } from './piped-bytes.js';

/** A receiver in the addon (an opaque handle). */
type ReceiverHandle = object & { readonly __receiver: unique symbol };

interface Pipex {
  pipeOpen(capacityBytes: number): [number, number];
  pipeWrite(writeFd: number, buffers: Buffer[]): number;
  pipeRead(readFd: number, target: Buffer, targetOffset: number, length: number): number;
  spliceToFile(pipeFd: number, fileFd: number, offset: number, length: number): void;
  spliceToFileAsync(pipeFd: number, fileFd: number, offset: number, length: number): Promise<void>;
  receiverOpen(socketFd: number, callback: (moved: number, end: string | null) => void): ReceiverHandle;
  receiverStart(r: ReceiverHandle, pipeWriteFd: number, bytes: number): number;
  receiverClose(r: ReceiverHandle): void;
  /** Bytes the armed receive has moved so far. */
  receiverMoved(r: ReceiverHandle): number;
}

function loadPipex(): Pipex | null {
  return loadAddon<Pipex>('pipex');
}

/** Where a pipe's payload goes when a writer wants it in memory (the caller's buffer pool). */
export interface PayloadBuffers {
  acquire(length: number): Buffer;
  release(b: Buffer): void;
}

/**
 * One kernel pipe, holding at most one WRITE payload at a time. The receiving connection
 * fills it (put, and a PipeReceiver); the volume then consumes it once (PipedBytes).
 */
export class PayloadPipe implements PipedBytes {
  /** The payload's length (set by the connection before its bytes go in). */
  length = 0;
  /** Bytes put in and not yet moved out; -1 once unknown (a failed move): the pipe is then closed, not reused. */
  inPipe = 0;
  private taken: Buffer | null = null;

  constructor(
    private readonly px: Pipex,
    readonly readFd: number,
    readonly writeFd: number,
    private readonly buffers: PayloadBuffers,
  ) {}

  /** Puts bytes in, in order; returns how many the pipe took (all, unless it filled: then a prefix of them). */
  put(views: Buffer[]): number {
    let n = 0;
    for (let i = 0; i < views.length; i += 64) {
      const batch = views.slice(i, i + 64);
      let want = 0;
      for (const v of batch) want += v.length;
      const took = this.px.pipeWrite(this.writeFd, batch);
      n += took;
      if (took < want) break; // the rest would land after a gap
    }
    this.inPipe += n;
    return n;
  }

  /** `n` bytes were spliced in by a PipeReceiver. */
  received(n: number): void {
    this.inPipe += n;
  }

  moveToFileSync(fd: number, offset: number): void {
    this.assertWhole();
    try {
      this.px.spliceToFile(this.readFd, fd, offset, this.length);
      this.inPipe = 0;
    } catch (e) {
      this.inPipe = -1;
      throw e;
    }
  }

  moveToFile(fd: number, offset: number): Promise<void> {
    this.assertWhole();
    this.inPipe = -1; // unknown until the move ends
    return this.px.spliceToFileAsync(this.readFd, fd, offset, this.length).then(() => {
      this.inPipe = 0;
    });
  }

  take(): Buffer {
    if (this.taken) return this.taken;
    this.assertWhole();
    const b = this.buffers.acquire(this.length);
    this.taken = b;
    const n = this.drainInto(b, 0);
    assert(n === this.length, `a pipe gave ${n} of its ${this.length} bytes`);
    return b;
  }

  /** Reads what the pipe holds into target at offset; returns the byte count. */
  drainInto(target: Buffer, offset: number): number {
    const want = this.inPipe;
    assert(want >= 0 && offset + want <= target.length, 'draining a pipe of known content into room for it');
    const n = want === 0 ? 0 : this.px.pipeRead(this.readFd, target, offset, want);
    this.inPipe -= n;
    return n;
  }

  private assertWhole(): void {
    assert(this.inPipe === this.length && this.length > 0, `a pipe holds ${this.inPipe} of its payload's ${this.length} bytes`);
  }

  /** Done with the payload: gives back a buffer take() used. */
  reset(): void {
    if (this.taken) this.buffers.release(this.taken);
    this.taken = null;
    this.length = 0;
  }

  close(): void {
    this.reset();
    this.inPipe = -1;
    closeQuietly(this.readFd);
    closeQuietly(this.writeFd);
  }
}

function closeQuietly(fd: number): void {
  try {
    fs.closeSync(fd);
  } catch {
    // already closed
  }
}

/** Smaller pipes than this are not worth a payload's splices (fs.pipe-max-size may be set low). */
const pipeBytesMin = 1024 * 1024;

/** fs.pipe-max-size, or 0 when it cannot be read. */
function pipeMaxBytes(): number {
  try {
    const n = Number(fs.readFileSync('/proc/sys/fs/pipe-max-size', 'utf8').trim());
    return Number.isSafeInteger(n) && n > 0 ? n : 0;
  } catch {
    return 0;
  }
}

/** The process's payload pipes: idle ones are reused, at most payloadPipesMax are open. */
export class PayloadPipePool {
  private readonly idle: PayloadPipe[] = [];
  private open = 0;
  /** Why the last pipe could not be made (an errno name), or null. */
  lastError: string | null = null;
  /** No more pipes are tried once one could not be made with this many open. */
  private limit = payloadPipesMax;
  /** The size pipes are made with (payloadPipeBytes, or fs.pipe-max-size if lower). */
  private pipeBytes = payloadPipeBytes;

  constructor(private readonly buffers: PayloadBuffers) {}

  /** Whether pipes can be used at all (the addon is there). */
  static get available(): boolean {
    return loadPipex() !== null;
  }

  /** An empty pipe, or null (none to spare, or the system refused one). */
  acquire(): PayloadPipe | null {
    const p = this.idle.pop();
    if (p) return p;
    const px = loadPipex();
    if (!px || this.open >= this.limit) return null;
    for (;;) {
      try {
        const [r, w] = px.pipeOpen(this.pipeBytes);
        this.open++;
        return new PayloadPipe(px, r, w, this.buffers);
      } catch (e) {
        const code = (e as { code?: string }).code ?? String(e);
        const lower = code === 'EPERM' ? pipeMaxBytes() : 0;
        if (lower > 0 && lower < this.pipeBytes && lower >= pipeBytesMin) {
          this.pipeBytes = lower; // fs.pipe-max-size, without CAP_SYS_RESOURCE
          continue;
        }
        this.lastError = code;
        this.limit = this.open; // (EPERM: above the user's pipe pages; EMFILE: descriptors)
        return null;
      }
    }
  }

  /** Back from a finished payload: reused when empty, else closed. */
  release(p: PayloadPipe): void {
    p.reset();
    if (p.inPipe === 0 && this.idle.length < this.limit) {
      this.idle.push(p);
      return;
    }
    p.close();
    this.open--;
  }

  get openPipes(): number {
    return this.open;
  }
}

/**
 * Moves a socket's next bytes into pipes without Node reading them: the socket's own reads
 * must be stopped while a receive is armed. `done(moved, end)` runs on the loop when an armed
 * receive ends: end null (all moved), 'EOF', 'PIPE_FULL' or an errno name.
 */
export class PipeReceiver {
  private readonly px: Pipex;
  private handle: ReceiverHandle | null;
  armed = false;

  private constructor(px: Pipex, socketFd: number, done: (moved: number, end: string | null) => void) {
    this.px = px;
    this.handle = px.receiverOpen(socketFd, (moved, end) => {
      this.armed = false;
      done(moved, end);
    });
  }

  /** A receiver on socket descriptor `fd`, or null without the addon. */
  static open(fd: number, done: (moved: number, end: string | null) => void): PipeReceiver | null {
    const px = loadPipex();
    if (!px || fd < 0) return null;
    return new PipeReceiver(px, fd, done);
  }

  /** Moves up to `bytes` into the pipe now; returns how many. Fewer: armed, `done` tells the rest. */
  start(pipe: PayloadPipe, bytes: number): number {
    assert(this.handle !== null && !this.armed, 'one receive at a time, on an open receiver');
    const now = this.px.receiverStart(this.handle, pipe.writeFd, bytes);
    this.looked = 0;
    if (now < bytes) this.armed = true;
    return now;
  }

  private looked = 0;

  /** While armed: bytes moved since the last call (a sign of life for stall checks). */
  movedSinceLook(): number {
    if (!this.handle || !this.armed) return 0;
    const moved = this.px.receiverMoved(this.handle);
    const delta = moved - this.looked;
    this.looked = moved;
    return delta;
  }

  close(): void {
    if (this.handle) this.px.receiverClose(this.handle);
    this.handle = null;
    this.armed = false;
  }
}
