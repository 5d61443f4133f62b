// Why: the control API can delete volumes, so only the daemon's owner may drive it. Its
// proof is a bearer token: 32 random bytes made at first start into DATA_DIR/control.token
// (0600, reused on every restart), plus a per-port copy in a runtime directory only the
// daemon's user can enter, so `deltavol --control 127.0.0.1:PORT ...` finds it without
// being told the data directory. The CLI reads the same places through this file; nothing
// here trusts a directory or file that belongs to another user.

import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { DeltavolError } from '../util/errors.js';
import { controlTokenBytes } from '../util/limits.js';

export const CONTROL_TOKEN_FILE = 'control.token';
/** A token is base64url text of at least controlTokenBytes random bytes. */
const TOKEN_PATTERN = new RegExp(`^[A-Za-z0-9_-]{${Math.ceil((controlTokenBytes * 4) / 3)},512}$`);

export function generateToken(): string {
  return crypto.randomBytes(controlTokenBytes).toString('base64url');
}

export function isWellFormedToken(text: string): boolean {
  return TOKEN_PATTERN.test(text);
}

/** Constant-time comparison: both sides are hashed first so neither length nor content leaks through timing. */
export function tokensEqual(given: string, expected: string): boolean {
  const a = crypto.createHash('sha256').update(given).digest();
  const b = crypto.createHash('sha256').update(expected).digest();
  return crypto.timingSafeEqual(a, b);
}

const myUid = (): number => (typeof process.getuid === 'function' ? process.getuid() : -1);

/**
 * DATA_DIR/control.token: read it if it exists (it must be ours; group/other bits are
 * removed), otherwise create it with O_EXCL and mode 0600.
 */
export function loadOrCreateToken(dataDir: string, warn: (msg: string) => void): string {
  const file = path.join(dataDir, CONTROL_TOKEN_FILE);
  let st: fs.Stats | null = null;
  try {
    st = fs.lstatSync(file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw new DeltavolError('DATA_DIR', `cannot read ${file}: ${(e as Error).message}`);
  }
  if (st) {
    if (!st.isFile()) throw new DeltavolError('DATA_DIR', `${file} is not a regular file; remove it and a new token is made at start`);
    if (myUid() >= 0 && st.uid !== myUid()) throw new DeltavolError('DATA_DIR', `${file} belongs to uid ${st.uid}, not to this daemon's user; remove it and a new token is made at start`);
    if ((st.mode & 0o077) !== 0) {
      fs.chmodSync(file, 0o600);
      warn(`${file} was readable by others (mode ${(st.mode & 0o777).toString(8)}): now 0600; consider removing it to make a new token`);
    }
    const token = fs.readFileSync(file, 'utf8').trim();
    if (!isWellFormedToken(token)) throw new DeltavolError('DATA_DIR', `${file} does not hold a valid token; remove it and a new token is made at start`);
    return token;
  }
  const token = generateToken();
  const tmp = path.join(dataDir, `.${CONTROL_TOKEN_FILE}.${process.pid}.tmp`);
  fs.rmSync(tmp, { force: true });
  const fd = fs.openSync(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
  try {
    fs.writeFileSync(fd, token + '\n');
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  // link() fails if another process made one meanwhile: then theirs wins and is read back.
  try {
    fs.linkSync(tmp, file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
  } finally {
    fs.rmSync(tmp, { force: true });
  }
  return loadOrCreateToken(dataDir, warn);
}

/** Whether a directory is ours alone: a real directory (no symlink), owned by us, no group/other bits. */
function privateDir(dir: string): boolean {
  try {
    const st = fs.lstatSync(dir);
    return st.isDirectory() && (myUid() < 0 || st.uid === myUid()) && (st.mode & 0o077) === 0;
  } catch {
    return false;
  }
}

/**
 * The runtime directory for per-port token copies: /run/deltavol for root,
 * $XDG_RUNTIME_DIR/deltavol for others (if that is private to them), else TMPDIR/deltavol-UID.
 */
export function runtimeDir(): string {
  const uid = myUid();
  if (uid === 0) return '/run/deltavol';
  const xdg = process.env.XDG_RUNTIME_DIR;
  if (xdg && path.isAbsolute(xdg) && privateDir(xdg)) return path.join(xdg, 'deltavol');
  return path.join(os.tmpdir(), `deltavol-${uid}`);
}

export function runtimeTokenPath(port: number): string {
  return path.join(runtimeDir(), `control-${port}.token`);
}

/**
 * Writes the per-port copy. Returns its path, or null (with a warning) when the runtime
 * directory cannot be made private: then the CLI needs --data-dir or --token-file.
 */
export function writeRuntimeToken(port: number, token: string, warn: (msg: string) => void): string | null {
  const dir = runtimeDir();
  try {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    // Our own directory with loose bits (made by hand, or by a umask): tighten it. A symlink or
    // a directory of someone else is never touched.
    const st = fs.lstatSync(dir);
    if (st.isDirectory() && (myUid() < 0 || st.uid === myUid()) && (st.mode & 0o077) !== 0) fs.chmodSync(dir, 0o700);
    if (!privateDir(dir)) {
      warn(`runtime directory ${dir} is not a private directory of this user: no token copy written there (the CLI needs --data-dir or --token-file)`);
      return null;
    }
    const file = runtimeTokenPath(port);
    const tmp = path.join(dir, `.control-${port}.${process.pid}.tmp`);
    fs.rmSync(tmp, { force: true });
    const fd = fs.openSync(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
    try {
      fs.writeFileSync(fd, token + '\n');
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
    return file;
  } catch (e) {
    warn(`cannot write the control token copy in ${dir}: ${(e as Error).message} (the CLI needs --data-dir or --token-file)`);
    return null;
  }
}

/** Removes the per-port copy if it still holds this daemon's token (another daemon may have taken the port since). */
export function removeRuntimeToken(file: string, token: string): void {
  try {
    if (fs.readFileSync(file, 'utf8').trim() === token) fs.rmSync(file, { force: true });
  } catch {
    // already gone
  }
}

export type TokenLookup = { token: string; source: string } | { token: null; tried: string[] };

function readTokenFile(file: string, mustBeOurs: boolean): string {
  const st = fs.statSync(file);
  if (mustBeOurs && myUid() >= 0 && st.uid !== myUid()) throw new Error(`owned by uid ${st.uid}, not by you`);
  const token = fs.readFileSync(file, 'utf8').trim();
  if (!isWellFormedToken(token)) throw new Error('does not hold a valid token');
  return token;
}

/**
 * The CLI's search, first match wins: --token-file, DELTAVOL_TOKEN, DELTAVOL_TOKEN_FILE,
 * DATA_DIR/control.token, then the runtime copy for the port (only from a private
 * directory of this user). An explicit file that cannot be read is an error at once.
 */
export function findToken(opts: { tokenFile?: string; dataDir?: string; port: number; env?: NodeJS.ProcessEnv }): TokenLookup {
  const env = opts.env ?? process.env;
  const explicit = (file: string, what: string): TokenLookup => {
    try {
      return { token: readTokenFile(file, false), source: file };
    } catch (e) {
      throw new DeltavolError('UNAUTHORIZED', `cannot use the control token in ${file} (${what}): ${(e as Error).message}`);
    }
  };
  if (opts.tokenFile) return explicit(opts.tokenFile, '--token-file');
  if (env.DELTAVOL_TOKEN) {
    const t = env.DELTAVOL_TOKEN.trim();
    if (!isWellFormedToken(t)) throw new DeltavolError('UNAUTHORIZED', 'DELTAVOL_TOKEN does not hold a valid token (the content of the daemon\'s DATA_DIR/control.token)');
    return { token: t, source: 'DELTAVOL_TOKEN' };
  }
  if (env.DELTAVOL_TOKEN_FILE) return explicit(env.DELTAVOL_TOKEN_FILE, 'DELTAVOL_TOKEN_FILE');
  const tried: string[] = [];
  if (opts.dataDir) {
    const file = path.join(opts.dataDir, CONTROL_TOKEN_FILE);
    try {
      return { token: readTokenFile(file, false), source: file };
    } catch (e) {
      tried.push(`${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
    }
  }
  const file = runtimeTokenPath(opts.port);
  if (privateDir(path.dirname(file))) {
    try {
      return { token: readTokenFile(file, true), source: file };
    } catch (e) {
      tried.push(`${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
    }
  } else {
    tried.push(`${file}: ${fs.existsSync(path.dirname(file)) ? 'directory not private to you' : 'ENOENT'}`);
  }
  return { token: null, tried };
}
