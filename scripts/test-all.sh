#!/usr/bin/env bash
# The README's test command (and exactly what .ci/run runs): installs everything the
# tests need on a fresh Debian 12 machine as root, builds, runs the vitest suite (unit,
# property, interop with real NBD clients, fuzz) and then the kernel tests in a QEMU
# guest (native-test/, under tap) and the kernel client over NBD TLS (scripts/test-native-tls.sh),
# then the disaster drill on two Docker containers
# (docker/drill.sh). Ends with one line: "total: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p .test-results

step() { printf '\n== %s ==\n' "$*"; }

step "install test dependencies (apt)"
bash scripts/install-test-deps.sh || { echo "total: 0 passed, 1 failed"; exit 1; }

step "install node packages and build"
if ! { npm ci --no-audit --no-fund && npm run build; }; then
  echo "total: 0 passed, 1 failed"
  exit 1
fi

step "vitest: unit, property, interop, fuzz"
npx vitest run --reporter=default --reporter=json --outputFile.json=.test-results/vitest.json
vitest_rc=$?

step "kernel tests: Linux nbd-client, mkfs, mount and fio in a QEMU guest"
bash scripts/test-native.sh
native_rc=$?

step "kernel client over NBD TLS: nbd-client's user-space TLS in a QEMU guest"
# One test of 8 guest checks: connect with a client certificate, mkfs.ext4, write, reconnect and
# verify; a certificate outside --tls-authz and a plain client refused.
if timeout 400 bash scripts/test-native-tls.sh > .test-results/native-tls.log 2>&1; then
  echo '{"passed":1,"failed":0}' > .test-results/native-tls.json
  tail -3 .test-results/native-tls.log
else
  echo '{"passed":0,"failed":1}' > .test-results/native-tls.json
  echo "kernel TLS test FAILED:"; tail -40 .test-results/native-tls.log
fi

step "disaster drill on two Docker containers (docker/drill.sh)"
# One test: start, write, kill the primary, failover, fencing, resync, failback, verify.
# It starts its own dockerd when none runs and builds its images offline the first time.
if timeout 900 bash docker/drill.sh > .test-results/drill.log 2>&1; then
  drill_rc=0
  echo '{"passed":1,"failed":0}' > .test-results/drill.json
else
  drill_rc=1
  echo '{"passed":0,"failed":1}' > .test-results/drill.json
fi
sed -n '/=== deltavol disaster drill: timeline/,$p' .test-results/drill.log | tail -40
[ $drill_rc -eq 0 ] || { echo "docker drill FAILED (full log: .test-results/drill.log):"; tail -60 .test-results/drill.log; }

step "summary"
node scripts/test-summary.mjs .test-results/vitest.json .test-results/native.json .test-results/native-tls.json .test-results/drill.json
summary_rc=$?

if [ $vitest_rc -ne 0 ] || [ $native_rc -ne 0 ] || [ $drill_rc -ne 0 ] || [ $summary_rc -ne 0 ]; then exit 1; fi
exit 0
