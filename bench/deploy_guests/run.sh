#!/bin/sh
# The guests of bench/deploy_guests/test_deploy_guests.py, run by guestkit-check.service after
# every boot ($CI_boot). Boot 1 installs the role as docs/deploy.rst says (vmt-initenv.py)
# and reboots (exit 200). Boot 2: the units are up by themselves. M (a master, the image
# server and the PostgreSQL both masters share) exports img1; B, C and D each create an
# instance on it through their virtmanserver and read its disk (relay reads: qemu-img reads
# the instance's qcow2 overlay, whose backing file is the node's FUSE origin; no guest OS
# boots inside). B and C sit under the image server, D under B with C as its standby parent
# (virtmanserver's journal: "parents now"). Then B reboots; once B's NBD port is closed (its
# daemons stopped by virtman-halt), D reads its whole disk: every block comes through C.
# Boot 3 of B: virtmanserver is back by itself, rebuilds vm-b's stack, Volt hears from B.
# Then the master half (docs/ha.rst): M2, the second master (one boot: vmt-initenv.py, then
# systemctl start volt-api as the page's step 3 says), holds the evictor lease and every
# node's heartbeats (M's volt-api is stopped until they all went to M2, then started
# again); M2 loses its power (exit 201: sysrq, nothing stopped). M's volt-api must take the
# lease, the nodes fail over to it, the tree is the same, and a new instance on img2 is
# placed through M and reads img2's bytes.
# Signals between guests: busybox nc on ports 9000 (M), 9001 (M2), 9002 (B), 9003 (C),
# 9004 (D). Waits are long: under TCG on a loaded 2-core host a Python command can take a
# minute.
set -u
. /ci/secrets.env
MASTER=10.77.0.1
M2_IP=10.77.0.2
B_IP=10.77.0.3
# Both masters, M first: nodes talk to M until it is stopped, then to M2 (docs/ha.rst)
MASTERS=$MASTER,$M2_IP
DB_URL=postgresql+psycopg://volt:$DB_PASSWORD@$MASTER/volt
EVICTOR_LOCK="classid = 1450142836 AND objid = 1 AND objsubid = 2"  # volt.store.EVICTOR_LOCK
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
  vmt-initenv.py --role node --master-ip $MASTERS --host-ip "${CI_ip0%/*}" \
    --token "$API_TOKEN" --node-secret "$NODE_SECRET" \
    --chap-user vmthunder --chap-password "$CHAP_PASSWORD" --nbd-psk-file /ci/nbd.psk \
    --no-packages "$@" > $OUT/initenv.txt 2>&1 || die "vmt-initenv.py: $(cat $OUT/initenv.txt)"
  mkdir -p /var/log/journal  # a persistent journal: boot 3 reads how boot 2 shut down
}
master_initenv() {  # master_initenv IP: volt.conf on the shared PostgreSQL, the unit enabled
  vmt-initenv.py --role master --host-ip "$1" --token "$ADMIN_TOKEN" \
    --node-secret "$NODE_SECRET" --database "$DB_URL" --no-packages \
    > $OUT/initenv-master.txt 2>&1 || die "vmt-initenv.py: $(cat $OUT/initenv-master.txt)"
}
postgresql_setup() {  # the database host: PostgreSQL on the bridge, role and database volt
  pgv=$(ls /usr/lib/postgresql | head -1)
  [ -d /etc/postgresql/$pgv/main ] || pg_createcluster "$pgv" main >> $OUT/pg.txt 2>&1
  echo "listen_addresses = '*'" > /etc/postgresql/$pgv/main/conf.d/volt.conf
  echo "host volt volt 10.77.0.0/24 scram-sha-256" >> /etc/postgresql/$pgv/main/pg_hba.conf
  systemctl enable --quiet postgresql.service || die "cannot enable postgresql"
  systemctl restart postgresql.service || die "postgresql: $(systemctl status postgresql@$pgv-main)"
  retry 300 runuser -u postgres -- pg_isready -q || die "postgresql does not answer"
  echo "CREATE ROLE volt LOGIN PASSWORD :'pw';" \
    | runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -v pw="$DB_PASSWORD" \
    >> $OUT/pg.txt 2>&1 || die "create role: $(cat $OUT/pg.txt)"
  runuser -u postgres -- createdb -O volt volt >> $OUT/pg.txt 2>&1 || die "createdb"
  log "postgresql $pgv ready for volt"
}
lease_holder() {  # the client address of the session holding the evictor lease, or "none"
  runuser -u postgres -- psql -X -A -t -d volt -c "SELECT COALESCE(host(a.client_addr),
    'local') FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE
    l.locktype = 'advisory' AND l.granted AND $EVICTOR_LOCK" 2>/dev/null | grep . || echo none
}
all_fresh() {  # all_fresh URL SINCE OUTFILE: every host of nodes-before.txt heartbeated after
  # uptime SINCE (node-list of URL only: its age is below the seconds since then)
  VOLT_URL=$1 volt node-list > "$3" || return 1
  s=$(( $(cut -d. -f1 /proc/uptime) - ${2%.*} ))
  echo "$s" > "$3.since"
  awk -v s="$s" 'NR == FNR { if (FNR > 1) want[$1] = 1; next }
    FNR > 1 && $2 < s { fresh[$1] = 1 }
    END { for (h in want) if (!(h in fresh)) exit 1 }' $OUT/nodes-before.txt "$3"
}
state() {  # state URL FILE: trees and members as the master at URL sees them (JSON)
  VOLT_URL=$1 /opt/vmthunder/bin/python /ci/volt_state.py > "$2" 2>> $OUT/state-errors.txt
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
  postgresql_setup
  master_initenv $MASTER
  node_initenv --test-image img1:16 --test-image img2:4
  exit 200 ;;
M2:1)
  master_initenv $M2_IP
  msg=$(recv 9001) || msg=$(recv 9001); log "got $msg"  # M: its database and volt-api are up
  systemctl start volt-api.service || die "volt-api: $(systemctl status volt-api)"
  units volt-api.service
  retry 600 env VOLT_URL=http://$M2_IP:7447 volt node-list || die "volt-api does not answer"
  send "$MASTER 9000" M2-UP
  msg=$(recv 9001) || msg=$(recv 9001); log "got $msg"  # M: lose the machine now
  [ "$msg" = LOSE ] || die "expected LOSE, got $msg"
  journalctl -b -o short-monotonic --no-pager > $OUT/journal-boot1.txt 2>&1
  log "losing the power"
  exit 201 ;;
B:1 | C:1 | D:1) node_initenv; exit 200 ;;
M:2)
  units volt-api.service
  retry 600 volt node-list || die "volt-api does not answer"
  send "$M2_IP 9001" START
  node_up
  sha256sum /var/lib/virtman/images/img1.raw | cut -d' ' -f1 > $OUT/img1.sha256
  log "image-create img1"
  virtman image-create img1 /var/lib/virtman/images/img1.raw > $OUT/image-create.txt 2>&1 \
    || die "image-create: $(cat $OUT/image-create.txt)"
  send "$B_IP 9002" "$(cat $OUT/img1.sha256)"
  seen=""
  # D-CREATED, then B-DOWN (B's run.sh is done; it reboots), D-READ and B-BACK <uptime>;
  # M2-UP at any time
  while [ "$(echo "$seen" | wc -w)" -lt 5 ]; do
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
  # The master half. M's volt-api stops: the nodes fail over to M2 (and stay with it, the
  # endpoint that answered last), M2 holds the evictor lease. Then M's starts again.
  systemctl stop volt-api.service || die "cannot stop volt-api"
  stopped=$(uptime_s); log "M's volt-api stopped"
  retry 600 all_fresh http://$M2_IP:7447 "$stopped" $OUT/nodes-on-m2.txt \
    || die "the nodes did not fail over to M2: $(cat $OUT/nodes-on-m2.txt)"
  log "every node heartbeats to M2: $(cat $OUT/nodes-on-m2.txt)"
  systemctl start volt-api.service || die "volt-api: $(systemctl status volt-api)"
  retry 600 env VOLT_URL=http://$MASTER:7447 volt node-list || die "M's volt-api does not answer"
  lease_holder > $OUT/lease-before.txt
  log "M's volt-api is back; the evictor lease is held from $(cat $OUT/lease-before.txt)"
  state http://$MASTER:7447 $OUT/state-before.json || die "state before the loss"
  # M2 loses its power. Its loss is the start of the first ping it does not answer.
  send "$M2_IP 9001" LOSE
  lose=$(uptime_s)
  while t=$(uptime_s) && busybox ping -c 1 -W 1 $M2_IP > /dev/null 2>&1; do sleep 0.1; done
  off=$t; log "M2 is gone (no ping answer from $off s)"
  until [ "$(lease_holder)" = $MASTER ]; do
    [ "$(cut -d. -f1 /proc/uptime)" -lt $(( ${off%.*} + 300 )) ] || die "no takeover in 300 s"
    sleep 0.2
  done
  held=$(uptime_s)
  echo "$lose $off $held" > $OUT/takeover.txt
  log "M's volt-api holds the evictor lease $(echo "$off $held" | awk '{print $2 - $1}') s after the loss"
  retry 600 all_fresh http://$MASTER:7447 "$off" $OUT/nodes-after-loss.txt \
    || die "the nodes did not fail over to M: $(cat $OUT/nodes-after-loss.txt)"
  log "every node heartbeats to M again: $(cat $OUT/nodes-after-loss.txt)"
  state http://$MASTER:7447 $OUT/state-after.json || die "state after the loss"
  # a new tree, placed through the survivor: img2 on C
  sha256sum /var/lib/virtman/images/img2.raw | cut -d' ' -f1 > $OUT/img2.sha256
  virtman image-create img2 /var/lib/virtman/images/img2.raw > $OUT/image-create-2.txt 2>&1 \
    || die "image-create img2: $(cat $OUT/image-create-2.txt)"
  send "10.77.0.4 9003" IMG2
  msg=$(recv 9000); log "got $msg"
  [ "$msg" = C-IMG2 ] || die "expected C-IMG2, got $msg"
  state http://$MASTER:7447 $OUT/state-img2.json || die "state after img2"
  for peer in "$B_IP 9002" "10.77.0.4 9003" "10.77.0.5 9004"; do send "$peer" DONE; done
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
  msg=$(recv 9003) || msg=$(recv 9003); log "got $msg"  # after the loss of M2
  [ "$msg" = IMG2 ] || die "expected IMG2, got $msg"
  log "create vm-c2 on img2"
  virtman create vm-c2 img2 --portal $MASTER:3260 > "$OUT/create-vm-c2.txt" 2>&1 \
    || die "create vm-c2: $(cat "$OUT/create-vm-c2.txt")"
  disk_sha "$(vm_disk vm-c2)" > "$OUT/vm-c2.sha256"
  log "vm-c2 reads $(cat "$OUT/vm-c2.sha256")"
  send "$MASTER 9000" C-IMG2
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
  msg=$(recv 9004) || msg=$(recv 9004); log "got $msg"
  exit 0 ;;
B:3)
  node_up
  retry 600 sh -c "virtman list | grep -q '^vm-b .* ok$'" || die "vm-b not ok: $(virtman list)"
  virtman list > $OUT/list-boot3.txt
  log "after the reboot: $(cat $OUT/list-boot3.txt)"
  disk_sha "$(vm_disk vm-b)" > $OUT/vm-b-boot3.sha256
  journalctl -b -1 -o short-monotonic --no-pager > $OUT/journal-shutdown.txt 2>&1
  send "$MASTER 9000" "B-BACK $(uptime_s)"
  msg=$(recv 9002) || msg=$(recv 9002); log "got $msg"  # B stays up for the master half
  exit 0 ;;
*) die "unexpected boot" ;;
esac
