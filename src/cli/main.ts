#!/usr/bin/env node
// Why: the `deltavol` command. It parses argv and either runs the daemon (`serve`) or
// asks a running daemon to do something through the control API. No logic lives here
// beyond turning words into requests and answers into text.
//
// Exit codes (stable, for scripts):
//   0 success · 1 the operation failed · 2 bad usage · 3 daemon unreachable
//   4 no such volume or snapshot · 5 conflict (already exists, busy, wrong role, stale
//   generation, refused by the peer) · 6 the replication peer is unreachable
//   7 the daemon refused the caller (no or wrong control token, foreign Host)

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command, CommanderError, Option } from 'commander';
import { DeltavolError, isDeltavolError } from '../util/errors.js';
import { formatBytes, parseDurationMs, parseHostPort, parseSizeBytes } from '../util/units.js';
import { registerReplicationCommands, renderReplication, type VolumeReplication } from './replication-commands.js';
import { registerRecoveryCommands } from './recovery-commands.js';
import { replicationPortDefault, outboundBytesDefault } from '../replication/limits.js';
import {
  connectionsMax,
  connectionsPerAddressMaxDefault,
  handshakeConnectionsMaxDefault,
  nbdBufferBytesMaxDefault,
  nbdStallTimeoutMsDefault,
  syncIoBytesMaxDefault,
  syncIoLoneBytesMaxDefault,
  readAheadBytesMaxDefault,
} from '../util/limits.js';
import { ControlClient, resolveControlTarget, CONTROL_PORT_DEFAULT } from './control-client.js';
import { escapeOutput, escapeText, table } from './format.js';
import type { SnapshotInfo } from '../snapshot/snapshot-queue.js';
import { exitWhenSettled } from './exit-guard.js';
import { parseTcpCongestion } from '../util/tcp-congestion.js';

export const EXIT = { ok: 0, failed: 1, usage: 2, unreachable: 3, notFound: 4, conflict: 5, peerUnreachable: 6, denied: 7 } as const;

const here = path.dirname(fileURLToPath(import.meta.url));
const VERSION = (JSON.parse(fs.readFileSync(path.resolve(here, '../../package.json'), 'utf8')) as { version: string }).version;

interface GlobalOpts {
  control?: string;
  controlSocket?: string;
  dataDir?: string;
  tokenFile?: string;
}

interface VolumeJson {
  name: string;
  sizeBytes: number;
  readOnly: boolean;
  description: string;
  createdAt: string;
  allocatedBytes: number;
  connections: number;
  isDefaultExport: boolean;
  trackingBlockBytes: number;
}

function client(cmd: Command): ControlClient {
  const g = cmd.optsWithGlobals() as GlobalOpts;
  return new ControlClient(resolveControlTarget({ control: g.control, controlSocket: g.controlSocket, dataDir: g.dataDir, tokenFile: g.tokenFile }));
}

function size(text: string): number {
  return parseSizeBytes(text);
}

function readBuffersMode(text: string): boolean {
  if (text === 'own') return true;
  if (text === 'node') return false;
  throw new DeltavolError('EINVAL_ARGUMENT', `--nbd-read-buffers "${text}" is not one of own, node`);
}

function sendsMode(text: string): boolean {
  if (text === 'threadpool') return true;
  if (text === 'loop') return false;
  throw new DeltavolError('EINVAL_ARGUMENT', `--nbd-sends "${text}" is not one of threadpool, loop`);
}

function readsMode(text: string): boolean {
  if (text === 'sendfile') return true;
  if (text === 'copy') return false;
  throw new DeltavolError('EINVAL_ARGUMENT', `--nbd-reads "${text}" is not one of sendfile, copy`);
}

function writesMode(text: string): boolean {
  if (text === 'splice') return true;
  if (text === 'buffer') return false;
  throw new DeltavolError('EINVAL_ARGUMENT', `--nbd-writes "${text}" is not one of splice, buffer`);
}

function print(json: boolean, value: unknown, human: () => string): void {
  // Human text may hold names and reasons from other users and peers: no raw control characters.
  process.stdout.write((json ? JSON.stringify(value, null, 2) : escapeOutput(human())) + '\n');
}

function volumeLine(v: VolumeJson): string {
  return `${escapeText(v.name)}: ${v.description ? `"${escapeText(v.description)}", ` : ''}${formatBytes(v.sizeBytes)} (${v.sizeBytes} bytes), ${v.readOnly ? 'read-only' : 'read-write'}, ${formatBytes(v.allocatedBytes)} allocated, ${v.connections} connection(s)`;
}

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('deltavol')
    .description('Replicated block-volume server: NBD exports of file-backed volumes.')
    .version(VERSION)
    .option('--control <host:port>', `control API of the daemon to talk to (env DELTAVOL_CONTROL; default 127.0.0.1:${CONTROL_PORT_DEFAULT})`)
    .option('--data-dir <dir>', 'find the daemon and its control token through its data directory (reads DIR/daemon.json and DIR/control.token)')
    .option('--control-socket <path>', "the daemon's control socket (its `serve --control-socket`; env DELTAVOL_CONTROL_SOCKET): no token needed, the socket's permission decides")
    .option('--token-file <file>', 'the control token (default: env DELTAVOL_TOKEN or DELTAVOL_TOKEN_FILE, DIR/control.token with --data-dir, else the copy the daemon left for its port in /run/deltavol or $XDG_RUNTIME_DIR/deltavol)')
    .showHelpAfterError('(run with --help for usage)')
    .exitOverride();

  program
    .command('serve')
    .description('run the daemon in the foreground: export every volume of the data directory over NBD')
    .option('--port <n>', 'NBD TCP port (0 = any free port)', '10809')
    .option('--bind <addr>', 'NBD listen address (0.0.0.0 to accept remote clients)', '127.0.0.1')
    .option('--socket <path>', 'also listen on this Unix socket')
    .option('--control-port <n>', 'control API port on --control-bind (0 = any free port)', String(CONTROL_PORT_DEFAULT))
    .option('--control-bind <addr>', 'control API listen address (anything but loopback prints a warning; the token is always required)', '127.0.0.1')
    .option('--control-socket <path>', 'also serve the control API on this Unix socket, mode 0600 (its permission is the check: no token needed there)')
    .option('--default-export <name>', 'volume served to clients that ask for the empty export name')
    .option('--demo-volume <size>', 'create a volume "demo" of this size if missing and make it the default export')
    .option('--sync-io-max <bytes>', 'reads/writes up to this size run on the event loop, larger ones in the threadpool (0 = always threadpool)', String(syncIoBytesMaxDefault))
    .option('--sync-io-max-lone <bytes>', 'while one NBD client is served (no other made a request for 250 ms), writes up to this size run on the event loop too (at or below --sync-io-max: off; reads keep --sync-io-max)', String(syncIoLoneBytesMaxDefault))
    .option('--repl-port <n>', 'replication port: peers connect here to replicate into this node (0 = any free port)', String(replicationPortDefault))
    .option('--repl-bind <addr>', 'replication listen address (0.0.0.0 to accept remote primaries)', '127.0.0.1')
    .option('--repl-advertise <host:port>', 'replication address peers dial back after a resync or a handover (default: the address they see, on --repl-port)')
    .option('--repl-tls-psk <file>', 'replication over TLS with pre-shared keys: a psktool file of identity:hexkey lines (peers must be in it)')
    .option('--repl-tls-psk-identity <name>', 'the PSK identity this node presents (default: the first line of --repl-tls-psk)')
    .option('--repl-tls-cert <file>', 'replication over TLS with X.509: this node\'s certificate (PEM; its subject CN is its identity)')
    .option('--repl-tls-key <file>', 'private key of --repl-tls-cert (PEM)')
    .option('--repl-tls-ca <file>', 'CA that signed the peers\' certificates (PEM): peers are verified both ways')
    .option('--repl-allow <ids>', 'only these peer identities may connect (comma-separated PSK identities or certificate CNs)')
    .option('--insecure', 'allow replication without credentials on a non-loopback --repl-bind (anyone reaching the port can write replicas)')
    .option('--outbound-size <size>', 'outbound save area per replicated volume (delta sets waiting for their replicas)', String(outboundBytesDefault))
    .option('--playback-delay <duration>', 'a replica plays a complete delta set after this delay', '0ms')
    .addOption(new Option('--tls <mode>', 'NBD TLS (NBD_OPT_STARTTLS): off; on (clients may upgrade); require (every option but STARTTLS refused before TLS)').choices(['off', 'on', 'require']).default('off'))
    .option('--tls-cert <file>', 'NBD TLS: server certificate (PEM; may hold the chain)')
    .option('--tls-key <file>', 'NBD TLS: private key of --tls-cert (PEM)')
    .option('--tls-ca <file>', 'NBD TLS: CA certificate(s) that sign client certificates (PEM)')
    .option('--tls-verify-peer', 'NBD TLS: require a client certificate signed by --tls-ca')
    .option('--tls-authz <names>', 'NBD TLS: allowed client certificates, comma-separated subject CNs; a value with "=" is one whole subject DN (CN=a,O=b); repeatable; implies --tls-verify-peer', (v: string, prev: string[] = []) => [...prev, ...(v.includes('=') ? [v] : v.split(','))])
    .option('--tls-psk <file>', 'NBD TLS: pre-shared keys, one IDENTITY:HEXKEY a line (psktool format), instead of certificates')
    .option('--connections-max <n>', 'NBD connections (handshake and transmission); when full, a client from an address holding fewer evicts the longest-idle connection of the address holding the most', String(connectionsMax))
    .option('--handshake-connections-max <n>', 'NBD connections still in the handshake (each has 30 s to finish)', String(handshakeConnectionsMaxDefault))
    .option('--connections-per-address-max <n>', 'NBD connections from one remote address (Unix sockets exempt)', String(connectionsPerAddressMaxDefault))
    .option('--nbd-buffer-bytes-max <size>', 'memory for NBD request buffers and unsent replies, all connections together', `${nbdBufferBytesMaxDefault / (1024 * 1024)}M`)
    .option('--nbd-read-buffers <own|node>', "plain NBD sockets read into the daemon's own reused buffers, large WRITE payloads straight into theirs (own), or into Node's fresh buffer per read (node); TLS sockets always use node", 'own')
    .option('--nbd-read-ahead <bytes>', 'bytes of large READ buffers (64 KiB or more) one NBD connection fills ahead of its socket; later large reads wait for a reply to leave (0 = no limit)', String(readAheadBytesMaxDefault))
    .option('--tcp-congestion <auto|system|name>', 'TCP congestion control of NBD and replication connections: auto = cubic on loopback connections (pacing algorithms such as bbr reorder segments there), the system default elsewhere; system = never set; a name (cubic, reno, bbr, ...) = that on every connection', 'auto')
    .option('--nbd-writes <splice|buffer>', 'large NBD WRITE payloads (256 KiB to 2 MiB) on plain sockets are spliced from the socket into a kernel pipe and from there into the volume\'s file, one copy instead of two (splice), or read into buffers (buffer); with --tls other than off, or --nbd-read-buffers node, always buffer', 'splice')
    .option('--nbd-reads <sendfile|copy>', 'large NBD READ replies (256 KiB or more) of a primary volume\'s written blocks leave from the page cache with sendfile, one copy instead of two (sendfile), or are read into buffers first (copy); with --tls other than off, --nbd-sends loop, or reads of snapshots, of replicas, or of ranges with unwritten blocks (sent as holes), always copy', 'sendfile')
    .option('--nbd-sends <threadpool|loop>', 'large NBD replies (256 KiB or more) are handed to the socket from a threadpool thread, so several connections send at once (threadpool), or all from the event loop (loop); with --tls other than off, always loop', 'threadpool')
    .option('--nbd-stall-timeout <duration>', 'while others wait for NBD buffer memory, close a connection that has not read its replies for this long', `${nbdStallTimeoutMsDefault / 1000}s`)
    .addOption(new Option('--log-level <level>', 'log level').choices(['trace', 'debug', 'info', 'warn', 'error', 'silent']).default('info'))
    .addOption(new Option('--log-format <format>', 'log format').choices(['json', 'pretty']).default('json'))
    .addHelpText('after', '\nRequires --data-dir DIR: the directory holding volumes and state (created if missing).')
    .action(async (opts, cmd: Command) => {
      const dataDir = (cmd.optsWithGlobals() as GlobalOpts).dataDir;
      const controlSocket = (opts.controlSocket as string | undefined) ?? (cmd.optsWithGlobals() as GlobalOpts).controlSocket;
      if (!dataDir) throw new DeltavolError('EINVAL_ARGUMENT', 'serve needs --data-dir DIR (the directory holding volumes and state)');
      const { createLogger } = await import('../util/log.js');
      const log = createLogger({ level: opts.logLevel, pretty: opts.logFormat === 'pretty' });
      const port = (text: string, what: string) => {
        const n = Number(text);
        if (!Number.isInteger(n) || n < 0 || n > 65535) throw new DeltavolError('EINVAL_ARGUMENT', `${what} "${text}" is not a port number`);
        return n;
      };
      // Loaded here (with the logger): every other command only talks to a daemon and
      // starts faster without them.
      const { Daemon } = await import('../daemon/daemon.js');
      const daemon = new Daemon(
        {
          dataDir: path.resolve(dataDir),
          nbdHost: opts.bind,
          nbdPort: port(opts.port, '--port'),
          socketPath: opts.socket ? path.resolve(opts.socket) : undefined,
          controlHost: opts.controlBind,
          controlPort: port(opts.controlPort, '--control-port'),
          // The program-wide --control-socket (the CLI's) takes the flag when given after `serve` too.
          ...(controlSocket ? { controlSocketPath: path.resolve(controlSocket) } : {}),
          defaultExport: opts.defaultExport,
          demoVolumeBytes: opts.demoVolume ? size(opts.demoVolume) : undefined,
          syncIoBytesMax: size(opts.syncIoMax),
          syncIoLoneBytesMax: size(opts.syncIoMaxLone),
          nbdReadAheadBytes: size(opts.nbdReadAhead),
          version: VERSION,
          replHost: opts.replBind,
          replPort: port(opts.replPort, '--repl-port'),
          outboundBytes: size(opts.outboundSize),
          playbackDelayMs: parseDurationMs(opts.playbackDelay),
          nbdTls: {
            mode: opts.tls,
            certFile: opts.tlsCert,
            keyFile: opts.tlsKey,
            caFile: opts.tlsCa,
            verifyPeer: Boolean(opts.tlsVerifyPeer),
            authz: opts.tlsAuthz ?? [],
            pskFile: opts.tlsPsk,
          },
          nbdOwnReadBuffers: readBuffersMode(opts.nbdReadBuffers),
          nbdThreadpoolSends: sendsMode(opts.nbdSends),
          nbdPipedWrites: writesMode(opts.nbdWrites),
          nbdFileReplies: readsMode(opts.nbdReads),
          tcpCongestion: parseTcpCongestion(opts.tcpCongestion),
          nbdLimits: {
            connectionsMax: Number(opts.connectionsMax),
            handshakeConnectionsMax: Number(opts.handshakeConnectionsMax),
            connectionsPerAddressMax: Number(opts.connectionsPerAddressMax),
            bufferBytesMax: size(opts.nbdBufferBytesMax),
            stallTimeoutMs: parseDurationMs(opts.nbdStallTimeout),
          },
          replTls: {
            ...(opts.replTlsPsk ? { pskFile: path.resolve(opts.replTlsPsk) } : {}),
            ...(opts.replTlsPskIdentity ? { pskIdentity: opts.replTlsPskIdentity } : {}),
            ...(opts.replTlsCert ? { certFile: path.resolve(opts.replTlsCert) } : {}),
            ...(opts.replTlsKey ? { keyFile: path.resolve(opts.replTlsKey) } : {}),
            ...(opts.replTlsCa ? { caFile: path.resolve(opts.replTlsCa) } : {}),
            ...(opts.replAllow ? { allow: String(opts.replAllow).split(',').map((x: string) => x.trim()).filter((x: string) => x !== '') } : {}),
          },
          replInsecure: opts.insecure === true,
          ...(opts.replAdvertise ? { replAdvertiseHost: parseHostPort(opts.replAdvertise).host, replAdvertisePort: parseHostPort(opts.replAdvertise).port } : {}),
        },
        log,
      );
      let signals = 0;
      const onSignal = (sig: string) => {
        if (++signals > 1) {
          log.warn({ signal: sig }, 'second signal: exiting now');
          process.exit(EXIT.failed);
        }
        log.info({ signal: sig }, 'signal received');
        daemon.stop().then(
          () => log.flush(() => process.exit(EXIT.ok)),
          (e) => {
            log.error({ err: (e as Error).message }, 'shutdown failed');
            log.flush(() => process.exit(EXIT.failed));
          },
        );
      };
      process.on('SIGTERM', () => onSignal('SIGTERM'));
      process.on('SIGINT', () => onSignal('SIGINT'));
      await daemon.start();
    });

  const volume = program.command('volume').description('create, list, inspect, resize, change and delete volumes');

  volume
    .command('create <name>')
    .description('create a sparse volume; it is exported at once under its name')
    .requiredOption('--size <size>', 'size, e.g. 1G, 512MiB, 10737418240 (a multiple of 512 bytes)')
    .option('--read-only', 'export it read-only')
    .option('--description <text>', 'shown to NBD clients that list exports (printable text, no control characters)')
    .option('--tracking-block <size>', 'change-tracking block size, power of two 4K-1M (default 4K, or larger for volumes over 16 TiB - 4 KiB so they stay within 2^32 - 1 blocks)')
    .option('--snapshot-space <size>', 'most space one snapshot may use for before-images; past it that snapshot becomes invalid (default: the volume size)')
    .option('--json', 'print JSON')
    .action(async (name: string, opts, cmd: Command) => {
      const v = await client(cmd).request<VolumeJson>('POST', '/v1/volumes', {
        name,
        sizeBytes: size(opts.size),
        readOnly: Boolean(opts.readOnly),
        description: opts.description ?? '',
        ...(opts.trackingBlock ? { trackingBlockBytes: size(opts.trackingBlock) } : {}),
        ...(opts.snapshotSpace ? { snapshotSpaceBytes: size(opts.snapshotSpace) } : {}),
      });
      print(opts.json, v, () => `created ${volumeLine(v)}`);
    });

  volume
    .command('list')
    .alias('ls')
    .description('list volumes')
    .option('--json', 'print JSON')
    .action(async (opts, cmd: Command) => {
      const { volumes } = await client(cmd).request<{ volumes: VolumeJson[] }>('GET', '/v1/volumes');
      print(opts.json, volumes, () =>
        volumes.length === 0
          ? 'no volumes (create one with: deltavol volume create NAME --size 1G)'
          : table(
              ['NAME', 'SIZE', 'ALLOCATED', 'MODE', 'CONNS', 'DESCRIPTION'],
              volumes.map((v) => [
                v.name + (v.isDefaultExport ? ' (default)' : ''),
                formatBytes(v.sizeBytes),
                formatBytes(v.allocatedBytes),
                v.readOnly ? 'ro' : 'rw',
                v.connections,
                v.description,
              ]),
            ),
      );
    });

  volume
    .command('info <name>')
    .description('show one volume')
    .option('--json', 'print JSON')
    .action(async (name: string, opts, cmd: Command) => {
      const v = await client(cmd).request<VolumeJson>('GET', `/v1/volumes/${encodeURIComponent(name)}`);
      print(opts.json, v, () => volumeLine(v));
    });

  volume
    .command('resize <name>')
    .description('grow a volume (shrinking is refused: it would destroy data)')
    .requiredOption('--size <size>', 'new size')
    .option('--json', 'print JSON')
    .action(async (name: string, opts, cmd: Command) => {
      const v = await client(cmd).request<VolumeJson>('PATCH', `/v1/volumes/${encodeURIComponent(name)}`, { sizeBytes: size(opts.size) });
      print(opts.json, v, () => `resized ${volumeLine(v)}\n(connected clients keep the old size until they reconnect)`);
    });

  volume
    .command('set <name>')
    .description('change a volume: read-only or read-write, description')
    .option('--read-only', 'refuse writes from now on (new connections see a read-only export)')
    .option('--read-write', 'accept writes again')
    .option('--description <text>', 'new description')
    .option('--json', 'print JSON')
    .action(async (name: string, opts, cmd: Command) => {
      if (opts.readOnly && opts.readWrite) throw new DeltavolError('EINVAL_ARGUMENT', 'choose one of --read-only and --read-write');
      const patch: Record<string, unknown> = {};
      if (opts.readOnly) patch.readOnly = true;
      if (opts.readWrite) patch.readOnly = false;
      if (opts.description !== undefined) patch.description = opts.description;
      if (Object.keys(patch).length === 0) throw new DeltavolError('EINVAL_ARGUMENT', 'nothing to change: give --read-only, --read-write or --description');
      const v = await client(cmd).request<VolumeJson>('PATCH', `/v1/volumes/${encodeURIComponent(name)}`, patch);
      print(opts.json, v, () => `updated ${volumeLine(v)}`);
    });

  volume
    .command('delete <name>')
    .alias('rm')
    .description('delete a volume and its data (refused while clients are connected unless --force)')
    .option('--force', 'delete even with clients connected (their requests fail from then on)')
    .action(async (name: string, opts, cmd: Command) => {
      await client(cmd).request('DELETE', `/v1/volumes/${encodeURIComponent(name)}${opts.force ? '?force=1' : ''}`);
      process.stdout.write(`deleted ${name}\n`);
    });

  const snapshot = program.command('snapshot').description('create, list, delete and restore snapshots of a volume (exported read-only as VOLUME@SNAPSHOT)');

  snapshot
    .command('create <volume> <name>')
    .description('take a snapshot now: it holds every write acknowledged before it')
    .option('--json', 'print JSON')
    .action(async (vol: string, name: string, opts, cmd: Command) => {
      const s = await client(cmd).request<SnapshotInfo>('POST', `/v1/volumes/${encodeURIComponent(vol)}/snapshots`, { name });
      print(opts.json, s, () => `created snapshot ${vol}@${s.name} at ${s.createdAt}; export: ${vol}@${s.name} (read-only)`);
    });

  snapshot
    .command('list <volume>')
    .alias('ls')
    .description('list the snapshots of a volume, oldest first')
    .option('--json', 'print JSON')
    .action(async (vol: string, opts, cmd: Command) => {
      const { snapshots } = await client(cmd).request<{ snapshots: SnapshotInfo[] }>('GET', `/v1/volumes/${encodeURIComponent(vol)}/snapshots`);
      print(opts.json, snapshots, () =>
        snapshots.length === 0
          ? `volume ${vol} has no snapshots (take one with: deltavol snapshot create ${vol} NAME)`
          : table(
              ['SNAPSHOT', 'CREATED', 'SIZE', 'SAVED', 'DELTA SET', 'STATE'],
              snapshots.map((s) => [s.name, s.createdAt, formatBytes(s.sizeBytes), formatBytes(s.saveAreaBytes), s.deltaSetNumber, s.valid ? 'valid' : 'INVALID (save area full)']),
            ),
      );
    });

  snapshot
    .command('delete <volume> <name>')
    .alias('rm')
    .description('delete a snapshot; every other snapshot keeps its content')
    .option('--force', 'delete even while clients read it')
    .action(async (vol: string, name: string, opts, cmd: Command) => {
      await client(cmd).request('DELETE', `/v1/volumes/${encodeURIComponent(vol)}/snapshots/${encodeURIComponent(name)}${opts.force ? '?force=1' : ''}`);
      process.stdout.write(`deleted snapshot ${vol}@${name}\n`);
    });

  snapshot
    .command('restore <volume> <name>')
    .description('roll the volume back to the snapshot in place, copying only the blocks that differ')
    .option('--force', 'restore even with clients connected to the volume (they must not trust cached data)')
    .option('--json', 'print JSON')
    .action(async (vol: string, name: string, opts, cmd: Command) => {
      const r = await client(cmd).request<{ blocksWritten: number; blocksZeroed: number; seconds: number }>(
        'POST',
        `/v1/volumes/${encodeURIComponent(vol)}/snapshots/${encodeURIComponent(name)}/restore${opts.force ? '?force=1' : ''}`,
      );
      print(opts.json, r, () => `restored ${vol} to snapshot ${name}: ${r.blocksWritten} blocks copied back, ${r.blocksZeroed} zeroed, ${r.seconds.toFixed(2)} s`);
    });

  snapshot
    .command('diff <volume> <from> <to>')
    .description('the blocks that changed between snapshots FROM and TO, with their content as of TO, as a checksummed stream')
    .option('-o, --output <file>', 'write the stream to this file ("-" for stdout)')
    .option('--apply-to <volume>', 'apply it to another volume of this daemon that equals FROM (it then equals TO)')
    .action(async (vol: string, from: string, to: string, opts, cmd: Command) => {
      if (!opts.output === !opts.applyTo) throw new DeltavolError('EINVAL_ARGUMENT', 'give exactly one of --output FILE and --apply-to VOLUME');
      const c = client(cmd);
      const stream = await c.download(`/v1/volumes/${encodeURIComponent(vol)}/differential?from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}`);
      if (opts.applyTo) {
        const r = await c.upload<{ records: number; bytesWritten: number; bytesZeroed: number; seconds: number }>(
          `/v1/volumes/${encodeURIComponent(opts.applyTo)}/differential`,
          stream,
        );
        process.stdout.write(`applied ${vol} ${from}→${to} to ${opts.applyTo}: ${r.records} runs, ${formatBytes(r.bytesWritten)} written, ${formatBytes(r.bytesZeroed)} zeroed, ${r.seconds.toFixed(2)} s\n`);
        return;
      }
      if (opts.output === '-' && process.stdout.isTTY) throw new DeltavolError('EINVAL_ARGUMENT', 'refusing to write a binary stream to a terminal; use --output FILE');
      const { Readable } = await import('node:stream');
      const { pipeline } = await import('node:stream/promises');
      const started = Date.now();
      let bytes = 0;
      const counted = Readable.fromWeb(stream as import('node:stream/web').ReadableStream).on('data', (b: Buffer) => (bytes += b.length));
      await pipeline(counted, opts.output === '-' ? process.stdout : fs.createWriteStream(opts.output));
      process.stderr.write(`differential ${vol} ${from}→${to}: ${formatBytes(bytes)} in ${((Date.now() - started) / 1000).toFixed(2)} s\n`);
    });

  snapshot
    .command('apply <volume>')
    .description('apply a differential stream (from `snapshot diff --output`) to a volume that equals its FROM snapshot; verified whole before anything is written')
    .requiredOption('-i, --input <file>', 'the stream ("-" for stdin)')
    .action(async (vol: string, opts, cmd: Command) => {
      const { Readable } = await import('node:stream');
      const input = opts.input === '-' ? process.stdin : fs.createReadStream(opts.input);
      const r = await client(cmd).upload<{ from: string; to: string; records: number; bytesWritten: number; bytesZeroed: number; seconds: number }>(
        `/v1/volumes/${encodeURIComponent(vol)}/differential`,
        Readable.toWeb(input) as ReadableStream<Uint8Array>,
      );
      process.stdout.write(`applied ${escapeText(r.from)}→${escapeText(r.to)} to ${vol}: ${r.records} runs, ${formatBytes(r.bytesWritten)} written, ${formatBytes(r.bytesZeroed)} zeroed, ${r.seconds.toFixed(2)} s\n`);
    });

  program
    .command('default-export [name]')
    .description('set the volume served for the empty export name (no name: unset)')
    .action(async (name: string | undefined, _opts, cmd: Command) => {
      const r = await client(cmd).request<{ defaultExport: string | null }>('POST', '/v1/default-export', { name: name ?? '' });
      process.stdout.write(`default export: ${r.defaultExport !== null ? escapeText(r.defaultExport) : '(none)'}\n`);
    });

  registerReplicationCommands(program, { client, print });
  registerRecoveryCommands(program, { client, print });

  program
    .command('status [volume]')
    .description('show the daemon (listeners, volumes, connections) and replication: role, pair state, sets, lag, rate; with VOLUME, only its replication')
    .option('--json', 'print JSON')
    .action(async (volume: string | undefined, opts, cmd: Command) => {
      if (volume !== undefined) {
        const r = await client(cmd).request<{ volumes: VolumeReplication[] }>('GET', `/v1/replication?volume=${encodeURIComponent(volume)}`);
        print(opts.json, r.volumes[0], () => renderReplication(r.volumes) + (r.volumes[0]!.role === 'simplex' ? `\n${volume}: simplex (not replicated)` : ''));
        return;
      }
      type Status = {
        daemon: { pid: number; version: string; nbdHost: string; nbdPort: number; socketPath: string | null; controlPort: number; replHost: string; replPort: number; nbdTls?: { mode: string; credentials: string | null; verifyPeer: boolean; authz: string[] }; replTls?: { mode: string; identity: string | null; insecure: boolean } };
        uptimeSeconds: number;
        defaultExport: string | null;
        connections: { export: string | null; inflight: number; requests: number }[];
        volumes: VolumeJson[];
      };
      const s = await client(cmd).request<Status>('GET', '/v1/status');
      const repl = await client(cmd).request<{ volumes: VolumeReplication[] }>('GET', '/v1/replication');
      print(opts.json, { ...s, replication: repl.volumes }, () => {
        const d = s.daemon;
        const lines = [
          `deltavol ${d.version}, pid ${d.pid}, up ${s.uptimeSeconds} s`,
          `NBD: nbd://${d.nbdHost}:${d.nbdPort}/${d.socketPath ? `  unix: ${d.socketPath}` : ''}   control: port ${d.controlPort}   replication: ${d.replHost}:${d.replPort}`,
          `NBD TLS: ${nbdTlsLine(d.nbdTls)}`,
          `replication security: ${!d.replTls ? 'unknown' : d.replTls.mode === 'none' ? (d.replTls.insecure ? 'NONE (--insecure: unauthenticated, unencrypted)' : 'none (loopback only)') : `TLS ${d.replTls.mode}, this node is ${d.replTls.identity}`}`,
          `default export: ${s.defaultExport ?? '(none)'}`,
          `connections: ${s.connections.length}`,
          '',
          s.volumes.length === 0
            ? 'no volumes'
            : table(
                ['VOLUME', 'SIZE', 'ALLOCATED', 'MODE', 'CONNS'],
                s.volumes.map((v) => [v.name, formatBytes(v.sizeBytes), formatBytes(v.allocatedBytes), v.readOnly ? 'ro' : 'rw', v.connections]),
              ),
          '',
          renderReplication(repl.volumes),
        ];
        return lines.join('\n');
      });
    });

  return program;
}

function nbdTlsLine(t: { mode: string; credentials: string | null; verifyPeer: boolean; authz: string[] } | undefined): string {
  if (!t || t.mode === 'off') return 'off';
  const who = t.credentials === 'psk' ? 'PSK' : t.verifyPeer ? `X.509, client certificates verified${t.authz.length ? `, allowed: ${t.authz.join('; ')}` : ''}` : 'X.509';
  return `${t.mode} (${who})`;
}

function exitCodeFor(e: unknown): number {
  if (isDeltavolError(e)) {
    switch (e.code) {
      case 'DAEMON_UNREACHABLE':
        return EXIT.unreachable;
      case 'VOLUME_NOT_FOUND':
      case 'SNAPSHOT_NOT_FOUND':
        return EXIT.notFound;
      case 'VOLUME_EXISTS':
      case 'VOLUME_BUSY':
      case 'SNAPSHOT_EXISTS':
      case 'SNAPSHOTS_MAX':
      case 'ROLE_CONFLICT':
      case 'STALE_GENERATION':
      case 'GEOMETRY':
      case 'PEER_REFUSED':
        return EXIT.conflict;
      case 'PEER_UNREACHABLE':
        return EXIT.peerUnreachable;
      case 'UNAUTHORIZED':
      case 'FORBIDDEN':
        return EXIT.denied;
      case 'BAD_SIZE':
      case 'BAD_NAME':
      case 'EINVAL_ARGUMENT':
        return EXIT.usage;
      default:
        return EXIT.failed;
    }
  }
  return EXIT.failed;
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return EXIT.ok;
  } catch (e) {
    if (e instanceof CommanderError) {
      // help and --version exit 0; usage errors were already printed by commander.
      return e.exitCode === 0 ? EXIT.ok : EXIT.usage;
    }
    process.stderr.write(`deltavol: ${escapeOutput(e instanceof Error ? e.message : String(e))}\n`);
    return exitCodeFor(e);
  }
}

// parseHostPort is re-exported for tests of the CLI's address handling.
export { parseHostPort };

function invokedDirectly(): boolean {
  try {
    return Boolean(process.argv[1]) && fs.realpathSync(process.argv[1]!) === fs.realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

if (invokedDirectly()) {
  // A running `serve` keeps the process alive through its listeners; a failed one may hold
  // half-open listeners, so a failure leaves at once. A command that never settles fails.
  exitWhenSettled(main(process.argv), EXIT.ok, EXIT.failed);
}
