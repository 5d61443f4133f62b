# Why this exists: the guest half of the kernel test's failover case (sourced by
# /init after cases.sh; native-test/README.md, "Failover case"). A kernel-mounted
# ext4 on primary A takes a stream of new files while the host kills A with -9 and
# runs `deltavol failover` on its replica B; the guest then mounts the same file
# system from B and checks that every file synced before the last set the host saw
# B play is intact, and that no later file is corrupt (intact, cut short or absent).
#
# Host requests (TAP comments on ttyS1; answers on the console, see ask_host):
#   # deltavol-failover-cut-request EXPORT   -> deltavol-failover-cut-done set=S played=P wait=MSms host=MSms
#   # deltavol-failover-crash-request EXPORT -> deltavol-failover-done port=B_NBD_PORT rto=MSms host=MSms
# (or deltavol-failover-cut-failed / deltavol-failover-failed with the host's error)

FO_DIR=/tmp/fo
FO_SYNC_EVERY=8        # the writer syncs (syncfs) after every 8th file
FO_BEFORE_CUT=24       # files synced before the host is asked to cut
FO_AFTER_CUT=16        # more files synced after the cut before the crash (these may be lost)
FO_MAX_FILES=4000      # bound on the writer
FO_COVERED=0
FO_REPLAY=0

case_failover() {
  local dev=/dev/nbd11 ndev=/dev/nbd12 mnt=/mnt/fo nmnt=/mnt/fo-b
  mkdir -p "$mnt" "$nmnt"
  rm -rf "$FO_DIR"
  mkdir -p "$FO_DIR/src"
  FO_WRITER_PID=""
  step "failover: connect $DVT_FO_EXPORT on primary A (port $DVT_FO_PORT)" fo_connect "$dev" "$DVT_FO_PORT" || { fo_cleanup "$dev" "$mnt"; return; }
  step "failover: mkfs.ext4" mkfs.ext4 -F -q "$dev" || { fo_cleanup "$dev" "$mnt"; return; }
  step "failover: mount" mount -t ext4 -o noinit_itable "$dev" "$mnt" || { fo_cleanup "$dev" "$mnt"; return; }
  step "failover: start a writer (new files of known content, syncfs every $FO_SYNC_EVERY files)" fo_writer_start "$mnt" \
    || { fo_cleanup "$dev" "$mnt"; return; }
  step "failover: the writer has synced $FO_BEFORE_CUT files" fo_wait_synced "$FO_BEFORE_CUT" 40 || { fo_cleanup "$dev" "$mnt"; return; }
  step "failover: host cuts a set on A and waits until B played it: files synced before are covered" fo_cover \
    || { fo_cleanup "$dev" "$mnt"; return; }
  step "failover: the writer syncs $FO_AFTER_CUT more files (not covered: they may be lost)" fo_wait_synced_more "$FO_AFTER_CUT" 40 \
    || { fo_cleanup "$dev" "$mnt"; return; }
  step "failover: host kills A (kill -9) and runs deltavol failover on B" fo_crash || { fo_cleanup "$dev" "$mnt"; return; }
  # the writer's next I/O fails at once, or it waits on a request that was in flight when
  # A died: the kernel ends those at the I/O timeout (-t) or at nbd-client -d, so the
  # device is disconnected before the writer is waited for
  step "failover: ask the writer to stop (I/O errors from the dead device are expected)" fo_writer_ask_stop 3
  step "failover: unmount the file system of the dead device" fo_umount_dead "$mnt"
  step "failover: disconnect the dead device" disconnect_any "$dev"
  step "failover: the writer has stopped" fo_writer_stop
  step "failover: connect $DVT_FO_EXPORT on B, the new primary (port $FO_B_PORT)" fo_connect "$ndev" "$FO_B_PORT" \
    || { fo_cleanup "$ndev" "$nmnt"; return; }
  step "failover: the device on B is writable" fo_writable "$ndev"
  step "failover: e2fsck -fn on B: clean, or only its journal to replay" fo_fsck_first "$ndev" || { fo_cleanup "$ndev" "$nmnt"; return; }
  if [ "$FO_REPLAY" = 1 ]; then
    step "failover: mount read-write once to replay the journal, umount" fo_replay "$ndev" "$nmnt" || { fo_cleanup "$ndev" "$nmnt"; return; }
    step "failover: e2fsck -fn after the journal replay finds no errors" e2fsck -fn "$ndev"
  fi
  step "failover: mount on B" mount -t ext4 "$ndev" "$nmnt" || { fo_cleanup "$ndev" "$nmnt"; return; }
  step "failover: every file up to the covered one is on B, intact" fo_check_covered "$nmnt"
  step "failover: later files are intact, cut short or absent, never corrupt" fo_check_later "$nmnt"
  step "failover: a new file written on B reads back" fo_write_new "$nmnt"
  step "failover: umount on B" umount "$nmnt" || { fo_cleanup "$ndev" "$nmnt"; return; }
  step "failover: e2fsck -fn on B finds no errors" e2fsck -fn "$ndev"
  step "failover: disconnect from B" disconnect "$ndev" || cleanup_dev "$ndev"
}

# quiet best-effort cleanup after a failed step: unmount and disconnect first (a writer
# blocked on a dead device is released by the disconnect), then stop the writer
fo_cleanup() {
  [ -d "$FO_DIR" ] && touch "$FO_DIR/stop"
  if grep -q " $2 " /proc/mounts; then timeout 20 umount "$2" > /dev/null 2>&1 || umount -l "$2" > /dev/null 2>&1; fi
  if grep -q " /mnt/fo " /proc/mounts; then umount -l /mnt/fo > /dev/null 2>&1; fi
  cleanup_dev "$1"
  cleanup_dev /dev/nbd11
  fo_writer_stop > /dev/null 2>&1
}

# fo_connect DEV PORT [EXPORT]: EXPORT defaults to the failover volume
fo_connect() {
  local name="${3:-$DVT_FO_EXPORT}"
  [ -n "$2" ] && [ "$2" != 0 ] || { echo "no port"; return 1; }
  echo "nbd-client $DVT_HOST $2 $1 -t $DVT_IO_TIMEOUT -N $name"
  timeout 30 nbd-client "$DVT_HOST" "$2" "$1" -t "$DVT_IO_TIMEOUT" -N "$name" || return 1
  wait_size "$1" 1 10 || return 1
  describe_dev "$1"
}

# fo_num NAME: a number the writer keeps in $FO_DIR/NAME (0 when not there yet)
fo_num() {
  local v
  v=$(cat "$FO_DIR/$1" 2> /dev/null)
  echo "${v:-0}"
}

# The writer: file w/fN holds a random 1 B .. 48 KiB, kept in $FO_DIR/src/fN to check
# against. "started" is the last file it began to write; "synced" (replaced by a
# rename, so never read half written) the last one a successful syncfs covered.
fo_writer() {
  local mnt="$1" i=0 size up
  mkdir -p "$mnt/w" || return 1
  while [ ! -e "$FO_DIR/stop" ] && [ $i -lt $FO_MAX_FILES ]; do
    i=$((i + 1))
    size=$(( (i * 7919) % 49152 + 1 ))
    head -c $size /dev/urandom > "$FO_DIR/src/f$i" || return 1
    echo $i > "$FO_DIR/started.tmp" && mv "$FO_DIR/started.tmp" "$FO_DIR/started"
    if ! cp "$FO_DIR/src/f$i" "$mnt/w/f$i"; then
      read up _ < /proc/uptime
      echo "writer: writing f$i failed at uptime $up"
      echo $i > "$FO_DIR/failed"
      return 1
    fi
    if [ $((i % FO_SYNC_EVERY)) -eq 0 ]; then
      if ! sync -f "$mnt/w"; then
        read up _ < /proc/uptime
        echo "writer: syncfs after f$i failed at uptime $up"
        echo $i > "$FO_DIR/failed"
        return 1
      fi
      echo $i > "$FO_DIR/synced.tmp" && mv "$FO_DIR/synced.tmp" "$FO_DIR/synced"
      read up _ < /proc/uptime
      echo "synced f$i at uptime $up"
    fi
  done
  echo "writer: stopped after f$i"
}
fo_writer_start() {
  rm -f "$FO_DIR/stop"
  fo_writer "$1" > "$FO_DIR/writer.log" 2>&1 &
  FO_WRITER_PID=$!
  echo "writer pid $FO_WRITER_PID"
}
# fo_writer_ask_stop SECS: ask the writer to stop and wait up to SECS for it (reports
# only: a writer blocked on the dead device is waited for after the disconnect)
fo_writer_ask_stop() {
  local i=0
  touch "$FO_DIR/stop"
  while kill -0 "$FO_WRITER_PID" 2> /dev/null && [ $i -lt $(($1 * 10)) ]; do sleep 0.1; i=$((i + 1)); done
  if kill -0 "$FO_WRITER_PID" 2> /dev/null; then
    note "the writer is still running after $1 s (waiting on a request the dead connection will not answer?): $(tail -n 1 "$FO_DIR/writer.log")"
  else
    note "the writer has exited: $(tail -n 1 "$FO_DIR/writer.log")"
  fi
  return 0
}
fo_writer_stop() {
  local i=0
  [ -n "$FO_WRITER_PID" ] || return 0
  touch "$FO_DIR/stop"
  while kill -0 "$FO_WRITER_PID" 2> /dev/null && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
  if kill -0 "$FO_WRITER_PID" 2> /dev/null; then
    note "writer still running 20 s after the stop request: kill -9"
    kill -9 "$FO_WRITER_PID"
  fi
  FO_WRITER_PID=""
  cat "$FO_DIR/writer.log"
  note "writer: started f$(fo_num started), last synced f$(fo_num synced), failed at: $(cat "$FO_DIR/failed" 2> /dev/null || echo none); its last lines: $(tail -n 3 "$FO_DIR/writer.log" | tr '\n' ';')"
  return 0
}

# fo_wait_synced N SECS: wait until the writer has synced file N
fo_wait_synced() {
  local deadline
  deadline=$(( $(now_ms) + $2 * 1000 ))
  while [ "$(fo_num synced)" -lt "$1" ]; do
    if [ "$(now_ms)" -ge $deadline ]; then echo "only f$(fo_num synced) synced after $2 s (started f$(fo_num started))"; cat "$FO_DIR/writer.log"; return 1; fi
    kill -0 "$FO_WRITER_PID" 2> /dev/null || { echo "the writer died"; cat "$FO_DIR/writer.log"; return 1; }
    sleep 0.2
  done
  note "synced f$(fo_num synced), started f$(fo_num started)"
}
# fo_wait_synced_more N SECS: N files past the covered one, and at least one more syncfs
# after the host's answer (the writer may have gone far while the host worked)
fo_wait_synced_more() {
  local want=$((FO_COVERED + $1)) now
  now=$(( $(fo_num synced) + FO_SYNC_EVERY ))
  [ $now -gt $want ] && want=$now
  fo_wait_synced $want "$2"
}

# Every file up to the last one synced before the request is in a set the host cut
# after the request: once B has played that set, those files are B's.
fo_cover() {
  local t0
  FO_COVERED=$(fo_num synced)
  t0=$(now_ms)
  ask_host "deltavol-failover-cut-request $DVT_FO_EXPORT" deltavol-failover-cut-done deltavol-failover-cut-failed 40 || return 1
  note "covered: f1..f$FO_COVERED (synced before the request); host:${HOST_ANSWER}; answer after $(( $(now_ms) - t0 )) ms; the writer meanwhile started f$(fo_num started)"
}

fo_crash() {
  local t0 up
  read up _ < /proc/uptime
  FO_SYNCED_AT_CRASH=$(fo_num synced)
  FO_STARTED_AT_CRASH=$(fo_num started)
  dmesg -c > /dev/null
  t0=$(now_ms)
  ask_host "deltavol-failover-crash-request $DVT_FO_EXPORT" deltavol-failover-done deltavol-failover-failed 60 || return 1
  FO_B_PORT=$(echo "$HOST_ANSWER" | sed -n 's/.*port=\([0-9]*\).*/\1/p')
  note "at the request (uptime $up): synced f$FO_SYNCED_AT_CRASH, started f$FO_STARTED_AT_CRASH; host:${HOST_ANSWER}; answer after $(( $(now_ms) - t0 )) ms"
  [ -n "$FO_B_PORT" ]
}

# the mount of the dead device: a plain umount if it works, else a lazy one
fo_umount_dead() {
  dmesg > "$FO_DIR/dmesg.crash"
  note "dmesg since the crash request: $(grep -c 'I/O error' "$FO_DIR/dmesg.crash") I/O error lines; $(grep -iE 'nbd11|EXT4-fs.*nbd11|jbd2' "$FO_DIR/dmesg.crash" | grep -v 'I/O error' | head -n 3 | tr '\n' ';')"
  grep -q " $1 " /proc/mounts || { note "not mounted any more"; return 0; }
  if timeout 20 umount "$1"; then note "plain umount worked"; return 0; fi
  umount -l "$1" && note "plain umount failed: lazy umount (-l)"
}

fo_writable() {
  local ro
  ro=$(cat "$(dev_sys "$1")/ro")
  echo "$1: ro=$ro"
  [ "$ro" = 0 ]
}

# ext4's needs_recovery flag (s_feature_incompat bit 0x4, at byte 1024 + 0x60): the
# journal holds transactions not yet written home (set while mounted)
fo_needs_recovery() {
  local v
  v=$(dd if="$1" bs=4096 count=1 iflag=direct 2> /dev/null | od -An -tu4 -j 1120 -N 4 | tr -d ' ')
  [ -n "$v" ] && [ $((v & 4)) -ne 0 ]
}

# e2fsck -n does not replay a journal. A file system that was mounted when A died has
# needs_recovery set; then this e2fsck's verdict is only recorded (it checks the
# metadata as it was before the replay) and the replay (a read-write mount) comes next.
fo_fsck_first() {
  local rc
  FO_REPLAY=0
  e2fsck -fn "$1" > "$FO_DIR/fsck0.out" 2>&1
  rc=$?
  cat "$FO_DIR/fsck0.out"
  if fo_needs_recovery "$1"; then
    FO_REPLAY=1
    note "needs_recovery is set (the file system was mounted on A when A died): journal replay next; e2fsck -fn before it exit $rc: $(grep -iE 'journal|clean|files,' "$FO_DIR/fsck0.out" | head -n 3 | tr '\n' ';')"
    return 0
  fi
  note "journal clean: e2fsck -fn exit $rc"
  return $rc
}
fo_replay() {
  dmesg -c > /dev/null
  mount -t ext4 "$1" "$2" || return 1
  umount "$2" || return 1
  note "kernel: $(dmesg | grep -i 'EXT4-fs' | head -n 3 | tr '\n' ';')"
  if fo_needs_recovery "$1"; then echo "needs_recovery still set after a read-write mount"; return 1; fi
  echo "journal replayed: needs_recovery is clear"
}

# checksums of every source file and every file on B's volume, one sha256sum each
fo_sums() {
  (cd "$FO_DIR/src" && sha256sum f*) > "$FO_DIR/want.sums" || return 1
  (cd "$1/w" && ls) > "$FO_DIR/present" || return 1
  : > "$FO_DIR/got.sums"
  [ -s "$FO_DIR/present" ] || return 0
  (cd "$1/w" && sha256sum f*) > "$FO_DIR/got.sums" 2> "$FO_DIR/got.err"
  [ -s "$FO_DIR/got.err" ] && cat "$FO_DIR/got.err"
  return 0
}

fo_check_covered() {
  [ "$FO_COVERED" -gt 0 ] || { echo "no covered files"; return 1; }
  fo_sums "$1" || return 1
  awk -v cov="$FO_COVERED" '
    FNR == NR { want[$2] = $1; next }
    { got[$2] = $1 }
    END {
      for (i = 1; i <= cov; i++) {
        f = "f" i
        if (!(f in got)) { missing++; if (missing <= 10) print "missing: " f }
        else if (got[f] != want[f]) { bad++; if (bad <= 10) print "content differs: " f }
        else ok++
      }
      printf "f1..f%d: %d intact, %d missing, %d with other content\n", cov, ok, missing, bad
      exit (missing + bad > 0)
    }' "$FO_DIR/want.sums" "$FO_DIR/got.sums" > "$FO_DIR/covered.out"
  local rc=$?
  cat "$FO_DIR/covered.out"
  note "$(tail -n 1 "$FO_DIR/covered.out")"
  return $rc
}

# Files after the covered one: intact (sha256 as written), cut short (empty, or a
# prefix of what was written: data not yet written back when A died), or absent; any
# other content is corruption. Also none beyond what the writer started, and a count
# of the files synced before the crash request that B lacks (what async replication lost).
fo_check_later() {
  local started f n size want_size short=0 corrupt=0 unknown=0 lost_synced counts
  started=$FO_STARTED_AT_CRASH
  [ "$(fo_num started)" -gt "$started" ] && started=$(fo_num started)
  [ -e "$FO_DIR/got.sums" ] || fo_sums "$1" || return 1
  while read -r f; do
    case "$f" in
      (f[0-9]*) n=${f#f} ;;
      (*) unknown=$((unknown + 1)); echo "unexpected file w/$f"; continue ;;
    esac
    if [ "$n" -gt "$started" ]; then unknown=$((unknown + 1)); echo "w/$f: the writer never started it"; fi
  done < "$FO_DIR/present"
  # one line per file after the covered one: "intact N", "absent N" or "differs N"
  awk -v from=$((FO_COVERED + 1)) -v to="$started" '
    FILENAME == ARGV[1] { want[$2] = $1; next }
    FILENAME == ARGV[2] { got[$2] = $1; next }
    { present[$1] = 1 }
    END {
      for (i = from; i <= to; i++) {
        f = "f" i
        if (!(f in present)) print "absent", i
        else if ((f in got) && got[f] == want[f]) print "intact", i
        else print "differs", i
      }
    }' "$FO_DIR/want.sums" "$FO_DIR/got.sums" "$FO_DIR/present" > "$FO_DIR/later"
  while read -r what n; do
    [ "$what" = differs ] || continue
    f=f$n
    size=$(wc -c < "$1/w/$f")
    want_size=$(wc -c < "$FO_DIR/src/$f")
    if [ "$size" -lt "$want_size" ] && head -c "$size" "$FO_DIR/src/$f" | cmp -s - "$1/w/$f"; then
      short=$((short + 1))
      echo "w/$f: $size of $want_size bytes, a prefix of what was written (cut short)"
    else
      corrupt=$((corrupt + 1))
      echo "w/$f: CORRUPT ($size bytes, $want_size written, the content differs)"
    fi
  done < "$FO_DIR/later"
  counts="$(grep -c '^intact' "$FO_DIR/later") intact, $short cut short, $(grep -c '^absent' "$FO_DIR/later") absent, $corrupt corrupt"
  lost_synced=$(awk -v to="$FO_SYNCED_AT_CRASH" '$1 != "intact" && $2 <= to' "$FO_DIR/later" | wc -l)
  echo "f$((FO_COVERED + 1))..f$started: $counts; $unknown unexpected names"
  note "after the covered f$FO_COVERED: f$((FO_COVERED + 1))..f$started (started before the writer stopped): $counts"
  note "synced on A before the crash request but not intact on B (lost by asynchronous replication): $lost_synced of f$((FO_COVERED + 1))..f$FO_SYNCED_AT_CRASH"
  [ $corrupt -eq 0 ] && [ $unknown -eq 0 ]
}

fo_write_new() {
  head -c 200000 /dev/urandom > "$FO_DIR/new.bin" || return 1
  cp "$FO_DIR/new.bin" "$1/after-failover.bin" || return 1
  sync -f "$1" || { echo "syncfs on B failed"; return 1; }
  echo 3 > /proc/sys/vm/drop_caches
  cmp "$FO_DIR/new.bin" "$1/after-failover.bin" && echo "200000 bytes written on B, synced and read back"
}
