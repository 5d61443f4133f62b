#!/bin/sh
# /dvtls-init of the NBD TLS kernel check (scripts/test-native-tls.sh): the kernel's NBD
# client reaches deltavol through nbd-client, which does the TLS in user space (GnuTLS)
# and hands the kernel a socket. Certificates are in /tls/<client>/ (an initramfs overlay
# the script makes). Results go to the console as "DVTLS ok|not ok - what" lines.
PATH=/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=256m tmpfs /tmp
exec 0< /dev/console > /dev/console 2>&1

checks=0
check() { # check WHAT COMMAND...: run it, print ok / not ok (on a line of its own: nbd-client leaves "Negotiation: .." unfinished)
  local what="$1"
  shift
  checks=$((checks + 1))
  if "$@"; then printf '\nDVTLS ok - %s\n' "$what"; else printf '\nDVTLS not ok - %s\n' "$what"; fi
}
port=$(for w in $(cat /proc/cmdline); do case "$w" in (dvt.port=*) echo "${w#*=}" ;; esac; done)
tlsargs() { echo "-certfile /tls/$1/client-cert.pem -keyfile /tls/$1/client-key.pem -cacertfile /tls/$1/ca-cert.pem -tlshostname localhost"; }
# shellcheck disable=SC2046
connect() { timeout 30 nbd-client 10.0.2.2 "$port" "$1" -N vol $(tlsargs "$2") && sleep 1 && [ "$(cat "/sys/block/${1#/dev/}/size")" != 0 ]; }
refused() { # refused DEV [nbd-client options]: the connection fails and the device stays empty
  local dev="$1"
  shift
  ! timeout 30 nbd-client 10.0.2.2 "$port" "$dev" -N vol "$@" && [ "$(cat "/sys/block/${dev#/dev/}/size")" = 0 ]
}

while read -r m; do insmod "$m" 2> /dev/null; done < /etc/modules.order
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

mkdir -p /mnt/x
head -c 8388608 /dev/urandom > /tmp/f
want=$(sha256sum /tmp/f | cut -c1-64)
check "nbd-client connects over TLS with an allowed certificate (alice)" connect /dev/nbd0 alice
check "mkfs.ext4 on the TLS device" mkfs.ext4 -F -q /dev/nbd0
check "mount, write 8 MiB, sync, umount" sh -c 'mount -t ext4 /dev/nbd0 /mnt/x && cp /tmp/f /mnt/x/f && sync && umount /mnt/x'
check "disconnect" timeout 20 nbd-client -d /dev/nbd0
echo 3 > /proc/sys/vm/drop_caches
check "reconnect over TLS" connect /dev/nbd0 alice
check "the file reads back from the server unchanged" sh -c "mount -t ext4 /dev/nbd0 /mnt/x && [ \"\$(sha256sum /mnt/x/f | cut -c1-64)\" = $want ] && umount /mnt/x"
timeout 20 nbd-client -d /dev/nbd0 > /dev/null 2>&1
# shellcheck disable=SC2046
check "a certificate outside --tls-authz (mallory) is refused" refused /dev/nbd1 $(tlsargs mallory)
check "a client without TLS is refused" refused /dev/nbd2
printf '\nDVTLS done %s checks\n' "$checks"
poweroff -f
