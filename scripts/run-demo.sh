#!/usr/bin/env bash
# The README's first command: on a fresh Debian 12 machine as root, install what the
# daemon needs, build it, and run it in the foreground with a 1 GiB volume "demo"
# (also the default export) on nbd://127.0.0.1:10809. Ctrl-C stops it cleanly.
# Environment: DELTAVOL_DATA_DIR (default /var/lib/deltavol), DELTAVOL_BIND (127.0.0.1),
# DELTAVOL_PORT (10809), DELTAVOL_DEMO_SIZE (1G).
set -euo pipefail
cd "$(dirname "$0")/.."

# NBD clients to try it with; make, g++ and python3 build the native addon (node-gyp),
# and a minimal Debian 12 has none of them
need=()
for p in libnbd-bin nbd-client make g++ python3; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "run-demo: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -f dist/cli/main.js ] || [ ! -f build/Release/fsx.node ] || [ ! -f build/Release/sockx.node ] || [ ! -f build/Release/pipex.node ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
  npm run build
fi

data_dir=${DELTAVOL_DATA_DIR:-/var/lib/deltavol}
port=${DELTAVOL_PORT:-10809}
cat <<TXT
deltavol: serving ${data_dir} on nbd://${DELTAVOL_BIND:-127.0.0.1}:${port}
  try:   nbdinfo nbd://127.0.0.1:${port}/demo
         nbdinfo --list nbd://127.0.0.1:${port}
         qemu-img info nbd://127.0.0.1:${port}/demo
  mount: nbd-client 127.0.0.1 ${port} /dev/nbd0 -N demo && mkfs.ext4 /dev/nbd0 && mount /dev/nbd0 /mnt
         (needs a kernel with the nbd module: modprobe nbd)
  manage from another shell: node dist/cli/main.js volume list
         (as the same user: the CLI finds the control token; others need
          --data-dir ${data_dir}, where control.token lives, and the right to read it)
TXT
exec node dist/cli/main.js serve --data-dir "$data_dir" --bind "${DELTAVOL_BIND:-127.0.0.1}" --port "$port" \
  --demo-volume "${DELTAVOL_DEMO_SIZE:-1G}" --log-format pretty
