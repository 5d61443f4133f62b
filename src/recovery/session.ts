// Why: a resync and a restore each talk to a peer daemon in a short request/answer
// exchange on a connection of their own (not a pair's link): dial, send a message, wait
// for a given answer with a deadline, turn a refusal into a coded error. One
// implementation here, so both read their answers the same way and the same refusal
// codes reach the operator.

import { DeltavolError, type ErrorCode } from '../util/errors.js';
import { Link } from '../replication/link.js';
import type { Frame, ReplMessage } from '../replication/wire.js';
import * as L from '../replication/limits.js';
import type { RecoveryContext } from './context.js';

/** Refusal codes passed on as they are; any other becomes PEER_REFUSED (with the peer's code in the details). */
const codesKept = new Set<string>(['GEOMETRY', 'ROLE_CONFLICT', 'VOLUME_NOT_FOUND', 'SNAPSHOT_NOT_FOUND', 'SNAPSHOT_INVALID']);

export class Session {
  private readonly frames: Frame[] = [];
  private wake: (() => void) | null = null;
  private constructor(
    readonly link: Link,
    /** Who answers, in messages ("the new primary", "the replica"). */
    private readonly peerWord: string,
  ) {}

  static async open(ctx: RecoveryContext, host: string, port: number, peerWord: string): Promise<Session> {
    let conn;
    try {
      conn = await ctx.platform.transport.connect(host, port, L.replicationConnectTimeoutMs);
    } catch (e) {
      throw new DeltavolError('PEER_UNREACHABLE', (e as Error).message);
    }
    let s: Session | null = null;
    const link = new Link(conn, ctx.platform.clock, (f) => {
      s!.frames.push(f);
      s!.wake?.();
    });
    s = new Session(link, peerWord);
    link.onClose(() => s!.wake?.());
    return s;
  }

  send(m: ReplMessage, data?: Buffer[]): void {
    this.link.send(m, data);
  }

  /** Who the peer proved to be (null without TLS). */
  get peerIdentity(): string | null {
    return this.link.conn.peerIdentity;
  }

  /** The next message (a refusal or a closed link throws with its code). */
  async next<T extends ReplMessage['t']>(ctx: RecoveryContext, t: T, timeoutMs: number): Promise<Extract<ReplMessage, { t: T }>> {
    return (await this.nextFrame(ctx, t, timeoutMs)).msg as Extract<ReplMessage, { t: T }>;
  }

  /** The next frame, which must carry message t (or one of them), with its data part. */
  async nextFrame(ctx: RecoveryContext, t: ReplMessage['t'] | readonly ReplMessage['t'][], timeoutMs: number): Promise<Frame> {
    const wanted = (x: string) => (typeof t === 'string' ? x === t : t.includes(x as ReplMessage['t']));
    const deadline = ctx.platform.clock.now() + timeoutMs;
    for (;;) {
      const f = this.frames.shift();
      if (f) {
        const m = f.msg;
        if (wanted(m.t)) return f;
        if (m.t === 'refuse') {
          const code = (codesKept.has(m.code) ? m.code : 'PEER_REFUSED') as ErrorCode;
          throw new DeltavolError(code, `${this.peerWord} refused: ${m.code}: ${m.message}`, { refuseCode: m.code, generation: m.generation });
        }
        throw new DeltavolError('PEER_REFUSED', `unexpected ${m.t} (waiting for ${String(t)})`);
      }
      if (this.link.closed) throw new DeltavolError('PEER_UNREACHABLE', `the link to ${this.peerWord} went down: ${this.link.reason}`);
      const left = deadline - ctx.platform.clock.now();
      if (left <= 0) throw new DeltavolError('PEER_UNREACHABLE', `no ${String(t)} from ${this.peerWord} within ${timeoutMs / 1000} s`);
      await new Promise<void>((r) => {
        const cancel = ctx.platform.clock.after(left, () => r());
        this.wake = () => {
          cancel();
          this.wake = null;
          r();
        };
      });
    }
  }

  close(reason: string): void {
    this.link.close(reason);
  }
}
