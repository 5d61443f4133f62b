// Why: the composition root. It turns a configuration into running parts: the data
// directory (locked against a second daemon), the volume registry, the NBD server
// exporting the volumes, and the control API; and it takes them down in the right order
// (stop accepting, drain requests, flush volumes, close) on SIGTERM/SIGINT. The control
// API's bearer token is made (or read) here, next to the data it guards.

import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from '../util/log.js';
import { DeltavolError } from '../util/errors.js';
import { writeFileAtomicSync } from '../util/atomic-file.js';
import { readAheadBytesMaxDefault, shutdownDrainMs, syncIoLoneBytesMaxDefault } from '../util/limits.js';
import { LoopIoPolicy } from '../util/loop-io-policy.js';
import { VolumeRegistry } from '../volume/registry.js';
import type { Volume } from '../volume/volume.js';
import { NbdServer, type NbdLimits } from '../server/nbd-server.js';
import { isLoopbackHost, loadTlsConfig, tlsSummary, type TlsServerConfig, type TlsSettings, type TlsSummary } from '../server/tls-config.js';
import { VolumeCatalog } from './volume-exports.js';
import { ControlApi } from './control-api.js';
import { CONTROL_TOKEN_FILE, loadOrCreateToken, removeRuntimeToken, writeRuntimeToken } from './control-token.js';
import { renderLinkSendMetrics, renderMetrics, renderNbdLimitMetrics } from './metrics.js';
import { linkThreadpoolSendCounts } from '../replication/transport.js';
import { renderReplicationMetrics, renderReplicationSecurityMetrics } from './replication-metrics.js';
import { loadFsx, trimMallocHeap, tuneMallocHeap } from '../storage/native.js';
import { applyDifferential, encodeDifferential, verifyDifferential } from '../snapshot/diff-transfer.js';
import { ReplicationService, type ReplicationSecurity } from '../replication/service.js';
import { systemPlatform, type ReplicationPlatform } from '../replication/platform.js';
import { loadReplTls, type ReplTlsOptions } from '../replication/tls-transport.js';
import { RegistryVolumeHost } from './volume-host.js';
import { inboundBytesMaxDefault } from '../replication/limits.js';
import { parseHostPort } from '../util/units.js';
import { configureTcpCongestion, type TcpCongestionPolicy } from '../util/tcp-congestion.js';

export interface DaemonConfig {
  dataDir: string;
  nbdHost: string;
  nbdPort: number;
  socketPath?: string;
  controlHost: string;
  controlPort: number;
  /** Also serve the control API on this Unix socket (0600; no token asked there). */
  controlSocketPath?: string;
  defaultExport?: string;
  /** Create a volume named "demo" of this size if it does not exist. */
  demoVolumeBytes?: number;
  syncIoBytesMax: number;
  /** Reads/writes up to this size run on the event loop while one client is served (≤ syncIoBytesMax: never). */
  syncIoLoneBytesMax?: number;
  version: string;
  /** Replication listener (port 0: any free port). */
  replHost: string;
  replPort: number;
  /** Outbound save area per replicated volume. */
  outboundBytes: number;
  /** Replica playback waits this long after a set is complete (0: at once). */
  playbackDelayMs: number;
  /** The replication address peers dial back (a resync, a handover); default: as they see us, on the bound port. */
  replAdvertiseHost?: string;
  replAdvertisePort?: number;
  /** NBD TLS (NBD_OPT_STARTTLS); absent: off. */
  nbdTls?: TlsSettings;
  /** NBD limits under abuse (defaults in src/util/limits.ts). */
  nbdLimits?: Partial<NbdLimits>;
  /** NBD plain sockets read into the connections' own buffers (default true; `--nbd-read-buffers node` turns it off; TLS sockets never do). */
  nbdOwnReadBuffers?: boolean;
  /** Large NBD replies on plain sockets are sent from the threadpool (default true; `--nbd-sends loop` turns it off). */
  nbdThreadpoolSends?: boolean;
  /** Large NBD WRITE payloads on plain sockets are spliced into pipes and from there to the file (default true; `--nbd-writes buffer` turns it off). */
  nbdPipedWrites?: boolean;
  /** Large NBD READ replies of written blocks leave from the page cache (sendfile; default true; `--nbd-reads copy` turns it off). */
  nbdFileReplies?: boolean;
  /** Bytes of large READ buffers one NBD connection fills ahead of its socket (`--nbd-read-ahead`; 0 = no limit). */
  nbdReadAheadBytes?: number;
  /** TCP congestion control of NBD and replication connections (src/util/tcp-congestion.ts); default auto. */
  tcpCongestion?: TcpCongestionPolicy;
  /** Replication credentials (README "Replication security"); none: plain TCP. */
  replTls?: ReplTlsOptions;
  /** Plain TCP replication on a non-loopback address, knowingly. */
  replInsecure?: boolean;
}

/**
 * The replication transport and what status says about it. Plain TCP on anything but
 * loopback is refused without --insecure: whoever reaches that port could create volumes
 * and overwrite replicas.
 */
function replicationSecurity(config: DaemonConfig): { platform: ReplicationPlatform; security: ReplicationSecurity; warnings: string[] } {
  const t = config.replTls;
  const given = t && (t.pskFile !== undefined || t.certFile !== undefined || t.keyFile !== undefined || t.caFile !== undefined);
  if (given) {
    const tls = loadReplTls(t);
    return { platform: { ...systemPlatform, transport: tls.transport }, security: { mode: tls.mode, identity: tls.identity, fingerprint: tls.fingerprint, allow: tls.allow, insecure: false }, warnings: tls.warnings };
  }
  if (t?.allow && t.allow.length > 0) throw new DeltavolError('EINVAL_ARGUMENT', '--repl-allow needs TLS credentials (--repl-tls-psk, or --repl-tls-cert/--repl-tls-key/--repl-tls-ca): without TLS peers have no identity');
  if (!isLoopbackHost(config.replHost) && !config.replInsecure) {
    throw new DeltavolError(
      'EINVAL_ARGUMENT',
      `replication would listen on ${config.replHost} without credentials: anyone who reaches it could create volumes and overwrite replicas. Give --repl-tls-psk FILE (or --repl-tls-cert/--repl-tls-key/--repl-tls-ca), or --insecure to run it unauthenticated anyway`,
    );
  }
  return { platform: systemPlatform, security: { mode: 'none', identity: null, fingerprint: null, allow: null, insecure: !isLoopbackHost(config.replHost) }, warnings: [] };
}

/** Written to DATA_DIR/daemon.json once listening, so tools can find a daemon by its data directory. */
export interface DaemonInfo {
  pid: number;
  version: string;
  nbdHost: string;
  nbdPort: number;
  socketPath: string | null;
  controlHost: string;
  controlPort: number;
  /** NBD TLS mode and how clients authenticate. */
  nbdTls: TlsSummary;
  /** The control API's bearer token (DATA_DIR/control.token) and its per-port copy for the CLI (null: none written). */
  controlTokenFile: string;
  controlRuntimeTokenFile: string | null;
  controlSocket: string | null;
  replHost: string;
  replPort: number;
  /** How the replication port is protected: tls mode (none, psk, x509) and our identity. */
  replTls: { mode: string; identity: string | null; fingerprint: string | null; allow: string[] | null; insecure: boolean };
  startedAt: string;
}

export const DAEMON_INFO_FILE = 'daemon.json';
const PID_FILE = 'daemon.pid';
/** Node timers hold at most 2^31-1 ms; a longer one fires at once. */
const TIMER_MS_MAX = 2 ** 31 - 1;
const RETRIES_MAX = 1_000_000;
/**
 * Freed heap memory glibc keeps for reuse instead of trimming at once, and the size from
 * which buffers get their own mapping (glibc's ceiling). Without them every 1 MiB chunk or
 * socket buffer allocated after a collection came back as fresh zeroed pages: a replicating
 * primary spent 42.8 µs of CPU per 4 KiB write instead of 27.2 (issue 11, README "Speed").
 * The quiet-pool timer's malloc_trim still returns the memory when the daemon goes idle.
 */
const MALLOC_TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024;
const MALLOC_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024;

export class Daemon {
  readonly registry: VolumeRegistry;
  private readonly nbd: NbdServer;
  private readonly api: ControlApi;
  readonly replication: ReplicationService;
  private info: DaemonInfo | null = null;
  private stopping: Promise<void> | null = null;
  private defaultExport: string | undefined;
  private readonly startedMs = Date.now();
  private lockFd: number | null = null;
  private readonly nbdTls: TlsServerConfig | null;
  private controlToken = '';
  private runtimeTokenFile: string | null = null;
  private readonly replSecurity: ReplicationSecurity;
  private readonly replWarnings: string[];

  constructor(
    private readonly config: DaemonConfig,
    private readonly log: Logger,
  ) {
    // A 4 KiB read reply (16-byte header + data) is just over Node's default pooled size;
    // a larger pool serves it (and replies up to 32 KiB) without a malloc per request.
    Buffer.poolSize = 64 * 1024;
    if (!tuneMallocHeap(MALLOC_TRIM_THRESHOLD_BYTES, MALLOC_MMAP_THRESHOLD_BYTES)) log.debug('malloc thresholds left at glibc defaults (no addon, or refused)');
    const volumesLog = log.child({ part: 'volumes' });
    const loopIo = new LoopIoPolicy(config.syncIoBytesMax, config.syncIoLoneBytesMax ?? syncIoLoneBytesMaxDefault);
    this.registry = new VolumeRegistry(
      config.dataDir,
      {
        get syncIoBytesMax() {
          return loopIo.syncIoBytesMax;
        },
        get syncReadBytesMax() {
          return loopIo.syncReadBytesMax;
        },
        warn: (msg, fields) => volumesLog.warn(fields, msg),
      },
      volumesLog,
    );
    this.defaultExport = config.defaultExport;
    // Bad TLS files stop the daemon here, before anything listens.
    this.nbdTls = loadTlsConfig(config.nbdTls ?? { mode: 'off' });
    this.nbd = new NbdServer(
      new VolumeCatalog(this.registry, () => this.defaultExport),
      log.child({ part: 'nbd' }),
      this.nbdTls,
      config.nbdLimits,
      { ownReadBuffers: config.nbdOwnReadBuffers ?? true, threadpoolSends: config.nbdThreadpoolSends ?? true, pipedWrites: config.nbdPipedWrites ?? true, fileReplies: config.nbdFileReplies ?? true, readAheadBytesMax: config.nbdReadAheadBytes ?? readAheadBytesMaxDefault },
      () => void trimMallocHeap(),
      (client) => loopIo.clientRequest(client),
    );
    this.api = new ControlApi(log.child({ part: 'control' }));
    const { platform, security, warnings } = replicationSecurity(config);
    this.replSecurity = security;
    this.replWarnings = warnings;
    this.replication = new ReplicationService(
      new RegistryVolumeHost(this.registry, log.child({ part: 'replication' })),
      platform,
      {
        host: config.replHost,
        port: config.replPort,
        advertiseHost: config.replAdvertiseHost ?? '',
        advertisePort: config.replAdvertisePort ?? 0,
        outboundBytes: config.outboundBytes,
        playbackDelayMs: config.playbackDelayMs,
        inboundBytesMax: inboundBytesMaxDefault,
        security,
      },
      log.child({ part: 'replication' }),
    );
    this.registerRoutes();
  }

  async start(): Promise<DaemonInfo> {
    const dir = this.config.dataDir;
    try {
      fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    } catch (e) {
      throw new DeltavolError('DATA_DIR', `cannot create data directory ${dir}: ${(e as Error).message}`);
    }
    this.lockDataDir();
    const tokenWarn = (msg: string) => this.log.warn(msg);
    this.controlToken = loadOrCreateToken(dir, tokenWarn);
    await this.registry.load();
    if (this.config.demoVolumeBytes && !this.registry.get('demo')) {
      await this.registry.create({ name: 'demo', sizeBytes: this.config.demoVolumeBytes, description: 'deltavol demo volume' });
    }
    if (this.defaultExport === undefined && this.config.demoVolumeBytes) this.defaultExport = 'demo';
    await configureTcpCongestion(this.config.tcpCongestion ?? { kind: 'auto' }, this.log.child({ part: 'tcp' }));
    // Replicas play back what they hold before any client can read them.
    const replPort = await this.replication.start();
    const nbdPort = await this.nbd.listenTcp(this.config.nbdPort, this.config.nbdHost);
    if (this.config.socketPath) await this.nbd.listenUnix(this.config.socketPath);
    const controlPort = await this.api.listen(this.config.controlPort, this.config.controlHost, this.controlToken);
    this.runtimeTokenFile = writeRuntimeToken(controlPort, this.controlToken, tokenWarn);
    if (this.config.controlSocketPath) await this.api.listenUnix(this.config.controlSocketPath);
    if (!isLoopbackHost(this.config.controlHost)) {
      const msg = `WARNING: the control API listens on ${this.config.controlHost}:${controlPort}, not on loopback: anyone who can reach it and holds the token (${path.join(dir, CONTROL_TOKEN_FILE)}) can delete volumes, and the token travels unencrypted. Prefer --control-bind 127.0.0.1 and ssh.`;
      this.log.warn({ controlHost: this.config.controlHost, controlPort }, msg);
      process.stderr.write(`deltavol: ${msg}\n`);
    }
    this.info = {
      pid: process.pid,
      version: this.config.version,
      nbdHost: this.config.nbdHost,
      nbdPort,
      socketPath: this.config.socketPath ?? null,
      controlHost: this.config.controlHost,
      controlPort,
      nbdTls: tlsSummary(this.config.nbdTls?.mode ?? 'off', this.nbdTls),
      controlTokenFile: path.join(dir, CONTROL_TOKEN_FILE),
      controlRuntimeTokenFile: this.runtimeTokenFile,
      controlSocket: this.config.controlSocketPath ?? null,
      replHost: this.config.replHost,
      replPort,
      replTls: this.replSecurity,
      startedAt: new Date().toISOString(),
    };
    writeFileAtomicSync(path.join(dir, DAEMON_INFO_FILE), JSON.stringify(this.info, null, 2) + '\n');
    const { pid: _pid, ...fields } = this.info; // pino already logs the pid
    this.log.info({ ...fields, defaultExport: this.defaultExport ?? null }, 'listening');
    this.warnNbdTls();
    const sec = this.replSecurity;
    for (const w of this.replWarnings) this.log.warn({}, `replication: ${w}`);
    if (sec.mode !== 'none') this.log.info({ replTls: sec.mode, identity: sec.identity, fingerprint: sec.fingerprint, allow: sec.allow }, `replication: TLS (${sec.mode}), this node is ${sec.identity}`);
    else if (sec.insecure) {
      this.log.warn(
        { replHost: this.config.replHost, replPort },
        `INSECURE: replication listens on ${this.config.replHost}:${replPort} WITHOUT authentication or encryption (--insecure): anyone who reaches it can create volumes and overwrite replicas`,
      );
      process.stderr.write(`\n*** WARNING: replication on ${this.config.replHost}:${replPort} runs WITHOUT authentication or encryption (--insecure). ***\n*** Anyone who can reach this port can create volumes and overwrite replicas. ***\n\n`);
    } else this.log.info({ replTls: 'none' }, 'replication: plain TCP on loopback (no credentials)');
    return this.info;
  }

  /** Start-up warnings about NBD exposure and credential files. */
  private warnNbdTls(): void {
    for (const w of this.nbdTls?.warnings ?? []) this.log.warn({ part: 'nbd' }, w);
    const host = this.config.nbdHost;
    if (isLoopbackHost(host)) return;
    const mode = this.config.nbdTls?.mode ?? 'off';
    if (mode === 'off') {
      this.log.warn(
        { nbdHost: host, tls: mode },
        'NBD is served without TLS on a non-loopback address: anyone who can reach it can read and write every volume, in the clear (use --tls require)',
      );
    } else if (mode === 'on') {
      this.log.warn({ nbdHost: host, tls: mode }, 'NBD on a non-loopback address with --tls on also serves clients that skip TLS (use --tls require)');
    }
  }

  stop(): Promise<void> {
    this.stopping ??= this.doStop();
    return this.stopping;
  }

  private async doStop(): Promise<void> {
    this.log.info({ connections: this.nbd.connections.size }, 'shutting down: draining connections');
    await this.nbd.close(shutdownDrainMs);
    // While the port is still ours no other daemon can have written its own copy there.
    if (this.runtimeTokenFile) removeRuntimeToken(this.runtimeTokenFile, this.controlToken);
    await this.api.close();
    await this.replication.stop();
    await this.registry.closeAll();
    fs.rmSync(path.join(this.config.dataDir, DAEMON_INFO_FILE), { force: true });
    if (this.lockFd !== null) fs.closeSync(this.lockFd);
    this.lockFd = null;
    this.log.info('shut down cleanly');
  }

  /**
   * One daemon per data directory: an flock on DATA_DIR/daemon.pid, held for the life of
   * the process and released by the kernel however it ends (a pid check would be fooled by
   * a reused pid after a crash). The file holds the owner's pid for the error message.
   */
  private lockDataDir(): void {
    const pidPath = path.join(this.config.dataDir, PID_FILE);
    const fd = fs.openSync(pidPath, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    const fsx = loadFsx();
    if (!fsx) {
      fs.closeSync(fd);
      throw new DeltavolError('DATA_DIR', 'the native addon (build/Release/fsx.node) is missing: run `npm run build`');
    }
    if (!fsx.lockExclusive(fd)) {
      const other = fs.readFileSync(pidPath, 'utf8').trim();
      fs.closeSync(fd);
      throw new DeltavolError('DATA_DIR', `data directory ${this.config.dataDir} is in use by daemon pid ${other || '?'}`);
    }
    fs.ftruncateSync(fd, 0);
    fs.writeSync(fd, `${process.pid}\n`, 0);
    this.lockFd = fd; // kept open: closing it would drop the lock
  }

  private volumeJson(v: Volume) {
    const access = v.writeAccess;
    return {
      ...v.info,
      // What clients get (the operator's flag, or the replication role's refusal).
      readOnly: v.readOnly,
      readOnlySetting: v.readOnlySetting,
      writes: access.mode === 'open' ? 'open' : access.mode === 'hold' ? `held: ${access.reason}` : `refused: ${access.reason}`,
      allocatedBytes: v.allocatedBytes(),
      // Deleting a snapshot moves no data: one that older snapshots read through stays, hidden, until they go.
      deletedSnapshotsKept: v.deletedSnapshotsKept(),
      connections: v.users,
      isDefaultExport: v.name === this.defaultExport,
    };
  }

  private registerRoutes(): void {
    const api = this.api;
    // Bodies are JSON objects (the API checks); each field is checked for its type here, so
    // a wrong type is a 400 with the field's name, never a TypeError (500) further in.
    const field = (body: unknown, key: string): unknown => (Object.prototype.hasOwnProperty.call(body, key) ? (body as Record<string, unknown>)[key] : undefined);
    const str = (body: unknown, key: string): string | undefined => {
      const v = field(body, key);
      if (v === undefined) return undefined;
      if (typeof v !== 'string') throw new DeltavolError('EINVAL_ARGUMENT', `"${key}" must be a string`);
      return v;
    };
    /** Every number of the API is a count, a size or a duration: a non-negative safe integer, at most max. */
    const num = (body: unknown, key: string, max = Number.MAX_SAFE_INTEGER): number | undefined => {
      const v = field(body, key);
      if (v === undefined) return undefined;
      if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new DeltavolError('EINVAL_ARGUMENT', `"${key}" must be a whole number from 0 to ${max}`);
      if (v > max) throw new DeltavolError('EINVAL_ARGUMENT', `"${key}" must be at most ${max}`);
      return v;
    };
    const bool = (body: unknown, key: string): boolean | undefined => {
      const v = field(body, key);
      if (v === undefined) return undefined;
      if (typeof v !== 'boolean') throw new DeltavolError('EINVAL_ARGUMENT', `"${key}" must be true or false`);
      return v;
    };

    api.route('GET', '/v1/status', () => this.status());
    api.route('GET', '/v1/volumes', () => ({ volumes: this.registry.list().map((v) => this.volumeJson(v)) }));
    api.route('GET', '/v1/volumes/:name', (p) => this.volumeJson(this.registry.require(p.name!)));
    api.route('POST', '/v1/volumes', async (_p, body) => {
      const name = str(body, 'name');
      const sizeBytes = num(body, 'sizeBytes');
      if (!name) throw new DeltavolError('EINVAL_ARGUMENT', '"name" is required');
      if (sizeBytes === undefined) throw new DeltavolError('EINVAL_ARGUMENT', '"sizeBytes" is required');
      const v = await this.registry.create({
        name,
        sizeBytes,
        readOnly: bool(body, 'readOnly'),
        description: str(body, 'description'),
        trackingBlockBytes: num(body, 'trackingBlockBytes'),
        snapshotSpaceBytes: num(body, 'snapshotSpaceBytes'),
      });
      return this.volumeJson(v);
    });
    api.route('PATCH', '/v1/volumes/:name', async (p, body) => {
      const name = p.name!;
      const sizeBytes = num(body, 'sizeBytes');
      if (sizeBytes !== undefined) {
        this.replication.checkResizable(name);
        await this.registry.resize(name, sizeBytes);
      }
      const readOnly = bool(body, 'readOnly');
      const description = str(body, 'description');
      if (readOnly === false) this.replication.checkMakeWritable(name);
      if (readOnly !== undefined || description !== undefined) {
        await this.registry.update(name, {
          ...(readOnly !== undefined ? { readOnly } : {}),
          ...(description !== undefined ? { description } : {}),
        });
      }
      return this.volumeJson(this.registry.require(name));
    });
    api.route('DELETE', '/v1/volumes/:name', async (p, _b, q) => {
      const force = q.get('force') === '1' || q.get('force') === 'true';
      const v = this.registry.require(p.name!);
      if (v.users > 0 && !force) await this.registry.delete(p.name!, false); // throws VOLUME_BUSY
      await this.replication.forget(p.name!, force);
      await this.registry.delete(p.name!, force);
      return { deleted: p.name };
    });
    api.route('GET', '/v1/volumes/:name/snapshots', (p) => ({ snapshots: this.registry.require(p.name!).snapshots() }));
    api.route('POST', '/v1/volumes/:name/snapshots', async (p, body) => {
      const snap = str(body, 'name');
      if (!snap) throw new DeltavolError('EINVAL_ARGUMENT', '"name" is required');
      const info = await this.replication.createSnapshot(p.name!, snap);
      this.log.info({ volume: p.name, snapshot: snap, createdAt: info.createdAt }, 'snapshot created');
      return info;
    });
    api.route('DELETE', '/v1/volumes/:name/snapshots/:snap', async (p, _b, q) => {
      await this.registry.require(p.name!).deleteSnapshot(p.snap!, q.get('force') === '1' || q.get('force') === 'true');
      this.log.info({ volume: p.name, snapshot: p.snap }, 'snapshot deleted');
      return { deleted: p.snap };
    });
    api.route('POST', '/v1/volumes/:name/snapshots/:snap/restore', async (p, _b, q) => {
      const started = Date.now();
      const r = await this.registry.require(p.name!).restoreSnapshot(p.snap!, q.get('force') === '1' || q.get('force') === 'true');
      const result = { restored: p.snap, ...r, seconds: (Date.now() - started) / 1000 };
      this.log.info({ volume: p.name, ...result }, 'volume restored from snapshot');
      return result;
    });
    api.rawRoute('GET', '/v1/volumes/:name/differential', async (p, q, _req, res) => {
      const v = this.registry.require(p.name!);
      const from = q.get('from');
      const to = q.get('to');
      if (!from || !to) throw new DeltavolError('EINVAL_ARGUMENT', 'give ?from=SNAPSHOT&to=SNAPSHOT');
      // A bad pair of snapshots fails here, as a JSON error, before the status line.
      const { first, rest } = encodeDifferential(v, from, to);
      res.writeHead(200, { 'content-type': 'application/octet-stream' });
      res.write(first);
      let it = rest.next();
      for (; !it.done; it = rest.next()) if (!res.write(it.value)) await new Promise((r) => res.once('drain', r));
      res.end();
      this.log.info({ volume: p.name, from, to, dataBytes: it.value.dataBytes }, 'differential sent');
    });
    api.rawRoute('POST', '/v1/volumes/:name/differential', async (p, _q, req, res) => {
      const v = this.registry.require(p.name!);
      const started = Date.now();
      // Spool and verify the whole stream first (checksum, counts, bounds), so a damaged or
      // truncated differential changes nothing; then apply it from the spool file.
      const spoolDir = path.join(this.config.dataDir, 'tmp');
      fs.mkdirSync(spoolDir, { recursive: true, mode: 0o700 });
      const spool = path.join(spoolDir, `differential-${process.pid}-${Date.now()}.bin`);
      try {
        const out = fs.openSync(spool, 'w', 0o600);
        let header;
        try {
          header = await verifyDifferential(req as AsyncIterable<Buffer>, (chunk) => fs.writeSync(out, chunk));
        } finally {
          fs.closeSync(out);
        }
        const totals = await applyDifferential(v, header, fs.createReadStream(spool, { highWaterMark: 1024 * 1024 }) as AsyncIterable<Buffer>);
        const result = { volume: v.name, from: header.from, to: header.to, ...totals, seconds: (Date.now() - started) / 1000 };
        this.log.info(result, 'differential applied');
        const text = JSON.stringify(result);
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
        res.end(text);
      } finally {
        fs.rmSync(spool, { force: true });
      }
    });
    // ---- replication ----
    api.route('GET', '/v1/replication', (_p, _b, q) => ({ volumes: this.replication.status(q.get('volume') ?? undefined), security: this.replication.securityStatus() }));
    api.route('POST', '/v1/volumes/:name/replicas', async (p, body) => {
      const peer = str(body, 'peer');
      if (!peer) throw new DeltavolError('EINVAL_ARGUMENT', '"peer" (HOST:PORT of the peer\'s replication port) is required');
      const { host, port } = parseHostPort(peer);
      const pair = await this.replication.addReplica(p.name!, {
        peerHost: host,
        peerPort: port,
        remoteVolume: str(body, 'as'),
        cutIntervalMs: num(body, 'cutIntervalMs', TIMER_MS_MAX),
        highWaterBytes: num(body, 'highWaterBytes'),
        retriesBeforeSuspend: num(body, 'retries', RETRIES_MAX),
        mode: str(body, 'mode') as 'async' | 'sync' | undefined,
        fence: str(body, 'fence') as 'never' | 'data' | undefined,
        syncTimeoutMs: num(body, 'syncTimeoutMs', TIMER_MS_MAX),
      });
      return pair;
    });
    api.route('DELETE', '/v1/volumes/:name/replicas/:pair', async (p) => {
      await this.replication.removeReplica(p.name!, p.pair!);
      return { removed: p.pair };
    });
    api.route('POST', '/v1/volumes/:name/replicas/suspend', async (p, body) => ({ pairs: await this.replication.suspend(p.name!, str(body, 'pair')) }));
    api.route('POST', '/v1/volumes/:name/replicas/resume', (p, body) => ({ pairs: this.replication.resume(p.name!, str(body, 'pair')) }));
    api.route('POST', '/v1/volumes/:name/cut', async (p, body) => this.replication.cut(p.name!, str(body, 'snapshot')));
    // ---- recovery ----
    api.route('POST', '/v1/volumes/:name/failover', async (p, body) => this.replication.failover(p.name!, { now: bool(body, 'now'), force: bool(body, 'force'), sync: bool(body, 'sync') }));
    api.route('POST', '/v1/volumes/:name/failback', async (p) => this.replication.failback(p.name!));
    api.route('POST', '/v1/volumes/:name/resync', async (p, body) => {
      const peer = str(body, 'peer');
      const at = peer ? parseHostPort(peer) : undefined;
      return this.replication.resync(p.name!, { ...(at ? { peerHost: at.host, peerPort: at.port } : {}), ...(str(body, 'peerVolume') ? { peerVolume: str(body, 'peerVolume') } : {}) });
    });
    api.route('POST', '/v1/volumes/:name/restore', async (p, body) => {
      const at = str(body, 'peer') ? parseHostPort(str(body, 'peer')!) : null;
      return this.replication.restore(p.name!, {
        ...(str(body, 'snapshot') !== undefined ? { snapshot: str(body, 'snapshot')! } : {}),
        ...(at ? { peerHost: at.host, peerPort: at.port } : {}),
        force: bool(body, 'force') ?? false,
        abandon: bool(body, 'abandon') ?? false,
      });
    });
    api.route('POST', '/v1/volumes/:name/unfence', async (p, body) => this.replication.unfence(p.name!, bool(body, 'force') ?? false));
    api.route('POST', '/v1/default-export', (_p, body) => {
      const name = str(body, 'name');
      if (name !== undefined && name !== '') this.registry.require(name);
      this.defaultExport = name || undefined;
      return { defaultExport: this.defaultExport ?? null };
    });
    api.text(
      '/metrics',
      () =>
        renderMetrics(this.registry.list(), [...this.nbd.connections], this.startedMs) +
        renderNbdLimitMetrics(this.nbd.limitsSnapshot()) +
        renderReplicationMetrics(this.replication.status()) +
        renderReplicationSecurityMetrics(this.replication.securityStatus()) +
        renderLinkSendMetrics(linkThreadpoolSendCounts()) +
        '# HELP deltavol_control_refused_requests_total Control API requests refused before routing (Origin, Host, token, content type).\n' +
        '# TYPE deltavol_control_refused_requests_total counter\n' +
        `deltavol_control_refused_requests_total ${this.api.refusedRequests}\n`,
    );
  }

  status() {
    return {
      daemon: this.info,
      uptimeSeconds: Math.round((Date.now() - this.startedMs) / 1000),
      defaultExport: this.defaultExport ?? null,
      connections: [...this.nbd.connections].map((c) => ({ export: c.exportName, inflight: c.inflight, tls: c.tlsActive, tlsClient: c.tlsClient, ...c.stats })),
      volumes: this.registry.list().map((v) => this.volumeJson(v)),
    };
  }
}

