// Why: anyone who can reach the replication port can open connections; until a peer has
// finished its TLS handshake and had a hello accepted it has proved nothing, so what it
// may cost the daemon is capped: connections per daemon and per address, the time a TLS
// handshake may take, and (in service.ts/link.ts) the bytes buffered for a frame before
// the hello is accepted. Each refusal is counted (metrics) and logged, at most once a
// second per kind so an attack cannot flood the log either.

import type { Logger } from '../util/log.js';
import type { Admission, ListenGuard } from './transport.js';

export interface AdmissionLimits {
  connectionsMax: number;
  connectionsPerAddressMax: number;
  handshakeTimeoutMs: number;
}

/** Counters since the daemon started (shown as deltavol_replication_* metrics). */
export interface AdmissionCounters {
  /** Connections closed at once: the cap on unauthenticated connections was reached. */
  refusedDaemonCap: number;
  /** … the per-address cap was reached. */
  refusedAddressCap: number;
  handshakeFailures: number;
  handshakeTimeouts: number;
  /** Connections closed for buffering more than the pre-hello frame cap. */
  oversizeBeforeHello: number;
  /** Connections that sent no hello in time. */
  helloTimeouts: number;
  /** Hellos (and resync hellos) refused. */
  hellosRefused: number;
}

export class AdmissionGate implements ListenGuard {
  private total = 0;
  private readonly perAddress = new Map<string, number>();
  private readonly lastLogMs = new Map<string, { atMs: number; suppressed: number }>();
  readonly counters: AdmissionCounters = { refusedDaemonCap: 0, refusedAddressCap: 0, handshakeFailures: 0, handshakeTimeouts: 0, oversizeBeforeHello: 0, helloTimeouts: 0, hellosRefused: 0 };

  constructor(
    private readonly limits: AdmissionLimits,
    private readonly log: Logger,
    private readonly now: () => number,
  ) {}

  get handshakeTimeoutMs(): number {
    return this.limits.handshakeTimeoutMs;
  }

  /** Connections not yet authenticated (no hello accepted), now. */
  get unauthenticated(): number {
    return this.total;
  }

  admit(address: string): Admission | null {
    if (this.total >= this.limits.connectionsMax) {
      this.counters.refusedDaemonCap++;
      this.note('cap', 'warn', { address, unauthenticated: this.total, max: this.limits.connectionsMax }, 'replication connection refused: too many unauthenticated connections on this daemon');
      return null;
    }
    const mine = this.perAddress.get(address) ?? 0;
    if (mine >= this.limits.connectionsPerAddressMax) {
      this.counters.refusedAddressCap++;
      this.note('address-cap', 'warn', { address, unauthenticated: mine, max: this.limits.connectionsPerAddressMax }, 'replication connection refused: too many unauthenticated connections from this address');
      return null;
    }
    this.total++;
    this.perAddress.set(address, mine + 1);
    let held = true;
    return {
      release: () => {
        if (!held) return;
        held = false;
        this.total--;
        const n = (this.perAddress.get(address) ?? 1) - 1;
        if (n <= 0) this.perAddress.delete(address);
        else this.perAddress.set(address, n);
      },
    };
  }

  onHandshakeFailed(address: string, reason: string, timedOut: boolean): void {
    if (timedOut) this.counters.handshakeTimeouts++;
    else this.counters.handshakeFailures++;
    this.note(timedOut ? 'handshake-timeout' : 'handshake', 'warn', { address, reason }, timedOut ? 'replication TLS handshake timed out' : 'replication TLS handshake failed (wrong key or certificate, not allowed, or not TLS)');
  }

  /** A log line of `kind`, at most once a second (with how many were left out since). */
  note(kind: string, level: 'warn' | 'info', fields: Record<string, unknown>, msg: string): void {
    const now = this.now();
    const last = this.lastLogMs.get(kind);
    if (last && now - last.atMs < 1000) {
      last.suppressed++;
      return;
    }
    this.lastLogMs.set(kind, { atMs: now, suppressed: 0 });
    this.log[level]({ ...fields, ...(last?.suppressed ? { suppressedSinceLastLine: last.suppressed } : {}) }, msg);
  }
}
