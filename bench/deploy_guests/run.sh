#!/bin/sh
# The guests of tests/functional/test_deploy_guests.py, run by guestkit-check.service after
# every boot ($CI_boot). Boot 1 installs the role as docs/deploy.rst says (vmt-initenv.py)
# and reboots (exit 200). Boot 2: the units are up by themselves; A exports img1 and
# creates vm-a on it, B creates vm-b (its disk reads img1 through the tree), then B reboots.
# Boot 3 of B: virtmanserver is back by itself, vm-b reads img1 again, Volt sees B again.
# M is the master. Signals between guests: busybox nc on ports 9000 (M), 9001 (A), 9002 (B).
set -u
. /ci/secrets.env
MASTER=10.77.0.1
A_IP=10.77.0.2
# virtmanserver listens on its host_ip (listen_host unset), not on 127.0.0.1
export VOLT_URL=http://$MASTER:7447 VOLT_TOKEN=$ADMIN_TOKEN VIRTMAN_TOKEN=$API_TOKEN
export VIRTMAN_URL=http://${CI_ip0%/*}:7774/RPC2
OUT=/ci/out
log() { echo "[$CI_node boot $CI_boot $(cut -d' ' -f1 /proc/uptime)s] $*" | tee -a $OUT/log.txt; }
die() { log "FAIL: $*"; exit 1; }
retry() {  # retry S CMD...: until it succeeds, for at most S seconds (a Python CLI start
  # alone takes seconds under TCG)
  end=$(( $(cut -d. -f1 /proc/uptime) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(cut -d. -f1 /proc/uptime)" -lt $end ] || return 1
    sleep 0.5
  done
}
send() { retry 400 sh -c "echo '$2' | busybox nc $1" || die "cannot send '$2' to $1"; }
recv() { timeout 400 busybox nc -l -p "$1" </dev/null; }
units() {  # the unit's state as systemd sees it, into $OUT/units-boot$CI_boot.txt
  log "waiting for $1"
  retry 240 systemctl is-active --quiet "$1" || die "$1 not active: $(systemctl status $1)"
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
}
vm_disk() { grep -o '/[^ ]*' "$OUT/create-$1.txt" | tail -1; }  # create prints the disk

case "$CI_node:$CI_boot" in
M:1)
  vmt-initenv.py --role master --host-ip $MASTER --token "$ADMIN_TOKEN" \
    --node-secret "$NODE_SECRET" --no-packages > $OUT/initenv.txt 2>&1 \
    || die "vmt-initenv.py: $(cat $OUT/initenv.txt)"
  exit 200 ;;
A:1) node_initenv --test-image img1:8; exit 200 ;;
B:1) node_initenv; exit 200 ;;
M:2)
  units volt-api.service
  retry 120 volt node-list || die "volt-api does not answer"
  msg=$(recv 9000); log "got $msg"
  down=$(cut -d. -f1 /proc/uptime)  # B reboots now
  volt node-list > $OUT/nodes-before.txt || die "node-list"
  log "nodes: $(cat $OUT/nodes-before.txt)"
  msg=$(recv 9000); log "got $msg"
  # B heartbeated since it went down: its age is below the time since then
  fresh() {
    volt node-list > $OUT/nodes-after.txt || return 1
    since=$(( $(cut -d. -f1 /proc/uptime) - down ))
    echo "$since" > $OUT/seconds-since-b-reboot.txt
    awk -v s="$since" '$1 == "10.77.0.3" && $2 < s {ok = 1} END {exit !ok}' $OUT/nodes-after.txt
  }
  retry 180 fresh || die "no heartbeat from B since its reboot: $(cat $OUT/nodes-after.txt)"
  log "after B's reboot: $(cat $OUT/nodes-after.txt)"
  send "$A_IP 9001" DONE
  exit 0 ;;
A:2)
  units virtmanserver.service
  retry 120 virtman list || die "virtmanserver does not answer"
  sha256sum /var/lib/virtman/images/img1.raw | cut -d' ' -f1 > $OUT/img1.sha256
  log "image-create img1"
  virtman image-create img1 /var/lib/virtman/images/img1.raw > $OUT/image-create.txt 2>&1 \
    || die "image-create: $(cat $OUT/image-create.txt)"
  log "create vm-a"
  virtman create vm-a img1 --portal $A_IP:3260 > $OUT/create-vm-a.txt 2>&1 \
    || die "create vm-a: $(cat $OUT/create-vm-a.txt)"
  disk_sha "$(vm_disk vm-a)" > $OUT/vm-a.sha256
  log "vm-a reads $(cat $OUT/vm-a.sha256)"
  send "10.77.0.3 9002" "$(cat $OUT/img1.sha256)"
  msg=$(recv 9001); log "got $msg"
  exit 0 ;;
B:2)
  units virtmanserver.service
  retry 120 virtman list || die "virtmanserver does not answer"
  msg=$(recv 9002); log "img1 sha256 $msg"
  log "create vm-b"
  virtman create vm-b img1 --portal $A_IP:3260 > $OUT/create-vm-b.txt 2>&1 \
    || die "create vm-b: $(cat $OUT/create-vm-b.txt)"
  disk_sha "$(vm_disk vm-b)" > $OUT/vm-b.sha256
  log "vm-b reads $(cat $OUT/vm-b.sha256)"
  cp /run/virtman/paths/img1.json $OUT/paths.json 2>/dev/null
  send "$MASTER 9000" B-REGISTERED
  exit 200 ;;
B:3)
  units virtmanserver.service
  retry 240 sh -c "virtman list | grep -q '^vm-b .* ok$'" || die "vm-b not ok: $(virtman list)"
  virtman list > $OUT/list-boot3.txt
  log "after the reboot: $(cat $OUT/list-boot3.txt)"
  disk_sha "$(vm_disk vm-b)" > $OUT/vm-b-boot3.sha256
  send "$MASTER 9000" B-BACK
  exit 0 ;;
*) die "unexpected boot" ;;
esac
