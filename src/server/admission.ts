// Why: 1024 connections that finished the handshake and then idled locked every other
// client out, and nothing stopped one address from taking them all. This decides, for
// each new connection, whether it is admitted, refused, or admitted after evicting an
// older connection. Pure bookkeeping: the server owns the sockets and does the closing.
//
// The policy (also in the README, "Limits under abuse"):
// - One remote address may hold at most `perAddressMax` connections (handshake and
//   transmission together); the next one is refused. Unix-socket clients are local and
//   guarded by file permissions: they are exempt from this cap and never evicted.
// - Connections still in the handshake form their own pool (`handshakeMax`); each has
//   the 30 s handshake timeout. A full pool evicts the oldest handshake of the address that
//   holds the most of them, if that address holds at least two more than the newcomer's;
//   otherwise the newcomer is refused.
// - No idle timeout in transmission: the Linux kernel client legitimately idles for hours
//   and sends no keepalive. Instead, when all `connectionsMax` slots are taken, a newcomer
//   from an address that holds at least two fewer connections than the address holding
//   the most evicts that address's longest-idle connection (no request in flight, oldest
//   last request; a busy one only if none is idle). An attacker can then only keep slots
//   in proportion to the addresses it has, and a lone kernel client is never the victim
//   of an address that holds as few connections as it does.

/** What the admission bookkeeping needs to know of a connection. */
export interface Admitted {
  /** Normalized remote address, or null for Unix sockets. */
  readonly address: string | null;
  /** Date.now() of its last request (or of its arrival). */
  readonly lastActiveMs: number;
  /** Requests in flight or replies queued: evicting it would cut work short. */
  readonly busy: boolean;
  readonly acceptedMs: number;
}

export interface AdmissionLimits {
  connectionsMax: number;
  handshakeMax: number;
  perAddressMax: number;
}

export type Decision<C> =
  | { kind: 'admit' }
  | { kind: 'evict'; victim: C; pool: 'handshake' | 'transmission' }
  | { kind: 'refuse'; reason: 'per-address' | 'handshakes' | 'connections'; count: number };

/** IPv4 clients on a dual-stack listener show up as ::ffff:a.b.c.d; count them as a.b.c.d. */
export function normalizeAddress(address: string | undefined): string | null {
  if (!address) return null;
  return address.startsWith('::ffff:') && address.includes('.') ? address.slice(7) : address;
}

export class Admission<C extends Admitted> {
  private readonly byAddress = new Map<string, Set<C>>();
  private readonly all = new Set<C>();
  private readonly inHandshake = new Set<C>();
  readonly refused = { 'per-address': 0, handshakes: 0, connections: 0 };
  readonly evicted = { handshake: 0, transmission: 0 };

  constructor(readonly limits: AdmissionLimits) {}

  get size(): number {
    return this.all.size;
  }

  get handshakes(): number {
    return this.inHandshake.size;
  }

  countOf(address: string | null): number {
    return address === null ? 0 : (this.byAddress.get(address)?.size ?? 0);
  }

  /** Decides for a new connection from `address` (nothing is recorded until add()). */
  decide(address: string | null): Decision<C> {
    const mine = this.countOf(address);
    if (address !== null && mine >= this.limits.perAddressMax) {
      this.refused['per-address']++;
      return { kind: 'refuse', reason: 'per-address', count: mine };
    }
    if (this.handshakes >= this.limits.handshakeMax) {
      const victim = this.victim(address, true);
      if (!victim) {
        this.refused.handshakes++;
        return { kind: 'refuse', reason: 'handshakes', count: this.handshakes };
      }
      this.evicted.handshake++;
      return { kind: 'evict', victim, pool: 'handshake' };
    }
    if (this.all.size >= this.limits.connectionsMax) {
      const victim = this.victim(address, false);
      if (!victim) {
        this.refused.connections++;
        return { kind: 'refuse', reason: 'connections', count: this.all.size };
      }
      this.evicted.transmission++;
      return { kind: 'evict', victim, pool: 'transmission' };
    }
    return { kind: 'admit' };
  }

  /**
   * The connection to evict for a newcomer from `address`: in the given pool, from the
   * address holding the most connections of that pool, if it holds at least two more
   * than the newcomer's address (so eviction never just swaps equals).
   */
  private victim(address: string | null, handshake: boolean): C | null {
    const inPool = (c: C) => this.inHandshake.has(c) === handshake;
    let topAddress: string | null = null;
    let topCount = 0;
    let mine = 0;
    for (const [a, set] of this.byAddress) {
      let n = 0;
      for (const c of set) if (inPool(c)) n++;
      if (a === address) mine = n;
      if (n > topCount) {
        topCount = n;
        topAddress = a;
      }
    }
    if (topAddress === null || topCount < mine + 2) return null;
    let best: C | null = null;
    for (const c of this.byAddress.get(topAddress)!) {
      if (!inPool(c)) continue;
      if (handshake) {
        if (!best || c.acceptedMs < best.acceptedMs) best = c;
      } else if (!best || (best.busy && !c.busy) || (best.busy === c.busy && c.lastActiveMs < best.lastActiveMs)) {
        best = c;
      }
    }
    return best;
  }

  /** Records a new connection (in the handshake). */
  add(c: C): void {
    this.all.add(c);
    this.inHandshake.add(c);
    if (c.address === null) return;
    let set = this.byAddress.get(c.address);
    if (!set) this.byAddress.set(c.address, (set = new Set()));
    set.add(c);
  }

  /** The connection reached transmission. */
  handshakeDone(c: C): void {
    this.inHandshake.delete(c);
  }

  /** Idempotent: an evicted connection is removed at once and again when its socket closes. */
  remove(c: C): void {
    if (!this.all.delete(c)) return;
    this.inHandshake.delete(c);
    if (c.address === null) return;
    const set = this.byAddress.get(c.address);
    set?.delete(c);
    if (set && set.size === 0) this.byAddress.delete(c.address);
  }
}
