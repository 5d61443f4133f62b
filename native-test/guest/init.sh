#!/bin/sh
# /init of the kernel-test guest (busybox sh, PID 1). It mounts the pseudo file
# systems, loads the modules, brings up the network to the host (10.0.2.2 is the
# host's loopback through qemu user networking), runs the cases named on the
# kernel command line and writes TAP to /dev/ttyS1, then powers off.
# Kernel command line parameters (all optional except dvt.port):
#   dvt.host=10.0.2.2 dvt.port=N dvt.roport=N dvt.cases=connect,ext4,...
#   dvt.size=BYTES dvt.ext4=EXPORT dvt.bs=EXPORT dvt.fio=EXPORT dvt.ro=EXPORT
#   dvt.rst=EXPORT dvt.snap=EXPORT dvt.rofile=NAME dvt.rosha=SHA256 dvt.fiomib=N dvt.fiosecs=N
#   dvt.iotimeout=SECS dvt.restartwait=SECS dvt.reconnectwait=SECS
#   dvt.fo=EXPORT dvt.foport=N (failover and filerestore cases: the volume and primary A's NBD port)

PATH=/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=512m tmpfs /tmp
exec 0< /dev/console > /dev/console 2>&1

read up _ < /proc/uptime
INIT_UPTIME=$up

. /guest/tap.sh
. /guest/cases.sh
. /guest/failover.sh
. /guest/filerestore.sh

# TAP goes to the second serial port, raw, so the host reads exactly our lines
stty -F /dev/ttyS1 raw -echo 2> /dev/null
exec 3> /dev/ttyS1

param() {  # param NAME DEFAULT: value of the last dvt.NAME= on the kernel command line
  local w v="$2"
  for w in $(cat /proc/cmdline); do
    case "$w" in (dvt."$1"=*) v="${w#*=}" ;; esac
  done
  echo "$v"
}

DVT_HOST=$(param host 10.0.2.2)
DVT_PORT=$(param port 10809)
DVT_RO_PORT=$(param roport "$DVT_PORT")
DVT_CASES=$(param cases connect,ext4,xfs,blocksize,fio,readonly,snapshot,restart,filerestore,failover)
DVT_SIZE=$(param size 1073741824)
DVT_EXT4_EXPORT=$(param ext4 kt-ext4)
DVT_BS_EXPORT=$(param bs kt-bs)
DVT_FIO_EXPORT=$(param fio kt-fio)
DVT_RO_EXPORT=$(param ro kt-ro)
DVT_RST_EXPORT=$(param rst kt-rst)
DVT_SNAP_EXPORT=$(param snap kt-snap)
DVT_RO_FILE=$(param rofile hello.bin)
DVT_RO_SHA=$(param rosha none)
DVT_FIO_WRITE_MIB=$(param fiomib 12)
DVT_FIO_SECONDS=$(param fiosecs 5)
DVT_IO_TIMEOUT=$(param iotimeout 30)
DVT_RESTART_WAIT=$(param restartwait 90)
DVT_RECONNECT_WAIT=$(param reconnectwait 10)
DVT_FO_EXPORT=$(param fo kt-fo)
DVT_FO_PORT=$(param foport 0)

load_modules() {
  local m
  while read -r m; do
    # crc32c-intel needs SSE4.2; crc32c_generic covers for it
    insmod "$m" || case "$m" in (*crc32c-intel*) ;; (*) return 1 ;; esac
  done < /etc/modules.order
  note "$(wc -l < /etc/modules.order) modules; /init started at uptime ${INIT_UPTIME}s"
}

net_up() {
  local i=0
  while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  ip link set lo up
  ip link set eth0 up || return 1
  ip addr add 10.0.2.15/24 dev eth0 || return 1
  ip route add default via 10.0.2.2 || return 1
  ip addr show eth0
}

main() {
  tap "TAP version 14"
  tap "# guest kernel $(uname -r), /init at uptime ${INIT_UPTIME}s, cases: $DVT_CASES"
  step "boot: load kernel modules" load_modules || return
  step "boot: network up (10.0.2.15/24 via 10.0.2.2)" net_up || return
  step "boot: make test data" make_data || return
  local c
  for c in $(echo "$DVT_CASES" | tr ',' ' '); do
    tap "# case $c"
    case "$c" in
      (connect | ext4 | xfs | blocksize | fio | readonly | snapshot | restart | filerestore | failover) "case_$c" ;;
      (*) T_N=$((T_N + 1)); tap "not ok $T_N - unknown case $c" ;;
    esac
  done
}

main
tap "# guest done at uptime $(cut -d' ' -f1 /proc/uptime)s, $T_FAILED failed"
tap_plan
sync
exec 3>&-
poweroff -f
