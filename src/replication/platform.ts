// Why: everything replication and recovery take from the world besides volumes — time,
// the network, fresh identifiers — in one object, so the daemon passes the real ones
// and the seeded simulator passes its own (STYLE.md practice 8).

import { randomBytes } from 'node:crypto';
import { systemClock, type Clock } from '../util/clock.js';
import { tcpTransport, type Transport } from './transport.js';

export interface ReplicationPlatform {
  clock: Clock;
  transport: Transport;
  /** A fresh identifier (pair ids): 12 hex digits. */
  newId(): string;
}

export const systemPlatform: ReplicationPlatform = {
  clock: systemClock,
  transport: tcpTransport,
  newId: () => randomBytes(6).toString('hex'),
};
