// Why: a refusal goes back to whoever connected, and before TLS (or without it) that may be
// anyone. Refusal texts used to carry pair ids, sizes and names, which let a stranger learn
// what to forge next. Codes stay (senders act on them); details go only to a peer that
// proved its identity, and always to this node's log.

import type { DeltavolError } from '../util/errors.js';
import type { Link } from './link.js';
import type { ReplMessage } from './wire.js';

/**
 * The text a refusal carries: details for a peer that proved who it is, else only the
 * code and what the peer said itself (`publicMessage`), never pair ids, sizes or names of
 * ours. The details go to this node's log (the callers log them).
 */
export function publicRefusal(peerIdentity: string | null, code: string, e: Error): string {
  if (peerIdentity !== null) return e.message;
  const pub = (e as DeltavolError).details?.publicMessage;
  return typeof pub === 'string' ? pub : `refused (${code})`;
}

/** Sends a refusal on `link` (text per publicRefusal) and closes it. */
export function refuseOn(link: Link, code: string, message: string, generation: number, closeReason: string, publicMessage?: string): void {
  const e = Object.assign(new Error(message), { details: publicMessage === undefined ? undefined : { publicMessage } }) as Error as DeltavolError;
  const msg: ReplMessage = { t: 'refuse', code, message: publicRefusal(link.conn.peerIdentity, code, e), generation };
  link.send(msg);
  link.close(closeReason);
}
