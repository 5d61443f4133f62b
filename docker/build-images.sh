#!/usr/bin/env bash
# Builds the Docker images for two-node drills without Docker Hub: a Debian 12 base
# made by debootstrap from the machine's own apt mirror and imported with `docker import`,
# then the deltavol image on top of it (this checkout's build, the host's Node.js binary).
# Usage: docker/build-images.sh   (as root, with dockerd running; idempotent; docker/drill.sh
# runs it when the images are missing or older than the build in dist/)
set -euo pipefail
cd "$(dirname "$0")/.."

mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${DELTAVOL_DEBIAN_MIRROR:-${mirror:-http://deb.debian.org/debian}}
base=deltavol-base:bookworm

if ! docker image inspect "$base" >/dev/null 2>&1; then
  root=$(mktemp -d /var/tmp/deltavol-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  echo "build-images: debootstrap bookworm from $mirror"
  debootstrap --variant=minbase --include=iproute2,iptables,procps,ca-certificates bookworm "$root" "$mirror" >/dev/null
  tar -C "$root" -c . | docker import - "$base" >/dev/null
  echo "build-images: imported $base"
fi

if [ ! -f dist/cli/main.js ] || [ ! -f build/Release/fsx.node ]; then
  # the native addon (node-gyp) needs a compiler, make and python3; a minimal Debian has none
  need=()
  for p in make g++ python3; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "build-images: installing the addon's build tools: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  npm ci --no-audit --no-fund && npm run build
fi

ctx=$(mktemp -d /var/tmp/deltavol-ctx.XXXXXX)
trap 'rm -rf "$ctx" ${root:+"$root"}' EXIT
cp "$(command -v node)" "$ctx/node"
mkdir -p "$ctx/app"
cp -r package.json dist build node_modules "$ctx/app/"
cp docker/Dockerfile "$ctx/Dockerfile"
previous=$(docker image inspect -f '{{.Id}}' deltavol:dev 2>/dev/null || true)
docker build -q -t deltavol:dev "$ctx"
echo "build-images: built deltavol:dev"
# the image it replaced would stay behind untagged (~250 MB per rebuild): remove it unless in use
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' deltavol:dev)" ]; then
  docker rmi "$previous" >/dev/null 2>&1 && echo "build-images: removed the previous deltavol:dev" || true
fi
