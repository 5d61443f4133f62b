#!/usr/bin/env bash
# Why: NBD TLS for the Linux kernel client. nbd-client does the TLS handshake in user space
# (GnuTLS, already in the kernel-test guest with nbd-client's libraries) and keeps
# proxying for the kernel, so the kernel path needs its own check. This boots the
# kernel-test guest (scripts/build-guest-image.sh) with an initramfs overlay holding
# certificates made here with certtool and native-test/guest-tls/init.sh as its init, against
# a deltavol started with --tls require, client certificates verified and only CN alice
# allowed. The guest connects with TLS, makes an ext4, writes, reconnects and verifies, and
# checks that a certificate outside --tls-authz and a plain client are refused.
#
# Usage: scripts/test-native-tls.sh        (about 15-40 s; needs qemu, certtool, a built dist/)
# Exit status 0 when every guest check passed. DELTAVOL_GUEST_CACHE as for build-guest-image.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
log() { echo "test-native-tls: $*" >&2; }
for tool in qemu-system-x86_64 certtool cpio lz4 node; do
  command -v "$tool" > /dev/null || { log "missing '$tool' (scripts/install-test-deps.sh)"; exit 2; }
done
[ -f "$root/dist/cli/main.js" ] || { log "run 'npm run build' first"; exit 2; }

work="$(mktemp -d /tmp/deltavol-native-tls.XXXXXX)"
daemon_pid=""
cleanup() {
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2> /dev/null && wait "$daemon_pid" 2> /dev/null
  rm -rf "$work"
}
trap cleanup EXIT

eval "$(bash "$here/build-guest-image.sh" | grep -E '^(vmlinux|initramfs)=')"

# ---- credentials: a CA, the server (localhost, 127.0.0.1), clients alice and mallory ----
c="$work/creds"
mkdir -p "$c" "$work/ov/tls"
tpl() { printf '%s\n' "${@:2}" > "$c/$1.info"; }
key() { certtool --generate-privkey --key-type=ecdsa --outfile "$1" 2> /dev/null; }
sign() { # sign NAME TEMPLATE-LINES...
  local n="$1"
  shift
  key "$c/$n-key.pem"
  tpl "$n" "$@" 'expiration_days = 2'
  certtool --generate-certificate --load-privkey "$c/$n-key.pem" --load-ca-certificate "$c/ca-cert.pem" \
    --load-ca-privkey "$c/ca-key.pem" --template "$c/$n.info" --outfile "$c/$n-cert.pem" 2> /dev/null
}
key "$c/ca-key.pem"
tpl ca 'cn = deltavol native TLS CA' ca cert_signing_key 'expiration_days = 2'
certtool --generate-self-signed --load-privkey "$c/ca-key.pem" --template "$c/ca.info" --outfile "$c/ca-cert.pem" 2> /dev/null
sign server 'cn = localhost' 'dns_name = localhost' 'ip_address = 127.0.0.1' tls_www_server signing_key
for who in alice mallory; do
  sign "$who" "cn = $who" tls_www_client signing_key
  mkdir -p "$work/ov/tls/$who"
  cp "$c/ca-cert.pem" "$work/ov/tls/$who/ca-cert.pem"
  cp "$c/$who-cert.pem" "$work/ov/tls/$who/client-cert.pem"
  cp "$c/$who-key.pem" "$work/ov/tls/$who/client-key.pem"
done

# ---- the guest: the kernel-test initramfs plus an overlay (uncompressed newc archives concatenate) ----
install -m 755 "$root/native-test/guest-tls/init.sh" "$work/ov/dvtls-init"
(cd "$work/ov" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet) > "$work/overlay.cpio"
{ lz4 -dc "$initramfs"; cat "$work/overlay.cpio"; } > "$work/initrd.cpio"

# ---- the daemon ----
node "$root/dist/cli/main.js" serve --data-dir "$work/data" --port 0 --control-port 0 --repl-port 0 \
  --tls require --tls-cert "$c/server-cert.pem" --tls-key "$c/server-key.pem" --tls-ca "$c/ca-cert.pem" \
  --tls-authz alice > "$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 200); do [ -s "$work/data/daemon.json" ] && break; sleep 0.05; done
[ -s "$work/data/daemon.json" ] || { log "daemon did not start:"; cat "$work/daemon.log" >&2; exit 1; }
json() { node -e "process.stdout.write(String(JSON.parse(require('fs').readFileSync('$work/data/daemon.json','utf8')).$1))"; }
port="$(json nbdPort)"
node "$root/dist/cli/main.js" --control "127.0.0.1:$(json controlPort)" volume create vol --size 64M > /dev/null

log "booting the guest (deltavol NBD port $port, --tls require, authz alice)"
timeout 240 qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 1 -m 1024 -nographic -no-reboot -monitor none \
  -serial stdio -kernel "$vmlinux" -initrd "$work/initrd.cpio" \
  -append "console=ttyS0 panic=1 quiet mitigations=off rdinit=/dvtls-init dvt.port=$port" \
  -netdev user,id=n0,net=10.0.2.0/24,host=10.0.2.2 -device virtio-net-pci,netdev=n0,romfile= \
  > "$work/console.log" 2>&1 || true
grep -a '^DVTLS' "$work/console.log" | tr -d '\r' | sed 's/^DVTLS //'
grep -a '"TLS started"\|"TLS refused' "$work/daemon.log" | cut -c1-300 >&2 || true
planned="$(grep -a '^DVTLS done' "$work/console.log" | tr -d '\r' | awk '{print $3}')"
passed="$(grep -ac '^DVTLS ok' "$work/console.log" || true)"
if [ -z "$planned" ] || [ "$passed" != "$planned" ]; then
  log "FAILED: $passed of ${planned:-?} guest checks passed; guest console:"
  tail -40 "$work/console.log" >&2
  exit 1
fi
log "all $passed guest checks passed"
