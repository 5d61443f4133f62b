// Parses the TAP the kernel-test guest writes on its second serial port
// (native-test/guest/tap.sh), so the host harness can re-emit every guest step
// as its own tap assertion. The guest's TAP is flat: "ok N - NAME # time=Xms" or
// "# TODO reason", an optional YAML block of "key: value" and "key: |" literal
// blocks between "  ---" and "  ...", "# comment" lines, and the plan line last.

/**
 * @typedef {{ ok: boolean, id: number, name: string, todo: string | null,
 *   skip: string | null, timeMs: number | null, diag: Record<string, string | number> }} GuestPoint
 * @typedef {{ version: string | null, points: GuestPoint[], plan: { start: number, end: number } | null,
 *   planIndex: number, comments: string[], bailout: string | null, garbage: string[] }} GuestTap
 */

const pointRe = /^(not ok|ok)\s+(\d+)\s*(?:-\s*)?(.*)$/

/** @param {string} text @returns {GuestTap} */
export function parseGuestTap(text) {
  const lines = text.replace(/\r/g, '').split('\n')
  /** @type {GuestTap} */
  const out = { version: null, points: [], plan: null, planIndex: -1, comments: [], bailout: null, garbage: [] }
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]
    if (line === '') continue
    let m
    if ((m = /^TAP version (\d+)/.exec(line))) {
      out.version = m[1]
    } else if ((m = /^(\d+)\.\.(\d+)/.exec(line))) {
      out.plan = { start: Number(m[1]), end: Number(m[2]) }
      out.planIndex = out.points.length
    } else if ((m = pointRe.exec(line))) {
      const point = parseDescription(m[1] === 'ok', Number(m[2]), m[3])
      if (lines[i + 1] === '  ---') {
        const end = lines.indexOf('  ...', i + 2)
        const stop = end === -1 ? lines.length : end
        point.diag = parseYamlish(lines.slice(i + 2, stop))
        i = stop
      }
      out.points.push(point)
    } else if (line.startsWith('#')) {
      out.comments.push(line.replace(/^#\s?/, ''))
    } else if (line.startsWith('Bail out!')) {
      out.bailout = line.slice('Bail out!'.length).trim()
    } else {
      out.garbage.push(line)
    }
  }
  return out
}

/** @returns {GuestPoint} */
function parseDescription(ok, id, rest) {
  let name = rest
  let todo = null
  let skip = null
  let timeMs = null
  const hash = rest.lastIndexOf(' # ')
  if (hash !== -1) {
    name = rest.slice(0, hash)
    const directive = rest.slice(hash + 3).trim()
    let m
    if ((m = /^time=(\d+(?:\.\d+)?)ms$/.exec(directive))) timeMs = Number(m[1])
    else if ((m = /^TODO\b\s*(.*)$/i.exec(directive))) todo = m[1] || 'todo'
    else if ((m = /^SKIP\S*\s*(.*)$/i.exec(directive))) skip = m[1] || 'skip'
    else name = rest
  }
  return { ok, id, name: name.trim(), todo, skip, timeMs, diag: {} }
}

/** The guest's YAML subset: "  key: value", "  key: 'quoted'", "  key: |" + 4-space lines. */
function parseYamlish(lines) {
  /** @type {Record<string, string | number>} */
  const diag = {}
  for (let i = 0; i < lines.length; i++) {
    const m = /^ {2}([A-Za-z_][\w-]*):\s?(.*)$/.exec(lines[i])
    if (!m) continue
    const [, key, value] = m
    if (value === '|') {
      const block = []
      while (i + 1 < lines.length && lines[i + 1].startsWith('    ')) block.push(lines[++i].slice(4))
      diag[key] = block.join('\n')
    } else if (/^'.*'$/.test(value)) {
      diag[key] = value.slice(1, -1).replace(/''/g, "'")
    } else if (/^-?\d+$/.test(value)) {
      diag[key] = Number(value)
    } else {
      diag[key] = value
    }
  }
  return diag
}

/** "ext4: mkfs.ext4" -> "ext4"; names without a prefix belong to "guest". */
export function caseOf(name) {
  const m = /^([\w-]+):\s/.exec(name)
  return m ? m[1] : 'guest'
}

/**
 * The step the guest started but never finished, from the console framing
 * "=== [N] start: NAME" / "=== [N] exit RC after MS ms: NAME" (guest/tap.sh).
 * @param {string} consoleText
 * @returns {{ id: number, name: string, output: string } | null}
 */
export function unfinishedStep(consoleText) {
  const lines = consoleText.replace(/\r/g, '').split('\n')
  let open = null
  for (let i = 0; i < lines.length; i++) {
    let m
    if ((m = /^=== \[(\d+)\] start: (.*)$/.exec(lines[i]))) open = { id: Number(m[1]), name: m[2], line: i }
    else if ((m = /^=== \[(\d+)\] exit /.exec(lines[i])) && open && Number(m[1]) === open.id) open = null
  }
  if (!open) return null
  return { id: open.id, name: open.name, output: lines.slice(open.line + 1).slice(-40).join('\n') }
}
