#!/bin/sh
# The guests of bench/deploy_guests/test_deploy_guests.py, run by guestkit-check.service after
# every boot ($CI_boot). Boot 1 installs the role as docs/deploy.rst says (vmt-initenv.py)
# and reboots (exit 200). Boot 2: the units are up by themselves. M (the master, and the
# image server: both roles on one host) exports img1; B, C and D each create an instance on it through their virtmanserver and read its
# disk (relay reads: qemu-img reads the instance's qcow2 overlay, whose backing file is the
# node's FUSE origin; no guest OS boots inside). B and C sit under the image server, D under
# B with C as its standby parent (virtmanserver's journal: "parents now"). Then B reboots; once B's NBD port is closed (its daemons
# stopped by virtman-halt), D reads its whole disk: every block comes through C. Boot 3 of B:
# virtmanserver is back by itself, rebuilds vm-b's stack, Volt hears from B again.
# Signals between guests: busybox nc on ports 9000 (M), 9002 (B), 9003 (C), 9004 (D).
# Waits are long: under TCG on a loaded 2-core host a Python command can take a minute.
set -u
. /ci/secrets.env
MASTER=10.77.0.1
B_IP=10.77.0.3
NBD_PORT=10809
# virtmanserver listens on its host_ip (listen_host unset), not on 127.0.0.1
export VOLT_URL=http://$MASTER:7447 VOLT_TOKEN=$ADMIN_TOKEN VIRTMAN_TOKEN=$API_TOKEN
export VIRTMAN_URL=http://${CI_ip0%/*}:7774/RPC2
OUT=/ci/out
uptime_s() { cut -d' ' -f1 /proc/uptime; }
log() { echo "[$CI_node boot $CI_boot $(uptime_s)s] $*" | tee -a $OUT/log.txt; }
die() { log "FAIL: $*"; exit 1; }
retry() {  # retry S CMD...: until it succeeds, for at most S seconds (a Python CLI start
  # alone takes seconds under TCG)
  end=$(( $(cut -d. -f1 /proc/uptime) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(cut -d. -f1 /proc/uptime)" -lt $end ] || return 1
    sleep 0.5
  done
}
send() { retry 900 sh -c "echo '$2' | busybox nc $1" || die "cannot send '$2' to $1"; }
recv() { timeout 1200 busybox nc -l -p "$1" </dev/null; }
open_port() {  # open_port HOST PORT: a TCP connection succeeds within 3 s
  python -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)' "$@"
}
closed_port() { ! open_port "$@"; }
units() {  # the unit's state as systemd sees it, into $OUT/units-boot$CI_boot.txt
  log "waiting for $1"
  retry 600 systemctl is-active --quiet "$1" || die "$1 not active: $(systemctl status $1)"
  for q in is-enabled is-active; do echo "$1 $q $(systemctl $q "$1")"; done \
    >> $OUT/units-boot$CI_boot.txt
  systemctl show -p NRestarts -p ActiveEnterTimestampMonotonic "$1" >> $OUT/units-boot$CI_boot.txt
  log "$1 active"
}
disk_sha() {  # the guest-visible bytes of an instance's qcow2 disk
  qemu-img convert -f qcow2 -O raw "$1" /run/disk.raw && sha256sum /run/disk.raw | cut -d' ' -f1
  rm -f /run/disk.raw
}
node_initenv() {
  vmt-initenv.py --role node --master-ip $MASTER --host-ip "${CI_ip0%/*}" \
    --token "$API_TOKEN" --node-secret "$NODE_SECRET" \
    --chap-user vmthunder --chap-password "$CHAP_PASSWORD" --nbd-psk-file /ci/nbd.psk \
    --no-packages "$@" > $OUT/initenv.txt 2>&1 || die "vmt-initenv.py: $(cat $OUT/initenv.txt)"
  mkdir -p /var/log/journal  # a persistent journal: boot 3 reads how boot 2 shut down
}
vm_disk() { grep -o '/[^ ]*' "$OUT/create-$1.txt" | tail -1; }  # create prints the disk
node_up() {  # units, then virtmanserver answers
  units virtmanserver.service
  retry 600 virtman list || die "virtmanserver does not answer"
}
create_and_read() {  # create_and_read VM: the instance on img1 and its disk's sha256
  log "create $1"
  virtman create "$1" img1 --portal $MASTER:3260 > "$OUT/create-$1.txt" 2>&1 \
    || die "create $1: $(cat "$OUT/create-$1.txt")"
  disk_sha "$(vm_disk "$1")" > "$OUT/$1.sha256"
  log "$1 reads $(cat "$OUT/$1.sha256")"
}

case "$CI_node:$CI_boot" in
M:1)
  vmt-initenv.py --role master --host-ip $MASTER --token "$ADMIN_TOKEN" \
    --node-secret "$NODE_SECRET" --no-packages > $OUT/initenv-master.txt 2>&1 \
    || die "vmt-initenv.py: $(cat $OUT/initenv-master.txt)"
  node_initenv --test-image img1:16
  exit 200 ;;
B:1 | C:1 | D:1) node_initenv; exit 200 ;;
M:2)
  units volt-api.service
  retry 600 volt node-list || die "volt-api does not answer"
  node_up
  sha256sum /var/lib/virtman/images/img1.raw | cut -d' ' -f1 > $OUT/img1.sha256
  log "image-create img1"
  virtman image-create img1 /var/lib/virtman/images/img1.raw > $OUT/image-create.txt 2>&1 \
    || die "image-create: $(cat $OUT/image-create.txt)"
  send "$B_IP 9002" "$(cat $OUT/img1.sha256)"
  seen=""
  # D-CREATED, then B-DOWN (B's run.sh is done; it reboots), D-READ and B-BACK <uptime>
  while [ "$(echo "$seen" | wc -w)" -lt 4 ]; do
    msg=$(recv 9000) || die "no message after: $seen"
    log "got $msg"
    case "$msg" in
      D-CREATED) volt node-list > $OUT/nodes-before.txt || die "node-list" ;;
      B-DOWN) down=$(uptime_s) ;;
      B-BACK*) back=$(uptime_s); echo "$msg" | cut -d' ' -f2 > $OUT/b-uptime-at-back.txt ;;
    esac
    seen="$seen ${msg%% *}"
  done
  # B's reboot as seen from here: its shutdown, the reset and its boot up to run.sh
  echo "$down $back" | awk '{print $2 - $1}' > $OUT/b-reboot-span.txt
  # B heartbeated since it went down: its age is below the time since then
  fresh() {
    volt node-list > $OUT/nodes-after.txt || return 1
    since=$(( $(cut -d. -f1 /proc/uptime) - ${down%.*} ))
    echo "$since" > $OUT/seconds-since-b-reboot.txt
    awk -v s="$since" -v b="$B_IP" '$1 == b && $2 < s {ok = 1} END {exit !ok}' \
      $OUT/nodes-after.txt
  }
  retry 600 fresh || die "no heartbeat from B since its reboot: $(cat $OUT/nodes-after.txt)"
  log "after B's reboot: $(cat $OUT/nodes-after.txt)"
  for peer in "10.77.0.4 9003" "10.77.0.5 9004"; do send "$peer" DONE; done
  exit 0 ;;
B:2)
  node_up
  msg=$(recv 9002); log "img1 sha256 $msg"
  create_and_read vm-b
  send "10.77.0.4 9003" "$msg"
  msg=$(recv 9002); log "got $msg"  # D: its stack is up, reboot now
  send "$MASTER 9000" B-DOWN
  exit 200 ;;
C:2)
  node_up
  msg=$(recv 9003); log "img1 sha256 $msg"
  create_and_read vm-c
  send "10.77.0.5 9004" "$msg"
  msg=$(recv 9003); log "got $msg"
  exit 0 ;;
D:2)
  node_up
  msg=$(recv 9004); log "img1 sha256 $msg"
  log "create vm-d"
  virtman create vm-d img1 --portal $MASTER:3260 > $OUT/create-vm-d.txt 2>&1 \
    || die "create vm-d: $(cat $OUT/create-vm-d.txt)"
  send "$MASTER 9000" D-CREATED
  send "$B_IP 9002" REBOOT
  log "waiting for B's NBD port to close"
  retry 900 closed_port $B_IP $NBD_PORT || die "B's NBD port stays open"
  log "B's NBD port is closed: reading vm-d"
  disk_sha "$(vm_disk vm-d)" > $OUT/vm-d.sha256
  log "vm-d reads $(cat $OUT/vm-d.sha256)"
  if closed_port $B_IP $NBD_PORT; then echo closed; else echo open; fi > $OUT/b-nbd-after-read.txt
  send "$MASTER 9000" D-READ
  msg=$(recv 9004); log "got $msg"
  exit 0 ;;
B:3)
  node_up
  retry 600 sh -c "virtman list | grep -q '^vm-b .* ok$'" || die "vm-b not ok: $(virtman list)"
  virtman list > $OUT/list-boot3.txt
  log "after the reboot: $(cat $OUT/list-boot3.txt)"
  disk_sha "$(vm_disk vm-b)" > $OUT/vm-b-boot3.sha256
  journalctl -b -1 -o short-monotonic --no-pager > $OUT/journal-shutdown.txt 2>&1
  send "$MASTER 9000" "B-BACK $(uptime_s)"
  exit 0 ;;
*) die "unexpected boot" ;;
esac
