#!/usr/bin/env bash
# Installs, idempotently, every Debian package the test suite and benchmarks use:
# the native addon's build tools (make, g++, python3 for node-gyp),
# real NBD clients nobody here wrote (libnbd-bin, nbdsh from python3-libnbd, qemu-utils, fio, nbd-client),
# nbdkit as the comparison peer, and the pieces the kernel tests boot in a QEMU guest.
# Safe to run again: packages already present are skipped without touching apt.
set -euo pipefail

packages=(
  # the native addon (src/native/fsx.c, built by node-gyp): a minimal Debian 12 has no compiler
  make g++ python3
  # interop clients
  libnbd-bin python3-libnbd qemu-utils fio nbd-client
  # comparison server for scripts/bench
  nbdkit
  # TLS keys and certificates for the NBD and replication TLS tests (psktool, certtool)
  gnutls-bin
  # kernel tests (native-test/): a Debian kernel with nbd.ko booted under TCG
  qemu-system-x86 linux-image-amd64 busybox-static e2fsprogs xfsprogs cpio lz4 kmod xz-utils
  # two-node drills: network namespaces, and the Docker drill (docker/drill.sh builds its
  # base image offline with debootstrap and starts its own dockerd)
  iproute2 iptables docker.io docker-compose debootstrap
  # misc tools the tests call
  coreutils util-linux procps
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-test-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install-test-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-test-deps: done"
