#!/usr/bin/env bash
# Install and start a one-node Slurm cluster on this (Debian 12) machine, for the gateway-slurm
# system tests. Idempotent: a second run finds the daemons up and leaves them alone (or restarts
# them if the config it would write has changed). No systemd: the daemons are started directly.
#
#   sudo plugins/gateway-slurm/ci/start-slurm.sh        # as root
#
# What it sets up:
#   - munged, run as user munge, with the key Debian's package created;
#   - slurmctld and slurmd on this host (NodeAddr 127.0.0.1), proctrack/linuxproc, task/none,
#     select/cons_tres with cores and memory as consumable resources;
#   - one node advertising SLURM_CPUS (default 16) CPUs and SLURM_MEMORY_MB (default 16000) MB,
#     more than the machine has (SlurmdParameters=config_overrides), and DefMemPerCPU, so a
#     scheduler and several workers run at once;
#   - one partition, "debug" (the default), and "other" for tests of partition selection;
#   - sudo, for the gateway's "sudo" launcher mode.
# Logs: /var/log/slurm/{slurmctld,slurmd}.log. Exits non-zero, with the reason, if Slurm does
# not answer in time.
set -euo pipefail

CPUS="${SLURM_CPUS:-16}"
MEMORY_MB="${SLURM_MEMORY_MB:-16000}"
NODE="$(hostname -s)"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"

log() { echo "start-slurm: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (installs packages and starts daemons)"
    exit 1
fi

# ---------------------------------------------------------------------------------------------
# Packages
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge sudo:sudo; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d: the packages' postinst must not try to start services (no systemd here).
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge sudo \
        >/dev/null
fi

# ---------------------------------------------------------------------------------------------
# munge
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! pid_alive /run/munge/munged.pid; then
    log "starting munged"
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
fi
for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
done
munge -n </dev/null | unmunge >/dev/null || { log "munge does not work"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Slurm config
install -d -o slurm -g slurm -m 0755 /var/lib/slurm /var/lib/slurm/slurmctld /var/log/slurm /run/slurm
install -d -o root -g root -m 0755 /var/lib/slurm/slurmd "$CONF_DIR"

new_conf="$(mktemp)"
cat >"$new_conf" <<EOF
# Written by plugins/gateway-slurm/ci/start-slurm.sh: a one-node cluster for tests.
ClusterName=gateway-ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
DefMemPerCPU=256
KillWait=5
MinJobAge=60
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=20
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEMORY_MB} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=other Nodes=ALL Default=NO MaxTime=INFINITE State=UP
EOF

changed=0
if ! cmp -s "$new_conf" "$CONF"; then
    install -m 0644 "$new_conf" "$CONF"
    changed=1
fi
rm -f "$new_conf"
# Debian's slurmd reads cgroup.conf only with cgroup plugins; none are configured here.

stop_daemon() {  # pidfile name
    if pid_alive "$1"; then
        log "stopping $2 (config changed)"
        kill "$(cat "$1")" || true
        for _ in $(seq 50); do pid_alive "$1" || break; sleep 0.1; done
    fi
}
if [ "$changed" = 1 ]; then
    stop_daemon /run/slurm/slurmd.pid slurmd
    stop_daemon /run/slurm/slurmctld.pid slurmctld
fi

if ! pid_alive /run/slurm/slurmctld.pid; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
fi
if ! pid_alive /run/slurm/slurmd.pid; then
    log "starting slurmd"
    /usr/sbin/slurmd
fi

# ---------------------------------------------------------------------------------------------
# Wait until the node takes jobs
state=""
for _ in $(seq 120); do
    state="$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true)"
    case "$state" in
        idle* | mixed* | allocated* | completing*) break ;;
        down* | drain* | fail*)
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
case "$state" in
    idle* | mixed* | allocated* | completing*)
        log "Slurm is up: node $NODE is $state ($(sinfo -h -o '%c CPUs, %m MB' -n "$NODE"))" ;;
    *)
        log "Slurm did not come up (node state: '${state:-no answer}'); the end of the logs:"
        tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
        exit 1 ;;
esac
