// Why: interop and fuzz tests need a real deltavol daemon, started as users start it
// (the built CLI in a child process), on free ports and a fresh data directory, and
// always cleaned up. This starts one and gives tests its addresses and a CLI runner.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const CLI = path.join(ROOT, 'dist/cli/main.js');

export interface VolumeSpec {
  name: string;
  size: string;
  readOnly?: boolean;
  description?: string;
}

export interface StartOptions {
  volumes?: VolumeSpec[];
  extraArgs?: string[];
  /** Put the data directory on tmpfs (/dev/shm) instead of the disk. */
  tmpfs?: boolean;
  dataDir?: string;
  logLevel?: string;
}

export interface CliResult {
  status: number;
  stdout: string;
  stderr: string;
}

export class TestDaemon {
  constructor(
    readonly proc: ChildProcess,
    readonly dataDir: string,
    readonly nbdPort: number,
    readonly controlPort: number,
    readonly logFile: string,
    private readonly ownsDir: boolean,
    /** Replication port (peers connect here). */
    readonly replPort: number,
  ) {}

  /** The control API's bearer token (DATA_DIR/control.token, made by the daemon at its first start). */
  get token(): string {
    return fs.readFileSync(path.join(this.dataDir, 'control.token'), 'utf8').trim();
  }

  /** A raw request to the control API with the token (tests of other routes, /metrics). */
  fetch(urlPath: string, init: RequestInit = {}): Promise<Response> {
    return fetch(`http://127.0.0.1:${this.controlPort}${urlPath}`, {
      signal: AbortSignal.timeout(60_000),
      ...init,
      headers: { authorization: `Bearer ${this.token}`, ...(init.headers as Record<string, string> | undefined) },
    });
  }

  /** The Prometheus text of /metrics. */
  async metrics(): Promise<string> {
    const res = await this.fetch('/metrics');
    if (!res.ok) throw new Error(`GET /metrics: ${res.status} ${await res.text()}`);
    return res.text();
  }

  /** The control API, as JSON (tests poll replication status with it). */
  async api<T>(method: string, urlPath: string, body?: unknown): Promise<T> {
    const send = () =>
      this.fetch(urlPath, {
        method,
        headers: body === undefined ? {} : { 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    // A GET may meet a kept-alive connection the server closed at that instant (a loaded
    // machine widens the race): ask again once.
    const res = await send().catch((e: Error) => (method === 'GET' ? send() : Promise.reject(e)));
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${urlPath}: ${res.status} ${text}`);
    return JSON.parse(text) as T;
  }

  uri(exportName = ''): string {
    return `nbd://127.0.0.1:${this.nbdPort}/${exportName}`;
  }

  volumePath(name: string): string {
    return path.join(this.dataDir, 'volumes', name, 'data.img');
  }

  /**
   * How the CLI reaches this daemon: its port and its own token (DATA_DIR/control.token). Not
   * the per-port token copy: a command started just before a kill may connect after another
   * daemon took the port, and with that daemon's copy it would act there (kill9 saw a snapshot
   * "created" on another test's daemon).
   */
  controlArgs(): string[] {
    return ['--control', `127.0.0.1:${this.controlPort}`, '--token-file', path.join(this.dataDir, 'control.token')];
  }

  cli(args: string[]): CliResult {
    const r = spawnSync(process.execPath, [CLI, ...this.controlArgs(), ...args], {
      encoding: 'utf8',
      timeout: 60_000,
    });
    return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
  }

  /**
   * The CLI without blocking this process (spawnSync stops the test's event loop: a writer
   * running in the test would stall for the CLI's whole run and measure that as a pause).
   */
  cliAsync(args: string[], timeoutMs = 60_000): Promise<CliResult> {
    return new Promise((resolve) => {
      const child = spawn(process.execPath, [CLI, ...this.controlArgs(), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout!.on('data', (d: Buffer) => (stdout += d.toString('utf8')));
      child.stderr!.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
      const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
      child.on('close', (code) => {
        clearTimeout(timer);
        resolve({ status: code ?? -1, stdout, stderr });
      });
    });
  }

  get exited(): boolean {
    return this.proc.exitCode !== null || this.proc.signalCode !== null;
  }

  /** SIGTERM and wait for a clean exit; returns the exit code. */
  async stop(timeoutMs = 20_000): Promise<number | null> {
    if (this.exited) return this.proc.exitCode;
    const done = new Promise<number | null>((r) => this.proc.once('exit', (code) => r(code)));
    this.proc.kill('SIGTERM');
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), timeoutMs);
    const code = await done;
    clearTimeout(timer);
    return code;
  }

  async kill(): Promise<void> {
    if (this.exited) return;
    const done = new Promise<void>((r) => this.proc.once('exit', () => r()));
    this.proc.kill('SIGKILL');
    await done;
  }

  /** Stops the daemon and removes its data directory (if this helper made it). */
  async dispose(): Promise<void> {
    await this.stop();
    if (this.ownsDir) fs.rmSync(this.dataDir, { recursive: true, force: true });
    fs.rmSync(this.logFile, { force: true });
  }

  log(): string {
    try {
      return fs.readFileSync(this.logFile, 'utf8');
    } catch {
      return '';
    }
  }
}

export async function startDaemon(options: StartOptions = {}): Promise<TestDaemon> {
  if (!fs.existsSync(CLI)) throw new Error(`${CLI} is missing: run \`npm run build\` first`);
  const base = options.tmpfs ? '/dev/shm' : os.tmpdir();
  const ownsDir = !options.dataDir;
  const dataDir = options.dataDir ?? fs.mkdtempSync(path.join(base, 'deltavol-test-'));
  fs.rmSync(path.join(dataDir, 'daemon.json'), { force: true });
  const logFile = path.join(os.tmpdir(), `deltavol-test-${process.pid}-${Date.now()}-${Math.random().toString(36).slice(2)}.log`);
  const out = fs.openSync(logFile, 'a');
  const proc = spawn(
    process.execPath,
    [CLI, 'serve', '--data-dir', dataDir, '--port', '0', '--control-port', '0', '--repl-port', '0', '--log-level', options.logLevel ?? 'info', ...(options.extraArgs ?? [])],
    { stdio: ['ignore', out, out] },
  );
  fs.closeSync(out);
  const infoPath = path.join(dataDir, 'daemon.json');
  const deadline = Date.now() + 15_000;
  while (!fs.existsSync(infoPath)) {
    if (proc.exitCode !== null) throw new Error(`daemon exited with ${proc.exitCode}:\n${fs.readFileSync(logFile, 'utf8')}`);
    if (Date.now() > deadline) {
      proc.kill('SIGKILL');
      throw new Error(`daemon did not start within 15 s:\n${fs.readFileSync(logFile, 'utf8')}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  const info = JSON.parse(fs.readFileSync(infoPath, 'utf8')) as { nbdPort: number; controlPort: number; replPort: number };
  const d = new TestDaemon(proc, dataDir, info.nbdPort, info.controlPort, logFile, ownsDir, info.replPort);
  for (const v of options.volumes ?? []) {
    const args = ['volume', 'create', v.name, '--size', v.size];
    if (v.readOnly) args.push('--read-only');
    if (v.description) args.push('--description', v.description);
    const r = d.cli(args);
    if (r.status !== 0) throw new Error(`volume create ${v.name} failed: ${r.stderr}`);
  }
  return d;
}

/** Runs a command with a time bound; returns its output (throws with output on failure). */
export function run(cmd: string, args: string[], opts: { timeoutMs?: number; input?: string; allowFail?: boolean } = {}): CliResult {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: opts.timeoutMs ?? 120_000, input: opts.input, maxBuffer: 64 * 1024 * 1024 });
  const res = { status: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
  if (!opts.allowFail && res.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} exited ${res.status} (signal ${r.signal ?? 'none'}):\n${res.stdout}\n${res.stderr}`);
  }
  return res;
}

/** Whether a program is installed (tests that need it fail loudly when it is not: CI installs it). */
export function have(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}

/** A free TCP port on 127.0.0.1 (for daemons that must keep a port across restarts). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}
