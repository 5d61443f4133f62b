// Why: the pieces of replication security that can be checked without a daemon: the
// psktool file parser (what it refuses), the allow-list match, the caps on
// unauthenticated connections (per daemon, per address, released once), the link's frame
// cap before a hello, refusal texts for unauthenticated peers, and the TLS transport
// itself (identity on both ends over PSK, a wrong key refused) on loopback.

import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { allowed, loadReplTls, parsePskFile } from '../../src/replication/tls-transport.js';
import { AdmissionGate } from '../../src/replication/admission.js';
import { Link } from '../../src/replication/link.js';
import { publicRefusal } from '../../src/replication/refusal.js';
import { encodeFrame } from '../../src/replication/wire.js';
import { DeltavolError } from '../../src/util/errors.js';
import { systemClock } from '../../src/util/clock.js';
import type { Conn } from '../../src/replication/transport.js';
import { createLogger } from '../../src/util/log.js';

const log = createLogger({ level: 'silent' });
const hex = (n: number) => crypto.randomBytes(n).toString('hex');

describe('PSK file', () => {
  it('parses psktool lines and refuses short keys, bad hex, duplicates and empty files', () => {
    const k = parsePskFile(`# comment\nalpha:${hex(32)}\n\nbeta:${hex(16)}\n`);
    expect([...k.keys()]).toEqual(['alpha', 'beta']);
    expect(k.get('alpha')!.length).toBe(32);
    expect(() => parsePskFile(`alpha:${hex(8)}`)).toThrow(/at least 16/);
    expect(() => parsePskFile('alpha:xyz')).toThrow(/identity:hexkey/);
    expect(() => parsePskFile(`:${hex(32)}`)).toThrow(/identity:hexkey/);
    expect(() => parsePskFile(`a:${hex(32)}\na:${hex(32)}`)).toThrow(/twice/);
    expect(() => parsePskFile('\n# nothing\n')).toThrow(/no identity/);
  });

  it('the identity is the first line unless named; a name without a key is refused; PSK and X.509 together are refused', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dvrt-unit-'));
    try {
      const f = path.join(dir, 'k.psk');
      fs.writeFileSync(f, `beta:${hex(32)}\nalpha:${hex(32)}\n`);
      expect(loadReplTls({ pskFile: f }).identity).toBe('psk:beta');
      expect(loadReplTls({ pskFile: f, pskIdentity: 'alpha' }).identity).toBe('psk:alpha');
      expect(() => loadReplTls({ pskFile: f, pskIdentity: 'gamma' })).toThrow(/no key for identity gamma/);
      expect(() => loadReplTls({ pskFile: f, certFile: f })).toThrow(/not both/);
      expect(() => loadReplTls({ certFile: f })).toThrow(/needs all of/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('allow-list entries match with or without the mode prefix', () => {
    expect(allowed(null, 'psk:x')).toBe(true);
    expect(allowed(['alpha'], 'psk:alpha')).toBe(true);
    expect(allowed(['x509:alpha'], 'x509:alpha')).toBe(true);
    expect(allowed(['x509:alpha'], 'psk:alpha')).toBe(false);
    expect(allowed(['alpha'], 'psk:beta')).toBe(false);
  });
});

describe('caps on unauthenticated connections', () => {
  it('per daemon and per address, each admission released once', () => {
    const g = new AdmissionGate({ connectionsMax: 4, connectionsPerAddressMax: 2, handshakeTimeoutMs: 1000 }, log, () => Date.now());
    const a1 = g.admit('10.0.0.1')!;
    const a2 = g.admit('10.0.0.1')!;
    expect(g.admit('10.0.0.1')).toBeNull();
    expect(g.counters.refusedAddressCap).toBe(1);
    const b1 = g.admit('10.0.0.2')!;
    expect(g.admit('10.0.0.3')).not.toBeNull();
    expect(g.admit('10.0.0.4')).toBeNull();
    expect(g.counters.refusedDaemonCap).toBe(1);
    expect(g.unauthenticated).toBe(4);
    a1.release();
    a1.release(); // idempotent
    expect(g.unauthenticated).toBe(3);
    expect(g.admit('10.0.0.1')).not.toBeNull();
    a2.release();
    b1.release();
    expect(g.unauthenticated).toBe(2);
  });
});

/** A Conn fed by hand. */
function fakeConn(identity: string | null = null): Conn & { feed(b: Buffer): void; destroyed: boolean } {
  let data: ((b: Buffer) => void) | null = null;
  const closers: ((r: string) => void)[] = [];
  const c = {
    remoteAddress: '127.0.0.1',
    peerIdentity: identity,
    writableLength: 0,
    destroyed: false,
    write: () => undefined,
    cork: () => undefined,
    uncork: () => undefined,
    pause: () => undefined,
    resume: () => undefined,
    destroy() {
      c.destroyed = true;
      for (const f of closers.splice(0)) f('connection closed');
    },
    onData: (fn: (b: Buffer) => void) => {
      data = fn;
    },
    onClose: (fn: (r: string) => void) => {
      closers.push(fn);
    },
    onDrain: () => undefined,
    offDrain: () => undefined,
    feed: (b: Buffer) => data!(b),
  };
  return c;
}

describe('a link before its hello', () => {
  it('closes when an unfinished frame passes frameBytesMax, and not before', () => {
    const conn = fakeConn();
    const link = new Link(conn, systemClock, () => undefined, 60_000, 120_000);
    link.frameBytesMax = 64 * 1024;
    const frame = Buffer.concat(encodeFrame({ t: 'hello', protocol: 2, pairId: 'p', primaryVolume: 'a', replicaVolume: 'b', generation: 1, sizeBytes: 4096, blockBytes: 4096, create: true, description: 'x'.repeat(512 * 1024), returnHost: '', returnPort: 0 }));
    conn.feed(frame.subarray(0, 60 * 1024));
    expect(link.closed).toBe(false);
    conn.feed(frame.subarray(60 * 1024, 70 * 1024));
    expect(link.closed).toBe(true);
    expect(link.oversize).toBe(true);
    expect(conn.destroyed).toBe(true);
  });
});

describe('refusal texts', () => {
  it('details only for a peer with a proven identity', () => {
    const e = new DeltavolError('GEOMETRY', 'replica v1 is 16777216 bytes in 4096-byte blocks; pair 0123456789ab');
    expect(publicRefusal('psk:alpha', 'GEOMETRY', e)).toBe(e.message);
    expect(publicRefusal(null, 'GEOMETRY', e)).toBe('refused (GEOMETRY)');
    const named = new DeltavolError('VOLUME_EXISTS', 'volume x is the replica of another pair', { publicMessage: 'volume x exists' });
    expect(publicRefusal(null, 'VOLUME_EXISTS', named)).toBe('volume x exists');
  });
});

describe('the TLS-PSK transport', () => {
  it('both ends learn who the other is; a wrong key gets no connection', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dvrt-unit-'));
    const failures: string[] = [];
    try {
      const ka = hex(32);
      const kb = hex(32);
      fs.writeFileSync(path.join(dir, 'server.psk'), `beta:${kb}\nalpha:${ka}\n`);
      fs.writeFileSync(path.join(dir, 'client.psk'), `alpha:${ka}\n`);
      fs.writeFileSync(path.join(dir, 'wrong.psk'), `alpha:${hex(32)}\n`);
      const server = loadReplTls({ pskFile: path.join(dir, 'server.psk') });
      const seen: (string | null)[] = [];
      const l = await server.transport.listen('127.0.0.1', 0, (c) => {
        seen.push(c.peerIdentity);
        setTimeout(() => c.destroy(), 200);
      }, { admit: () => ({ release: () => undefined }), handshakeTimeoutMs: 2000, onHandshakeFailed: (_a, why) => failures.push(why) });
      try {
        const client = loadReplTls({ pskFile: path.join(dir, 'client.psk') });
        const c = await client.transport.connect('127.0.0.1', l.port, 5000);
        expect(c.peerIdentity).toBe('psk:beta');
        c.destroy();
        const wrong = loadReplTls({ pskFile: path.join(dir, 'wrong.psk') });
        await expect(wrong.transport.connect('127.0.0.1', l.port, 5000)).rejects.toThrow(/TLS|closed/);
        for (let i = 0; i < 50 && failures.length === 0; i++) await new Promise((r) => setTimeout(r, 20));
        expect(seen).toEqual(['psk:alpha']);
        expect(failures.length).toBe(1);
      } finally {
        await l.close();
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
