#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the `slurm` tests and for trying hardware=slurm without a cluster.
#
#   scripts/slurm_local.sh start    install slurm-wlm + munge if missing (Debian/Ubuntu, as root), write the config,
#                                   start munged, slurmctld and slurmd, and wait until the node takes jobs
#   scripts/slurm_local.sh stop     stop the daemons this script started (by their pid files)
#   scripts/slurm_local.sh status   `scontrol ping` and `sinfo`
#
# One node (this host, reached at 127.0.0.1) with CPUs=$(nproc) and RealMemory below the free memory, one partition
# (MIMLAB_SLURM_PARTITION, default `local`). No cgroups (proctrack/linuxproc, task/none) and no accounting database,
# so it also runs in containers; sacct has nothing to report (submitit then waits on its result files).
# The config goes to /etc/slurm (where sbatch/srun/scontrol look); an existing slurm.conf that this script did not
# write is left alone and `start` stops with a message. State and logs: MIMLAB_SLURM_STATE (/var/tmp/mimlab-slurm).
set -euo pipefail

STATE=${MIMLAB_SLURM_STATE:-/var/tmp/mimlab-slurm}
PARTITION=${MIMLAB_SLURM_PARTITION:-local}
CONF_DIR=/etc/slurm
MARKER="# written by mimlab scripts/slurm_local.sh"
export PATH="$PATH:/usr/sbin:/sbin"

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed; run as root (installs them with apt-get)"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get: install them"
    echo "installing slurm-wlm and munge ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/MemAvailable/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    if [ -f "$CONF_DIR/slurm.conf" ] && ! grep -qF "$MARKER" "$CONF_DIR/slurm.conf"; then
        die "$CONF_DIR/slurm.conf exists and was not written by this script: this host already has a SLURM setup"
    fi
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/spool"
    cat >"$CONF_DIR/slurm.conf" <<EOF
$MARKER
ClusterName=mimlab-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire + 1 s before it starts again (default 120 s)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem_mb / cpus))
SchedulerType=sched/backfill
# a requeued job starts within seconds of its begin time (default: the next 60 s scheduling pass)
SchedulerParameters=sched_interval=2
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    printf '%s\nCgroupPlugin=autodetect\n' "$MARKER" >"$CONF_DIR/cgroup.conf"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged is already answering
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile /etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 600 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    runuser -u munge -- munged --pid-file=/run/munge/mimlab-munged.pid
    for _ in $(seq 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.5
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    install_packages
    if running "$STATE/slurmctld.pid" && running "$STATE/slurmd.pid"; then
        echo "already running"; status; return
    fi
    write_config
    start_munge
    running "$STATE/slurmctld.pid" || slurmctld -c  # -c: start with an empty job queue
    running "$STATE/slurmd.pid" || slurmd
    for _ in $(seq 60); do
        if [ "$(sinfo -h -N -p "$PARTITION" -o %t 2>/dev/null)" = "idle" ]; then
            status; return
        fi
        sleep 1
    done
    sinfo -N -l >&2 || true
    tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
    die "the node did not become idle within 60 s (logs above, in $STATE)"
}

stop_pid() {  # stop_pid <pid file> <name>: TERM the daemon, wait for it to exit
    local pid
    running "$1" || return 0
    pid=$(cat "$1")
    kill "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    echo "$2 ($pid) did not stop within 15 s" >&2
}

stop() {
    stop_pid "$STATE/slurmd.pid" slurmd
    stop_pid "$STATE/slurmctld.pid" slurmctld
    stop_pid /run/munge/mimlab-munged.pid munged
}

status() {
    scontrol ping
    sinfo
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
