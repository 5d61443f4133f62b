#!/usr/bin/env bash
# Runs the kernel test suite (native-test/, issue 3: a real Linux nbd-client in a
# QEMU guest against deltavol) under tap, and writes its counts to
# .test-results/native.json ({"passed","failed","skipped"}) for
# scripts/test-summary.mjs. Called by scripts/test-all.sh after the vitest suite;
# expects scripts/install-test-deps.sh and `npm run build` to have run.
# The raw TAP is kept in .test-results/native.tap.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p .test-results
rm -f .test-results/native.json .test-results/native.tap

# --disable-coverage: the suite loads no project code, and tap would otherwise
# report "no coverage" as a failure. The outer timeout is a last resort: the test
# bounds the guest itself (DELTAVOL_KERNEL_TEST_TIMEOUT, default 210 s).
timeout -k 10 420 npx tap --disable-coverage --reporter=tap native-test/kernel.test.mjs \
  | tee .test-results/native.tap
rc=${PIPESTATUS[0]}

# tap ends with a summary comment such as "# { total: 91, pass: 89, todo: 2 }"
node - "$rc" <<'EOF'
const fs = require('node:fs')
const rc = Number(process.argv[2])
const text = fs.readFileSync('.test-results/native.tap', 'utf8')
const m = [...text.matchAll(/^# \{ total: \d+(.*)\}\s*$/gm)].pop()
const count = k => (m && Number((new RegExp(`\\b${k}: (\\d+)`).exec(m[1]) ?? [])[1])) || 0
let report
if (!m) {
  report = { passed: 0, failed: 1, skipped: 0, error: `tap exited ${rc} without a summary` }
} else {
  report = { passed: count('pass'), failed: count('fail'), skipped: count('todo') + count('skip') }
  // a non-zero exit with no failed assertion (a crash, a timeout) still fails
  if (rc !== 0 && report.failed === 0) report = { ...report, failed: 1, error: `tap exited ${rc}` }
}
fs.writeFileSync('.test-results/native.json', JSON.stringify(report) + '\n')
console.log(`kernel tests: ${report.passed} passed, ${report.failed} failed, ${report.skipped} todo/skipped${report.error ? ` (${report.error})` : ''}`)
EOF
exit "$rc"
