#!/usr/bin/env bash
# Builds the QEMU guest the kernel tests (native-test/) boot: an uncompressed vmlinux
# taken out of the host's Debian bzImage (decompressing xz inside a TCG guest costs
# seconds on every boot) and an lz4 initramfs holding busybox, nbd-client, the
# ext4/xfs tools, fio, the kernel modules they need and the guest scripts.
# Both land in a cache outside the git tree, keyed by a hash of every input, so a
# rerun with nothing changed only hashes and prints the paths.
#
# Usage: scripts/build-guest-image.sh [--force]
# Prints, on stdout, two lines for the harness to read:
#   vmlinux=/path/to/vmlinux
#   initramfs=/path/to/initramfs.cpio.lz4
# Progress goes to stderr. Environment:
#   DELTAVOL_GUEST_CACHE  cache directory (default /var/cache/deltavol/guest,
#                         falling back to ~/.cache/deltavol/guest if not writable)
#   DELTAVOL_GUEST_KERNEL path of the bzImage (default: newest /boot/vmlinuz-*)
set -euo pipefail

force=0
[ "${1:-}" = "--force" ] && force=1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
guest_src="$root/native-test/guest"
self="$here/$(basename "${BASH_SOURCE[0]}")"

log() { echo "build-guest-image: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
trap 'log "ERROR: command failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

for tool in xz lz4 cpio od sha256sum flock modinfo ldd busybox; do
  command -v "$tool" >/dev/null || die "missing '$tool'; run scripts/install-test-deps.sh"
done

# ---- cache directory -------------------------------------------------------
cache="${DELTAVOL_GUEST_CACHE:-/var/cache/deltavol/guest}"
if ! mkdir -p "$cache" 2>/dev/null || [ ! -w "$cache" ]; then
  if [ -n "${DELTAVOL_GUEST_CACHE:-}" ]; then die "cache directory $cache is not writable"; fi
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/deltavol/guest"
  mkdir -p "$cache" || die "cannot create cache directory $cache"
  log "/var/cache/deltavol/guest not writable, using $cache"
fi
exec 9>"$cache/.lock"
flock -w 600 9 || die "timed out waiting for the cache lock $cache/.lock"

# ---- kernel ----------------------------------------------------------------
bzimage="${DELTAVOL_GUEST_KERNEL:-}"
if [ -z "$bzimage" ]; then
  bzimage="$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)"
fi
[ -n "$bzimage" ] && [ -r "$bzimage" ] || die "no readable /boot/vmlinuz-*; install linux-image-amd64 (scripts/install-test-deps.sh)"
kver="${bzimage##*/vmlinuz-}"
moddir="/lib/modules/$kver"
[ -d "$moddir" ] || die "no $moddir for kernel $kver"

self_hash="$(sha256sum "$self" | cut -c1-64)"
bz_hash="$(sha256sum "$bzimage" | cut -c1-64)"
vmlinux_key="$(printf '%s\n' "$self_hash" "$bz_hash" | sha256sum | cut -c1-16)"
vmlinux_dir="$cache/vmlinux-$kver-$vmlinux_key"

u8()  { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' \n'; }
u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' \n'; }

if [ "$force" = 1 ] || [ ! -s "$vmlinux_dir/vmlinux" ]; then
  t0=$(date +%s%N)
  # Linux boot protocol: "HdrS" at 0x202, setup_sects at 0x1f1 (0 means 4),
  # payload_offset/payload_length at 0x248/0x24c, relative to the protected-mode
  # code that starts after the (setup_sects + 1) 512-byte sectors.
  magic="$(od -An -c -j $((0x202)) -N4 "$bzimage" | tr -d ' \n')"
  [ "$magic" = "HdrS" ] || die "$bzimage has no bzImage header"
  setup_sects="$(u8 "$bzimage" $((0x1f1)))"
  [ "$setup_sects" = 0 ] && setup_sects=4
  payload_off="$(u32 "$bzimage" $((0x248)))"
  payload_len="$(u32 "$bzimage" $((0x24c)))"
  start=$(( (setup_sects + 1) * 512 + payload_off ))
  tmp="$(mktemp -d "$cache/.vmlinux.XXXXXX")"
  chmod 755 "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  # The payload is the compressed ELF vmlinux followed by its 4-byte size;
  # --single-stream stops after the xz stream and ignores that trailer.
  dd if="$bzimage" of="$tmp/payload" bs=1M iflag=skip_bytes,count_bytes \
    skip="$start" count="$payload_len" status=none
  head -c 6 "$tmp/payload" | od -An -tx1 | grep -q 'fd 37 7a 58 5a 00' \
    || die "payload of $bzimage is not xz-compressed (first bytes: $(head -c 6 "$tmp/payload" | od -An -tx1))"
  xz -dc --single-stream < "$tmp/payload" > "$tmp/vmlinux"
  [ "$(head -c 4 "$tmp/vmlinux" | od -An -c | tr -d ' \n')" = "177ELF" ] || die "extracted payload is not an ELF file"
  rm -f "$tmp/payload"
  rm -rf "$vmlinux_dir"
  mv "$tmp" "$vmlinux_dir"
  trap - EXIT
  log "vmlinux for $kver extracted in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
else
  log "vmlinux for $kver cached"
fi

# ---- initramfs contents ----------------------------------------------------
# Programs copied with the libraries ldd reports. Debian's fio links ~60
# libraries (ceph, gluster, icu...): large, but it works and needs no build.
programs=(
  /usr/sbin/nbd-client
  /sbin/mke2fs /sbin/e2fsck
  /sbin/mkfs.xfs /sbin/xfs_repair
  /usr/bin/fio
)
# Modules the guest loads; their dependencies (depends= and softdep pre:) are
# added by walking modinfo.
want_modules=(virtio_pci virtio_net nbd crc32c_generic ext4 xfs)

resolve_prog() {  # a program path, possibly /sbin/x where /sbin -> /usr/sbin
  local p="$1"
  [ -x "$p" ] && { echo "$p"; return; }
  local alt; alt="$(command -v "$(basename "$p")" || true)"
  [ -n "$alt" ] || die "missing program $p; run scripts/install-test-deps.sh"
  echo "$alt"
}

declare -A files=()     # image path -> host path
declare -A mod_seen=()
mod_order=()            # load order, dependencies first

add_file() { files["$1"]="${2:-$1}"; }

add_module() {  # name or alias
  local name="$1" path dep soft
  [ -n "${mod_seen[$name]:-}" ] && return
  mod_seen[$name]=1
  # an alias (crc32c) can name several modules; take them all
  while read -r path; do
    case "$path" in (/*) ;; (*) continue ;; esac   # "(builtin)" or empty
    local base; base="$(basename "$path")"; base="${base%%.ko*}"
    [ -n "${mod_seen[file:$base]:-}" ] && continue
    mod_seen[file:$base]=1
    for dep in $(modinfo -k "$kver" -F depends "$path" | tr ',' ' '); do add_module "$dep"; done
    soft="$(modinfo -k "$kver" -F softdep "$path" || true)"
    for dep in $(echo "$soft" | sed -n 's/.*pre:\(.*\)/\1/p' | sed 's/post:.*//'); do add_module "$dep"; done
    mod_order+=("$path")
  done < <(modinfo -k "$kver" -n "$name" 2>/dev/null || die "module $name not found for $kver")
}

for m in "${want_modules[@]}"; do add_module "$m"; done
for mpath in "${mod_order[@]}"; do add_file "$mpath"; done

for p in "${programs[@]}"; do
  real="$(resolve_prog "$p")"
  add_file "/bin/$(basename "$real")" "$real"
  # "libfoo.so => /lib/x86_64-linux-gnu/libfoo.so (0x...)" and the interpreter line
  while read -r lib; do
    add_file "$lib" "$(readlink -f "$lib")"
  done < <(ldd "$real" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
done
add_file /bin/busybox "$(command -v busybox)"
[ -r /etc/mke2fs.conf ] && add_file /etc/mke2fs.conf

guest_files=()
while IFS= read -r -d '' f; do guest_files+=("$f"); done < <(find "$guest_src" -type f -print0 | sort -z)
[ -f "$guest_src/init.sh" ] || die "missing $guest_src/init.sh"

# ---- cache key ---------------------------------------------------------------
key="$(
  {
    echo "script $self_hash"
    echo "kernel $kver $bz_hash"
    for img in $(printf '%s\n' "${!files[@]}" | sort); do
      host="${files[$img]}"
      echo "file $img $(stat -c '%s %Y' "$host")"
    done
    echo "modules ${mod_order[*]}"
    for f in "${guest_files[@]}"; do echo "guest ${f#$guest_src/} $(sha256sum "$f" | cut -c1-64)"; done
  } | sha256sum | cut -c1-16
)"
initrd_dir="$cache/initramfs-$kver-$key"

if [ "$force" = 1 ] || [ ! -s "$initrd_dir/initramfs.cpio.lz4" ]; then
  t0=$(date +%s%N)
  tmp="$(mktemp -d "$cache/.initramfs.XXXXXX")"
  chmod 755 "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  st="$tmp/root"
  mkdir -p "$st"/{bin,dev,proc,sys,tmp,mnt,etc,run,guest,lib64,root}
  ln -s bin "$st/sbin"
  mkdir -p "$st/usr"
  ln -s ../bin "$st/usr/bin"
  ln -s ../bin "$st/usr/sbin"
  for img in "${!files[@]}"; do
    mkdir -p "$st$(dirname "$img")"
    cp -L "${files[$img]}" "$st$img"
  done
  # busybox applets, without replacing the real programs copied above
  for applet in $(busybox --list); do
    [ -e "$st/bin/$applet" ] || ln -s busybox "$st/bin/$applet"
  done
  ln -sf mke2fs "$st/bin/mkfs.ext4"
  # load order for the guest: one module file path per line
  printf '%s\n' "${mod_order[@]}" > "$st/etc/modules.order"
  echo "$kver" > "$st/etc/guest-kernel"
  cp "$guest_src/init.sh" "$st/init"
  chmod 755 "$st/init"
  for f in "${guest_files[@]}"; do
    rel="${f#$guest_src/}"
    mkdir -p "$st/guest/$(dirname "$rel")"
    cp "$f" "$st/guest/$rel"
  done
  chmod -R a+rX "$st/guest"
  (cd "$st" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet) \
    | lz4 -l -q -c > "$tmp/initramfs.cpio.lz4"
  {
    echo "kernel=$kver"
    echo "key=$key"
    echo "modules=${mod_order[*]}"
    echo "files=${#files[@]}"
    echo "uncompressed_bytes=$(du -sb "$st" | cut -f1)"
  } > "$tmp/manifest"
  rm -rf "$st"
  rm -rf "$initrd_dir"
  mv "$tmp" "$initrd_dir"
  trap - EXIT
  log "initramfs built in $(( ($(date +%s%N) - t0) / 1000000 )) ms: $(du -h "$initrd_dir/initramfs.cpio.lz4" | cut -f1) lz4, ${#mod_order[@]} modules"
  # keep the cache small: drop older initramfs builds for this kernel
  ls -1dt "$cache"/initramfs-"$kver"-* 2>/dev/null | tail -n +4 | xargs -r rm -rf
  ls -1dt "$cache"/vmlinux-"$kver"-* 2>/dev/null | tail -n +3 | xargs -r rm -rf
else
  log "initramfs cached ($initrd_dir)"
fi

echo "vmlinux=$vmlinux_dir/vmlinux"
echo "initramfs=$initrd_dir/initramfs.cpio.lz4"
