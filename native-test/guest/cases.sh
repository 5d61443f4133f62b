# The kernel-test cases the guest runs against the NBD server on the host
# (issue 3, "What must work"). Sourced by /init after tap.sh; each case_* function
# is a short list of named steps and stops at its first failed step, cleaning up
# so the next case starts from a disconnected device.
# Parameters come from the kernel command line, parsed by /init into DVT_* variables.

MIB=1048576

# ---- helpers (run inside steps; their output lands in the step's diagnostics) ----

dev_sys() { echo "/sys/block/${1#/dev/}"; }

# wait_size DEV WANT_NONZERO(1|0) SECS: wait for the device size to become
# non-zero (connected) or zero (disconnected)
wait_size() {
  local sysd size i=0
  sysd=$(dev_sys "$1")
  while [ $i -lt $(($3 * 10)) ]; do
    size=$(cat "$sysd/size" 2>/dev/null || echo 0)
    if [ "$2" = 1 ] && [ "$size" != 0 ]; then return 0; fi
    if [ "$2" = 0 ] && [ "$size" = 0 ]; then return 0; fi
    sleep 0.1
    i=$((i + 1))
  done
  echo "$1: size is still $size sectors after $3 s"
  return 1
}

# connect DEV [nbd-client options...]: connect to the server, wait for the size
connect() {
  local dev="$1" port="$DVT_PORT"
  shift
  case " $* " in (*" -N $DVT_RO_EXPORT "*) port="$DVT_RO_PORT" ;; esac
  echo "nbd-client $DVT_HOST $port $dev -t $DVT_IO_TIMEOUT $*"
  timeout 30 nbd-client "$DVT_HOST" "$port" "$dev" -t "$DVT_IO_TIMEOUT" "$@" || return 1
  wait_size "$dev" 1 10 || return 1
  describe_dev "$dev"
}

describe_dev() {
  local sysd
  sysd=$(dev_sys "$1")
  note "$1: $(( $(cat "$sysd/size") * 512 )) bytes, logical block size $(cat "$sysd/queue/logical_block_size"), ro=$(cat "$sysd/ro")"
}

# expect_dev DEV BYTES LOGICAL_BLOCK_SIZE: the size and block size the client set
expect_dev() {
  local sysd bytes lbs
  sysd=$(dev_sys "$1")
  bytes=$(( $(cat "$sysd/size") * 512 ))
  lbs=$(cat "$sysd/queue/logical_block_size")
  echo "$1: $bytes bytes (want $2), logical block size $lbs (want $3)"
  [ "$bytes" = "$2" ] && [ "$lbs" = "$3" ]
}

disconnect() {
  timeout 20 nbd-client -d "$1" || return 1
  wait_size "$1" 0 10
}

# quiet best-effort cleanup after a failed case; never reported as a step
cleanup_dev() {
  local dev="$1" mnt="$2"
  if [ -n "$mnt" ] && grep -q " $mnt " /proc/mounts; then
    timeout 20 umount "$mnt" > /dev/null 2>&1 || umount -l "$mnt" > /dev/null 2>&1
  fi
  timeout 20 nbd-client -d "$dev" > /dev/null 2>&1
  return 0
}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# test data, made once per boot: 64 small files of varied sizes and a 32 MiB file
make_data() {
  local i
  mkdir -p /tmp/data
  i=1
  while [ $i -le 64 ]; do
    head -c $((i * 1531 + 17)) /dev/urandom > /tmp/data/small-$i.bin || return 1
    i=$((i + 1))
  done
  dd if=/dev/urandom of=/tmp/data/big.bin bs=$MIB count=32 2> /dev/null || return 1
  (cd /tmp/data && sha256sum *) > /tmp/data.sums || return 1
  note "$(wc -l < /tmp/data.sums) files, $(du -sk /tmp/data | cut -f1) KiB"
}

copy_data() { cp /tmp/data/* "$1"/ && ls "$1" | wc -l; }
verify_data() { (cd "$1" && sha256sum -c /tmp/data.sums > /tmp/verify.out 2>&1); local rc=$?; grep -v ': OK$' /tmp/verify.out; echo "$(grep -c ': OK$' /tmp/verify.out) files OK"; return $rc; }

# ---- cases ----------------------------------------------------------------------

# connection handling that needs no file system
case_connect() {
  step "connect: unknown export name is refused" refuse_unknown_export
}
refuse_unknown_export() {
  if timeout 20 nbd-client "$DVT_HOST" "$DVT_PORT" /dev/nbd7 -N no-such-export-dvt; then
    echo "nbd-client connected to an export that does not exist"
    cleanup_dev /dev/nbd7
    return 1
  fi
  [ "$(cat /sys/block/nbd7/size)" = 0 ]
}

# fs_case FS DEV CONNECT_ARGS: mkfs, mount, write, remount, verify, fsck.
# xfs also disconnects and reconnects before the remount, so the verify reads
# come from the server and not from a page cache.
fs_case() {
  local fs="$1" dev="$2" args="$3" want_bs="$4" mnt="/mnt/$1"
  mkdir -p "$mnt"
  # shellcheck disable=SC2086
  step "$fs: connect ($args)" connect "$dev" $args || { cleanup_dev "$dev"; return; }
  step "$fs: device is $DVT_SIZE bytes with $want_bs-byte blocks" expect_dev "$dev" "$DVT_SIZE" "$want_bs"
  if [ "$fs" = ext4 ]; then
    step "$fs: mkfs.ext4" mkfs.ext4 -F -q "$dev" || { cleanup_dev "$dev"; return; }
  else
    step "$fs: mkfs.xfs" mkfs.xfs -f -q "$dev" || { cleanup_dev "$dev"; return; }
  fi
  step "$fs: mount" mount -t "$fs" "$dev" "$mnt" || { cleanup_dev "$dev"; return; }
  step "$fs: write 64 files and a 32 MiB file" copy_data "$mnt" || { cleanup_dev "$dev" "$mnt"; return; }
  step "$fs: sync" sync || { cleanup_dev "$dev" "$mnt"; return; }
  step "$fs: umount after writing" umount "$mnt" || { cleanup_dev "$dev" "$mnt"; return; }
  if [ "$fs" = xfs ]; then
    step "$fs: disconnect before remount" disconnect "$dev" || { cleanup_dev "$dev"; return; }
    # shellcheck disable=SC2086
    step "$fs: reconnect ($args)" connect "$dev" $args || { cleanup_dev "$dev"; return; }
  fi
  step "$fs: drop caches" drop_caches
  step "$fs: remount" mount -t "$fs" "$dev" "$mnt" || { cleanup_dev "$dev"; return; }
  step "$fs: sha256 of every file matches" verify_data "$mnt"
  step "$fs: umount after verifying" umount "$mnt" || { cleanup_dev "$dev" "$mnt"; return; }
  if [ "$fs" = ext4 ]; then
    step "$fs: e2fsck -fn finds no errors" e2fsck -fn "$dev"
  else
    step "$fs: xfs_repair -n finds no errors" xfs_repair -n "$dev"
  fi
  step "$fs: disconnect" disconnect "$dev" || cleanup_dev "$dev"
}

case_ext4() { fs_case ext4 /dev/nbd0 "-N $DVT_EXT4_EXPORT" 512; }
# xfs uses the default export (no -N) and 4096-byte blocks
case_xfs() { fs_case xfs /dev/nbd1 "-b 4096" 4096; }

# 512-byte sectors written one by one with O_DIRECT across a 4 KiB boundary, read
# back with 512- and 4096-byte blocks: the server must not lose or smear partial
# blocks (its tracking block is 4 KiB).
case_blocksize() {
  local dev=/dev/nbd2
  step "blocksize: connect with -b 512" connect "$dev" -N "$DVT_BS_EXPORT" -b 512 || { cleanup_dev "$dev"; return; }
  step "blocksize: logical block size is 512" expect_dev "$dev" "$DVT_SIZE" 512
  step "blocksize: write sectors 6-10 one at a time (O_DIRECT)" write_sectors "$dev" || { cleanup_dev "$dev"; return; }
  step "blocksize: read sectors 5-11 back with 512-byte reads" check_sectors "$dev" 512
  step "blocksize: disconnect (512)" disconnect "$dev" || { cleanup_dev "$dev"; return; }
  step "blocksize: connect with -b 4096" connect "$dev" -N "$DVT_BS_EXPORT" -b 4096 || { cleanup_dev "$dev"; return; }
  step "blocksize: logical block size is 4096" expect_dev "$dev" "$DVT_SIZE" 4096
  step "blocksize: read sectors 5-11 back with 4096-byte reads" check_sectors "$dev" 4096
  step "blocksize: 4 KiB O_DIRECT write and read back" rw_4k "$dev"
  step "blocksize: disconnect (4096)" disconnect "$dev" || cleanup_dev "$dev"
}
write_sectors() {
  local s
  head -c 2560 /dev/urandom > /tmp/sectors.bin
  # expected sectors 5..11: zero, the five written ones, zero (fresh volume)
  { head -c 512 /dev/zero; cat /tmp/sectors.bin; head -c 512 /dev/zero; } > /tmp/sectors.want
  for s in 0 1 2 3 4; do
    dd if=/tmp/sectors.bin of="$1" bs=512 skip=$s seek=$((s + 6)) count=1 oflag=direct conv=notrunc 2> /tmp/dd.err \
      || { cat /tmp/dd.err; return 1; }
  done
}
check_sectors() {
  if [ "$2" = 512 ]; then
    dd if="$1" of=/tmp/sectors.got bs=512 skip=5 count=7 iflag=direct 2> /dev/null || return 1
  else
    # sectors 0..15 in two 4 KiB reads, then cut out 5..11
    dd if="$1" of=/tmp/sectors.blk bs=4096 count=2 iflag=direct 2> /dev/null || return 1
    dd if=/tmp/sectors.blk of=/tmp/sectors.got bs=512 skip=5 count=7 2> /dev/null || return 1
  fi
  cmp /tmp/sectors.want /tmp/sectors.got && echo "sectors 5-11 as written"
}
rw_4k() {
  head -c 4096 /dev/urandom > /tmp/block.bin
  dd if=/tmp/block.bin of="$1" bs=4096 seek=3 count=1 oflag=direct conv=notrunc 2> /dev/null || return 1
  dd if="$1" of=/tmp/block.got bs=4096 skip=3 count=1 iflag=direct 2> /dev/null || return 1
  cmp /tmp/block.bin /tmp/block.got
}

# fio on the raw device: random 4k writes verified with crc32c, then 1M reads
case_fio() {
  local dev=/dev/nbd3
  step "fio: connect" connect "$dev" -N "$DVT_FIO_EXPORT" || { cleanup_dev "$dev"; return; }
  step "fio: 4k randwrite with verify=crc32c" fio_run randwrite "$dev" \
    --rw=randwrite --bs=4k --iodepth=16 --size="$DVT_SIZE" --io_size="$DVT_FIO_WRITE_MIB"M \
    --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0
  step "fio: 1M sequential read" fio_run seqread "$dev" \
    --rw=read --bs=1M --iodepth=4 --size="$DVT_SIZE" --runtime="$DVT_FIO_SECONDS" --time_based=0
  step "fio: disconnect" disconnect "$dev" || cleanup_dev "$dev"
}
fio_run() {
  local name="$1" dev="$2"
  shift 2
  fio --name="$name" --filename="$dev" --ioengine=libaio --direct=1 --numjobs=1 \
    --group_reporting "$@" > /tmp/fio.out 2>&1
  local rc=$?
  cat /tmp/fio.out
  note "$(grep -E '^ *(write|read|WRITE|READ):' /tmp/fio.out | sed 's/^ *//' | head -n 4)"
  grep -q 'err= 0' /tmp/fio.out || rc=1
  return $rc
}

# a read-only volume (an ext4 image the host put there): mount -o ro works, a raw
# write fails with an error, quickly
case_readonly() {
  local dev=/dev/nbd4 mnt=/mnt/ro
  mkdir -p "$mnt"
  step "readonly: connect" connect "$dev" -N "$DVT_RO_EXPORT" || { cleanup_dev "$dev"; return; }
  step "readonly: device is read-only" sh -c "test \"\$(cat $(dev_sys $dev)/ro)\" = 1"
  step "readonly: mount -o ro" mount -t ext4 -o ro "$dev" "$mnt" || { cleanup_dev "$dev"; return; }
  step "readonly: file written by the host has the right sha256" check_ro_file "$mnt"
  step "readonly: umount" umount "$mnt" || { cleanup_dev "$dev" "$mnt"; return; }
  step "readonly: O_DIRECT write fails (EPERM or EIO) within 20 s" write_must_fail "$dev"
  step "readonly: disconnect" disconnect "$dev" || cleanup_dev "$dev"
}
check_ro_file() {
  local got
  got=$(sha256sum "$1/$DVT_RO_FILE" | cut -d' ' -f1)
  echo "$DVT_RO_FILE: $got (want $DVT_RO_SHA)"
  [ "$got" = "$DVT_RO_SHA" ]
}
write_must_fail() {
  local t0 t1 rc
  t0=$(now_ms)
  timeout -s KILL 20 dd if=/dev/zero of="$1" bs=4096 count=1 oflag=direct conv=notrunc > /tmp/rowrite.out 2>&1
  rc=$?
  t1=$(now_ms)
  cat /tmp/rowrite.out
  note "dd exit $rc after $((t1 - t0)) ms: $(grep -v records /tmp/rowrite.out | head -n 2)"
  if [ $rc -eq 0 ]; then echo "the write succeeded on a read-only export"; return 1; fi
  if [ $((t1 - t0)) -ge 19000 ]; then echo "the write hung until killed"; return 1; fi
  return 0
}

# Restart resilience: ioctl mode with -persist, a mounted ext4 with synced files
# and raw O_DIRECT writes (acknowledged, never flushed by the client); the host
# restarts the daemon; then report what the kernel client did, and check that
# everything acknowledged before the restart is still there.
RST_RAW_SEEK_MIB=768
case_restart() {
  local dev=/dev/nbd5 mnt=/mnt/rst fresh=/dev/nbd6 nl=/dev/nbd8
  mkdir -p "$mnt"
  step "restart: connect in ioctl mode with -persist (-L -p)" connect_persist "$dev" || { cleanup_dev "$dev"; return; }
  step "restart: mkfs.ext4 on the first 256 MiB" mkfs.ext4 -F -q "$dev" 256M || { cleanup_dev "$dev"; return; }
  # no background inode-table zeroing or bitmap prefetch: the device is really idle
  step "restart: mount" mount -t ext4 -o noinit_itable,no_prefetch_block_bitmaps "$dev" "$mnt" || { cleanup_dev "$dev"; return; }
  step "restart: write files and sync" sh -c "cp /tmp/data/* $mnt/ && sync" || { cleanup_dev "$dev" "$mnt"; return; }
  step "restart: 4 MiB O_DIRECT write at 768 MiB, no flush" raw_write "$dev" || { cleanup_dev "$dev" "$mnt"; return; }
  # for comparison, the same export on a second device in netlink mode (reads only)
  step "restart: connect a second device in netlink mode" connect "$nl" -N "$DVT_RST_EXPORT" || cleanup_dev "$nl"
  step "restart: host restarts the daemon" request_restart || { cleanup_dev "$dev" "$mnt"; cleanup_dev "$nl"; return; }
  step "restart: what the kernel client did" observe_client "$dev"
  todo_step "restart: device serves reads again without help" "kernel nbd client (ioctl mode) does not recover" \
    timeout 20 dd if="$dev" of=/dev/null bs=4096 count=16 skip=$((RST_RAW_SEEK_MIB * 256)) iflag=direct
  todo_step "restart: netlink-mode device serves reads again without help" "kernel nbd client (netlink mode) does not recover" \
    timeout 20 dd if="$nl" of=/dev/null bs=4096 count=16 skip=$((RST_RAW_SEEK_MIB * 256)) iflag=direct
  step "restart: disconnect the netlink-mode device" disconnect_any "$nl"
  todo_step "restart: mounted file system still reads back" "kernel nbd client (ioctl mode) does not recover" \
    timeout 30 sh -c "echo 3 > /proc/sys/vm/drop_caches; cd $mnt && sha256sum -c /tmp/data.sums > /dev/null"
  step "restart: umount the file system mounted before the restart" umount_any "$mnt"
  step "restart: disconnect the old device" disconnect_any "$dev"
  step "restart: connect a fresh device" connect "$fresh" -N "$DVT_RST_EXPORT" || { cleanup_dev "$fresh"; return; }
  step "restart: raw O_DIRECT data written before the restart is intact" raw_check "$fresh"
  # read-write mount: replays the journal if the old mount could not finish it
  step "restart: mount again" mount -t ext4 "$fresh" "$mnt" || { cleanup_dev "$fresh"; return; }
  step "restart: files synced before the restart are intact" verify_data "$mnt"
  step "restart: umount" umount "$mnt" || { cleanup_dev "$fresh" "$mnt"; return; }
  step "restart: e2fsck -fn finds no errors" e2fsck -fn "$fresh"
  step "restart: disconnect" disconnect "$fresh" || cleanup_dev "$fresh"
}
# nbd-client stays in the foreground (-n) in the background, so its messages about
# the lost connection and its reconnect attempts land in a log we can report
connect_persist() {
  local dev="$1"
  echo "nbd-client $DVT_HOST $DVT_PORT $dev -t $DVT_IO_TIMEOUT -N $DVT_RST_EXPORT -L -p -n"
  nbd-client "$DVT_HOST" "$DVT_PORT" "$dev" -t "$DVT_IO_TIMEOUT" -N "$DVT_RST_EXPORT" -L -p -n > /tmp/nbd-client-persist.log 2>&1 &
  RST_CLIENT_PID=$!
  wait_size "$dev" 1 20 || { cat /tmp/nbd-client-persist.log; return 1; }
  cat /tmp/nbd-client-persist.log
  describe_dev "$dev"
}
raw_write() {
  dd if=/dev/urandom of=/tmp/raw.bin bs=$MIB count=4 2> /dev/null || return 1
  dd if=/tmp/raw.bin of="$1" bs=$MIB seek=$RST_RAW_SEEK_MIB count=4 oflag=direct conv=notrunc 2> /tmp/dd.err \
    || { cat /tmp/dd.err; return 1; }
  dd if="$1" of=/tmp/raw.got bs=$MIB skip=$RST_RAW_SEEK_MIB count=4 iflag=direct 2> /dev/null || return 1
  cmp /tmp/raw.bin /tmp/raw.got
}
raw_check() {
  timeout 30 dd if="$1" of=/tmp/raw.got bs=$MIB skip=$RST_RAW_SEEK_MIB count=4 iflag=direct 2> /dev/null || return 1
  cmp /tmp/raw.bin /tmp/raw.got && echo "4 MiB at $RST_RAW_SEEK_MIB MiB as written"
}
# nbd-client -d on a device that may be half dead; reports rather than fails
disconnect_any() {
  timeout 20 nbd-client -d "$1"
  local rc=$? i=0
  note "nbd-client -d exit $rc; size now $(( $(cat "$(dev_sys "$1")/size") * 512 )) bytes"
  [ "$1" = /dev/nbd5 ] || return 0
  # the -persist client should now give up; reap it (bounded)
  while kill -0 "$RST_CLIENT_PID" 2> /dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  kill -0 "$RST_CLIENT_PID" 2> /dev/null && { note "nbd-client -persist still running after -d: killed"; kill -9 "$RST_CLIENT_PID"; }
  cat /tmp/nbd-client-persist.log
  return 0
}
umount_any() {
  grep -q " $1 " /proc/mounts || { note "not mounted any more"; return 0; }
  if timeout 30 umount "$1"; then note "clean umount"; return 0; fi
  umount -l "$1" && note "umount failed, lazy umount used"
}

# ask_host REQUEST OK FAIL SECS: tell the host (a TAP comment "# REQUEST" on ttyS1)
# and wait for its answer on the console serial port (ttyS0 input), written by the
# harness once it has done the work: a line holding OK (returns 0, the rest of the
# line in HOST_ANSWER) or FAIL (returns 1).
ask_host() {
  local line deadline
  HOST_ANSWER=""
  tap "# $1"
  deadline=$(( $(now_ms) + $4 * 1000 ))
  while [ "$(now_ms)" -lt $deadline ]; do
    line=""
    read -t 5 line < /dev/console
    case "$line" in
      (*"$2"*) HOST_ANSWER="${line#*"$2"}"; return 0 ;;
      (*"$3"*) echo "host: $line"; return 1 ;;
    esac
  done
  echo "no answer from the host within $4 s"
  return 1
}

# the harness answers once the new daemon listens
request_restart() {
  RST_T0=$(now_ms)
  dmesg -c > /dev/null
  ask_host deltavol-restart-request deltavol-restarted deltavol-restart-failed "$DVT_RESTART_WAIT" || return 1
  RST_T1=$(now_ms)
  note "host:${HOST_ANSWER}; answer after $((RST_T1 - RST_T0)) ms"
}

# wait up to DVT_RECONNECT_WAIT s for the device to work again, then describe
# what happened (always passes: the observation goes into the diagnostics)
observe_client() {
  local dev="$1" sysd i=0 ok=no
  sysd=$(dev_sys "$dev")
  while [ $i -lt "$DVT_RECONNECT_WAIT" ]; do
    if timeout 5 dd if="$dev" of=/dev/null bs=4096 count=1 iflag=direct 2> /dev/null; then ok=yes; break; fi
    # nothing else would reconnect the device once the -persist client is gone
    kill -0 "$RST_CLIENT_PID" 2> /dev/null || break
    sleep 1
    i=$((i + 1))
  done
  note "device readable again: $ok (after ${i}s of polling, $(( $(now_ms) - RST_T1 )) ms after the new daemon was up)"
  local chk chk_rc
  chk=$(nbd-client -c "$dev" 2>&1)
  chk_rc=$?
  note "size now $(( $(cat "$sysd/size") * 512 )) bytes; nbd-client -c: exit $chk_rc, '$(echo $chk)' (pid file: $(cat "$sysd/pid" 2>/dev/null || echo none))"
  if kill -0 "$RST_CLIENT_PID" 2> /dev/null; then note "nbd-client -persist (pid $RST_CLIENT_PID) still running"; else note "nbd-client -persist (pid $RST_CLIENT_PID) has exited"; fi
  while read -r l; do note "nbd-client: $l"; done < /tmp/nbd-client-persist.log
  # kernel messages since the restart request, without the flood of per-request I/O errors
  dmesg > /tmp/dmesg.all
  note "dmesg: $(grep -cE 'I/O error' /tmp/dmesg.all) I/O error lines since the restart request"
  grep -iE 'nbd|ext4|jbd2|block' /tmp/dmesg.all | grep -vE 'I/O error' | head -n 12 > /tmp/dmesg.nbd
  while read -r l; do note "dmesg: $l"; done < /tmp/dmesg.nbd
  cat /tmp/dmesg.all
  return 0
}

# Snapshot export (issue 3, issue 4): an ext4 on the volume stays mounted while the
# host takes a snapshot; the volume keeps changing; the snapshot export
# VOLUME@SNAPSHOT, connected on a second device and mounted -o ro,noload, shows
# exactly the files present at snapshot time, also while a writer keeps changing the
# volume. The file system is frozen (fsfreeze: no write in flight, the ext4 journal
# checkpointed) for the instant of the snapshot, because -o noload does not replay a
# journal (native-test/README.md, "Snapshot case").
SNAP_NAME=s1
case_snapshot() {
  local dev=/dev/nbd9 sdev=/dev/nbd10 mnt=/mnt/snapvol smnt=/mnt/snap
  mkdir -p "$mnt" "$smnt"
  step "snapshot: connect the volume" connect "$dev" -N "$DVT_SNAP_EXPORT" || { cleanup_dev "$dev"; return; }
  step "snapshot: mkfs.ext4 on the first 256 MiB" mkfs.ext4 -F -q "$dev" 256M || { cleanup_dev "$dev"; return; }
  step "snapshot: mount" mount -t ext4 -o noinit_itable "$dev" "$mnt" || { cleanup_dev "$dev"; return; }
  step "snapshot: write files and sync" snap_fill "$mnt" || { cleanup_dev "$dev" "$mnt"; return; }
  step "snapshot: freeze, host takes snapshot $DVT_SNAP_EXPORT@$SNAP_NAME, thaw" snap_take "$mnt" || { cleanup_dev "$dev" "$mnt"; return; }
  step "snapshot: delete, overwrite, append, rename and add files on the volume, sync" snap_change "$mnt" || { cleanup_dev "$dev" "$mnt"; return; }
  step "snapshot: the volume no longer holds the snapshot-time files" snap_differs "$mnt"
  step "snapshot: start a writer that keeps changing the volume" snap_churn_start "$mnt" || { cleanup_dev "$dev" "$mnt"; return; }
  step "snapshot: connect $DVT_SNAP_EXPORT@$SNAP_NAME on a second device" connect "$sdev" -N "$DVT_SNAP_EXPORT@$SNAP_NAME" \
    || { snap_churn_stop; cleanup_dev "$sdev"; cleanup_dev "$dev" "$mnt"; return; }
  step "snapshot: the snapshot device is read-only" sh -c "test \"\$(cat $(dev_sys $sdev)/ro)\" = 1"
  step "snapshot: mount -o ro,noload" mount -t ext4 -o ro,noload "$sdev" "$smnt" \
    || { snap_churn_stop; cleanup_dev "$sdev"; cleanup_dev "$dev" "$mnt"; return; }
  step "snapshot: exactly the snapshot-time files, by sha256, while the volume changes" snap_check "$smnt"
  step "snapshot: drop caches, the same files read again from the server" snap_check_cold "$smnt"
  step "snapshot: the writer changed the volume meanwhile" snap_churn_stop
  step "snapshot: umount the snapshot" umount "$smnt" || { cleanup_dev "$sdev" "$smnt"; cleanup_dev "$dev" "$mnt"; return; }
  step "snapshot: e2fsck -fn on the snapshot finds no errors" e2fsck -fn "$sdev"
  step "snapshot: O_DIRECT write to the snapshot device fails within 20 s" write_must_fail "$sdev"
  step "snapshot: disconnect the snapshot" disconnect "$sdev" || cleanup_dev "$sdev"
  step "snapshot: the volume still holds its post-snapshot files" snap_live_check "$mnt"
  step "snapshot: umount the volume" umount "$mnt" || { cleanup_dev "$dev" "$mnt"; return; }
  step "snapshot: e2fsck -fn on the volume finds no errors" e2fsck -fn "$dev"
  step "snapshot: disconnect the volume" disconnect "$dev" || cleanup_dev "$dev"
}
# snap_sums DIR: "sha256  ./path" of every file under DIR (but churn/), sorted by path
snap_sums() { (cd "$1" && find . -type f ! -path './churn/*' | sort | while read -r f; do sha256sum "$f"; done); }
snap_fill() {
  mkdir -p "$1/dir" || return 1
  cp /tmp/data/small-* "$1/" || return 1
  cp /tmp/data/big.bin "$1/dir/" || return 1
  dd if=/dev/urandom of="$1/rewrite.bin" bs=$MIB count=8 2> /dev/null || return 1
  sync || return 1
  snap_sums "$1" > /tmp/snap.sums || return 1
  echo "$(wc -l < /tmp/snap.sums) files"
}
snap_take() {
  local rc t0
  fsfreeze --freeze "$1" || return 1
  t0=$(now_ms)
  ask_host "deltavol-snapshot-request $DVT_SNAP_EXPORT $SNAP_NAME" deltavol-snapshot-created deltavol-snapshot-failed 60
  rc=$?
  note "host:${HOST_ANSWER}; answer after $(( $(now_ms) - t0 )) ms (file system frozen meanwhile)"
  fsfreeze --unfreeze "$1" || return 1
  return $rc
}
snap_change() {
  local i
  for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do rm "$1/small-$i.bin" || return 1; done
  dd if=/dev/urandom of="$1/dir/big.bin" bs=$MIB seek=8 count=4 conv=notrunc 2> /dev/null || return 1
  head -c 5000 /dev/urandom >> "$1/small-30.bin" || return 1
  mv "$1/small-40.bin" "$1/dir/renamed-40.bin" || return 1
  for i in 1 2 3 4 5 6 7 8; do head -c $((i * 40000)) /dev/urandom > "$1/new-$i.bin" || return 1; done
  sync || return 1
  snap_sums "$1" > /tmp/live.sums || return 1
  echo "$(wc -l < /tmp/live.sums) files now"
}
snap_differs() {
  if diff /tmp/snap.sums /tmp/live.sums > /tmp/snap.diff; then echo "the volume's files equal the snapshot's"; return 1; fi
  echo "$(grep -c '^[-+][0-9a-f]' /tmp/snap.diff) lines differ"
}
# background writer: new files in churn/, and rewrite.bin (which the snapshot holds)
# overwritten in place, synced often, until /tmp/churn.stop appears (at most ~200 rounds)
snap_churn() {
  local i=0
  mkdir -p "$1/churn"
  while [ ! -e /tmp/churn.stop ] && [ $i -lt 200 ]; do
    head -c 131072 /dev/urandom > "$1/churn/f$((i % 6))" || break
    rm -f "$1/churn/f$(((i + 3) % 6))"
    dd if=/dev/urandom of="$1/rewrite.bin" bs=65536 seek=$(((i * 37) % 128)) count=1 conv=notrunc 2> /dev/null || break
    [ $((i % 3)) -ne 2 ] || sync
    i=$((i + 1))
    echo "$i" > /tmp/churn.count
  done
}
snap_churn_start() {
  rm -f /tmp/churn.stop /tmp/churn.count
  snap_churn "$1" > /tmp/churn.log 2>&1 &
  SNAP_CHURN_PID=$!
  echo "writer pid $SNAP_CHURN_PID"
}
snap_churn_stop() {
  local i=0
  touch /tmp/churn.stop
  while kill -0 "$SNAP_CHURN_PID" 2> /dev/null && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
  kill -0 "$SNAP_CHURN_PID" 2> /dev/null && { echo "writer still running after 20 s"; kill -9 "$SNAP_CHURN_PID"; return 1; }
  cat /tmp/churn.log
  note "writer: $(cat /tmp/churn.count 2> /dev/null || echo 0) rounds"
  [ "$(cat /tmp/churn.count 2> /dev/null || echo 0)" -ge 2 ]
}
snap_check() {
  snap_sums "$1" > /tmp/snapro.sums || return 1
  if ! diff /tmp/snap.sums /tmp/snapro.sums; then echo "the snapshot differs from the files at snapshot time"; return 1; fi
  echo "$(wc -l < /tmp/snapro.sums) files, names and sha256 as at snapshot time"
}
snap_check_cold() { drop_caches && snap_check "$1"; }
snap_live_check() {
  snap_sums "$1" | grep -v ' ./rewrite.bin$' > /tmp/live.now || return 1
  grep -v ' ./rewrite.bin$' /tmp/live.sums | diff - /tmp/live.now || return 1
  echo "$(wc -l < /tmp/live.now) files as changed after the snapshot"
}
