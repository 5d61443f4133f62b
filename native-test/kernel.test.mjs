// Kernel tests (issue 3): a real Linux NBD client (nbd.ko + nbd-client in a
// Debian kernel booted under qemu TCG) formats, mounts, fills and checks file
// systems, runs fio, mounts a snapshot export read-only while the volume changes
// and survives a daemon restart against a deltavol daemon on this host; in the
// failover case a file system mounted on a primary that is killed with -9 comes up on
// its replica after `deltavol failover`. The guest writes TAP on its second serial port; this file re-emits
// each guest step as a tap assertion so a failure names the failing step.
//
// Run: npx tap --disable-coverage native-test/kernel.test.mjs
// (it loads no project code, so tap's coverage check has nothing to measure)
// Needs scripts/install-test-deps.sh and `npm run build` first. Environment:
//   DELTAVOL_KERNEL_TEST_SERVER=nbdkit   use an nbdkit stand-in (debugging only)
//   DELTAVOL_KERNEL_TEST_CASES=ext4,xfs  run some cases only (default: all)
//   DELTAVOL_KERNEL_TEST_TIMEOUT=210     seconds the guest may run
//   DELTAVOL_KERNEL_TEST_APPEND='dvt.fiomib=4'  extra guest kernel parameters (later ones win)
//   DELTAVOL_GUEST_CACHE=DIR             guest image cache (scripts/build-guest-image.sh)
// Logs of the last runs: native-test/.cache/runs/<time>/{console,tap,server,failover-a,failover-b}.log
import t from 'tap'
import { execFile, spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, readdirSync } from 'node:fs'
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { caseOf, parseGuestTap, unfinishedStep } from './lib/guest-tap.mjs'
import { FailoverPair } from './lib/failover.mjs'
import { bootGuest } from './lib/qemu.mjs'
import { DeltavolServer, NbdkitServer, run } from './lib/servers.mjs'

const here = path.dirname(fileURLToPath(import.meta.url))
const root = path.resolve(here, '..')
const env = process.env
const ALL_CASES = ['connect', 'ext4', 'xfs', 'blocksize', 'fio', 'readonly', 'snapshot', 'restart', 'filerestore', 'failover']
const serverKind = env.DELTAVOL_KERNEL_TEST_SERVER ?? 'deltavol'
const requestedCases = (env.DELTAVOL_KERNEL_TEST_CASES ?? ALL_CASES.join(',')).split(',').map(s => s.trim()).filter(Boolean)
// the nbdkit stand-in has no replication: the failover case needs two deltavol daemons
// (the file restore case uses the failover case's daemons)
const REPLICATED_CASES = ['filerestore', 'failover']
const cases = serverKind === 'nbdkit' ? requestedCases.filter(c => !REPLICATED_CASES.includes(c)) : requestedCases
const guestTimeoutMs = Number(env.DELTAVOL_KERNEL_TEST_TIMEOUT ?? 210) * 1000
const VOLUME_SIZE = '1GiB'
const VOLUME_BYTES = 1 << 30
const RO_SIZE = '64MiB'
const volumes = { ext4: 'kt-ext4', xfs: 'kt-xfs', bs: 'kt-bs', fio: 'kt-fio', ro: 'kt-ro', rst: 'kt-rst', snap: 'kt-snap' }
// failover case: its own primary (A) and replica (B) daemons, one small volume
const FO_VOLUME = 'kt-fo'
const FO_SIZE = '128MiB'
const FO_CUT_INTERVAL = '500ms'

// image build (cold ~5 s) + server + guest + teardown, with room to spare
t.setTimeout(guestTimeoutMs + 120_000)

const suiteT0 = Date.now()
const timings = []
const timing = (what, ms) => timings.push(`${what}: ${(ms / 1000).toFixed(1)} s`)

/** Prerequisites: clear messages, no silent skip (CI installs them). */
function missingPrerequisites() {
  const missing = []
  const have = cmd => spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0
  for (const cmd of ['qemu-system-x86_64', 'mkfs.ext4', 'lz4', 'cpio', 'busybox', 'nbd-client', 'fio', 'mkfs.xfs']) {
    if (!have(cmd)) missing.push(`${cmd} (scripts/install-test-deps.sh installs it)`)
  }
  const kernels = existsSync('/boot') ? readdirSync('/boot').filter(f => f.startsWith('vmlinuz-')) : []
  if (!env.DELTAVOL_GUEST_KERNEL && kernels.length === 0) {
    missing.push('a kernel in /boot/vmlinuz-* (package linux-image-amd64; scripts/install-test-deps.sh)')
  }
  if (serverKind === 'deltavol') {
    if (!existsSync(path.join(root, 'dist/cli/main.js'))) missing.push('dist/cli/main.js (run `npm run build`)')
    if (!have('nbdcopy')) missing.push('nbdcopy (package libnbd-bin; scripts/install-test-deps.sh)')
  } else if (serverKind === 'nbdkit') {
    if (!have('nbdkit')) missing.push('nbdkit')
  } else {
    missing.push(`a known DELTAVOL_KERNEL_TEST_SERVER (deltavol or nbdkit), not "${serverKind}"`)
  }
  const unknown = requestedCases.filter(c => !ALL_CASES.includes(c))
  if (unknown.length) missing.push(`known cases in DELTAVOL_KERNEL_TEST_CASES (unknown: ${unknown.join(', ')})`)
  return missing
}

/** A small ext4 image with one known file, for the read-only volume. */
async function makeReadOnlyImage(dir) {
  const src = path.join(dir, 'ro-src')
  await mkdir(src, { recursive: true })
  const content = Buffer.alloc(777_777)
  for (let i = 0; i < content.length; i++) content[i] = (i * 2654435761) >>> 24
  await writeFile(path.join(src, 'hello.bin'), content)
  const image = path.join(dir, 'ro.img')
  await run('mkfs.ext4', ['-q', '-F', '-d', src, image, RO_SIZE.replace('iB', '')])
  return { image, file: 'hello.bin', sha256: createHash('sha256').update(content).digest('hex') }
}

async function runDirFor() {
  const runs = path.join(here, '.cache', 'runs')
  await mkdir(runs, { recursive: true })
  // keep the logs of the last few runs only
  const old = readdirSync(runs).sort().slice(0, -4)
  for (const d of old) await rm(path.join(runs, d), { recursive: true, force: true })
  const dir = path.join(runs, new Date().toISOString().replace(/[:.]/g, '-'))
  await mkdir(dir, { recursive: true })
  return dir
}

const missing = missingPrerequisites()
if (missing.length) {
  t.fail(`kernel test prerequisites missing: ${missing.map(m => m.split(' ')[0]).join(', ')}`, {
    missing,
    hint: 'run scripts/install-test-deps.sh (as root), then npm run build',
  })
} else {
  t.test('kernel NBD client in a QEMU guest', main)
}

/** @param {import('tap').Test} t */
async function main(t) {
  const logDir = await runDirFor()
  const workDir = await mkdtemp(path.join(os.tmpdir(), 'deltavol-kernel-test-'))
  t.comment(`server: ${serverKind}; cases: ${cases.join(',')}; logs: ${path.relative(root, logDir)}`)
  if (cases.length < requestedCases.length) t.comment('cases filerestore and failover left out: the nbdkit stand-in has no replication')
  const ServerClass = serverKind === 'nbdkit' ? NbdkitServer : DeltavolServer
  const server = new ServerClass({ root, logDir, workDir, defaultExport: volumes.xfs })
  const fo = cases.some(c => REPLICATED_CASES.includes(c))
    ? new FailoverPair({ root, logDir, workDir, volume: FO_VOLUME, size: FO_SIZE, cutInterval: FO_CUT_INTERVAL })
    : null
  /** @type {ReturnType<typeof bootGuest> | null} */
  let guest = null
  t.teardown(async () => {
    guest?.kill()
    await Promise.all([server.dispose(), fo?.dispose()])
    await rm(workDir, { recursive: true, force: true })
  })

  // ---- guest image (built while the server starts) -------------------------------
  const imageBuild = (async () => {
    const t0 = Date.now()
    const res = await new Promise(resolve => {
      execFile(path.join(root, 'scripts/build-guest-image.sh'), [], { timeout: 600_000, killSignal: 'SIGKILL' },
        (error, stdout, stderr) => resolve({ error, stdout: String(stdout), stderr: String(stderr) }))
    })
    const out = Object.fromEntries(
      res.stdout.split('\n').filter(l => l.includes('=')).map(l => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]),
    )
    const ok = !res.error && !!out.vmlinux && !!out.initramfs
    return { ok, ms: Date.now() - t0, out, res }
  })()

  // ---- server and volumes ----------------------------------------------------
  let roInfo
  const serverSetup = (async () => {
    const t0 = Date.now()
    try {
      await server.start()
      t.pass(`${serverKind} daemon started (NBD port ${server.port})`)
    } catch (err) {
      t.fail(`${serverKind} daemon started`, { error: String(err) })
      return false
    }
    try {
      const creating = Object.entries(volumes).filter(([key]) => key !== 'ro').map(([, name]) => server.createVolume(name, VOLUME_SIZE))
      if (serverKind === 'deltavol') creating.push(server.createVolume(volumes.ro, RO_SIZE))
      const [roImage] = await Promise.all([makeReadOnlyImage(workDir), ...creating])
      t.pass(`volumes created: ${Object.values(volumes).join(', ')} (default export ${volumes.xfs})`)
      roInfo = roImage
      await server.writeImageReadOnly(volumes.ro, roInfo.image)
      t.pass(`read-only volume ${volumes.ro} holds an ext4 image with ${roInfo.file}`)
    } catch (err) {
      t.fail('volumes created and the read-only volume prepared', { error: String(err), serverLog: server.logTail(20) })
      return false
    }
    timing('server start and volume setup', Date.now() - t0)
    return true
  })()

  // ---- failover case: primary A and replica B, the volume paired ------------------
  const foSetup = (async () => {
    if (!fo) return true
    const t0 = Date.now()
    try {
      const r = await fo.setup()
      t.pass(`failover: daemons A (NBD ${fo.a.port}) and B (NBD ${fo.b.port}, replication ${fo.b.replPort}) started, ` +
        `${FO_VOLUME} (${FO_SIZE}) on A replicated to B (pair ${r.pair}, ${r.state}, --cut-interval ${FO_CUT_INTERVAL})`)
    } catch (err) {
      t.fail('failover: daemons A and B started and the volume paired', { error: String(err), logs: fo.logTails(20) })
      return false
    }
    timing('failover daemons and pairing', Date.now() - t0)
    return true
  })()

  const [built, serverReady, foReady] = await Promise.all([imageBuild, serverSetup, foSetup])
  t.ok(built.ok, 'guest image built (scripts/build-guest-image.sh)', {
    ms: built.ms, ...(built.ok ? {} : { error: built.res.error?.message, stderr: built.res.stderr }),
  })
  if (!built.ok || !serverReady) return
  // a failover setup failure (already reported) costs that case only
  const guestCases = foReady ? cases : cases.filter(c => !REPLICATED_CASES.includes(c))
  const image = built.out
  const cachedImage = /cached/.test(built.res.stderr) && !/built|extracted/.test(built.res.stderr)
  timing(`guest image (${cachedImage ? 'cached' : 'built'}, concurrent with the server setup)`, built.ms)

  // ---- boot the guest ------------------------------------------------------------
  const append = [
    'console=ttyS0', 'panic=1', 'quiet', 'mitigations=off',
    `dvt.port=${server.port}`, `dvt.roport=${server.roPort}`, `dvt.cases=${guestCases.join(',')}`,
    `dvt.size=${VOLUME_BYTES}`, `dvt.ext4=${volumes.ext4}`, `dvt.bs=${volumes.bs}`, `dvt.fio=${volumes.fio}`,
    `dvt.ro=${volumes.ro}`, `dvt.rst=${volumes.rst}`, `dvt.snap=${volumes.snap}`, `dvt.rofile=${roInfo.file}`, `dvt.rosha=${roInfo.sha256}`,
    ...(fo && foReady ? [`dvt.fo=${FO_VOLUME}`, `dvt.foport=${fo.a.port}`] : []),
    env.DELTAVOL_KERNEL_TEST_APPEND ?? '',
  ].join(' ').trim()
  const restarts = []
  let hostActions = Promise.resolve()
  // the guest asks for a snapshot (case snapshot) while its file system is frozen
  const snapshots = []
  const takeSnapshot = async (volume, name) => {
    const t0 = Date.now()
    try {
      if (serverKind !== 'deltavol') throw new Error(`the ${serverKind} stand-in has no snapshots`)
      await server.createSnapshot(volume, name)
      snapshots.push({ ok: true, volume, name, ms: Date.now() - t0 })
      guest?.sendConsole(`deltavol-snapshot-created ${volume}@${name} in ${Date.now() - t0}ms`)
    } catch (err) {
      snapshots.push({ ok: false, volume, name, error: String(err), ms: Date.now() - t0 })
      guest?.sendConsole('deltavol-snapshot-failed')
    }
  }
  // the failover case: "cut and wait until B played it", then "crash A, fail over to B"
  const failoverAction = (what, fn, answer, failWord, list) => {
    hostActions = hostActions.then(async () => {
      const t0 = Date.now()
      try {
        if (!fo) throw new Error('no failover daemons (case failover not selected)')
        guest?.sendConsole(answer(await fn()))
      } catch (err) {
        // the error and both daemons' log tails go into the host-side assertion
        list?.push({ ok: false, error: String(err), ms: Date.now() - t0, logs: fo?.logTails(20) })
        guest?.sendConsole(`${failWord} ${what}: ${String(err).split('\n')[0]}`)
      }
    })
  }
  const onTapLine = line => {
    const snap = /^# deltavol-snapshot-request (\S+) (\S+)$/.exec(line)
    if (snap) {
      hostActions = hostActions.then(() => takeSnapshot(snap[1], snap[2]))
      return
    }
    if (/^# deltavol-failover-cut-request\b/.test(line)) {
      failoverAction('cut', () => fo.cutAndWaitPlayed(),
        r => `deltavol-failover-cut-done set=${r.target} played=${r.playedSet} wait=${r.waitMs}ms host=${r.totalMs}ms`, 'deltavol-failover-cut-failed', fo?.cuts)
      return
    }
    if (/^# deltavol-filerestore-snapshot-request\b/.test(line)) {
      failoverAction('filerestore snapshot', () => fo.snapshotOnReplica('good'),
        r => `deltavol-filerestore-done port=${r.nbdPort} snapshot=${r.snapshot} set=${r.target}`, 'deltavol-filerestore-failed', fo?.fileRestores)
      return
    }
    if (/^# deltavol-failover-crash-request\b/.test(line)) {
      failoverAction('crash', () => fo.crashPrimaryAndFailover(),
        r => `deltavol-failover-done port=${r.nbdPort} rto=${r.failover.rtoMs}ms host=${r.totalMs}ms`, 'deltavol-failover-failed', fo?.crashes)
      return
    }
    if (!line.startsWith('# deltavol-restart-request')) return
    hostActions = hostActions.then(async () => {
      const t0 = Date.now()
      try {
        const res = await server.restart()
        restarts.push({ ok: true, ...res, totalMs: Date.now() - t0 })
        guest?.sendConsole(`deltavol-restarted stop=${res.stopped.ms}ms exit=${res.stopped.code ?? res.stopped.signal} start=${res.startMs}ms`)
      } catch (err) {
        restarts.push({ ok: false, error: String(err), totalMs: Date.now() - t0 })
        guest?.sendConsole('deltavol-restart-failed')
      }
    })
  }
  guest = bootGuest({ vmlinux: image.vmlinux, initramfs: image.initramfs, append, logDir, timeoutMs: guestTimeoutMs, onTapLine })
  const result = await guest.done
  await hostActions
  timing('guest run (boot to poweroff)', result.wallMs)

  // ---- re-emit the guest's TAP -------------------------------------------------------
  const tap = parseGuestTap(await readFile(result.tapFile, 'utf8').catch(() => ''))
  // a guest killed mid-step (time bound) or dead (panic) never reported that step
  const consoleText = await readFile(result.consoleFile, 'utf8').catch(() => '')
  const stuck = tap.plan ? null : unfinishedStep(consoleText)
  if (stuck) {
    const why = result.timedOut ? `guest killed after ${guestTimeoutMs / 1000} s` : `guest stopped (${result.code ?? result.signal})`
    tap.points.push({
      ok: false, id: stuck.id, name: `${stuck.name} (did not finish: ${why})`, todo: null, skip: null, timeMs: null,
      diag: { output: stuck.output },
    })
  }
  const byCase = new Map()
  for (const p of tap.points) {
    const c = caseOf(p.name)
    if (!byCase.has(c)) byCase.set(c, [])
    byCase.get(c).push(p)
  }
  for (const [c, points] of byCase) {
    await t.test(`guest: ${c}`, async tt => {
      for (const p of points) {
        // the guest's diagnostics, not a host stack trace pointing at this loop
        const extra = { ...p.diag, at: null, stack: null }
        if (p.timeMs !== null) extra.guest_ms = p.timeMs
        if (p.todo) extra.todo = p.todo
        if (p.skip) extra.skip = p.skip
        tt.ok(p.ok, p.name, extra)
      }
    })
    const ms = points.reduce((s, p) => s + (p.timeMs ?? Number(p.diag.duration_ms ?? 0)), 0)
    timing(`guest case ${c}`, ms)
  }

  if (fo && foReady && cases.includes('filerestore')) {
    await t.test('filerestore (host side)', async tt => {
      tt.equal(fo.fileRestores.length, 1, 'filerestore: the guest asked for one snapshot on B')
      for (const r of fo.fileRestores) tt.ok(r.ok, `filerestore: set ${r.target ?? '?'} played on B, snapshot ${r.snapshot ?? '?'} taken there`, r)
    })
  }

  if (fo && foReady && cases.includes('failover')) {
    // what the harness did for the guest's failover case, and what deltavol answered
    await t.test('failover (host side)', async tt => {
      tt.equal(fo.cuts.length, 1, 'failover: the guest asked for one cut played on B')
      for (const c of fo.cuts) {
        tt.ok(c.ok, `failover: set ${c.target ?? '?'} cut on A and played on B (${c.waitMs ?? '?'} ms after the cut)`, c)
        if (c.ok) tt.not(c.partial, true, 'failover: the covering set is whole (not partial)', c)
        if (c.ok) {
          tt.equal(c.firstError, null, 'failover: `deltavol replica cut kt-fo` succeeded at the first try', { firstError: c.firstError })
        }
      }
      tt.equal(fo.crashes.length, 1, 'failover: the guest asked for one crash of the primary')
      for (const c of fo.crashes) {
        tt.ok(c.ok, 'failover: A killed with -9, `deltavol failover kt-fo --json` on B succeeded', c)
        if (!c.ok) continue
        const f = c.failover
        const r = f.report ?? {}
        tt.comment(`failover: A killed (${c.killed.signal}), B saw it ${c.bSawDisconnectMs} ms later (B had played set ${c.bBefore.playedSet}, acknowledged ${c.bBefore.ackedSet}, A's last set reported ${c.bBefore.primaryLastSet}); ` +
          `failover rtoMs=${f.rtoMs} (the CLI took ${c.failoverCliMs} ms), generation ${f.previousGeneration} -> ${f.generation}, ` +
          `restart point ${JSON.stringify(f.restartPoint)}, sets played at failover ${JSON.stringify(f.setsPlayed)}\n` +
          `  loss report: ${JSON.stringify(r)}${f.warnings?.length ? `\n  warnings: ${JSON.stringify(f.warnings)}` : ''}\n` +
          `  A's last contact with B: ${r.lastContactMs == null ? 'none' : `${c.killAtMs - r.lastContactMs} ms before the kill`}; ` +
          `at risk since: ${r.atRiskSinceMs == null ? 'nothing' : `${c.killAtMs - r.atRiskSinceMs} ms before the kill`}\n` +
          `  really lost: ${c.differing.blocks} blocks of 4 KiB (${c.differing.bytes} bytes) differ between A's data file as A died and B's after the failover ` +
          `(report: at most ${r.bytesAtMost} bytes; first blocks ${JSON.stringify(c.differing.firstBlocks)})`)
        tt.equal(c.killed.signal, 'SIGKILL', 'failover: A died of SIGKILL')
        tt.equal(f.generation, f.previousGeneration + 1, `failover: B is the primary one generation up (${f.generation})`)
        tt.equal(f.report?.consistent, true, 'failover: the loss report says B is at one point in time of A (consistent)')
        tt.same(c.after, { role: 'primary', state: 'failed-over', generation: f.generation }, 'failover: B reports role primary, state failed-over')
      }
    })
  }

  await t.test('guest run', async tt => {
    tt.notOk(result.timedOut, `guest powered off within ${guestTimeoutMs / 1000} s`, {
      wall_ms: result.wallMs, exit: result.code ?? result.signal,
    })
    tt.ok(tap.plan !== null, 'guest TAP ends with a plan line', { points: tap.points.length })
    if (tap.plan) {
      tt.equal(tap.planIndex, tap.points.length, 'the plan line comes after the last test point')
      tt.equal(tap.plan.end, tap.points.length, `guest plan 1..${tap.plan.end} matches its ${tap.points.length} test points`)
    }
    const ids = tap.points.filter(p => p !== tap.points.at(-1) || !stuck).map(p => p.id)
    tt.same(ids, ids.map((_, i) => i + 1), 'guest test points are numbered 1..N in order')
    for (const c of guestCases) {
      tt.ok(byCase.has(c), `guest reported case ${c}`)
    }
    if (cases.includes('restart')) {
      tt.equal(restarts.length, 1, 'the guest asked for one daemon restart')
      for (const r of restarts) {
        tt.ok(r.ok, 'daemon restarted (SIGTERM, start again)', r)
        if (r.ok) {
          tt.equal(r.stopped.code, 0, `daemon exited 0 on SIGTERM (took ${r.stopped.ms} ms)`, {
            signal: r.stopped.signal, killed: r.stopped.killed,
            ...(serverKind === 'nbdkit' ? { todo: 'the nbdkit stand-in waits for idle clients' } : {}),
          })
        }
      }
    }
    if (cases.includes('snapshot')) {
      tt.equal(snapshots.length, 1, 'the guest asked for one snapshot')
      for (const s of snapshots) tt.ok(s.ok, `snapshot ${s.volume}@${s.name} created (deltavol snapshot create)`, s)
    }
    tt.same(tap.garbage, [], 'no stray lines in the guest TAP')
    if (serverKind === 'deltavol') {
      const daemons = [[server, 'the daemon'], ...(fo ? [[fo.a, 'failover primary A'], [fo.b, 'failover replica B']] : [])]
      for (const [d, who] of daemons) {
        // pino levels: 40 warn, 50 error, 60 fatal
        const logged = (await readFile(d.log.file, 'utf8').catch(() => '')).split('\n')
          .filter(l => l.startsWith('{')).map(l => { try { return JSON.parse(l) } catch { return null } }).filter(Boolean)
        const errors = logged.filter(e => e.level >= 50)
        const warnings = logged.filter(e => e.level === 40)
        tt.equal(errors.length, 0, `${who} logged no errors`, { errors: errors.slice(0, 10) })
        if (warnings.length) tt.comment(`${who}: warnings (${warnings.length}):\n  ${warnings.slice(0, 10).map(w => JSON.stringify(w)).join('\n  ')}`)
      }
    }
  })

  // ---- timings and logs -----------------------------------------------------------
  const initUptime = tap.comments.map(c => /\/init at uptime ([\d.]+)s/.exec(c)).find(Boolean)
  if (initUptime) timings.unshift(`boot to /init (guest uptime): ${initUptime[1]} s`)
  if (result.firstTapMs !== null) timings.unshift(`qemu start to first TAP line: ${(result.firstTapMs / 1000).toFixed(1)} s`)
  timing('suite so far', Date.now() - suiteT0)
  t.comment(`timings:\n  ${timings.join('\n  ')}`)

  if (!t.passing()) {
    t.comment(`guest console (last 80 lines of ${path.relative(root, result.consoleFile)}):\n${guest.consoleTail(80)}`)
    t.comment(`server log (last 30 lines):\n${server.logTail(30)}`)
    if (fo) t.comment(fo.logTails(30))
  }
}
