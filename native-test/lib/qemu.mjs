// Boots the kernel-test guest under qemu-system-x86_64 (TCG: KVM does not work on
// these hosts), with the console on stdio (kept in console.log) and the guest's
// TAP on a second serial port written to tap.log. Watches tap.log while the guest
// runs so the harness can act on marker lines (the daemon restart), writes the
// harness's answers to the console serial port (qemu's stdin), and kills qemu if
// the run exceeds its time bound: a hung server blocks guest I/O forever.
import { spawn } from 'node:child_process'
import { createWriteStream } from 'node:fs'
import { open } from 'node:fs/promises'
import path from 'node:path'

/**
 * @param {{ vmlinux: string, initramfs: string, append: string, logDir: string,
 *   timeoutMs: number, onTapLine?: (line: string) => void, memMiB?: number }} opts
 */
export function bootGuest(opts) {
  const tapFile = path.join(opts.logDir, 'tap.log')
  const consoleFile = path.join(opts.logDir, 'console.log')
  const args = [
    '-accel', 'tcg,thread=multi', '-cpu', 'max', '-smp', '1', '-m', String(opts.memMiB ?? 1024),
    '-nographic', '-no-reboot', '-monitor', 'none',
    '-serial', 'stdio', '-serial', `file:${tapFile}`,
    '-kernel', opts.vmlinux, '-initrd', opts.initramfs, '-append', opts.append,
    // user networking: the guest reaches the host's 127.0.0.1 at 10.0.2.2 and nothing
    // else is used (static address, no DHCP or DNS)
    '-netdev', 'user,id=n0,net=10.0.2.0/24,host=10.0.2.2',
    '-device', 'virtio-net-pci,netdev=n0,romfile=',
  ]
  const t0 = Date.now()
  const consoleLog = createWriteStream(consoleFile)
  consoleLog.write(`# qemu-system-x86_64 ${args.map(a => (/\s/.test(a) ? `'${a}'` : a)).join(' ')}\n`)
  const tail = []
  let partial = ''
  const child = spawn('qemu-system-x86_64', args, { stdio: ['pipe', 'pipe', 'pipe'] })
  for (const s of [child.stdout, child.stderr]) {
    s.on('data', chunk => {
      consoleLog.write(chunk)
      const lines = (partial + chunk.toString()).replace(/\r/g, '').split('\n')
      partial = lines.pop() ?? ''
      for (const l of lines) {
        tail.push(l)
        if (tail.length > 2000) tail.shift()
      }
    })
  }
  child.stdin.on('error', () => {}) // qemu gone: nothing to tell it any more

  let timedOut = false
  let firstTapMs = null
  const timer = setTimeout(() => {
    timedOut = true
    consoleLog.write(`\n# harness: no poweroff within ${opts.timeoutMs} ms, killing qemu\n`)
    child.kill('SIGKILL')
  }, opts.timeoutMs)

  // follow tap.log (qemu creates it at start) and hand complete lines to onTapLine
  let offset = 0
  let tapPartial = ''
  let fh = null
  const poll = async () => {
    try {
      fh ??= await open(tapFile, 'r').catch(() => null)
      if (!fh) return
      for (;;) {
        const buf = Buffer.alloc(65536)
        const { bytesRead } = await fh.read(buf, 0, buf.length, offset)
        if (bytesRead === 0) break
        offset += bytesRead
        const lines = (tapPartial + buf.subarray(0, bytesRead).toString()).replace(/\r/g, '').split('\n')
        tapPartial = lines.pop() ?? ''
        for (const l of lines) {
          firstTapMs ??= Date.now() - t0
          opts.onTapLine?.(l)
        }
      }
    } catch {
      /* the next poll retries */
    }
  }
  let polling = Promise.resolve()
  const interval = setInterval(() => {
    polling = polling.then(poll)
  }, 200)

  const done = new Promise(resolve => {
    child.once('exit', async (code, signal) => {
      clearTimeout(timer)
      clearInterval(interval)
      await polling
      await poll()
      await fh?.close().catch(() => {})
      if (partial) tail.push(partial)
      await new Promise(r => consoleLog.end(r))
      resolve({ code, signal, timedOut, wallMs: Date.now() - t0, firstTapMs, tapFile, consoleFile })
    })
  })

  return {
    done,
    /** a line for the guest to read from its console (ttyS0 input) */
    sendConsole(line) {
      if (child.exitCode !== null || child.signalCode !== null) return
      consoleLog.write(`\n# harness -> guest console: ${line}\n`)
      child.stdin.write(`${line}\n`)
    },
    consoleTail(n) {
      return tail.slice(-n).join('\n')
    },
    kill() {
      child.kill('SIGKILL')
    },
  }
}
