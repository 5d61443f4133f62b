# Why this exists: the guest half of the kernel test's file-level restore case (seed 003,
# issue 13; native-test/README.md, "File restore case"). Files deleted or overwritten on
# primary A come back from a snapshot of replica B, mounted read-only through the kernel
# client and copied over: the path the README shows for restoring single files. Runs on
# the failover case's volume and daemons, before that case formats the volume again.
#
# Host request (TAP comment on ttyS1; answer on the console, see ask_host):
#   # deltavol-filerestore-snapshot-request EXPORT -> deltavol-filerestore-done port=B_NBD_PORT snapshot=NAME set=S
# (or deltavol-filerestore-failed with the host's error)

FR_DIR=/tmp/fr

case_filerestore() {
  local dev=/dev/nbd13 sdev=/dev/nbd14 mnt=/mnt/fr smnt=/mnt/fr-snap
  mkdir -p "$mnt" "$smnt"
  rm -rf "$FR_DIR"
  mkdir -p "$FR_DIR"
  step "filerestore: connect $DVT_FO_EXPORT on primary A (port $DVT_FO_PORT)" fo_connect "$dev" "$DVT_FO_PORT" "$DVT_FO_EXPORT" || { cleanup_dev "$dev"; return; }
  step "filerestore: mkfs.ext4 and mount" fr_mkfs "$dev" "$mnt" || { cleanup_dev "$dev" "$mnt"; return; }
  step "filerestore: write 16 files and sync" fr_fill "$mnt" || { cleanup_dev "$dev" "$mnt"; return; }
  step "filerestore: freeze; host cuts a set on A, waits until B played it, snapshots the volume on B; thaw" fr_snapshot "$mnt" \
    || { cleanup_dev "$dev" "$mnt"; return; }
  step "filerestore: delete f3, overwrite f7 in place, sync: the files differ from what was written" fr_damage "$mnt" || { cleanup_dev "$dev" "$mnt"; return; }
  step "filerestore: connect $DVT_FO_EXPORT@$FR_SNAP on replica B (port $FR_B_PORT)" fo_connect "$sdev" "$FR_B_PORT" "$DVT_FO_EXPORT@$FR_SNAP" \
    || { cleanup_dev "$sdev"; cleanup_dev "$dev" "$mnt"; return; }
  step "filerestore: the snapshot device is read-only" sh -c "test \"\$(cat $(dev_sys $sdev)/ro)\" = 1"
  step "filerestore: mount the snapshot -o ro,noload" mount -t ext4 -o ro,noload "$sdev" "$smnt" || { cleanup_dev "$sdev"; cleanup_dev "$dev" "$mnt"; return; }
  step "filerestore: copy f3 and f7 back from the snapshot, sync" fr_copy_back "$smnt" "$mnt"
  step "filerestore: every file on A is as written (sha256)" fr_check "$mnt"
  step "filerestore: umount the snapshot" umount "$smnt" || cleanup_dev "$sdev" "$smnt"
  step "filerestore: disconnect the snapshot" disconnect "$sdev" || cleanup_dev "$sdev"
  step "filerestore: umount A" umount "$mnt" || { cleanup_dev "$dev" "$mnt"; return; }
  step "filerestore: e2fsck -fn on A finds no errors" e2fsck -fn "$dev"
  step "filerestore: disconnect A" disconnect "$dev" || cleanup_dev "$dev"
}

fr_mkfs() {
  mkfs.ext4 -F -q "$1" || return 1
  mount -t ext4 -o noinit_itable "$1" "$2"
}

# f1..f16 of 1 B .. ~190 KiB of random bytes; their sums are what must come back
fr_fill() {
  local i
  mkdir -p "$1/docs" || return 1
  for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do
    head -c $(( (i * 12289) % 196608 + 1 )) /dev/urandom > "$1/docs/f$i" || return 1
  done
  sync -f "$1" || return 1
  (cd "$1/docs" && sha256sum f*) > "$FR_DIR/want.sums" || return 1
  echo "$(wc -l < "$FR_DIR/want.sums") files"
}

fr_snapshot() {
  local rc t0
  fsfreeze --freeze "$1" || return 1
  t0=$(now_ms)
  ask_host "deltavol-filerestore-snapshot-request $DVT_FO_EXPORT" deltavol-filerestore-done deltavol-filerestore-failed 60
  rc=$?
  note "host:${HOST_ANSWER}; answer after $(( $(now_ms) - t0 )) ms (file system frozen meanwhile)"
  fsfreeze --unfreeze "$1" || return 1
  FR_B_PORT=$(echo "$HOST_ANSWER" | sed -n 's/.*port=\([0-9]*\).*/\1/p')
  FR_SNAP=$(echo "$HOST_ANSWER" | sed -n 's/.*snapshot=\([^ ]*\).*/\1/p')
  [ $rc -eq 0 ] && [ -n "$FR_B_PORT" ] && [ -n "$FR_SNAP" ]
}

fr_damage() {
  rm "$1/docs/f3" || return 1
  dd if=/dev/urandom of="$1/docs/f7" bs=4096 count=4 conv=notrunc 2> /dev/null || return 1
  sync -f "$1" || return 1
  (cd "$1/docs" && sha256sum f*) > "$FR_DIR/damaged.sums" || return 1
  if diff "$FR_DIR/want.sums" "$FR_DIR/damaged.sums" > "$FR_DIR/damage.diff"; then echo "the damage changed nothing"; return 1; fi
  note "damaged: $(grep -c '^[<>]' "$FR_DIR/damage.diff") differing lines"
}

fr_copy_back() {
  cp "$1/docs/f3" "$1/docs/f7" "$2/docs/" || return 1
  sync -f "$2"
}

fr_check() {
  (cd "$1/docs" && sha256sum f*) > "$FR_DIR/got.sums" || return 1
  if ! diff "$FR_DIR/want.sums" "$FR_DIR/got.sums"; then echo "files differ from what was written"; return 1; fi
  echo "$(wc -l < "$FR_DIR/got.sums") files as written"
}
