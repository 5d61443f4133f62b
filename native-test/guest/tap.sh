# TAP helpers for the kernel-test guest (sourced by /init, run by busybox sh).
# Results go to fd 3 (the second serial port, ttyS1) so kernel messages on the
# console never mix into them; every step's command and output also go to the
# console, so the console log shows what happened around a failure.
# A step prints "ok N - NAME # time=MSms" and, when it failed or left a note,
# a YAML block the host harness (native-test/kernel.test.mjs) turns into diagnostics.
# On the console a step is framed by "=== [N] start: NAME" and "=== [N] exit RC ...",
# so after a timeout the harness can name the step that never finished.

T_N=0
T_FAILED=0

# milliseconds since boot, from /proc/uptime (10 ms resolution)
now_ms() {
  local up
  read up _ < /proc/uptime
  echo $(( ${up%.*} * 1000 + 1${up#*.} * 10 - 1000 ))
}

tap() { echo "$*" >&3; }
console() { echo "$*" > /dev/console; }

# note TEXT: attach a line to the diagnostics of the step being run
note() { echo "$*" >> /tmp/step.note; }

# yaml_block KEY FILE: a literal block scalar holding the last 30 lines of FILE
yaml_block() {
  [ -s "$2" ] || return 0
  tap "  $1: |"
  tail -n 30 "$2" | sed 's/\r//g; s/^/    /' >&3
}

# emit STATUS NAME MS RC CMD [DIRECTIVE]: one TAP line plus its diagnostics
emit() {
  local status="$1" name="$2" ms="$3" rc="$4" cmd="$5" directive="${6:-}"
  local line="$status $T_N - $name # time=${ms}ms"
  [ -n "$directive" ] && line="$status $T_N - $name # $directive"
  tap "$line"
  if [ "$status" != ok ] || [ -s /tmp/step.note ]; then
    tap "  ---"
    tap "  duration_ms: $ms"
    if [ "$status" != ok ]; then
      tap "  exit: $rc"
      tap "  command: '$(echo "$cmd" | sed "s/'/''/g")'"
      yaml_block output /tmp/step.out
    fi
    yaml_block note /tmp/step.note
    tap "  ..."
  fi
}

# run_step NAME TODO_REASON CMD [ARGS...]: run CMD (a program or a shell function),
# show its output on the console and report it; with a TODO_REASON a failure is a TAP
# TODO (a known kernel-client limitation: shown, but it does not fail the suite).
# Returns CMD's exit status so callers can stop a case at the first failure.
run_step() {
  local name="$1" reason="$2" t0 t1 rc
  shift 2
  T_N=$((T_N + 1))
  : > /tmp/step.note
  console "=== [$T_N] start: $name"
  if [ -n "$reason" ]; then console "    \$ $* (a failure is a TODO)"; else console "    \$ $*"; fi
  t0=$(now_ms)
  "$@" > /tmp/step.out 2>&1
  rc=$?
  t1=$(now_ms)
  tail -n 40 /tmp/step.out > /dev/console
  console "=== [$T_N] exit $rc after $((t1 - t0)) ms: $name"
  if [ $rc -eq 0 ]; then
    emit ok "$name" $((t1 - t0)) 0 "$*"
  elif [ -n "$reason" ]; then
    emit "not ok" "$name" $((t1 - t0)) $rc "$*" "TODO $reason"
  else
    T_FAILED=$((T_FAILED + 1))
    emit "not ok" "$name" $((t1 - t0)) $rc "$*"
  fi
  return $rc
}

# step NAME CMD [ARGS...]: a step whose failure fails the suite.
step() {
  local name="$1"
  shift
  run_step "$name" "" "$@"
}

# todo_step NAME REASON CMD...: a step whose failure is reported as a TAP TODO.
todo_step() {
  run_step "$@"
}

tap_plan() { tap "1..$T_N"; }
