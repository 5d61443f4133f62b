#!/usr/bin/env bash
# Why this exists: the whole disaster drill of docker/README.md in one command, on two
# containers, with numbers at the end. It pairs `demo` (primary) with `demo-copy`
# (replica), writes with verification, takes a restart-point pair of snapshots, kills the
# primary under load, fails over, checks what the new primary holds, brings the old primary
# back (it must be fenced), resyncs it, fails back, and checks that nothing was lost. It
# prints a timeline: RPO (what the failover report admits, and what was really missing),
# RTO, resync bytes moved vs bytes changed on either side, failback loss and RTO.
#
# Usage (as root): docker/drill.sh        exit 0: every step reached its expected state
#                                         exit 1: a step missed it (the message says which)
# It starts its own dockerd (and stops exactly that one) when no Docker engine answers,
# builds the images with docker/build-images.sh when they are missing or older than the
# build in dist/, and removes every container, network and volume it created, on success
# and on failure. Both nodes are observed through `docker exec` (never through the network
# under test). Environment (all optional):
#   DRILL_LOAD_SECONDS=8     how long the writer runs on the primary before `docker kill`
#   DRILL_LOAD_IOPS=2000     its rate (4 KiB random writes)
#   DRILL_CUT_INTERVAL=5s    the pair's --cut-interval (the product's default)
#   DRILL_IO=fio|qemu-io     writer/verifier (default: fio when `fio --enghelp` lists nbd)
#   DRILL_LOG_DIR=DIR        where logs go (default /var/tmp/deltavol-drill.<time>)
#   DRILL_KEEP=1             leave the containers up at the end (debugging only)
#   DELTAVOL_{PRIMARY,REPLICA}_{NBD,CONTROL}_PORT   host ports (default: free ones)
set -Eeuo pipefail
cd "$(dirname "$0")/.."

# ------------------------------------------------------------------ settings and state
LOAD_SECONDS=${DRILL_LOAD_SECONDS:-8}
LOAD_IOPS=${DRILL_LOAD_IOPS:-2000}
CUT_INTERVAL=${DRILL_CUT_INTERVAL:-5s}
LOG=${DRILL_LOG_DIR:-/var/tmp/deltavol-drill.$(date +%Y%m%d-%H%M%S)}
PROJECT=dvdrill$$
CLI=(node /opt/deltavol/dist/cli/main.js)
MiB=1048576
BS=4096
# regions of the 1 GiB demo volume, in MiB: offset size
REGION_BEFORE=(0 64)      # written and verified before the restart point
REGION_LOAD=(64 128)      # prefilled before it; the writer under which the primary dies
REGION_AFTER=(256 32)     # written and verified on the new primary after the failover
REGION_BACK=(320 16)      # written on the original primary after the failback

mkdir -p "$LOG"
T0=$(date +%s%3N)
DOCKERD_PID=""
PROJECT_UP=0
TMP=""
BG_PIDS=()
declare -A CID=() PORT=()
TIMELINE=()
LAST=""
COMPOSE=()

now_ms() { date +%s%3N; }
since() { local ms=$(( $(now_ms) - T0 )); printf '%d.%d' $((ms / 1000)) $(((ms % 1000) / 100)); }
say() { printf '[%7ss] %s\n' "$(since)" "$*" | tee -a "$LOG/drill.log"; }
mark() { TIMELINE+=("$(printf '%7ss  %s' "$(since)" "$*")"); say "$*"; }
fail() {
  printf '\nDRILL FAILED at %ss: %s\n' "$(since)" "$*" | tee -a "$LOG/drill.log" >&2
  exit 1
}
trap 'fail "command failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
secs() { awk -v ms="$1" 'BEGIN { printf "%.2f s", ms / 1000 }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

# ------------------------------------------------------------------ teardown (always)
cleanup() {
  local rc=$? t=$(now_ms) pid
  set +eE
  trap - ERR EXIT INT TERM
  for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${BG_PIDS[@]}"; do timeout 10 tail --pid="$pid" -f /dev/null 2>/dev/null || kill -9 "$pid" 2>/dev/null; done
  if [ "$PROJECT_UP" = 1 ]; then
    for n in primary replica; do
      [ -n "${CID[$n]:-}" ] && timeout 20 docker logs "${CID[$n]}" > "$LOG/$n.docker.log" 2>&1
    done
    if [ $rc -ne 0 ]; then
      for n in primary replica; do
        [ -s "$LOG/$n.docker.log" ] || continue
        echo "--- last lines of docker logs $n (whole log: $LOG/$n.docker.log) ---" >&2
        grep -v '"part":"nbd"' "$LOG/$n.docker.log" | tail -n 15 | cut -c1-400 >&2
      done
    fi
    if [ "${DRILL_KEEP:-0}" = 1 ]; then
      echo "DRILL_KEEP=1: left project $PROJECT up; remove it with: ${COMPOSE[*]} -p $PROJECT -f docker/compose.yml down -v" >&2
    elif ! timeout 90 "${COMPOSE[@]}" -p "$PROJECT" -f docker/compose.yml down -v --timeout 5 >> "$LOG/compose.log" 2>&1; then
      echo "teardown: compose down failed or timed out; removing by label" >&2
      timeout 60 docker rm -f $(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT") >/dev/null 2>&1
      timeout 30 docker network rm $(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT") >/dev/null 2>&1
      timeout 30 docker volume rm $(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT") >/dev/null 2>&1
    fi
  fi
  [ -n "$TMP" ] && rm -rf "$TMP"
  if [ -n "$DOCKERD_PID" ]; then
    kill -TERM "$DOCKERD_PID" 2>/dev/null
    if ! timeout 30 tail --pid="$DOCKERD_PID" -f /dev/null; then
      echo "teardown: dockerd $DOCKERD_PID still running 30 s after SIGTERM: SIGKILL" >&2
      kill -KILL "$DOCKERD_PID" 2>/dev/null
    fi
  fi
  printf '[%7ss] teardown done in %s (%s); logs in %s\n' "$(since)" "$(secs $(( $(now_ms) - t )))" \
    "$([ "${DRILL_KEEP:-0}" = 1 ] && echo 'containers kept' || echo 'containers, network and volumes removed')" "$LOG"
  exit $rc
}
trap cleanup EXIT
trap 'echo "drill: interrupted" >&2; exit 130' INT
trap 'echo "drill: terminated" >&2; exit 143' TERM

# ------------------------------------------------------------------ helpers

# wait_until WHAT SECONDS CHECK...: run CHECK until it succeeds (it may set LAST to what it saw)
wait_until() {
  local what=$1 limit=$2 t=$(now_ms)
  shift 2
  LAST=""
  until "$@"; do
    if [ $(( $(now_ms) - t )) -gt $((limit * 1000)) ]; then fail "$what: not within $limit s (last seen: ${LAST:-nothing})"; fi
    sleep 0.3
  done
  WAITED_MS=$(( $(now_ms) - t ))
}

# apt_need PACKAGE...: install the packages that are missing (idempotent, nothing if all present)
apt_need() {
  local p missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >> "$LOG/apt.log" 2>&1 \
    || fail "apt-get install ${missing[*]} failed (see $LOG/apt.log)"
}

# dv NODE ARGS...: the deltavol CLI inside a node's container; stdout is the answer (on
# failure followed by the exit status and the CLI's last lines of stderr)
dv() {
  local node=$1 rc=0
  shift
  echo "+ [$(since)s] [$node] deltavol $*" >> "$LOG/cli.log"
  timeout "${DV_TIMEOUT:-120}" docker exec "${CID[$node]}" "${CLI[@]}" "$@" > "$LOG/cli.out" 2> "$LOG/cli.err" || rc=$?
  cat "$LOG/cli.out" "$LOG/cli.err" >> "$LOG/cli.log"
  cat "$LOG/cli.out"
  if [ $rc -ne 0 ]; then
    echo "(exit $rc$([ $rc = 124 ] && echo ": no answer within ${DV_TIMEOUT:-120} s")) $(tail -n 3 "$LOG/cli.err")"
    return $rc
  fi
}

# st NODE VOLUME EXPR: EXPR (JavaScript; s = the volume's replication status, p = its
# first pair or null) evaluated on the node, from its control API (what `status VOLUME
# --json` shows), through `docker exec` (a node in its container starts in ~0.5 s, the
# CLI in ~1.5 s, so waits poll this way). st_ok: EXPR's field ok is true. The control API
# wants the node's bearer token (its data directory's control.token).
st() {
  timeout 20 docker exec "${CID[$1]}" node -e "
const token = require('node:fs').readFileSync('/var/lib/deltavol/control.token', 'utf8').trim();
fetch('http://127.0.0.1:10810/v1/replication?volume=' + encodeURIComponent(process.argv[1]), { headers: { authorization: 'Bearer ' + token } })
  .then((r) => r.json())
  .then((j) => { const s = j.volumes[0]; const p = (s.replicas || [])[0] || null; process.stdout.write(JSON.stringify($3)); })
  .catch((e) => { process.stdout.write('unreachable: ' + e.message); process.exit(1); })" "$2" 2>/dev/null
}
st_ok() { LAST=$(st "$@") || return 1; [[ $LAST == *'"ok":true'* ]]; }

# jf JSON EXPR: a field of a JSON text (j), evaluated on the host
jf() { J=$1 node -e "const j = JSON.parse(process.env.J); const v = ($2); process.stdout.write(typeof v === 'string' ? v : JSON.stringify(v));"; }

nbd_uri() { echo "nbd://127.0.0.1:${PORT[$1]}/$2"; }
quiet() { "$@" > /dev/null 2>&1; }

# vhash URI: sha256 of a whole export (a snapshot is VOLUME@SNAP)
vhash() {
  local h
  if command -v openssl >/dev/null; then h=$(timeout 180 nbdcopy "$1" - | openssl dgst -sha256 -r) || return 1
  else h=$(timeout 180 nbdcopy "$1" - | sha256sum) || return 1; fi
  echo "${h%% *}"
}
# hash2 URI1 URI2: both hashed at once; sets H1 H2
hash2() {
  vhash "$1" > "$TMP/h1" & local p1=$!
  vhash "$2" > "$TMP/h2" & local p2=$!
  wait $p1 || fail "reading $1 failed"
  wait $p2 || fail "reading $2 failed"
  H1=$(cat "$TMP/h1")
  H2=$(cat "$TMP/h2")
}

# --- writing and verifying: fio's nbd engine, or qemu-io when fio has none
# write_region URI OFFSET_MIB SIZE_MIB: write it so that verify_region can check it later
write_region() {
  if [ "$IO" = fio ]; then
    fio --name=region --ioengine=nbd --uri="$1" --rw=randwrite --bs=64k --offset="$2M" --size="$3M" --iodepth=8 \
      --verify=crc32c --verify_fatal=1 --randrepeat=1 --verify_state_save=0 >> "$LOG/fio.log" 2>&1
  else
    local i args=()
    for ((i = 0; i < $3; i++)); do args+=(-c "write -P $(( ($2 + i) % 251 + 1 )) $(( ($2 + i) * MiB )) 1M"); done
    qemu-io -f raw "$1" "${args[@]}" >> "$LOG/qemu-io.log" 2>&1 && verify_region "$@"
  fi
}
# verify_region URI OFFSET_MIB SIZE_MIB: every block of the region holds what write_region wrote
verify_region() {
  if [ "$IO" = fio ]; then
    fio --name=region --ioengine=nbd --uri="$1" --rw=randwrite --bs=64k --offset="$2M" --size="$3M" --iodepth=8 \
      --verify=crc32c --verify_fatal=1 --randrepeat=1 --verify_state_save=0 --verify_only >> "$LOG/fio.log" 2>&1
  else
    local i args=()
    for ((i = 0; i < $3; i++)); do args+=(-c "read -P $(( ($2 + i) % 251 + 1 )) $(( ($2 + i) * MiB )) 1M"); done
    qemu-io -f raw -r "$1" "${args[@]}" >> "$LOG/qemu-io.log" 2>&1
  fi
}
# fill_region URI OFFSET_MIB SIZE_MIB: plain sequential data (no later check)
fill_region() {
  if [ "$IO" = fio ]; then
    fio --name=fill --ioengine=nbd --uri="$1" --rw=write --bs=1m --offset="$2M" --size="$3M" --iodepth=4 >> "$LOG/fio.log" 2>&1
  else
    local i args=()
    for ((i = 0; i < $3; i++)); do args+=(-c "write -P 0x5a $(( ($2 + i) * MiB )) 1M"); done
    qemu-io -f raw "$1" "${args[@]}" >> "$LOG/qemu-io.log" 2>&1
  fi
}
# random_writes URI OFFSET_MIB SIZE_MIB COUNT SEED: COUNT random 4 KiB writes, then return
random_writes() {
  if [ "$IO" = fio ]; then
    fio --name=random --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --offset="$2M" --size="$3M" --iodepth=8 \
      --number_ios="$4" --randseed="$5" --norandommap >> "$LOG/fio.log" 2>&1
  else
    local i args=() blocks=$(( $3 * MiB / BS ))
    RANDOM=$5
    for ((i = 0; i < $4; i++)); do args+=(-c "write -P $((RANDOM % 255 + 1)) $(( $2 * MiB + ((RANDOM * 32768 + RANDOM) % blocks) * BS )) 4k"); done
    qemu-io -f raw "$1" "${args[@]}" >> "$LOG/qemu-io.log" 2>&1
  fi
}
# start_load URI OFFSET_MIB SIZE_MIB: 4 KiB random writes at LOAD_IOPS until stopped; sets LOAD_PID
start_load() {
  if [ "$IO" = fio ]; then
    fio --name=load --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --offset="$2M" --size="$3M" --iodepth=8 \
      --norandommap --rate_iops="$LOAD_IOPS" --time_based --runtime=600 > "$LOG/fio-load.log" 2>&1 &
  else
    (
      RANDOM=99
      blocks=$(( $3 * MiB / BS ))
      while :; do
        args=()
        for ((i = 0; i < LOAD_IOPS / 4; i++)); do args+=(-c "write -P $((RANDOM % 255 + 1)) $(( $2 * MiB + ((RANDOM * 32768 + RANDOM) % blocks) * BS )) 4k"); done
        qemu-io -f raw "$1" "${args[@]}" > /dev/null 2>&1 || exit 0
        sleep 0.25
      done
    ) > "$LOG/qemu-io-load.log" 2>&1 &
  fi
  LOAD_PID=$!
  BG_PIDS+=("$LOAD_PID")
}

# daemon_gap NODE FROM TO: ms between the last daemon log line whose msg is FROM and the
# first line after it whose msg is TO (from `docker logs`: the daemon's own clock), or ?
daemon_gap() {
  timeout 20 docker logs "${CID[$1]}" 2>&1 | node -e "
let from = null, to = null;
for (const l of require('node:fs').readFileSync(0, 'utf8').split('\\n')) {
  let j; try { j = JSON.parse(l); } catch { continue; }
  if (j.msg === process.argv[1]) { from = j.time; to = null; } else if (j.msg === process.argv[2] && from !== null && to === null) to = j.time;
}
process.stdout.write(from !== null && to !== null ? String(to - from) : '?');" "$2" "$3"
}

# dump URI FILE: a whole export into a sparse file (for block-by-block comparison)
dump() { rm -f "$2"; timeout 180 nbdcopy "$1" "$2"; }

# compare_blocks BASE A B: JSON {a, b, both, union, unionZeroB, shaBase, shaA, shaB}: 4 KiB
# blocks where A, B differ from BASE, where both do, either does, and how many blocks of that
# union are zeros in B (a resync sends those as zero runs, without data)
compare_blocks() {
  node - "$@" <<'JS'
const fs = require('node:fs');
const crypto = require('node:crypto');
const [base, a, b] = process.argv.slice(2);
const BS = 4096, CH = 4 << 20;
const fds = [base, a, b].map((f) => fs.openSync(f, 'r'));
const sizes = [base, a, b].map((f) => fs.statSync(f).size);
const size = Math.max(...sizes);
const bufs = fds.map(() => Buffer.alloc(CH));
const hashes = fds.map(() => crypto.createHash('sha256'));
const zero = Buffer.alloc(BS);
const out = { a: 0, b: 0, both: 0, union: 0, unionZeroB: 0 };
for (let off = 0; off < size; off += CH) {
  const len = Math.min(CH, size - off);
  fds.forEach((fd, i) => { bufs[i].fill(0, 0, len); fs.readSync(fd, bufs[i], 0, len, off); hashes[i].update(bufs[i].subarray(0, len)); });
  const [x, y, z] = bufs;
  for (let o = 0; o < len; o += BS) {
    const da = x.compare(y, o, o + BS, o, o + BS) !== 0;
    const db = x.compare(z, o, o + BS, o, o + BS) !== 0;
    if (da) out.a++;
    if (db) out.b++;
    if (da && db) out.both++;
    if (da || db) { out.union++; if (z.compare(zero, 0, BS, o, o + BS) === 0) out.unionZeroB++; }
  }
}
[out.shaBase, out.shaA, out.shaB] = hashes.map((h) => h.digest('hex'));
process.stdout.write(JSON.stringify(out));
JS
}

# ------------------------------------------------------------------ 0. the machine
say "deltavol disaster drill: logs in $LOG"
command -v node >/dev/null || fail "node is not installed (the image carries the host's Node.js binary; install Node.js 20 first)"
command -v docker >/dev/null || apt_need docker.io
command -v dockerd >/dev/null || timeout 10 docker info >/dev/null 2>&1 || apt_need docker.io
apt_need libnbd-bin
if [ -n "${DRILL_IO:-}" ]; then IO=$DRILL_IO
else
  command -v fio >/dev/null || apt_need fio
  if fio --enghelp 2>/dev/null | grep -qw nbd; then IO=fio; else IO=qemu-io; fi
fi
case "$IO" in
  fio) ;;
  qemu-io) command -v qemu-io >/dev/null || apt_need qemu-utils ;;
  *) fail "DRILL_IO must be fio or qemu-io, not $IO" ;;
esac

if timeout 15 docker info >/dev/null 2>&1; then
  say "Docker engine: already running (server $(docker version -f '{{.Server.Version}}' 2>/dev/null)); this drill leaves it running"
else
  say "Docker engine: none answers; starting dockerd (log: $LOG/dockerd.log)"
  setsid dockerd > "$LOG/dockerd.log" 2>&1 < /dev/null &
  DOCKERD_PID=$!
  wait_until "dockerd (pid $DOCKERD_PID) answering" 60 quiet timeout 5 docker info
  kill -0 "$DOCKERD_PID" 2>/dev/null || fail "dockerd exited: $(tail -n 5 "$LOG/dockerd.log")"
  mark "dockerd pid $DOCKERD_PID answers (after $(secs "$WAITED_MS"))"
fi

if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
else
  command -v docker-compose >/dev/null || apt_need docker-compose
  COMPOSE=(docker-compose)
fi

build_why=""
if ! docker image inspect deltavol-base:bookworm >/dev/null 2>&1; then build_why="deltavol-base:bookworm is missing"
elif ! docker image inspect deltavol:dev >/dev/null 2>&1; then build_why="deltavol:dev is missing"
elif [ ! -f dist/cli/main.js ]; then build_why="dist/ is not built"
else
  created=$(date -d "$(docker image inspect -f '{{.Created}}' deltavol:dev)" +%s)
  newer=$(find dist build/Release/fsx.node package.json -newermt "@$created" -type f -print -quit 2>/dev/null || true)
  [ -n "$newer" ] && build_why="$newer is newer than deltavol:dev"
fi
if [ -n "$build_why" ]; then
  say "building images ($build_why): docker/build-images.sh (log: $LOG/build-images.log)"
  docker image inspect deltavol-base:bookworm >/dev/null 2>&1 || command -v debootstrap >/dev/null || apt_need debootstrap
  t=$(now_ms)
  timeout 1200 bash docker/build-images.sh > "$LOG/build-images.log" 2>&1 || fail "docker/build-images.sh failed: $(tail -n 5 "$LOG/build-images.log")"
  mark "images built in $(secs $(( $(now_ms) - t )))"
  BUILD_MS=$(( $(now_ms) - t ))
fi

# free host ports unless given
read -r -a free < <(node -e "
const net = require('node:net');
(async () => { const ss = []; for (let i = 0; i < 4; i++) { const s = net.createServer(); await new Promise((r) => s.listen(0, '127.0.0.1', r)); ss.push(s); }
  console.log(ss.map((s) => s.address().port).join(' ')); ss.forEach((s) => s.close()); })();")
export DELTAVOL_PRIMARY_NBD_PORT=${DELTAVOL_PRIMARY_NBD_PORT:-${free[0]}} DELTAVOL_PRIMARY_CONTROL_PORT=${DELTAVOL_PRIMARY_CONTROL_PORT:-${free[1]}}
export DELTAVOL_REPLICA_NBD_PORT=${DELTAVOL_REPLICA_NBD_PORT:-${free[2]}} DELTAVOL_REPLICA_CONTROL_PORT=${DELTAVOL_REPLICA_CONTROL_PORT:-${free[3]}}
PORT[primary]=$DELTAVOL_PRIMARY_NBD_PORT
PORT[replica]=$DELTAVOL_REPLICA_NBD_PORT

LOADAVG0=$(cut -d' ' -f1-3 /proc/loadavg)
TMP=$(mktemp -d /dev/shm/deltavol-drill.XXXXXX 2>/dev/null || mktemp -d /var/tmp/deltavol-drill.XXXXXX)
say "load average $LOADAVG0; versions: $(docker version -f 'docker {{.Server.Version}}' 2>/dev/null), $("${COMPOSE[@]}" version --short 2>/dev/null | head -n 1 | sed 's/^/compose /'), $( [ "$IO" = fio ] && fio --version || qemu-io --version | head -n 1), image $(docker image inspect -f '{{.Id}}' deltavol:dev | cut -c8-19)"

# ------------------------------------------------------------------ 1. two nodes, one pair
PROJECT_UP=1
timeout 180 "${COMPOSE[@]}" -p "$PROJECT" -f docker/compose.yml up -d >> "$LOG/compose.log" 2>&1 \
  || fail "compose up failed: $(tail -n 5 "$LOG/compose.log")"
for n in primary replica; do
  CID[$n]=$(timeout 30 "${COMPOSE[@]}" -p "$PROJECT" -f docker/compose.yml ps -q "$n")
  [ -n "${CID[$n]}" ] || fail "no container for $n after compose up"
done
for n in primary replica; do
  wait_until "$n answering on its control API" 60 st_ok "$n" demo '{ ok: s.role === "simplex" }'
  wait_until "$n's NBD export demo on host port ${PORT[$n]}" 30 quiet timeout 5 nbdinfo --size "$(nbd_uri "$n" demo)"
done
mark "nodes up: primary (nbd 127.0.0.1:${PORT[primary]}), replica (nbd 127.0.0.1:${PORT[replica]}); compose project $PROJECT"

out=$(dv primary replica add demo --peer replica:10811 --as demo-copy --cut-interval "$CUT_INTERVAL" --json) || fail "replica add failed: $out"
wait_until "pair demo -> demo-copy in duplex" 60 st_ok primary demo '{ state: p && p.state, copy: p && p.initialCopy, ok: !!p && p.state === "duplex" && p.initialCopy === null }'
mark "paired demo -> demo-copy (replica:10811, cut interval $CUT_INTERVAL): duplex"

# ------------------------------------------------------------------ 2. writes, restart-point pair
write_region "$(nbd_uri primary demo)" "${REGION_BEFORE[@]}" || fail "verified write of ${REGION_BEFORE[1]} MiB at ${REGION_BEFORE[0]} MiB on the primary failed (log: $LOG/$IO.log)"
fill_region "$(nbd_uri primary demo)" "${REGION_LOAD[@]}" || fail "prefill on the primary failed"
wait_until "pair in duplex after the writes" 60 st_ok primary demo '{ state: p && p.state, ok: !!p && p.state === "duplex" }'
mark "$IO wrote $(( REGION_BEFORE[1] + REGION_LOAD[1] )) MiB on the primary (${REGION_BEFORE[1]} MiB verified); pair duplex"

RP=drill-rp
RP_SET=null
for attempt in 1 2 3; do
  # something to cut, so the cut below (not a timed one) takes it
  random_writes "$(nbd_uri primary demo)" "${REGION_LOAD[@]}" 64 "$attempt" || fail "writes before the cut failed"
  out=$(dv primary replica cut demo --snapshot "$RP" --json) || fail "replica cut --snapshot failed: $out"
  RP_SET=$(jf "$out" 'j.set')
  [ "$RP_SET" != null ] && break
  dv primary snapshot delete demo "$RP" > /dev/null 2>&1 || true
done
[ "$RP_SET" != null ] || fail "replica cut found nothing to cut 3 times"
stamp=$(jf "$(dv primary snapshot list demo --json)" "(j.find((x) => x.name === '$RP') || {}).deltaSetNumber")
[ "$stamp" = "$RP_SET" ] || fail "snapshot demo@$RP is stamped $stamp, not with the cut set $RP_SET"
wait_until "the replica playing set $RP_SET" 60 st_ok replica demo-copy "{ playedSet: s.playedSet, state: s.state, ok: s.playedSet >= $RP_SET }"
played=$(jf "$LAST" 'j.playedSet')
[ "$played" = "$RP_SET" ] || fail "the replica played past the restart point (set $played > $RP_SET) before its snapshot: nothing should have been cut after it"
dv replica snapshot create demo-copy "$RP-copy" --json > /dev/null || fail "snapshot create demo-copy $RP-copy failed"
stamp=$(jf "$(dv replica snapshot list demo-copy --json)" "(j.find((x) => x.name === '$RP-copy') || {}).deltaSetNumber")
[ "$stamp" = "$RP_SET" ] || fail "the replica's snapshot demo-copy@$RP-copy is stamped $stamp, not $RP_SET"
hash2 "$(nbd_uri primary "demo@$RP")" "$(nbd_uri replica "demo-copy@$RP-copy")"
[ "$H1" = "$H2" ] || fail "restart-point pair differs: primary demo@$RP sha256 $H1, replica demo-copy@$RP-copy $H2"
mark "restart-point pair at set $RP_SET: demo@$RP (primary) = demo-copy@$RP-copy (replica), sha256 ${H1:0:16}"

# ------------------------------------------------------------------ 3. crash under load, failover
start_load "$(nbd_uri primary demo)" "${REGION_LOAD[@]}"
sleep "$LOAD_SECONDS"
kill -0 "$LOAD_PID" 2>/dev/null || fail "the writer on the primary stopped before the crash (log: $LOG/$IO-load.log)"
LIVE=$(st primary demo '{ set: s.currentSet, acked: p.ackedSet, played: p.playedSet, lag: p.lagSeconds, rpo: p.rpo.seconds, bytesDifferent: p.bytesDifferent }') || LIVE="?"
docker kill "${CID[primary]}" > /dev/null
KILL_MS=$(now_ms)
mark "docker kill primary under $LOAD_IOPS writes/s of 4 KiB (after ${LOAD_SECONDS} s of them); primary just before: $LIVE"
timeout 20 tail --pid="$LOAD_PID" -f /dev/null || kill "$LOAD_PID" 2>/dev/null || true

wait_until "the replica noticing the primary is gone" 30 st_ok replica demo-copy '{ state: s.state, connected: s.connected, ok: s.connected === false }'
DETECT_MS=$(( $(now_ms) - KILL_MS ))
t=$(now_ms)
FO=$(dv replica failover demo-copy --json) || fail "failover demo-copy failed: $FO"
FO_WALL_MS=$(( $(now_ms) - t ))
mark "failover demo-copy: $(jf "$FO" '`generation ${j.generation}, rtoMs ${j.rtoMs}, restart point ${j.restartPoint.snapshot} = set ${j.restartPoint.set}`') (command $(secs $FO_WALL_MS))"
random_writes "$(nbd_uri replica demo-copy)" 1000 1 1 77 || fail "the new primary refused a write after the failover"
WRITABLE_MS=$(( $(now_ms) - KILL_MS ))
FO_SET=$(jf "$FO" 'j.restartPoint.set')
RESTART_SNAP=$(jf "$FO" 'j.restartPoint.snapshot')
[ "$FO_SET" -ge "$RP_SET" ] || fail "the failover's restart point (set $FO_SET) is older than the restart-point pair (set $RP_SET)"
[ "$(jf "$FO" 'j.report.consistent')" = true ] || fail "the failover report says the volume is not consistent: $(jf "$FO" 'j.report')"
verify_region "$(nbd_uri replica demo-copy)" "${REGION_BEFORE[@]}" || fail "the new primary lost data written before the restart point ($IO verify of ${REGION_BEFORE[1]} MiB at ${REGION_BEFORE[0]} MiB; log $LOG/$IO.log)"
mark "new primary verified: the ${REGION_BEFORE[1]} MiB written before the restart point are intact; writable $(secs $WRITABLE_MS) after the kill"

write_region "$(nbd_uri replica demo-copy)" "${REGION_AFTER[@]}" || fail "verified write on the new primary failed"
random_writes "$(nbd_uri replica demo-copy)" "${REGION_LOAD[@]}" 4096 4242 || fail "random writes on the new primary failed"
mark "wrote on the new primary: ${REGION_AFTER[1]} MiB verified at ${REGION_AFTER[0]} MiB + 4096 random 4 KiB writes over the load region"

# ------------------------------------------------------------------ 4. the old primary returns: fenced
t=$(now_ms)
docker start "${CID[primary]}" > /dev/null
wait_until "the old primary answering after docker start" 60 st_ok primary demo '{ state: s.state, ok: true }'
wait_until "the old primary fenced" 60 st_ok primary demo '{ state: s.state, fenced: s.fenced, ok: s.state === "fenced" }'
FENCED_MS=$(( $(now_ms) - t ))
FENCED_DAEMON_MS=$(daemon_gap primary listening 'role: fenced')
out=$(dv primary status demo --json) || fail "status demo failed"
[ "$(jf "$out" 'j.state')" = fenced ] || fail "status demo --json on the old primary: state $(jf "$out" 'j.state'), expected fenced"
wait_until "the old primary's NBD export" 30 quiet timeout 5 nbdinfo --size "$(nbd_uri primary demo)"
if [ "$IO" = fio ]; then
  refused=$(fio --name=fenced --ioengine=nbd --uri="$(nbd_uri primary demo)" --rw=write --bs=4k --size=4k --offset=1000M 2>&1) \
    && fail "a write to the fenced old primary was accepted"
  refused=$(grep -o 'error=[^:]*' <<< "$refused" | head -n 1)
else
  refused=$(qemu-io -f raw "$(nbd_uri primary demo)" -c 'write 1000M 4k' 2>&1) && fail "a write to the fenced old primary was accepted"
  refused=$(head -n 1 <<< "$refused")
fi
mark "old primary back: fenced $(secs $FENCED_MS) after docker start, ${FENCED_DAEMON_MS} ms after its daemon listened ($(jf "$out" 'j.fenced.reason')); a write was refused: $refused"

# what each side changed since the restart point, block by block
dump "$(nbd_uri replica "demo-copy@$RESTART_SNAP")" "$TMP/restart.img" & d1=$!
dump "$(nbd_uri primary demo)" "$TMP/old.img" & d2=$!
dump "$(nbd_uri replica demo-copy)" "$TMP/new.img" & d3=$!
wait $d1 && wait $d2 && wait $d3 || fail "reading the volumes for the comparison failed"
CMP=$(compare_blocks "$TMP/restart.img" "$TMP/old.img" "$TMP/new.img") || fail "block comparison failed"
rm -f "$TMP"/*.img
mark "since the restart point: old primary changed $(jf "$CMP" 'j.a') blocks, new primary $(jf "$CMP" 'j.b'), union $(jf "$CMP" 'j.union') (4 KiB)"

# ------------------------------------------------------------------ 5. resync the old primary
t=$(now_ms)
RS=$(DV_TIMEOUT=330 dv primary resync demo --timeout 300s --json) || fail "resync demo failed: $RS"
RS_WALL_MS=$(( $(now_ms) - t ))
[ "$(jf "$RS" 'j.full')" = false ] || fail "resync did a full copy although the old primary's history is intact: $(jf "$RS" 'j.reason')"
wait_until "the new primary's pair to demo done copying" 60 st_ok replica demo-copy '{ role: s.role, state: p && p.state, copy: p && p.initialCopy, ok: s.role === "primary" && !!p && p.initialCopy === null }'
RS_PAIR=$(st replica demo-copy '{ bytesSent: p.bytesSent, initialCopy: p.initialCopy, state: p.state, peer: p.peer }')
RS_BYTES=$(jf "$RS_PAIR" 'j.bytesSent')
RS_COPY_MS=$(daemon_gap primary 'role: resync-registered' 'role: resync-finished')
mark "resync demo: $(jf "$RS" '`divergentBlocks ${j.divergentBlocks}, beforeSnapshot ${j.beforeSnapshot}, full ${j.full}`'); moved $(mib "$RS_BYTES") (command $(secs $RS_WALL_MS))"

out=$(dv replica replica cut demo-copy --json) || fail "replica cut demo-copy failed"
wait_until "the pair demo-copy -> demo in sync" 90 st_ok replica demo-copy '{ state: p && p.state, cur: s.currentSet, played: p && p.playedSet, changed: s.changedBlocksSinceCut, ok: !!p && p.state === "duplex" && p.playedSet === s.currentSet && s.changedBlocksSinceCut === 0 }'
hash2 "$(nbd_uri replica demo-copy)" "$(nbd_uri primary demo)"
[ "$H1" = "$H2" ] || fail "after the resync the volumes differ: demo-copy (new primary) $H1, demo (old primary) $H2"
H_SYNC=$H1
BEFORE_SNAP=$(jf "$RS" 'j.beforeSnapshot')
hb=$(vhash "$(nbd_uri primary "demo@$BEFORE_SNAP")") || fail "reading demo@$BEFORE_SNAP failed"
[ "$hb" = "$(jf "$CMP" 'j.shaA')" ] || fail "demo@$BEFORE_SNAP ($hb) is not the old primary's own version ($(jf "$CMP" 'j.shaA'))"
mark "in sync: demo-copy = demo, sha256 ${H1:0:16}; the old primary's own version is kept in demo@$BEFORE_SNAP"

# ------------------------------------------------------------------ 6. failback
t=$(now_ms)
FB=$(dv primary failback demo --json) || fail "failback demo failed: $FB"
FB_WALL_MS=$(( $(now_ms) - t ))
wait_until "demo primary again with its pair in duplex" 60 st_ok primary demo '{ role: s.role, state: s.state, pair: p && p.state, ok: s.role === "primary" && s.state === "primary" && !!p && p.state === "duplex" }'
wait_until "demo-copy a replica again" 30 st_ok replica demo-copy '{ role: s.role, state: s.state, ok: s.role === "replica" }'
hf=$(vhash "$(nbd_uri primary demo)") || fail "reading demo after the failback failed"
FB_LOST=0
if [ "$hf" != "$H_SYNC" ]; then
  dump "$(nbd_uri replica demo-copy)" "$TMP/new.img" && dump "$(nbd_uri primary demo)" "$TMP/old.img" || fail "reading the volumes failed"
  FB_LOST=$(( $(jf "$(compare_blocks "$TMP/new.img" "$TMP/new.img" "$TMP/old.img")" 'j.b') * BS ))
fi
mark "failback demo: $(jf "$FB" '`generation ${j.generation}, rtoMs ${j.rtoMs}, lastSet ${j.lastSet}`') (command $(secs $FB_WALL_MS)); lost $FB_LOST bytes"
[ "$FB_LOST" = 0 ] || fail "the failback lost $FB_LOST bytes: demo $hf, demo-copy before it $H_SYNC"
verify_region "$(nbd_uri primary demo)" "${REGION_BEFORE[@]}" || fail "$IO verify of the region written before the restart point failed on demo after the failback"
verify_region "$(nbd_uri primary demo)" "${REGION_AFTER[@]}" || fail "$IO verify of the region written on the new primary failed on demo after the failback"
write_region "$(nbd_uri primary demo)" "${REGION_BACK[@]}" || fail "writing on demo after the failback failed"
dv primary replica cut demo --json > /dev/null || fail "replica cut demo failed"
wait_until "the pair demo -> demo-copy in sync after the failback" 90 st_ok primary demo '{ state: p && p.state, cur: s.currentSet, played: p && p.playedSet, changed: s.changedBlocksSinceCut, ok: !!p && p.state === "duplex" && p.playedSet === s.currentSet && s.changedBlocksSinceCut === 0 }'
hash2 "$(nbd_uri primary demo)" "$(nbd_uri replica demo-copy)"
[ "$H1" = "$H2" ] || fail "after the failback the volumes differ: demo $H1, demo-copy $H2"
BACK_PAIR=$(st primary demo '{ copy: p.initialCopy, bytesSent: p.bytesSent }')
mark "nothing lost: verified regions intact on demo; ${REGION_BACK[1]} MiB more written there and shipped (pair bytesSent $(mib "$(jf "$BACK_PAIR" 'j.bytesSent')"), no copy); demo = demo-copy, sha256 ${H1:0:16}"
TOTAL_MS=$(( $(now_ms) - T0 ))

# ------------------------------------------------------------------ 7. the timeline
{
  echo
  echo "=== deltavol disaster drill: timeline (seconds since the drill started) ==="
  printf '%s\n' "${TIMELINE[@]}"
  echo
  echo "=== numbers ==="
  FO=$FO RS=$RS RS_PAIR=$RS_PAIR FB=$FB CMP=$CMP LIVE=$LIVE KILL_MS=$KILL_MS FO_WALL_MS=$FO_WALL_MS DETECT_MS=$DETECT_MS \
  WRITABLE_MS=$WRITABLE_MS FENCED_MS=$FENCED_MS FENCED_DAEMON_MS=$FENCED_DAEMON_MS REFUSED=$refused RS_WALL_MS=$RS_WALL_MS \
  RS_COPY_MS=$RS_COPY_MS FB_WALL_MS=$FB_WALL_MS FB_LOST=$FB_LOST TOTAL_MS=$TOTAL_MS BUILD_MS=${BUILD_MS:-} IO=$IO \
  LOAD_IOPS=$LOAD_IOPS LOAD_SECONDS=$LOAD_SECONDS CUT_INTERVAL=$CUT_INTERVAL LOADAVG="$LOADAVG0 -> $(cut -d' ' -f1-3 /proc/loadavg)" \
  node - <<'JS'
const e = process.env;
const fo = JSON.parse(e.FO), rs = JSON.parse(e.RS), pair = JSON.parse(e.RS_PAIR), fb = JSON.parse(e.FB), cmp = JSON.parse(e.CMP);
const r = fo.report, kill = Number(e.KILL_MS), BS = 4096;
const mib = (b) => `${(b / 1048576).toFixed(1)} MiB`;
const s = (ms) => `${(Number(ms) / 1000).toFixed(2)} s`;
const before = (t) => (t === null ? 'unknown' : `${((kill - t) / 1000).toFixed(1)} s before the kill`);
const list = (l) => (l.length ? l.join(', ') : 'none');
// writes the primary could have taken after its last contact (the report cannot know them)
const afterContact = r.lastContactMs === null ? 0 : Math.max(0, kill - r.lastContactMs) / 1000 * Number(e.LOAD_IOPS) * BS;
const lost = cmp.a * BS;
const unionData = (cmp.union - cmp.unionZeroB) * BS;
const out = [
  `RPO       the failover report admits ${r.seconds} s of writes, at most ${mib(r.bytesAtMost)} (${r.bytesAtMost} bytes): writes after ${before(r.atRiskSinceMs)}, up to its`,
  `          last contact ${before(r.lastContactMs)}, plus what the primary took after that contact; sets not here: ${list(r.setsNotHere)}; dropped: ${list(r.setsDropped)}; consistent: ${r.consistent}`,
  `          measured: the dead primary held ${cmp.a} blocks (${mib(lost)}) that the restart point lacks; the writer could have added at most ${mib(afterContact)} after the last contact:`,
  `          ${lost <= r.bytesAtMost ? 'within the report' : lost <= r.bytesAtMost + afterContact ? 'within the report plus the writes after the last contact' : 'MORE than the report plus the writes after the last contact'}`,
  `          (the primary's own status just before the kill: ${e.LIVE})`,
  `RTO       failover: writable ${fo.rtoMs} ms after the request reached the daemon (rtoMs); command wall time ${s(e.FO_WALL_MS)} (docker exec and CLI start-up included)`,
  `          kill -> replica saw the primary gone: ${s(e.DETECT_MS)} (polled); kill -> first write acknowledged by the new primary: ${s(e.WRITABLE_MS)}`,
  `fencing   the old primary was fenced ${s(e.FENCED_MS)} after docker start, ${e.FENCED_DAEMON_MS} ms after its daemon listened; a write was refused (${e.REFUSED})`,
  `resync    moved ${mib(pair.bytesSent)} (${pair.bytesSent} bytes of data: the new primary's pair bytesSent); blocks changed since the restart point:`,
  `          old primary ${mib(cmp.a * BS)}, new primary ${mib(cmp.b * BS)}, both ${mib(cmp.both * BS)}, union ${mib(cmp.union * BS)} (${mib(cmp.unionZeroB * BS)} of it zeros, sent as zero runs)`,
  `          moved / union = ${unionData > 0 ? (pair.bytesSent / unionData).toFixed(2) : 'n/a'}; full copy: ${rs.full}; the old primary named ${rs.divergentBlocks} blocks (${mib(rs.divergentBlocks * BS)}) as possibly changed (activity-log bound)`,
  `          command ${s(e.RS_WALL_MS)}, of which the copy ${s(e.RS_COPY_MS)} (daemon log: resync-registered -> resync-finished)`,
  `failback  lost ${e.FB_LOST} bytes (demo after = demo-copy before, sha256); rtoMs ${fb.rtoMs} ms; command wall time ${s(e.FB_WALL_MS)}; generation ${fb.generation}`,
  `drill     ${s(e.TOTAL_MS)} until the last check${e.BUILD_MS ? ` (image build ${s(e.BUILD_MS)} of it)` : ''}; ${e.IO}; load ${e.LOAD_IOPS} x 4 KiB writes/s for ${e.LOAD_SECONDS} s; cut interval ${e.CUT_INTERVAL}; load average ${e.LOADAVG}`,
];
console.log(out.join('\n'));
JS
} | tee -a "$LOG/drill.log"
say "DRILL PASSED"
