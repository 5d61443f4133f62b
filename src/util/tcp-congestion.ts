// Why: the TCP congestion control of the sockets deltavol sends data on decides how fast and
// how cheaply bytes cross loopback. These machines default to BBR, which paces: segments leave
// from a timer on whichever CPU it fires, the two CPUs' receive queues deliver them out of
// order, and the receiver answers with SACKs, the sender with spurious fast retransmits. fio
// reading 1 MiB blocks from deltavol over loopback (2026-12-07, `nstat` over 5 s): 0.29–0.37
// retransmitted and 0.27–0.30 out-of-order segments per read under BBR, none under CUBIC, and
// 3025–3214 against 4312–4362 MB/s, fio's CPU per read 180–191 against 132 µs. Pacing buys
// nothing between two processes of one machine, so by default ('auto') deltavol switches the
// connections whose peer is a loopback address to CUBIC and leaves every other connection to
// the system's choice, which an administrator made for real networks. `--tcp-congestion
// system` never touches it; `--tcp-congestion NAME` sets NAME on every NBD and replication
// connection (for example between network namespaces of one host, where the same reordering
// happens). Node has no API for TCP_CONGESTION, so the addon (src/native/sockx.c) sets it.

import type { Socket } from 'node:net';
import net from 'node:net';
import type { Logger } from './log.js';
import { DeltavolError } from './errors.js';
import { isLoopbackHost } from './loopback.js';
import { loadSockx, socketFd } from './native-send.js';

/** 'auto': CUBIC for loopback peers; 'system': never set; otherwise the algorithm to set everywhere. */
export type TcpCongestionPolicy = { kind: 'auto' } | { kind: 'system' } | { kind: 'set'; name: string };

/** What 'auto' sets on loopback connections: built into every Linux kernel, no pacing. */
export const loopbackCongestion = 'cubic';

/** Linux's limit on an algorithm name (TCP_CA_NAME_MAX 16, with the NUL). */
const congestionNameBytesMax = 15;

export function parseTcpCongestion(text: string): TcpCongestionPolicy {
  const t = text.trim();
  if (t === 'auto') return { kind: 'auto' };
  if (t === 'system') return { kind: 'system' };
  if (!/^[a-z0-9_]+$/.test(t) || t.length > congestionNameBytesMax) {
    throw new DeltavolError('EINVAL_ARGUMENT', `--tcp-congestion "${text}" is not auto, system or an algorithm name (lower-case letters, digits, _; at most ${congestionNameBytesMax})`);
  }
  return { kind: 'set', name: t };
}

function formatTcpCongestion(p: TcpCongestionPolicy): string {
  return p.kind === 'set' ? p.name : p.kind;
}

/** The algorithm a connection to `remoteAddress` should get under `policy`, or null to leave it. */
export function congestionFor(policy: TcpCongestionPolicy, remoteAddress: string | undefined): string | null {
  if (remoteAddress === undefined || remoteAddress === '') return null; // a Unix socket
  if (policy.kind === 'system') return null;
  if (policy.kind === 'set') return policy.name;
  return isLoopbackHost(remoteAddress) ? loopbackCongestion : null;
}

/** The process's policy: the daemon configures it once before it listens; 'auto' until then. */
let policy: TcpCongestionPolicy = { kind: 'auto' };
let log: Logger | null = null;
/** Each distinct outcome is logged once (a daemon may open thousands of connections). */
const logged = new Set<string>();

function logOnce(key: string, level: 'info' | 'warn', fields: Record<string, unknown>, msg: string): void {
  if (logged.has(key) || !log) return;
  logged.add(key);
  log[level](fields, msg);
}

/**
 * Checks `p` against the kernel on a throwaway loopback socket and makes it the process's policy.
 * An explicit algorithm the kernel refuses is an error (with the kernel's reason); an 'auto' whose
 * CUBIC is refused falls back to 'system' with a warning. Without the addon nothing can be set:
 * an explicit algorithm is then an error too.
 */
export async function configureTcpCongestion(p: TcpCongestionPolicy, logger: Logger): Promise<TcpCongestionPolicy> {
  log = logger;
  logged.clear();
  policy = p;
  if (p.kind === 'system') return p;
  const want = p.kind === 'set' ? p.name : loopbackCongestion;
  const outcome = await probe(want);
  if (outcome.ok) return p;
  if (p.kind === 'set') {
    throw new DeltavolError('EINVAL_ARGUMENT', `--tcp-congestion ${p.name}: ${outcome.reason}`);
  }
  logger.warn({ algorithm: want, reason: outcome.reason }, 'loopback connections keep the system TCP congestion control');
  policy = { kind: 'system' };
  return policy;
}

async function probe(name: string): Promise<{ ok: true } | { ok: false; reason: string }> {
  const sockx = loadSockx();
  if (!sockx) return { ok: false, reason: 'the native addon (build/Release/sockx.node) is not built, so it cannot be set' };
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  try {
    const fd = socketFd(server);
    if (fd < 0) return { ok: false, reason: 'no socket descriptor to try it on' };
    try {
      const got = sockx.congestion(fd, name);
      return got === name ? { ok: true } : { ok: false, reason: `the kernel reports ${got} after setting it` };
    } catch (e) {
      return { ok: false, reason: refusalText(name, (e as { code?: string }).code) };
    }
  } finally {
    server.close();
  }
}

function refusalText(name: string, code: string | undefined): string {
  switch (code) {
    case 'ENOENT':
      return `the kernel has no algorithm ${name} (see /proc/sys/net/ipv4/tcp_available_congestion_control)`;
    case 'EPERM':
      return `${name} is not allowed for this user (net.ipv4.tcp_allowed_congestion_control)`;
    default:
      return `the kernel refused it (${code ?? 'unknown error'})`;
  }
}

/**
 * Sets the process policy's algorithm on a plain TCP socket (pass the raw socket under TLS;
 * an encrypted one has no descriptor here). Returns the algorithm now in effect when it set
 * one, or null when it left the socket alone or could not set it (logged once per outcome).
 */
export function applyTcpCongestion(socket: Socket): string | null {
  const want = congestionFor(policy, socket.remoteAddress);
  if (want === null) return null;
  const sockx = loadSockx();
  const fd = sockx ? socketFd(socket) : -1;
  if (!sockx || fd < 0) return null;
  try {
    const before = sockx.congestion(fd);
    if (before === want) return want;
    const now = sockx.congestion(fd, want);
    logOnce(`set ${before} ${now}`, 'info', { algorithm: now, system: before, policy: formatTcpCongestion(policy) }, `TCP congestion control ${now} instead of ${before} on ${policy.kind === 'auto' ? 'loopback ' : ''}connections`);
    return now;
  } catch (e) {
    const code = (e as { code?: string }).code;
    // A peer that hung up already has no connection to set: nothing to report.
    if (code !== 'ENOTCONN' && code !== 'EBADF') logOnce(`fail ${want} ${code}`, 'warn', { algorithm: want, reason: refusalText(want, code) }, 'could not set the TCP congestion control of a connection');
    return null;
  }
}
