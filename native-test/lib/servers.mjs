// The NBD servers the kernel tests point the guest at: the deltavol daemon (the
// default, what the suite exists to test) and, behind
// DELTAVOL_KERNEL_TEST_SERVER=nbdkit, an nbdkit stand-in used to debug the guest
// and the harness without deltavol. Both offer the same small interface: start,
// create volumes, put a file system image on a read-only volume, restart, stop.
// The failover case (lib/failover.mjs) runs two more deltavol daemons through the
// same class, each with its own log file and data directory, and kills one with -9.
import { spawn, execFile } from 'node:child_process'
import { createWriteStream, readFileSync } from 'node:fs'
import { copyFile, mkdir, truncate, writeFile } from 'node:fs/promises'
import net from 'node:net'
import path from 'node:path'
import { promisify } from 'node:util'

const execFileP = promisify(execFile)

/** A TCP port that was free a moment ago on 127.0.0.1. */
export async function freePort() {
  const srv = net.createServer()
  await new Promise((resolve, reject) => {
    srv.once('error', reject)
    srv.listen(0, '127.0.0.1', resolve)
  })
  const { port } = /** @type {net.AddressInfo} */ (srv.address())
  await new Promise(resolve => srv.close(resolve))
  return port
}

/** Run a command to completion, bounded in time; throws with its output on failure. */
export async function run(cmd, args, { timeoutMs = 60_000, cwd } = {}) {
  try {
    return await execFileP(cmd, args, { timeout: timeoutMs, killSignal: 'SIGKILL', cwd, maxBuffer: 16 << 20 })
  } catch (err) {
    const e = /** @type {any} */ (err)
    const why = e.killed ? `killed after ${timeoutMs} ms` : `exit ${e.code ?? e.signal}`
    throw new Error(`${cmd} ${args.join(' ')}: ${why}\n${e.stdout ?? ''}${e.stderr ?? ''}`.trim())
  }
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

/** Resolves when `child` exits ({code, signal}), or with null after timeoutMs. */
// Waits for 'close' (exited and its stdout/stderr drained, so the log is complete).
function waitExit(child, timeoutMs) {
  if (child.dvClosed) return Promise.resolve({ code: child.exitCode, signal: child.signalCode })
  return new Promise(resolve => {
    const timer = setTimeout(() => resolve(null), timeoutMs)
    child.once('close', (code, signal) => {
      clearTimeout(timer)
      resolve({ code, signal })
    })
  })
}

function spawnTracked(cmd, args) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] })
  child.dvClosed = false
  child.once('close', () => { child.dvClosed = true })
  return child
}

/** Keeps a process's stdout+stderr in a log file and the last lines in memory. */
class ProcessLog {
  constructor(file) {
    this.file = file
    this.stream = createWriteStream(file, { flags: 'a' })
    this.tail = []
    this.partial = ''
    this.listeners = new Set()
  }
  attach(child) {
    for (const s of [child.stdout, child.stderr]) {
      s?.on('data', chunk => {
        this.stream.write(chunk)
        const text = this.partial + chunk.toString()
        const lines = text.split('\n')
        this.partial = lines.pop() ?? ''
        for (const line of lines) {
          this.tail.push(line)
          if (this.tail.length > 400) this.tail.shift()
          for (const fn of this.listeners) fn(line)
        }
      })
    }
  }
  mark(text) {
    // the time in the unit of the daemon's pino "time" field, to line the two up
    this.stream.write(`---- harness at ${Date.now()}: ${text}\n`)
  }
  lastLines(n) {
    return this.tail.slice(-n).join('\n')
  }
  close() {
    this.stream.end()
  }
}

class BaseServer {
  constructor({ logDir, workDir, name = 'server' }) {
    this.logDir = logDir
    this.workDir = workDir
    this.name = name
    this.log = new ProcessLog(path.join(logDir, `${name}.log`))
    /** @type {import('node:child_process').ChildProcess | null} */
    this.child = null
    this.port = 0
    this.roPort = 0
    this.starts = 0
  }
  logTail(n = 40) {
    return this.log.lastLines(n)
  }
  /** SIGTERM, wait up to graceMs for the exit; SIGKILL after that. */
  async stop(graceMs = 20_000) {
    const child = this.child
    if (!child) return { code: null, signal: null, ms: 0, killed: false }
    const t0 = Date.now()
    this.log.mark(`SIGTERM to pid ${child.pid}`)
    child.kill('SIGTERM')
    let res = await waitExit(child, graceMs)
    let killed = false
    if (!res) {
      killed = true
      this.log.mark(`pid ${child.pid} still running ${graceMs} ms after SIGTERM: SIGKILL`)
      child.kill('SIGKILL')
      res = (await waitExit(child, 5_000)) ?? { code: null, signal: 'SIGKILL' }
    }
    this.child = null
    return { ...res, ms: Date.now() - t0, killed }
  }
  /** kill -9, as a crash would; resolves once the process is gone (bounded). */
  async kill() {
    const child = this.child
    if (!child) return { code: null, signal: null, ms: 0 }
    const t0 = Date.now()
    this.log.mark(`SIGKILL to pid ${child.pid}`)
    child.kill('SIGKILL')
    const res = (await waitExit(child, 5_000)) ?? { code: null, signal: 'still running 5 s after SIGKILL' }
    this.child = null
    return { ...res, ms: Date.now() - t0 }
  }
  /** Stop (SIGTERM) and start again on the same ports and data. */
  async restart() {
    const stopped = await this.stop()
    const t0 = Date.now()
    await this.start()
    return { stopped, startMs: Date.now() - t0 }
  }
  async dispose() {
    await this.stop(5_000).catch(() => {})
    this.log.close()
  }
}

/** deltavol itself: `node dist/cli/main.js serve ...`, volumes through its CLI. */
export class DeltavolServer extends BaseServer {
  constructor(opts) {
    super(opts)
    this.kind = 'deltavol'
    this.cli = path.join(opts.root, 'dist/cli/main.js')
    this.dataDir = path.join(opts.workDir, opts.name ? `data-${opts.name}` : 'data')
    this.defaultExport = opts.defaultExport
    this.controlPort = 0
    this.replPort = 0
  }

  async start() {
    if (this.port) return this.#spawn() // a restart: same ports, same data
    for (let attempt = 1; ; attempt++) {
      this.port = await freePort()
      this.controlPort = await freePort()
      // explicit, not the default 10811: several daemons run at once (failover case)
      this.replPort = await freePort()
      this.roPort = this.port
      try {
        return await this.#spawn()
      } catch (err) {
        // another process took the port between freePort() and the listen
        if (attempt >= 3 || !/EADDRINUSE/.test(String(err))) throw err
      }
    }
  }

  async #spawn() {
    this.starts++
    const args = [
      this.cli, 'serve',
      '--data-dir', this.dataDir,
      '--port', String(this.port),
      '--bind', '127.0.0.1',
      '--control-port', String(this.controlPort),
      '--repl-port', String(this.replPort),
      ...(this.defaultExport ? ['--default-export', this.defaultExport] : []),
      '--log-level', process.env.DELTAVOL_KERNEL_TEST_LOG_LEVEL ?? 'info',
    ]
    this.log.mark(`start #${this.starts}: node ${args.join(' ')}`)
    const child = spawnTracked(process.execPath, args)
    this.child = child
    this.log.attach(child)
    const ready = new Promise((resolve, reject) => {
      const onLine = line => {
        if (line.includes('"msg":"listening"')) done(resolve)
      }
      const onExit = (code, signal) =>
        done(() => reject(new Error(`deltavol serve exited (${code ?? signal}) before listening:\n${this.logTail(20)}`)))
      const timer = setTimeout(
        () => done(() => reject(new Error(`deltavol serve did not log "listening" within 20 s:\n${this.logTail(20)}`))),
        20_000,
      )
      const done = fn => {
        clearTimeout(timer)
        this.log.listeners.delete(onLine)
        child.off('exit', onExit)
        fn()
      }
      this.log.listeners.add(onLine)
      child.once('exit', onExit)
    })
    await ready
  }

  async cliRun(...args) {
    return run(process.execPath, [this.cli, ...args, '--control', `127.0.0.1:${this.controlPort}`, '--token-file', this.tokenFile], { timeoutMs: 30_000 })
  }

  async createVolume(name, size) {
    await this.cliRun('volume', 'create', name, '--size', size)
  }

  /** The volume's data file (DIR/volumes/NAME/data.img: the volume's current bytes). */
  volumeFile(volume) {
    return path.join(this.dataDir, 'volumes', volume, 'data.img')
  }

  /** The control API's bearer token file (the daemon makes it at its first start). */
  get tokenFile() {
    return path.join(this.dataDir, 'control.token')
  }

  /** GET a control-API path (what `deltavol status VOLUME --json` prints comes from /v1/replication). */
  async api(pathname, timeoutMs = 5_000) {
    const token = readFileSync(this.tokenFile, 'utf8').trim()
    const res = await fetch(`http://127.0.0.1:${this.controlPort}${pathname}`, { headers: { authorization: `Bearer ${token}` }, signal: AbortSignal.timeout(timeoutMs) })
    const text = await res.text()
    if (!res.ok) throw new Error(`GET ${pathname}: HTTP ${res.status} ${text}`)
    return JSON.parse(text)
  }

  /** A volume's replication status, as `deltavol status VOLUME --json` prints it. */
  async replication(volume) {
    const r = await this.api(`/v1/replication?volume=${encodeURIComponent(volume)}`)
    return r.volumes[0]
  }

  /** Take a snapshot of a volume now (exported read-only as VOLUME@NAME). */
  async createSnapshot(volume, name) {
    await this.cliRun('snapshot', 'create', volume, name)
  }

  /** Copy a raw image onto a volume over NBD (nbdcopy), then make it read-only. */
  async writeImageReadOnly(name, image) {
    await run('nbdcopy', [image, `nbd://127.0.0.1:${this.port}/${name}`], { timeoutMs: 60_000 })
    await this.cliRun('volume', 'set', name, '--read-only')
    const { stdout } = await this.cliRun('volume', 'list', '--json')
    const vol = JSON.parse(stdout).find(v => v.name === name)
    if (!vol?.readOnly) throw new Error(`volume ${name} is not read-only after "volume set --read-only": ${stdout}`)
  }
}

/**
 * Stand-in for debugging: nbdkit's file plugin serves one sparse file per volume
 * by export name (the exportname filter supplies the default export); the
 * read-only volume is a second nbdkit -r on its own port.
 */
export class NbdkitServer extends BaseServer {
  constructor(opts) {
    super(opts)
    this.kind = 'nbdkit'
    this.defaultExport = opts.defaultExport
    this.volDir = path.join(opts.workDir, 'volumes')
    this.roImage = path.join(opts.workDir, 'readonly.img')
    /** @type {import('node:child_process').ChildProcess | null} */
    this.roChild = null
  }

  async start() {
    await mkdir(this.volDir, { recursive: true })
    if (!this.port) this.port = await freePort()
    this.starts++
    const args = ['-f', '-i', '127.0.0.1', '-p', String(this.port), '--filter=exportname',
      'file', `dir=${this.volDir}`, `default-export=${this.defaultExport}`]
    this.child = await this.#spawnNbdkit(args, this.port)
  }

  async #spawnNbdkit(args, port) {
    this.log.mark(`nbdkit ${args.join(' ')}`)
    const child = spawnTracked('nbdkit', args)
    this.log.attach(child)
    const deadline = Date.now() + 20_000
    while (Date.now() < deadline) {
      if (child.exitCode !== null) throw new Error(`nbdkit exited (${child.exitCode}):\n${this.logTail(20)}`)
      const up = await new Promise(resolve => {
        const s = net.connect(port, '127.0.0.1', () => { s.destroy(); resolve(true) })
        s.on('error', () => resolve(false))
      })
      if (up) return child
      await sleep(100)
    }
    child.kill('SIGKILL')
    throw new Error(`nbdkit did not listen on ${port} within 20 s`)
  }

  async createVolume(name, size) {
    const bytes = parseSize(size)
    await writeFile(path.join(this.volDir, name), '')
    await truncate(path.join(this.volDir, name), bytes)
  }

  /** nbdkit keeps an idle client connected after SIGTERM; do not wait long for it. */
  async stop(graceMs = 3_000) {
    return super.stop(graceMs)
  }

  async writeImageReadOnly(name, image) {
    await copyFile(image, this.roImage)
    this.roPort = await freePort()
    this.roChild = await this.#spawnNbdkit(['-f', '-r', '-i', '127.0.0.1', '-p', String(this.roPort),
      'file', this.roImage], this.roPort)
  }

  async dispose() {
    if (this.roChild) {
      this.roChild.kill('SIGTERM')
      await waitExit(this.roChild, 5_000)
      this.roChild = null
    }
    await super.dispose()
  }
}

/** "1GiB", "64M", "512" -> bytes (the suffixes deltavol accepts). */
export function parseSize(s) {
  const m = /^(\d+)\s*([KMGT]?)(i?B)?$/i.exec(String(s))
  if (!m) throw new Error(`bad size ${s}`)
  const mult = { '': 1, K: 1 << 10, M: 1 << 20, G: 1 << 30, T: 2 ** 40 }[m[2].toUpperCase()]
  return Number(m[1]) * mult
}
