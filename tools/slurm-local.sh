#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for testing the SLURM profile for real.
#   tools/slurm-local.sh start STATE_DIR   # munged (if not running), slurmctld, slurmd; prints SLURM_CONF
#   tools/slurm-local.sh stop STATE_DIR    # stops only the daemons that `start` started
# Needs the Debian packages slurm-wlm and munge (installed if missing and apt-get is there).
set -euo pipefail
action=$1
state=$(mkdir -p "$2" && cd "$2" && pwd)

stop_pidfile() {
    local file=$1
    if [ -f "$file" ]; then
        kill "$(cat "$file")" 2>/dev/null || true
        rm -f "$file"
    fi
}

if [ "$action" = stop ]; then
    stop_pidfile "$state/slurmd.pid"
    stop_pidfile "$state/slurmctld.pid"
    [ -f "$state/started-munged" ] && stop_pidfile /run/munge/munged.pid && rm -f "$state/started-munged"
    if [ -f "$state/linked-etc-conf" ]; then
        rm -f /etc/slurm/slurm.conf "$state/linked-etc-conf"
    fi
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
host=$(hostname -s)
cpus=$(( $(nproc) < 8 ? 8 : $(nproc) ))
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p "$state/ctld" "$state/spool" "$state/log"
cat > "$state/slurm.conf" <<CONF
ClusterName=cellflow-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
MinJobAge=600
# Time limits of the retry test (tests/test_slurm.py) end in seconds, not minutes.
KillWait=5
OverTimeLimit=0
# The node declares more CPUs than this machine has (as a cluster node has more than the
# machine that submits), so a test can see a rule's threads reach --cpus-per-task.
SlurmdParameters=config_overrides
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host MaxTime=30 State=UP
CONF
export SLURM_CONF=$state/slurm.conf
# Job steps (srun inside a batch job) look for the default path, whatever SLURM_CONF says.
if [ ! -e /etc/slurm/slurm.conf ]; then
    mkdir -p /etc/slurm && ln -s "$SLURM_CONF" /etc/slurm/slurm.conf && touch "$state/linked-etc-conf"
fi
if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    runuser -u munge -- /usr/sbin/munged
    touch "$state/started-munged"
fi
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 1 30); do
    if sinfo -h -o %T 2>/dev/null | grep -q idle; then
        echo "SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
echo "slurm-local: node did not become idle; see $state/log" >&2
exit 1
