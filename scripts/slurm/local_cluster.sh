#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (munge + slurmctld + slurmd on localhost), for testing
# scripts/slurm/train.sbatch against the real scheduler (signals, requeue, job states) rather than stand-ins.
#
#   scripts/slurm/local_cluster.sh start [DIR]   # install slurm-wlm + munge if missing (apt), write DIR/slurm.conf,
#                                                 # start the daemons; prints `export SLURM_CONF=DIR/slurm.conf`
#   scripts/slurm/local_cluster.sh stop [DIR]
#
# Needs root (apt-get, munge's key, the daemons). DIR defaults to /tmp/distill-slurm. Everything the daemons
# keep (state, spool, logs) lives in DIR, and `start` clears the saved state (no job survives a restart); the cluster has one
# node (this host, all its CPUs) and one partition `debug`, with no accounting (no slurmdbd).
set -euo pipefail
action=${1:-start}
dir=${2:-/tmp/distill-slurm}
conf=$dir/slurm.conf
host=$(hostname -s)

stop() {
    for daemon in slurmd slurmctld; do
        pkill -f "$daemon -f $conf" 2>/dev/null || true
    done
    for _ in $(seq 1 60); do  # slurmctld writes its state as it exits: wait for it before touching DIR
        pgrep -f "slurm(ctld|d) -f $conf" >/dev/null || return 0
        sleep 0.5
    done
    pkill -9 -f "slurm(ctld|d) -f $conf" 2>/dev/null || true
}

if [ "$action" = stop ]; then
    stop
    exit 0
fi
if [ "$action" != start ]; then
    echo "usage: $0 start|stop [DIR]" >&2
    exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1; then
        apt-get update -q >/dev/null  # a machine without package lists yet
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
    fi
fi
if [ ! -f /etc/munge/munge.key ]; then
    mungekey --create >/dev/null 2>&1 || create-munge-key -f >/dev/null
    chown munge:munge /etc/munge/munge.key
fi
if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
fi

stop
# A fresh cluster every start: jobs a killed run left in the saved state (their processes gone with the old
# slurmd) would otherwise come back RUNNING and hold the node's CPUs for good.
rm -rf "$dir/state" "$dir/spool"
mkdir -p "$dir/state" "$dir/spool"
cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
cat > "$conf" <<EOF
ClusterName=distill-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.log
SchedulerParameters=defer
MinJobAge=3600
KillWait=30
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

export SLURM_CONF=$conf
slurmctld -f "$conf"
slurmd -f "$conf"
for _ in $(seq 1 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        echo "export SLURM_CONF=$conf"
        exit 0
    fi
    sleep 0.5
done
echo "the local SLURM cluster did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
