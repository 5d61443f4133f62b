// Why: nbdsh (libnbd's Python shell) is the client that can send every NBD command and
// flag, and, with strict mode off, the requests a server must refuse. Tests hand it a
// Python script; the script reports what it saw with out(value), and the test asserts
// on those values, so a failure shows the server's actual answer.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';

/** nbdsh runs `python3 -m nbd`: the system Python has the module, a pyenv one may not. */
export const NBDSH_ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}`, PYTHONUNBUFFERED: '1' };

/** Helpers every script gets. */
const PRELUDE = String.raw`
import nbd, errno, json, os, sys, hashlib, random, time

def out(value):
    print('@@OUT ' + json.dumps(value), flush=True)

def err_of(fn):
    """The errno of the nbd.Error fn raises, or 0 when it succeeds."""
    try:
        fn()
    except nbd.Error as e:
        return e.errnum if e.errnum is not None else -1
    return 0

def connect(uri, meta=True, strict=None, structured=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context('base:allocation')
    if not structured:
        h.set_request_structured_replies(False)
    h.connect_uri(uri)
    if strict is not None:
        h.set_strict_mode(strict)
    return h

def pattern(seed, n):
    """n deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)

def sha(b):
    return hashlib.sha256(b).hexdigest()

def extents(h, length, offset, flags=0):
    """base:allocation extents as [[offset, length, flags], ...]."""
    got = []
    def cb(ctx, off, ents, err):
        if ctx == 'base:allocation':
            pos = off
            for i in range(0, len(ents), 2):
                got.append([pos, ents[i], ents[i + 1]])
                pos += ents[i]
        return 0
    h.block_status(length, offset, cb, flags)
    return got
`;

function dedent(s: string): string {
  const lines = s.replace(/^\n/, '').split('\n');
  const indents = lines.filter((l) => l.trim()).map((l) => /^ */.exec(l)![0].length);
  const n = indents.length ? Math.min(...indents) : 0;
  return lines.map((l) => l.slice(n)).join('\n');
}

export interface NbdshResult {
  status: number;
  stdout: string;
  stderr: string;
  /** Values passed to out(), in order. */
  out: unknown[];
}

function parseOut(stdout: string): unknown[] {
  return stdout
    .split('\n')
    .filter((l) => l.startsWith('@@OUT '))
    .map((l) => JSON.parse(l.slice(6)) as unknown);
}

export interface NbdshOptions {
  timeoutMs?: number;
  allowFail?: boolean;
  /** More Python definitions, run after the prelude and before the script. */
  lib?: string;
}

function source(script: string, lib?: string): string {
  return [PRELUDE, lib ? dedent(lib) : '', dedent(script)].join('\n');
}

/** Runs a Python script under nbdsh (no implicit handle). Throws with its output unless it exits 0 (or allowFail). */
export function nbdsh(script: string, opts: NbdshOptions = {}): NbdshResult {
  const r = spawnSync('nbdsh', ['-n', '-c', '-'], {
    input: source(script, opts.lib),
    encoding: 'utf8',
    env: NBDSH_ENV,
    timeout: opts.timeoutMs ?? 30_000,
    maxBuffer: 64 * 1024 * 1024,
  });
  if (r.error && (r.error as NodeJS.ErrnoException).code === 'ENOENT') {
    throw new Error('nbdsh is not installed (Debian package python3-libnbd): run scripts/install-test-deps.sh');
  }
  const res = { status: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? '', out: parseOut(r.stdout ?? '') };
  if (!opts.allowFail && res.status !== 0) {
    throw new Error(`nbdsh exited ${res.status} (signal ${r.signal ?? 'none'}):\n${res.stdout}\n${res.stderr}`);
  }
  return res;
}

/** The single value a script passed to out(). */
export function nbdshOut<T = unknown>(script: string, opts: Omit<NbdshOptions, 'allowFail'> = {}): T {
  const r = nbdsh(script, opts);
  if (r.out.length !== 1) throw new Error(`expected one out() value, got ${r.out.length}:\n${r.stdout}\n${r.stderr}`);
  return r.out[0] as T;
}

/** Starts an nbdsh script in the background; lines it prints are collected as they come. */
export function nbdshBackground(script: string, lib?: string): { proc: ChildProcess; lines: string[]; exited: Promise<number | null> } {
  const proc = spawn('nbdsh', ['-n', '-c', '-'], { env: NBDSH_ENV, stdio: ['pipe', 'pipe', 'pipe'] });
  const lines: string[] = [];
  let partial = '';
  proc.stdout!.setEncoding('utf8');
  proc.stdout!.on('data', (s: string) => {
    partial += s;
    const parts = partial.split('\n');
    partial = parts.pop()!;
    lines.push(...parts);
  });
  proc.stderr!.resume();
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  proc.stdin!.end(source(script, lib));
  return { proc, lines, exited };
}
