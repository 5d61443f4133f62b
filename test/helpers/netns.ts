// Why: replication must survive real networks: a link that goes down, a partition that
// drops packets without any RST, a slow link. Two network namespaces joined by a veth
// pair give each deltavol daemon its own network stack on one machine, so a test can
// cut, slow or firewall the link between them with `ip`, `tc` and `iptables` and watch
// what the pair does. This builds that lab (root only), starts daemons inside it, gives
// the test process (which stays in the root namespace) a way in — the control API and
// the NBD export through Unix sockets, which are not namespaced — and always tears it
// all down: the processes it started, by pid, then the namespaces (which take the veth).

import { randomBytes } from 'node:crypto';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { CLI, type CliResult } from './daemon.js';

/** Whether this process may build network namespaces; `why` says what is missing. */
export function netnsSupport(): { ok: boolean; why: string } {
  if (typeof process.getuid !== 'function' || process.getuid() !== 0) return { ok: false, why: 'not running as root (network namespaces need CAP_SYS_ADMIN)' };
  const r = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8', timeout: 10_000 });
  if (r.error || r.status !== 0) return { ok: false, why: `\`ip netns list\` is unavailable: ${r.error?.message ?? r.stderr.trim()}` };
  return { ok: true, why: '' };
}

/** Runs a command with a time bound; throws with its output unless allowFail. */
export function sh(cmd: string, args: string[], opts: { timeoutMs?: number; allowFail?: boolean } = {}): CliResult {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: opts.timeoutMs ?? 30_000, maxBuffer: 16 * 1024 * 1024 });
  const res = { status: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
  if (!opts.allowFail && res.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} exited ${res.status} (signal ${r.signal ?? 'none'}): ${res.stdout}${res.stderr}${r.error ? ` ${r.error.message}` : ''}`);
  }
  return res;
}

// Every lab of this process, so an exit without afterAll (a killed worker) still removes them.
const liveLabs = new Set<NetLab>();
process.once('exit', () => {
  for (const lab of liveLabs) lab.disposeSync();
});

export type Side = 'a' | 'b' | 'c';
const SIDES: readonly Side[] = ['a', 'b', 'c'];

/**
 * Two namespaces, `a` and `b`, joined by a veth pair: a has 10.77.X.1/24, b has
 * 10.77.X.2/24, loopback up in both. With three (`sides: 3`, a cascade's sites), each of
 * a, b, c has a veth into a hub namespace whose bridge joins them (c: 10.77.X.3/24), so
 * any two can talk and setLink(side, false) cuts one site off. Names carry the pid and a
 * counter, so runs in parallel (or leftovers of a killed run) never collide.
 */
export class NetLab {
  private static counter = 0;
  readonly sides: readonly Side[];
  readonly ns: Record<Side, string>;
  readonly veth: Record<Side, string>;
  readonly addr: Record<Side, string>;
  /** Three sides: the hub namespace with the bridge, and each side's veth end there. */
  private readonly hub: string | null;
  private readonly hubVeth: Record<Side, string>;
  private readonly procs = new Set<ChildProcess>();
  private readonly cleanups: (() => void | Promise<void>)[] = [];
  private disposed = false;
  private psk: string | null = null;

  private constructor(
    readonly subnet: number,
    prefix: string,
    sideCount: 2 | 3,
  ) {
    const n = NetLab.counter++;
    const id = n === 0 ? `${process.pid}` : `${process.pid}-${n}`;
    this.sides = SIDES.slice(0, sideCount);
    this.ns = { a: `${prefix}a-${id}`, b: `${prefix}b-${id}`, c: `${prefix}c-${id}` };
    // Interface names are at most 15 bytes.
    const short = `${process.pid.toString(36)}${n.toString(36)}`.slice(-10);
    this.veth = { a: `dva${short}`, b: `dvb${short}`, c: `dvc${short}` };
    this.hubVeth = { a: `dha${short}`, b: `dhb${short}`, c: `dhc${short}` };
    this.hub = sideCount === 3 ? `${prefix}h-${id}` : null;
    this.addr = { a: `10.77.${subnet}.1`, b: `10.77.${subnet}.2`, c: `10.77.${subnet}.3` };
  }

  /** `prefix` starts the namespace names (tests running in parallel use their own); `sides`: 2 (a veth pair) or 3 (a bridge). */
  static create(opts: { prefix?: string; sides?: 2 | 3 } = {}): NetLab {
    const lab = new NetLab(1 + (process.pid % 250), opts.prefix ?? 'dv-', opts.sides ?? 2);
    liveLabs.add(lab);
    try {
      for (const s of lab.sides) sh('ip', ['netns', 'add', lab.ns[s]]);
      if (lab.hub === null) {
        sh('ip', ['link', 'add', lab.veth.a, 'netns', lab.ns.a, 'type', 'veth', 'peer', 'name', lab.veth.b, 'netns', lab.ns.b]);
      } else {
        sh('ip', ['netns', 'add', lab.hub]);
        sh('ip', ['-n', lab.hub, 'link', 'add', 'br0', 'type', 'bridge']);
        sh('ip', ['-n', lab.hub, 'link', 'set', 'br0', 'up']);
        for (const s of lab.sides) {
          sh('ip', ['link', 'add', lab.veth[s], 'netns', lab.ns[s], 'type', 'veth', 'peer', 'name', lab.hubVeth[s], 'netns', lab.hub]);
          sh('ip', ['-n', lab.hub, 'link', 'set', lab.hubVeth[s], 'master', 'br0']);
          sh('ip', ['-n', lab.hub, 'link', 'set', lab.hubVeth[s], 'up']);
        }
      }
      for (const s of lab.sides) {
        lab.ip(s, ['link', 'set', 'lo', 'up']);
        lab.ip(s, ['addr', 'add', `${lab.addr[s]}/24`, 'dev', lab.veth[s]]);
        lab.ip(s, ['link', 'set', lab.veth[s], 'up']);
      }
    } catch (e) {
      lab.disposeSync();
      throw e;
    }
    return lab;
  }

  /** `ip ARGS` inside namespace `side`. */
  ip(side: Side, args: string[], opts: { allowFail?: boolean } = {}): CliResult {
    return sh('ip', ['-n', this.ns[side], ...args], opts);
  }

  /** Any command inside namespace `side` (tc, iptables, the CLI). */
  exec(side: Side, cmd: string, args: string[], opts: { timeoutMs?: number; allowFail?: boolean } = {}): CliResult {
    return sh('ip', ['netns', 'exec', this.ns[side], cmd, ...args], opts);
  }

  /** Starts a long-running process inside namespace `side`; it is killed by dispose. */
  spawn(side: Side, cmd: string, args: string[], opts: { logFile?: string; env?: NodeJS.ProcessEnv } = {}): ChildProcess {
    let out: number | 'ignore' = 'ignore';
    if (opts.logFile) out = fs.openSync(opts.logFile, 'a');
    // `ip netns exec` enters the namespace and execs the command: the pid is the command's.
    const p = spawn('ip', ['netns', 'exec', this.ns[side], cmd, ...args], { stdio: ['ignore', out, out], env: opts.env ?? process.env });
    if (typeof out === 'number') fs.closeSync(out);
    this.procs.add(p);
    p.once('exit', () => this.procs.delete(p));
    return p;
  }

  /**
   * The lab's replication keys (psktool format, identities node-a and node-b), made on
   * first use in a 0700 temp directory removed at dispose. Daemons of the lab replicate
   * over TLS-PSK with it: replication on 0.0.0.0 needs credentials (or --insecure).
   */
  pskFile(): string {
    if (this.psk) return this.psk;
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'deltavol-netns-psk-'));
    const file = path.join(dir, 'repl.psk');
    fs.writeFileSync(file, this.sides.map((x) => `node-${x}:${randomBytes(32).toString('hex')}\n`).join(''), { mode: 0o600 });
    this.onDispose(() => fs.rmSync(dir, { recursive: true, force: true }));
    this.psk = file;
    return file;
  }

  /** Runs at dispose, before the namespaces go (latest first). */
  onDispose(fn: () => void | Promise<void>): void {
    this.cleanups.push(fn);
  }

  /** Link state of `side`'s end of the veth: ip link set dev VETH up|down. */
  setLink(side: Side, up: boolean): void {
    this.ip(side, ['link', 'set', 'dev', this.veth[side], up ? 'up' : 'down']);
    if (up) {
      // IPv4 addresses survive a down/up on a veth; put them back if something took them.
      for (const s of this.sides) this.ip(s, ['addr', 'replace', `${this.addr[s]}/24`, 'dev', this.veth[s]]);
    }
  }

  async dispose(): Promise<void> {
    if (this.disposed) return;
    for (const fn of this.cleanups.splice(0).reverse()) {
      try {
        await fn();
      } catch {
        // Best effort: the namespaces must go whatever happened.
      }
    }
    const waits = [...this.procs].map((p) => new Promise<void>((r) => (p.exitCode !== null || p.signalCode !== null ? r() : p.once('exit', () => r()))));
    for (const p of this.procs) p.kill('SIGKILL');
    await Promise.race([Promise.all(waits), new Promise((r) => setTimeout(r, 5000))]);
    this.disposeSync();
  }

  /** Kills what is left in the namespaces (only ours: they are ours) and deletes them. */
  disposeSync(): void {
    if (this.disposed) return;
    this.disposed = true;
    liveLabs.delete(this);
    for (const p of this.procs) {
      try {
        p.kill('SIGKILL');
      } catch {
        // already gone
      }
    }
    for (const s of this.sides) {
      const pids = spawnSync('ip', ['netns', 'pids', this.ns[s]], { encoding: 'utf8', timeout: 5000 }).stdout ?? '';
      for (const pid of pids.split(/\s+/).filter(Boolean)) {
        try {
          process.kill(Number(pid), 'SIGKILL');
        } catch {
          // already gone
        }
      }
    }
    for (const s of this.sides) spawnSync('ip', ['netns', 'del', this.ns[s]], { timeout: 10_000 });
    if (this.hub !== null) spawnSync('ip', ['netns', 'del', this.hub], { timeout: 10_000 });
  }
}

export interface NsDaemonOptions {
  /** Fixed ports are fine: every namespace has its own. */
  nbdPort?: number;
  controlPort?: number;
  replPort?: number;
  logLevel?: string;
  extraArgs?: string[];
  /** Put the data directory on tmpfs (/dev/shm). */
  tmpfs?: boolean;
  /** Start on this data directory (a restart after a crash) instead of a fresh one. */
  dataDir?: string;
  /**
   * How replication is protected: 'psk' (default: the lab's key file, identity node-SIDE),
   * X.509 files, 'insecure' (plain TCP, --insecure), or 'none' (no flag: the daemon must refuse to start).
   */
  replSecurity?: 'psk' | 'insecure' | 'none' | { certFile: string; keyFile: string; caFile: string };
}

/** The serve flags for `replSecurity`. */
export function replSecurityArgs(lab: NetLab, side: Side, s: NsDaemonOptions['replSecurity'] = 'psk'): string[] {
  if (s === 'psk') return ['--repl-tls-psk', lab.pskFile(), '--repl-tls-psk-identity', `node-${side}`];
  if (s === 'insecure') return ['--insecure'];
  if (s === 'none') return [];
  return ['--repl-tls-cert', s.certFile, '--repl-tls-key', s.keyFile, '--repl-tls-ca', s.caFile];
}

/**
 * A deltavol daemon inside one namespace of a lab. It listens for NBD on its namespace
 * address and on a Unix socket; its control API on the namespace's loopback, reached
 * from the root namespace through a small forwarder (Unix socket → 127.0.0.1:PORT)
 * running inside the namespace. The CLI runs inside the namespace, as an operator there would.
 */
export class NsDaemon {
  private nbdBridge: net.Server | null = null;

  private constructor(
    readonly lab: NetLab,
    readonly side: Side,
    readonly proc: ChildProcess,
    readonly dataDir: string,
    readonly logFile: string,
    readonly controlPort: number,
    readonly replPort: number,
    readonly nbdSocket: string,
    readonly controlSocket: string,
  ) {}

  static async start(lab: NetLab, side: Side, opts: NsDaemonOptions = {}): Promise<NsDaemon> {
    if (!fs.existsSync(CLI)) throw new Error(`${CLI} is missing: run \`npm run build\` first`);
    const base = opts.tmpfs ? '/dev/shm' : os.tmpdir();
    const fresh = opts.dataDir === undefined;
    const dataDir = opts.dataDir ?? fs.mkdtempSync(path.join(base, `deltavol-netns-${side}-`));
    fs.rmSync(path.join(dataDir, 'daemon.json'), { force: true });
    const logFile = path.join(os.tmpdir(), `deltavol-netns-${process.pid}-${side}-${Date.now()}.log`);
    const nbdSocket = path.join(dataDir, 'nbd.sock');
    const controlSocket = path.join(dataDir, 'control.sock');
    const controlPort = opts.controlPort ?? 10810;
    const replPort = opts.replPort ?? 10811;
    if (fresh) {
      lab.onDispose(() => {
        fs.rmSync(dataDir, { recursive: true, force: true });
      });
    }
    fs.rmSync(controlSocket, { force: true });
    const proc = lab.spawn(
      side,
      process.execPath,
      [
        CLI,
        'serve',
        '--data-dir',
        dataDir,
        '--bind',
        lab.addr[side],
        '--port',
        String(opts.nbdPort ?? 10809),
        '--socket',
        nbdSocket,
        '--control-bind',
        '127.0.0.1',
        '--control-port',
        String(controlPort),
        '--repl-bind',
        '0.0.0.0',
        '--repl-port',
        String(replPort),
        '--log-level',
        opts.logLevel ?? 'info',
        ...replSecurityArgs(lab, side, opts.replSecurity),
        ...(opts.extraArgs ?? []),
      ],
      { logFile },
    );
    const d = new NsDaemon(lab, side, proc, dataDir, logFile, controlPort, replPort, nbdSocket, controlSocket);
    lab.onDispose(() => d.close());
    await d.waitFile(path.join(dataDir, 'daemon.json'), 'the daemon to start');
    // The control forwarder: inside the namespace, from a Unix socket to the control port.
    const forward = `
      const net = require('node:net');
      const { SOCK, PORT } = process.env;
      net.createServer((c) => {
        const u = net.connect(Number(PORT), '127.0.0.1');
        c.on('error', () => u.destroy());
        u.on('error', () => c.destroy());
        c.pipe(u).pipe(c);
      }).listen(SOCK);`;
    lab.spawn(side, process.execPath, ['-e', forward], { env: { ...process.env, SOCK: controlSocket, PORT: String(controlPort) } });
    await d.waitFile(controlSocket, 'the control forwarder to listen');
    return d;
  }

  private async waitFile(file: string, what: string): Promise<void> {
    const deadline = Date.now() + 15_000;
    while (!fs.existsSync(file)) {
      if (this.exited) throw new Error(`daemon in ${this.lab.ns[this.side]} exited (${this.proc.exitCode ?? this.proc.signalCode}) before ${what}:\n${this.log()}`);
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} in ${this.lab.ns[this.side]}:\n${this.log()}`);
      await new Promise((r) => setTimeout(r, 25));
    }
  }

  get exited(): boolean {
    return this.proc.exitCode !== null || this.proc.signalCode !== null;
  }

  /** kill -9 (a crash: nothing is flushed or closed). */
  async kill(): Promise<void> {
    if (this.exited) return;
    const done = new Promise<void>((r) => this.proc.once('exit', () => r()));
    this.proc.kill('SIGKILL');
    await done;
    if (this.nbdBridge) {
      this.nbdBridge.close();
      this.nbdBridge = null;
    }
  }

  /** The control API as JSON, from the root namespace. */
  api<T>(method: string, urlPath: string, body?: unknown, timeoutMs = 10_000): Promise<T> {
    return new Promise((resolve, reject) => {
      const payload = body === undefined ? undefined : JSON.stringify(body);
      const req = http.request(
        {
          socketPath: this.controlSocket,
          path: urlPath,
          method,
          // The forwarder leads to 127.0.0.1:PORT inside the namespace: that is the Host the daemon accepts.
          headers: {
            host: `127.0.0.1:${this.controlPort}`,
            authorization: `Bearer ${this.token}`,
            ...(payload ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } : {}),
          },
          timeout: timeoutMs,
        },
        (res) => {
          let text = '';
          res.setEncoding('utf8');
          res.on('data', (c: string) => (text += c));
          res.on('end', () => {
            if ((res.statusCode ?? 0) >= 400) reject(new Error(`${method} ${urlPath}: ${res.statusCode} ${text}`));
            else {
              try {
                resolve(JSON.parse(text) as T);
              } catch (e) {
                reject(new Error(`${method} ${urlPath}: bad JSON ${(e as Error).message}: ${text.slice(0, 200)}`));
              }
            }
          });
        },
      );
      req.on('timeout', () => req.destroy(new Error(`${method} ${urlPath}: no answer in ${timeoutMs} ms`)));
      req.on('error', reject);
      req.end(payload);
    });
  }

  /** The control API's bearer token (DATA_DIR/control.token). */
  get token(): string {
    return fs.readFileSync(path.join(this.dataDir, 'control.token'), 'utf8').trim();
  }

  /**
   * The CLI, run inside the namespace against this daemon's control port. Both namespaces'
   * daemons use the same port, so the per-port token copy in /run/deltavol (one file system)
   * belongs to whichever started last: the token comes from the data directory instead.
   */
  cli(args: string[], timeoutMs = 60_000): CliResult {
    return this.lab.exec(this.side, process.execPath, [CLI, '--control', `127.0.0.1:${this.controlPort}`, '--token-file', path.join(this.dataDir, 'control.token'), ...args], { allowFail: true, timeoutMs });
  }

  /** A TCP port on 127.0.0.1 in the root namespace that leads to this daemon's NBD socket. */
  async nbdPort(): Promise<number> {
    if (!this.nbdBridge) {
      const server = net.createServer((c) => {
        const u = net.connect(this.nbdSocket);
        c.on('error', () => u.destroy());
        u.on('error', () => c.destroy());
        c.pipe(u).pipe(c);
      });
      await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
      this.nbdBridge = server;
    }
    return (this.nbdBridge.address() as net.AddressInfo).port;
  }

  volumePath(name: string): string {
    return path.join(this.dataDir, 'volumes', name, 'data.img');
  }

  log(): string {
    try {
      return fs.readFileSync(this.logFile, 'utf8');
    } catch {
      return '';
    }
  }

  /** The last lines of the log (for failure messages). */
  logTail(lines = 40): string {
    return this.log().trimEnd().split('\n').slice(-lines).join('\n');
  }

  /** Stops the daemon (SIGTERM, then SIGKILL after timeoutMs); removes its log unless keepLog. */
  async close(timeoutMs = 10_000, keepLog = process.env.DELTAVOL_KEEP_LOGS === '1'): Promise<void> {
    if (this.nbdBridge) {
      this.nbdBridge.close();
      this.nbdBridge = null;
    }
    if (!this.exited) {
      const done = new Promise<void>((r) => this.proc.once('exit', () => r()));
      this.proc.kill('SIGTERM');
      const t = setTimeout(() => this.proc.kill('SIGKILL'), timeoutMs);
      await done;
      clearTimeout(t);
    }
    if (!keepLog) fs.rmSync(this.logFile, { force: true });
  }
}
